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
        let target = crate::target::Target::for_job(&cfg, job);
        let recs = crate::zfs_send::records(runner, &target, &job.name)
            .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
            .with_context(|| format!("job {}: reading {}", job.name, job.target))?;
        println!("target {}", job.target);
        println!("{:<18} {:<12} {:>14} STREAM", "STAMP", "BASE", "BYTES");
        for r in recs.iter().rev() {
            println!(
                "{:<18} {:<12} {:>14} {}",
                r.stamp,
                r.base_stamp.as_deref().map_or("(full)", |_| "(increment)"),
                r.bytes,
                r.file
            );
        }
        return Ok(Outcome::Success);
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
