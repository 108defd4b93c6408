use clap::FromArgMatches;
use std::process::ExitCode;

fn main() -> ExitCode {
    // mount(8) and fuse3's mount.fuse3 call us as a mount helper; see
    // commands::mount_helper.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = snapveil::run_mount_helper(&argv) {
        return code;
    }
    let matches = snapveil::cli::command().get_matches();
    if let Some(dir) = snapveil::cli::gen_docs_dir(&matches) {
        return snapveil::gen_docs(&dir);
    }
    let cli = snapveil::cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    snapveil::logging::init(cli.log_format, cli.verbose);
    snapveil::run(&snapveil::exec::SystemRunner, cli)
}
