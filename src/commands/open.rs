//! `snapveil open`: a backup copy of the view mounted as a read-only decrypted tree.

use super::{copy_keys, daemon, Outcome};
use crate::cli::OpenArgs;
use crate::exec::Runner;
use crate::view;
use anyhow::Result;
use std::ffi::OsString;
use std::sync::Arc;

pub fn run(_runner: &dyn Runner, a: OpenArgs) -> Result<Outcome> {
    let keys = copy_keys(a.config.as_deref(), &a.target_dir, &a.passfile)?;
    view::mount::check_paths(&a.target_dir, &a.mountpoint)?;
    if a.background {
        drop(keys);
        let mut args: Vec<OsString> = vec![
            "open".into(),
            "--passfile".into(),
            a.passfile.clone().into(),
        ];
        if let Some(c) = &a.config {
            args.extend(["--config".into(), c.clone().into()]);
        }
        args.extend([a.target_dir.clone().into(), a.mountpoint.clone().into()]);
        return daemon::spawn(&args, &a.mountpoint, true);
    }
    let ready = daemon::ready();
    let core = Arc::new(view::forward::ForwardCore::new(&a.target_dir, keys)?);
    tracing::info!(copy = %a.target_dir.display(), mountpoint = %a.mountpoint.display(), "serving decrypted view of a backup copy");
    // A copy may be written to while browsed (the next night's rsync): no long caching.
    view::mount::serve(
        core,
        view::fuse::Caching::Live,
        &a.mountpoint,
        &view::Access::shared_if_root(),
        ready,
    )?;
    Ok(Outcome::Success)
}
