//! `snapveil restore JOB PATH... --to DIR [--as-of TIME] [--raw]`: fetches only the
//! encrypted files the named plaintext paths need and decrypts them. Issue 6.
//!
//! Plaintext paths map to encrypted ones locally (reverse mode derives every directory
//! IV from the encrypted path: `crypto::names::encrypt_path`), so nothing is listed or
//! downloaded beyond the files asked for. As of restore point i (docs/retention.md):
//! the paths that existed are those of `manifests/i.sha1`; each one's version is the one
//! in the oldest generation newer than i that holds it, else the one in `current/`.
//! Every restored file is checked against the manifest's sha1, so a version that pruning
//! made unrecoverable is reported (and not written), never silently replaced by a newer
//! one. `--raw` writes the encrypted files instead, with the `gocryptfs.diriv` files a
//! generation lacks and `gocryptfs.conf`, so stock `gocryptfs` can mount the result.
//!
//! Everything else comes from the point's record `manifests/i.meta` (`manifest::meta`):
//! which entries existed (so `/` restores the whole source, and symlinks, FIFOs and empty
//! directories are found), and each one's type, mode, owner, mtime and symlink target as
//! that run saw them. Those cannot come from the target's copies: rsync applies a mode-,
//! owner- or mtime-only change in place, so no generation keeps the old one. Non-regular
//! entries are recreated in encrypted form in the stage and decrypted with everything
//! else (`decrypt::decrypt_tree_recorded`, which also decrypts the link targets); the
//! recorded attributes are applied to the output, directories after their contents.
//! A point from before `.meta` files restores regular files and their directories only,
//! and says so.
//!
//! The record and the manifest come from the target, which may be hostile: paths with
//! `..`, `.` or empty components, or running through something not recorded as a
//! directory, are refused before anything is written, so nothing lands outside `--to`.

use crate::config::{Config, Job};
use crate::crypto::names::{self, CONF_NAME, DIRIV_NAME};
use crate::crypto::{join_cpath, Keys, NameMode};
use crate::exec::Runner;
use crate::manifest::meta::{self, Kind, MetaEntry};
use crate::target::{Area, Target};
use crate::verify::{self, VerifyError};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--as-of {0:?}: not a stamp (YYYYMMDDTHHMMSSZ), RFC 3339 time or \"YYYY-MM-DD HH:MM:SS\""
    )]
    BadTime(String),
    #[error("{target}: no restore point at or before {time}")]
    NoPointBefore { target: String, time: String },
    #[error("{path}: output directory is not empty; refusing to write into it")]
    OutNotEmpty { path: PathBuf },
    #[error(transparent)]
    Rsync(#[from] crate::target::RsyncError),
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    #[error(transparent)]
    Decrypt(#[from] crate::decrypt::DecryptError),
    #[error(transparent)]
    Meta(#[from] meta::MetaError),
    #[error("{file}: entry {path:?} {why}; refusing to restore from it")]
    BadMeta {
        file: String,
        path: String,
        why: String,
    },
    #[error("{0}: a path with a `..` component names nothing inside the backup")]
    DotDot(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Io {
        path: path.into(),
        source,
    }
}

/// `--as-of` as a stamp: a stamp as is, or a time (RFC 3339, or local `YYYY-MM-DD
/// HH:MM:SS`) converted to UTC.
///
/// # Errors
/// None of those forms.
pub fn as_of_stamp(t: &str) -> Result<String, RestoreError> {
    use chrono::TimeZone;
    if crate::snapshot::valid_stamp(t) {
        return Ok(t.into());
    }
    let fmt = "%Y%m%dT%H%M%SZ";
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&chrono::Utc).format(fmt).to_string());
    }
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(n) = chrono::NaiveDateTime::parse_from_str(t, f) {
            if let Some(d) = chrono::Local.from_local_datetime(&n).earliest() {
                return Ok(d.with_timezone(&chrono::Utc).format(fmt).to_string());
            }
        }
    }
    Err(RestoreError::BadTime(t.into()))
}

/// The newest restore point at or before `as_of` (the newest of all when `None`).
pub fn pick_point(points: &[String], as_of: Option<&str>) -> Option<String> {
    points
        .iter()
        .rfind(|p| as_of.is_none_or(|t| p.as_str() <= t))
        .cloned()
}

