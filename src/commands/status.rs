//! `snapveil status`: the last run of each configured job, from the status files.

use super::Outcome;
use crate::cli::ConfigArg;
use crate::exec::Runner;
use crate::status::RunResult;
use anyhow::Result;

pub fn run(_runner: &dyn Runner, a: ConfigArg) -> Result<Outcome> {
    let cfg = super::load_config(&a.config)?;
    println!(
        "{:<16} {:<21} {:<8} {:>9} {:>14} {:>11}  NOTE",
        "JOB", "LAST RUN (UTC)", "RESULT", "DURATION", "BYTES SENT", "GENERATIONS"
    );
    for j in &cfg.jobs {
        match crate::status::load(&cfg.state_dir, &j.name) {
            Some(s) => println!(
                "{:<16} {:<21} {:<8} {:>8.1}s {:>14} {:>11}  {}{}",
                s.job,
                s.finished,
                s.result,
                s.duration_s,
                s.bytes_sent,
                s.generations
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "?".into()),
                if s.consistent || s.result == RunResult::Failure {
                    ""
                } else {
                    "NOT a snapshot (live tree) "
                },
                s.error.clone().unwrap_or_default()
            ),
            None => println!("{:<16} {:<21}", j.name, "never"),
        }
        if let Some(r) = crate::status::load(&cfg.state_dir, &j.name).and_then(|s| s.raw) {
            println!(
                "{:<16} raw ZFS: last snapshot on the target {}, chain of {} stream(s), {} restore point(s)",
                "", r.last_snapshot, r.chain_length, r.restore_points
            );
        }
    }
    Ok(Outcome::Success)
}
