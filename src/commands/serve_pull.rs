//! `snapveil serve-pull JOB`: the forced command of a pulling backup server's key
//! (`command="snapveil serve-pull JOB",restrict` in authorized_keys). Checks the
//! server's request (`SSH_ORIGINAL_COMMAND`), refusing and logging anything but an
//! `rsync --server --sender` read of the view, then serves it as a run of the job
//! ([`crate::pull`]).
//!
//! stdout is the ssh channel, and only rsync's protocol may travel on it: before
//! anything else runs, the channel is moved to a private descriptor handed to rsync
//! alone, and descriptor 1 points at stderr, so a stray print (ours, a library's) lands
//! in the log instead of the server's rsync stream.

use super::{usage, Outcome};
use crate::cli::ServePullArgs;
use crate::exec::{Relay, Runner};
use anyhow::{Context, Result};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// Moves the ssh channel off descriptor 1; returns it (close-on-exec, so only rsync,
/// which gets a dup, holds it besides us).
fn take_channel() -> Result<OwnedFd> {
    let out = std::io::stdout();
    let _ = std::io::Write::flush(&mut out.lock());
    let chan = out
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating stdout (the ssh channel)")?;
    // SAFETY: dup2 of our own stderr onto stdout; both descriptors are open.
    if unsafe { libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO) } < 0 {
        return Err(std::io::Error::last_os_error()).context("moving stdout to stderr");
    }
    Ok(chan)
}

/// A refusal goes to the server (stderr) and to the client's own log: syslog's auth
/// facility, where sshd logs the key that made it.
fn log_refusal(msg: &str) {
    tracing::error!("{msg}");
    let Ok(c) = std::ffi::CString::new(msg.replace('\0', " ")) else {
        return;
    };
    // SAFETY: openlog with a static ident; syslog with a "%s" format and one C string.
    unsafe {
        libc::openlog(c"snapveil".as_ptr(), libc::LOG_PID, libc::LOG_AUTH);
        libc::syslog(libc::LOG_WARNING, c"%s".as_ptr(), c.as_ptr());
        libc::closelog();
    }
}

pub fn run(runner: &dyn Runner, a: ServePullArgs) -> Result<Outcome> {
    let channel = take_channel()?;
    let cfg = super::load_config(&a.config.config)?;
    let job = super::find_job(&cfg, &a.config.config, &a.job)?;
    let line = std::env::var("SSH_ORIGINAL_COMMAND").unwrap_or_default();
    let from = std::env::var("SSH_CONNECTION")
        .ok()
        .and_then(|c| c.split(' ').next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let req = match crate::pull::parse_request(&line) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!(
                "job {}: refused request from {from}: {e} (SSH_ORIGINAL_COMMAND: {line:?})",
                job.name
            );
            log_refusal(&msg);
            return Err(usage(msg));
        }
    };
    crate::signals::install().context("installing signal handlers")?;
    let relay = Relay {
        stdin: libc::STDIN_FILENO,
        stdout: channel.as_raw_fd(),
    };
    let st = crate::pull::serve(runner, &cfg, job, &req, relay);
    drop(channel);
    Ok(Outcome::from_ok(st.result.succeeded()))
}
