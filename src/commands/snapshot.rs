//! `snapveil snapshot --source SPEC --job NAME [--hold|--wait]`: takes a snapshot, prints
//! its name and read-only path, and releases it (at once, never, or on a signal). Takes
//! no job config.

use super::Outcome;
use crate::cli::{SnapshotArgs, SnapshotSourceArgs};
use crate::exec::Runner;
use crate::snapshot::cmd::{self, Mode};
use crate::snapshot::{SnapshotOptions, Tools};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Snapshot options and work dir from the command line.
fn options(a: &SnapshotSourceArgs) -> (SnapshotOptions, PathBuf) {
    let opts = SnapshotOptions {
        recursive: a.recursive,
        snapshot_dir: a.snapshot_dir.clone(),
        size: a.size.clone(),
        mount_options: a.mount_options.clone(),
    };
    (opts, cmd::work_dir(&a.state_dir, &a.job))
}

pub fn run(runner: &dyn Runner, a: SnapshotArgs) -> Result<Outcome> {
    crate::signals::install().context("installing signal handlers")?;
    let t = &a.target;
    let (opts, work) = options(t);
    let mode = if a.hold {
        Mode::Hold
    } else if a.wait {
        Mode::Wait
    } else {
        Mode::Release
    };
    cmd::snapshot(
        runner,
        &t.job,
        &t.source,
        &opts,
        &Tools::default(),
        &work,
        mode,
        &mut std::io::stdout().lock(),
    )
    .with_context(|| format!("job {}: snapshot of {}", t.job, t.source))?;
    Ok(Outcome::Success)
}
