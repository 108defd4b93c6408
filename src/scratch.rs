//! Scratch space of one process under `STATE_DIR/work/JOB/`: `WHAT-PID` directories (a
//! restore's staging tree, a verify's fetched manifest, a deep verify's copies) and their
//! `WHAT-PID.EXT` side files. Each process removes its own on the way out; a process
//! killed with SIGKILL or by the OOM killer cannot, and a restore's stage can be as big as
//! what was restored. [`sweep`] removes those whose process is gone: the job's lock does
//! not cover restores and verifies, so liveness of the PID in the name is what tells a
//! leftover from the scratch of a restore running right now.

use std::io;
use std::path::{Path, PathBuf};

/// The kinds of scratch directory snapveil makes (`restore`'s stage, the target's
/// fetches, uploads and lists: `crate::target::Target`). Only these are swept: the work
/// dir also holds snapshot mounts, which are not ours to remove here.
pub const KINDS: &[&str] = &[
    "restore", "manifest", "fetch", "deep", "records", "upload", "list", "empty", "stream", "prev",
    "meta",
];

/// `WHAT-PID` for this process.
pub fn name(what: &str) -> String {
    format!("{what}-{}", std::process::id())
}

/// True while a process with this PID exists (also one of another user: EPERM).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The PID of a scratch entry named `KIND-PID` or `KIND-PID.EXT`, for the kinds above.
fn scratch_pid(name: &str) -> Option<u32> {
    let (kind, rest) = name.split_once('-')?;
    if !KINDS.contains(&kind) {
        return None;
    }
    let digits = rest.split_once('.').map_or(rest, |(d, _)| d);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Removes one leftover (a directory tree, or a file or symlink), never following a
/// symlink.
fn remove(path: &Path) -> io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// Removes the scratch entries in `work` (a job's `STATE_DIR/work/JOB`) whose process is
/// gone; returns what it removed. Failures are logged and skipped: a leftover that cannot
/// be removed must not stop a backup.
pub fn sweep(work: &Path) -> Vec<PathBuf> {
    sweep_by(work, scratch_pid)
}

/// Removes the entries of `dir` for which `pid_of` names a PID that is no longer alive.
pub(crate) fn sweep_by(dir: &Path, pid_of: impl Fn(&str) -> Option<u32>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(&pid_of) else {
            continue;
        };
        if pid == std::process::id() || pid_alive(pid) {
            continue;
        }
        let path = e.path();
        match remove(&path) {
            Ok(()) => removed.push(path),
            Err(err) => {
                tracing::warn!(path = %path.display(), "cannot remove a leftover of process {pid}: {err}")
            }
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_scratch_entries() {
        assert_eq!(scratch_pid("restore-123"), Some(123));
        assert_eq!(scratch_pid("restore-123.files-from"), Some(123));
        assert_eq!(scratch_pid("deep-7"), Some(7));
        assert_eq!(scratch_pid("snapveil-j-20261124T010000Z"), None);
        assert_eq!(scratch_pid("restore-"), None);
        assert_eq!(scratch_pid("restore-12x"), None);
        assert_eq!(scratch_pid("target-check"), None);
        assert_eq!(scratch_pid("other-12"), None);
    }

    /// A PID above the kernel's maximum never belongs to a process.
    fn dead_pid() -> u32 {
        std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(4_194_304)
            + 1
    }

    #[test]
    fn sweep_removes_only_dead_processes_scratch() {
        let d = tempfile::tempdir().unwrap();
        let dead = dead_pid();
        let mine = std::process::id();
        for n in [
            format!("restore-{dead}"),
            format!("deep-{dead}"),
            format!("restore-{mine}"),
            "snapveil-j-20261124T010000Z".to_string(),
        ] {
            std::fs::create_dir_all(d.path().join(&n).join("sub")).unwrap();
            std::fs::write(d.path().join(&n).join("sub/f"), b"x").unwrap();
        }
        std::fs::write(d.path().join(format!("restore-{dead}.files-from")), b"x").unwrap();
        std::fs::write(d.path().join("restore-1.files-from"), b"x").unwrap();
        let removed = sweep(d.path());
        assert_eq!(
            removed,
            [
                d.path().join(format!("deep-{dead}")),
                d.path().join(format!("restore-{dead}")),
                d.path().join(format!("restore-{dead}.files-from")),
            ]
        );
        let mut left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "restore-1.files-from".to_string(),
                format!("restore-{mine}"),
                "snapveil-j-20261124T010000Z".to_string()
            ],
            "PID 1 and this process are alive; a snapshot mount dir is not scratch"
        );
    }
}
