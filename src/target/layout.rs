//! The layout of a target (the four areas, each a real directory), its run records and
//! which of them are restore points, and the stamp of a new run. Pure where it can be:
//! reading the target is [`super::Target::scan`]'s.
//!
//! A target is storage we do not control: a directory may have been replaced by a
//! symlink, a record may be junk or another job's. So a record is a restore point only
//! when it parses, names this job and its own stamp, and its manifest exists; junk is
//! reported and ignored (never kept by prune at the cost of a real point, never
//! deleted: we did not write it); another job's record stops the command, because then
//! this is not (only) our target. An area that is a symlink stops every command: rsync
//! `--backup-dir`, prune's renames and deletions would all follow it out of the target.
//!
//! The stamp of a new run must be newer than every stamp the target names (records,
//! manifests, generations, failed runs included): an equal stamp would merge two runs
//! into one generation and overwrite a record, an older one would make the run's own
//! prune delete the new point as "not the newest".

use super::{io, TargetError};
use crate::stamp::Stamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

/// The directories of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// The encrypted copy of the newest run: a plain gocryptfs directory.
    Current,
    /// `STAMP/`: what run STAMP replaced or deleted in `current/` (rsync `--backup-dir`).
    Generations,
    /// `STAMP.json`: run STAMP completed; a restore point.
    Runs,
    /// `STAMP.sha1` (sha1sum of `current/` after run STAMP) and its companions.
    Manifests,
    /// Raw ZFS mode: `zfs send` stream files, their `.sha1`, and `STAMP.json` records.
    Streams,
}

impl Area {
    pub const ALL: [Area; 5] = [
        Area::Current,
        Area::Generations,
        Area::Runs,
        Area::Manifests,
        Area::Streams,
    ];

    pub fn dir(self) -> &'static str {
        match self {
            Area::Current => "current",
            Area::Generations => "generations",
            Area::Runs => "runs",
            Area::Manifests => "manifests",
            Area::Streams => "streams",
        }
    }
}

/// `runs/STAMP.json`, as job.rs writes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunRecord {
    pub stamp: String,
    /// Always written; optional when read, so that `prune --target` (which knows no job)
    /// can read a record made by hand or by a tool.
    #[serde(default)]
    pub job: Option<String>,
    #[serde(default)]
    pub finished: Option<String>,
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub files: u64,
    /// The chain (issue 14, [`super::chain`]): this run's number on the target, its
    /// predecessor's MAC (hex), and the counter the chain is checked from. Absent in
    /// records of older snapveils.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    /// HMAC-SHA256 (hex) of `manifests/STAMP.sha1` and `manifests/STAMP.meta`: the
    /// manifests are authenticated through their record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha1_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_mac: Option<String>,
}

/// A record file as found on the target.
pub struct RecordFile {
    /// The name's stamp (`runs/STAMP.json`).
    pub stamp: String,
    /// Its bytes; `None` when it is not a regular file.
    pub data: Option<Vec<u8>>,
}

/// What a target holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    /// Restore points, oldest first.
    pub points: Vec<String>,
    /// Record files that are not restore points, with why (reported, left alone).
    pub ignored: Vec<(String, String)>,
    /// The entry with the newest stamp among restore points, manifests and generations:
    /// a new run's stamp must be newer.
    pub newest: Option<(String, String)>,
    /// Stamps of junk records: a new stamp must not be one of them (it would overwrite),
    /// but they do not order anything.
    pub taken: BTreeSet<String>,
    /// Sealed restore points: their records (the MACs of their manifests) and chain
    /// links. A restore point not in here is an older snapveil's, unauthenticated.
    pub sealed: std::collections::BTreeMap<String, (RunRecord, super::chain::Link)>,
    /// Record files whose seal fails (or that cannot be ours), with why: never restore
    /// points, always reported.
    pub tampered: Vec<(String, String)>,
    /// `runs/pruned.json`, when present and authentic.
    pub ledger: Option<super::chain::Ledger>,
    /// Restore points whose seal was not checked (no key: `prune --target`).
    pub unchecked: BTreeSet<String>,
}

impl Contents {
    /// Restore points without a seal (made by a snapveil before sealed records).
    pub fn unsealed(&self) -> Vec<&str> {
        self.points
            .iter()
            .filter(|p| !self.sealed.contains_key(*p))
            .map(String::as_str)
            .collect()
    }

    /// The chain check of these contents against what this machine last wrote.
    pub fn chain(&self, state: Option<&super::chain::Head>) -> super::chain::Verdict {
        let links: Vec<super::chain::Link> = self.sealed.values().map(|(_, l)| l.clone()).collect();
        super::chain::check(&links, &self.tampered, self.ledger.as_ref(), state)
    }
}

