//! The work of `snapveil snapshot` and `snapveil cleanup --source` over one source:
//! [`snapshot`] and [`cleanup`] take the job name, source, options, tools and work dir as
//! plain parameters (the CLI side is `commands::snapshot` / `commands::cleanup`), and
//! [`work_dir`] names where a job's clones and snapshot LVs are mounted.

use super::{cleanup_stale, now_stamp, take, SnapshotError, SnapshotOptions, Source, Tools};
use crate::exec::Runner;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `snapveil snapshot` does with the snapshot once it is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Print it and release it at once (a check that the source can be snapshotted).
    Release,
    /// Print it and leave it in place for inspection; the next run or cleanup removes it.
    Hold,
    /// Print it, keep it until SIGINT/SIGTERM/SIGHUP, then release it.
    Wait,
}

/// The per-job directory where clones and snapshot LVs are mounted.
pub fn work_dir(state_dir: &Path, job: &str) -> PathBuf {
    state_dir.join("work").join(job)
}

fn stdout_err(e: std::io::Error) -> SnapshotError {
    SnapshotError::Io {
        path: "<stdout>".into(),
        source: e,
    }
}

/// Takes a snapshot and prints `snapshot NAME`, `path PATH`, `consistent yes|no`, then
/// releases it, keeps it, or waits for a signal, per `mode`. The caller installs the
/// signal handlers ([`crate::signals::install`]); a signal that arrives while the
/// snapshot is being taken is honoured as soon as it exists: it is released and
/// [`SnapshotError::Interrupted`] returned.
///
/// # Errors
/// From [`take`] and release, and [`SnapshotError::Interrupted`].
#[allow(clippy::too_many_arguments)]
pub fn snapshot(
    runner: &dyn Runner,
    job: &str,
    source: &Source,
    opts: &SnapshotOptions,
    tools: &Tools,
    work_dir: &Path,
    mode: Mode,
    out: &mut dyn Write,
) -> Result<(), SnapshotError> {
    let guard = take(runner, job, &now_stamp(), source, opts, tools, work_dir)?;
    if crate::signals::cancelled() && mode != Mode::Wait {
        let name = guard.name().to_owned();
        guard.release()?;
        return Err(SnapshotError::Interrupted { name });
    }
    writeln!(
        out,
        "snapshot {}\npath {}\nconsistent {}",
        guard.name(),
        guard.path().display(),
        if guard.consistent() { "yes" } else { "no" }
    )
    .and_then(|()| out.flush())
    .map_err(stdout_err)?;
    match mode {
        Mode::Hold => {
            guard.keep();
            Ok(())
        }
        Mode::Release => guard.release(),
        Mode::Wait => {
            while !crate::signals::cancelled() {
                std::thread::sleep(Duration::from_millis(100));
            }
            tracing::info!("signal received, releasing the snapshot");
            guard.release()
        }
    }
}

/// Removes stale snapshots of `job` on `source` and prints one `removed NAME` line each.
///
/// # Errors
/// From [`cleanup_stale`].
pub fn cleanup(
    runner: &dyn Runner,
    job: &str,
    source: &Source,
    opts: &SnapshotOptions,
    tools: &Tools,
    work_dir: &Path,
    out: &mut dyn Write,
) -> Result<(), SnapshotError> {
    for name in cleanup_stale(runner, job, source, opts, tools, work_dir)? {
        writeln!(out, "removed {name}").map_err(stdout_err)?;
    }
    out.flush().map_err(stdout_err)
}
