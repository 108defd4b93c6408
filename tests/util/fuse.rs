//! Guards for FUSE mounts made by tests (snapveil's and gocryptfs's): unmounted on drop,
//! lazily if busy, so a failing assertion never leaves a mount behind.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Mounted {
    pub path: PathBuf,
}

impl Mounted {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub fn is_mounted(path: &Path) -> bool {
    let p = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|m| Path::new(m) == p)
            .unwrap_or(false)
    })
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if !is_mounted(&self.path) {
            return;
        }
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Mounts SOURCE with `snapveil mount --background` and returns a guard.
pub fn snapveil_mount(
    config: &Path,
    passfile: &Path,
    source: &Path,
    mnt: &Path,
    extra: &[&str],
) -> Mounted {
    std::fs::create_dir_all(mnt).unwrap();
    let mut c = Command::new(super::bin());
    c.arg("mount")
        .arg("--config")
        .arg(config)
        .arg("--passfile")
        .arg(passfile)
        .arg("--background");
    c.args(extra).arg(source).arg(mnt);
    super::ok(&mut c);
    assert!(
        is_mounted(mnt),
        "{} not mounted after snapveil mount --background",
        mnt.display()
    );
    Mounted {
        path: mnt.to_path_buf(),
    }
}

/// `gocryptfs -reverse` (the oracle) of SOURCE at MNT.
pub fn gocryptfs_reverse(
    config: Option<&Path>,
    passfile: &Path,
    source: &Path,
    mnt: &Path,
) -> Mounted {
    std::fs::create_dir_all(mnt).unwrap();
    let mut c = Command::new("gocryptfs");
    c.args(["-reverse", "-q", "-passfile"]).arg(passfile);
    if let Some(cf) = config {
        c.arg("-config").arg(cf);
    }
    c.arg(source).arg(mnt);
    super::ok(&mut c);
    Mounted {
        path: mnt.to_path_buf(),
    }
}

/// Forward `gocryptfs -ro` of an encrypted copy.
pub fn gocryptfs_forward(passfile: &Path, cipherdir: &Path, mnt: &Path) -> Mounted {
    std::fs::create_dir_all(mnt).unwrap();
    let mut c = Command::new("gocryptfs");
    c.args(["-ro", "-q", "-passfile"])
        .arg(passfile)
        .arg(cipherdir)
        .arg(mnt);
    super::ok(&mut c);
    Mounted {
        path: mnt.to_path_buf(),
    }
}

/// Why the FUSE mount at `path` is still there, for a failure message: what a look at
/// it answers (ENOTCONN: its server is gone), and which processes hold `/dev/fuse`
/// open (a connection lives while one does). The look runs on a thread of its own and
/// is given 5 s: a live connection whose server no longer answers would hold it for ever.
pub fn why_still_mounted(path: &Path) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::symlink_metadata(&p).map(|_| ()));
    });
    let answer = match rx.recv_timeout(std::time::Duration::from_secs(5)) {
        Ok(Ok(())) => "it answers".to_string(),
        Ok(Err(e)) => format!("looking at it: {e}"),
        Err(_) => "looking at it: no answer in 5 s".to_string(),
    };
    let mut holders = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let fds = p.path().join("fd");
        let holds = std::fs::read_dir(&fds)
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")));
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            holders.push(format!(
                "{} ({})",
                p.file_name().to_string_lossy(),
                comm.trim()
            ));
        }
    }
    format!("{answer}; /dev/fuse held by: {}", holders.join(", "))
}
