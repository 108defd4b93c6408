//! Raw ZFS mode (`mode = "zfs-raw"`): instead of files through the encrypted view, each
//! run snapshots the dataset and sends `zfs send` streams to a directory target (local,
//! ssh, rsync daemon) as stream files, one per run: the first full, the next ones
//! incremental from the newest snapshot the target holds.
//!
//! A stream never leaves the host unencrypted: natively encrypted datasets are sent raw
//! (`zfs send -w`, the key stays here), everything else goes through age ([`age_io`]), so
//! that stock tools restore it: `age -d -i KEY FILE | zfs receive POOL/DS`.
//!
//! On the target (`streams/`): `NAME` (the stream, written under a temporary name and
//! renamed when complete), `NAME.sha1` (`sha1sum -c` format), and `STAMP.json` (the
//! record, written last: a restore point exists only once its stream is complete). The
//! record names the stream's base, so a restore replays a chain of records back to a full
//! stream and checks every file's sha1 before `zfs receive` sees a byte.
//!
//! On the source, the newest sent snapshot is kept (the next increment's base), held and
//! bookmarked where ZFS has them, so an increment still works after the source's own
//! retention destroyed it; this job's older snapshots are kept by the job's policy
//! ([`source`]). On the target, chains of streams are pruned whole ([`chains`]).
//!
//! A `zfs://` target is no directory: [`receive`] pipes the same `zfs send` into `zfs
//! receive` there instead of writing stream files.

pub mod age_io;
pub mod chains;
pub mod deep;
pub mod receive;
pub mod record;
pub mod source;

use crate::config::{Job, RawOptions};
use crate::exec::{Cmd, CommandError, Runner};
use crate::target::{Area, Contents, Target, TargetError};
use record::StreamRecord;
use sha1::{Digest, Sha1};
use std::io::{self, Read, Write};
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ZfsSendError {
    #[error("{0}")]
    Command(#[from] CommandError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(
        "{dataset} is not natively encrypted and the job has no age_recipients or \
         age_passphrase_file: snapveil never sends an unencrypted stream"
    )]
    Unencrypted { dataset: String },
    #[error("{what}: {err}")]
    Io { what: String, err: io::Error },
    #[error("age: {0}")]
    Age(String),
    #[error("{file}: {reason}")]
    Record { file: String, reason: String },
    #[error("{file}: sha1 {got} does not match {want} recorded for it: the stream file was altered or cut")]
    Tampered {
        file: String,
        want: String,
        got: String,
    },
    #[error("no restore point {wanted:?} on the target (it has: {have})")]
    NoSuchPoint { wanted: String, have: String },
    #[error("restore point {stamp} needs {base}, which is not on the target: the chain is broken")]
    ChainBroken { stamp: String, base: String },
    #[error("{0} already exists: restore into a new dataset (nothing was changed)")]
    IntoExists(String),
    #[error("TAMPERED: {file}: {why}; not used")]
    RecordTampered { file: String, why: String },
    #[error(
        "{} carry no MAC (written by a snapveil before sealed records, or forged: anyone can \
         write an age stream to a public recipient): their stream files cannot be \
         authenticated; restore with --accept-unauthenticated only if you trust this target",
        files.join(", ")
    )]
    Unauthenticated { files: Vec<String> },
    #[error("retention: {0}")]
    Policy(String),
    #[error(
        "{dataset}: a tree of natively encrypted and plain datasets ({}), and the job has no \
         age_recipients or age_passphrase_file: `zfs send -w -R` would send the plain ones \
         unencrypted; set age keys (the stream is then wrapped in age) or back the plain ones \
         up in a job of their own",
        plain.join(", ")
    )]
    MixedTree { dataset: String, plain: Vec<String> },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ZfsSendError {
    let what = what.into();
    move |err| ZfsSendError::Io { what, err }
}

/// The program `zfs` as configured.
fn zfs(job_tools: &crate::snapshot::Tools) -> Cmd {
    Cmd::new(&job_tools.zfs)
}

/// How a dataset's stream is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    /// `zfs send -w`: the dataset is natively encrypted.
    pub raw: bool,
    /// Wrapped in age by snapveil.
    pub age: bool,
}

