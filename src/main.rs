use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = snapveil::cli::Cli::parse();
    snapveil::logging::init(cli.log_format, cli.verbose);
    match snapveil::run(&snapveil::exec::SystemRunner, cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snapveil: error: {}", snapveil::error::Chain(e.as_ref()));
            ExitCode::from(snapveil::error::EXIT_FAILURE)
        }
    }
}
