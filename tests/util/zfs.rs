//! A real ZFS pool on a file, served by Debian's zfs-fuse daemon. The daemon is shared by
//! every process on the machine: it is started when not running and, if a test started
//! it, stopped when the last pool of this test binary is gone and no pool of anyone else
//! is imported. Drop destroys the pool, also when the test panicked.

use super::{ok, require_tool};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const DAEMON: &str = "/usr/sbin/zfs-fuse";

struct Daemon {
    users: usize,
    /// Pid of a daemon we started (so only that one is ever stopped).
    started: Option<i32>,
}

static DAEMON_STATE: Mutex<Daemon> = Mutex::new(Daemon {
    users: 0,
    started: None,
});
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn zpool_list_works() -> bool {
    Command::new("zpool")
        .args(["list", "-H"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_daemon(st: &mut Daemon) {
    let pidfile =
        std::env::temp_dir().join(format!("snapveil-zfs-fuse-{}.pid", std::process::id()));
    // A daemon that is still shutting down (or starting, from another process) makes a
    // start fail: retry until one answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !zpool_list_works() {
        assert!(
            Instant::now() < deadline,
            "zfs-fuse did not answer within 30 s"
        );
        let status = Command::new(DAEMON)
            .args(["--no-kstat-mount", "-p"])
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap_or_else(|e| panic!("starting {DAEMON}: {e}"));
        if status.success() {
            for _ in 0..100 {
                if zpool_list_works() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            st.started = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            let _ = std::fs::remove_file(&pidfile);
        } else {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn stop_daemon_if_ours(st: &mut Daemon) {
    let Some(pid) = st.started else { return };
    // Someone else's pool (another test binary, a user): leave the daemon running.
    let pools = Command::new("zpool")
        .args(["list", "-H", "-o", "name"])
        .output();
    if !pools.is_ok_and(|o| o.status.success() && o.stdout.is_empty()) {
        return;
    }
    // SAFETY: kill(2) on the pid the daemon wrote into our pidfile; no memory is touched.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    // SAFETY: kill with signal 0 only probes whether the process exists.
    while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    st.started = None;
}

pub struct ZfsPool {
    pub name: String,
    /// The pool's root mountpoint.
    pub mountpoint: PathBuf,
    dir: Option<tempfile::TempDir>,
    created: bool,
}

impl ZfsPool {
    /// A fresh 200 MiB pool with a unique name; `None` only when the tools are missing and
    /// SNAPVEIL_TEST_SKIP_MISSING=1.
    pub fn new() -> Option<Self> {
        for t in ["zfs", "zpool", DAEMON] {
            if !require_tool(t) {
                return None;
            }
        }
        {
            let mut st = DAEMON_STATE.lock().unwrap_or_else(|e| e.into_inner());
            ensure_daemon(&mut st);
            st.users += 1;
        }
        let dir = tempfile::Builder::new()
            .prefix("snapveil-zfs-")
            .tempdir()
            .expect("tempdir");
        let name = format!(
            "svt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let file = dir.path().join("pool.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(200 << 20))
            .expect("create pool file");
        let mountpoint = dir.path().join("mnt");
        let mut pool = ZfsPool {
            name,
            mountpoint,
            dir: Some(dir),
            created: false,
        };
        ok(Command::new("zpool")
            .args(["create", "-m"])
            .arg(&pool.mountpoint)
            .arg(&pool.name)
            .arg(&file));
        pool.created = true;
        Some(pool)
    }

    /// `zfs create POOL/rel`; returns the dataset name.
    pub fn dataset(&self, rel: &str) -> String {
        let ds = format!("{}/{rel}", self.name);
        ok(Command::new("zfs").args(["create", &ds]));
        ds
    }

    /// Every dataset and snapshot of the pool.
    pub fn all(&self) -> Vec<String> {
        ok(Command::new("zfs").args(["list", "-H", "-o", "name", "-t", "all", "-r", &self.name]))
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for ZfsPool {
    fn drop(&mut self) {
        if self.created {
            // A just-unmounted clone can keep the pool busy for a moment.
            let mut done = false;
            for _ in 0..20 {
                let out = Command::new("zpool")
                    .args(["destroy", "-f", &self.name])
                    .output();
                if out.is_ok_and(|o| o.status.success()) {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            if !done {
                eprintln!(
                    "zpool destroy -f {} failed; the pool is left imported",
                    self.name
                );
            }
        }
        drop(self.dir.take());
        let mut st = DAEMON_STATE.lock().unwrap_or_else(|e| e.into_inner());
        st.users -= 1;
        if st.users == 0 {
            stop_daemon_if_ours(&mut st);
        }
    }
}
