//! snapveil: snapshot → encrypted reverse view → rsync generations.
//!
//! The modules mirror the pipeline: `snapshot` freezes a source, `crypto` holds the
//! gocryptfs-compatible transforms (no I/O), `view` presents a frozen tree encrypted over
//! FUSE, `exec` is the one seam through which every external command runs.

pub mod cli;
mod commands;
pub mod crypto;
pub mod decrypt;
pub mod error;
pub mod exec;
pub mod logging;
pub mod manifest;
pub mod signals;
pub mod view;

use std::process::ExitCode;

/// Runs one CLI invocation. `runner` executes every external command.
///
/// # Errors
/// Any failure of the chosen command, with context; `main` prints it and exits 1.
pub fn run(runner: &dyn exec::Runner, cli: cli::Cli) -> anyhow::Result<ExitCode> {
    let _ = runner;
    match cli.command {
        cli::Command::Init(a) => commands::init(a),
        cli::Command::Mount(a) => commands::mount(a),
        cli::Command::Umount(a) => commands::umount(a),
        cli::Command::Decrypt(a) => commands::decrypt(a),
        cli::Command::Open(a) => commands::open(a),
    }
}
