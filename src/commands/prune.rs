//! `snapveil prune [JOB]... [--dry-run]` by each job's configured policy, or
//! `snapveil prune --target T --keep-…` for any target (restic's `forget` rules). The
//! `--keep-*` options are read here into a [`Policy`]; a bad or empty one is a usage
//! error (exit 2), as are `--keep-*` without `--target`.

use super::{usage, Outcome};
use crate::cli::{KeepArgs, PruneArgs};
use crate::exec::Runner;
use crate::prune::PruneOptions;
use crate::retention::{self, Policy};
use crate::target::{Address, Target};
use anyhow::{Context, Result};

pub fn run(runner: &dyn Runner, a: PruneArgs) -> Result<Outcome> {
    match &a.target {
        Some(target) => prune_target(runner, target, &a),
        None => prune_jobs(runner, &a),
    }
}

/// The `--keep-<rule>` counts, in the order [`Policy::from_parts`] takes them.
fn counts(k: &KeepArgs) -> [i64; 6] {
    [
        k.keep_last,
        k.keep_hourly,
        k.keep_daily,
        k.keep_weekly,
        k.keep_monthly,
        k.keep_yearly,
    ]
}

/// The `--keep-within[-<rule>]` spans, in the order [`Policy::from_parts`] takes them.
fn spans(k: &KeepArgs) -> [Option<&str>; 6] {
    [
        k.keep_within.as_deref(),
        k.keep_within_hourly.as_deref(),
        k.keep_within_daily.as_deref(),
        k.keep_within_weekly.as_deref(),
        k.keep_within_monthly.as_deref(),
        k.keep_within_yearly.as_deref(),
    ]
}

fn keep_given(k: &KeepArgs) -> bool {
    counts(k).iter().any(|n| *n != 0) || spans(k).iter().any(Option::is_some)
}

/// The policy of the `--keep-*` options.
///
/// # Errors
/// A [`super::UsageError`]: a bad count or duration, or a policy that keeps nothing.
fn keep_policy(k: &KeepArgs) -> Result<Policy> {
    let policy = Policy::from_parts(counts(k), spans(k))
        .and_then(|p| p.validate().map(|()| p))
        .map_err(|e| usage(format!("error: {e}")))?;
    Ok(policy)
}

/// `prune JOB...`: each job under its lock, by its policy; one failing does not stop the
/// others.
fn prune_jobs(runner: &dyn Runner, a: &PruneArgs) -> Result<Outcome> {
    if keep_given(&a.keep) {
        return Err(usage(
            "--keep-* go with --target; a job's policy comes from its [retention] / [job.retention] in the config",
        ));
    }
    let cfg = super::load_config(&a.config.config)?;
    let jobs = super::select_jobs(&cfg, &a.config.config, &a.jobs)?;
    let done = super::each_job_locked(&cfg, &jobs, |job| {
        if let (Some(z), crate::snapshot::Source::Zfs { dataset }) = (job.target.zfs(), &job.source)
        {
            let rx = crate::zfs_send::receive::Receiver::for_job(runner, &cfg, job, z);
            match crate::zfs_send::receive::prune(&rx, job, dataset, a.dry_run)
                .with_context(|| format!("job {}: prune {z}", job.name))?
            {
                Some(d) => print!(
                    "job {}: {z}\n{}",
                    job.name,
                    crate::zfs_send::receive::report(z, &d, a.dry_run)
                ),
                None => println!(
                    "job {}: no retention rules: every snapshot on {z} is kept",
                    job.name
                ),
            }
            return Ok(());
        }
        if job.mode == crate::config::Mode::ZfsRaw {
            let target = super::keyed_target(&cfg, job)?;
            match crate::zfs_send::chains::prune_job(runner, &target, job, a.dry_run, None)
                .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
                .with_context(|| format!("job {}: prune {}", job.name, target.address()))?
            {
                Some(r) => print!("job {}: {r}", job.name),
                None => println!(
                    "job {}: no retention rules: every restore point is kept",
                    job.name
                ),
            }
            return Ok(());
        }
        let target = super::keyed_target(&cfg, job)?;
        match crate::prune::prune_job(runner, &target, job, a.dry_run, None)? {
            Some(r) => print!("job {}: {r}", job.name),
            None => println!(
                "job {}: no retention rules: every restore point is kept",
                job.name
            ),
        }
        Ok(())
    });
    Ok(Outcome::from_ok(done))
}

/// `prune --target …`: prints the report on stdout.
fn prune_target(runner: &dyn Runner, target: &str, a: &PruneArgs) -> Result<Outcome> {
    if target.starts_with("zfs://") {
        return Err(usage(format!(
            "{target}: prune --target takes a directory target; a zfs:// target's snapshots \
             are pruned by its job's policy: snapveil prune JOB [--dry-run]"
        )));
    }
    let policy = keep_policy(&a.keep)?;
    let ssh = a.ssh.split_whitespace().map(String::from).collect();
    let target = Target::open(
        Address::parse_cli(target),
        &a.rsync,
        ssh,
        std::env::temp_dir(),
        None,
    )
    .assume_shell(!a.rsync_only);
    let opts = PruneOptions {
        dry_run: a.dry_run,
        protect: None,
        local: if a.utc {
            &retention::utc
        } else {
            &retention::system_local
        },
    };
    let report = crate::prune::prune(runner, &target, &policy, &opts)
        .with_context(|| format!("prune {} ({policy})", target.address()))?;
    print!("{report}");
    Ok(Outcome::Success)
}
