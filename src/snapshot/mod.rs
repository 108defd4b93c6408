//! Temporary snapshots: freezes a job's source (ZFS dataset, btrfs subvolume, LVM logical
//! volume, or a plain directory that cannot be frozen), exposes the frozen tree read-only at
//! a path, and releases it on every path out: [`SnapshotGuard::release`], `Drop` on error or
//! unwinding, and [`cleanup_stale`] at the start of the next run after a crash.
//!
//! Every snapshot, clone and snapshot LV this module creates is named
//! `snapveil-<job>-<stamp>` (stamp `%Y%m%dT%H%M%SZ`), and stale cleanup only touches names
//! that parse back *exactly* to that job and a valid stamp ([`parse_name`]), so a user's own
//! snapshot is never destroyed. Each provider lives in its own file with pure `parse_*`
//! functions over the tool output it reads; every command goes through the
//! [`crate::exec::Runner`].
//!
//! Not owned here: locking against a concurrent run of the same job (the job runner holds
//! the job lock around take, transfer and cleanup), and the encrypted view of the tree.

// The error names what failed and carries the command's stderr; it is built on the cold
// path only, so its size does not matter.
#![allow(clippy::result_large_err)]

pub mod btrfs;
pub mod cmd;
pub mod dir;
pub mod lvm;
pub mod zfs;

use crate::exec::{CommandError, Runner};
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Fixed prefix of every name this module creates.
pub const PREFIX: &str = "snapveil-";

/// What a job backs up. Parsed from `zfs:POOL/DATASET`, `btrfs:/path`, `lvm:VG/LV`,
/// `dir:/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Zfs { dataset: String },
    Btrfs { subvolume: PathBuf },
    Lvm { vg: String, lv: String },
    Dir { path: PathBuf },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Zfs { dataset } => write!(f, "zfs:{dataset}"),
            Source::Btrfs { subvolume } => write!(f, "btrfs:{}", subvolume.display()),
            Source::Lvm { vg, lv } => write!(f, "lvm:{vg}/{lv}"),
            Source::Dir { path } => write!(f, "dir:{}", path.display()),
        }
    }
}

/// Characters LVM allows in VG and LV names.
fn lvm_name_ok(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c))
}

impl FromStr for Source {
    type Err = SnapshotError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| SnapshotError::InvalidSource {
            spec: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| bad("expected KIND:WHAT with KIND one of zfs, btrfs, lvm, dir"))?;
        match kind {
            "zfs" => {
                let ok = !rest.is_empty()
                    && !rest.starts_with('/')
                    && !rest.ends_with('/')
                    && !rest.contains("//")
                    && !rest.contains(['@', '#', ' ', '%']);
                if !ok {
                    return Err(bad(
                        "expected a ZFS dataset such as tank/home (no @snapshot)",
                    ));
                }
                Ok(Source::Zfs {
                    dataset: rest.to_owned(),
                })
            }
            "btrfs" | "dir" => {
                let p = PathBuf::from(rest);
                if !p.is_absolute() {
                    return Err(bad("expected an absolute path"));
                }
                Ok(if kind == "btrfs" {
                    Source::Btrfs { subvolume: p }
                } else {
                    Source::Dir { path: p }
                })
            }
            "lvm" => match rest.split_once('/') {
                Some((vg, lv)) if lvm_name_ok(vg) && lvm_name_ok(lv) => Ok(Source::Lvm {
                    vg: vg.to_owned(),
                    lv: lv.to_owned(),
                }),
                _ => Err(bad("expected VG/LV with names of [A-Za-z0-9+_.-]")),
            },
            _ => Err(bad("unknown kind; expected zfs, btrfs, lvm or dir")),
        }
    }
}

/// The `[job.snapshot]` table: how to freeze the source.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotOptions {
    /// ZFS: snapshot the dataset and all its descendants (`zfs snapshot -r`); the child
    /// datasets appear beneath the root of the tree.
    pub recursive: bool,
    /// btrfs: where snapshots go (same filesystem). Default: `.snapveil` beside the subvolume.
    pub snapshot_dir: Option<PathBuf>,
    /// LVM: copy-on-write space, "10%" of the origin (the default) or absolute ("2G").
    pub size: Option<String>,
    /// LVM: extra mount options for the snapshot (after `ro` and `nouuid`/`noload`).
    pub mount_options: Vec<String>,
}

