//! The command seam: every external program snapveil runs (`zfs`, `btrfs`, `lvcreate`,
//! `rsync`, `mount`, hooks) goes through a [`Runner`], so that it is logged with its
//! arguments, timed, its stderr captured into the error, and so that tests can pin the
//! exact command lines ([`scripted::ScriptedRunner`]) where the machine cannot run the
//! real tool (LVM here, `zfs send -w` on zfs-fuse).
//!
//! This module does not decide what a failure *means*; providers classify stderr
//! conservatively into their own typed errors and keep the [`CommandError`] as evidence.

pub mod scripted;
mod system;

pub use system::SystemRunner;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc;
use std::time::Duration;

/// A command line to run: program, arguments, environment changes, optional stdin and
/// timeout. `Display` gives a shell-escaped line that can be pasted into a terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: BTreeMap<String, Option<OsString>>,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
    cwd: Option<OsString>,
    cancel_after: Option<usize>,
    relay: Option<Relay>,
}

/// Descriptors a relayed command talks over instead of pipes (see [`Cmd::relay`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Relay {
    pub stdin: std::os::fd::RawFd,
    pub stdout: std::os::fd::RawFd,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: BTreeMap::new(),
            stdin: None,
            timeout: None,
            cwd: None,
            cancel_after: None,
            relay: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl AsRef<OsStr>) -> Self {
        self.env.insert(key.into(), Some(value.as_ref().to_owned()));
        self
    }

    pub fn env_remove(mut self, key: impl Into<String>) -> Self {
        self.env.insert(key.into(), None);
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<OsStr>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Stops the command (SIGTERM to its process group, SIGKILL after a grace period)
    /// once more than `after` terminating signals reached snapveil
    /// ([`crate::signals::count`]), and reports [`Exit::Cancelled`]. `0` stops it on any
    /// signal, also one that came before it started (the steps of a run);
    /// `signals::count()` only on one that comes while it runs (an on-failure hook that
    /// reports the interruption). Without this, a command runs to its end: cleanup
    /// (unmount, snapshot delete) must never be cut in half by a signal.
    pub fn cancellable(mut self, after: usize) -> Self {
        self.cancel_after = Some(after);
        self
    }

    /// Gives the command these open descriptors as its stdin and stdout, and snapveil's
    /// stderr, instead of pipes: `serve-pull` hands rsync the ssh channel itself, so the
    /// protocol flows without a copy through snapveil and nothing snapveil prints can
    /// reach it. [`Runner::output`] then returns empty stdout and stderr.
    pub fn relay(mut self, stdin: std::os::fd::RawFd, stdout: std::os::fd::RawFd) -> Self {
        self.relay = Some(Relay { stdin, stdout });
        self
    }

    pub fn get_relay(&self) -> Option<Relay> {
        self.relay
    }

    pub fn program(&self) -> &OsStr {
        &self.program
    }

    pub fn get_args(&self) -> &[OsString] {
        &self.args
    }

    pub fn get_env(&self) -> &BTreeMap<String, Option<OsString>> {
        &self.env
    }

    pub fn get_stdin(&self) -> Option<&[u8]> {
        self.stdin.as_deref()
    }

    pub fn get_timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub fn get_cwd(&self) -> Option<&OsStr> {
        self.cwd.as_deref()
    }

    pub fn get_cancel_after(&self) -> Option<usize> {
        self.cancel_after
    }

    /// Program and arguments as lossy strings: what tests compare against.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(&self.program)
            .chain(self.args.iter())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// Runs the command and turns a non-zero exit into a [`CommandError`].
    ///
    /// # Errors
    /// Spawn failures (program missing) and non-zero exits, with the stderr tail.
    pub fn run_checked(&self, runner: &dyn Runner) -> Result<Output, CommandError> {
        let out = runner
            .output(self)
            .map_err(|e| CommandError::spawn(self, e))?;
        if out.exit.success() {
            Ok(out)
        } else {
            Err(CommandError::failed(self, &out))
        }
    }
}

/// `argv` as one POSIX shell line, each argument quoted where it needs it: the command
/// an ssh server hands to the remote user's shell.
pub fn shell_line<S: AsRef<OsStr>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| escape(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes an argument for a POSIX shell only when it needs it, so logged command lines
/// stay readable (`zfs destroy tank/a@x`) and still paste correctly.
fn escape(arg: &OsStr) -> String {
    let s = String::from_utf8_lossy(arg.as_bytes());
    let safe = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.env {
            if let Some(v) = v {
                write!(f, "{}={} ", k, escape(v))?;
            }
        }
        write!(f, "{}", escape(&self.program))?;
        for a in &self.args {
            write!(f, " {}", escape(a))?;
        }
        Ok(())
    }
}

