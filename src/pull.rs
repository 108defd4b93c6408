//! Pull mode's forced command (`snapveil serve-pull JOB` in `authorized_keys`): which
//! requests a backup server may make ([`parse_request`]: an `rsync --server --sender`
//! read below the job's view, nothing else), and one pull as a run ([`serve`]: lock →
//! pre-snapshot hooks → snapshot → post-snapshot hooks → the view → rsync over the ssh
//! channel → unmount → release → post-backup or on-failure hooks → status).
//!
//! It owns neither the snapshot → view sequence (`job::take_snapshot`,
//! `job::mount_view`) nor the rsync protocol: rsync itself serves the request, with the
//! view as its working directory and the ssh channel as its stdin and stdout. Snapveil's
//! own output never reaches that channel: the command line tool moves its stdout onto
//! stderr before anything runs (`commands::serve_pull`).

use crate::config::{Config, Job, Phase};
use crate::exec::{Cmd, Exit, Relay, Runner};
use crate::hooks::{self, HookEnv};
use crate::job::{self, Held};
use crate::lock::JobLock;
use crate::snapshot;
use crate::status::{self, RunResult, RunStatus};
use anyhow::{bail, Context, Result};
use chrono::{SecondsFormat, Utc};
use std::path::Path;
use std::time::Instant;

/// Why a request was refused; the message names the offending word.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("no command: this key only serves `rsync --server --sender` pulls")]
    Empty,
    #[error("not an rsync pull: {0}")]
    NotRsync(String),
    #[error("shell syntax is not allowed: {0}")]
    Shell(String),
    #[error("rsync without --server --sender (it would write here, or is not a pull)")]
    NotSender,
    #[error("rsync option {0:?} is not allowed in a pull")]
    Option(String),
    #[error("path {0:?} leaves the view")]
    Escape(String),
    #[error("no path to read")]
    NoPath,
    #[error("bad {prefix} argument {arg:?}")]
    Prefix { prefix: String, arg: String },
}

/// A checked request: an optional `nice`/`ionice` prefix, rsync's server options, and
/// the paths, relative to the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub prefix: Vec<String>,
    pub options: Vec<String>,
    pub paths: Vec<String>,
}

/// Splits a command line into words the way a POSIX shell would for plain words,
/// quotes and backslashes (rsync ≥ 3.2.4 backslash-escapes special characters in its
/// remote args), refusing everything that would make the shell do more: expansions,
/// globs, redirections, separators.
fn split_words(line: &str) -> Result<Vec<String>, Refused> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\\' => {
                let n = chars
                    .next()
                    .ok_or_else(|| Refused::Shell("a trailing backslash".into()))?;
                if n == '\n' {
                    return Err(Refused::Shell("a newline".into()));
                }
                cur.push(n);
                in_word = true;
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err(Refused::Shell("an unterminated quote".into())),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(n @ ('"' | '\\')) => cur.push(n),
                            Some(n @ ('$' | '`')) => {
                                return Err(Refused::Shell(format!("{n:?} in double quotes")))
                            }
                            Some(n) => {
                                cur.push('\\');
                                cur.push(n);
                            }
                            None => return Err(Refused::Shell("an unterminated quote".into())),
                        },
                        Some(c @ ('$' | '`')) => {
                            return Err(Refused::Shell(format!("{c:?} in double quotes")))
                        }
                        Some(c) => cur.push(c),
                        None => return Err(Refused::Shell("an unterminated quote".into())),
                    }
                }
            }
            ';' | '&' | '|' | '<' | '>' | '(' | ')' | '$' | '`' | '\n' | '*' | '?' | '[' | '{'
            | '}' | '#' => {
                return Err(Refused::Shell(format!("{c:?}")));
            }
            '~' if !in_word => return Err(Refused::Shell("'~'".into())),
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Long options a pull server sends that only describe what to read and how to encode
/// it (rsnapshot, BackupPC, plain `rsync -a`); `--delete*` and friends are there
/// because clients pass them to the sender too, which ignores them.
const LONG_FLAGS: &[&str] = &[
    "numeric-ids",
    "relative",
    "no-relative",
    "no-implied-dirs",
    "delete",
    "delete-excluded",
    "delete-before",
    "delete-during",
    "delete-after",
    "delete-delay",
    "ignore-errors",
    "force",
    "perms",
    "owner",
    "group",
    "devices",
    "specials",
    "links",
    "hard-links",
    "times",
    "atimes",
    "crtimes",
    "open-noatime",
    "recursive",
    "acls",
    "xattrs",
    "sparse",
    "one-file-system",
    "checksum",
    "whole-file",
    "no-whole-file",
    "size-only",
    "ignore-times",
    "copy-dirlinks",
    "keep-dirlinks",
    "safe-links",
    "copy-unsafe-links",
    "compress",
    "no-inc-recursive",
    "inc-recursive",
    "dirs",
    "executability",
    "super",
    "fake-super",
    "omit-dir-times",
    "omit-link-times",
    "itemize-changes",
    "stats",
    "human-readable",
    "progress",
    "partial",
    "inplace",
    "append",
    "existing",
    "ignore-existing",
    "prune-empty-dirs",
    "list-only",
    "dry-run",
    "verbose",
];

