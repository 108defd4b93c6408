use clap::FromArgMatches;
use std::process::ExitCode;

fn main() -> ExitCode {
    let matches = snapveil::cli::command().get_matches();
    if let Some(dir) = snapveil::cli::gen_docs_dir(&matches) {
        return snapveil::gen_docs(&dir);
    }
    let cli = snapveil::cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    snapveil::logging::init(cli.log_format, cli.verbose);
    snapveil::run(&snapveil::exec::SystemRunner, cli)
}
