//! Error policy.
//!
//! 1. Inside modules, `thiserror` enums whose variants carry the *what*: the path, the
//!    dataset, the config field, the command line. A message must let a sysadmin act
//!    without reading the source.
//! 2. External commands fail with [`crate::exec::CommandError`]: the shell-escaped command,
//!    its exit status or signal, and the tail of its stderr. Providers classify known
//!    stderr into typed variants conservatively; failure itself is decided by exit status.
//! 3. `anyhow` appears only at the edge (`commands/`, `job.rs`), with context naming
//!    the job or file; `commands::exit_code` prints it with `{:#}`.
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