/// `encryption` and `keystatus` of the dataset. A ZFS without native encryption
/// (zfs-fuse, old releases) has no such property: then the dataset is plain.
///
/// # Errors
/// `zfs get` failed for another reason.
pub fn encryption(
    runner: &dyn Runner,
    tools: &crate::snapshot::Tools,
    dataset: &str,
) -> Result<Option<(String, String)>, ZfsSendError> {
    let cmd = zfs(tools).args([
        "get",
        "-H",
        "-p",
        "-o",
        "value",
        "encryption,keystatus",
        dataset,
    ]);
    let out = runner
        .output(&cmd)
        .map_err(|e| CommandError::spawn(&cmd, e))?;
    if !out.exit.success() {
        if out.stderr_str().contains("invalid property 'encryption'") {
            tracing::info!("this ZFS has no native encryption: {dataset} is plain");
            return Ok(None);
        }
        return Err(CommandError::failed(&cmd, &out).into());
    }
    let text = out.stdout_str();
    let mut l = text.lines();
    match (l.next(), l.next()) {
        (Some(enc), Some(ks)) if enc != "off" => Ok(Some((enc.to_string(), ks.to_string()))),
        (Some(_), _) => Ok(None),
        _ => Err(ZfsSendError::Record {
            file: format!("zfs get encryption,keystatus {dataset}"),
            reason: format!("unexpected output {text:?}"),
        }),
    }
}

/// Raw for encrypted datasets, age for plain ones (and for raw ones with `wrap_raw`).
///
/// # Errors
/// A plain dataset without age keys configured.
pub fn protection(
    enc: Option<&(String, String)>,
    opts: &RawOptions,
    dataset: &str,
) -> Result<Protection, ZfsSendError> {
    match enc {
        Some(_) => Ok(Protection {
            raw: true,
            age: opts.wrap_raw,
        }),
        None if opts.has_age() => Ok(Protection {
            raw: false,
            age: true,
        }),
        None => Err(ZfsSendError::Unencrypted {
            dataset: dataset.to_string(),
        }),
    }
}

/// The restore points on the target, oldest first: stream records checked against their
/// names and job, and against their seals with the target's record key (tampered ones
/// are left out: [`record::scan`] has them).
///
/// # Errors
/// The target cannot be read, or a record belongs to another job.
pub fn records(
    runner: &dyn Runner,
    target: &Target,
    job: &str,
) -> Result<Vec<StreamRecord>, ZfsSendError> {
    Ok(record::scan(runner, target, job)?.points)
}

/// What a raw run did.
#[derive(Debug)]
pub struct Sent {
    pub record: StreamRecord,
    /// The sealed record as the agent's chain state keeps it.
    pub head: crate::target::chain::Head,
}