impl Contents {
    /// The newest stamp the target names, and the entry naming it.
    pub fn note(&mut self, stamp: &str, entry: String) {
        if self.newest.as_ref().is_none_or(|(s, _)| stamp > s.as_str()) {
            self.newest = Some((stamp.to_string(), entry));
        }
    }
}

/// The stamp in a record's or manifest's file name (`STAMP.json`, `STAMP.sha1`, ...).
pub(super) fn stamp_of(name: &str) -> Option<&str> {
    let (stem, _) = name.split_once('.')?;
    crate::snapshot::valid_stamp(stem).then_some(stem)
}

/// Record files sorted out: restore points (oldest first), files left alone with why,
/// tampered files with why, and the sealed points' records and links.
#[derive(Debug, Default)]
pub struct Classified {
    pub points: Vec<String>,
    pub ignored: Vec<(String, String)>,
    pub tampered: Vec<(String, String)>,
    pub sealed: std::collections::BTreeMap<String, (RunRecord, super::chain::Link)>,
    /// Restore points with a seal that was not checked (no key).
    pub unchecked: BTreeSet<String>,
}

/// Sorts record files into restore points and ignored ones (pure). `manifests` holds the
/// stamps that have a `manifests/STAMP.sha1`; `job` is checked when known (prune with
/// `--target` has no job). With `key`, seals are checked ([`super::chain`]): a forged
/// one makes the record tampered, and so does a missing one on a record newer than a
/// sealed one (no older snapveil wrote it after us).
///
/// # Errors
/// A record of another job.
pub fn classify(
    target: &str,
    records: Vec<RecordFile>,
    manifests: &BTreeSet<String>,
    job: Option<&str>,
    key: Option<&crate::crypto::RecordKey>,
) -> Result<Classified, TargetError> {
    use super::chain::{open, Link, Opened};
    let mut c = Classified::default();
    let mut unsealed = Vec::new();
    for r in records {
        let file = format!("runs/{}.json", r.stamp);
        let (body, mac) = match r.data.as_deref().map(|d| open(key, d)) {
            Some(Opened::Forged(_)) => {
                c.tampered.push((
                    file,
                    "its MAC does not match its contents: altered, or not written with this \
                     job's key"
                        .into(),
                ));
                continue;
            }
            Some(Opened::Authentic(b, m)) => (Some(b), Some(m)),
            Some(Opened::Unsealed(b)) => {
                if key.is_some() {
                    unsealed.push(r.stamp.clone());
                }
                (Some(b), None)
            }
            Some(Opened::Unchecked(b)) => {
                c.unchecked.insert(r.stamp.clone());
                (Some(b), None)
            }
            None => (None, None),
        };
        let parsed = body.map(serde_json::from_slice::<RunRecord>);
        let why = match &parsed {
            None => Some("not a regular file".to_string()),
            Some(Err(e)) => Some(format!("not a run record ({e})")),
            Some(Ok(rec)) if job.is_some() && rec.job.is_none() => {
                Some("it names no job".to_string())
            }
            Some(Ok(rec)) if job.is_some_and(|j| Some(j) != rec.job.as_deref()) => {
                return Err(TargetError::ForeignRecord {
                    target: target.into(),
                    file: format!("{}.json", r.stamp),
                    job: job.unwrap_or_default().into(),
                    other: rec.job.clone().unwrap_or_default(),
                })
            }
            Some(Ok(rec)) if rec.stamp != r.stamp => {
                Some(format!("its stamp field {:?} is not its name's", rec.stamp))
            }
            Some(Ok(_)) if !manifests.contains(&r.stamp) => {
                Some(format!("manifests/{}.sha1 is missing", r.stamp))
            }
            Some(Ok(rec)) if mac.is_some() && rec.counter.is_none() => {
                Some("it is sealed but has no run counter".to_string())
            }
            Some(Ok(_)) => None,
        };
        match (why, parsed, mac) {
            (None, Some(Ok(rec)), Some(mac)) => {
                let link = Link {
                    stamp: r.stamp.clone(),
                    counter: rec.counter.unwrap_or_default(),
                    mac: hex::encode(mac),
                    prev: rec.prev.clone(),
                    base: rec.base.unwrap_or(1),
                };
                c.sealed.insert(r.stamp.clone(), (rec, link));
                c.points.push(r.stamp);
            }
            (None, _, _) => c.points.push(r.stamp),
            // A sealed record that is not a restore point is ours and broken: tampered.
            (Some(w), _, Some(_)) => c.tampered.push((file, w)),
            (Some(w), _, None) => c.ignored.push((file, w)),
        }
    }
    // Older snapveils wrote no seals; none of them wrote after a sealed record. (Junk
    // that is no record at all stays junk: it restores nothing.)
    if let Some(first) = c.sealed.keys().next().cloned() {
        for s in unsealed {
            if s > first && c.points.contains(&s) {
                c.points.retain(|p| *p != s);
                c.tampered.push((
                    format!("runs/{s}.json"),
                    format!(
                        "it has no MAC but is newer than runs/{first}.json, which has one: \
                         not written by snapveil"
                    ),
                ));
            }
        }
    }
    c.points.sort();
    c.ignored.sort();
    c.tampered.sort();
    Ok(c)
}