/// Long options with a value (`--NAME=VALUE`) that are just as harmless for a sender.
const LONG_VALUES: &[&str] = &[
    "block-size",
    "checksum-seed",
    "timeout",
    "contimeout",
    "bwlimit",
    "compress-level",
    "compress-choice",
    "zc",
    "zl",
    "checksum-choice",
    "cc",
    "modify-window",
    "max-size",
    "min-size",
    "max-delete",
    "iconv",
    "info",
    "debug",
    "log-format",
    "out-format",
    "max-alloc",
    "skip-compress",
    "stop-at",
    "stop-after",
];

/// Letters of rsync's short-option cluster that only shape a read; `e` (the protocol
/// compatibility string, e.g. `-logDtpre.iLsfxCIvu`) and `B` (`-B2048`) end the cluster
/// with their value.
/// Not here: `s` (secluded args would pass paths past this check), `b`, `f`, `M`, `T`.
const SHORT_FLAGS: &str = "vqcarRlLkKHpEAXogDtOJUNSnWxdmzCiyuPh8I";

fn check_option(opt: &str) -> Result<(), Refused> {
    let bad = || Refused::Option(opt.to_string());
    if let Some(long) = opt.strip_prefix("--") {
        let (name, value) = match long.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (long, None),
        };
        let ok = match value {
            None => LONG_FLAGS.contains(&name),
            Some(_) => LONG_VALUES.contains(&name),
        };
        return if ok { Ok(()) } else { Err(bad()) };
    }
    let Some(cluster) = opt.strip_prefix('-') else {
        return Err(bad());
    };
    if cluster.is_empty() {
        return Err(bad());
    }
    for (i, c) in cluster.char_indices() {
        if c == 'B' {
            // -B2048: the block size, as rsync writes --block-size in a cluster.
            let rest = &cluster[i + 1..];
            if !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()) {
                return Ok(());
            }
            return Err(bad());
        }
        if c == 'e' {
            // The rest is the compatibility string: a dot and flag letters.
            let rest = &cluster[i + 1..];
            if rest.chars().all(|c| c == '.' || c.is_ascii_alphanumeric()) {
                return Ok(());
            }
            return Err(bad());
        }
        if !SHORT_FLAGS.contains(c) {
            return Err(bad());
        }
    }
    Ok(())
}

/// A requested path relative to the view's root (`/`, `.` and `` name the root):
/// leading slashes dropped, `/./` (rsync's `--relative` marker) kept, `..` refused.
fn view_path(p: &str) -> Result<String, Refused> {
    if p.split('/').any(|c| c == "..") {
        return Err(Refused::Escape(p.to_string()));
    }
    let rel = p.trim_start_matches('/');
    Ok(if rel.is_empty() {
        ".".to_string()
    } else {
        rel.to_string()
    })
}

fn is_number(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    !s.is_empty() && s.len() <= 3 && s.chars().all(|c| c.is_ascii_digit())
}

/// Takes a `nice`/`ionice` prefix off the front of `words`, checked word by word.
fn take_prefix(words: &mut std::collections::VecDeque<String>) -> Result<Vec<String>, Refused> {
    let mut prefix = Vec::new();
    while let Some(w) = words.front().cloned() {
        let name = w.rsplit('/').next().unwrap_or(&w).to_string();
        if name != "nice" && name != "ionice" {
            break;
        }
        words.pop_front();
        prefix.push(name.clone());
        while let Some(a) = words.front().cloned() {
            if !a.starts_with('-') {
                break;
            }
            words.pop_front();
            let bad = || Refused::Prefix {
                prefix: name.clone(),
                arg: a.clone(),
            };
            // nice -n N | -N | --adjustment=N; ionice -c N | -n N | -t | -cN | -nN
            let (flag, inline) = if a.starts_with("--") {
                match a.split_once('=') {
                    Some((f, v)) => (f.to_string(), Some(v.to_string())),
                    None => (a.clone(), None),
                }
            } else if a.len() > 2 && !is_number(&a) {
                (a[..2].to_string(), Some(a[2..].to_string()))
            } else {
                (a.clone(), None)
            };
            let takes_value = match (name.as_str(), flag.as_str()) {
                ("nice", "-n" | "--adjustment") => true,
                ("ionice", "-c" | "-n" | "--class" | "--classdata") => true,
                ("ionice", "-t" | "--ignore") if inline.is_none() => false,
                ("nice", f) if is_number(f) => false,
                _ => return Err(bad()),
            };
            if takes_value {
                let v = match inline {
                    Some(v) => v,
                    None => words.pop_front().ok_or_else(bad)?,
                };
                if !is_number(&v) {
                    return Err(bad());
                }
                prefix.push(flag);
                prefix.push(v);
            } else {
                prefix.push(flag);
            }
        }
    }
    Ok(prefix)
}

