//! The rsync transport, reaching all three kinds of target alike (a local path, ssh with
//! or without a shell, a daemon): one way to build the command (`-e` quoted once), one
//! parser of `--list-only` and `--out-format=%n` output, and the one place that says what
//! rsync's exit codes mean ([`ended`]). The transfer of a view with its progress line
//! lives here too.
//!
//! rsync's exit code 24 (files vanished during the transfer) is a warning, any other
//! non-zero a failure; a failed transfer leaves `current/` as rsync left it and the next
//! run completes it.

use crate::exec::{Cmd, Exit, Output, Runner};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RsyncError {
    #[error("could not run rsync: {0}")]
    Spawn(std::io::Error),
    #[error("rsync to {target} failed ({exit}){}", stderr_block(.stderr))]
    Failed {
        target: String,
        exit: Exit,
        stderr: String,
    },
    #[error("rsync to {target} interrupted by a signal")]
    Cancelled { target: String },
    /// rrsync refuses a `--backup-dir` with `..`; an absolute path is anchored at its
    /// directory. Classified from rsync's stderr where the transfer fails.
    #[error(
        "rsync to {target} failed ({exit}): the ssh key is restricted by rrsync, which \
         refuses a relative --backup-dir: write the target path as an absolute path below \
         rrsync's directory (host:/PATH){}",
        stderr_block(.stderr)
    )]
    RrsyncBackupDir {
        target: String,
        exit: Exit,
        stderr: String,
    },
    #[error(transparent)]
    Command(#[from] crate::exec::CommandError),
}

fn stderr_block(s: &str) -> String {
    if s.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- stderr\n{}", s.trim_end())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub files_transferred: u64,
    pub bytes_sent: u64,
    pub total_size: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub stats: Stats,
    /// rsync exit 24: some files vanished while it ran (only possible on a `dir:` source).
    pub vanished: bool,
    /// What rsync sent, as paths relative to the view (directories end in `/`), by key
    /// ([`crate::manifest::path_key`]: 16 bytes a file instead of its name); empty after
    /// a [`Pass::First`], which sends everything.
    pub sent: crate::manifest::PathSet,
    /// How many entries rsync sent, listed or not.
    pub items: usize,
}

fn num(s: &str) -> Option<u64> {
    s.split_whitespace()
        .next()?
        .replace([',', '.'], "")
        .parse()
        .ok()
}

/// Parses the `--stats` block.
pub fn parse_stats(out: &str) -> Stats {
    let mut s = Stats::default();
    for l in out.lines() {
        if let Some(v) = l.strip_prefix("Number of regular files transferred:") {
            s.files_transferred = num(v).unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Total bytes sent:") {
            s.bytes_sent = num(v).unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("Total file size:") {
            s.total_size = num(v).unwrap_or(0);
        }
    }
    s
}

/// How rsync reaches a target: the program, `-e` for ssh, and the root address
/// (`/srv/b`, `user@host:/srv/b`, `rsync://host/module/b`), without a trailing slash.
#[derive(Debug, Clone)]
pub struct Endpoint {
    program: std::ffi::OsString,
    rsh: Option<String>,
    root: String,
    shown: String,
}

impl Endpoint {
    /// `ssh` is the ssh command line (program and options) for an ssh target, `None` for
    /// local paths and daemons.
    pub fn new(
        program: impl AsRef<std::ffi::OsStr>,
        ssh: Option<&[String]>,
        root: String,
        shown: String,
    ) -> Endpoint {
        Endpoint {
            program: program.as_ref().to_owned(),
            rsh: ssh.map(sh_words),
            root: root.trim_end_matches('/').to_string(),
            shown,
        }
    }

    /// rsync with our `-e`, in the C locale (messages are matched nowhere, but listings
    /// are parsed).
    pub fn cmd(&self) -> Cmd {
        let c = Cmd::new(&self.program).env("LC_ALL", "C");
        match &self.rsh {
            Some(e) => c.arg("-e").arg(e),
            None => c,
        }
    }

    /// The address of `sub` below the root (`""`: the root itself, with a slash).
    pub fn dest(&self, sub: &str) -> String {
        if sub.is_empty() {
            format!("{}/", self.root)
        } else {
            format!("{}/{sub}", self.root)
        }
    }

    /// The target as shown in messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// What an rsync that read from or wrote to the target ended with.
    ///
    /// # Errors
    /// Any other exit: a failure, with the target and rsync's stderr.
    pub fn ended(&self, out: &Output) -> Result<Ended, RsyncError> {
        ended(&self.shown, out)
    }

    /// Runs `cmd` and classifies its end ([`ended`]).
    ///
    /// # Errors
    /// rsync could not start, or failed.
    pub fn run(&self, runner: &dyn Runner, cmd: &Cmd) -> Result<(Ended, Output), RsyncError> {
        let out = runner.output(cmd).map_err(RsyncError::Spawn)?;
        Ok((self.ended(&out)?, out))
    }
}

/// How an rsync ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Ok,
    /// 24: files vanished while it ran (a live `dir:` source).
    Vanished,
    /// 23 or 12 with "No such file or directory": the path asked for does not exist (23 is
    /// how rsync ends on a missing source; 12 is rrsync refusing a path it cannot resolve
    /// before rsync starts).
    Missing,
    /// 23 for another reason: some of the files asked for were not there (`--files-from`).
    Partial,
}

