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
//! Symlinks and empty directories are not in manifests (sha1sum lists regular files),
//! so a restore restores regular files and the directories holding them.

use crate::config::{Config, Job};
use crate::crypto::names::{self, CONF_NAME, DIRIV_NAME};
use crate::crypto::{join_cpath, Keys, NameMode};
use crate::exec::{Exit, Runner};
use crate::verify::{self, VerifyError};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
    #[error("listing generations: {0}")]
    Generations(String),
    #[error(transparent)]
    Rsync(#[from] crate::rsync::RsyncError),
    #[error(transparent)]
    Decrypt(#[from] crate::decrypt::DecryptError),
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
    pub files: u64,
    /// Plaintext paths asked for that did not exist at the restore point.
    pub not_found: Vec<String>,
    /// Files that existed at the point whose version is gone (pruned generation).
    pub unrecoverable: Vec<String>,
}

/// `snapveil restore`.
///
/// # Errors
/// Config, key, target or output problems.
pub fn command(
    runner: &dyn Runner,
    config: &Path,
    job_name: &str,
    paths: &[String],
    to: &Path,
    as_of: Option<&str>,
    raw: bool,
) -> Result<ExitCode, RestoreError> {
    let cfg = crate::config::load(config).map_err(VerifyError::from)?;
    let job = cfg
        .job(job_name)
        .ok_or_else(|| VerifyError::NoJob(job_name.into()))?;
    let r = restore(runner, &cfg, job, paths, to, as_of, raw)?;
    for p in &r.not_found {
        println!("not in the backup as of {}: {p}", r.point);
    }
    for p in &r.unrecoverable {
        println!("UNRECOVERABLE (its version was pruned): {p}");
    }
    println!(
        "restored {} files as of {} into {}",
        r.files,
        r.point,
        to.display()
    );
    Ok(if r.not_found.is_empty() && r.unrecoverable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Restores `paths` (plaintext, relative to the source root) as of the restore point
/// picked by `as_of` into `to` (created if missing, must be empty).
///
/// # Errors
/// As [`command`].
pub fn restore(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    paths: &[String],
    to: &Path,
    as_of: Option<&str>,
    raw: bool,
) -> Result<Report, RestoreError> {
    if to.exists() && fs::read_dir(to).map_err(io(to))?.next().is_some() {
        return Err(RestoreError::OutNotEmpty { path: to.into() });
    }
    crate::scratch::sweep(&crate::snapshot::cmd::work_dir(&cfg.state_dir, &job.name));
    let (key, master) = verify::unlock(job)?;
    let keys = Keys::new(&master, key.flags);
    let points = verify::restore_points(runner, cfg, job)?;
    let as_of = as_of.map(as_of_stamp).transpose()?;
    let point =
        pick_point(&points, as_of.as_deref()).ok_or_else(|| RestoreError::NoPointBefore {
            target: job.target.to_string(),
            time: as_of.clone().unwrap_or_else(|| "now".into()),
        })?;
    let want = verify::manifest_of(runner, cfg, job, &point)?;
    let mut report = Report {
        point: point.clone(),
        ..Report::default()
    };
    // The encrypted files to fetch, with their sha1 at the point.
    let mut sel: BTreeMap<Vec<u8>, [u8; 20]> = BTreeMap::new();
    for p in paths {
        let e = names::encrypt_path(&keys, p.trim_start_matches('/').as_bytes());
        let mut prefix = e.cpath.clone();
        prefix.push(b'/');
        for (c, s) in &want {
            if *c == e.cpath || c.starts_with(&prefix) || e.long_name_files.contains(c) {
                sel.insert(c.clone(), *s);
            }
        }
        // A restore of the root, or of a file: also the long-name and diriv files along
        // the way, when the manifest has them.
        for par in e.parents.iter().chain(std::iter::once(&Vec::new())) {
            let d = join_cpath(par, DIRIV_NAME.as_bytes());
            if let Some(s) = want.get(&d) {
                sel.insert(d, *s);
            }
        }
        if !want.keys().any(|c| *c == e.cpath || c.starts_with(&prefix)) {
            report.not_found.push(p.clone());
        }
    }
    let stage = if raw {
        to.to_path_buf()
    } else {
        cfg.state_dir
            .join("work")
            .join(&job.name)
            .join(format!("restore-{}", std::process::id()))
    };
    let _ = if raw {
        Ok(())
    } else {
        fs::remove_dir_all(&stage)
    };
    fs::create_dir_all(&stage).map_err(io(&stage))?;
    let result = fetch_and_check(runner, cfg, job, &keys, &point, &sel, &stage, &mut report);
    let result = result.and_then(|()| {
        if raw {
            write_raw_extras(runner, cfg, job, &keys, &stage)
        } else {
            let r = crate::decrypt::decrypt_tree(&keys, &stage, to)?;
            for (p, why) in &r.failures {
                report.unrecoverable.push(format!("{}: {why}", p.display()));
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

#[allow(clippy::too_many_arguments)]
fn fetch_and_check(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    keys: &Keys,
    point: &str,
    sel: &BTreeMap<Vec<u8>, [u8; 20]>,
    stage: &Path,
    report: &mut Report,
) -> Result<(), RestoreError> {
    let list = stage.with_extension("files-from");
    let mut data = Vec::new();
    for c in sel.keys() {
        data.extend_from_slice(c);
        data.push(0);
    }
    fs::write(&list, &data).map_err(io(&list))?;
    // current/ first, then the generations newer than the point, newest first: each
    // overwrites, so the oldest version after the point wins.
    let mut gens = crate::job::generations(runner, cfg, job)
        .map_err(|e| RestoreError::Generations(format!("{e:#}")))?;
    gens.retain(|g| g.as_str() > point);
    gens.reverse();
    let sources: Vec<String> = std::iter::once("current".to_string())
        .chain(gens.iter().map(|g| format!("generations/{g}")))
        .collect();
    let mut r: Result<(), RestoreError> = Ok(());
    for src in &sources {
        let cmd = crate::rsync::base(&cfg.tools, &job.target, &job.ssh_args)
            .args(["--archive", "--numeric-ids", "--ignore-times", "--from0"])
            .arg(format!("--files-from={}", list.display()))
            .arg(job.target.rsync_dest(&format!("{src}/")))
            .arg(format!("{}/", stage.display()));
        let out = match runner.output(&cmd) {
            Ok(o) => o,
            Err(e) => {
                r = Err(crate::rsync::RsyncError::Spawn(e).into());
                break;
            }
        };
        match out.exit {
            Exit::Code(0) => {}
            // 23: some listed files are not in this source, the normal case.
            Exit::Code(23) => {}
            exit => {
                r = Err(crate::rsync::RsyncError::Failed {
                    target: job.target.to_string(),
                    exit,
                    stderr: out.stderr_str(),
                }
                .into());
                break;
            }
        }
    }
    let _ = fs::remove_file(&list);
    r?;
    for (c, s) in sel {
        let p = stage.join(OsStr::from_bytes(c));
        let is_diriv = c.ends_with(DIRIV_NAME.as_bytes());
        match crate::manifest::sha1_file(&p) {
            Ok(h) if h == *s => report.files += u64::from(!is_diriv),
            // A deleted directory's diriv is not in any generation; it is derived.
            _ if is_diriv => {
                let _ = fs::remove_file(&p);
            }
            Ok(_) => {
                fs::remove_file(&p).map_err(io(&p))?;
                report.unrecoverable.push(describe(keys, c));
            }
            Err(_) => report.unrecoverable.push(describe(keys, c)),
        }
    }
    Ok(())
}

fn describe(keys: &Keys, c: &[u8]) -> String {
    match verify::decrypt_cpath(keys, c) {
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
    cfg: &Config,
    job: &Job,
    keys: &Keys,
    root: &Path,
) -> Result<(), RestoreError> {
    if keys.flags.names == NameMode::DirIv {
        add_dirivs(root, b"")?;
    }
    let conf = verify::fetch_small(runner, cfg, job, &format!("current/{CONF_NAME}"))?;
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
