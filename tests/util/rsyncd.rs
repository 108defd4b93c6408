//! A real `rsync --daemon` on 127.0.0.1 serving one writable module, killed on drop.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RsyncDaemon {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl RsyncDaemon {
    /// Serves `path` as module `module`, writable, as the current user.
    pub fn start(work: &Path, module: &str, path: &Path) -> RsyncDaemon {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let dir = work.join(format!("rsyncd-{port}"));
        fs::create_dir_all(&dir).unwrap();
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let conf = dir.join("rsyncd.conf");
        fs::write(
            &conf,
            format!(
                "use chroot = no\nlog file = {log}\n[{module}]\npath = {path}\nread only = false\nuid = {uid}\ngid = {gid}\n",
                log = dir.join("log").display(),
                path = path.display(),
            ),
        )
        .unwrap();
        let child = Command::new("rsync")
            .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", conf.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn rsync --daemon");
        let d = RsyncDaemon { child, port, dir };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "rsync daemon did not listen on {port}; log:\n{}",
                fs::read_to_string(d.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn url(&self, module: &str) -> String {
        format!("rsync://127.0.0.1:{}/{module}", self.port)
    }
}

impl Drop for RsyncDaemon {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("kill rsync daemon: {e}");
        }
        let _ = self.child.wait();
    }
}
