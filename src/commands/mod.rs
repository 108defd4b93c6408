//! The command seam: one module per subcommand, each with
//! `run(runner, args) -> anyhow::Result<Outcome>`, called by `lib::run`.
//!
//! This is the only code that reads `cli` types and the only code that decides an exit
//! status. It turns arguments into plain parameters for the library modules (`config`,
//! `job`, `prune`, `verify`, `restore`, `snapshot`, `view`, `decrypt`), prints their
//! reports, and ends in one of three ways ([`exit_code`], documented in `snapveil(8)`,
//! EXIT STATUS):
//!
//! - `Ok(`[`Outcome::Success`]`)`: exit 0.
//! - `Ok(`[`Outcome::Failed`]`)`: exit 1, the work was attempted and failed (a job, a
//!   verify difference, a file a restore or decrypt could not bring back); the command
//!   has already said what.
//! - `Err` of a [`UsageError`] ([`usage`]): exit 2, nothing was attempted: a config file
//!   that does not load, an unknown job name, a bad `--keep-*` or `--as-of` value.
//! - any other `Err`: exit 1, printed with its context chain (`snapveil: error: …`).
//!
//! The shared steps, [`load_config`], [`select_jobs`] and [`find_job`], fail with a
//! [`UsageError`] naming the config file or the job, so every command that takes a
//! config treats them alike.

pub mod check_config;
pub mod cleanup;
pub mod decrypt;
pub mod init;
pub mod list;
pub mod mount;
pub mod mount_helper;
pub mod mount_unit;
pub mod open;
pub mod prune;
pub mod restore;
pub mod run;
pub mod serve_pull;
pub mod snapshot;
pub mod status;
pub mod umount;
pub mod verify;

mod daemon;

use crate::config::{Config, Job};
use crate::crypto::names::CONF_NAME;
use crate::crypto::{KeyConfig, Keys};
use crate::error::{EXIT_FAILURE, EXIT_USAGE};
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// How a command that ran to its end came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// Everything asked for was done: exit 0.
    Success,
    /// The work was attempted and (part of) it failed, already reported: exit 1.
    Failed,
}

impl Outcome {
    /// `Success` when `ok`, else `Failed`.
    pub fn from_ok(ok: bool) -> Outcome {
        if ok {
            Outcome::Success
        } else {
            Outcome::Failed
        }
    }
}

/// Bad usage, config or input, found before anything was attempted: exit 2. The message
/// names what to fix (the config file, the job, the option).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as an `anyhow::Error`, for `return Err(usage(…))`.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// The exit status of a command's result, printing an error first. The one place that
/// maps results to exit codes (see the module doc).
pub fn exit_code(result: anyhow::Result<Outcome>) -> ExitCode {
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(EXIT_FAILURE),
        Err(e) => match e.downcast_ref::<UsageError>() {
            // Not eprintln!: after a pull whose ssh connection dropped, stderr is a
            // closed pipe, and a failed print must not turn the exit into a panic.
            Some(u) => {
                let _ = writeln!(std::io::stderr(), "snapveil: {u}");
                ExitCode::from(EXIT_USAGE)
            }
            None => {
                let _ = writeln!(
                    std::io::stderr(),
                    "snapveil: error: {}",
                    crate::error::Chain(e.as_ref())
                );
                ExitCode::from(EXIT_FAILURE)
            }
        },
    }
}

/// Loads the job config and logs its warnings.
///
/// # Errors
/// A [`UsageError`] listing every problem, each naming the file (and line and field).
pub fn load_config(file: &Path) -> anyhow::Result<Config> {
    match crate::config::load(file) {
        Ok(c) => {
            for w in &c.warnings {
                tracing::warn!("{w}");
            }
            Ok(c)
        }
        Err(e) => Err(usage(format!("invalid config:\n{e}"))),
    }
}

fn no_job(name: &str, file: &Path) -> anyhow::Error {
    usage(format!("no job named {name:?} in {}", file.display()))
}

/// The jobs named on the command line, in that order, or all when none is.
///
/// # Errors
/// A [`UsageError`] naming the first unknown job and the config file.
/// Runs `work` on each job under the job's lock; a job whose lock is held (a run is
/// going on) is skipped and one whose work fails is reported, and the others go on.
/// True when every job was done.
pub fn each_job_locked(
    cfg: &Config,
    jobs: &[&crate::config::Job],
    mut work: impl FnMut(&crate::config::Job) -> anyhow::Result<()>,
) -> bool {
    let mut all = true;
    for job in jobs {
        let _lock = match crate::lock::JobLock::acquire(&cfg.state_dir, &job.name) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("snapveil: {e}: skipped");
                all = false;
                continue;
            }
        };
        if let Err(e) = work(job) {
            eprintln!(
                "snapveil: job {}: {}",
                job.name,
                crate::error::Chain(e.as_ref())
            );
            all = false;
        }
    }
    all
}

pub fn select_jobs<'c>(
    cfg: &'c Config,
    file: &Path,
    names: &'c [String],
) -> anyhow::Result<Vec<&'c Job>> {
    cfg.select(names).map_err(|n| no_job(n, file))
}

/// The one job named on the command line.
///
/// # Errors
/// A [`UsageError`] naming the job and the config file.
pub fn find_job<'c>(cfg: &'c Config, file: &Path, name: &str) -> anyhow::Result<&'c Job> {
    cfg.job(name).ok_or_else(|| no_job(name, file))
}

/// Keys for reading a backup copy (`decrypt`, `open`): its own `gocryptfs.conf` unless
/// `--config` is given. A generation directory carries no config of its own; for
/// `TARGET/generations/STAMP` the target's `current/gocryptfs.conf` (same key:
/// check_target guarantees it) is used.
fn copy_keys(config: Option<&Path>, tree: &Path, passfile: &Path) -> anyhow::Result<Keys> {
    let conf_path = config.map(Path::to_path_buf).unwrap_or_else(|| {
        let own = tree.join(CONF_NAME);
        let generation = tree
            .parent()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n == crate::target::Area::Generations.dir())
            })
            .and_then(Path::parent)
            .map(|t| t.join(crate::target::Area::Current.dir()).join(CONF_NAME));
        match generation {
            Some(g) if !own.exists() && g.exists() => {
                tracing::info!(config = %g.display(), "a generation: using the target's key config");
                g
            }
            _ => own,
        }
    });
    // A config inside a backup copy is not secret on its own (scrypt-wrapped) and rsync
    // may have stored it with any mode; an explicit --config must be private.
    let key = if config.is_some() {
        KeyConfig::load(&conf_path)?
    } else {
        KeyConfig::load_public(&conf_path)?
    };
    let master = key.unlock_with_passfile(passfile)?;
    Ok(Keys::new(&master, key.flags))
}

/// A job's target with its record key, so that its records' MACs are checked (issue 14).
///
/// # Errors
/// The key config or passfile cannot be read, or the password is wrong.
pub fn keyed_target(
    cfg: &crate::config::Config,
    job: &crate::config::Job,
) -> anyhow::Result<crate::target::Target> {
    use anyhow::Context;
    let (_, master) = crate::verify::unlock(job).with_context(|| {
        format!(
            "job {}: unlocking the key (to check the target's records)",
            job.name
        )
    })?;
    Ok(crate::target::Target::for_job(cfg, job).with_auth(crate::crypto::RecordKey::new(&master)))
}
