//! A real ZFS pool on a file, served by Debian's zfs-fuse daemon. Drop destroys the pool,
//! also when the test panicked.
//!
//! zfs-fuse is one userspace daemon for the whole machine, and it is fragile: stopping it
//! while another request is on its way, or many recursive clone mounts at once, can leave
//! a `zfs` command waiting forever (a CI run once hung for its whole budget that way). So:
//! - the pools of one test process exist one at a time (`SERIAL`; the ZFS tests take a
//!   few seconds together, serialising them costs nothing);
//! - the daemon is started once per process and, if this process started it and no pool is
//!   left, stopped at exit, never between two tests;
//! - pools left by a killed test process are destroyed before the first pool is made;
//! - a watchdog turns a hang into a failure: when a pool lives longer than `WATCHDOG`, it
//!   prints what is running and kills the daemon it started, so the waiting command fails
//!   and the test reports instead of stalling the suite.

use super::{ok, require_tool};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

const DAEMON: &str = "/usr/sbin/zfs-fuse";
/// Far beyond any ZFS test here (each takes about a second).
const WATCHDOG: Duration = Duration::from_secs(180);

static SERIAL: Mutex<()> = Mutex::new(());
static START: Once = Once::new();
/// Pid of a daemon this process started, 0 when none (so only that one is ever stopped).
static STARTED: AtomicI32 = AtomicI32::new(0);
static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn zpool_list_works() -> bool {
    Command::new("zpool")
        .args(["list", "-H"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn pool_names() -> Option<Vec<String>> {
    let out = Command::new("zpool")
        .args(["list", "-H", "-o", "name"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only probes whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn start_daemon() {
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
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                STARTED.store(pid, Ordering::SeqCst);
            }
            let _ = std::fs::remove_file(&pidfile);
        } else {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Pools named by `ZfsPool::new` for a process that no longer exists: a test binary that
/// was killed. zfs-fuse re-imports them at its next start; left alone they would also keep
/// `stop_at_exit` from ever stopping the daemon.
fn destroy_stale_pools() {
    for name in pool_names().unwrap_or_default() {
        let Some(pid) = name
            .strip_prefix("svt")
            .and_then(|r| r.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() as i32 && !alive(pid) {
            let _ = Command::new("zpool")
                .args(["destroy", "-f", &name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

extern "C" fn stop_at_exit() {
    let pid = STARTED.load(Ordering::SeqCst);
    if pid == 0 {
        return;
    }
    // Someone else's pool (another test process, a user): leave the daemon running.
    if !pool_names().is_some_and(|p| p.is_empty()) {
        return;
    }
    // SAFETY: kill(2) on the pid the daemon wrote into our pidfile; no memory is touched.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the process-wide waiter when a pool outlives `WATCHDOG`; dropping the sender
/// (the pool's drop) ends it quietly.
fn watchdog(pool: String) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        // SNAPVEIL_TEST_ZFS_WATCHDOG (seconds) exists to try the watchdog itself.
        let limit = std::env::var("SNAPVEIL_TEST_ZFS_WATCHDOG")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(WATCHDOG, Duration::from_secs);
        if rx.recv_timeout(limit) != Err(mpsc::RecvTimeoutError::Timeout) {
            return;
        }
        let ps = Command::new("ps")
            .args(["-eo", "pid,etime,stat,wchan:20,args"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let waiting: Vec<&str> = ps
            .lines()
            .filter(|l| l.contains("zfs") || l.contains("zpool") || l.contains("snapveil"))
            .collect();
        eprintln!(
            "zfs watchdog: pool {pool} still exists after {limit:?}; zfs-fuse seems hung. \
             Processes:\n{}",
            waiting.join("\n")
        );
        let pid = STARTED.load(Ordering::SeqCst);
        if pid != 0 {
            eprintln!("zfs watchdog: killing zfs-fuse {pid} so the waiting commands fail");
            // SAFETY: kill(2) on the daemon this process started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            STARTED.store(0, Ordering::SeqCst);
        }
    });
    tx
}

pub struct ZfsPool {
    pub name: String,
    /// The pool's root mountpoint.
    pub mountpoint: PathBuf,
    dir: Option<tempfile::TempDir>,
    created: bool,
    watchdog: Option<mpsc::Sender<()>>,
    /// Held for the pool's life: one pool at a time per process.
    serial: Option<MutexGuard<'static, ()>>,
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
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        START.call_once(|| {
            // SAFETY: registers a plain extern "C" function with libc's exit handlers.
            unsafe { libc::atexit(stop_at_exit) };
            start_daemon();
            destroy_stale_pools();
        });
        // After a watchdog kill (or someone stopping it), start one again.
        start_daemon();
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
            watchdog: Some(watchdog(name.clone())),
            name,
            mountpoint,
            dir: Some(dir),
            created: false,
            serial: Some(serial),
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
        drop(self.watchdog.take());
        drop(self.serial.take());
    }
}