/// The one reading of rsync's exit codes (see [`Ended`]).
///
/// # Errors
/// Any other exit, with `target` and rsync's stderr.
pub fn ended(target: &str, out: &Output) -> Result<Ended, RsyncError> {
    let missing = || out.stderr_str().contains("No such file or directory");
    match out.exit {
        Exit::Code(0) => Ok(Ended::Ok),
        Exit::Code(24) => Ok(Ended::Vanished),
        Exit::Code(23 | 12) if missing() => Ok(Ended::Missing),
        Exit::Code(23) => Ok(Ended::Partial),
        exit => Err(RsyncError::Failed {
            target: target.into(),
            exit,
            stderr: out.stderr_str(),
        }),
    }
}

/// Quotes for a POSIX shell (and rsync's `-e` splitting), always: safe on a host whose
/// shell we do not know.
pub fn sh_quote(s: &[u8]) -> Vec<u8> {
    let mut v = b"'".to_vec();
    for &b in s {
        if b == b'\'' {
            v.extend_from_slice(b"'\\''");
        } else {
            v.push(b);
        }
    }
    v.push(b'\'');
    v
}

/// Words joined for a shell, each quoted with [`sh_quote`] unless it is plain.
pub fn sh_words(words: &[String]) -> String {
    let plain = |a: &str| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c))
    };
    words
        .iter()
        .map(|a| {
            if plain(a) {
                a.clone()
            } else {
                String::from_utf8_lossy(&sh_quote(a.as_bytes())).into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Which files a transfer covers.
#[derive(Debug, Clone, Copy)]
pub enum Pass<'a> {
    /// The whole view with `--delete`: rsync's quick check (size and whole-second mtime)
    /// decides what to send.
    Full,
    /// [`Pass::Full`] into an empty `current/`: everything is sent, so what was is not
    /// listed in the [`Outcome`] (on a first run that list would be every file: 16 bytes
    /// a file of the run's memory).
    First,
    /// Only the files named (NUL-separated, relative to the view) in `list`, compared by
    /// checksum on both ends: changes the quick check cannot see.
    Checksum { list: &'a Path },
    /// What changed since the last run ([`crate::changes`]): the entries named in `list`,
    /// and each `DIR/.` named there as one level (no recursion), with `--delete` for what
    /// is gone from it.
    Changes { list: &'a Path },
}

/// The transfer command line: the mounted view `view` to `current/`, with what it
/// replaces or deletes moved to `backup_dir` ([`super::Address::backup_dir`]).
pub fn transfer_cmd(
    ep: &Endpoint,
    backup_dir: &str,
    extra: &[String],
    view: &Path,
    pass: Pass<'_>,
) -> Cmd {
    let c = ep.cmd().args(["--archive", "--numeric-ids"]);
    let c = match pass {
        // --delete-delay: deletions (which move the deleted files into --backup-dir) run
        // after the transfer. Done during it, the generator and the receiver both create
        // the same backup directories at once, and rsync 3.5 fails one with `make_backup
        // ... File exists`.
        Pass::Full | Pass::First => c.args([
            "--delete",
            "--delete-delay",
            "--delete-excluded",
            "--mkpath",
        ]),
        // --files-from makes -a not recurse: a `DIR/.` line is that directory's entries,
        // and --delete applies to exactly those directories.
        Pass::Changes { list } => c
            .args(["--delete", "--delete-delay", "--delete-excluded", "--from0"])
            .arg(format!("--files-from={}", list.display())),
        Pass::Checksum { list } => c
            .args(["--checksum", "--from0"])
            .arg(format!("--files-from={}", list.display())),
    };
    c.args(["--stats", "--out-format=>%n"])
        .arg("--backup")
        .arg(format!("--backup-dir={backup_dir}"))
        .args(extra)
        .arg(format!("{}/", view.display()))
        .arg(ep.dest("current"))
}

/// Runs the transfer; on a terminal shows a one-line progress. rsync is
/// [`Cmd::cancellable`]: a terminating signal stops it (SIGTERM to its process group)
/// through the runner, the same way as hooks. With `names`, what rsync sent is listed in
/// the [`Outcome`]; without, only counted.
///
/// # Errors
/// rsync failing (other than exit 24), or cancellation.
pub fn transfer(
    runner: &dyn Runner,
    cmd: &Cmd,
    target: &str,
    names: bool,
) -> Result<Outcome, RsyncError> {
    let cmd = cmd.clone().cancellable(0);
    let mut child = runner.spawn(&cmd).map_err(RsyncError::Spawn)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut stats_text = String::new();
    let mut sent = crate::manifest::PathSet::new();
    let mut files = 0;
    while let Ok(Some(line)) = child.read_line() {
        if let Some(name) = line.strip_prefix(b">") {
            let name = name.strip_suffix(b"\n").unwrap_or(name);
            files += 1;
            if tty {
                let n: String = String::from_utf8_lossy(name).chars().take(60).collect();
                eprint!("\r\x1b[2K  {files} files sent, {n}");
            }
            if names {
                sent.insert(&unescape(name));
            }
        } else {
            stats_text.push_str(&String::from_utf8_lossy(&line));
        }
    }
    sent.seal();
    if tty && files > 0 {
        eprintln!();
    }
    let out = child.wait().map_err(RsyncError::Spawn)?;
    stats_text.push_str(&String::from_utf8_lossy(&out.stdout));
    let stderr = crate::exec::tail(&out.stderr, 20);
    // rsync's stderr is logged only when it does not go into the error: a failure
    // shows it once, in the error.
    let log_stderr = || {
        for l in stderr.lines() {
            tracing::warn!(target: "snapveil::rsync", "rsync: {l}");
        }
    };
    if out.exit == Exit::Cancelled {
        log_stderr();
        return Err(RsyncError::Cancelled {
            target: target.to_string(),
        });
    }
    let vanished = match ended(target, &out) {
        Ok(Ended::Ok) => {
            log_stderr();
            false
        }
        Ok(Ended::Vanished) => {
            log_stderr();
            tracing::warn!("some files vanished during the transfer (rsync exit 24)");
            true
        }
        Ok(_) => {
            return Err(RsyncError::Failed {
                target: target.to_string(),
                exit: out.exit,
                stderr,
            })
        }
        Err(RsyncError::Failed { exit, .. }) if stderr.contains("in --backup-dir") => {
            return Err(RsyncError::RrsyncBackupDir {
                target: target.to_string(),
                exit,
                stderr,
            })
        }
        Err(RsyncError::Failed { exit, .. }) => {
            return Err(RsyncError::Failed {
                target: target.to_string(),
                exit,
                stderr,
            })
        }
        Err(e) => return Err(e),
    };
    Ok(Outcome {
        stats: parse_stats(&stats_text),
        vanished,
        sent,
        items: files,
    })
}

/// One line of `rsync --list-only`, byte-exact: the name with rsync's `\#ooo` escapes
/// decoded and a symlink's ` -> target` cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub name: Vec<u8>,
    /// The first letter of the permissions column: `-`, `d`, `l`, `p`, `s`, `c`, `b`.
    pub kind: u8,
    pub size: u64,
}

/// Parses `rsync --list-only` output: `perms size date time name` (`name -> target` for
/// symlinks), names with `\#ooo` escapes for unprintable bytes. The `.` entry is skipped.
///
/// # Errors
/// The first line that does not have that shape, as text.
pub fn parse_listing(out: &[u8]) -> Result<Vec<ListEntry>, String> {
    let mut v = Vec::new();
    for line in out.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let bad = || String::from_utf8_lossy(line).into_owned();
        let mut rest = line;
        let mut fields = Vec::new();
        for _ in 0..4 {
            let start = rest.iter().position(|b| *b != b' ').ok_or_else(bad)?;
            rest = &rest[start..];
            let end = rest.iter().position(|b| *b == b' ').ok_or_else(bad)?;
            fields.push(&rest[..end]);
            rest = &rest[end + 1..];
        }
        let kind = *fields[0].first().ok_or_else(bad)?;
        if fields[0].len() != 10 || !b"-dlpscb".contains(&kind) {
            return Err(bad());
        }
        let mut name = rest;
        if kind == b'l' {
            if let Some(i) = rest.windows(4).position(|w| w == b" -> ") {
                name = &rest[..i];
            }
        }
        let name = unescape(name);
        if name == b"." {
            continue;
        }
        let size = num(&String::from_utf8_lossy(fields[1])).unwrap_or(0);
        v.push(ListEntry { name, kind, size });
    }
    Ok(v)
}

/// Decodes rsync's `\#ooo` escapes (in `--list-only` and `--out-format=%n` output).
pub fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && s.get(i + 1) == Some(&b'#') && i + 5 <= s.len() {
            let oct = &s[i + 2..i + 5];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct.iter().fold(0u32, |a, c| a * 8 + u32::from(c - b'0'));
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 5;
                    continue;
                }
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_and_listing_parse() {
        let out = "Number of files: 10 (reg: 7, dir: 3)\nNumber of regular files transferred: 2\nTotal file size: 1,234,567 bytes\nTotal bytes sent: 12,345\n";
        assert_eq!(
            parse_stats(out),
            Stats {
                files_transferred: 2,
                bytes_sent: 12345,
                total_size: 1234567
            }
        );
        let l = "drwxr-xr-x          4,096 2026/11/24 12:00:00 .\ndrwxr-xr-x          4,096 2026/11/24 12:00:00 20261124T120000Z\n-rw-r--r--             12 2026/11/24 12:00:00 a b\n";
        assert_eq!(
            parse_listing(l.as_bytes()).unwrap(),
            vec![
                ListEntry {
                    name: b"20261124T120000Z".to_vec(),
                    kind: b'd',
                    size: 4096
                },
                ListEntry {
                    name: b"a b".to_vec(),
                    kind: b'-',
                    size: 12
                }
            ]
        );
    }

    #[test]
    fn transfer_line_keeps_generations_beside_current() {
        use crate::target::Address as Target;
        let target = Target::Ssh {
            user: Some("bk".into()),
            host: "h".into(),
            path: "/srv/b".into(),
        };
        let ssh = ["ssh".to_string(), "-p".into(), "2222".into()];
        let ep = Endpoint::new(
            "rsync",
            Some(&ssh),
            target.rsync_dest(""),
            target.to_string(),
        );
        let c = transfer_cmd(
            &ep,
            &target.backup_dir("20261124T010000Z"),
            &["--bwlimit=1M".into()],
            Path::new("/run/v"),
            Pass::Full,
        );
        let argv = c.argv();
        assert_eq!(argv[1..3], ["-e".to_string(), "ssh -p 2222".to_string()]);
        assert!(argv.contains(&"--backup-dir=/srv/b/generations/20261124T010000Z".to_string()));
        let rel = Target::Ssh {
            user: None,
            host: "h".into(),
            path: "b".into(),
        };
        assert_eq!(rel.backup_dir("S"), "../generations/S");
        let daemon = Target::RsyncDaemon {
            host: "h".into(),
            port: None,
            module: "m".into(),
            path: "job/".into(),
        };
        assert_eq!(daemon.backup_dir("S"), "/job/generations/S");
        assert_eq!(
            argv[argv.len() - 2..],
            ["/run/v/".to_string(), "bk@h:/srv/b/current".to_string()]
        );
    }
}