/// One raw run's send, after the snapshot `DATASET@SNAP` was taken: picks the base (the
/// newest record's snapshot, or its bookmark), streams to the target, then writes the
/// stream's `.sha1` and, last, the record that makes it a restore point, sealed with the
/// target's record key and linked into the chain at `next` ([`record::seal`]).
///
/// # Errors
/// Any step failed; nothing is recorded then, and a partial stream file is removed.
#[allow(clippy::too_many_arguments)]
pub fn send(
    runner: &dyn Runner,
    tools: &crate::snapshot::Tools,
    job: &Job,
    target: &Target,
    dataset: &str,
    snap: &str,
    stamp: &str,
    recursive: bool,
    next: &crate::target::chain::Next,
) -> Result<Sent, ZfsSendError> {
    let key = target.auth().ok_or_else(|| ZfsSendError::Record {
        file: format!("{}/streams/{stamp}.json", target.address()),
        reason: "no record key to seal it with (the job's key_config)".into(),
    })?;
    let opts = job.raw.clone().unwrap_or_default();
    let enc = encryption(runner, tools, dataset)?;
    if let Some((alg, keystatus)) = &enc {
        tracing::info!(
            dataset,
            encryption = %alg,
            keystatus = %keystatus,
            "natively encrypted: sending raw (zfs send -w); the key never leaves this host"
        );
    }
    let prot = if recursive {
        source::tree_protection(runner, tools, &opts, dataset)?
    } else {
        protection(enc.as_ref(), &opts, dataset)?
    };
    let prev = records(runner, target, &job.name)?;
    let base = if chains::full_due(&prev, stamp, opts.full_every) {
        None
    } else {
        pick_base(runner, tools, dataset, prev.last())?
    };
    let file = record::stream_name(
        dataset,
        base.as_ref().map(|b| b.snapshot.as_str()),
        snap,
        prot,
    );
    let mut cmd = zfs(tools).arg("send");
    if prot.raw {
        cmd = cmd.arg("-w");
    }
    if recursive {
        cmd = cmd.arg("-R");
    }
    if let Some(b) = &base {
        let flag = if opts.send_intermediates && !b.bookmark {
            "-I"
        } else {
            "-i"
        };
        cmd = cmd.args([flag, &b.from]);
    }
    cmd = cmd.arg(format!("{dataset}@{snap}")).cancellable(0);
    match &base {
        Some(b) => tracing::info!(from = %b.from, "sending the increment"),
        None => tracing::info!("sending a full stream (the target holds no base)"),
    }
    let mut upload = target.upload(Area::Streams, &file)?;
    let (sha1, bytes) = {
        let mut child = runner
            .spawn(&cmd)
            .map_err(|e| CommandError::spawn(&cmd, e))?;
        let mut input = child.take_stdout().ok_or_else(|| ZfsSendError::Io {
            what: format!("{cmd}"),
            err: io::Error::other("no stdout"),
        })?;
        let age = if prot.age {
            Some(age_io::encryptor(&opts)?)
        } else {
            None
        };
        let copied = hashed_behind(upload.file(), |out| match &age {
            Some(enc) => {
                let mut w = enc.wrap_output(out)?;
                copy(&mut input, &mut w)?;
                w.finish().map(drop)
            }
            None => copy(&mut input, out).map(drop),
        });
        drop(input);
        let out = child.wait().map_err(|e| CommandError::spawn(&cmd, e))?;
        // A full disk is the cause when writing failed (zfs then only sees a closed
        // pipe); otherwise zfs's own failure is.
        let hashed = copied.map_err(io_err(format!("writing the stream {file}")))?;
        if !out.exit.success() {
            return Err(CommandError::failed(&cmd, &out).into());
        }
        hashed
    };
    upload.commit(runner, target)?;
    target.put(
        runner,
        Area::Streams,
        &format!("{file}.sha1"),
        format!("{sha1}  {file}\n").as_bytes(),
    )?;
    let rec = StreamRecord {
        job: job.name.clone(),
        stamp: stamp.to_string(),
        dataset: dataset.to_string(),
        snapshot: snap.to_string(),
        recursive,
        base: base.as_ref().map(|b| b.snapshot.clone()),
        base_stamp: base.as_ref().map(|b| b.stamp.clone()),
        file: file.clone(),
        sha1,
        bytes,
        raw: prot.raw,
        age: prot.age,
        counter: Some(next.counter),
        prev: next.prev.clone(),
        base_counter: Some(next.base),
    };
    let (sealed, head) = record::seal(key, &rec, next);
    target.put(runner, Area::Streams, &format!("{stamp}.json"), &sealed)?;
    tracing::info!(file = %file, bytes, counter = next.counter, "stream stored; restore point recorded");
    Ok(Sent { record: rec, head })
}

/// Where an increment starts.
#[derive(Debug, Clone)]
struct Base {
    /// `DS@SNAP` or `DS#SNAP`.
    from: String,
    snapshot: String,
    stamp: String,
    bookmark: bool,
}

/// The newest record's snapshot, if the source still has it (or its bookmark).
fn pick_base(
    runner: &dyn Runner,
    tools: &crate::snapshot::Tools,
    dataset: &str,
    newest: Option<&StreamRecord>,
) -> Result<Option<Base>, ZfsSendError> {
    let Some(r) = newest else { return Ok(None) };
    if r.dataset != dataset {
        tracing::warn!(
            "the newest restore point is of {} and the job now sends {dataset}: sending a full stream",
            r.dataset
        );
        return Ok(None);
    }
    // Snapshots first (a bookmark cannot be the base of -I or of a -R increment).
    for (sep, types, bookmark) in [('@', "snapshot", false), ('#', "bookmark", true)] {
        let cmd = zfs(tools).args(["list", "-H", "-o", "name", "-t", types, "-d", "1", dataset]);
        let out = runner
            .output(&cmd)
            .map_err(|e| CommandError::spawn(&cmd, e))?;
        if !out.exit.success() {
            if bookmark {
                // zfs-fuse and old releases know no bookmarks.
                tracing::debug!("cannot list bookmarks: {}", out.stderr_str().trim());
                continue;
            }
            return Err(CommandError::failed(&cmd, &out).into());
        }
        let want = format!("{dataset}{sep}{}", r.snapshot);
        if out.stdout_str().lines().any(|l| l == want) {
            if bookmark && r.recursive {
                tracing::warn!("{want}: a recursive increment cannot start at a bookmark: sending a full stream");
                return Ok(None);
            }
            return Ok(Some(Base {
                from: want,
                snapshot: r.snapshot.clone(),
                stamp: r.stamp.clone(),
                bookmark,
            }));
        }
    }
    tracing::warn!(
        "{dataset}@{} (the newest restore point) is gone from the source, and no bookmark of it: sending a full stream",
        r.snapshot
    );
    Ok(None)
}