/// What a restore did.
#[derive(Debug, Default)]
pub struct Report {
    pub point: String,
    /// Regular files written (plaintext files; with `--raw` the encrypted files, without
    /// the `gocryptfs.diriv`, `.name` and `gocryptfs.conf` files that serve them).
    pub files: u64,
    /// Plaintext paths asked for that did not exist at the restore point.
    pub not_found: Vec<String>,
    /// Entries that existed at the point and could not be restored: (path, why).
    pub unrecoverable: Vec<(String, String)>,
    /// What the user should know although nothing failed (an old restore point, no root).
    pub notes: Vec<String>,
    /// Tampered records, a truncated or rolled-back target (issue 14): the restore is
    /// reported as failed, though what it wrote was checked.
    pub tampered: Vec<String>,
}

/// A requested path as plaintext bytes relative to the source root, without empty or
/// `.` components; empty for the root (`/`, `.`, `""`, `./`).
///
/// # Errors
/// A `..` component: it would name something outside the source.
pub fn normalize(p: &OsStr) -> Result<Vec<u8>, RestoreError> {
    let mut out = Vec::new();
    for c in p.as_bytes().split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(RestoreError::DotDot(PathBuf::from(p))),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

fn is_under(c: &[u8], sel: &[u8]) -> bool {
    sel.is_empty() || c == sel || (c.starts_with(sel) && c.get(sel.len()) == Some(&b'/'))
}

fn parent_of(c: &[u8]) -> &[u8] {
    c.iter().rposition(|b| *b == b'/').map_or(&[], |i| &c[..i])
}

/// The run's metadata by encrypted path, checked so that staging it cannot write
/// outside the stage: every entry's parent must be recorded as a directory (so no path
/// runs through a symlink the record creates), and each path at most once.
fn load_meta(file: &str, data: &[u8]) -> Result<BTreeMap<Vec<u8>, MetaEntry>, RestoreError> {
    let entries = meta::parse(file, data)?;
    let mut map = BTreeMap::new();
    for e in entries {
        let path = e.path.clone();
        if map.insert(path.clone(), e).is_some() {
            return Err(RestoreError::BadMeta {
                file: file.into(),
                path: lossy(&path),
                why: "recorded twice".into(),
            });
        }
    }
    for (p, _) in map.iter().filter(|(p, _)| !p.is_empty()) {
        if !matches!(map.get(parent_of(p)).map(|e| &e.kind), Some(Kind::Dir)) {
            return Err(RestoreError::BadMeta {
                file: file.into(),
                path: lossy(p),
                why: "its parent is not recorded as a directory".into(),
            });
        }
    }
    Ok(map)
}

/// A relative path that stays below its root (the `.meta` parser checks the same).
fn safe_rel(c: &[u8]) -> bool {
    c.split(|b| *b == b'/')
        .all(|x| !x.is_empty() && x != b"." && x != b"..")
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Restores `paths` (plaintext, relative to the source root; `/` for all of it) as of
/// the restore point picked by `as_of` into `to` (created if missing, must be empty).
///
/// With the point's metadata file (`manifests/STAMP.meta`) every entry type comes back
/// with the type, mode, owner (as root), mtime and symlink target recorded by that run;
/// regular files' content is fetched and checked against `manifests/STAMP.sha1`. A
/// point made before snapveil wrote metadata restores regular files and their
/// directories, with the attributes of the fetched copies (a note says so).
///
/// # Errors
/// Key, target or output problems.
pub fn restore(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    paths: &[OsString],
    to: &Path,
    as_of: Option<&str>,
    raw: bool,
) -> Result<Report, RestoreError> {
    if to.exists() && fs::read_dir(to).map_err(io(to))?.next().is_some() {
        return Err(RestoreError::OutNotEmpty { path: to.into() });
    }
    crate::scratch::sweep(&crate::snapshot::cmd::work_dir(&cfg.state_dir, &job.name));
    let wanted: Vec<(String, Vec<u8>)> = paths
        .iter()
        .map(|p| Ok((Path::new(p).display().to_string(), normalize(p)?)))
        .collect::<Result<_, RestoreError>>()?;
    let (key, master) = verify::unlock(job)?;
    let keys = Keys::new(&master, key.flags);
    let target = Target::for_job(cfg, job).with_auth(crate::crypto::RecordKey::new(&master));
    let contents = target.scan(runner).map_err(VerifyError::from)?;
    let (tampered, chain_notes) = verify::chain_report(cfg, job, &target, &contents)?;
    let points = contents.points.clone();
    let as_of = as_of.map(as_of_stamp).transpose()?;
    let point =
        pick_point(&points, as_of.as_deref()).ok_or_else(|| RestoreError::NoPointBefore {
            target: target.address().to_string(),
            time: as_of.clone().unwrap_or_else(|| "now".into()),
        })?;
    let want = verify::manifest_of(runner, &target, &contents, &point)?;
    if let Some(bad) = want.keys().find(|c| !safe_rel(c)) {
        return Err(RestoreError::BadMeta {
            file: format!("manifests/{point}.sha1"),
            path: lossy(bad),
            why: "is absolute or has an empty, `.` or `..` component".into(),
        });
    }
    let meta_file = format!("manifests/{point}.meta");
    let recorded = match target.fetch(runner, Area::Manifests, &format!("{point}.meta"))? {
        Some(d) => {
            target.check_manifest(&contents, &point, "meta", &d)?;
            Some(load_meta(&meta_file, &d)?)
        }
        // A sealed point's record names its .meta: gone is tampered, not "older".
        None if contents.sealed.contains_key(&point) => {
            return Err(crate::target::TargetError::Tampered {
                target: target.address().to_string(),
                file: meta_file,
                why: format!("missing, but runs/{point}.json records it"),
            }
            .into())
        }
        None => None,
    };
    let mut report = Report {
        point: point.clone(),
        tampered,
        notes: chain_notes,
        ..Report::default()
    };
    if recorded.is_none() {
        report.notes.push(format!(
            "restore point {point} has no {meta_file} (made by an older snapveil): \
             restoring regular files and their directories only, with the modes and \
             mtimes of the fetched copies; symlinks, special files and empty directories \
             are not in its manifest"
        ));
    }
    // The encrypted files to fetch, with their sha1 at the point, and the entries whose
    // recorded attributes to apply.
    let mut sel: BTreeMap<Vec<u8>, [u8; 20]> = BTreeMap::new();
    let mut apply: BTreeMap<Vec<u8>, MetaEntry> = BTreeMap::new();
    for (shown, p) in &wanted {
        let e = names::encrypt_path(&keys, p);
        let found = match &recorded {
            Some(rec) => {
                let mut found = false;
                for (c, m) in rec.range(e.cpath.clone()..) {
                    if !is_under(c, &e.cpath) {
                        break;
                    }
                    found |= *c == e.cpath;
                    apply.insert(c.clone(), m.clone());
                }
                // The directories on the way and the companions of long names.
                for c in e.parents.iter().chain(&e.long_name_files) {
                    if let Some(m) = rec.get(c) {
                        apply.insert(c.clone(), m.clone());
                    }
                }
                found
            }
            None => want.keys().any(|c| is_under(c, &e.cpath)),
        };
        if !found {
            report.not_found.push(shown.clone());
            continue;
        }
        for (c, s) in want.range(e.cpath.clone()..) {
            if !is_under(c, &e.cpath) {
                break;
            }
            sel.insert(c.clone(), *s);
        }
        for c in &e.long_name_files {
            if let Some(s) = want.get(c) {
                sel.insert(c.clone(), *s);
            }
        }
        // The diriv files along the way, when the manifest has them.
        for par in e.parents.iter().chain(std::iter::once(&Vec::new())) {
            let d = join_cpath(par, DIRIV_NAME.as_bytes());
            if let Some(s) = want.get(&d) {
                sel.insert(d, *s);
            }
        }
    }
    if recorded.is_some() {
        // Regular files of the record are fetched; the manifest must list each one.
        for (c, m) in &apply {
            if m.kind == Kind::File && !sel.contains_key(c) && !names::is_support_cpath(c) {
                report.unrecoverable.push((
                    describe(&keys, c),
                    format!("recorded in {meta_file} but not in manifests/{point}.sha1"),
                ));
            }
        }
        if !raw && !nix::unistd::geteuid().is_root() {
            report.notes.push(
                "not running as root: owners are not restored (files belong to the user running the restore)"
                    .into(),
            );
        }
    }
    let stage = if raw {
        to.to_path_buf()
    } else {
        crate::snapshot::cmd::work_dir(&cfg.state_dir, &job.name)
            .join(crate::scratch::name("restore"))
    };
    let _ = if raw {
        Ok(())
    } else {
        fs::remove_dir_all(&stage)
    };
    fs::create_dir_all(&stage).map_err(io(&stage))?;
    let ctx = Ctx {
        runner,
        target: &target,
        keys: &keys,
        point: &point,
        points: &points,
        contents: &contents,
    };
    let result = ctx.fetch_and_check(&sel, &stage, &mut report);
    let result = result.and_then(|fetched| {
        if raw {
            report.files = fetched;
            write_raw_extras(runner, &target, &keys, &stage)
        } else {
            if recorded.is_some() {
                stage_entries(&apply, &stage, &mut report)?;
            }
            let r = crate::decrypt::decrypt_tree_recorded(
                &keys,
                &stage,
                to,
                recorded.as_ref().map(|_| &apply),
            )?;
            report.files = r.files;
            for (p, why) in &r.failures {
                let shown = p
                    .strip_prefix(&stage)
                    .map(|c| describe(&keys, c.as_os_str().as_bytes()))
                    .unwrap_or_else(|_| p.display().to_string());
                report.unrecoverable.push((shown, why.clone()));
            }
            Ok(())
        }
    });
    if !raw {
        let _ = fs::remove_dir_all(&stage);
    }
    result?;
    Ok(report)
}

/// Creates in the stage, in encrypted form, what is not a regular file: directories
/// (empty ones too), symlinks with the view's (encrypted) target, FIFOs, sockets and, as
/// root, device nodes; `decrypt_tree` then decrypts names and link targets as for any
/// encrypted tree. Paths come from [`load_meta`], which refused anything that could
/// lead outside the stage.
fn stage_entries(
    apply: &BTreeMap<Vec<u8>, MetaEntry>,
    stage: &Path,
    report: &mut Report,
) -> Result<(), RestoreError> {
    use nix::sys::stat::{mknod, Mode, SFlag};
    let root = nix::unistd::geteuid().is_root();
    let mut skipped_devices = 0;
    // Directories first: the parents of everything else.
    for c in apply
        .iter()
        .filter(|(_, m)| m.kind == Kind::Dir)
        .map(|(c, _)| c)
    {
        let p = stage.join(OsStr::from_bytes(c));
        match fs::symlink_metadata(&p) {
            Ok(md) if md.is_dir() => {}
            _ => fs::create_dir_all(&p).map_err(io(&p))?,
        }
    }
    for (c, m) in apply {
        let p = stage.join(OsStr::from_bytes(c));
        let private = Mode::from_bits_truncate(0o600);
        let r = match &m.kind {
            Kind::Dir | Kind::File => continue,
            Kind::Symlink(t) => std::os::unix::fs::symlink(OsStr::from_bytes(t), &p),
            Kind::Fifo => nix::unistd::mkfifo(&p, private).map_err(std::io::Error::from),
            Kind::Socket => mknod(&p, SFlag::S_IFSOCK, private, 0).map_err(std::io::Error::from),
            Kind::Char(d) | Kind::Block(d) if root => {
                let k = if matches!(m.kind, Kind::Char(_)) {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                mknod(&p, k, private, *d as libc::dev_t).map_err(std::io::Error::from)
            }
            Kind::Char(_) | Kind::Block(_) => {
                skipped_devices += 1;
                continue;
            }
        };
        r.map_err(io(&p))?;
    }
    if skipped_devices > 0 {
        report.notes.push(format!(
            "not running as root: {skipped_devices} device files not restored"
        ));
    }
    Ok(())
}

/// What fetching needs to know about the restore.
struct Ctx<'a> {
    runner: &'a dyn Runner,
    target: &'a Target,
    keys: &'a Keys,
    point: &'a str,
    points: &'a [String],
    contents: &'a crate::target::Contents,
}

impl Ctx<'_> {
    fn fetch_and_check(
        &self,
        sel: &BTreeMap<Vec<u8>, [u8; 20]>,
        stage: &Path,
        report: &mut Report,
    ) -> Result<u64, RestoreError> {
        let (runner, target, point) = (self.runner, self.target, self.point);
        let list = target.files_from(sel.keys())?;
        // current/ first, then the generations newer than the point, newest first: each
        // overwrites, so the oldest version after the point wins.
        let mut gens = target.generations(runner)?;
        gens.retain(|g| g.as_str() > point);
        gens.reverse();
        target.fetch_files(runner, &list, &gens, stage)?;
        drop(list);
        let mut newer = NewerManifests::default();
        let mut fetched = 0;
        for (c, s) in sel {
            let p = stage.join(OsStr::from_bytes(c));
            let is_diriv = c.ends_with(DIRIV_NAME.as_bytes());
            let why = match crate::manifest::sha1_file(&p) {
                Ok(h) if h == *s => {
                    fetched += u64::from(!names::is_support_cpath(c));
                    continue;
                }
                // A deleted directory's diriv is not in any generation; it is derived.
                _ if is_diriv => {
                    let _ = fs::remove_file(&p);
                    continue;
                }
                Ok(h) => {
                    fs::remove_file(&p).map_err(io(&p))?;
                    match newer.holder(self, c, &h)? {
                        Some(q) => format!(
                            "its version as of {point} was pruned: the target holds the \
                             version of restore point {q}"
                        ),
                        None => format!(
                            "the target's copy does not match manifests/{point}.sha1: \
                             tampered with or corrupt"
                        ),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => format!(
                    "missing from the target: in neither current/ nor a generation newer \
                     than {point}"
                ),
                Err(e) => format!("fetched copy unreadable: {e}"),
            };
            report.unrecoverable.push((describe(self.keys, c), why));
        }
        Ok(fetched)
    }
}

/// A manifest: sha1 by encrypted path.
type Sha1s = BTreeMap<Vec<u8>, [u8; 20]>;

/// Manifests of the restore points newer than the one restored, fetched on demand: a
/// fetched version that one of them lists is a newer version, so the wanted one was
/// pruned; one that none lists was damaged.
#[derive(Default)]
struct NewerManifests {
    loaded: Vec<(String, Option<Sha1s>)>,
}

impl NewerManifests {
    fn holder(
        &mut self,
        ctx: &Ctx<'_>,
        c: &[u8],
        h: &[u8; 20],
    ) -> Result<Option<String>, RestoreError> {
        if self.loaded.is_empty() {
            for q in ctx.points.iter().filter(|q| q.as_str() > ctx.point) {
                let m = match verify::manifest_of(ctx.runner, ctx.target, ctx.contents, q) {
                    Ok(m) => Some(m),
                    Err(VerifyError::NoManifest { .. }) => None,
                    // Reported by the chain check; it cannot name a holder.
                    Err(VerifyError::Target(crate::target::TargetError::Tampered { .. })) => None,
                    Err(e) => return Err(e.into()),
                };
                self.loaded.push((q.clone(), m));
            }
        }
        Ok(self
            .loaded
            .iter()
            .find(|(_, m)| m.as_ref().and_then(|m| m.get(c)) == Some(h))
            .map(|(q, _)| q.clone()))
    }
}

fn describe(keys: &Keys, c: &[u8]) -> String {
    match names::decrypt_cpath(keys, c) {
        Some(p) => format!(
            "{} ({})",
            String::from_utf8_lossy(&p),
            String::from_utf8_lossy(c)
        ),
        None => String::from_utf8_lossy(c).into_owned(),
    }
}

/// Writes the `gocryptfs.diriv` of every directory that lacks one (derived from its
/// encrypted path) and fetches `gocryptfs.conf`, so stock gocryptfs can mount `root`.
fn write_raw_extras(
    runner: &dyn Runner,
    target: &Target,
    keys: &Keys,
    root: &Path,
) -> Result<(), RestoreError> {
    if keys.flags.names == NameMode::DirIv {
        add_dirivs(root, b"")?;
    }
    let conf = target.fetch(runner, Area::Current, CONF_NAME)?;
    if let Some(c) = conf {
        let p = root.join(CONF_NAME);
        fs::write(&p, c).map_err(io(&p))?;
    }
    Ok(())
}

fn add_dirivs(dir: &Path, cpath: &[u8]) -> Result<(), RestoreError> {
    let d = dir.join(DIRIV_NAME);
    if !d.exists() {
        fs::write(&d, names::dir_iv(NameMode::DirIv, cpath)).map_err(io(&d))?;
    }
    for e in fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        if e.file_type().map_err(io(&e.path()))?.is_dir() {
            add_dirivs(&e.path(), &join_cpath(cpath, e.file_name().as_bytes()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_of_picks_the_newest_point_at_or_before() {
        let pts: Vec<String> = ["20261124T010000Z", "20261124T020000Z", "20261124T030000Z"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(pick_point(&pts, None).unwrap(), "20261124T030000Z");
        let t = as_of_stamp("2026-11-24T02:30:00Z").unwrap();
        assert_eq!(t, "20261124T023000Z");
        assert_eq!(pick_point(&pts, Some(&t)).unwrap(), "20261124T020000Z");
        assert_eq!(
            pick_point(&pts, Some("20261124T020000Z")).unwrap(),
            "20261124T020000Z"
        );
        assert_eq!(pick_point(&pts, Some("20261124T005959Z")), None);
        assert!(matches!(
            as_of_stamp("yesterday"),
            Err(RestoreError::BadTime(_))
        ));
    }
}
