use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // mount(8) and fuse3's mount.fuse3 call us as a mount helper; see
    // commands::mount_helper.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = snapveil::run_mount_helper(&argv) {
        return code;
    }
    let cli = snapveil::cli::Cli::parse();
    snapveil::logging::init(cli.log_format, cli.verbose);
    snapveil::run(&snapveil::exec::SystemRunner, cli)
}