pub use source::after_send;

/// The chain of records that restores `wanted` (a stamp or a snapshot name), full
/// stream first.
///
/// # Errors
/// No such restore point, or a base missing from the target.
pub fn chain<'a>(
    recs: &'a [StreamRecord],
    wanted: &str,
) -> Result<Vec<&'a StreamRecord>, ZfsSendError> {
    let find = |w: &str| recs.iter().find(|r| r.stamp == w || r.snapshot == w);
    let mut at = find(wanted).ok_or_else(|| ZfsSendError::NoSuchPoint {
        wanted: wanted.to_string(),
        have: if recs.is_empty() {
            "none".into()
        } else {
            recs.iter()
                .map(|r| r.snapshot.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
    })?;
    let mut out = vec![at];
    while let Some(b) = &at.base_stamp {
        at = recs
            .iter()
            .find(|r| &r.stamp == b)
            .ok_or_else(|| ZfsSendError::ChainBroken {
                stamp: at.stamp.clone(),
                base: at.base.clone().unwrap_or_else(|| b.clone()),
            })?;
        if out.len() > recs.len() {
            return Err(ZfsSendError::ChainBroken {
                stamp: at.stamp.clone(),
                base: b.clone(),
            });
        }
        out.push(at);
    }
    out.reverse();
    Ok(out)
}

/// Checks each stream file of the chain against its recorded sha1 (and its `.sha1`
/// file), returning local copies to replay.
fn checked_files(
    runner: &dyn Runner,
    target: &Target,
    chain: &[&StreamRecord],
) -> Result<Vec<crate::target::LocalCopy>, ZfsSendError> {
    let mut files = Vec::new();
    for r in chain {
        let shown = format!("{}/streams/{}", target.address(), r.file);
        let copy = target
            .local_copy(runner, Area::Streams, &r.file)?
            .ok_or_else(|| ZfsSendError::Record {
                file: shown.clone(),
                reason: format!("missing (restore point {} needs it)", r.stamp),
            })?;
        let got = sha1_file(&copy.path)?;
        if got != r.sha1 {
            return Err(ZfsSendError::Tampered {
                file: shown,
                want: r.sha1.clone(),
                got,
            });
        }
        files.push(copy);
    }
    Ok(files)
}

fn sha1_file(p: &std::path::Path) -> Result<String, ZfsSendError> {
    let mut f = std::fs::File::open(p).map_err(io_err(p.display().to_string()))?;
    let mut h = Hashing::new(io::sink());
    copy(&mut f, &mut h).map_err(io_err(p.display().to_string()))?;
    Ok(h.finish().0)
}

/// Replays the chain up to `wanted` into a new dataset `into` with `zfs receive -u`.
/// Only sealed records are used (and an older snapveil's unsealed ones when
/// `unauthenticated`: [`record::Scan::restore_chain`]); every stream file is checked
/// against the sha1 its record holds before anything is received; if a receive still
/// fails (a stream that decrypts wrongly), the dataset this restore created is destroyed
/// again.
///
/// # Errors
/// `into` exists, the chain is broken, tampered or unauthenticated, a stream file is
/// altered, decrypting or receiving failed.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    runner: &dyn Runner,
    tools: &crate::snapshot::Tools,
    job: &Job,
    target: &Target,
    scan: &record::Scan,
    wanted: &str,
    unauthenticated: bool,
    into: &str,
    identity: Option<&std::path::Path>,
) -> Result<Vec<String>, ZfsSendError> {
    if dataset_exists(runner, tools, into) {
        return Err(ZfsSendError::IntoExists(into.to_string()));
    }
    let chain = scan.restore_chain(wanted, unauthenticated)?;
    let files = checked_files(runner, target, &chain)?;
    let opts = job.raw.clone().unwrap_or_default();
    let mut done = Vec::new();
    for (r, f) in chain.iter().zip(&files) {
        tracing::info!(file = %r.file, "receiving");
        if let Err(e) = receive_one(runner, tools, r, &f.path, into, &opts, identity) {
            if !done.is_empty() || dataset_exists(runner, tools, into) {
                let d = zfs(tools).args(["destroy", "-r", into]);
                match runner.output(&d) {
                    Ok(o) if o.exit.success() => {
                        tracing::warn!("destroyed {into}: the restore did not complete")
                    }
                    _ => tracing::error!("{d} failed: {into} is partial, remove it by hand"),
                }
            }
            return Err(e);
        }
        done.push(format!("{into}@{}", r.snapshot));
    }
    Ok(done)
}