/// The `[tools]` table: paths of the programs this module runs. Unknown keys are allowed
/// because the same table also names the tools of other modules (rsync, ssh).
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default)]
pub struct Tools {
    pub zfs: PathBuf,
    pub btrfs: PathBuf,
    pub lvcreate: PathBuf,
    pub lvremove: PathBuf,
    pub lvs: PathBuf,
    pub blkid: PathBuf,
    pub mount: PathBuf,
    pub umount: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            zfs: "zfs".into(),
            btrfs: "btrfs".into(),
            lvcreate: "lvcreate".into(),
            lvremove: "lvremove".into(),
            lvs: "lvs".into(),
            blkid: "blkid".into(),
            mount: "mount".into(),
            umount: "umount".into(),
        }
    }
}

/// What went wrong, naming the dataset, subvolume or LV; tool failures keep the
/// [`CommandError`] (command line, status, stderr) as their source.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid source {spec:?}: {reason}")]
    InvalidSource { spec: String, reason: String },
    #[error("invalid job name {job:?}: only [A-Za-z0-9_.-] are allowed")]
    InvalidJob { job: String },
    #[error("invalid stamp {stamp:?}: expected UTC YYYYMMDDTHHMMSSZ")]
    InvalidStamp { stamp: String },
    #[error("{source_spec}: option {option} is not supported for this kind of source")]
    UnsupportedOption {
        source_spec: String,
        option: &'static str,
    },
    #[error("ZFS dataset {dataset} does not exist")]
    ZfsDatasetNotFound {
        dataset: String,
        #[source]
        source: CommandError,
    },
    #[error("ZFS dataset {dataset}: {action} failed")]
    Zfs {
        dataset: String,
        action: &'static str,
        #[source]
        source: CommandError,
    },
    #[error("btrfs subvolume {}: {action} failed", path.display())]
    Btrfs {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: CommandError,
    },
    #[error("LVM origin {vg}/{lv} does not exist")]
    LvmOriginNotFound {
        vg: String,
        lv: String,
        #[source]
        source: Option<CommandError>,
    },
    #[error("LVM volume group {vg} has not enough free space for a {size} snapshot of {lv}")]
    LvmVgFull {
        vg: String,
        lv: String,
        size: String,
        #[source]
        source: CommandError,
    },
    #[error(
        "LVM snapshot {vg}/{name} of {lv} overflowed its copy-on-write space and was \
         invalidated (attr {attr}, {percent}% used): the tree read from it is not a \
         consistent copy; give the job a larger snapshot size"
    )]
    LvmInvalidated {
        vg: String,
        lv: String,
        name: String,
        attr: String,
        percent: String,
    },
    #[error("LVM {vg}/{lv}: {action} failed")]
    Lvm {
        vg: String,
        lv: String,
        action: &'static str,
        #[source]
        source: CommandError,
    },
    #[error("invalid snapshot size {size:?} for {origin}: {reason}")]
    InvalidSize {
        size: String,
        origin: String,
        reason: String,
    },
    #[error("{device}: no filesystem type found (blkid printed nothing)")]
    UnknownFilesystem { device: String },
    #[error("mounting {device} on {}", mountpoint.display())]
    Mount {
        device: String,
        mountpoint: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error("unmounting {}", mountpoint.display())]
    Umount {
        mountpoint: PathBuf,
        #[source]
        source: CommandError,
    },
    #[error("cannot parse the output of `{cmd}`: {reason}")]
    Parse { cmd: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {name} was taken but interrupted by a signal; it was released")]
    Interrupted { name: String },
}

/// A tool printed something this module cannot read; the reason names the line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ParseError(pub String);

