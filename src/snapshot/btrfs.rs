//! btrfs provider: `btrfs subvolume snapshot -r SUBVOL SNAPDIR/snapveil-JOB-STAMP`, read in
//! place (a read-only snapshot is already a mounted tree), `btrfs subvolume delete` on
//! release. SNAPDIR defaults to `.snapveil` beside the subvolume (same filesystem, which a
//! snapshot requires) and is created when missing (and removed again when the snapshot
//! then fails).
//!
//! Stale cleanup reads SNAPDIR, keeps only entries whose name parses for the job, and
//! deletes one only after `btrfs subvolume show` confirms it is a read-only snapshot whose
//! parent is the job's subvolume: a user's snapshot that happens to sit there is left alone.

use super::{
    io_err, parse_err, parse_name, FirstError, ParseError, SnapshotError, SnapshotOptions, Tools,
};
use crate::exec::{Cmd, Runner};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub(crate) struct Held {
    subvolume: PathBuf,
    path: PathBuf,
}

/// The fields of `btrfs subvolume show PATH` that identify a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubvolumeInfo {
    pub name: String,
    pub uuid: String,
    /// The subvolume this one is a snapshot of; `None` for `-`.
    pub parent_uuid: Option<String>,
    pub readonly: bool,
}

/// Parses `btrfs subvolume show` (`Key: value` lines; the snapshot list at the end and
/// any other section are ignored).
///
/// # Errors
/// Missing `Name`, `UUID` or `Flags`.
pub fn parse_subvolume_show(out: &[u8]) -> Result<SubvolumeInfo, ParseError> {
    let text = String::from_utf8_lossy(out);
    let (mut name, mut uuid, mut parent, mut flags) = (None, None, None, None);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim().to_owned();
        match k.trim() {
            "Name" => name = Some(v),
            "UUID" => uuid = Some(v),
            "Parent UUID" => parent = Some(v),
            "Flags" => flags = Some(v),
            _ => {}
        }
    }
    let need = |f: Option<String>, what: &str| {
        f.filter(|s| !s.is_empty())
            .ok_or_else(|| ParseError(format!("no {what} line")))
    };
    let flags = need(flags, "Flags")?;
    Ok(SubvolumeInfo {
        name: need(name, "Name")?,
        uuid: need(uuid, "UUID")?,
        parent_uuid: parent.filter(|p| p != "-" && !p.is_empty()),
        readonly: flags.split([',', ' ']).any(|f| f == "readonly"),
    })
}

fn btrfs(tools: &Tools) -> Cmd {
    Cmd::new(&tools.btrfs)
}

/// Where snapshots of `subvolume` go.
pub fn snapshot_dir(subvolume: &Path, opts: &SnapshotOptions) -> PathBuf {
    opts.snapshot_dir.clone().unwrap_or_else(|| {
        subvolume
            .parent()
            .unwrap_or(Path::new("/"))
            .join(".snapveil")
    })
}

pub(crate) fn take(
    runner: &dyn Runner,
    tools: &Tools,
    subvolume: &Path,
    name: &str,
    opts: &SnapshotOptions,
) -> Result<(PathBuf, Held), SnapshotError> {
    // Checked before creating SNAPDIR beside it, so a typo does not leave a stray dir.
    std::fs::metadata(subvolume).map_err(io_err(subvolume))?;
    let dir = snapshot_dir(subvolume, opts);
    // The directories this call creates, deepest first: removed again if the snapshot
    // fails (a plain directory given as `btrfs:`), so a failed run leaves no empty
    // `.snapveil/` in the user's tree.
    let created: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| std::fs::symlink_metadata(d).is_err())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let path = dir.join(name);
    let taken = btrfs(tools)
        .args(["subvolume", "snapshot", "-r"])
        .arg(subvolume)
        .arg(&path)
        .run_checked(runner)
        .map_err(|e| SnapshotError::Btrfs {
            path: subvolume.to_owned(),
            action: "snapshot",
            source: e,
        });
    if taken.is_err() {
        for d in &created {
            if let Err(e) = std::fs::remove_dir(d) {
                tracing::warn!(path = %d.display(), "cannot remove the snapshot directory made for this run: {e}");
                break;
            }
        }
    }
    taken?;
    Ok((
        path.clone(),
        Held {
            subvolume: subvolume.to_owned(),
            path,
        },
    ))
}

