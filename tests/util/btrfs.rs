//! A real btrfs filesystem on a loop device, for snapshot tests. Drop unmounts it and
//! detaches the loop device, also when the test panicked.

use super::{ok, require_tool};
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct BtrfsLoop {
    /// Holds the image and the mountpoint; removed after unmount.
    _dir: tempfile::TempDir,
    pub mnt: PathBuf,
    loopdev: Option<String>,
    mounted: bool,
}

impl BtrfsLoop {
    /// A fresh 300 MiB btrfs mounted under a temp dir; `None` only when the tools are
    /// missing and SNAPVEIL_TEST_SKIP_MISSING=1.
    pub fn new() -> Option<Self> {
        for t in ["mkfs.btrfs", "btrfs", "losetup", "mount", "umount"] {
            if !require_tool(t) {
                return None;
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("snapveil-btrfs-")
            .tempdir()
            .expect("tempdir");
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .and_then(|f| f.set_len(300 << 20))
            .expect("create image");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        let mut g = BtrfsLoop {
            _dir: dir,
            mnt,
            loopdev: None,
            mounted: false,
        };
        let dev = ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
        g.loopdev = Some(dev.trim().to_owned());
        ok(Command::new("mkfs.btrfs").args(["-q", dev.trim()]));
        ok(Command::new("mount").arg(dev.trim()).arg(&g.mnt));
        g.mounted = true;
        Some(g)
    }

    /// Creates subvolume `name` at the top of the filesystem.
    pub fn subvolume(&self, name: &str) -> PathBuf {
        let p = self.mnt.join(name);
        ok(Command::new("btrfs").args(["subvolume", "create"]).arg(&p));
        p
    }

    /// Names of all subvolumes (paths relative to the top level).
    pub fn subvolumes(&self) -> Vec<String> {
        let out = ok(Command::new("btrfs")
            .args(["subvolume", "list"])
            .arg(&self.mnt));
        out.lines()
            .filter_map(|l| l.split(" path ").nth(1))
            .map(str::to_owned)
            .collect()
    }

    /// A read-only snapshot made by hand (as a user would).
    pub fn user_snapshot(&self, of: &Path, at: &Path) {
        ok(Command::new("btrfs")
            .args(["subvolume", "snapshot", "-r"])
            .arg(of)
            .arg(at));
    }
}

impl Drop for BtrfsLoop {
    fn drop(&mut self) {
        if self.mounted {
            let st = Command::new("umount").arg(&self.mnt).status();
            if !st.is_ok_and(|s| s.success()) {
                eprintln!("umount {} failed; detaching lazily", self.mnt.display());
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(dev) = &self.loopdev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
}