/// Checks that none of the areas is a symlink or a non-directory; `kind` gives the
/// listing's type letter of an area present at the target root (`d`, `l`, ...).
pub(super) fn check_areas(
    target: &str,
    kind: impl Fn(Area) -> Option<(u8, String)>,
) -> Result<(), TargetError> {
    for a in Area::ALL {
        match kind(a) {
            None | Some((b'd', _)) => {}
            Some((b'l', to)) => {
                return Err(TargetError::Symlink {
                    target: target.into(),
                    area: a.dir(),
                    to,
                })
            }
            Some(_) => {
                return Err(TargetError::NotADirectory {
                    target: target.into(),
                    area: a.dir(),
                })
            }
        }
    }
    Ok(())
}

/// Checks a local target's layout (areas are real directories).
///
/// # Errors
/// A symlinked or non-directory area, or an unreadable one.
pub fn check_local_layout(root: &Path) -> Result<(), TargetError> {
    let mut found = Vec::new();
    for a in Area::ALL {
        let p = root.join(a.dir());
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = fs::read_link(&p)
                    .map(|t| format!(" (to {})", t.display()))
                    .unwrap_or_default();
                found.push((a, b'l', to));
            }
            Ok(m) if m.is_dir() => found.push((a, b'd', String::new())),
            Ok(_) => found.push((a, b'-', String::new())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&p)(e)),
        }
    }
    check_areas(&root.display().to_string(), |a| {
        found
            .iter()
            .find(|(x, _, _)| *x == a)
            .map(|(_, k, t)| (*k, t.clone()))
    })
}

/// `runs/X` → (`runs`, `X`); `None` without a slash or for a deeper path.
pub(super) fn area_child(path: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = path.iter().position(|b| *b == b'/')?;
    let (top, rest) = (&path[..i], &path[i + 1..]);
    (!rest.is_empty() && !rest.contains(&b'/')).then_some((top, rest))
}