fn dataset_exists(runner: &dyn Runner, tools: &crate::snapshot::Tools, ds: &str) -> bool {
    runner
        .output(&zfs(tools).args(["list", "-H", "-o", "name", ds]))
        .is_ok_and(|o| o.exit.success())
}

fn receive_one(
    runner: &dyn Runner,
    tools: &crate::snapshot::Tools,
    r: &StreamRecord,
    file: &std::path::Path,
    into: &str,
    opts: &RawOptions,
    identity: Option<&std::path::Path>,
) -> Result<(), ZfsSendError> {
    let cmd = zfs(tools).args(["receive", "-u", into]).cancellable(0);
    let mut child = runner
        .spawn(&cmd)
        .map_err(|e| CommandError::spawn(&cmd, e))?;
    let mut stdin = child.take_stdin().ok_or_else(|| ZfsSendError::Io {
        what: cmd.to_string(),
        err: io::Error::other("no stdin"),
    })?;
    let f = std::fs::File::open(file).map_err(io_err(file.display().to_string()))?;
    let fed: Result<u64, ZfsSendError> = if r.age {
        age_io::decryptor(opts, identity, io::BufReader::new(f)).and_then(|mut rd| {
            copy(&mut rd, &mut stdin).map_err(|e| {
                if e.kind() == io::ErrorKind::BrokenPipe {
                    io_err(format!("feeding {}", r.file))(e)
                } else {
                    ZfsSendError::Age(format!("{}: {e} (altered or cut stream)", r.file))
                }
            })
        })
    } else {
        let mut f = f;
        copy(&mut f, &mut stdin).map_err(io_err(format!("feeding {}", r.file)))
    };
    drop(stdin);
    let out = child.wait().map_err(|e| CommandError::spawn(&cmd, e))?;
    // A stream that does not decrypt is the cause of whatever zfs then says; a receive
    // that refused the stream is the cause of our broken pipe.
    match (fed, out.exit.success()) {
        (Err(e @ ZfsSendError::Age(_)), _) => Err(e),
        (_, false) => Err(CommandError::failed(&cmd, &out).into()),
        (Err(e), true) => Err(e),
        (Ok(_), true) => Ok(()),
    }
}

/// `verify` of a raw job: the records' seals and chain against what this machine last
/// wrote (`state`), and every record's stream file against the sha1 its record holds
/// (the `.sha1` file beside it must agree, for stock `sha1sum -c`). Notes (unsealed
/// points of an older snapveil) are logged. Returns the restore points it checked (for
/// `--deep`, which reads their streams next) and what is wrong.
///
/// # Errors
/// The target cannot be read; bad files are returned, not errors.
pub fn verify(
    runner: &dyn Runner,
    job: &Job,
    target: &Target,
    state: Option<&crate::target::chain::Head>,
) -> Result<(Vec<StreamRecord>, Vec<String>), ZfsSendError> {
    let scan = record::scan(runner, target, &job.name)?;
    let (mut bad, notes) = scan.report(state);
    for n in &notes {
        tracing::warn!("{}: {n}", target.address());
    }
    let recs = scan.points;
    for r in &recs {
        let shown = format!("streams/{}", r.file);
        match target.local_copy(runner, Area::Streams, &r.file)? {
            None => bad.push(format!("{shown}: missing")),
            Some(c) => {
                let got = sha1_file(&c.path)?;
                if got != r.sha1 {
                    bad.push(format!(
                        "{shown}: sha1 {got}, but streams/{}.json records {}: the stream \
                         file was altered, cut or swapped",
                        r.stamp, r.sha1
                    ));
                }
            }
        }
        let side = format!("{}.sha1", r.file);
        let want = format!("{}  {}\n", r.sha1, r.file);
        match target.fetch(runner, Area::Streams, &side)? {
            Some(d) if d == want.as_bytes() => {}
            Some(_) => bad.push(format!(
                "streams/{side}: does not match the sha1 in streams/{}.json (sha1sum -c \
                 would check against a wrong sum)",
                r.stamp
            )),
            None => bad.push(format!("streams/{side}: missing")),
        }
        if let Some(b) = &r.base_stamp {
            if !recs.iter().any(|x| &x.stamp == b) {
                bad.push(format!(
                    "streams/{}.json: its base {} is not on the target",
                    r.stamp,
                    r.base.as_deref().unwrap_or(b)
                ));
            }
        }
    }
    Ok((recs, bad))
}

