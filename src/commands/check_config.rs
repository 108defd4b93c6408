//! `snapveil check-config`: loads the config without side effects; exit 2 on any error.

use super::Outcome;
use crate::cli::ConfigArg;
use crate::exec::Runner;
use anyhow::Result;

pub fn run(_runner: &dyn Runner, a: ConfigArg) -> Result<Outcome> {
    let cfg = super::load_config(&a.config)?;
    println!(
        "{}: OK, {} job(s): {}",
        a.config.display(),
        cfg.jobs.len(),
        cfg.jobs
            .iter()
            .map(|j| j.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Outcome::Success)
}
