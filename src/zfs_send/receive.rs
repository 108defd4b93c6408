//! Raw ZFS mode to a `zfs://` target: `zfs send [-w] [-R] [-i|-I BASE] DS@SNAP` piped
//! through snapveil into `ssh [-p PORT] [USER@]HOST zfs receive -s -u DEST` (or a local
//! `zfs receive` for `zfs:///POOL/PATH`), never with `-F` unless the job sets `force`.
//!
//! The base is matched by `guid`, not by name: the newest snapshot DEST holds whose guid
//! the source still has as a snapshot or a bookmark. A DEST with snapshots but none in
//! common is refused (nothing there is overwritten). An interrupted receive leaves
//! `receive_resume_token` on DEST (in a recursive job, on the child it was in); the next
//! run resumes it first (`zfs send -t`), and when the source no longer has what the token
//! names, aborts it (`zfs receive -A`) with a warning and sends normally. A replication
//! stream cut half way is sent again before the next increment ([`complete_tree`]).
//! After a good send, this job's snapshots on DEST are pruned by the job's retention
//! policy, always keeping the newest common one.
//!
//! Does not own: the source snapshot and its bookmark ([`super::after_send`]), stream
//! files on directory targets (the rest of [`super`]).

use crate::config::{Job, RawOptions};
use crate::exec::{shell_line, Cmd, CommandError, Runner};
use crate::target::ZfsAddress;
use std::collections::BTreeMap;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0}")]
    Command(#[from] CommandError),
    #[error(
        "{dataset} is not natively encrypted: a zfs:// target would receive it as plaintext, \
         and snapveil never sends an unencrypted stream; back it up to a directory target \
         (stream files in age), or give it native encryption (zfs create -o encryption=on)"
    )]
    Plain { dataset: String },
    #[error(
        "{dest} holds snapshots ({have}), but none that {dataset} still has (as a snapshot \
         or bookmark, by guid): snapveil will not overwrite it. Destroy it on the target or \
         give the job another target"
    )]
    NoCommon {
        dest: String,
        dataset: String,
        have: String,
    },
    #[error("{what}: {err}")]
    Io { what: String, err: io::Error },
    #[error("unexpected output of `{cmd}`: {line:?}")]
    Parse { cmd: String, line: String },
    #[error("no snapshot {wanted:?} of this job on {dest} (it has: {have})")]
    NoSuchPoint {
        wanted: String,
        dest: String,
        have: String,
    },
    #[error(
        "the first transfer into {dest} stopped before {missing} received anything: an \
         increment cannot create them, and zfs receive takes the tree again only into an \
         empty place (nothing there was changed). Destroy it on the target (zfs destroy -r) \
         and run again, or set force = true in the job to have snapveil do that (only while \
         the target holds nothing the source lacks)"
    )]
    FirstTreeCut { dest: String, missing: String },
    #[error(
        "{dest} holds {snap}, which the source does not have (by guid): force = true \
         destroys a half-received tree only when nothing there would be lost"
    )]
    WouldLose { dest: String, snap: String },
    #[error("{0} already exists: restore into a new dataset (nothing was changed)")]
    IntoExists(String),
}

/// A snapshot on the target (short name, after `@`), in creation order by `createtxg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSnap {
    pub name: String,
    pub guid: u64,
    pub createtxg: u64,
}

/// The target's snapshots as a run found them: DEST's own, and for a recursive job those
/// of the datasets under DEST, by path relative to DEST (`logs`, `logs/old`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnTarget {
    pub own: Vec<TargetSnap>,
    pub children: BTreeMap<String, Vec<TargetSnap>>,
}

/// `ds` relative to `root`: `""` for `root` itself, `a/b` for `root/a/b`, `None` outside.
fn relative<'a>(root: &str, ds: &'a str) -> Option<&'a str> {
    if ds == root {
        return Some("");
    }
    ds.strip_prefix(root)?.strip_prefix('/')
}

/// A snapshot or bookmark of the source: `DS@NAME` or `DS#NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntry {
    pub name: String,
    pub guid: u64,
}

impl SourceEntry {
    pub fn is_bookmark(&self) -> bool {
        self.name.contains('#')
    }
}

/// The receiving side: runs `zfs` there, over ssh or here.
pub struct Receiver<'a> {
    runner: &'a dyn Runner,
    /// `zfs` on this host (the sender, and the receiver of a local target).
    zfs: std::path::PathBuf,
    /// The ssh program and the job's `ssh_args`.
    ssh: Vec<String>,
    pub addr: &'a ZfsAddress,
}

impl<'a> Receiver<'a> {
    pub fn new(
        runner: &'a dyn Runner,
        zfs: &std::path::Path,
        ssh: Vec<String>,
        addr: &'a ZfsAddress,
    ) -> Self {
        Receiver {
            runner,
            zfs: zfs.to_path_buf(),
            ssh,
            addr,
        }
    }

    /// The receiver of a configured job's `zfs://` target.
    pub fn for_job(
        runner: &'a dyn Runner,
        cfg: &crate::config::Config,
        job: &Job,
        addr: &'a ZfsAddress,
    ) -> Self {
        let mut ssh = vec![cfg.tools.ssh.to_string_lossy().into_owned()];
        ssh.extend(job.ssh_args.iter().cloned());
        Receiver::new(runner, &cfg.tools.snapshot.zfs, ssh, addr)
    }

