//! snapveil: snapshot → encrypted reverse view → rsync generations.
//!
//! The modules mirror the pipeline: `snapshot` freezes a source, `crypto` holds the
//! gocryptfs-compatible transforms (no I/O), `view` presents a frozen tree encrypted over
//! FUSE, `exec` is the one seam through which every external command runs.

pub mod cli;
pub mod error;
pub mod exec;
pub mod logging;
pub mod signals;

use std::process::ExitCode;

/// Runs one CLI invocation. `runner` executes every external command.
///
/// # Errors
/// Any failure of the chosen command, with context; `main` prints it and exits 1.
pub fn run(runner: &dyn exec::Runner, cli: cli::Cli) -> anyhow::Result<ExitCode> {
    let _ = runner;
    match cli.command {
        cli::Command::Init(_)
        | cli::Command::Mount(_)
        | cli::Command::Umount(_)
        | cli::Command::Decrypt(_) => {
            anyhow::bail!("not built yet")
        }
    }
}
