//! `snapveil umount`: unmounts a view mounted by `snapveil mount` or `open`.

use super::Outcome;
use crate::cli::UmountArgs;
use crate::exec::Runner;
use anyhow::Result;

pub fn run(_runner: &dyn Runner, a: UmountArgs) -> Result<Outcome> {
    crate::view::mount::unmount_path(&a.mountpoint)?;
    Ok(Outcome::Success)
}