    /// `zfs ARGS` on the target: over ssh the remote command is one shell-quoted line,
    /// so a dataset name reaches `zfs` as one argument whatever the remote shell is.
    pub fn zfs(&self, args: &[&str]) -> Cmd {
        let Some(dest) = self.addr.ssh_dest() else {
            return Cmd::new(&self.zfs).args(args);
        };
        let (prog, opts) = self
            .ssh
            .split_first()
            .map(|(p, o)| (p.as_str(), o))
            .unwrap_or(("ssh", &[]));
        let mut cmd = Cmd::new(prog).args(opts);
        if let Some(p) = self.addr.port {
            cmd = cmd.args(["-p", &p.to_string()]);
        }
        let mut line = vec!["zfs"];
        line.extend_from_slice(args);
        cmd.arg(dest).arg(shell_line(&line))
    }

    fn dest(&self) -> &str {
        &self.addr.dataset
    }

    /// `zfs` on this host.
    fn local(&self) -> Cmd {
        Cmd::new(&self.zfs)
    }

    /// Runs `cmd` on the target: its output, or `None` when it failed because DEST does
    /// not exist (yet: the first run creates it).
    fn unless_missing(&self, cmd: &Cmd) -> Result<Option<crate::exec::Output>, ReceiveError> {
        let out = self
            .runner
            .output(cmd)
            .map_err(|e| CommandError::spawn(cmd, e))?;
        if out.exit.success() {
            return Ok(Some(out));
        }
        if out.stderr_str().contains("dataset does not exist") {
            return Ok(None);
        }
        Err(CommandError::failed(cmd, &out).into())
    }

    /// DEST's snapshots, oldest first; `None` when DEST does not exist.
    ///
    /// # Errors
    /// The listing failed for another reason, or did not parse.
    pub fn snapshots(&self) -> Result<Option<Vec<TargetSnap>>, ReceiveError> {
        Ok(self
            .list_snapshots(&["-d", "1"])?
            .map(|mut t| t.remove("").unwrap_or_default()))
    }

    /// The snapshots of DEST and of every dataset under it, by path relative to DEST
    /// (`""` for DEST itself), oldest first; `None` when DEST does not exist. What a
    /// recursive job checks a replication stream against: one cut in a child leaves DEST
    /// with the new snapshot and the children after it without.
    ///
    /// # Errors
    /// As [`Receiver::snapshots`].
    pub fn tree(&self) -> Result<Option<OnTarget>, ReceiveError> {
        Ok(self.list_snapshots(&["-r"])?.map(|mut t| OnTarget {
            own: t.remove("").unwrap_or_default(),
            children: t,
        }))
    }

    /// What a job looks at on the target, in one listing: DEST's snapshots, and for a
    /// recursive job those of the datasets under it ([`Receiver::tree`]).
    ///
    /// # Errors
    /// As [`Receiver::snapshots`].
    pub fn on_target(&self, recursive: bool) -> Result<Option<OnTarget>, ReceiveError> {
        if recursive {
            return self.tree();
        }
        Ok(self.snapshots()?.map(|own| OnTarget {
            own,
            children: BTreeMap::new(),
        }))
    }

    /// `zfs list -t snapshot DEPTH DEST` on the target, by dataset relative to DEST.
    fn list_snapshots(
        &self,
        depth: &[&str],
    ) -> Result<Option<BTreeMap<String, Vec<TargetSnap>>>, ReceiveError> {
        let mut args = vec![
            "list",
            "-H",
            "-p",
            "-o",
            "name,guid,createtxg",
            "-t",
            "snapshot",
        ];
        args.extend_from_slice(depth);
        args.push(self.dest());
        let cmd = self.zfs(&args);
        let Some(out) = self.unless_missing(&cmd)? else {
            return Ok(None);
        };
        let mut by_ds: BTreeMap<String, Vec<TargetSnap>> = BTreeMap::new();
        for line in out.stdout_str().lines().filter(|l| !l.is_empty()) {
            let bad = || ReceiveError::Parse {
                cmd: cmd.to_string(),
                line: line.to_string(),
            };
            let mut f = line.split('\t');
            let (Some(name), Some(guid), Some(txg)) = (f.next(), f.next(), f.next()) else {
                return Err(bad());
            };
            let Some((ds, short)) = name.split_once('@') else {
                return Err(bad());
            };
            let Some(rel) = relative(self.dest(), ds) else {
                continue;
            };
            by_ds.entry(rel.to_string()).or_default().push(TargetSnap {
                name: short.to_string(),
                guid: guid.parse().map_err(|_| bad())?,
                createtxg: txg.parse().map_err(|_| bad())?,
            });
        }
        for v in by_ds.values_mut() {
            v.sort_by_key(|s| s.createtxg);
        }
        Ok(Some(by_ds))
    }

    /// This job's snapshots (`snapveil-JOB-STAMP`) on the target, oldest first.
    ///
    /// # Errors
    /// As [`Receiver::snapshots`].
    pub fn job_snapshots(&self, job: &str) -> Result<Vec<TargetSnap>, ReceiveError> {
        Ok(self
            .snapshots()?
            .unwrap_or_default()
            .into_iter()
            .filter(|t| crate::snapshot::parse_name(job, &t.name).is_some())
            .collect())
    }

