//! `snapveil list JOB`: the restore points and generation directories on a job's target.

use super::Outcome;
use crate::cli::ListArgs;
use crate::exec::Runner;
use anyhow::{Context, Result};

pub fn run(runner: &dyn Runner, a: ListArgs) -> Result<Outcome> {
    let cfg = super::load_config(&a.config.config)?;
    let job = super::find_job(&cfg, &a.config.config, &a.job)?;
    if let (Some(z), crate::snapshot::Source::Zfs { dataset }) = (job.target.zfs(), &job.source) {
        let rx = crate::zfs_send::receive::Receiver::for_job(runner, &cfg, job, z);
        let text = crate::zfs_send::receive::listing(&rx, job, dataset)
            .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
            .with_context(|| format!("job {}: reading {z}", job.name))?;
        print!("{text}");
        return Ok(Outcome::Success);
    }
    if job.mode == crate::config::Mode::ZfsRaw {
        let target = super::keyed_target(&cfg, job)?;
        let scan = crate::zfs_send::record::scan(runner, &target, &job.name)
            .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
            .with_context(|| format!("job {}: reading {}", job.name, job.target))?;
        println!("target {}", job.target);
        println!(
            "{:<18} {:<13} {:<12} {:>14} STREAM",
            "STAMP", "RESTORE POINT", "BASE", "BYTES"
        );
        for r in scan.points.iter().rev() {
            println!(
                "{:<18} {:<13} {:<12} {:>14} {}",
                r.stamp,
                if scan.sealed.contains_key(&r.stamp) {
                    "yes"
                } else {
                    "yes (unauth.)"
                },
                r.base_stamp.as_deref().map_or("(full)", |_| "(increment)"),
                r.bytes,
                r.file
            );
        }
        for (f, _) in &scan.tampered {
            let stamp = f.trim_start_matches("streams/").trim_end_matches(".json");
            println!("{stamp:<18} {:<13}", "no (TAMPERED)");
        }
        if let Some(r) = crate::zfs_send::status_of(&scan.points) {
            println!(
                "newest: {} (chain of {} stream(s) back to its full stream; {} bytes on the target in all)",
                r.last_snapshot,
                r.chain_length,
                scan.points.iter().map(|r| r.bytes).sum::<u64>()
            );
        }
        let state = crate::target::chain::load_state(
            &cfg.state_dir,
            &job.name,
            &target.address().to_string(),
        )?;
        let (problems, notes) = scan.report(state.as_ref());
        for n in &notes {
            println!("note: {n}");
        }
        for p in &problems {
            println!("{p}");
        }
        return Ok(Outcome::from_ok(problems.is_empty()));
    }
    let target = super::keyed_target(&cfg, job)?;
    let contents = target
        .scan(runner)
        .with_context(|| format!("job {}: reading {}", job.name, job.target))?;
    let gens = target.generations(runner)?;
    let points = contents.points.clone();
    println!("target {}", job.target);
    println!("{:<18} {:<13} GENERATION DIR", "STAMP", "RESTORE POINT");
    let mut all: std::collections::BTreeSet<String> = gens.iter().cloned().collect();
    all.extend(points.iter().cloned());
    all.extend(
        contents
            .ignored
            .iter()
            .chain(&contents.tampered)
            .filter_map(|(f, _)| {
                f.strip_prefix("runs/")?
                    .strip_suffix(".json")
                    .map(str::to_string)
            }),
    );
    for s in all.iter().rev() {
        println!(
            "{:<18} {:<13} {}",
            s,
            if contents.sealed.contains_key(s) {
                "yes"
            } else if points.contains(s) {
                "yes (unauth.)"
            } else if contents
                .tampered
                .iter()
                .any(|(f, _)| f.contains(s.as_str()))
            {
                "no (TAMPERED)"
            } else if contents.ignored.iter().any(|(f, _)| f.contains(s.as_str())) {
                "no (junk)"
            } else {
                "no (failed)"
            },
            if gens.contains(s) {
                format!("generations/{s}/")
            } else {
                "-".into()
            }
        );
    }
    let (problems, notes) = crate::verify::chain_report(&cfg, job, &target, &contents)?;
    for n in &notes {
        println!("note: {n}");
    }
    for (f, why) in &contents.tampered {
        println!("TAMPERED: {f}: {why}");
    }
    for p in problems.iter().filter(|p| !p.starts_with("TAMPERED")) {
        println!("{p}");
    }
    Ok(Outcome::from_ok(problems.is_empty()))
}
