//! `snapveil decrypt`: a copy of the view decrypted into a directory without FUSE; exit
//! 1 when an entry could not be restored.

use super::{copy_keys, Outcome};
use crate::cli::DecryptArgs;
use crate::exec::Runner;
use anyhow::Result;

pub fn run(_runner: &dyn Runner, a: DecryptArgs) -> Result<Outcome> {
    let keys = copy_keys(a.config.as_deref(), &a.encrypted_tree, &a.passfile)?;
    let r = crate::decrypt::decrypt_tree(&keys, &a.encrypted_tree, &a.out_dir)?;
    eprintln!(
        "snapveil: decrypted {} files ({} bytes), {} directories, {} symlinks, {} other into {}",
        r.files,
        r.bytes,
        r.dirs,
        r.symlinks,
        r.others,
        a.out_dir.display()
    );
    if !r.failures.is_empty() {
        eprintln!(
            "snapveil: {} entries could NOT be restored:",
            r.failures.len()
        );
        for (p, why) in &r.failures {
            eprintln!("  {}: {why}", p.display());
        }
    }
    Ok(Outcome::from_ok(r.failures.is_empty()))
}
