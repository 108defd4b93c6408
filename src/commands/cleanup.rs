//! `snapveil cleanup [JOB]...`: removes what crashed or killed runs left (view mounts,
//! snapshots, clones) for the configured jobs, each under its lock so a running job is
//! never touched; or, with `--source SPEC --job NAME`, the stale snapshots of one source
//! without a config.

use super::Outcome;
use crate::cli::CleanupArgs;
use crate::exec::Runner;
use crate::snapshot::{self, SnapshotOptions, Source, Tools};
use anyhow::{Context, Result};

pub fn run(runner: &dyn Runner, a: CleanupArgs) -> Result<Outcome> {
    // A Ctrl-C must not cut a cleanup in half: the flag is only polled, never fatal.
    crate::signals::install().context("installing signal handlers")?;
    match (&a.source, &a.job) {
        (Some(source), Some(job)) => {
            one_source(runner, job, source, &a)
                .with_context(|| format!("job {job}: cleanup of {source}"))?;
            Ok(Outcome::Success)
        }
        _ => jobs(runner, &a),
    }
}

fn one_source(runner: &dyn Runner, job: &str, source: &Source, a: &CleanupArgs) -> Result<()> {
    let opts = SnapshotOptions {
        recursive: a.recursive,
        snapshot_dir: a.snapshot_dir.clone(),
        ..SnapshotOptions::default()
    };
    snapshot::cmd::cleanup(
        runner,
        job,
        source,
        &opts,
        &Tools::default(),
        &snapshot::cmd::work_dir(&a.state_dir, job),
        &mut std::io::stdout().lock(),
    )?;
    Ok(())
}

fn jobs(runner: &dyn Runner, a: &CleanupArgs) -> Result<Outcome> {
    let cfg = super::load_config(&a.config.config)?;
    let jobs = super::select_jobs(&cfg, &a.config.config, &a.jobs)?;
    let done = super::each_job_locked(&cfg, &jobs, |job| {
        let removed = crate::job::cleanup_leftovers(runner, &cfg, job)?;
        if removed.is_empty() {
            println!("{}: nothing left behind", job.name);
        }
        for r in removed {
            println!("{}: removed {r}", job.name);
        }
        Ok(())
    });
    Ok(Outcome::from_ok(done))
}