    /// DEST's `receive_resume_token`, if an interrupted receive left one.
    ///
    /// # Errors
    /// `zfs get` failed for another reason than a missing DEST.
    pub fn resume_token(&self) -> Result<Option<String>, ReceiveError> {
        let cmd = self.zfs(&[
            "get",
            "-H",
            "-p",
            "-o",
            "value",
            "receive_resume_token",
            self.dest(),
        ]);
        let Some(out) = self.unless_missing(&cmd)? else {
            return Ok(None);
        };
        let t = out.stdout_str().trim().to_string();
        Ok((!t.is_empty() && t != "-").then_some(t))
    }

    /// The resume tokens an interrupted receive left: DEST's alone, or for a recursive
    /// job those of every dataset under DEST too (a replication stream cut in a child
    /// leaves the token on that child), parents first, as `(dataset, token)`.
    ///
    /// # Errors
    /// As [`Receiver::resume_token`].
    pub fn resume_tokens(&self, recursive: bool) -> Result<Vec<(String, String)>, ReceiveError> {
        if !recursive {
            return Ok(self
                .resume_token()?
                .map(|t| (self.dest().to_string(), t))
                .into_iter()
                .collect());
        }
        let cmd = self.zfs(&[
            "get",
            "-H",
            "-p",
            "-r",
            "-t",
            "filesystem,volume",
            "-o",
            "name,value",
            "receive_resume_token",
            self.dest(),
        ]);
        let Some(out) = self.unless_missing(&cmd)? else {
            return Ok(Vec::new());
        };
        let mut v = Vec::new();
        for line in out.stdout_str().lines().filter(|l| !l.is_empty()) {
            let Some((ds, token)) = line.split_once('\t') else {
                return Err(ReceiveError::Parse {
                    cmd: cmd.to_string(),
                    line: line.to_string(),
                });
            };
            let token = token.trim();
            if relative(self.dest(), ds).is_some() && !token.is_empty() && token != "-" {
                v.push((ds.to_string(), token.to_string()));
            }
        }
        v.sort();
        Ok(v)
    }

    /// `zfs receive -s -u [-F] DEST` on the target.
    fn receive_cmd(&self, force: bool) -> Cmd {
        self.receive_into(self.dest(), force)
    }

    /// `zfs receive -s -u [-F] DATASET` on the target (DEST, or a child that resumes).
    fn receive_into(&self, dataset: &str, force: bool) -> Cmd {
        let mut args = vec!["receive", "-s", "-u"];
        if force {
            args.push("-F");
        }
        args.push(dataset);
        self.zfs(&args).cancellable(0)
    }

    /// `zfs destroy [-r] DEST@SNAP` on the target.
    fn destroy(&self, snap: &str, recursive: bool) -> Result<(), ReceiveError> {
        let full = format!("{}@{snap}", self.dest());
        let mut args = vec!["destroy"];
        if recursive {
            args.push("-r");
        }
        args.push(&full);
        self.zfs(&args).run_checked(self.runner)?;
        Ok(())
    }
}

/// The source's snapshots and bookmarks (one level), by `zfs list -t snapshot,bookmark`;
/// a ZFS that knows no bookmarks (zfs-fuse, old releases) is asked for snapshots alone.
///
/// # Errors
/// The listing failed or did not parse.
pub fn source_entries(
    runner: &dyn Runner,
    zfs: &std::path::Path,
    dataset: &str,
) -> Result<Vec<SourceEntry>, ReceiveError> {
    let list = |types: &str| source_list(zfs, types, &["-d", "1"], dataset);
    let mut cmd = list("snapshot,bookmark");
    let mut out = runner
        .output(&cmd)
        .map_err(|e| CommandError::spawn(&cmd, e))?;
    if !out.exit.success() && out.stderr_str().contains("bookmark") {
        tracing::debug!("no bookmarks here: {}", out.stderr_str().trim());
        cmd = list("snapshot");
        out = runner
            .output(&cmd)
            .map_err(|e| CommandError::spawn(&cmd, e))?;
    }
    if !out.exit.success() {
        return Err(CommandError::failed(&cmd, &out).into());
    }
    parse_entries(&cmd, &out)
}

/// `zfs list -H -p -o name,guid -t TYPES DEPTH DATASET` on the source.
fn source_list(zfs: &std::path::Path, types: &str, depth: &[&str], dataset: &str) -> Cmd {
    Cmd::new(zfs)
        .args(["list", "-H", "-p", "-o", "name,guid", "-t", types])
        .args(depth)
        .arg(dataset)
}

/// The `name<TAB>guid` lines of a `zfs list` of snapshots (and bookmarks).
fn parse_entries(cmd: &Cmd, out: &crate::exec::Output) -> Result<Vec<SourceEntry>, ReceiveError> {
    out.stdout_str()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let bad = || ReceiveError::Parse {
                cmd: cmd.to_string(),
                line: line.to_string(),
            };
            let (name, guid) = line.split_once('\t').ok_or_else(bad)?;
            Ok(SourceEntry {
                name: name.to_string(),
                guid: guid.trim().parse().map_err(|_| bad())?,
            })
        })
        .collect()
}

/// Where an increment starts: the source's `DS@X` or `DS#X`, and X on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    pub from: String,
    pub on_target: String,
}

