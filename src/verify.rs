//! Proof that a backup restores: the per-run checksum manifest of the encrypted view
//! (`TARGET/manifests/STAMP.sha1`, `sha1sum -c` format, paths relative to `current/`),
//! `snapveil verify JOB` (the target's `current/` against the last manifest, without
//! downloading data) and `--deep` (the target's ciphertext decrypted in memory and
//! compared with a fresh snapshot's plaintext). Issue 6.
//!
//! Owns: manifests on the target, the comparisons and their report. Does not own: the
//! run pipeline (job.rs calls [`write_manifest`] and [`check_view_against_target`]).
//!
//! A local target is hashed directly. A remote one cannot be hashed from here, so its
//! files are compared with a local tree that should equal them: the encrypted view of a
//! fresh snapshot (reverse mode is deterministic), by `rsync --dry-run --checksum
//! --itemize-changes`, where rsync computes the remote checksums on the backup host.
//! Where the source changed since the last run, the manifest decides which side is wrong.

use crate::config::{Config, Job, Target};
use crate::crypto::content::{self, CBLOCK, HEADER_LEN};
use crate::crypto::names::{self, CONF_NAME, DIRIV_NAME, LONGNAME_PREFIX};
use crate::crypto::{join_cpath, KeyConfig, Keys, MasterKey, NameMode};
use crate::exec::{Exit, Runner};
use crate::manifest::{self, Entry};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    Rsync(#[from] crate::rsync::RsyncError),
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
    #[error("no job named {0:?} in the config")]
    NoJob(String),
    #[error("config: {0}")]
    Config(#[from] crate::config::ConfigError),
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
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.differing.is_empty()
            && self.wrong_plaintext.is_empty()
    }

    pub fn print(&self) {
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

fn tmp_dir(cfg: &Config, job: &Job, what: &str) -> Result<PathBuf, VerifyError> {
    let d = cfg
        .state_dir
        .join("work")
        .join(&job.name)
        .join(crate::scratch::name(what));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).map_err(io(&d))?;
    Ok(d)
}

/// Writes `TARGET/manifests/STAMP.sha1` of the view mounted at `view` (during a run,
/// before `runs/STAMP.json`, so every restore point has its manifest).
///
/// # Errors
/// Reading the view, or writing/uploading the manifest.
pub fn write_manifest(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    stamp: &str,
    view: &Path,
) -> Result<Vec<Entry>, VerifyError> {
    let entries = build_outside_rayon(view)?;
    let data = manifest::format(&entries);
    match &job.target {
        Target::Local(root) => {
            let p = root.join("manifests").join(format!("{stamp}.sha1"));
            if let Some(d) = p.parent() {
                fs::create_dir_all(d).map_err(io(d))?;
            }
            crate::status::write_atomic(&p, &data).map_err(io(&p))?;
        }
        t => {
            let dir = tmp_dir(cfg, job, "manifest")?;
            let tmp = dir.join(format!("{stamp}.sha1"));
            fs::write(&tmp, &data).map_err(io(&tmp))?;
            let r = crate::rsync::upload(runner, &cfg.tools, t, &job.ssh_args, &tmp, "manifests/");
            let _ = fs::remove_dir_all(&dir);
            r?;
        }
    }
    Ok(entries)
}

/// `manifest::build` for a view served by this process: the FUSE handlers encrypt on
/// rayon's pool, so hashing must not run on that pool too (its workers would block in
/// reads only the pool can answer: a deadlock). Two plain threads instead.
fn build_outside_rayon(view: &Path) -> Result<Vec<Entry>, VerifyError> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), VerifyError> {
        for e in fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let ft = e.file_type().map_err(io(&e.path()))?;
            if ft.is_dir() {
                walk(&e.path(), out)?;
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
        Ok(())
    }
    let mut paths = Vec::new();
    walk(view, &mut paths)?;
    let half = paths.len().div_ceil(2).max(1);
    let hash = |chunk: &[PathBuf]| -> Result<Vec<Entry>, VerifyError> {
        chunk
            .iter()
            .map(|p| {
                let sha1 = manifest::sha1_file(p).map_err(io(p))?;
                let rel = p.strip_prefix(view).expect("under root");
                Ok(Entry {
                    path: rel.as_os_str().as_bytes().to_vec(),
                    sha1,
                })
            })
            .collect()
    };
    let mut out = std::thread::scope(|s| {
        let hs: Vec<_> = paths
            .chunks(half)
            .map(|c| s.spawn(move || hash(c)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("hash thread"))
            .collect::<Result<Vec<_>, _>>()
    })?
    .concat();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Restore points on the target (stamps of `runs/*.json`), oldest first.
///
/// # Errors
/// Listing the target failed.
pub fn restore_points(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
) -> Result<Vec<String>, VerifyError> {
    let names: Vec<String> = match &job.target {
        Target::Local(root) => match fs::read_dir(root.join("runs")) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&root.join("runs"))(e)),
        },
        t => crate::rsync::list(runner, &cfg.tools, t, &job.ssh_args, "runs")?
            .into_iter()
            .filter(|l| !l.is_dir)
            .map(|l| l.name)
            .collect(),
    };
    let mut stamps: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_suffix(".json"))
        .filter(|s| crate::snapshot::valid_stamp(s))
        .map(str::to_string)
        .collect();
    stamps.sort();
    Ok(stamps)
}

