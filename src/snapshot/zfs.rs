//! ZFS provider: `zfs snapshot [-r] DATASET@snapveil-JOB-STAMP`, read through
//! `MOUNTPOINT/.zfs/snapshot/NAME` when the dataset is mounted and that directory exists,
//! else through temporary read-only clones.
//!
//! Clones live at the top of the dataset's pool as `POOL/snapveil-JOB-STAMP` (a clone must
//! stay in its origin's pool, and carrying the snapshot's own name lets stale cleanup find
//! it by the same strict pattern); with `recursive`, each child dataset is cloned beneath
//! it (`POOL/NAME/child`), so the whole tree appears under `WORK_DIR/NAME`. Recursive
//! snapshots always read through clones: `.zfs/snapshot` of a parent does not show its
//! children. Release destroys the clones, then the snapshot.

use super::{
    error_chain, io_err, parse_err, parse_name, remove_empty_dirs, FirstError, ParseError,
    SnapshotError, SnapshotOptions, Tools,
};
use crate::exec::{Cmd, CommandError, Runner};
use std::path::{Path, PathBuf};

/// What a ZFS guard has to undo.
#[derive(Debug)]
pub(crate) struct Held {
    dataset: String,
    /// `DATASET@NAME`.
    snapshot: String,
    recursive: bool,
    /// `POOL/NAME`, when the tree is read through clones.
    clone: Option<String>,
    /// Where the clones are mounted (under the work dir).
    mount_dir: Option<PathBuf>,
}

/// One line of `zfs list -H -o name,type,origin`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZfsEntry {
    pub name: String,
    pub kind: String,
    /// The snapshot a clone was made from; `None` for `-`.
    pub origin: Option<String>,
}

/// Parses `zfs list -H -o name,type,origin` (tab-separated, no header).
///
/// # Errors
/// A line without exactly three fields.
pub fn parse_zfs_list(out: &[u8]) -> Result<Vec<ZfsEntry>, ParseError> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            match f.as_slice() {
                [name, kind, origin] if !name.is_empty() => Ok(ZfsEntry {
                    name: (*name).to_owned(),
                    kind: (*kind).to_owned(),
                    origin: (*origin != "-" && !origin.is_empty()).then(|| (*origin).to_owned()),
                }),
                _ => Err(ParseError(format!(
                    "expected name<TAB>type<TAB>origin, got {line:?}"
                ))),
            }
        })
        .collect()
}

/// `zfs get -H -p -o value mountpoint,mounted DATASET`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountProps {
    /// An absolute path, or `none`/`legacy`/`-`.
    pub mountpoint: String,
    pub mounted: bool,
}

/// Parses the two value lines of `zfs get -H -p -o value mountpoint,mounted`.
///
/// # Errors
/// Not exactly two lines, or `mounted` neither `yes` nor `no` (nor `-`).
pub fn parse_mount_props(out: &[u8]) -> Result<MountProps, ParseError> {
    let text = String::from_utf8_lossy(out);
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    match lines.as_slice() {
        [mountpoint, mounted] => {
            let mounted = match mounted.trim() {
                "yes" => true,
                "no" | "-" => false,
                other => {
                    return Err(ParseError(format!(
                        "mounted is {other:?}, expected yes or no"
                    )))
                }
            };
            Ok(MountProps {
                mountpoint: mountpoint.trim_end().to_owned(),
                mounted,
            })
        }
        _ => Err(ParseError(format!(
            "expected two lines (mountpoint, mounted), got {}",
            lines.len()
        ))),
    }
}

fn zfs(tools: &Tools) -> Cmd {
    Cmd::new(&tools.zfs)
}

fn pool_of(dataset: &str) -> &str {
    dataset.split('/').next().unwrap_or(dataset)
}

/// Conservative reading of stderr: only "dataset does not exist" becomes its own variant.
fn classify(dataset: &str, action: &'static str, e: CommandError) -> SnapshotError {
    if e.stderr().contains("dataset does not exist") {
        SnapshotError::ZfsDatasetNotFound {
            dataset: dataset.to_owned(),
            source: e,
        }
    } else {
        SnapshotError::Zfs {
            dataset: dataset.to_owned(),
            action,
            source: e,
        }
    }
}

fn list(runner: &dyn Runner, cmd: Cmd, dataset: &str) -> Result<Vec<ZfsEntry>, SnapshotError> {
    let out = cmd
        .run_checked(runner)
        .map_err(|e| classify(dataset, "list", e))?;
    parse_zfs_list(&out.stdout).map_err(parse_err(&cmd))
}

