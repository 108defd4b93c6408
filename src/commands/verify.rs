//! `snapveil verify JOB [--deep]`: exit 0 when the target's `current/` matches the last
//! manifest (and, deep, decrypts to a fresh snapshot's plaintext), 1 on any difference.

use super::Outcome;
use crate::cli::VerifyArgs;
use crate::exec::Runner;
use anyhow::{Context, Result};

pub fn run(runner: &dyn Runner, a: VerifyArgs) -> Result<Outcome> {
    let cfg = super::load_config(&a.config.config)?;
    let job = super::find_job(&cfg, &a.config.config, &a.job)?;
    let r = crate::verify::verify_job(runner, &cfg, job, a.deep)
        .with_context(|| format!("job {}: verify", a.job))?;
    r.print();
    Ok(Outcome::from_ok(r.ok()))
}
