//! `snapveil verify JOB [--deep]`: exit 0 when the target's `current/` matches the last
//! manifest (and, deep, decrypts to a fresh snapshot's plaintext), 1 on any difference.

use super::Outcome;
use crate::cli::VerifyArgs;
use crate::exec::Runner;
use anyhow::{Context, Result};

pub fn run(runner: &dyn Runner, a: VerifyArgs) -> Result<Outcome> {
    let cfg = super::load_config(&a.config.config)?;
    let job = super::find_job(&cfg, &a.config.config, &a.job)?;
    if let (Some(z), crate::snapshot::Source::Zfs { dataset }) = (job.target.zfs(), &job.source) {
        let rx = crate::zfs_send::receive::Receiver::for_job(runner, &cfg, job, z);
        let (n, bad) = crate::zfs_send::receive::verify(&rx, job, dataset)
            .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
            .with_context(|| format!("job {}: verify", a.job))?;
        for b in &bad {
            println!("BAD {b}");
        }
        println!("{}: {n} snapshots on {z}, {} problems", a.job, bad.len());
        return Ok(Outcome::from_ok(bad.is_empty()));
    }
    // A raw job's directory target, keyed, and what this machine last wrote there.
    let raw_target = || -> Result<_> {
        let target = super::keyed_target(&cfg, job)?;
        let state = crate::target::chain::load_state(
            &cfg.state_dir,
            &job.name,
            &target.address().to_string(),
        )?;
        Ok((target, state))
    };
    if job.mode == crate::config::Mode::ZfsRaw && a.deep {
        let (target, state) = raw_target()?;
        let id = crate::zfs_send::default_identity(job);
        let r = crate::zfs_send::deep::verify_deep(
            runner,
            &cfg.tools.snapshot,
            job,
            &target,
            state.as_ref(),
            id.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
        .with_context(|| format!("job {}: verify --deep", a.job))?;
        for c in &r.checked {
            println!("OK  {c}");
        }
        for b in &r.bad {
            println!("BAD {b}");
        }
        for n in &r.notes {
            println!("NOTE {n}");
        }
        println!(
            "{}: {} restore points, {} problems in their stream files (deep)",
            a.job,
            r.points,
            r.bad.len()
        );
        return Ok(Outcome::from_ok(r.bad.is_empty()));
    }
    if job.mode == crate::config::Mode::ZfsRaw {
        let (target, state) = raw_target()?;
        let (points, bad) = crate::zfs_send::verify(runner, job, &target, state.as_ref())
            .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
            .with_context(|| format!("job {}: verify", a.job))?;
        for b in &bad {
            println!("BAD {b}");
        }
        println!(
            "{}: {} restore points, {} problems in their records and stream files",
            a.job,
            points.len(),
            bad.len()
        );
        return Ok(Outcome::from_ok(bad.is_empty()));
    }
    let r = crate::verify::verify_job(runner, &cfg, job, a.deep)
        .with_context(|| format!("job {}: verify", a.job))?;
    r.print();
    Ok(Outcome::from_ok(r.ok()))
}