/// Fetches a small file below the target root (`manifests/STAMP.sha1`); `None` if absent.
///
/// # Errors
/// The transfer failed for another reason than the file missing.
pub fn fetch_small(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    sub: &str,
) -> Result<Option<Vec<u8>>, VerifyError> {
    match &job.target {
        Target::Local(root) => match fs::read(root.join(sub)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&root.join(sub))(e)),
        },
        t => {
            let dir = tmp_dir(cfg, job, "fetch")?;
            let local = dir.join("file");
            let cmd = crate::rsync::base(&cfg.tools, t, &job.ssh_args)
                .arg(t.rsync_dest(sub))
                .arg(&local);
            let out = runner
                .output(&cmd)
                .map_err(crate::rsync::RsyncError::Spawn)?;
            let r = match out.exit {
                Exit::Code(0) => fs::read(&local).map(Some).map_err(io(&local)),
                Exit::Code(23) if out.stderr_str().contains("No such file") => Ok(None),
                exit => Err(crate::rsync::RsyncError::Failed {
                    target: t.to_string(),
                    exit,
                    stderr: out.stderr_str(),
                }
                .into()),
            };
            let _ = fs::remove_dir_all(&dir);
            r
        }
    }
}

/// The manifest of the newest restore point: (stamp, entries by encrypted path).
///
/// # Errors
/// No restore point, no manifest for it, or a transfer/parse failure.
pub fn manifest_of(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    stamp: &str,
) -> Result<BTreeMap<Vec<u8>, [u8; 20]>, VerifyError> {
    let sub = format!("manifests/{stamp}.sha1");
    let data = fetch_small(runner, cfg, job, &sub)?.ok_or_else(|| VerifyError::NoManifest {
        target: job.target.to_string(),
        stamp: stamp.into(),
    })?;
    Ok(manifest::parse(&sub, &data)?
        .into_iter()
        .map(|e| (e.path, e.sha1))
        .collect())
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
    Ok(r)
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
    cfg: &Config,
    job: &Job,
    view: &Path,
    want: &BTreeMap<Vec<u8>, [u8; 20]>,
) -> Result<Report, VerifyError> {
    let cmd = crate::rsync::base(&cfg.tools, &job.target, &job.ssh_args)
        .args([
            "--dry-run",
            "--recursive",
            "--links",
            "--checksum",
            "--delete",
            "--itemize-changes",
        ])
        .arg(format!("{}/", view.display()))
        .arg(job.target.rsync_dest("current/"));
    let out = cmd
        .run_checked(runner)
        .map_err(crate::rsync::RsyncError::from)?;
    let mut r = Report {
        checked: want.len() as u64,
        ..Report::default()
    };
    for line in out.stdout_str().lines() {
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
    cfg: &Config,
    job: &Job,
    keys: &Keys,
    snapshot: &Path,
    want: &BTreeMap<Vec<u8>, [u8; 20]>,
) -> Result<Report, VerifyError> {
    let mut r = Report::default();
    let scratch = tmp_dir(cfg, job, "deep")?;
    for cpath in want.keys() {
        let last = cpath.rsplit(|b| *b == b'/').next().unwrap_or(cpath);
        if last == DIRIV_NAME.as_bytes()
            || last.starts_with(LONGNAME_PREFIX.as_bytes())
            || cpath == CONF_NAME.as_bytes()
        {
            continue;
        }
        let shown = lossy(cpath);
        let plain = match decrypt_cpath(keys, cpath) {
            Some(p) => p,
            None => {
                // Long-named components need their `.name` file; not resolved here.
                r.unverifiable
                    .push(format!("{shown} (long or undecryptable name)"));
                continue;
            }
        };
        let cipher = match &job.target {
            Target::Local(root) => fs::read(root.join("current").join(OsStr::from_bytes(cpath))),
            t => {
                let local = scratch.join("f");
                let cmd = crate::rsync::base(&cfg.tools, t, &job.ssh_args)
                    .arg(t.rsync_dest(&format!("current/{shown}")))
                    .arg(&local);
                cmd.run_checked(runner)
                    .map_err(crate::rsync::RsyncError::from)?;
                let b = fs::read(&local);
                let _ = fs::remove_file(&local);
                b
            }
        };
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
        match decrypt_bytes(keys, cpath, &cipher) {
            Ok(p) if p == expected => {}
            Ok(_) => r
                .wrong_plaintext
                .push(format!("{shown} ({})", lossy(&plain))),
            Err(why) => r
                .wrong_plaintext
                .push(format!("{shown} ({}): {why}", lossy(&plain))),
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    Ok(r)
}

/// Plaintext relative path of an encrypted one (long names are not resolvable from the
/// path alone: `None`).
pub fn decrypt_cpath(keys: &Keys, cpath: &[u8]) -> Option<Vec<u8>> {
    if keys.flags.names == NameMode::Plaintext {
        return Some(cpath.to_vec());
    }
    let mut cdir: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    for comp in cpath.split(|b| *b == b'/') {
        if names::is_long_hash(comp) {
            return None;
        }
        let iv = names::dir_iv(keys.flags.names, &cdir);
        let p = names::decrypt_name(keys, &iv, std::str::from_utf8(comp).ok()?).ok()?;
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(&p);
        cdir = join_cpath(&cdir, comp);
    }
    Some(out)
}

/// Decrypts a whole file's ciphertext in memory. The header's file ID must be the one
/// reverse mode derives from `cpath`: a file moved to another path (or another file's
/// ciphertext put in its place) fails here even though each block authenticates.
///
/// # Errors
/// Size, header or authentication failures, as text.
pub fn decrypt_bytes(keys: &Keys, cpath: &[u8], c: &[u8]) -> Result<Vec<u8>, String> {
    if content::plain_size(c.len() as u64).is_none() {
        return Err(format!("impossible ciphertext size {}", c.len()));
    }
    if c.len() as u64 <= HEADER_LEN {
        return Ok(Vec::new());
    }
    let h = HEADER_LEN as usize;
    if c[..2] != [0, 2] {
        return Err("unsupported header version".into());
    }
    let file_id: [u8; 16] = c[2..h].try_into().expect("16 bytes");
    if file_id != content::FileIvs::for_cpath(cpath).file_id {
        return Err("file ID does not belong to this path (ciphertext of another file?)".into());
    }
    let mut out = Vec::with_capacity(c.len());
    for (n, blk) in c[h..].chunks(CBLOCK as usize).enumerate() {
        let p = content::decrypt_block(keys, n as u64, Some(&file_id), blk)
            .map_err(|e| format!("block {n}: {e}"))?;
        out.extend_from_slice(&p);
    }
    Ok(out)
}

/// `snapveil verify JOB [--deep]`: exit 0 when the target's `current/` matches the last
/// manifest (and, deep, decrypts to the snapshot's plaintext), 1 otherwise.
///
/// # Errors
/// Config, key, snapshot, mount or transfer failures.
pub fn command(
    runner: &dyn Runner,
    config: &Path,
    job_name: &str,
    deep_check: bool,
) -> Result<ExitCode, VerifyError> {
    let cfg = crate::config::load(config)?;
    let job = cfg
        .job(job_name)
        .ok_or_else(|| VerifyError::NoJob(job_name.into()))?;
    let r = verify_job(runner, &cfg, job, deep_check)?;
    r.print();
    Ok(if r.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The work of `snapveil verify`, also used by a run every `verify_every` runs.
///
/// # Errors
/// As [`command`].
pub fn verify_job(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    deep_check: bool,
) -> Result<Report, VerifyError> {
    let (key, master) = unlock(job)?;
    let stamp = restore_points(runner, cfg, job)?
        .pop()
        .ok_or_else(|| VerifyError::NoRun {
            target: job.target.to_string(),
        })?;
    let want = manifest_of(runner, cfg, job, &stamp)?;
    tracing::info!(stamp = %stamp, files = want.len(), "verifying against the manifest of the last run");
    if let (Target::Local(root), false) = (&job.target, deep_check) {
        return check_local(&root.join("current"), &want);
    }
    // A fresh snapshot: the view to compare a remote target with, and the plaintext for
    // a deep check. The job lock keeps a run from using the same names meanwhile.
    let _lock = crate::lock::JobLock::acquire(&cfg.state_dir, &job.name)?;
    let work = crate::snapshot::cmd::work_dir(&cfg.state_dir, &job.name);
    let guard = crate::snapshot::take(
        runner,
        &job.name,
        &crate::snapshot::now_stamp(),
        &job.source,
        &job.snapshot,
        &cfg.tools.snapshot,
        &work,
    )
    .map_err(|e| VerifyError::Snapshot(crate::snapshot::error_chain(&e)))?;
    let snap = guard.path().to_path_buf();
    let mut report = match &job.target {
        Target::Local(root) => check_local(&root.join("current"), &want)?,
        _ => {
            let mp = cfg
                .state_dir
                .join("view")
                .join(format!("{}.verify", job.name));
            crate::view::cleanup_stale_mount(&mp)?;
            fs::create_dir_all(&mp).map_err(io(&mp))?;
            let view = crate::view::MountedView::mount(
                &snap,
                &mp,
                crate::view::ViewOptions {
                    key: key.clone(),
                    master: master.clone(),
                    excludes: job.excludes.clone(),
                },
            )?;
            let r = check_view_against_target(runner, cfg, job, &mp, &want);
            view.unmount()?;
            r?
        }
    };
    if deep_check {
        let keys = Keys::new(&master, key.flags);
        let d = deep(runner, cfg, job, &keys, &snap, &want)?;
        report.wrong_plaintext = d.wrong_plaintext;
        report.missing.extend(d.missing);
        report.unverifiable.extend(d.unverifiable);
    }
    guard
        .release()
        .map_err(|e| VerifyError::Snapshot(crate::snapshot::error_chain(&e)))?;
    Ok(report)
}
