//! Proof that a backup restores: the per-run checksum manifest of the encrypted view
//! (`TARGET/manifests/STAMP.sha1`, `sha1sum -c` format, paths relative to `current/`),
//! `snapveil verify JOB` (the target's `current/` against the last manifest, without
//! downloading data) and `--deep` (the target's ciphertext decrypted in memory and
//! compared with a fresh snapshot's plaintext). Issue 6.
//!
//! Owns: manifests on the target, the comparisons and their report. Does not own: the
//! run pipeline (job.rs calls [`hash_view`], [`write_manifest`] and [`check_view_against_target`]).
//!
//! A local target is hashed directly. A remote one cannot be hashed from here, so its
//! files are compared with a local tree that should equal them: the encrypted view of a
//! fresh snapshot (reverse mode is deterministic), by `rsync --dry-run --checksum
//! --itemize-changes`, where rsync computes the remote checksums on the backup host.
//! Where the source changed since the last run, the manifest decides which side is wrong.

use crate::config::{Config, Job};
use crate::crypto::content;
use crate::crypto::names::{self, LONGNAME_PREFIX};
use crate::crypto::{KeyConfig, Keys, MasterKey};
use crate::exec::Runner;
use crate::manifest;
use crate::target::{Area, Target};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

mod walk;
pub use walk::{walk_core, AlsoVisit, Cursor, Files, ViewWalk, MAX_PATH};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Rsync(#[from] crate::target::RsyncError),
    #[error(transparent)]
    Key(#[from] crate::crypto::ConfigError),
    #[error(transparent)]
    Mount(#[from] crate::view::mount::MountError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("{target}: no restore point (runs/*.json) yet")]
    NoRun { target: String },
    #[error("{target}: restore point {stamp} has no manifests/{stamp}.sha1")]
    NoManifest { target: String, stamp: String },
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    #[error(transparent)]
    Chain(#[from] crate::target::chain::StateError),
    #[error(transparent)]
    View(#[from] crate::view::ViewError),
    #[error(transparent)]
    Seed(#[from] crate::target::seed::SeedError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.into(),
        source,
    }
}

/// What a verification found. Paths are encrypted, relative to `current/`.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: u64,
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub differing: Vec<String>,
    /// Deep verify: files whose decrypted content is not the snapshot's plaintext.
    pub wrong_plaintext: Vec<String>,
    /// Files the source changed since the last run: the target cannot be judged there.
    pub unverifiable: Vec<String>,
    /// Records that fail their MAC, and a truncated or rolled-back chain (issue 14).
    pub tampered: Vec<String>,
    /// What the user should know although nothing failed.
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.differing.is_empty()
            && self.wrong_plaintext.is_empty()
            && self.tampered.is_empty()
    }

    pub fn print(&self) {
        for n in &self.notes {
            println!("note: {n}");
        }
        for t in &self.tampered {
            println!("{t}");
        }
        for (what, v) in [
            ("missing", &self.missing),
            ("extra", &self.extra),
            ("differing", &self.differing),
            ("wrong plaintext", &self.wrong_plaintext),
            (
                "unverifiable (source changed since the last run)",
                &self.unverifiable,
            ),
        ] {
            for p in v {
                println!("{what}: {p}");
            }
        }
        println!(
            "{} files checked: {} missing, {} extra, {} differing, {} wrong plaintext",
            self.checked,
            self.missing.len(),
            self.extra.len(),
            self.differing.len(),
            self.wrong_plaintext.len()
        );
    }
}

/// Writes `TARGET/manifests/STAMP.meta` (every entry's type, mode, owner, mtime, link
/// target: [`manifest::meta`]) and then `TARGET/manifests/STAMP.sha1` of a walk of the
/// view (during a run, before `runs/STAMP.json`, so every restore point has both).
/// The metadata goes first: a `.sha1` without its `.meta` would restore as a point made
/// by an older snapveil, losing modes and symlinks without a failure.
///
/// Both are sent as the run made them in its scratch: `meta` as [`walk_core`] wrote it,
/// `sha1` as [`hash_view`] did. The view is read before, not while, the manifest is
/// sent, so that a run lets go of the view and the snapshot in the meantime.
///
/// # Errors
/// Reading either file, or uploading it.
pub fn write_manifest(
    runner: &dyn Runner,
    target: &Target,
    stamp: &str,
    meta: &Path,
    sha1: &Path,
) -> Result<Written, VerifyError> {
    let put = |name: &str, from: &Path| -> Result<Option<String>, VerifyError> {
        let mut f = fs::File::open(from).map_err(io(from))?;
        Ok(target.put_sealed_with(runner, Area::Manifests, name, |w| {
            std::io::copy(&mut f, w).map(drop)
        })?)
    };
    let meta_mac = put(&format!("{stamp}.meta"), meta)?;
    let sha1_mac = put(&format!("{stamp}.sha1"), sha1)?;
    Ok(Written { sha1_mac, meta_mac })
}

/// What [`write_manifest`] wrote: the MACs (hex) of the two files' exact bytes, for the
/// run record that authenticates them.
pub struct Written {
    pub sha1_mac: Option<String>,
    pub meta_mac: Option<String>,
}

/// What a run's manifest can take from the last restore point's: the sha1 of every file
/// the run did not send and that did not change since that point (its ctime is older
/// than the point's stamp, and its encrypted path is the same) is the one in `prev`,
/// because current/ still holds that point's ciphertext of it (reverse mode is
/// deterministic). So a nightly run hashes what changed, not the whole dataset.
pub struct Reuse {
    /// The last restore point's manifest ([`PrevManifest`]).
    pub prev: PrevManifest,
    /// Paths (relative to the view) to hash again: sent, or changed since that point.
    pub rehash: manifest::PathSet,
    /// Sums already known, by path: of what this run wrote into `current/` itself
    /// ([`crate::target::update`]), summed from the bytes as they were written.
    pub known: crate::target::update::Sums,
}

/// The last restore point's manifest, as this run's own checked copy
/// ([`Target::checked_manifest_copy`]), read as a stream when the manifest is made: a
/// manifest snapveil wrote lists its files in the walk's order (by path bytes), so the
/// two are merged as they go and it costs no memory that grows with the tree.
pub struct PrevManifest {
    copy: crate::target::LocalCopy,
    file: String,
}

impl PrevManifest {
    /// Its lines, to be looked up in path order ([`Merge`]).
    fn merge(&self) -> Result<Merge<std::io::BufReader<fs::File>>, VerifyError> {
        let f = fs::File::open(&self.copy.path).map_err(io(&self.copy.path))?;
        Merge::new(manifest::Reader::new(
            &self.file,
            std::io::BufReader::with_capacity(1 << 16, f),
        ))
    }
}

/// A manifest's lines, looked up in path order ([`Merge::sum_of`]): both the manifest
/// and the walk are in path order (by the paths' bytes), so they are merged, one line
/// held at a time.
struct Merge<R> {
    lines: manifest::Reader<R>,
    /// The line at hand (path, sum), while there is one.
    line: Vec<u8>,
    sum: [u8; 20],
    more: bool,
}

impl<R: std::io::BufRead> Merge<R> {
    fn new(lines: manifest::Reader<R>) -> Result<Self, VerifyError> {
        let mut m = Merge {
            lines,
            // A parsed line's path is never empty, so the empty start is before every line.
            line: Vec::new(),
            sum: [0; 20],
            more: true,
        };
        m.next()?;
        Ok(m)
    }

    fn next(&mut self) -> Result<(), VerifyError> {
        let Some((p, s)) = self.lines.next_entry()? else {
            self.more = false;
            return Ok(());
        };
        if p <= self.line.as_slice() {
            return Err(manifest::ManifestError::Order {
                file: self.lines.file().into(),
                line: self.lines.line(),
            }
            .into());
        }
        self.line.clear();
        self.line.extend_from_slice(p);
        self.sum = s;
        Ok(())
    }

    /// The sum the manifest lists for `path`, if it does; each `path` after the one
    /// asked for before.
    ///
    /// # Errors
    /// A line that does not parse or is not after the one before.
    fn sum_of(&mut self, path: &[u8]) -> Result<Option<[u8; 20]>, VerifyError> {
        while self.more && self.line.as_slice() < path {
            self.next()?;
        }
        Ok((self.more && self.line == path).then_some(self.sum))
    }

    /// Reads the rest: a manifest out of order anywhere is not used anywhere.
    ///
    /// # Errors
    /// As [`Merge::sum_of`].
    fn finish(mut self) -> Result<(), VerifyError> {
        while self.more {
            self.next()?;
        }
        Ok(())
    }
}

/// Writes the manifest of the view (`sha1sum` lines of the files of `walk`, in its
/// order) to the file `to`: each file's sum from the last restore point's manifest
/// where `reuse` allows, hashed through the view otherwise. If that manifest turns out
/// unusable anywhere (a line that does not parse, or out of order), the file is written
/// again with every file hashed, and the log says so.
///
/// The manifest is written as it is made, a step of files at a time: nothing is held
/// per file (issue 13). The FUSE handlers of a view served by this process encrypt on
/// rayon's pool, so hashing must not run on that pool too (its workers would block in
/// reads only the pool can answer: a deadlock): two plain threads instead.
///
/// # Errors
/// Reading a file of the view or the walk, or writing `to`.
pub fn hash_view(walk: &ViewWalk, reuse: Option<&Reuse>, to: &Path) -> Result<(), VerifyError> {
    if let Some(r) = reuse {
        match hash_into(walk, Some(r), to) {
            Err(Hashing::Prev(e)) => tracing::warn!(
                "the last restore point's manifest cannot be used ({}): hashing every file",
                crate::error::Chain(&e)
            ),
            Err(Hashing::Other(e)) => return Err(e),
            Ok(()) => return Ok(()),
        }
    }
    hash_into(walk, None, to).map_err(|e| match e {
        Hashing::Prev(e) | Hashing::Other(e) => e,
    })
}

/// Why [`hash_into`] failed: the last manifest (then hash everything), or the rest.
enum Hashing {
    Prev(VerifyError),
    Other(VerifyError),
}

impl From<VerifyError> for Hashing {
    fn from(e: VerifyError) -> Self {
        Hashing::Other(e)
    }
}

/// How many files [`hash_into`] takes at a time: their paths are what it holds.
const HASH_STEP: usize = 1024;

/// [`hash_view`], with the last manifest's sums where `reuse` has them.
fn hash_into(walk: &ViewWalk, reuse: Option<&Reuse>, to: &Path) -> Result<(), Hashing> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, fs::File::create(to).map_err(io(to))?);
    // The last manifest's lines, and what not to take from them.
    let mut prev = match reuse {
        Some(r) => Some((r.prev.merge().map_err(Hashing::Prev)?, &r.rehash)),
        None => None,
    };
    let mut files = walk.files()?;
    let (mut n, mut hashed) = (0, 0);
    // A step's files: (path, sum if known).
    let mut step: Vec<(Vec<u8>, Option<[u8; 20]>)> = Vec::with_capacity(HASH_STEP);
    let mut bufs = [vec![0u8; manifest::SHA1_BUF], vec![0u8; manifest::SHA1_BUF]];
    loop {
        step.clear();
        for f in files.by_ref().take(HASH_STEP) {
            let (path, _) = f?;
            let known = reuse.and_then(|r| {
                r.known
                    .binary_search_by(|(p, _)| p.as_slice().cmp(&path))
                    .ok()
                    .map(|i| r.known[i].1)
            });
            let sum = match &mut prev {
                _ if known.is_some() => known,
                Some((m, rehash)) if !rehash.contains(&path) => {
                    m.sum_of(&path).map_err(Hashing::Prev)?
                }
                _ => None,
            };
            step.push((path, sum));
        }
        if step.is_empty() {
            break;
        }
        let todo: Vec<usize> = (0..step.len()).filter(|i| step[*i].1.is_none()).collect();
        hashed += todo.len();
        for (i, sum) in hash_files(&walk.root, &step, &todo, &mut bufs)? {
            step[i].1 = Some(sum);
        }
        let lines = step
            .iter()
            .map(|(p, s)| (p, s.as_ref().expect("every sum known or hashed")));
        manifest::format_pairs_to(&mut out, lines).map_err(io(to))?;
        n += step.len();
    }
    if let Some((m, _)) = prev {
        m.finish().map_err(Hashing::Prev)?;
    }
    std::io::Write::flush(&mut out).map_err(io(to))?;
    tracing::info!(files = n, hashed, "manifest of the view");
    Ok(())
}