/// Checks `SSH_ORIGINAL_COMMAND`: `[nice …] [ionice …] rsync --server --sender OPTIONS
/// . PATH...`, the options from a read-only allow list, the paths below the view.
///
/// # Errors
/// [`Refused`], naming what is not allowed.
pub fn parse_request(line: &str) -> Result<PullRequest, Refused> {
    let mut words: std::collections::VecDeque<String> = split_words(line)?.into();
    if words.is_empty() {
        return Err(Refused::Empty);
    }
    let prefix = take_prefix(&mut words)?;
    match words.pop_front() {
        Some(w) if w == "rsync" || (w.starts_with('/') && w.ends_with("/rsync")) => {}
        Some(w) => return Err(Refused::NotRsync(w)),
        None => return Err(Refused::NotRsync(line.to_string())),
    }
    let mut options = Vec::new();
    let (mut server, mut sender) = (false, false);
    loop {
        match words.pop_front() {
            None => return Err(Refused::NoPath),
            Some(w) if w == "." => break,
            Some(w) if w == "--server" => server = true,
            Some(w) if w == "--sender" => sender = true,
            Some(w) => {
                check_option(&w)?;
                options.push(w);
            }
        }
    }
    if !(server && sender) {
        return Err(Refused::NotSender);
    }
    if words.is_empty() {
        return Err(Refused::NoPath);
    }
    let paths = words
        .into_iter()
        .map(|p| view_path(&p))
        .collect::<Result<_, _>>()?;
    Ok(PullRequest {
        prefix,
        options,
        paths,
    })
}

impl PullRequest {
    /// The rsync that serves the request: the configured binary (never the requested
    /// path), run in the view, behind the requested `nice`/`ionice`.
    pub fn command(&self, rsync: &Path, view: &Path) -> Cmd {
        let rsync_args = ["--server".into(), "--sender".into()]
            .into_iter()
            .chain(self.options.iter().cloned())
            .chain(std::iter::once(".".to_string()))
            .chain(self.paths.iter().cloned());
        let cmd = match self.prefix.split_first() {
            Some((p, rest)) => Cmd::new(p)
                .args(rest)
                .arg(rsync)
                .args(rsync_args.collect::<Vec<_>>()),
            None => Cmd::new(rsync).args(rsync_args.collect::<Vec<_>>()),
        };
        cmd.current_dir(view)
    }
}