pub(crate) fn take(
    runner: &dyn Runner,
    tools: &Tools,
    dataset: &str,
    name: &str,
    opts: &SnapshotOptions,
    work_dir: &Path,
) -> Result<(PathBuf, Held), SnapshotError> {
    let snapshot = format!("{dataset}@{name}");
    let mut cmd = zfs(tools).arg("snapshot");
    if opts.recursive {
        cmd = cmd.arg("-r");
    }
    cmd.arg(&snapshot)
        .run_checked(runner)
        .map_err(|e| classify(dataset, "snapshot", e))?;
    let mut held = Held {
        dataset: dataset.to_owned(),
        snapshot,
        recursive: opts.recursive,
        clone: None,
        mount_dir: None,
    };
    match read_path(runner, tools, &mut held, name, opts.recursive, work_dir) {
        Ok(path) => Ok((path, held)),
        Err(e) => {
            if let Err(e2) = release(runner, tools, held) {
                tracing::error!("cleanup after a failed snapshot: {}", error_chain(&e2));
            }
            Err(e)
        }
    }
}

/// Finds (or makes, by cloning) the read-only tree of a fresh snapshot.
fn read_path(
    runner: &dyn Runner,
    tools: &Tools,
    held: &mut Held,
    name: &str,
    recursive: bool,
    work_dir: &Path,
) -> Result<PathBuf, SnapshotError> {
    let dataset = held.dataset.clone();
    let mut children = Vec::new();
    if recursive {
        let cmd = zfs(tools).args([
            "list",
            "-H",
            "-o",
            "name,type,origin",
            "-t",
            "filesystem",
            "-r",
        ]);
        let cmd = cmd.arg(&dataset);
        children = list(runner, cmd, &dataset)?
            .into_iter()
            .map(|e| e.name)
            .filter(|n| n.strip_prefix(&dataset).is_some_and(|r| r.starts_with('/')))
            .collect();
        // Parents before children: a clone's parent dataset must exist first.
        children.sort_by_key(|n| (n.matches('/').count(), n.clone()));
    }
    if children.is_empty() {
        let cmd = zfs(tools)
            .args(["get", "-H", "-p", "-o", "value", "mountpoint,mounted"])
            .arg(&dataset);
        let out = cmd
            .run_checked(runner)
            .map_err(|e| classify(&dataset, "get mountpoint", e))?;
        let props = parse_mount_props(&out.stdout).map_err(parse_err(&cmd))?;
        if props.mounted && props.mountpoint.starts_with('/') {
            let p = Path::new(&props.mountpoint)
                .join(".zfs/snapshot")
                .join(name);
            if p.is_dir() {
                tracing::debug!(path = %p.display(), "reading through .zfs/snapshot");
                return Ok(p);
            }
        }
    }
    std::fs::create_dir_all(work_dir).map_err(io_err(work_dir))?;
    let clone = format!("{}/{name}", pool_of(&dataset));
    let mount = work_dir.join(name);
    held.mount_dir = Some(mount.clone());
    clone_one(runner, tools, &held.snapshot, &clone, &mount)?;
    held.clone = Some(clone.clone());
    for child in &children {
        let rel = &child[dataset.len() + 1..];
        clone_one(
            runner,
            tools,
            &format!("{child}@{name}"),
            &format!("{clone}/{rel}"),
            &mount.join(rel),
        )?;
    }
    Ok(mount)
}

fn clone_one(
    runner: &dyn Runner,
    tools: &Tools,
    snapshot: &str,
    clone: &str,
    mountpoint: &Path,
) -> Result<(), SnapshotError> {
    let mut mp = std::ffi::OsString::from("mountpoint=");
    mp.push(mountpoint);
    zfs(tools)
        .args(["clone", "-o", "readonly=on", "-o"])
        .arg(mp)
        .args([snapshot, clone])
        .run_checked(runner)
        .map(drop)
        .map_err(|e| SnapshotError::Zfs {
            dataset: snapshot.to_owned(),
            action: "clone",
            source: e,
        })
}