/// The newest snapshot of the target whose guid the source still has, preferring the
/// source's snapshot to its bookmark (`-I` and `-R` increments need a snapshot).
/// `Ok(None)`: a full stream (the target holds nothing of this dataset yet).
///
/// # Errors
/// [`ReceiveError::NoCommon`]: the target holds snapshots, none in common.
pub fn pick_base(
    dest: &str,
    dataset: &str,
    on_target: &[TargetSnap],
    source: &[SourceEntry],
    recursive: bool,
) -> Result<Option<Base>, ReceiveError> {
    for t in on_target.iter().rev() {
        let mut same: Vec<&SourceEntry> = source.iter().filter(|s| s.guid == t.guid).collect();
        same.sort_by_key(|s| s.is_bookmark());
        let Some(s) = same.first() else { continue };
        if s.is_bookmark() && recursive {
            tracing::warn!(
                "{}: a recursive increment cannot start at a bookmark; looking for an older common snapshot",
                s.name
            );
            continue;
        }
        return Ok(Some(Base {
            from: s.name.clone(),
            on_target: t.name.clone(),
        }));
    }
    if on_target.is_empty() {
        return Ok(None);
    }
    Err(ReceiveError::NoCommon {
        dest: dest.to_string(),
        dataset: dataset.to_string(),
        have: on_target
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Whether a dataset may go to a `zfs://` target: only natively encrypted ones, sent raw
/// (the receiving host never has the key). `zfs receive` takes no age file, so a plain
/// dataset would arrive as plaintext: refused, as everywhere in raw mode.
///
/// # Errors
/// [`ReceiveError::Plain`].
pub fn raw_or_refuse(enc: Option<&(String, String)>, dataset: &str) -> Result<bool, ReceiveError> {
    match enc {
        Some(_) => Ok(true),
        None => Err(ReceiveError::Plain {
            dataset: dataset.to_string(),
        }),
    }
}

/// What went wrong in `send | receive`, the cause first.
fn pipe_error(
    send: &Cmd,
    sent: &crate::exec::Output,
    recv: &Cmd,
    received: &crate::exec::Output,
    copied: &io::Result<u64>,
) -> Option<ReceiveError> {
    let feed_broke = copied.as_ref().is_err();
    match (sent.exit.success(), received.exit.success()) {
        (true, true) => None,
        // The receiver went away first: zfs send only saw its closed pipe.
        (false, false) if feed_broke => Some(CommandError::failed(recv, received).into()),
        (false, _) => Some(CommandError::failed(send, sent).into()),
        (true, false) => Some(CommandError::failed(recv, received).into()),
    }
}

/// Runs `send`, feeding its stdout to `recv`; the bytes that went through.
///
/// # Errors
/// Either side failing (the cause named first), or the copy failing with both content.
fn pipe(runner: &dyn Runner, send: &Cmd, recv: &Cmd) -> Result<u64, ReceiveError> {
    let mut tx = runner
        .spawn(send)
        .map_err(|e| CommandError::spawn(send, e))?;
    let mut rx = runner
        .spawn(recv)
        .map_err(|e| CommandError::spawn(recv, e))?;
    let copied = match (tx.take_stdout(), rx.take_stdin()) {
        (Some(mut from), Some(mut to)) => {
            let r = super::copy(&mut from, &mut to);
            drop(to);
            drop(from);
            r
        }
        _ => Err(io::Error::other("no pipe to the child")),
    };
    let sent = tx.wait().map_err(|e| CommandError::spawn(send, e))?;
    let received = rx.wait().map_err(|e| CommandError::spawn(recv, e))?;
    if let Some(e) = pipe_error(send, &sent, recv, &received, &copied) {
        return Err(e);
    }
    copied.map_err(|err| ReceiveError::Io {
        what: format!("{send} | {recv}"),
        err,
    })
}

/// Whether `zfs send -t` failed because what the token names is gone from the source
/// (libzfs: "... used in the initial send no longer exists", "incremental source ... no
/// longer exists", "... is no longer the same snapshot ..."). Anything else is not
/// taken for it: the receive state is only ever aborted for this reason.
fn base_gone(e: &ReceiveError) -> bool {
    matches!(e, ReceiveError::Command(c) if c.stderr().contains("no longer exists")
        || c.stderr().contains("no longer the same snapshot"))
}

/// Before a run's send: completes each interrupted receive from its resume token (DEST's,
/// and for a recursive job its children's). When the source no longer has what a token
/// names, that partial state is aborted on the target (`zfs receive -A`, a warning) and
/// the run sends normally. Returns the bytes the resumes sent.
///
/// # Errors
/// A resume (or an abort) failed for any other reason.
pub fn resume(
    rx: &Receiver<'_>,
    opts: &RawOptions,
    recursive: bool,
) -> Result<Option<u64>, ReceiveError> {
    let mut sent = None;
    for (dataset, token) in rx.resume_tokens(recursive)? {
        tracing::info!(%dataset, "an interrupted receive left a resume token: resuming it first");
        let send = rx.local().args(["send", "-t", &token]).cancellable(0);
        match pipe(rx.runner, &send, &rx.receive_into(&dataset, opts.force)) {
            Ok(n) => {
                tracing::info!(bytes = n, %dataset, "the interrupted receive is complete");
                *sent.get_or_insert(0) += n;
            }
            Err(e) if base_gone(&e) => {
                let why = e.to_string();
                let why = why
                    .lines()
                    .find(|l| l.contains("no longer"))
                    .unwrap_or("")
                    .trim();
                tracing::warn!(
                    "cannot resume the interrupted receive into {dataset}: the source no \
                     longer has what it started from ({why}). Aborting it on the target (zfs \
                     receive -A {dataset}) and sending anew"
                );
                rx.zfs(&["receive", "-A", &dataset])
                    .run_checked(rx.runner)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Why the source's `snap` must outlive a send to this target that failed: a receive
/// left a resume token (the next run resumes it, which needs the snapshot), or the target
/// holds the snapshot already (a replication stream cut between two datasets, or a
/// receive that failed after it was complete), so the next run's increment must start
/// from it. `None`: nothing of it arrived, and the snapshot is nobody's base.
///
/// # Errors
/// Asking the target failed.
pub fn left_on_target(
    rx: &Receiver<'_>,
    recursive: bool,
    snap: &str,
) -> Result<Option<&'static str>, ReceiveError> {
    if !rx.resume_tokens(recursive)?.is_empty() {
        return Ok(Some("the target saved the interrupted receive"));
    }
    let has = rx
        .snapshots()?
        .unwrap_or_default()
        .iter()
        .any(|t| t.name == snap);
    Ok(has.then_some(if recursive {
        "the target holds it in part of the tree"
    } else {
        "the target holds it already"
    }))
}

/// What a run learned before its hooks: how the dataset goes (raw or, trusted, plain),
/// what a resumed receive sent, the target's snapshots (the send picks its base among
/// them: one listing per run, each costing an ssh round trip) and which of them are this
/// job's (a new stamp must be newer than each).
#[derive(Debug)]
pub struct Prepared {
    pub raw: bool,
    pub resumed: u64,
    pub on_target: OnTarget,
    pub contents: crate::target::Contents,
}

/// The steps of a run to a `zfs://` target before any hook freezes anything: refuse a
/// plain dataset, complete an interrupted
/// receive ([`resume`]), read the target's snapshots.
///
/// # Errors
/// As those steps.
pub fn prepare(
    rx: &Receiver<'_>,
    job: &Job,
    dataset: &str,
    enc: Option<&(String, String)>,
) -> Result<Prepared, ReceiveError> {
    let opts = job.raw.clone().unwrap_or_default();
    let raw = raw_or_refuse(enc, dataset)?;
    let recursive = job.snapshot.recursive;
    let resumed = resume(rx, &opts, recursive)?.unwrap_or(0);
    let mut contents = crate::target::Contents::default();
    let on_target = rx.on_target(recursive)?.unwrap_or_default();
    for t in &on_target.own {
        if let Some(stamp) = crate::snapshot::parse_name(&job.name, &t.name) {
            contents.note(stamp, format!("{}@{}", rx.dest(), t.name));
            contents.taken.insert(stamp.to_string());
        }
    }
    Ok(Prepared {
        raw,
        resumed,
        on_target,
        contents,
    })
}

/// What one send to a `zfs://` target did.
#[derive(Debug)]
pub struct Received {
    pub base: Option<Base>,
    pub bytes: u64,
}

/// Sends `DATASET@SNAP` to the target: the increment from the guid-matched base among
/// `on_target` (the target's snapshots as [`prepare`] listed them), or a full stream when
/// the target holds nothing of it yet. Should the target have changed since, `zfs
/// receive` refuses the stream and nothing is lost. A recursive job first completes a
/// replication stream an earlier run left half received ([`complete_tree`]).
///
/// # Errors
/// Listing the source, no common base, or the transfer failing.
pub fn send(
    rx: &Receiver<'_>,
    opts: &RawOptions,
    on_target: &OnTarget,
    dataset: &str,
    snap: &str,
    raw: bool,
    recursive: bool,
) -> Result<Received, ReceiveError> {
    let source = source_entries(rx.runner, &rx.zfs, dataset)?;
    let base = pick_base(
        &rx.addr.to_string(),
        dataset,
        &on_target.own,
        &source,
        recursive,
    )?;
    let mut bytes = 0;
    if recursive {
        if let Some(b) = &base {
            bytes += complete_tree(rx, opts, on_target, &source, dataset, b, raw)?;
        }
    }
    let mut send = rx.local().arg("send");
    if raw {
        send = send.arg("-w");
    }
    if recursive {
        send = send.arg("-R");
    }
    if let Some(b) = &base {
        let flag = if opts.send_intermediates && !b.from.contains('#') {
            "-I"
        } else {
            "-i"
        };
        send = send.args([flag, &b.from]);
        tracing::info!(from = %b.from, target_has = %b.on_target, "sending the increment");
    } else {
        tracing::info!("sending a full stream (the target holds nothing of {dataset} yet)");
    }
    let send = send.arg(format!("{dataset}@{snap}")).cancellable(0);
    bytes += pipe(rx.runner, &send, &rx.receive_cmd(opts.force))?;
    tracing::info!(bytes, dest = %rx.addr, "received on the target");
    Ok(Received { base, bytes })
}

/// The source's snapshots under `dataset` (`zfs list -t snapshot -r`), by dataset
/// relative to it.
///
/// # Errors
/// The listing failed or did not parse.
fn source_tree(
    runner: &dyn Runner,
    zfs: &std::path::Path,
    dataset: &str,
) -> Result<BTreeMap<String, Vec<SourceEntry>>, ReceiveError> {
    let cmd = source_list(zfs, "snapshot", &["-r"], dataset);
    let out = cmd.run_checked(runner)?;
    let mut by_ds: BTreeMap<String, Vec<SourceEntry>> = BTreeMap::new();
    for e in parse_entries(&cmd, &out)? {
        let ds = e.name.split_once('@').map_or(e.name.as_str(), |(ds, _)| ds);
        if let Some(rel) = relative(dataset, ds) {
            by_ds.entry(rel.to_string()).or_default().push(e);
        }
    }
    Ok(by_ds)
}

/// The source's datasets under DATASET that have snapshot `snap` while their replica on
/// the target does not (or holds another snapshot of that name), by relative path.
fn missing_children(
    snap: &str,
    source: &BTreeMap<String, Vec<SourceEntry>>,
    on_target: &OnTarget,
) -> Vec<String> {
    source
        .iter()
        .filter(|(rel, _)| !rel.is_empty())
        .filter_map(|(rel, entries)| {
            let want = entries
                .iter()
                .find(|e| e.name.split_once('@').map(|(_, s)| s) == Some(snap))?;
            let has = on_target
                .children
                .get(rel)
                .is_some_and(|v| v.iter().any(|t| t.name == snap && t.guid == want.guid));
            (!has).then(|| rel.clone())
        })
        .collect()
}

/// The datasets under DEST (relative paths) that lack `snap` although the source's
/// counterparts have it: what [`complete_tree`] would send again.
///
/// # Errors
/// Listing either side.
fn unfinished(
    rx: &Receiver<'_>,
    on_target: &OnTarget,
    dataset: &str,
    snap: &str,
) -> Result<Vec<String>, ReceiveError> {
    let tree = source_tree(rx.runner, &rx.zfs, dataset)?;
    Ok(missing_children(snap, &tree, on_target))
}

/// A replication stream (`zfs send -R`) is received dataset by dataset, parent first: cut
/// half way, it leaves DEST with the new snapshot and the children after the cut without
/// it, so the next increment from there would fail in those children for ever. When
/// `base` is such a snapshot, this sends the stream that made it once more, from the
/// newest earlier snapshot every dataset has (or in full): `zfs receive` keeps the
/// snapshots the target already has and adds the missing ones. Returns the bytes sent.
///
/// # Errors
/// Listing the source, or the transfer failing.
fn complete_tree(
    rx: &Receiver<'_>,
    opts: &RawOptions,
    on_target: &OnTarget,
    source: &[SourceEntry],
    dataset: &str,
    base: &Base,
    raw: bool,
) -> Result<u64, ReceiveError> {
    let tree = source_tree(rx.runner, &rx.zfs, dataset)?;
    let missing = missing_children(&base.on_target, &tree, on_target);
    if missing.is_empty() {
        return Ok(0);
    }
    let older = on_target
        .own
        .iter()
        .take_while(|t| t.name != base.on_target)
        .filter(|t| {
            let name = format!("{dataset}@{}", t.name);
            source.iter().any(|s| s.guid == t.guid && s.name == name)
        })
        .filter(|t| missing_children(&t.name, &tree, on_target).is_empty())
        .last();
    let missing = missing
        .iter()
        .map(|m| format!("{}/{m}", rx.dest()))
        .collect::<Vec<_>>()
        .join(", ");
    let Some(older) = older else {
        return first_tree_again(rx, opts, on_target, &tree, base, raw, &missing);
    };
    tracing::warn!(
        "the last transfer into {} stopped before {missing} received {}: sending it once \
         more first, from {} (the target keeps what it has)",
        rx.addr,
        base.on_target,
        older.name,
    );
    let mut send = rx.local().arg("send");
    if raw {
        send = send.arg("-w");
    }
    let from = format!("{dataset}@{}", older.name);
    let send = send.args(["-R", "-i", &from, &base.from]).cancellable(0);
    pipe(rx.runner, &send, &rx.receive_cmd(opts.force))
}

/// The first stream of a tree, cut before the children in `missing` were created: an
/// increment cannot create them, and `zfs receive` (even with `-F`: "destination has
/// snapshots") takes the whole tree again only into an empty place. Refused, unless the
/// job sets `force` and every snapshot there is one the source has (by guid), so that
/// nothing is lost: then DEST is destroyed on the target and the tree sent in full.
///
/// # Errors
/// [`ReceiveError::FirstTreeCut`], [`ReceiveError::WouldLose`], or the commands failing.
fn first_tree_again(
    rx: &Receiver<'_>,
    opts: &RawOptions,
    on_target: &OnTarget,
    source: &BTreeMap<String, Vec<SourceEntry>>,
    base: &Base,
    raw: bool,
    missing: &str,
) -> Result<u64, ReceiveError> {
    if !opts.force {
        return Err(ReceiveError::FirstTreeCut {
            dest: rx.addr.to_string(),
            missing: missing.to_string(),
        });
    }
    let own = std::iter::once(("", &on_target.own));
    let all = own.chain(on_target.children.iter().map(|(r, v)| (r.as_str(), v)));
    for (rel, snaps) in all {
        let has = source.get(rel);
        let unique = snaps
            .iter()
            .find(|t| !has.is_some_and(|h| h.iter().any(|e| e.guid == t.guid)));
        if let Some(t) = unique {
            let ds = if rel.is_empty() {
                rx.dest().to_string()
            } else {
                format!("{}/{rel}", rx.dest())
            };
            return Err(ReceiveError::WouldLose {
                dest: rx.addr.to_string(),
                snap: format!("{ds}@{}", t.name),
            });
        }
    }
    tracing::warn!(
        "the first transfer into {} stopped before {missing} received anything: destroying \
         what it left there (force = true; the source has all of it) and sending the tree \
         again",
        rx.addr
    );
    rx.zfs(&["destroy", "-r", rx.dest()])
        .run_checked(rx.runner)?;
    let mut send = rx.local().arg("send");
    if raw {
        send = send.arg("-w");
    }
    let send = send.args(["-R", &base.from]).cancellable(0);
    pipe(rx.runner, &send, &rx.receive_cmd(opts.force))
}

/// One of this job's snapshots on the target, and whether retention keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetDecision {
    pub snapshot: String,
    pub keep: bool,
    pub why: String,
}

/// This job's snapshots on the target, by the job's retention policy: the newest one the
/// source still has (the next increment's base) is always kept; snapshots that are not
/// this job's (`snapveil-JOB-STAMP`) are never touched. Destroys the others unless
/// `dry_run`. `Ok(None)`: the job has no retention rules.
///
/// # Errors
/// A bad policy, listing, or a destroy failing.
pub fn prune(
    rx: &Receiver<'_>,
    job: &Job,
    dataset: &str,
    dry_run: bool,
) -> anyhow::Result<Option<Vec<TargetDecision>>> {
    let Some(policy) = job.retention.policy()? else {
        return Ok(None);
    };
    let on_target = rx.snapshots()?.unwrap_or_default();
    let source = source_entries(rx.runner, &rx.zfs, dataset)?;
    let common = on_target
        .iter()
        .rev()
        .find(|t| source.iter().any(|s| s.guid == t.guid))
        .map(|t| t.name.clone());
    let points: Vec<crate::retention::RestorePoint> = on_target
        .iter()
        .filter_map(|t| {
            let stamp = crate::snapshot::parse_name(&job.name, &t.name)?;
            Some(crate::retention::RestorePoint {
                stamp: stamp.to_string(),
                time: crate::stamp::Stamp::parse(stamp)?.time(),
            })
        })
        .collect();
    let plan = crate::retention::plan(&points, &policy, &crate::retention::system_local);
    let mut out = Vec::new();
    for d in plan {
        let snapshot = crate::snapshot::snapshot_name(&job.name, &d.stamp);
        let is_base = common.as_deref() == Some(snapshot.as_str());
        let why = if d.keep {
            d.reasons
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        } else if is_base {
            "the next increment's base (newest in common with the source)".into()
        } else {
            "not kept by the policy".into()
        };
        let keep = d.keep || is_base;
        if !keep && !dry_run {
            rx.destroy(&snapshot, job.snapshot.recursive)?;
            tracing::info!("destroyed {}@{snapshot} on the target", rx.dest());
        }
        out.push(TargetDecision {
            snapshot,
            keep,
            why,
        });
    }
    Ok(Some(out))
}

/// `prune`'s report for a `zfs://` target.
pub fn report(dest: &ZfsAddress, decisions: &[TargetDecision], dry_run: bool) -> String {
    let mut s = String::new();
    let gone = if dry_run {
        "would destroy"
    } else {
        "destroyed"
    };
    for d in decisions {
        s.push_str(&format!(
            "{} {dest}@{} ({})\n",
            if d.keep { "keep" } else { gone },
            d.snapshot,
            d.why
        ));
    }
    let n = decisions.iter().filter(|d| !d.keep).count();
    s.push_str(&format!(
        "{n} snapshot(s) {gone}, {} kept\n",
        decisions.len() - n
    ));
    s
}

/// `snapveil list` of a `zfs://` job: every snapshot on DEST, newest first, with what it
/// is to this job; then a pending resume, if any.
///
/// # Errors
/// Listing either side.
pub fn listing(rx: &Receiver<'_>, job: &Job, dataset: &str) -> Result<String, ReceiveError> {
    let listed = rx.on_target(job.snapshot.recursive)?;
    let source = source_entries(rx.runner, &rx.zfs, dataset)?;
    let mut s = format!("target {}\n", rx.addr);
    let Some(listed) = listed else {
        s.push_str(&format!(
            "{} does not exist yet: the next run sends a full stream\n",
            rx.dest()
        ));
        return Ok(s);
    };
    let on_target = &listed.own;
    let common = on_target
        .iter()
        .rev()
        .find(|t| source.iter().any(|e| e.guid == t.guid))
        .map(|t| t.name.as_str());
    s.push_str(&format!("{:<40} {:>20}  NOTE\n", "SNAPSHOT", "GUID"));
    for t in on_target.iter().rev() {
        let mut note = Vec::new();
        if crate::snapshot::parse_name(&job.name, &t.name).is_none() {
            note.push("not this job's (never pruned)");
        }
        if Some(t.name.as_str()) == common {
            note.push("the next increment's base");
        }
        s.push_str(&format!(
            "{:<40} {:>20}  {}\n",
            t.name,
            t.guid,
            note.join("; ")
        ));
    }
    for (ds, _) in rx.resume_tokens(job.snapshot.recursive)? {
        s.push_str(&format!(
            "note: an interrupted receive into {ds} is pending (resume token): the next run resumes it\n"
        ));
    }
    if job.snapshot.recursive {
        if let Some(c) = common {
            for m in unfinished(rx, &listed, dataset, c)? {
                s.push_str(&format!(
                    "note: {}/{m} lacks {c} (a transfer stopped half way): the next run sends it again\n",
                    rx.dest()
                ));
            }
        }
    }
    Ok(s)
}

/// `snapveil verify` of a `zfs://` job: the target holds this job's snapshots, each one
/// the source still names is the same snapshot (guid), one is in common with the source
/// (the next increment's base), and no receive is left half done. Returns the number of
/// this job's snapshots there and the problems.
///
/// # Errors
/// Listing either side.
pub fn verify(
    rx: &Receiver<'_>,
    job: &Job,
    dataset: &str,
) -> Result<(usize, Vec<String>), ReceiveError> {
    let listed = rx.on_target(job.snapshot.recursive)?.unwrap_or_default();
    let on_target = &listed.own;
    let source = source_entries(rx.runner, &rx.zfs, dataset)?;
    let mut bad = Vec::new();
    let ours: Vec<&TargetSnap> = on_target
        .iter()
        .filter(|t| crate::snapshot::parse_name(&job.name, &t.name).is_some())
        .collect();
    if ours.is_empty() {
        bad.push(format!("{}: no snapshot of job {}", rx.addr, job.name));
    }
    for t in &ours {
        for sep in ['@', '#'] {
            let name = format!("{dataset}{sep}{}", t.name);
            if let Some(e) = source.iter().find(|e| e.name == name) {
                if e.guid != t.guid {
                    bad.push(format!(
                        "{}@{}: guid {} but the source's {name} has {}: not the same snapshot",
                        rx.addr, t.name, t.guid, e.guid
                    ));
                }
            }
        }
    }
    if !on_target.is_empty()
        && pick_base(
            &rx.addr.to_string(),
            dataset,
            on_target,
            &source,
            job.snapshot.recursive,
        )
        .is_err()
    {
        bad.push(format!(
            "{}: no snapshot in common with {dataset}: the next run cannot send an increment",
            rx.addr
        ));
    }
    for (ds, _) in rx.resume_tokens(job.snapshot.recursive)? {
        bad.push(format!(
            "{ds}: an interrupted receive is pending (the next run resumes it)"
        ));
    }
    if job.snapshot.recursive {
        let common = on_target
            .iter()
            .rev()
            .find(|t| source.iter().any(|e| e.guid == t.guid));
        if let Some(c) = common {
            for m in unfinished(rx, &listed, dataset, &c.name)? {
                bad.push(format!(
                    "{}/{m}: lacks {} that {dataset}/{m} has (a transfer stopped half way; \
                     the next run sends it again)",
                    rx.dest(),
                    c.name
                ));
            }
        }
    }
    Ok((ours.len(), bad))
}

/// Restores DEST@SNAP (a snapshot name or this job's stamp) into a new dataset `into`
/// here: `zfs send -w [-R] DEST@SNAP | zfs receive -u INTO`, the replica sent back raw. A
/// receive that fails removes what it created.
///
/// # Errors
/// `into` exists, no such snapshot, or the transfer failed.
pub fn restore(
    rx: &Receiver<'_>,
    job: &Job,
    wanted: &str,
    into: &str,
) -> Result<String, ReceiveError> {
    let exists = |ds: &str| {
        rx.runner
            .output(&rx.local().args(["list", "-H", "-o", "name", ds]))
            .is_ok_and(|o| o.exit.success())
    };
    if exists(into) {
        return Err(ReceiveError::IntoExists(into.to_string()));
    }
    let snaps = rx.snapshots()?.unwrap_or_default();
    let Some(snap) = snaps.iter().find(|t| {
        t.name == wanted || crate::snapshot::parse_name(&job.name, &t.name) == Some(wanted)
    }) else {
        return Err(ReceiveError::NoSuchPoint {
            wanted: wanted.to_string(),
            dest: rx.addr.to_string(),
            have: if snaps.is_empty() {
                "none".into()
            } else {
                snaps
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        });
    };
    let full = format!("{}@{}", rx.dest(), snap.name);
    let mut args = vec!["send", "-w"];
    if job.snapshot.recursive {
        args.push("-R");
    }
    args.push(&full);
    let send = rx.zfs(&args).cancellable(0);
    let recv = rx.local().args(["receive", "-u", into]).cancellable(0);
    if let Err(e) = pipe(rx.runner, &send, &recv) {
        if exists(into) {
            let d = rx.local().args(["destroy", "-r", into]);
            match d.run_checked(rx.runner) {
                Ok(_) => tracing::warn!("destroyed {into}: the restore did not complete"),
                Err(de) => tracing::error!("{de}: {into} is partial, remove it by hand"),
            }
        }
        return Err(e);
    }
    Ok(format!("{into}@{}", snap.name))
}

#[cfg(test)]
mod tests;
