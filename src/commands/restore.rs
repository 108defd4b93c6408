//! `snapveil restore JOB PATH... --to DIR [--as-of TIME] [--raw]`: prints the report;
//! exit 1 when a path was not in the backup or a file was unrecoverable.

use super::Outcome;
use crate::cli::RestoreArgs;
use crate::exec::Runner;
use anyhow::{Context, Result};

pub fn run(runner: &dyn Runner, a: RestoreArgs) -> Result<Outcome> {
    let cfg = super::load_config(&a.config.config)?;
    let job = super::find_job(&cfg, &a.config.config, &a.job)?;
    if job.mode == crate::config::Mode::ZfsRaw {
        return raw(runner, &cfg, job, &a);
    }
    if a.accept_unauthenticated {
        return Err(super::usage(format!(
            "job {}: --accept-unauthenticated is for raw ZFS jobs (a file job's unsealed \
             restore points are used with a note)",
            a.job
        )));
    }
    let Some(to) = a.to.clone() else {
        return Err(super::usage(format!(
            "job {} is a file job: give PATH... --to DIR",
            a.job
        )));
    };
    // Bad arguments are usage errors, found before the target is read.
    if let Some(t) = &a.as_of {
        crate::restore::as_of_stamp(t).map_err(|e| super::usage(e.to_string()))?;
    }
    for p in &a.paths {
        crate::restore::normalize(p).map_err(|e| super::usage(e.to_string()))?;
    }
    let r = crate::restore::restore(runner, &cfg, job, &a.paths, &to, a.as_of.as_deref(), a.raw)
        .with_context(|| format!("job {}: restore", a.job))?;
    for n in &r.notes {
        println!("note: {n}");
    }
    for p in &r.not_found {
        println!("not in the backup as of {}: {p}", r.point);
    }
    for t in &r.tampered {
        println!("{t}");
    }
    for (p, why) in &r.unrecoverable {
        println!("UNRECOVERABLE ({why}): {p}");
    }
    println!(
        "restored {} files as of {} into {}",
        r.files,
        r.point,
        to.display()
    );
    Ok(Outcome::from_ok(
        r.not_found.is_empty() && r.unrecoverable.is_empty() && r.tampered.is_empty(),
    ))
}

/// `restore JOB --snapshot NAME --into POOL/DATASET` of a raw ZFS job.
fn raw(
    runner: &dyn Runner,
    cfg: &crate::config::Config,
    job: &crate::config::Job,
    a: &RestoreArgs,
) -> Result<Outcome> {
    let (Some(into), Some(snap)) = (&a.into, &a.snapshot) else {
        return Err(super::usage(format!(
            "job {} is a raw ZFS job: give --snapshot NAME --into POOL/DATASET",
            a.job
        )));
    };
    if let Some(z) = job.target.zfs() {
        let rx = crate::zfs_send::receive::Receiver::for_job(runner, cfg, job, z);
        let done = crate::zfs_send::receive::restore(&rx, job, snap, into)
            .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
            .with_context(|| format!("job {}: restore of {snap} from {z} into {into}", a.job))?;
        println!("received {done}");
        println!(
            "restored {snap} into {into} (raw: unlock it with the source's key, zfs load-key)"
        );
        return Ok(Outcome::from_ok(true));
    }
    let target = super::keyed_target(cfg, job)?;
    let identity = a
        .identity
        .clone()
        .or_else(|| crate::zfs_send::default_identity(job));
    let context = || format!("job {}: restore of {snap} into {into}", a.job);
    let scan = crate::zfs_send::record::scan(runner, &target, &job.name)
        .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
        .with_context(context)?;
    // The target's problems are printed first, whether or not this point restores:
    // what a provider hid or altered is reported either way (exit 1).
    let state =
        crate::target::chain::load_state(&cfg.state_dir, &job.name, &target.address().to_string())?;
    let (problems, notes) = scan.report(state.as_ref());
    for n in &notes {
        println!("note: {n}");
    }
    for p in &problems {
        println!("{p}");
    }
    let done = crate::zfs_send::restore(
        runner,
        &cfg.tools.snapshot,
        job,
        &target,
        &scan,
        snap,
        a.accept_unauthenticated,
        into,
        identity.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
    .with_context(context)?;
    for d in &done {
        println!("received {d}");
    }
    println!("restored {snap} into {into} ({} streams)", done.len());
    Ok(Outcome::from_ok(problems.is_empty()))
}