pub(crate) fn parse_err(cmd: &crate::exec::Cmd) -> impl FnOnce(ParseError) -> SnapshotError + '_ {
    move |e| SnapshotError::Parse {
        cmd: cmd.to_string(),
        reason: e.0,
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How often a release step refused because something still holds the snapshot is
/// retried, the first wait, doubled each time (0.2 + 0.4 + … + 3.2 s: 6.2 s in all).
/// zfs-fuse and the kernel after an unmount, udev probing a just-unmounted LV, or the last
/// reads of a view being torn down can hold it for a moment, and a snapshot left behind
/// costs more than a few seconds.
const BUSY_RETRIES: u32 = 5;
const BUSY_FIRST_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Runs `cmd`, again while it fails with one of the `busy` texts in its stderr (at most
/// [`BUSY_RETRIES`] more times); the last result is returned.
pub(crate) fn run_retrying_busy(
    runner: &dyn Runner,
    cmd: &crate::exec::Cmd,
    busy: &[&str],
) -> Result<crate::exec::Output, CommandError> {
    let mut wait = BUSY_FIRST_WAIT;
    let mut attempt = 0;
    loop {
        match cmd.run_checked(runner) {
            Err(e) if attempt < BUSY_RETRIES && busy.iter().any(|b| e.stderr().contains(b)) => {
                attempt += 1;
                tracing::warn!(cmd = %cmd, attempt, "busy, retrying in {wait:?}");
                std::thread::sleep(wait);
                wait *= 2;
            }
            r => return r,
        }
    }
}

/// Job names go into snapshot names and command lines, so they are checked here too,
/// not only in the config.
///
/// # Errors
/// [`SnapshotError::InvalidJob`] for an empty name or one outside `[A-Za-z0-9_.-]`.
pub fn validate_job(job: &str) -> Result<(), SnapshotError> {
    let ok = !job.is_empty()
        && !job.starts_with(['-', '.'])
        && job
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::InvalidJob {
            job: job.to_owned(),
        })
    }
}

/// True for exactly `YYYYMMDDTHHMMSSZ` denoting a real date and time
/// ([`crate::stamp::Stamp::parse`]).
pub fn valid_stamp(stamp: &str) -> bool {
    crate::stamp::Stamp::parse(stamp).is_some()
}

/// The current UTC time as a stamp.
pub fn now_stamp() -> String {
    crate::stamp::Stamp::now().to_string()
}

/// `snapveil-<job>-<stamp>`.
pub fn snapshot_name(job: &str, stamp: &str) -> String {
    format!("{PREFIX}{job}-{stamp}")
}

/// The stamp of `name` when it is exactly `snapveil-<job>-<stamp>` for this job and a valid
/// stamp; `None` for anything else (another job, a user's `snapveil-<job>-manual`, a suffix).
pub fn parse_name<'n>(job: &str, name: &'n str) -> Option<&'n str> {
    let stamp = name
        .strip_prefix(PREFIX)?
        .strip_prefix(job)?
        .strip_prefix('-')?;
    valid_stamp(stamp).then_some(stamp)
}

/// What a guard still has to undo.
#[derive(Debug)]
pub(crate) enum Held {
    Zfs(zfs::Held),
    Btrfs(btrfs::Held),
    Lvm(lvm::Held),
    Dir,
}

/// A taken snapshot. Dropping it releases it (errors are logged); [`release`](Self::release)
/// does the same and reports the error; [`keep`](Self::keep) leaves it in place.
#[must_use = "dropping the guard releases the snapshot at once"]
pub struct SnapshotGuard<'a> {
    runner: &'a dyn Runner,
    tools: Tools,
    name: String,
    path: PathBuf,
    consistent: bool,
    held: Option<Held>,
}

impl fmt::Debug for SnapshotGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotGuard")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("consistent", &self.consistent)
            .field("held", &self.held)
            .finish()
    }
}