/// `zfs destroy [-r] TARGET`, idempotent: a target that no longer exists counts as done.
fn destroy(
    runner: &dyn Runner,
    tools: &Tools,
    target: &str,
    recursive: bool,
) -> Result<(), SnapshotError> {
    let mut cmd = zfs(tools).arg("destroy");
    if recursive {
        cmd = cmd.arg("-r");
    }
    let cmd = cmd.arg(target);
    match super::run_retrying_busy(runner, &cmd, &["dataset is busy"]) {
        Ok(_) => Ok(()),
        Err(e)
            if e.stderr().contains("dataset does not exist")
                || e.stderr().contains("could not find any snapshots") =>
        {
            tracing::warn!(target, "already gone");
            Ok(())
        }
        Err(e) => Err(SnapshotError::Zfs {
            dataset: target.to_owned(),
            action: "destroy",
            source: e,
        }),
    }
}

pub(crate) fn release(runner: &dyn Runner, tools: &Tools, h: Held) -> Result<(), SnapshotError> {
    let mut first = FirstError::default();
    if let Some(clone) = &h.clone {
        first.note(destroy(runner, tools, clone, true));
    }
    if let Some(dir) = &h.mount_dir {
        remove_empty_dirs(dir);
    }
    first.note(destroy(runner, tools, &h.snapshot, h.recursive));
    first.into_result()
}

pub(crate) fn cleanup_stale(
    runner: &dyn Runner,
    tools: &Tools,
    job: &str,
    dataset: &str,
    work_dir: &Path,
) -> Result<Vec<String>, SnapshotError> {
    let pool = pool_of(dataset);
    let mut removed = Vec::new();
    let mut first = FirstError::default();

    // Clones first: a snapshot with a clone cannot be destroyed.
    let cmd = zfs(tools)
        .args([
            "list",
            "-H",
            "-o",
            "name,type,origin",
            "-t",
            "filesystem",
            "-d",
            "1",
        ])
        .arg(pool);
    for e in list(runner, cmd, pool)? {
        let Some(short) = e.name.strip_prefix(pool).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        // Ours only if the name parses for this job AND it is a clone of the snapshot of
        // the same name of this dataset.
        let ours = parse_name(job, short).is_some()
            && e.origin.as_deref() == Some(format!("{dataset}@{short}").as_str());
        if ours {
            let r = destroy(runner, tools, &e.name, true);
            if r.is_ok() {
                removed.push(e.name.clone());
            }
            first.note(r);
            remove_empty_dirs(&work_dir.join(short));
        }
    }

    let cmd = zfs(tools)
        .args([
            "list",
            "-H",
            "-o",
            "name,type,origin",
            "-t",
            "snapshot",
            "-r",
        ])
        .arg(dataset);
    for e in list(runner, cmd, dataset)? {
        let Some((_, snap)) = e.name.split_once('@') else {
            continue;
        };
        if parse_name(job, snap).is_some() {
            let r = destroy(runner, tools, &e.name, false);
            if r.is_ok() {
                removed.push(e.name.clone());
            }
            first.note(r);
        }
    }
    first.into_result().map(|()| removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from zfs-fuse 0.7 (`zfs list -H -o name,type,origin -t all -r exptank`)
    // during a recursive snapshot read through clones.
    const LIST: &str = include_str!("../../tests/fixtures/outputs/zfs-list-clones.txt");

    #[test]
    fn parses_zfs_list() {
        let v = parse_zfs_list(LIST.as_bytes()).unwrap();
        assert_eq!(v.len(), 7);
        assert_eq!(
            v[2],
            ZfsEntry {
                name: "exptank/data@snapveil-j-20261124T013000Z".into(),
                kind: "snapshot".into(),
                origin: None
            }
        );
        assert_eq!(
            v[6].origin.as_deref(),
            Some("exptank/data/child@snapveil-j-20261124T013000Z")
        );
        assert_eq!(parse_zfs_list(b"").unwrap(), vec![]);
        let e = parse_zfs_list(b"tank filesystem -\n").unwrap_err();
        assert!(e.0.contains("tank filesystem -"), "{e}");
    }

    #[test]
    fn parses_mount_props() {
        assert_eq!(
            parse_mount_props(b"/tank/home\nyes\n").unwrap(),
            MountProps {
                mountpoint: "/tank/home".into(),
                mounted: true
            }
        );
        assert!(!parse_mount_props(b"legacy\nno\n").unwrap().mounted);
        assert!(parse_mount_props(b"/x\n").is_err());
        assert!(parse_mount_props(b"/x\nmaybe\n").is_err());
    }
}