/// Serves one pull of `job` as a run: its lock, hooks, snapshot and view, then rsync
/// over `channel`; everything released on every way out; status recorded like a push.
pub fn serve(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    req: &PullRequest,
    channel: Relay,
) -> RunStatus {
    let stamp = snapshot::now_stamp();
    let started = Utc::now();
    let t0 = Instant::now();
    let span = tracing::info_span!("pull", job = %job.name, stamp = %stamp);
    let _e = span.enter();
    tracing::info!(source = %job.source, paths = ?req.paths, "serving a pull");
    let mut env = HookEnv::default();
    env.set("SNAPVEIL_JOB", &job.name);
    env.set("SNAPVEIL_SOURCE", job.source.to_string());
    env.set("SNAPVEIL_TARGET", "pull");
    env.set("SNAPVEIL_STAMP", &stamp);
    let finish = |result: RunResult, error: Option<String>, consistent: bool| RunStatus {
        job: job.name.clone(),
        stamp: stamp.clone(),
        result,
        started: started.to_rfc3339_opts(SecondsFormat::Secs, true),
        finished: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        duration_s: (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        bytes_sent: 0,
        files_transferred: 0,
        consistent,
        generations: None,
        error,
        raw: None,
    };
    let lock = match JobLock::acquire(&cfg.state_dir, &job.name) {
        Ok(l) => l,
        Err(e) => {
            // The status file belongs to the run holding the lock.
            tracing::error!("{e}");
            return finish(RunResult::Failure, Some(e.to_string()), false);
        }
    };
    let mut held = Held::default();
    let mut consistent = false;
    let result = pull_steps(
        runner,
        cfg,
        job,
        req,
        channel,
        &stamp,
        &mut env,
        &mut held,
        &mut consistent,
    );
    let errs = held.release();
    let result = match (result, errs.is_empty()) {
        (Ok(v), true) => Ok(v),
        (Ok(_), false) => Err(anyhow::anyhow!("cleanup failed: {}", errs.join("; "))),
        (Err(e), _) => Err(e),
    };
    let (res, error) = match result {
        Ok(vanished) => {
            env.set("SNAPVEIL_RESULT", "success");
            match hooks::run_phase(runner, &job.hooks, Phase::PostBackup, &env) {
                Ok(()) if vanished => (RunResult::Warning, None),
                Ok(()) => (RunResult::Success, None),
                Err(e) => (RunResult::Failure, Some(format!("pull done, but {e}"))),
            }
        }
        Err(e) => (
            RunResult::Failure,
            Some(job::on_failure(runner, job, &mut env, &e)),
        ),
    };
    let st = finish(res, error, consistent);
    if let Err(e) = status::save(&cfg.state_dir, &st) {
        tracing::error!(state_dir = %cfg.state_dir.display(), "cannot write status: {e}");
    }
    let names: Vec<String> = cfg.jobs.iter().map(|j| j.name.clone()).collect();
    if let Err(e) = status::write_prometheus(&cfg.state_dir, &names) {
        tracing::warn!("cannot write the Prometheus textfile: {e}");
    }
    tracing::info!(result = %st.result, duration_s = st.duration_s, "pull finished");
    drop(lock);
    st
}

/// The steps under the lock; true when rsync reported vanished files (exit 24).
#[allow(clippy::too_many_arguments)]
fn pull_steps<'a>(
    runner: &'a dyn Runner,
    cfg: &Config,
    job: &Job,
    req: &PullRequest,
    channel: Relay,
    stamp: &str,
    env: &mut HookEnv,
    held: &mut Held<'a>,
    consistent: &mut bool,
) -> Result<bool> {
    if job.mode == crate::config::Mode::ZfsRaw {
        bail!("mode zfs-raw has no encrypted view to pull");
    }
    // Keys first: a wrong password must fail before anything is frozen.
    let key = crate::crypto::KeyConfig::load(&job.key_config).context("loading the key config")?;
    let master = key
        .unlock_with_passfile(&job.passfile)
        .context("unlocking the key config")?;
    for what in job::cleanup_leftovers(runner, cfg, job)? {
        tracing::warn!("removed {what}, left by an earlier run");
    }
    let mp = job::view_mountpoint(&cfg.state_dir, &job.name);
    job::check_cancel()?;
    let snap_path = job::freeze(runner, cfg, job, stamp, env, held)?;
    *consistent = held.snapshot.as_ref().is_some_and(|s| s.consistent());
    job::check_cancel()?;
    let v = job::mount_view(job, &snap_path, *consistent, &mp, key, master)
        .context("mounting the encrypted view")?;
    held.view = Some(v);
    let cmd = req
        .command(&cfg.tools.rsync, &mp)
        .relay(channel.stdin, channel.stdout)
        .cancellable(0);
    tracing::info!(cmd = %cmd, "serving the request");
    let out = runner
        .output(&cmd)
        .map_err(|e| crate::exec::CommandError::spawn(&cmd, e))?;
    let vanished = match out.exit {
        Exit::Code(0) => false,
        Exit::Code(24) => {
            tracing::warn!("rsync: some files vanished (exit 24)");
            true
        }
        Exit::Cancelled => bail!("interrupted by {}", crate::signals::last_signal_name()),
        e => bail!("rsync serving the pull failed ({e}): the server's copy is incomplete"),
    };
    if let Some(s) = held.snapshot.as_ref() {
        s.verify()
            .map_err(|e| anyhow::anyhow!(snapshot::error_chain(&e)))
            .context("the snapshot did not stay valid during the pull")?;
    }
    Ok(vanished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> PullRequest {
        parse_request(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn refused(line: &str) -> String {
        match parse_request(line) {
            Ok(r) => panic!("accepted {line}: {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// What rsync 3.x clients send (recorded with a fake ssh that prints the remote
    /// command): plain `rsync -a`, rsnapshot's and BackupPC's option sets, a server
    /// with an ionice/nice --rsync-path, and rsync's escaping of a blank.
    #[test]
    fn real_pull_requests_are_accepted() {
        let r = ok("rsync --server --sender -logDtpre.iLsfxCIvu . /");
        assert_eq!(r.paths, ["."]);
        assert_eq!(r.options, ["-logDtpre.iLsfxCIvu"]);
        assert!(r.prefix.is_empty());
        let r = ok("rsync --server --sender -logDtprRe.iLsfxCIvu --numeric-ids . /home/");
        assert_eq!(r.paths, ["home/"]);
        ok("rsync --server --sender -lHogDtpre.iLsfxCIvu -B2048 --numeric-ids . /");
        ok("/usr/bin/rsync --server --sender -lHogDtpre.iLsfxCIvu --block-size=2048 --numeric-ids --delete-excluded . /");
        let r = ok("ionice -c3 nice -n19 rsync --server --sender -vlogDtprze.iLsfxCIvu . /");
        assert_eq!(r.prefix, ["ionice", "-c", "3", "nice", "-n", "19"]);
        let r = ok("nice -n 10 rsync --server --sender -lHogDtpAXrce.iLsfxCIvu --timeout=30 --bwlimit=100 --inplace . /a\\ dir/f");
        assert_eq!(r.paths, ["a dir/f"]);
        let r = ok("rsync --server --sender -logDtprRe.iLsfxCIvu . /home/./user 'x y'");
        assert_eq!(r.paths, ["home/./user", "x y"]);
        let cmd = r.command(Path::new("/usr/bin/rsync"), Path::new("/v"));
        assert_eq!(
            cmd.argv(),
            [
                "/usr/bin/rsync",
                "--server",
                "--sender",
                "-logDtprRe.iLsfxCIvu",
                ".",
                "home/./user",
                "x y"
            ]
        );
        assert_eq!(cmd.get_cwd(), Some(std::ffi::OsStr::new("/v")));
        let cmd = ok("nice -n19 rsync --server --sender -r . /")
            .command(Path::new("rsync"), Path::new("/v"));
        assert_eq!(
            cmd.argv(),
            ["nice", "-n", "19", "rsync", "--server", "--sender", "-r", ".", "."]
        );
    }

    #[test]
    fn writes_escapes_and_shells_are_refused() {
        assert!(refused("rsync --server -logDtpre.iLsfxCIvu . /x/")
            .contains("without --server --sender"));
        assert!(
            refused("rsync --server --sender -logDtpre.iLsfxCIvu --remove-source-files . /")
                .contains("\"--remove-source-files\"")
        );
        assert!(refused("rsync --server --sender -slogDtpre.iLsfxCIvu")
            .contains("\"-slogDtpre.iLsfxCIvu\""));
        assert!(
            refused("rsync --server --sender -logDtpre.iLsfxCIvu . /../etc")
                .contains("leaves the view")
        );
        assert!(refused("rsync --server --sender -r . a/../../b").contains("leaves the view"));
        assert!(refused("rsync --server --sender -r . /a/f*").contains("'*'"));
        assert!(refused("rsync --server --sender -r . /; id").contains("';'"));
        assert!(refused("rsync --server --sender -r . $(id)").contains("'$'"));
        assert!(refused("rsync --server --sender -r . \"$HOME\"").contains("'$'"));
        assert!(refused("rsync --server --sender -r . ~root").contains("'~'"));
        assert!(refused("cat /etc/shadow").contains("not an rsync pull: cat"));
        assert!(refused("sh -c 'rsync --server --sender . /'").contains("not an rsync pull: sh"));
        assert!(refused("/tmp/rsync-evil --server --sender -r . /").contains("not an rsync pull"));
        assert!(refused("").contains("no command"));
        assert!(refused("rsync --server --sender -r").contains("no path"));
        assert!(refused("rsync --server --sender -r .").contains("no path"));
        assert!(
            refused("rsync --server --sender --files-from=/etc/x -r . /").contains("--files-from")
        );
        assert!(refused("rsync --server --sender --log-file=/tmp/x -r . /").contains("--log-file"));
        assert!(refused("rsync --server --sender -r --write-batch=x . /").contains("--write-batch"));
        assert!(refused("nice -n 5; rsync --server --sender -r . /").contains("';'"));
        assert!(refused("nice -n x rsync --server --sender -r . /").contains("bad nice argument"));
        assert!(
            refused("ionice -p 1 rsync --server --sender -r . /").contains("bad ionice argument")
        );
        assert!(refused("rsync --daemon --server --sender -r . /").contains("--daemon"));
    }
}