/// The sums of the files `step[i]` for each `i` of `todo`, read through the view at
/// `root`, on this thread and one more when there are two or more.
fn hash_files(
    root: &Path,
    step: &[(Vec<u8>, Option<[u8; 20]>)],
    todo: &[usize],
    bufs: &mut [Vec<u8>; 2],
) -> Result<Vec<(usize, [u8; 20])>, VerifyError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = |buf: &mut Vec<u8>| -> Result<Vec<(usize, [u8; 20])>, VerifyError> {
        let mut got = Vec::new();
        loop {
            let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(&i) = todo.get(k) else {
                return Ok(got);
            };
            let p = root.join(OsStr::from_bytes(&step[i].0));
            got.push((i, manifest::sha1_file_with(&p, buf).map_err(io(&p))?));
        }
    };
    let [a, b] = bufs;
    if todo.len() < 2 {
        return work(a);
    }
    std::thread::scope(|s| {
        let other = s.spawn(|| work(b));
        let mut mine = work(a)?;
        mine.extend(
            other
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))?,
        );
        Ok(mine)
    })
}

/// The manifest of restore point `stamp` (of `contents`, as scanned): sha1 by
/// encrypted path, checked against the MAC in its sealed record first.
///
/// # Errors
/// No restore point, no manifest for it, a tampered manifest, or a transfer/parse
/// failure.
pub fn manifest_of(
    runner: &dyn Runner,
    target: &Target,
    contents: &crate::target::Contents,
    stamp: &str,
) -> Result<BTreeMap<Vec<u8>, [u8; 20]>, VerifyError> {
    let sub = format!("manifests/{stamp}.sha1");
    let data = checked_manifest(runner, target, contents, stamp)?;
    Ok(manifest::parse(&sub, &data)?
        .into_iter()
        .map(|e| (e.path, e.sha1))
        .collect())
}