fn delete(runner: &dyn Runner, tools: &Tools, path: &Path) -> Result<(), SnapshotError> {
    if std::fs::symlink_metadata(path).is_err() {
        tracing::warn!(path = %path.display(), "snapshot already gone");
        return Ok(());
    }
    btrfs(tools)
        .args(["subvolume", "delete"])
        .arg(path)
        .run_checked(runner)
        .map(drop)
        .map_err(|e| SnapshotError::Btrfs {
            path: path.to_owned(),
            action: "delete",
            source: e,
        })
}

pub(crate) fn release(runner: &dyn Runner, tools: &Tools, h: Held) -> Result<(), SnapshotError> {
    tracing::debug!(subvolume = %h.subvolume.display(), "deleting snapshot");
    delete(runner, tools, &h.path)
}

fn show(runner: &dyn Runner, tools: &Tools, path: &Path) -> Result<SubvolumeInfo, SnapshotError> {
    let cmd = btrfs(tools).args(["subvolume", "show"]).arg(path);
    let out = cmd.run_checked(runner).map_err(|e| SnapshotError::Btrfs {
        path: path.to_owned(),
        action: "show",
        source: e,
    })?;
    parse_subvolume_show(&out.stdout).map_err(parse_err(&cmd))
}

pub(crate) fn cleanup_stale(
    runner: &dyn Runner,
    tools: &Tools,
    job: &str,
    subvolume: &Path,
    opts: &SnapshotOptions,
) -> Result<Vec<String>, SnapshotError> {
    let dir = snapshot_dir(subvolume, opts);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    let mut candidates: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| parse_name(job, n).is_some())
        .collect();
    candidates.sort();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let origin = show(runner, tools, subvolume)?;
    let mut removed = Vec::new();
    let mut first = FirstError::default();
    for n in candidates {
        let path = dir.join(&n);
        // The root directory of a subvolume always has inode 256
        // (BTRFS_FIRST_FREE_OBJECTID); a plain directory with our name is not ours.
        let is_subvolume =
            std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir() && m.ino() == 256);
        if !is_subvolume {
            tracing::warn!(path = %path.display(), "named like a snapshot of this job but not a subvolume: left alone");
            continue;
        }
        let info = match show(runner, tools, &path) {
            Ok(i) => i,
            Err(e) => {
                first.note(Err(e));
                continue;
            }
        };
        if info.readonly && info.parent_uuid.as_deref() == Some(origin.uuid.as_str()) {
            let r = delete(runner, tools, &path);
            if r.is_ok() {
                removed.push(path.display().to_string());
            }
            first.note(r);
        } else {
            tracing::warn!(
                path = %path.display(),
                "named like a snapshot of this job but not a read-only snapshot of {}: left alone",
                subvolume.display()
            );
        }
    }
    first.into_result().map(|()| removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNAP: &str = include_str!("../../tests/fixtures/outputs/btrfs-show-snapshot.txt");
    const SUBVOL: &str = include_str!("../../tests/fixtures/outputs/btrfs-show-subvolume.txt");

    #[test]
    fn parses_show_of_a_snapshot_and_its_origin() {
        let s = parse_subvolume_show(SNAP.as_bytes()).unwrap();
        let o = parse_subvolume_show(SUBVOL.as_bytes()).unwrap();
        assert_eq!(s.name, "snapveil-j-20261124T013000Z");
        assert!(s.readonly);
        assert_eq!(s.parent_uuid.as_deref(), Some(o.uuid.as_str()));
        assert_eq!(o.name, "data");
        assert!(!o.readonly);
        assert_eq!(o.parent_uuid, None);
        assert_eq!(o.uuid, "db0f84cf-2052-9b45-8f35-2aa4a64425c0");
    }

    #[test]
    fn show_without_uuid_is_an_error() {
        let e = parse_subvolume_show(b"x\n\tName: x\n\tFlags: -\n").unwrap_err();
        assert!(e.0.contains("UUID"), "{e}");
    }

    #[test]
    fn default_snapshot_dir_is_beside_the_subvolume() {
        let o = SnapshotOptions::default();
        assert_eq!(
            snapshot_dir(Path::new("/srv/data"), &o),
            PathBuf::from("/srv/.snapveil")
        );
        let o = SnapshotOptions {
            snapshot_dir: Some("/srv/snaps".into()),
            ..Default::default()
        };
        assert_eq!(
            snapshot_dir(Path::new("/srv/data"), &o),
            PathBuf::from("/srv/snaps")
        );
    }
}