/// What `status` and the metrics report of a raw job's target; `None` (with a warning)
/// when it cannot be read or holds no restore point.
pub fn raw_status(
    runner: &dyn Runner,
    target: &Target,
    job: &str,
) -> Option<crate::status::RawStatus> {
    let recs = match records(runner, target, job) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot read the stream records: {e}");
            return None;
        }
    };
    status_of(&recs)
}

/// [`raw_status`] of records already read.
pub fn status_of(recs: &[StreamRecord]) -> Option<crate::status::RawStatus> {
    let newest = recs.last()?;
    Some(crate::status::RawStatus {
        last_snapshot: format!("{}@{}", newest.dataset, newest.snapshot),
        chain_length: chain(recs, &newest.stamp).map_or(0, |c| c.len() as u64),
        restore_points: recs.len() as u64,
    })
}

/// The restore points of a raw target, for `new_stamp`.
pub fn contents(recs: &[StreamRecord]) -> Contents {
    let mut c = Contents::default();
    for r in recs {
        c.note(&r.stamp, format!("streams/{}.json", r.stamp));
        c.points.push(r.stamp.clone());
    }
    c
}

/// A writer that hashes (sha1) and counts what passes through.
struct Hashing<W> {
    inner: W,
    h: Sha1,
    n: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            h: Sha1::new(),
            n: 0,
        }
    }
    fn finish(self) -> (String, u64) {
        (hex::encode(self.h.finalize()), self.n)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.h.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Runs `produce` with a writer whose bytes are hashed (sha1), counted and written to
/// `out` on a second thread, so that hashing the stored stream overlaps encrypting it
/// instead of following each chunk: on two cores that is most of the difference to
/// `zfs send | zfs receive`. Returns the stream's sha1 and length; when writing failed
/// (a full disk), that error is the one returned, since `produce` then only sees the
/// hand-off closed.
fn hashed_behind<W: Write + Send>(
    out: W,
    produce: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<(String, u64)> {
    use std::sync::mpsc;
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(4);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<(String, u64)> {
            let mut h = Hashing::new(out);
            for buf in rx {
                h.write_all(&buf)?;
                let _ = back_tx.send(buf);
            }
            h.flush()?;
            Ok(h.finish())
        });
        let mut hand = Handoff {
            tx,
            back: back_rx,
            buf: Vec::with_capacity(HANDOFF),
        };
        let produced = produce(&mut hand).and_then(|()| hand.flush());
        drop(hand);
        let written = writer.join().expect("the stream writer thread panicked");
        match (produced, written) {
            (_, Err(e)) => Err(e),
            (Err(e), _) => Err(e),
            (Ok(()), Ok(h)) => Ok(h),
        }
    })
}

/// Bytes per hand-off to the hashing thread.
const HANDOFF: usize = 1 << 20;

/// The producer's side of [`hashed_behind`]: fills 1 MiB buffers and passes them on,
/// reusing the ones that come back.
struct Handoff {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    back: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl Handoff {
    fn pass(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = match self.back.try_recv() {
            Ok(mut b) => {
                b.clear();
                b
            }
            Err(_) => Vec::with_capacity(HANDOFF),
        };
        let full = std::mem::replace(&mut self.buf, next);
        self.tx
            .send(full)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the stream writer stopped"))
    }
}

impl Write for Handoff {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let k = (HANDOFF - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..k]);
        if self.buf.len() == HANDOFF {
            self.pass()?;
        }
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.pass()
    }
}

/// Copies with a 1 MiB buffer (streams are large; `io::copy`'s 8 KiB costs syscalls).
pub(crate) fn copy(r: &mut dyn Read, w: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return w.flush().map(|()| n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        w.write_all(&buf[..k])?;
        n += k as u64;
    }
}

/// Where `restore --into` looks for the identity when none is given.
pub fn default_identity(job: &Job) -> Option<PathBuf> {
    job.raw.as_ref().and_then(|r| r.age_identity_file.clone())
}