/// How a process ended. Our own type so that fakes are trivial to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// Killed by us after the command's timeout.
    TimedOut,
    /// Stopped by us because snapveil was interrupted by a signal ([`Cmd::cancellable`]).
    Cancelled,
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }

    pub fn code(self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(c),
            _ => None,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status: {c}"),
            Exit::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("?");
                write!(f, "signal: {s}, {name}")
            }
            Exit::TimedOut => write!(f, "timed out and killed"),
            Exit::Cancelled => write!(f, "stopped: snapveil was interrupted"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub exit: Exit,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn ok(stdout: impl Into<Vec<u8>>) -> Self {
        Output {
            exit: Exit::Code(0),
            stdout: stdout.into(),
            stderr: Vec::new(),
        }
    }

    pub fn fail(code: i32, stderr: impl Into<Vec<u8>>) -> Self {
        Output {
            exit: Exit::Code(code),
            stdout: Vec::new(),
            stderr: stderr.into(),
        }
    }

    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// One line a child printed, with its newline when it had one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

impl Line {
    pub fn stream(&self) -> &'static str {
        match self {
            Line::Stdout(_) => "stdout",
            Line::Stderr(_) => "stderr",
        }
    }

    /// The text without its line end, lossily decoded: what goes into a log line.
    pub fn text(&self) -> String {
        let (Line::Stdout(b) | Line::Stderr(b)) = self;
        String::from_utf8_lossy(b)
            .trim_end_matches(['\n', '\r'])
            .to_string()
    }
}

/// A long-running child (rsync, a held hook, `zfs send | ssh zfs recv`).
pub trait RunningChild: Send {
    fn pid(&self) -> Option<u32>;
    /// Writes to the child's stdin (when it was spawned with piped stdin).
    fn write_stdin(&mut self, data: &[u8]) -> io::Result<()>;
    /// Closes stdin, telling the child to finish.
    fn close_stdin(&mut self);
    /// Reads one line of stdout, `None` at end of stream.
    fn read_line(&mut self) -> io::Result<Option<Vec<u8>>>;
    /// Takes stdout and stderr as one stream of lines, delivered as the child prints
    /// them (so a hook's "tables locked" is logged when it happens, not when it ends).
    /// The channel closes when both streams are closed. Afterwards `read_line` returns
    /// `None` and `wait` returns neither stdout nor stderr; a second call returns a
    /// closed channel.
    fn take_lines(&mut self) -> mpsc::Receiver<Line>;
    /// Takes stdout as a byte stream (`zfs send`), not lines. Afterwards `read_line`
    /// returns `None` and `wait` returns no stdout; a second call returns `None`.
    fn take_stdout(&mut self) -> Option<Box<dyn io::Read + Send>>;
    /// Takes stdin as a byte stream (`zfs receive`); dropping it closes the child's stdin.
    fn take_stdin(&mut self) -> Option<Box<dyn io::Write + Send>>;
    /// Sends a signal (e.g. SIGTERM) without waiting.
    fn signal(&mut self, sig: i32) -> io::Result<()>;
    /// Waits for the end; stdout not yet read and all stderr are returned.
    fn wait(self: Box<Self>) -> io::Result<Output>;
}

/// Runs commands. `Send + Sync` so that one runner serves the FUSE threads and the job.
pub trait Runner: Send + Sync {
    /// Runs a short command to completion, capturing stdout and stderr.
    fn output(&self, cmd: &Cmd) -> io::Result<Output>;
    /// Starts a command with piped stdin/stdout; stderr is captured on a thread.
    fn spawn(&self, cmd: &Cmd) -> io::Result<Box<dyn RunningChild>>;
}

/// One shared error for external commands, with a cargo-style message.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("could not run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("`{cmd}` failed ({status}){}", stderr_block(.stderr_tail))]
    Failed {
        cmd: String,
        status: String,
        exit: Exit,
        stderr_tail: String,
    },
}

fn stderr_block(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- stderr\n{}", tail.trim_end())
    }
}

/// Keeps the last lines of stderr: the useful part of a tool's complaint.
pub fn tail(bytes: &[u8], max_lines: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

impl CommandError {
    pub fn spawn(cmd: &Cmd, source: io::Error) -> Self {
        CommandError::Spawn {
            cmd: cmd.to_string(),
            source,
        }
    }

    pub fn failed(cmd: &Cmd, out: &Output) -> Self {
        CommandError::Failed {
            cmd: cmd.to_string(),
            status: out.exit.to_string(),
            exit: out.exit,
            stderr_tail: tail(&out.stderr, 20),
        }
    }

    /// The tool's stderr, for conservative classification by the caller.
    pub fn stderr(&self) -> &str {
        match self {
            CommandError::Spawn { .. } => "",
            CommandError::Failed { stderr_tail, .. } => stderr_tail,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        match self {
            CommandError::Spawn { .. } => None,
            CommandError::Failed { exit, .. } => Some(*exit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_shell_escaped() {
        let c = Cmd::new("zfs")
            .args(["snapshot", "tank/a b@x"])
            .env("LC_ALL", "C");
        assert_eq!(c.to_string(), "LC_ALL=C zfs snapshot 'tank/a b@x'");
    }

    #[test]
    fn failed_error_names_command_status_and_stderr() {
        let c = Cmd::new("zfs").args(["destroy", "tank/a@x"]);
        let e = CommandError::failed(&c, &Output::fail(1, "could not find dataset\n"));
        assert_eq!(
            e.to_string(),
            "`zfs destroy tank/a@x` failed (exit status: 1)\n--- stderr\ncould not find dataset"
        );
    }
}
