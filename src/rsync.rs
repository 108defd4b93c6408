//! The transfer: rsync of the encrypted view to `TARGET/current/`, with replaced and
//! deleted files moved to `TARGET/generations/STAMP/` (`--backup-dir`, relative to the
//! destination so the same line works for local, ssh and rsync-daemon targets), and the
//! small uploads and listings around it.
//!
//! rsync's exit code 24 (files vanished during the transfer) is a warning, any other
//! non-zero a failure; a failed transfer leaves `current/` as rsync left it and the next
//! run completes it.

use crate::config::{Target, Tools};
use crate::exec::{Cmd, Exit, Runner};
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

/// The base command: rsync with our ssh options for ssh targets.
pub fn base(tools: &Tools, target: &Target, ssh_args: &[String]) -> Cmd {
    let mut c = Cmd::new(&tools.rsync).env("LC_ALL", "C");
    if matches!(target, Target::Ssh { .. }) {
        let mut e = tools.ssh.to_string_lossy().into_owned();
        for a in ssh_args {
            e.push(' ');
            e.push_str(&shell_quote(a));
        }
        c = c.arg("-e").arg(e);
    }
    c
}

fn shell_quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

/// The transfer command line (`view` is the mounted encrypted view).
pub fn transfer_cmd(
    tools: &Tools,
    target: &Target,
    ssh_args: &[String],
    extra: &[String],
    view: &Path,
    stamp: &str,
) -> Cmd {
    base(tools, target, ssh_args)
        .args([
            "--archive",
            "--numeric-ids",
            "--delete",
            "--delete-excluded",
            "--mkpath",
            "--stats",
            "--out-format=>%n",
        ])
        .arg("--backup")
        .arg(format!("--backup-dir={}", target.backup_dir(stamp)))
        .args(extra)
        .arg(format!("{}/", view.display()))
        .arg(target.rsync_dest("current"))
}

/// Runs the transfer; on a terminal shows a one-line progress. rsync is
/// [`Cmd::cancellable`]: a terminating signal stops it (SIGTERM to its process group)
/// through the runner, the same way as hooks.
///
/// rsync's stderr is logged only when it does not go into the error (success, exit 24,
/// cancellation): a failure shows it once, in the error.
///
/// # Errors
/// rsync failing (other than exit 24), or cancellation.
pub fn transfer(runner: &dyn Runner, cmd: &Cmd, target: &Target) -> Result<Outcome, RsyncError> {
    let cmd = cmd.clone().cancellable(0);
    let mut child = runner.spawn(&cmd).map_err(RsyncError::Spawn)?;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut stats_text = String::new();
    let mut files = 0u64;
    while let Ok(Some(line)) = child.read_line() {
        let l = String::from_utf8_lossy(&line);
        if let Some(name) = l.strip_prefix('>') {
            files += 1;
            if tty {
                let n: String = name.trim_end().chars().take(60).collect();
                eprint!("\r\x1b[2K  {files} files sent, {n}");
            }
        } else {
            stats_text.push_str(&l);
        }
    }
    if tty && files > 0 {
        eprintln!();
    }
    let out = child.wait().map_err(RsyncError::Spawn)?;
    stats_text.push_str(&String::from_utf8_lossy(&out.stdout));
    let stderr = crate::exec::tail(&out.stderr, 20);
    let log_stderr = || {
        for l in stderr.lines() {
            tracing::warn!(target: "snapveil::rsync", "rsync: {l}");
        }
    };
    match out.exit {
        Exit::Cancelled => {
            log_stderr();
            Err(RsyncError::Cancelled {
                target: target.to_string(),
            })
        }
        Exit::Code(0) => {
            log_stderr();
            Ok(Outcome {
                stats: parse_stats(&stats_text),
                vanished: false,
            })
        }
        Exit::Code(24) => {
            log_stderr();
            tracing::warn!("some files vanished during the transfer (rsync exit 24)");
            Ok(Outcome {
                stats: parse_stats(&stats_text),
                vanished: true,
            })
        }
        exit => Err(RsyncError::Failed {
            target: target.to_string(),
            exit,
            stderr,
        }),
    }
}

/// Uploads one small local file to `TARGET/sub` (e.g. `runs/STAMP.json`).
///
/// # Errors
/// rsync failing.
pub fn upload(
    runner: &dyn Runner,
    tools: &Tools,
    target: &Target,
    ssh_args: &[String],
    file: &Path,
    sub: &str,
) -> Result<(), RsyncError> {
    base(tools, target, ssh_args)
        .args(["--mkpath", "--times", "--chmod=F644"])
        .arg(file)
        .arg(target.rsync_dest(sub))
        .run_checked(runner)?;
    Ok(())
}

/// One entry of `rsync --list-only`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub is_dir: bool,
    pub size: u64,
}

/// Parses `rsync --list-only` lines: `drwxr-xr-x          4,096 2026/11/24 12:00:00 NAME`.
pub fn parse_list(out: &str) -> Vec<Listed> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 5 {
                return None;
            }
            let perms = f[0];
            // Name is everything after the time column.
            let idx = l.find(f[3])? + f[3].len();
            let name = l[idx..].trim_start().to_string();
            if name == "." || name.is_empty() {
                return None;
            }
            Some(Listed {
                name,
                is_dir: perms.starts_with('d'),
                size: num(f[1]).unwrap_or(0),
            })
        })
        .collect()
}

/// Lists a directory below the target (`sub` like `generations`). A missing directory
/// lists as empty.
///
/// # Errors
/// rsync failing for another reason than the directory not existing.
pub fn list(
    runner: &dyn Runner,
    tools: &Tools,
    target: &Target,
    ssh_args: &[String],
    sub: &str,
) -> Result<Vec<Listed>, RsyncError> {
    let cmd = base(tools, target, ssh_args)
        .arg("--list-only")
        .arg(target.rsync_dest(&format!("{sub}/")));
    let out = runner.output(&cmd).map_err(RsyncError::Spawn)?;
    match out.exit {
        Exit::Code(0) => Ok(parse_list(&out.stdout_str())),
        // 23: partial transfer, which is how a missing source directory ends; 12: rrsync
        // (a key restricted to `command="rrsync DIR"`) refuses a path it cannot resolve
        // before rsync starts ("post-realpath open failed ... No such file or directory").
        Exit::Code(23 | 12) if out.stderr_str().contains("No such file or directory") => {
            Ok(Vec::new())
        }
        exit => Err(RsyncError::Failed {
            target: target.to_string(),
            exit,
            stderr: out.stderr_str(),
        }),
    }
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
            parse_list(l),
            vec![
                Listed {
                    name: "20261124T120000Z".into(),
                    is_dir: true,
                    size: 4096
                },
                Listed {
                    name: "a b".into(),
                    is_dir: false,
                    size: 12
                }
            ]
        );
    }

    #[test]
    fn transfer_line_keeps_generations_beside_current() {
        let t = Tools {
            rsync: "rsync".into(),
            ssh: "ssh".into(),
            snapshot: Default::default(),
        };
        let target = Target::Ssh {
            user: Some("bk".into()),
            host: "h".into(),
            path: "/srv/b".into(),
        };
        let c = transfer_cmd(
            &t,
            &target,
            &["-p".into(), "2222".into()],
            &["--bwlimit=1M".into()],
            Path::new("/run/v"),
            "20261124T010000Z",
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
