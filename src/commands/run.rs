//! `snapveil run [JOB]...`: runs the jobs in config order (all when none is named), one
//! failing does not stop the next; rewrites the Prometheus textfile; exit 1 if any failed.

use super::Outcome;
use crate::cli::RunArgs;
use crate::exec::Runner;
use anyhow::{Context, Result};

pub fn run(runner: &dyn Runner, a: RunArgs) -> Result<Outcome> {
    let cfg = super::load_config(&a.config.config)?;
    let jobs = super::select_jobs(&cfg, &a.config.config, &a.jobs)?;
    crate::signals::install().context("installing signal handlers")?;
    let mut failed = Vec::new();
    for job in jobs {
        if crate::signals::cancelled() {
            failed.push(format!("{} (not started: interrupted)", job.name));
            continue;
        }
        let opts = crate::job::RunOptions {
            accept_rollback: a.accept_rollback,
            accept_truncation: a.accept_truncation,
            full: a.full,
        };
        let st = crate::job::run_job(runner, &cfg, job, opts);
        if !st.result.succeeded() {
            failed.push(job.name.clone());
        }
        println!(
            "{}: {} in {:.1} s, {} bytes sent{}",
            st.job,
            st.result,
            st.duration_s,
            st.bytes_sent,
            st.error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    let names: Vec<String> = cfg.jobs.iter().map(|j| j.name.clone()).collect();
    if let Err(e) = crate::status::write_prometheus(&cfg.state_dir, &names) {
        tracing::warn!(
            "cannot write {}: {e}",
            cfg.state_dir.join("snapveil.prom").display()
        );
    }
    if !failed.is_empty() {
        eprintln!("snapveil: failed: {}", failed.join(", "));
    }
    Ok(Outcome::from_ok(failed.is_empty()))
}