#[cfg(test)]
mod tests {
    //! The natively encrypted path (`zfs send -w`, bookmarks) cannot run on zfs-fuse,
    //! which has neither: its exact command lines are pinned here. The age path runs for
    //! real on zfs-fuse in tests/zfs_raw.rs and on OpenZFS in the guest tier.
    use super::*;
    use crate::exec::{scripted::ScriptedRunner, Output};

    #[test]
    fn hashing_behind_gives_the_sha1_of_what_was_written_and_the_writers_error() {
        let data: Vec<u8> = (0..(7u32 << 19)).map(|i| (i % 251) as u8).collect();
        let mut out = Vec::new();
        let (sha1, len) = hashed_behind(&mut out, |w| {
            for piece in data.chunks(100_000) {
                w.write_all(piece)?;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(len, data.len() as u64);
        assert_eq!(out, data);
        assert_eq!(sha1, hex::encode(Sha1::digest(&data)));

        /// A disk that fills after 2 MiB.
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 + b.len() > 2 << 20 {
                    return Err(io::Error::from_raw_os_error(libc::ENOSPC));
                }
                self.0 += b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let err = hashed_behind(Full(0), |w| {
            for _ in 0..64 {
                w.write_all(&data[..1 << 20])?;
            }
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    }

    fn job(dir: &std::path::Path) -> (crate::config::Config, Target) {
        let master = crate::crypto::config::write_test_key(dir);
        let text = format!(
            "state_dir = \"{0}/state\"\n[[job]]\nname = \"j\"\nmode = \"zfs-raw\"\n\
             source = \"zfs:tank/enc\"\ntarget = \"{0}/t\"\n\
             key_config = \"{0}/k.conf\"\npassfile = \"{0}/k.pass\"\n",
            dir.display()
        );
        let cfg = crate::config::load_str(&dir.join("c.toml"), &text).unwrap();
        let t =
            Target::for_job(&cfg, &cfg.jobs[0]).with_auth(crate::crypto::RecordKey::new(&master));
        (cfg, t)
    }

    /// The first link of a chain, and the one after `head`.
    fn first() -> crate::target::chain::Next {
        crate::target::chain::Next {
            counter: 1,
            prev: None,
            base: 1,
        }
    }

    #[test]
    fn encrypted_datasets_are_sent_raw_and_increments_start_at_a_bookmark() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, target) = job(dir.path());
        let job = &cfg.jobs[0];
        let tools = crate::snapshot::Tools::default();
        let r = ScriptedRunner::new();
        let get = [
            "zfs",
            "get",
            "-H",
            "-p",
            "-o",
            "value",
            "encryption,keystatus",
            "tank/enc",
        ];
        r.expect(&get, Output::ok("aes-256-gcm\nunavailable\n"));
        r.expect(
            &["zfs", "send", "-w", "tank/enc@snapveil-j-20261130T010000Z"],
            Output::ok("RAW-FULL"),
        );
        let s1 = send(
            &r,
            &tools,
            job,
            &target,
            "tank/enc",
            "snapveil-j-20261130T010000Z",
            "20261130T010000Z",
            false,
            &first(),
        )
        .unwrap();
        assert!(s1.record.raw && !s1.record.age && s1.record.base.is_none());
        let stored = std::fs::read(dir.path().join("t/streams").join(&s1.record.file)).unwrap();
        assert_eq!(stored, b"RAW-FULL", "a raw stream is stored as zfs sent it");
        assert_eq!(
            s1.record.file,
            "tank+enc@snapveil-j-20261130T010000Z.full.raw.zfs"
        );

        // The base snapshot is gone (the source's own retention), its bookmark is there.
        r.expect(&get, Output::ok("aes-256-gcm\navailable\n"));
        r.expect(
            &[
                "zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", "tank/enc",
            ],
            Output::ok("tank/enc@other\n"),
        );
        r.expect(
            &[
                "zfs", "list", "-H", "-o", "name", "-t", "bookmark", "-d", "1", "tank/enc",
            ],
            Output::ok("tank/enc#snapveil-j-20261130T010000Z\n"),
        );
        r.expect(
            &[
                "zfs",
                "send",
                "-w",
                "-i",
                "tank/enc#snapveil-j-20261130T010000Z",
                "tank/enc@snapveil-j-20261130T020000Z",
            ],
            Output::ok("RAW-INC"),
        );
        let s2 = send(
            &r,
            &tools,
            job,
            &target,
            "tank/enc",
            "snapveil-j-20261130T020000Z",
            "20261130T020000Z",
            false,
            &crate::target::chain::Next {
                counter: 2,
                prev: Some(s1.head.mac.clone()),
                base: 1,
            },
        )
        .unwrap();
        assert_eq!(s2.record.base_stamp.as_deref(), Some("20261130T010000Z"));
        // Both records are sealed and chained: #2 names #1's MAC.
        let scan = record::scan(&r, &target, "j").unwrap();
        assert_eq!(scan.sealed.len(), 2, "{scan:?}");
        assert_eq!(
            scan.sealed["20261130T020000Z"].prev,
            Some(s1.head.mac.clone())
        );
        assert!(scan.verdict(Some(&s2.head)).problems.is_empty());
        let on_disk = std::fs::read(dir.path().join("t/streams/20261130T020000Z.json")).unwrap();
        assert!(on_disk.windows(16).any(|w| w == b"snapveil-mac-v1 "));
        let recs = records(&r, &target, "j").unwrap();
        let c = chain(&recs, "snapveil-j-20261130T020000Z").unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].stamp, "20261130T010000Z");

        // After the send: bookmark it, destroy this job's older snapshots only.
        r.expect(
            &[
                "zfs",
                "bookmark",
                "tank/enc@snapveil-j-20261130T020000Z",
                "tank/enc#snapveil-j-20261130T020000Z",
            ],
            Output::ok(""),
        );
        r.expect(
            &[
                "zfs",
                "hold",
                "snapveil-j",
                "tank/enc@snapveil-j-20261130T020000Z",
            ],
            Output::ok(""),
        );
        r.expect(
            &[
                "zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", "tank/enc",
            ],
            Output::ok(
                "tank/enc@snapveil-j-20261129T010000Z\ntank/enc@snapveil-jx-20261129T010000Z\n\
                 tank/enc@mine\ntank/enc@snapveil-j-20261130T020000Z\n",
            ),
        );
        r.expect(
            &["zfs", "holds", "-H", "tank/enc@snapveil-j-20261129T010000Z"],
            Output::ok(""),
        );
        r.expect(
            &["zfs", "destroy", "tank/enc@snapveil-j-20261129T010000Z"],
            Output::ok(""),
        );
        r.expect(
            &[
                "zfs", "list", "-H", "-o", "name", "-t", "bookmark", "-d", "1", "tank/enc",
            ],
            Output::ok("tank/enc#snapveil-j-20261130T020000Z\n"),
        );
        after_send(
            &r,
            &tools,
            job,
            "tank/enc",
            "snapveil-j-20261130T020000Z",
            false,
            &["20261129T010000Z".to_string()],
        );
    }

    #[test]
    fn a_plain_dataset_without_age_keys_is_never_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, target) = job(dir.path());
        let r = ScriptedRunner::new();
        r.expect(
            &[
                "zfs",
                "get",
                "-H",
                "-p",
                "-o",
                "value",
                "encryption,keystatus",
                "tank/enc",
            ],
            Output::ok("off\n-\n"),
        );
        let e = send(
            &r,
            &Default::default(),
            &cfg.jobs[0],
            &target,
            "tank/enc",
            "s",
            "20261130T010000Z",
            false,
            &first(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("never sends an unencrypted stream"),
            "{e}"
        );
        assert!(
            !dir.path().join("t/streams").exists()
                || std::fs::read_dir(dir.path().join("t/streams"))
                    .unwrap()
                    .next()
                    .is_none()
        );
    }

    #[test]
    fn a_broken_chain_is_named() {
        let rec = |stamp: &str, base: Option<&str>| record::StreamRecord {
            job: "j".into(),
            stamp: stamp.into(),
            dataset: "d".into(),
            snapshot: format!("snapveil-j-{stamp}"),
            recursive: false,
            base: base.map(|b| format!("snapveil-j-{b}")),
            base_stamp: base.map(str::to_string),
            file: format!("f{stamp}"),
            sha1: "0".repeat(40),
            bytes: 0,
            raw: false,
            age: true,
            ..Default::default()
        };
        let recs = vec![rec("20261130T030000Z", Some("20261130T020000Z"))];
        let e = chain(&recs, "20261130T030000Z").unwrap_err();
        assert!(e.to_string().contains("snapveil-j-20261130T020000Z"), "{e}");
        assert!(chain(&recs, "nope")
            .unwrap_err()
            .to_string()
            .contains("no restore point"));
    }
}
