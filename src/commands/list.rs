//! `snapveil list JOB`: the restore points and generation directories on a job's target.

use super::Outcome;
use crate::cli::ListArgs;
use crate::exec::Runner;
use anyhow::{Context, Result};

pub fn run(runner: &dyn Runner, a: ListArgs) -> Result<Outcome> {
    let cfg = super::load_config(&a.config.config)?;
    let job = super::find_job(&cfg, &a.config.config, &a.job)?;
    let target = crate::target::Target::for_job(&cfg, job);
    if job.mode == crate::config::Mode::ZfsRaw {
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
    let contents = target
        .scan(runner)
        .with_context(|| format!("job {}: reading {}", job.name, job.target))?;
    let gens = target.generations(runner)?;
    let points = contents.points;
    println!("target {}", job.target);
    println!("{:<18} {:<13} GENERATION DIR", "STAMP", "RESTORE POINT");
    let mut all: std::collections::BTreeSet<String> = gens.iter().cloned().collect();
    all.extend(points.iter().cloned());
    all.extend(contents.ignored.iter().filter_map(|(f, _)| {
        f.strip_prefix("runs/")?
            .strip_suffix(".json")
            .map(str::to_string)
    }));
    for s in all.iter().rev() {
        println!(
            "{:<18} {:<13} {}",
            s,
            if points.contains(s) {
                "yes"
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
    Ok(Outcome::Success)
}
