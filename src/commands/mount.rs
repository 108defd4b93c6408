//! `snapveil mount`: SOURCE as a read-only encrypted tree (reverse view) at MOUNTPOINT,
//! in the foreground or, with `--background`, as a daemon. The mount helper
//! (`mount -t fuse.snapveil`, [`super::mount_helper`]) ends here too.

use super::{daemon, usage, Outcome};
use crate::cli::MountArgs;
use crate::crypto::KeyConfig;
use crate::exec::Runner;
use crate::view::{self, Access, ViewOptions};
use anyhow::{Context, Result};
use std::ffi::OsString;

/// `UID:GID`, both numeric.
///
/// # Errors
/// A usage error naming the option and the value.
pub fn parse_owner(option: &str, v: &str) -> Result<(u32, u32)> {
    let parsed = v
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
    parsed.ok_or_else(|| usage(format!("{option}: {v:?} is not UID:GID (two numbers)")))
}

fn access(a: &MountArgs) -> Result<Access> {
    Ok(Access {
        // Root's mounts were always readable by others (modes still apply); an explicit
        // allow_other asks for it otherwise too.
        allow_other: a.allow_other || nix::unistd::geteuid().is_root(),
        force_owner: a
            .force_owner
            .as_deref()
            .map(|v| parse_owner("--force-owner", v))
            .transpose()?,
        fsname: a.fsname.clone(),
    })
}

fn view_options(a: &MountArgs) -> Result<ViewOptions> {
    let key = KeyConfig::load(&a.key.config)?;
    let master = key.unlock_with_passfile(&a.key.passfile)?;
    // The mountpoint and the key directory are never part of the view (no recursion
    // into itself, no passfile), whatever the excludes say.
    let mut excludes = a.exclude.clone();
    excludes.extend(view::mount::self_excludes(
        &a.source,
        &a.mountpoint,
        &[&a.key.config, &a.key.passfile],
    ));
    Ok(ViewOptions {
        key,
        master,
        excludes,
        access: access(a)?,
        caching: if a.frozen {
            view::fuse::Caching::Frozen
        } else {
            view::fuse::Caching::Live
        },
    })
}

pub fn run(_runner: &dyn Runner, a: MountArgs) -> Result<Outcome> {
    if a.background {
        return background(&a, true);
    }
    let ready = daemon::ready();
    // Fail fast on every checkable input before anything is mounted.
    view::mount::check_paths(&a.source, &a.mountpoint)?;
    let opts = view_options(&a)?;
    view::mount::run_foreground(&a.source, &a.mountpoint, opts, ready)
        .with_context(|| format!("serving {}", a.mountpoint.display()))?;
    Ok(Outcome::Success)
}

/// Checks everything, then leaves a daemon serving the mount and returns once it
/// answers; `announce` prints where and which pid.
pub(super) fn background(a: &MountArgs, announce: bool) -> Result<Outcome> {
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
    if let Some(o) = &a.force_owner {
        args.extend(["--force-owner".into(), o.into()]);
    }
    if a.allow_other {
        args.push("--allow-other".into());
    }
    if let Some(f) = &a.fsname {
        args.extend(["--fsname".into(), f.into()]);
    }
    if a.frozen {
        args.push("--frozen".into());
    }
    args.extend([a.source.clone().into(), a.mountpoint.clone().into()]);
    daemon::spawn(&args, &a.mountpoint, announce)
}