/// The stamp for a new run: now, unless the target already names a stamp that is not
/// older. Within a second or two (a quick second run, a clock stepped by NTP) it waits
/// for the clock to pass it; further behind, it refuses.
///
/// # Errors
/// The clock is behind the target's newest stamp.
pub fn new_stamp(target: &str, contents: &Contents) -> Result<Stamp, TargetError> {
    for _ in 0..4 {
        let now = Stamp::now();
        let (newest, entry) = match &contents.newest {
            _ if contents.taken.contains(now.as_str()) => {
                (now.to_string(), format!("runs/{now}.json"))
            }
            Some((n, e)) if now.as_str() <= n.as_str() => (n.clone(), e.clone()),
            _ => return Ok(now),
        };
        let ahead = Stamp::parse(&newest)
            .map(|n| (n.time() - now.time()).num_seconds())
            .unwrap_or(i64::MAX);
        if ahead > 2 {
            return Err(TargetError::ClockBehind {
                target: target.into(),
                entry,
                now: now.to_string(),
            });
        }
        tracing::info!("{entry} has this second's stamp: waiting for the next second");
        let sub = chrono::Utc::now().timestamp_subsec_millis();
        std::thread::sleep(std::time::Duration::from_millis(
            u64::from(1000 - sub.min(999)) + 10,
        ));
    }
    let (_, entry) = contents.newest.clone().unwrap_or_default();
    Err(TargetError::ClockBehind {
        target: target.into(),
        entry,
        now: Stamp::now().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stamp: &str, data: Option<&str>) -> RecordFile {
        RecordFile {
            stamp: stamp.into(),
            data: data.map(|d| d.as_bytes().to_vec()),
        }
    }

    #[test]
    fn only_parsing_records_of_this_job_with_a_manifest_are_points() {
        let m: BTreeSet<String> = ["20261124T010000Z", "20991231T000000Z", "20261124T030000Z"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let ok = |s: &str| format!(r#"{{"stamp":"{s}","job":"home"}}"#);
        let Classified {
            points, ignored, ..
        } = classify(
            "t",
            vec![
                rec("20261124T010000Z", Some(&ok("20261124T010000Z"))),
                rec("20991231T000000Z", Some("{not json")),
                rec("20261124T020000Z", Some(&ok("20261124T020000Z"))),
                rec("20261124T030000Z", Some(&ok("20261124T010000Z"))),
                rec("20261124T040000Z", None),
            ],
            &m,
            Some("home"),
            None,
        )
        .unwrap();
        assert_eq!(points, vec!["20261124T010000Z".to_string()]);
        let files: Vec<&str> = ignored.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            files,
            [
                "runs/20261124T020000Z.json",
                "runs/20261124T030000Z.json",
                "runs/20261124T040000Z.json",
                "runs/20991231T000000Z.json"
            ]
        );
        let foreign = r#"{"stamp":"20261124T010000Z","job":"other"}"#;
        let e = classify(
            "t",
            vec![rec("20261124T010000Z", Some(foreign))],
            &m,
            Some("home"),
            None,
        )
        .unwrap_err();
        assert!(matches!(e, TargetError::ForeignRecord { .. }), "{e}");
        // Without a job (prune --target) another job's record is just a record.
        assert!(classify(
            "t",
            vec![rec("20261124T010000Z", Some(foreign))],
            &m,
            None,
            None
        )
        .is_ok());
    }

    #[test]
    fn forged_seals_and_unsealed_records_after_a_sealed_one_are_tampered() {
        use crate::crypto::{MasterKey, RecordKey};
        let key = RecordKey::new(&MasterKey::from_slice(&[7; 32]));
        let stamps = [
            "20261124T010000Z",
            "20261124T020000Z",
            "20261124T030000Z",
            "20261124T040000Z",
        ];
        let m: BTreeSet<String> = stamps.iter().map(|s| s.to_string()).collect();
        let body = |s: &str, n: u64| {
            format!("{{\"stamp\":\"{s}\",\"job\":\"home\",\"counter\":{n}}}\n").into_bytes()
        };
        let sealed = |s: &str, n: u64| super::super::chain::seal(&key, &body(s, n));
        let mut forged = sealed(stamps[2], 2);
        forged[3] ^= 1;
        let recs = vec![
            RecordFile {
                stamp: stamps[0].into(),
                data: Some(body(stamps[0], 0)),
            },
            RecordFile {
                stamp: stamps[1].into(),
                data: Some(sealed(stamps[1], 1)),
            },
            RecordFile {
                stamp: stamps[2].into(),
                data: Some(forged),
            },
            RecordFile {
                stamp: stamps[3].into(),
                data: Some(body(stamps[3], 0)),
            },
        ];
        let c = classify("t", recs, &m, Some("home"), Some(&key)).unwrap();
        // The unsealed record older than the first sealed one is an older snapveil's.
        assert_eq!(c.points, [stamps[0], stamps[1]]);
        assert_eq!(c.sealed.keys().collect::<Vec<_>>(), [stamps[1]]);
        let t: Vec<&str> = c.tampered.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            t,
            ["runs/20261124T030000Z.json", "runs/20261124T040000Z.json"]
        );
        assert!(
            c.tampered[0].1.contains("MAC does not match"),
            "{:?}",
            c.tampered
        );
        assert!(
            c.tampered[1].1.contains("no MAC but is newer"),
            "{:?}",
            c.tampered
        );
    }

    #[test]
    fn a_new_stamp_is_newer_than_everything_on_the_target() {
        let mut c = Contents::default();
        assert!(new_stamp("t", &c).is_ok());
        c.note("20991231T000000Z", "runs/20991231T000000Z.json".into());
        c.note("20261124T010000Z", "generations/20261124T010000Z".into());
        let e = new_stamp("t", &c).unwrap_err();
        assert!(e.to_string().contains("runs/20991231T000000Z.json"), "{e}");
        // This second's stamp: wait for the next.
        let now = Stamp::now();
        let c = Contents {
            newest: Some((now.to_string(), format!("runs/{now}.json"))),
            ..Contents::default()
        };
        assert!(new_stamp("t", &c).unwrap() > now);
    }

    #[test]
    fn symlinked_areas_are_refused() {
        let t = tempfile::TempDir::new().unwrap();
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir_all(&elsewhere).unwrap();
        let root = t.path().join("target");
        fs::create_dir_all(root.join("runs")).unwrap();
        check_local_layout(&root).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("generations")).unwrap();
        let e = check_local_layout(&root).unwrap_err();
        assert!(e.to_string().contains("generations is a symlink"), "{e}");
    }
}
