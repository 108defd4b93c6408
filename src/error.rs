//! Error policy.
//!
//! 1. Inside modules, `thiserror` enums whose variants carry the *what*: the path, the
//!    dataset, the config field, the command line. A message must let a sysadmin act
//!    without reading the source.
//! 2. External commands fail with [`crate::exec::CommandError`]: the shell-escaped command,
//!    its exit status or signal, and the tail of its stderr. Providers classify known
//!    stderr into typed variants conservatively; failure itself is decided by exit status.
//! 3. `anyhow` appears only at the edge (`commands/`, `job.rs`), with context naming
//!    the job or file; `commands::exit_code` prints it with [`Chain`], not `{:#}`: many
//!    variants show their cause in their own message (`{path}: {source}`) *and* mark it
//!    `#[source]`, and `{:#}` would print that cause twice ("No space left on device
//!    (os error 28): No space left on device (os error 28)").
//! 4. View errors map to an errno ([`crate::view::ViewError::errno`]); the FUSE adapter
//!    logs each once and replies with the errno.
//! 5. No `unwrap()` in `Drop`: log and carry on, cleanup must finish its other steps.
//!
//! Exit codes of the binary, the same for every command (chosen only in
//! `commands::exit_code`, documented in `snapveil(8)` EXIT STATUS): 0 success, 1 the
//! work failed (a job, a verify difference, a file a restore could not bring back, or an
//! error while working), 2 usage or config error (bad config file, unknown job name, bad
//! `--keep-*` / `--as-of` value: nothing was attempted). clap's own usage errors exit 2.

/// Exit code for "the work failed" (a job, a verify difference, a file in `decrypt`).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for bad usage, config or input: nothing was attempted.
pub const EXIT_USAGE: u8 = 2;

use std::error::Error;
use std::fmt;

/// An error and its causes, `outer: cause: cause`, leaving out a cause whose text its
/// parent's message already contains. One formatter for the whole binary (main, the
/// job's status and log, snapshot errors) instead of auditing every variant's `Display`.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut prev = self.0.to_string();
        f.write_str(&prev)?;
        let mut cur = self.0.source();
        while let Some(c) = cur {
            let msg = c.to_string();
            if !msg.is_empty() && !prev.contains(&msg) {
                write!(f, ": {msg}")?;
            }
            prev = msg;
            cur = c.source();
        }
        Ok(())
    }
}

/// [`Chain`] as a string.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("{path}: {source}")]
        Io {
            path: String,
            #[source]
            source: std::io::Error,
        },
        #[error("`rsync` failed")]
        Cmd {
            #[source]
            source: std::io::Error,
        },
    }

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOSPC)
    }

    #[test]
    fn chain_drops_a_cause_the_message_already_shows() {
        let e = Err::<(), _>(Inner::Io {
            path: "/t/manifests/S.sha1".into(),
            source: enospc(),
        })
        .context("writing the manifest")
        .unwrap_err();
        // What `{:#}` printed: the cause twice.
        assert_eq!(
            format!("{e:#}"),
            "writing the manifest: /t/manifests/S.sha1: No space left on device (os error 28): \
             No space left on device (os error 28)"
        );
        assert_eq!(
            chain(e.as_ref()),
            "writing the manifest: /t/manifests/S.sha1: No space left on device (os error 28)"
        );
        assert_eq!(Chain(e.as_ref()).to_string(), chain(e.as_ref()));
    }

    #[test]
    fn chain_keeps_causes_the_message_does_not_show() {
        let e = Err::<(), _>(Inner::Cmd { source: enospc() })
            .context("job j")
            .unwrap_err();
        assert_eq!(
            chain(e.as_ref()),
            "job j: `rsync` failed: No space left on device (os error 28)"
        );
    }
}
