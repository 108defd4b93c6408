//! snapveil: snapshot → encrypted reverse view → rsync generations.
//!
//! The modules mirror the pipeline: `snapshot` freezes a source, `crypto` holds the
//! gocryptfs-compatible transforms (no I/O), `view` presents a frozen tree encrypted over
//! FUSE, `exec` is the one seam through which every external command runs.

pub mod cli;
mod commands;
pub mod config;
pub mod crypto;
pub mod decrypt;
pub mod error;
pub mod exec;
pub mod hooks;
pub mod job;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod prune;
pub mod restore;
pub mod retention;
pub mod rsync;
pub mod scratch;
pub mod signals;
pub mod snapshot;
pub mod status;
pub mod verify;
pub mod view;

use anyhow::Context;
use std::process::ExitCode;

/// Runs one CLI invocation. `runner` executes every external command.
///
/// # Errors
/// Any failure of the chosen command, with context; `main` prints it and exits 1.
pub fn run(runner: &dyn exec::Runner, cli: cli::Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        cli::Command::Init(a) => commands::init(a),
        cli::Command::Mount(a) => commands::mount(a),
        cli::Command::Umount(a) => commands::umount(a),
        cli::Command::Decrypt(a) => commands::decrypt(a),
        cli::Command::Open(a) => commands::open(a),
        cli::Command::Run(a) => commands::run_jobs(runner, a),
        cli::Command::CheckConfig(a) => commands::check_config(a),
        cli::Command::Status(a) => commands::status(a),
        cli::Command::List(a) => commands::list(runner, a),
        cli::Command::Prune(a) => {
            if a.target.is_some() {
                prune::command(runner, &a)
            } else {
                prune::jobs_command(runner, &a)
            }
        }
        cli::Command::Verify(a) => verify::command(runner, &a.config.config, &a.job, a.deep)
            .with_context(|| format!("job {}: verify", a.job)),
        cli::Command::Restore(a) => restore::command(
            runner,
            &a.config.config,
            &a.job,
            &a.paths,
            &a.to,
            a.as_of.as_deref(),
            a.raw,
        )
        .with_context(|| format!("job {}: restore", a.job)),
        cli::Command::Snapshot(a) => {
            signals::install().context("installing signal handlers")?;
            snapshot::cmd::snapshot_cli(runner, &a).with_context(|| {
                format!("job {}: snapshot of {}", a.target.job, a.target.source)
            })?;
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::Cleanup(a) => {
            // A Ctrl-C must not cut a cleanup in half: the flag is only polled, never fatal.
            signals::install().context("installing signal handlers")?;
            match (&a.source, &a.job) {
                (Some(source), Some(job)) => {
                    snapshot::cmd::cleanup_cli(runner, job, source, &a)
                        .with_context(|| format!("job {job}: cleanup of {source}"))?;
                    Ok(ExitCode::SUCCESS)
                }
                _ => commands::cleanup_jobs(runner, &a),
            }
        }
    }
}