impl SnapshotGuard<'_> {
    /// The read-only tree to back up.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `snapveil-<job>-<stamp>` (for `dir:` sources: the name the run would have used).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// False for `dir:` sources: the tree is live and may change while it is read.
    pub fn consistent(&self) -> bool {
        self.consistent
    }

    /// Checks that the snapshot is still intact. Only LVM snapshots can break while held
    /// (copy-on-write space overflow); the job calls this after the transfer and before
    /// recording the run as a restore point.
    ///
    /// # Errors
    /// [`SnapshotError::LvmInvalidated`], or the `lvs` failure.
    pub fn verify(&self) -> Result<(), SnapshotError> {
        match &self.held {
            Some(Held::Lvm(h)) => lvm::verify(self.runner, &self.tools, h),
            _ => Ok(()),
        }
    }

    /// Releases the snapshot: unmounts and destroys clones, mounts and the snapshot.
    ///
    /// # Errors
    /// The first failing step (later steps still run and their failures are logged);
    /// for LVM, [`SnapshotError::LvmInvalidated`] when the snapshot had overflowed (it is
    /// removed all the same).
    pub fn release(mut self) -> Result<(), SnapshotError> {
        self.release_inner()
    }

    /// Leaves the snapshot in place (`snapveil snapshot --hold`); returns its name. The
    /// next run of the job or `snapveil cleanup` removes it.
    pub fn keep(mut self) -> String {
        self.held = None;
        tracing::info!(snapshot = %self.name, path = %self.path.display(), "snapshot kept");
        std::mem::take(&mut self.name)
    }

    fn release_inner(&mut self) -> Result<(), SnapshotError> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let r = match held {
            Held::Zfs(h) => zfs::release(self.runner, &self.tools, h),
            Held::Btrfs(h) => btrfs::release(self.runner, &self.tools, h),
            Held::Lvm(h) => lvm::release(self.runner, &self.tools, h, true),
            Held::Dir => Ok(()),
        };
        if r.is_ok() {
            tracing::info!(snapshot = %self.name, "snapshot released");
        }
        r
    }
}

impl Drop for SnapshotGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            tracing::error!(snapshot = %self.name, "releasing snapshot failed: {}", error_chain(&e));
        }
    }
}

/// `error: cause: cause`, for log lines (the stderr of a failed tool is in the chain).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::error::chain(e)
}

/// Takes a snapshot of `source` named `snapveil-<job>-<stamp>`. Clones and snapshot LVs
/// are mounted under `work_dir` (created if missing). On error, whatever was already
/// created is released before returning.
///
/// # Errors
/// Invalid job/stamp, a failing tool (naming the dataset/subvolume/LV and quoting its
/// stderr), a missing origin, a full VG, an already invalid LVM snapshot.
pub fn take<'a>(
    runner: &'a dyn Runner,
    job: &str,
    stamp: &str,
    source: &Source,
    opts: &SnapshotOptions,
    tools: &Tools,
    work_dir: &Path,
) -> Result<SnapshotGuard<'a>, SnapshotError> {
    validate_job(job)?;
    if !valid_stamp(stamp) {
        return Err(SnapshotError::InvalidStamp {
            stamp: stamp.to_owned(),
        });
    }
    let name = snapshot_name(job, stamp);
    // ZFS mountpoints must be absolute; a relative --state-dir is taken from the cwd.
    let work_dir = &std::path::absolute(work_dir).map_err(io_err(work_dir))?;
    let unsupported = |option| SnapshotError::UnsupportedOption {
        source_spec: source.to_string(),
        option,
    };
    let (path, held, consistent) = match source {
        Source::Zfs { dataset } => {
            let (p, h) = zfs::take(runner, tools, dataset, &name, opts, work_dir)?;
            (p, Held::Zfs(h), true)
        }
        Source::Btrfs { subvolume } => {
            if opts.recursive {
                return Err(unsupported("recursive"));
            }
            let (p, h) = btrfs::take(runner, tools, subvolume, &name, opts)?;
            (p, Held::Btrfs(h), true)
        }
        Source::Lvm { vg, lv } => {
            if opts.recursive {
                return Err(unsupported("recursive"));
            }
            let (p, h) = lvm::take(runner, tools, vg, lv, &name, opts, work_dir)?;
            (p, Held::Lvm(h), true)
        }
        Source::Dir { path } => (dir::take(path)?, Held::Dir, false),
    };
    tracing::info!(snapshot = %name, path = %path.display(), consistent, "snapshot taken");
    Ok(SnapshotGuard {
        runner,
        tools: tools.clone(),
        name,
        path,
        consistent,
        held: Some(held),
    })
}

/// Removes what a crashed or killed run of `job` left behind for `source`: snapshots,
/// clones, snapshot LVs and their mounts named `snapveil-<job>-<stamp>`. Names of other
/// jobs, and anything not matching the pattern exactly, are left alone. Returns the names
/// removed.
///
/// # Errors
/// The first failure to list or destroy (the others are still attempted and logged).
pub fn cleanup_stale(
    runner: &dyn Runner,
    job: &str,
    source: &Source,
    opts: &SnapshotOptions,
    tools: &Tools,
    work_dir: &Path,
) -> Result<Vec<String>, SnapshotError> {
    validate_job(job)?;
    let work_dir = &std::path::absolute(work_dir).map_err(io_err(work_dir))?;
    let removed = match source {
        Source::Zfs { dataset } => zfs::cleanup_stale(runner, tools, job, dataset, work_dir)?,
        Source::Btrfs { subvolume } => btrfs::cleanup_stale(runner, tools, job, subvolume, opts)?,
        Source::Lvm { vg, lv } => lvm::cleanup_stale(runner, tools, job, vg, lv, work_dir)?,
        Source::Dir { .. } => Vec::new(),
    };
    for n in &removed {
        tracing::warn!(snapshot = %n, "removed stale snapshot of an earlier run");
    }
    Ok(removed)
}

