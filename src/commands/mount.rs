//! `snapveil mount`: SOURCE as a read-only encrypted tree (reverse view) at MOUNTPOINT,
//! in the foreground or, with `--background`, as a daemon.

use super::{daemon, Outcome};
use crate::cli::MountArgs;
use crate::crypto::KeyConfig;
use crate::exec::Runner;
use crate::view::{self, ViewOptions};
use anyhow::{Context, Result};
use std::ffi::OsString;

fn view_options(a: &MountArgs) -> Result<ViewOptions> {
    let key = KeyConfig::load(&a.key.config)?;
    let master = key.unlock_with_passfile(&a.key.passfile)?;
    Ok(ViewOptions {
        key,
        master,
        excludes: a.exclude.clone(),
        caching: if a.frozen {
            view::fuse::Caching::Frozen
        } else {
            view::fuse::Caching::Live
        },
    })
}

pub fn run(_runner: &dyn Runner, a: MountArgs) -> Result<Outcome> {
    if a.background {
        return background(&a);
    }
    let ready = daemon::ready();
    // Fail fast on every checkable input before anything is mounted.
    view::mount::check_paths(&a.source, &a.mountpoint)?;
    let opts = view_options(&a)?;
    view::mount::run_foreground(&a.source, &a.mountpoint, opts, ready)
        .with_context(|| format!("serving {}", a.mountpoint.display()))?;
    Ok(Outcome::Success)
}

fn background(a: &MountArgs) -> Result<Outcome> {
    view::mount::check_paths(&a.source, &a.mountpoint)?;
    // Unlock here too so a wrong password is reported by this process, not lost.
    drop(view_options(a)?);
    let mut args: Vec<OsString> = vec![
        "mount".into(),
        "--config".into(),
        a.key.config.clone().into(),
    ];
    args.extend(["--passfile".into(), a.key.passfile.clone().into()]);
    for e in &a.exclude {
        args.extend(["--exclude".into(), e.into()]);
    }
    if a.frozen {
        args.push("--frozen".into());
    }
    args.extend([a.source.clone().into(), a.mountpoint.clone().into()]);
    daemon::spawn(&args, &a.mountpoint)
}