/// The manifest of restore point `stamp`, for the next one to take its sums from
/// ([`PrevManifest`]). Its hashes go into the new manifest, which the new record seals:
/// a provider's edit must not be laundered into an authenticated manifest, so it is
/// checked against its MAC on the way in.
///
/// # Errors
/// As [`manifest_of`].
pub fn prev_manifest(
    runner: &dyn Runner,
    target: &Target,
    contents: &crate::target::Contents,
    stamp: &str,
) -> Result<PrevManifest, VerifyError> {
    let copy = target
        .checked_manifest_copy(runner, contents, stamp, "sha1")?
        .ok_or_else(|| VerifyError::NoManifest {
            target: target.address().to_string(),
            stamp: stamp.into(),
        })?;
    Ok(PrevManifest {
        copy,
        file: format!("manifests/{stamp}.sha1"),
    })
}

/// The bytes of `manifests/STAMP.sha1`, checked against the MAC its record carries.
fn checked_manifest(
    runner: &dyn Runner,
    target: &Target,
    contents: &crate::target::Contents,
    stamp: &str,
) -> Result<Vec<u8>, VerifyError> {
    let data = target
        .fetch(runner, Area::Manifests, &format!("{stamp}.sha1"))?
        .ok_or_else(|| VerifyError::NoManifest {
            target: target.address().to_string(),
            stamp: stamp.into(),
        })?;
    target.check_manifest(contents, stamp, "sha1", &data)?;
    Ok(data)
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Compares a local tree (a local target's `current/`) with a manifest.
///
/// # Errors
/// The tree cannot be read.
pub fn check_local(
    current: &Path,
    want: &BTreeMap<Vec<u8>, [u8; 20]>,
) -> Result<Report, VerifyError> {
    let have: BTreeMap<Vec<u8>, [u8; 20]> = manifest::build(current)?
        .into_iter()
        .map(|e| (e.path, e.sha1))
        .collect();
    Ok(compare(&have, want))
}

/// What `current/` holds (`have`: path → sha1) against the manifest `want`.
fn compare(have: &BTreeMap<Vec<u8>, [u8; 20]>, want: &BTreeMap<Vec<u8>, [u8; 20]>) -> Report {
    let mut r = Report {
        checked: have.len() as u64,
        ..Report::default()
    };
    for (p, s) in want {
        match have.get(p) {
            None => r.missing.push(lossy(p)),
            Some(h) if h != s => r.differing.push(lossy(p)),
            Some(_) => {}
        }
    }
    r.extra = have
        .keys()
        .filter(|p| !want.contains_key(*p))
        .map(|p| lossy(p))
        .collect();
    r
}

/// Compares the target's `current/` with the encrypted view at `view` by rsync
/// `--dry-run --checksum --itemize-changes` (the checksums of the remote files are
/// computed on the backup host; no data is downloaded), judging each difference with
/// the manifest `want` of the last run.
///
/// # Errors
/// rsync failing.
pub fn check_view_against_target(
    runner: &dyn Runner,
    target: &Target,
    view: &Path,
    want: &BTreeMap<Vec<u8>, [u8; 20]>,
) -> Result<Report, VerifyError> {
    let out = target.compare_view(runner, view)?;
    let mut r = Report {
        checked: want.len() as u64,
        ..Report::default()
    };
    for line in out.lines() {
        let (code, path) = match line.split_once(' ') {
            Some((c, p)) => (c, p.trim_start()),
            None => continue,
        };
        let pb = path.as_bytes().to_vec();
        if code == "*deleting" {
            if path.ends_with('/') {
                // A directory only on the target: its files are listed one by one too.
                continue;
            }
            // On the target, not in the view: fine if the last run had it (the source
            // deleted it since), an extra file otherwise.
            if !want.contains_key(&pb) {
                r.extra.push(path.into());
            }
        } else if code.len() >= 3 && code.as_bytes()[1] == b'f' {
            let new = code[2..].starts_with('+');
            match want.get(&pb) {
                None if new => {} // created in the source since the last run
                None => r.unverifiable.push(path.into()),
                Some(s) => {
                    let now =
                        manifest::sha1_file(&view.join(path)).map_err(io(&view.join(path)))?;
                    if &now != s {
                        r.unverifiable.push(path.into());
                    } else if new {
                        r.missing.push(path.into());
                    } else {
                        r.differing.push(path.into());
                    }
                }
            }
        }
    }
    Ok(r)
}

/// Loads and unlocks a job's key.
///
/// # Errors
/// Unreadable or too open key files, wrong password.
pub fn unlock(job: &Job) -> Result<(KeyConfig, MasterKey), VerifyError> {
    let key = KeyConfig::load(&job.key_config)?;
    let master = key.unlock_with_passfile(&job.passfile)?;
    Ok((key, master))
}

/// Deep check: every file of the target's `current/` (as listed by the manifest) is
/// decrypted in memory and compared with the plaintext at its decrypted path in
/// `snapshot`. Remote files are fetched one at a time into a scratch file that is
/// deleted right after, so no second copy of the backup exists on disk.
///
/// # Errors
/// Transfer failures; per-file problems go into the report.
pub fn deep(
    runner: &dyn Runner,
    target: &Target,
    keys: &Keys,
    snapshot: &Path,
    want: &BTreeMap<Vec<u8>, [u8; 20]>,
) -> Result<Report, VerifyError> {
    let mut r = Report::default();
    for cpath in want.keys() {
        // Long-named files need their `.name` file to be placed; not resolved here.
        let last = cpath.rsplit(|b| *b == b'/').next().unwrap_or(cpath);
        if names::is_support_cpath(cpath) || last.starts_with(LONGNAME_PREFIX.as_bytes()) {
            continue;
        }
        let shown = lossy(cpath);
        let plain = match names::decrypt_cpath(keys, cpath) {
            Some(p) => p,
            None => {
                // Long-named components need their `.name` file; not resolved here.
                r.unverifiable
                    .push(format!("{shown} (long or undecryptable name)"));
                continue;
            }
        };
        let cipher = target.read_current(runner, cpath)?;
        r.checked += 1;
        let cipher = match cipher {
            Ok(c) => c,
            Err(e) => {
                r.missing.push(format!("{shown}: {e}"));
                continue;
            }
        };
        let ppath = snapshot.join(OsStr::from_bytes(&plain));
        let mut expected = Vec::new();
        if let Err(e) = fs::File::open(&ppath).and_then(|mut f| f.read_to_end(&mut expected)) {
            r.unverifiable
                .push(format!("{shown}: {}: {e}", ppath.display()));
            continue;
        }
        match content::decrypt_all(
            keys,
            &cipher,
            Some(&content::FileIvs::for_cpath(cpath).file_id),
        ) {
            Ok(p) if p == expected => {}
            Ok(_) => r
                .wrong_plaintext
                .push(format!("{shown} ({})", lossy(&plain))),
            Err(why) => r
                .wrong_plaintext
                .push(format!("{shown} ({}): {why}", lossy(&plain))),
        }
    }
    Ok(r)
}

/// The work of `snapveil verify`, also used by a run every `verify_every` runs.
///
/// # Errors
/// Key, snapshot, mount or transfer failures.
pub fn verify_job(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    deep_check: bool,
) -> Result<Report, VerifyError> {
    let (key, master) = unlock(job)?;
    let target = Target::for_job(cfg, job).with_auth(crate::crypto::RecordKey::new(&master));
    let contents = target.scan(runner)?;
    let (chain, notes) = chain_report(cfg, job, &target, &contents)?;
    let stamp = contents
        .points
        .last()
        .cloned()
        .ok_or_else(|| VerifyError::NoRun {
            target: target.address().to_string(),
        })?;
    let want = match manifest_of(runner, &target, &contents, &stamp) {
        Ok(w) => w,
        // A tampered manifest is a finding, reported with the rest.
        Err(VerifyError::Target(crate::target::TargetError::Tampered { file, why, .. })) => {
            return Ok(Report {
                tampered: [chain, vec![format!("TAMPERED: {file}: {why}")]].concat(),
                notes,
                ..Report::default()
            })
        }
        Err(e) => return Err(e),
    };
    tracing::info!(stamp = %stamp, files = want.len(), "verifying against the manifest of the last run");
    let here = target.current_here();
    if let (Some(current), false) = (&here, deep_check) {
        let mut r = check_local(current, &want)?;
        r.tampered = chain;
        r.notes = notes;
        return Ok(r);
    }
    // An ssh target with a shell hashes its own files: checked against the
    // authenticated manifest alone, without reading the source (a weekly verify).
    if !deep_check {
        if let Some(have) = target.remote_sums(runner)? {
            let mut r = compare(&have, &want);
            r.tampered = chain;
            r.notes = notes;
            return Ok(r);
        }
    }
    // A fresh snapshot: the view to compare a remote target with, and the plaintext for
    // a deep check. The job lock keeps a run from using the same names meanwhile.
    let _lock = crate::lock::JobLock::acquire(&cfg.state_dir, &job.name)?;
    let guard = crate::job::take_snapshot(runner, cfg, job, &crate::snapshot::now_stamp())
        .map_err(|e| VerifyError::Snapshot(crate::snapshot::error_chain(&e)))?;
    let snap = guard.path().to_path_buf();
    let mut report = match &here {
        Some(current) => check_local(current, &want)?,
        None => {
            let mp = cfg
                .state_dir
                .join("view")
                .join(format!("{}.verify", job.name));
            let view = crate::job::mount_view(
                job,
                &snap,
                guard.consistent(),
                &mp,
                key.clone(),
                master.clone(),
            )?;
            let r = check_view_against_target(runner, &target, &mp, &want);
            view.unmount()?;
            r?
        }
    };
    if deep_check {
        let keys = Keys::new(&master, key.flags);
        let d = deep(runner, &target, &keys, &snap, &want)?;
        report.wrong_plaintext = d.wrong_plaintext;
        report.missing.extend(d.missing);
        report.unverifiable.extend(d.unverifiable);
    }
    guard
        .release()
        .map_err(|e| VerifyError::Snapshot(crate::snapshot::error_chain(&e)))?;
    report.tampered = chain;
    report.notes = notes;
    Ok(report)
}

/// The chain check of a target's records (tampered records, gaps, rollback against what
/// this machine last wrote: [`crate::target::chain`]) as report lines: problems, and
/// notes (unauthenticated restore points of older snapveils, accepted damage).
///
/// # Errors
/// The agent's chain state cannot be read.
pub fn chain_report(
    cfg: &Config,
    job: &Job,
    target: &Target,
    contents: &crate::target::Contents,
) -> Result<(Vec<String>, Vec<String>), VerifyError> {
    let state =
        crate::target::chain::load_state(&cfg.state_dir, &job.name, &target.address().to_string())?;
    let v = contents.chain(state.as_ref());
    let mut notes = v.warnings;
    let old = contents.unsealed();
    if !old.is_empty() {
        notes.push(format!(
            "{} restore point(s) unauthenticated (older version of snapveil, no MAC): {}",
            old.len(),
            old.join(", ")
        ));
    }
    Ok((v.problems.iter().map(ToString::to_string).collect(), notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(manifest: &str, files: &[&str], rehash: &[&str]) -> Result<Vec<Option<u8>>, String> {
        let lines = manifest::Reader::new("m.sha1", manifest.as_bytes());
        let mut set = manifest::PathSet::new();
        for p in rehash {
            set.insert(p.as_bytes());
        }
        set.seal();
        let e = |e: VerifyError| e.to_string();
        let mut m = Merge::new(lines).map_err(e)?;
        let mut got = Vec::new();
        for f in files {
            let f = f.as_bytes();
            let s = if set.contains(f) {
                None
            } else {
                m.sum_of(f).map_err(e)?
            };
            got.push(s.map(|s| s[0]));
        }
        m.finish().map_err(e)?;
        Ok(got)
    }

    fn line(sum: u8, path: &str) -> String {
        format!("{}  {path}\n", hex::encode([sum; 20]))
    }

    #[test]
    fn the_last_manifest_gives_the_sums_of_the_files_it_lists_and_no_others() {
        let m = [
            line(1, "a"),
            line(2, "a-b"),
            line(3, "a/x"),
            line(4, "b"),
            line(5, "z"),
        ]
        .concat();
        // New files, gone files, and files to hash again are not taken from it.
        let got = merged(&m, &["0", "a", "a/x", "a/y", "b", "c"], &["b"]).unwrap();
        assert_eq!(got, [None, Some(1), Some(3), None, None, None]);
        // Every file, and none.
        let all = merged(&m, &["a", "a-b", "a/x", "b", "z"], &[]).unwrap();
        assert_eq!(all, [Some(1), Some(2), Some(3), Some(4), Some(5)]);
        assert_eq!(merged(&m, &[], &[]).unwrap(), Vec::<Option<u8>>::new());
        assert_eq!(merged("", &["a"], &[]).unwrap(), [None]);
    }

    #[test]
    fn an_escaped_name_is_matched_by_its_bytes() {
        let m = format!("\\{}  a\\nb\n{}", hex::encode([7; 20]), line(8, "c"));
        assert_eq!(merged(&m, &["a\nb", "c"], &[]).unwrap(), [Some(7), Some(8)]);
    }

    #[test]
    fn a_manifest_out_of_order_or_damaged_is_not_used() {
        let m = [line(1, "b"), line(2, "a")].concat();
        let e = merged(&m, &["a", "b"], &[]).unwrap_err();
        assert!(e.contains("m.sha1:2: not in path order"), "{e}");
        let twice = [line(1, "a"), line(2, "a")].concat();
        assert!(merged(&twice, &["a"], &[]).is_err());
        let bad = [line(1, "a"), "xyz  b\n".into()].concat();
        let e = merged(&bad, &["a", "b"], &[]).unwrap_err();
        assert!(e.contains("m.sha1:2: not a sha1sum line"), "{e}");
    }

    /// A tree of `n` small files (two directories deep) and its walk.
    fn tree(t: &Path, n: usize) -> ViewWalk {
        use crate::manifest::meta::{Kind, MetaEntry};
        let e = |path: String, kind: Kind| MetaEntry {
            path: path.into_bytes(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
        };
        let mut found = vec![(e(String::new(), Kind::Dir), None, 0)];
        for d in 0..n.div_ceil(1000) {
            fs::create_dir(t.join(format!("d{d}"))).unwrap();
            found.push((e(format!("d{d}"), Kind::Dir), None, 0));
        }
        for i in 0..n {
            let p = format!("d{}/f{i}", i / 1000);
            fs::write(t.join(&p), format!("file {i}")).unwrap();
            found.push((e(p, Kind::File), Some(0), 0));
        }
        ViewWalk::from_found(t, found)
    }

    fn prev(t: &Path, lines: &str, rehash: &[&str]) -> Reuse {
        let p = t.join("prev.sha1");
        fs::write(&p, lines).unwrap();
        let mut set = manifest::PathSet::new();
        for r in rehash {
            set.insert(r.as_bytes());
        }
        set.seal();
        Reuse {
            prev: PrevManifest {
                copy: crate::target::LocalCopy::at(p),
                file: "prev.sha1".into(),
            },
            rehash: set,
            known: Vec::new(),
        }
    }

    /// The manifest written as it is hashed, a step at a time on two threads, is what
    /// hashing every file finds, in path order.
    #[test]
    fn the_manifest_made_in_steps_is_every_files_sum_in_path_order() {
        let t = tempfile::TempDir::new().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        // Two steps of HASH_STEP files and a third of 1,007, in four directories.
        let w = tree(&src, 2 * HASH_STEP + 1000 + 7);
        let out = t.path().join("m.sha1");
        hash_view(&w, None, &out).unwrap();
        let want = manifest::format(&manifest::build(&src).unwrap());
        assert_eq!(fs::read(&out).unwrap(), want);
        assert_eq!(want.iter().filter(|b| **b == b'\n').count(), w.file_count());
    }

    /// Sums come from the last manifest for the files it lists and the run does not
    /// hash again; a last manifest out of order anywhere (even after the last file) is
    /// not used at all: the file is written again, every file hashed.
    #[test]
    fn the_last_manifest_gives_sums_unless_it_is_out_of_order_anywhere() {
        let t = tempfile::TempDir::new().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let w = tree(&src, 3);
        let all = manifest::build(&src).unwrap();
        let real = |i: usize| hex::encode(all[i].sha1);
        let fake = |b: u8| hex::encode([b; 20]);
        let out = t.path().join("m.sha1");
        // d0/f0 reused, d0/f1 not listed, d0/f2 listed but hashed again.
        let r = prev(
            t.path(),
            &format!("{}  d0/f0\n{}  d0/f2\n", fake(1), fake(2)),
            &["d0/f2"],
        );
        hash_view(&w, Some(&r), &out).unwrap();
        assert_eq!(
            String::from_utf8(fs::read(&out).unwrap()).unwrap(),
            format!(
                "{}  d0/f0\n{}  d0/f1\n{}  d0/f2\n",
                fake(1),
                real(1),
                real(2)
            )
        );
        let want = String::from_utf8(manifest::format(&all)).unwrap();
        // Out of order after the last file the run has.
        let late = prev(
            t.path(),
            &format!("{}  d0/f0\n{}  z\n{}  y\n", fake(1), fake(2), fake(3)),
            &[],
        );
        hash_view(&w, Some(&late), &out).unwrap();
        assert_eq!(String::from_utf8(fs::read(&out).unwrap()).unwrap(), want);
        // Not a sha1sum line.
        let bad = prev(t.path(), &format!("{}  d0/f0\nxyz\n", fake(1)), &[]);
        hash_view(&w, Some(&bad), &out).unwrap();
        assert_eq!(String::from_utf8(fs::read(&out).unwrap()).unwrap(), want);
    }
}