/// Keeps the first error of a multi-step release and logs the later ones, so that every
/// step runs even when an early one fails.
#[derive(Default)]
pub(crate) struct FirstError(Option<SnapshotError>);

impl FirstError {
    pub(crate) fn note(&mut self, r: Result<(), SnapshotError>) {
        if let Err(e) = r {
            if self.0.is_none() {
                self.0 = Some(e);
            } else {
                tracing::error!("{}", error_chain(&e));
            }
        }
    }

    pub(crate) fn into_result(self) -> Result<(), SnapshotError> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Removes empty directories under and including `dir`, deepest first. Only empty ones:
/// a directory still holding files (or a mount we failed to remove) is left alone.
pub(crate) fn remove_empty_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(
            "zfs:tank/home".parse::<Source>().unwrap(),
            Source::Zfs {
                dataset: "tank/home".into()
            }
        );
        assert_eq!(
            "lvm:vg0/root".parse::<Source>().unwrap(),
            Source::Lvm {
                vg: "vg0".into(),
                lv: "root".into()
            }
        );
        assert_eq!(
            "btrfs:/srv/data".parse::<Source>().unwrap(),
            Source::Btrfs {
                subvolume: "/srv/data".into()
            }
        );
        assert_eq!(
            "dir:/etc".parse::<Source>().unwrap(),
            Source::Dir {
                path: "/etc".into()
            }
        );
        for bad in [
            "tank/home",
            "zfs:",
            "zfs:tank@x",
            "zfs:/tank",
            "btrfs:rel",
            "lvm:vg",
            "lvm:vg/lv/x",
            "lvm:v g/lv",
            "nfs:/x",
        ] {
            let e = bad.parse::<Source>().unwrap_err();
            assert!(e.to_string().contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn names_are_parsed_strictly() {
        let n = snapshot_name("web", "20261124T013000Z");
        assert_eq!(n, "snapveil-web-20261124T013000Z");
        assert_eq!(parse_name("web", &n), Some("20261124T013000Z"));
        assert_eq!(
            parse_name("web-1", "snapveil-web-1-20261124T013000Z"),
            Some("20261124T013000Z")
        );
        for other in [
            "snapveil-web-1-20261124T013000Z", // job "web-1", not "web"
            "snapveil-webx-20261124T013000Z",
            "snapveil-web-manual",
            "snapveil-web-20261124T013000Z.keep",
            "snapveil-web-20261124T013000Zx",
            "snapveil-web-20261324T013000Z", // month 13
            "snapveil-web-2026112T013000Z0",
            "my-snapveil-web-20261124T013000Z",
            "snapveil-web--20261124T013000Z",
        ] {
            assert_eq!(parse_name("web", other), None, "{other}");
        }
    }

    #[test]
    fn job_names_are_checked() {
        validate_job("web.daily_1-x").unwrap();
        for bad in ["", "a b", "a/b", "-x", "a@b", "é"] {
            assert!(validate_job(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_table_rejects_unknown_fields() {
        let o: SnapshotOptions = toml::from_str("recursive = true\nsize = \"5%\"").unwrap();
        assert!(o.recursive);
        assert_eq!(o.size.as_deref(), Some("5%"));
        let e = toml::from_str::<SnapshotOptions>("recursiv = true").unwrap_err();
        assert!(e.to_string().contains("recursiv"), "{e}");
        let t: Tools = toml::from_str("zfs = \"/opt/zfs\"\nrsync = \"rsync\"").unwrap();
        assert_eq!(t.zfs, PathBuf::from("/opt/zfs"));
        assert_eq!(t.btrfs, PathBuf::from("btrfs"));
    }
}
