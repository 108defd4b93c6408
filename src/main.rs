use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = snapveil::cli::Cli::parse();
    snapveil::logging::init(cli.log_format, cli.verbose);
    snapveil::run(&snapveil::exec::SystemRunner, cli)
}
