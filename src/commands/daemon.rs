//! `mount --background` and `open --background`: the process runs itself again in the
//! foreground as a detached child and returns once the child reports the mount answers.

use super::Outcome;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;

/// Env var marking the detached child of `mount --background`.
const DAEMON_ENV: &str = "SNAPVEIL_MOUNT_DAEMON";

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays open until after.
            unsafe {
                libc::dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

/// Runs ourselves in the foreground as a detached child and returns once it reports
/// that the mount answers; its errors reach our stderr before that.
pub(super) fn spawn(args: &[OsString], mountpoint: &Path, announce: bool) -> Result<Outcome> {
    let exe = std::env::current_exe().context("locating the snapveil binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let out = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).ok();
    if line.trim() == "ready" {
        if announce {
            println!("{}: mounted (pid {})", mountpoint.display(), child.id());
        }
        return Ok(Outcome::Success);
    }
    let status = child.wait()?;
    bail!(
        "{}: mount daemon exited before the mount answered ({status})",
        mountpoint.display()
    )
}

/// In the daemon child: leave the caller's session, and once the mount answers, tell
/// the parent and let go of its terminal.
pub(super) fn ready() -> impl FnOnce() + Send + 'static {
    let daemon = std::env::var_os(DAEMON_ENV).is_some();
    if daemon {
        let _ = nix::unistd::setsid();
    }
    move || {
        if daemon {
            println!("ready");
            let _ = std::io::stdout().flush();
            detach_stdio();
        }
    }
}
