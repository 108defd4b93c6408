//! `streams/STAMP.json`: one raw run's restore point, and how stream files are named;
//! the records of a raw target read, sealed and checked (issue 14).
//!
//! A stream record is sealed like a file-mode run record ([`crate::target::chain`]): it
//! ends with `snapveil-mac-v1 HEX`, HMAC-SHA256 with the job's [`RecordKey`] (HKDF of the
//! master key of the job's `key_config`, never a content or name key) over the exact
//! bytes before that line, and carries its run counter, its predecessor's MAC and the
//! counter its chain is checked from. The stream file is authenticated through the
//! record: the sealed `sha1` (an age stream is authenticated by age as well; a raw
//! `zfs send -w` stream only by that sha1). The `.sha1` file beside a stream is for
//! `sha1sum -c` with stock tools and is never trusted. Prune seals what it removes into
//! `streams/pruned.json` ([`record_pruned`]), so that a pruned point is no gap.
//!
//! Records without a seal were written before this format (or forged: an age stream
//! encrypted to a public recipient can be made by anyone, so an unsealed record proves
//! nothing). They are listed as *unauthenticated*; `restore` uses them only when told
//! (`--accept-unauthenticated`); one newer than a sealed record is tampered.

use super::{Protection, ZfsSendError};
use crate::crypto::RecordKey;
use crate::exec::Runner;
use crate::target::chain::{self, Head, Ledger, Link, Next, Opened, Verdict, LEDGER};
use crate::target::{Area, Contents, Target};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A raw run's record. Written after its stream file and `.sha1` are complete.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamRecord {
    pub job: String,
    pub stamp: String,
    pub dataset: String,
    /// The snapshot sent, `snapveil-JOB-STAMP`.
    pub snapshot: String,
    /// Sent with `zfs send -R` (the dataset and its children).
    pub recursive: bool,
    /// The snapshot the increment starts from; `None` for a full stream.
    pub base: Option<String>,
    /// The record of that snapshot.
    pub base_stamp: Option<String>,
    /// The stream file in `streams/`.
    pub file: String,
    /// sha1 of the stream file as stored (ciphertext when age-wrapped).
    pub sha1: String,
    pub bytes: u64,
    /// `zfs send -w`: ZFS's own encryption, the key stays on the source.
    pub raw: bool,
    /// Wrapped in age by snapveil.
    pub age: bool,
    /// The chain ([`crate::target::chain`]): this record's run counter on the target,
    /// its predecessor's MAC (hex), and the counter its chain is checked from. Absent in
    /// records written before sealed stream records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_counter: Option<u64>,
}

impl StreamRecord {
    /// Parses `streams/NAME` and checks it can be trusted as a record of `job`: its name
    /// is its stamp, it names this job, and its stream file is a plain name there.
    ///
    /// # Errors
    /// Why not, for the error message.
    pub fn parse(data: &[u8], name: &str, job: &str) -> Result<StreamRecord, String> {
        let r: StreamRecord =
            serde_json::from_slice(data).map_err(|e| format!("not a stream record: {e}"))?;
        if name != format!("{}.json", r.stamp) {
            return Err(format!("its stamp {} is not its name", r.stamp));
        }
        if r.job != job {
            return Err(format!("a record of job {:?}, not of {job:?}", r.job));
        }
        let plain = !r.file.is_empty()
            && !r.file.starts_with('.')
            && !r.file.contains('/')
            && !r.file.ends_with(".json");
        if !plain {
            return Err(format!("stream file {:?} is not a plain name", r.file));
        }
        if r.sha1.len() != 40 || !r.sha1.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("sha1 {:?} is not a sha1", r.sha1));
        }
        if r.base.is_some() != r.base_stamp.is_some() {
            return Err("base and base_stamp must be given together".into());
        }
        Ok(r)
    }
}

/// `DATASET@SNAP.full.zfs` or `DATASET@SNAP.from-BASE.zfs`, with `/` in the dataset as
/// `+` (not allowed in ZFS names, so unambiguous), `.raw` before `.zfs` for `zfs send
/// -w` streams and `.age` after it when wrapped in age: what a file holds is in its name,
/// for whoever restores it with stock tools.
pub fn stream_name(dataset: &str, base: Option<&str>, snap: &str, p: Protection) -> String {
    let ds = dataset.replace('/', "+");
    let kind = match base {
        None => "full".to_string(),
        Some(b) => format!("from-{b}"),
    };
    format!(
        "{ds}@{snap}.{kind}{}.zfs{}",
        if p.raw { ".raw" } else { "" },
        if p.age { ".age" } else { "" }
    )
}

/// Why a record with a bad seal is not used.
const FORGED: &str =
    "its MAC does not match its contents: altered, or not written with this job's key";

/// A raw target's `streams/` records, checked.
#[derive(Debug, Default)]
pub struct Scan {
    /// Restore points, oldest first: sealed records, and unsealed ones older than every
    /// sealed record (an older snapveil's).
    pub points: Vec<StreamRecord>,
    /// The sealed points' chain links, by stamp.
    pub sealed: BTreeMap<String, Link>,
    /// Record files that are never used (`streams/NAME`, why): a seal that fails, a
    /// sealed record that is not a valid one, an unsealed one newer than a sealed one.
    pub tampered: Vec<(String, String)>,
    /// `streams/pruned.json`, when present and authentic.
    pub ledger: Option<Ledger>,
    /// Points whose seal was not checked (no key).
    pub unchecked: BTreeSet<String>,
}

impl Scan {
    /// Restore points without a seal.
    pub fn unsealed(&self) -> Vec<&str> {
        self.points
            .iter()
            .map(|r| r.stamp.as_str())
            .filter(|s| !self.sealed.contains_key(*s) && !self.unchecked.contains(*s))
            .collect()
    }

    /// The chain check against what this machine last wrote to the target.
    pub fn verdict(&self, state: Option<&Head>) -> Verdict {
        let links: Vec<Link> = self.sealed.values().cloned().collect();
        chain::check_in(
            Area::Streams.dir(),
            &links,
            &self.tampered,
            self.ledger.as_ref(),
            state,
        )
    }

    /// Problems (each a line naming the file and what is wrong) and notes, as verify,
    /// restore and list print them.
    pub fn report(&self, state: Option<&Head>) -> (Vec<String>, Vec<String>) {
        let v = self.verdict(state);
        let mut notes = v.warnings;
        let old = self.unsealed();
        if !old.is_empty() {
            notes.push(format!(
                "{} restore point(s) unauthenticated (no MAC: an older snapveil's, or \
                 forged; restore uses them only with --accept-unauthenticated): {}",
                old.len(),
                old.join(", ")
            ));
        }
        (v.problems.iter().map(ToString::to_string).collect(), notes)
    }

    /// What a new run's stamp must be newer than; tampered records' stamps are taken.
    pub fn contents(&self) -> Contents {
        let mut c = super::contents(&self.points);
        c.taken = self
            .tampered
            .iter()
            .filter_map(|(f, _)| f.strip_prefix("streams/")?.strip_suffix(".json"))
            .filter(|s| crate::snapshot::valid_stamp(s))
            .map(str::to_string)
            .collect();
        c
    }

    /// The chain of records that restores `wanted` (a stamp or a snapshot name), full
    /// stream first: only authenticated records, unless `unauthenticated` allows an
    /// older snapveil's.
    ///
    /// # Errors
    /// `wanted` or a record its chain needs is tampered, unauthenticated (not allowed),
    /// or missing.
    pub fn restore_chain(
        &self,
        wanted: &str,
        unauthenticated: bool,
    ) -> Result<Vec<&StreamRecord>, ZfsSendError> {
        let tampered = |stamp: &str| {
            let file = format!("streams/{stamp}.json");
            self.tampered
                .iter()
                .find(|(f, _)| *f == file)
                .map(|(f, why)| ZfsSendError::RecordTampered {
                    file: f.clone(),
                    why: why.clone(),
                })
        };
        // `wanted` is a stamp or `snapveil-JOB-STAMP`.
        let stamp = wanted.rsplit('-').next().unwrap_or(wanted);
        if let Some(e) = tampered(stamp) {
            return Err(e);
        }
        let chain = super::chain(&self.points, wanted).map_err(|e| match &e {
            ZfsSendError::ChainBroken { stamp, .. } => self
                .points
                .iter()
                .find(|r| &r.stamp == stamp)
                .and_then(|r| r.base_stamp.as_deref())
                .and_then(tampered)
                .unwrap_or(e),
            _ => e,
        })?;
        let old: Vec<String> = chain
            .iter()
            .filter(|r| !self.sealed.contains_key(&r.stamp))
            .map(|r| format!("streams/{}.json", r.stamp))
            .collect();
        if !old.is_empty() && !unauthenticated {
            return Err(ZfsSendError::Unauthenticated { files: old });
        }
        Ok(chain)
    }
}

/// Sorts record files (`STAMP.json` names with their bytes) and `pruned.json` into a
/// [`Scan`] (pure). With `key`, seals are checked.
///
/// # Errors
/// A record of another job (file, why): this target is not only ours.
pub fn classify(
    files: Vec<(String, Vec<u8>)>,
    ledger: Option<&[u8]>,
    job: &str,
    key: Option<&RecordKey>,
) -> Result<Scan, (String, String)> {
    let mut s = Scan::default();
    let mut unsealed = Vec::new();
    for (name, data) in files {
        let file = format!("streams/{name}");
        let (body, mac, checked) = match chain::open(key, &data) {
            Opened::Forged(_) => {
                s.tampered.push((file, FORGED.into()));
                continue;
            }
            Opened::Authentic(b, m) => (b, Some(m), true),
            Opened::Unsealed(b) => (b, None, true),
            Opened::Unchecked(b) => (b, None, false),
        };
        if let Ok(r) = serde_json::from_slice::<StreamRecord>(body) {
            if r.job != job {
                return Err((
                    file,
                    format!(
                        "a record of job {:?}, not of {job:?}: this target (or its streams/) \
                         belongs to another job; refusing to use or change it",
                        r.job
                    ),
                ));
            }
        }
        match (StreamRecord::parse(body, &name, job), mac) {
            (Ok(r), Some(mac)) => match r.counter {
                Some(counter) => {
                    s.sealed.insert(
                        r.stamp.clone(),
                        Link {
                            stamp: r.stamp.clone(),
                            counter,
                            mac: hex::encode(mac),
                            prev: r.prev.clone(),
                            base: r.base_counter.unwrap_or(1),
                        },
                    );
                    s.points.push(r);
                }
                None => s
                    .tampered
                    .push((file, "it is sealed but has no run counter".into())),
            },
            (Ok(r), None) => {
                if checked {
                    unsealed.push(r.stamp.clone());
                } else {
                    s.unchecked.insert(r.stamp.clone());
                }
                s.points.push(r);
            }
            (Err(why), Some(_)) => s.tampered.push((file, format!("sealed, but {why}"))),
            (Err(why), None) => s.tampered.push((file, format!("no MAC, and {why}"))),
        }
    }
    // No older snapveil wrote after a sealed record.
    if let Some(first) = s.sealed.keys().next().cloned() {
        for u in unsealed.iter().filter(|u| **u > first) {
            s.points.retain(|r| r.stamp != *u);
            s.tampered.push((
                format!("streams/{u}.json"),
                format!(
                    "it has no MAC but is newer than streams/{first}.json, which has one: \
                     not written by snapveil"
                ),
            ));
        }
    }
    s.ledger = match ledger.map(|d| chain::open(key, d)) {
        Some(Opened::Authentic(b, _)) => match serde_json::from_slice(b) {
            Ok(l) => Some(l),
            Err(e) => {
                s.tampered.push((
                    format!("streams/{LEDGER}"),
                    format!("sealed but not a prune record ({e})"),
                ));
                None
            }
        },
        Some(Opened::Unchecked(_)) | None => None,
        Some(_) => {
            s.tampered.push((
                format!("streams/{LEDGER}"),
                "its MAC does not match its contents (or it has none)".into(),
            ));
            None
        }
    };
    s.points.sort_by(|a, b| a.stamp.cmp(&b.stamp));
    s.tampered.sort();
    Ok(s)
}

/// Reads and checks the records in a raw target's `streams/` with the target's record
/// key ([`Target::auth`]).
///
/// # Errors
/// The target cannot be read, or it holds another job's record.
pub fn scan(runner: &dyn Runner, target: &Target, job: &str) -> Result<Scan, ZfsSendError> {
    let entries = target.list(runner, Area::Streams)?;
    let mut names: Vec<String> = entries
        .iter()
        .filter(|e| e.kind == b'-')
        .filter_map(|e| String::from_utf8(e.name.clone()).ok())
        .filter(|n| {
            n.strip_suffix(".json")
                .is_some_and(crate::snapshot::valid_stamp)
        })
        .collect();
    names.sort();
    let fetch = |n: &str| -> Result<Vec<u8>, ZfsSendError> {
        target
            .fetch(runner, Area::Streams, n)?
            .ok_or_else(|| ZfsSendError::Record {
                file: format!("{}/streams/{n}", target.address()),
                reason: "vanished while being read".into(),
            })
    };
    let mut files = Vec::new();
    for n in names {
        let data = fetch(&n)?;
        files.push((n, data));
    }
    let ledger = if entries
        .iter()
        .any(|e| e.kind == b'-' && e.name == LEDGER.as_bytes())
    {
        Some(fetch(LEDGER)?)
    } else {
        None
    };
    let s = classify(files, ledger.as_deref(), job, target.auth()).map_err(|(file, reason)| {
        ZfsSendError::Record {
            file: format!("{}/{file}", target.address()),
            reason,
        }
    })?;
    for (f, why) in &s.tampered {
        tracing::error!("{}/{f}: TAMPERED: {why}", target.address());
    }
    Ok(s)
}

/// `rec` with its link `next`, sealed with `key`: the bytes of `streams/STAMP.json` and
/// what the agent remembers of it.
pub fn seal(key: &RecordKey, rec: &StreamRecord, next: &Next) -> (Vec<u8>, Head) {
    let rec = StreamRecord {
        counter: Some(next.counter),
        prev: next.prev.clone(),
        base_counter: Some(next.base),
        ..rec.clone()
    };
    let mut body = serde_json::to_vec_pretty(&rec).expect("json");
    body.push(b'\n');
    let head = Head {
        stamp: rec.stamp.clone(),
        counter: next.counter,
        mac: hex::encode(key.mac(&body)),
    };
    (chain::seal(key, &body), head)
}

/// Seals the raw restore points `stamps`, about to be deleted, into
/// `streams/pruned.json`, so that their absence is no gap in the chain. Prune calls
/// this before it deletes anything (then the records, then their streams).
///
/// # Errors
/// No record key, a point whose seal was not checked, a tampered ledger (rewriting it
/// would drop what it recorded), or writing it failed.
pub fn record_pruned(
    runner: &dyn Runner,
    target: &Target,
    scan: &Scan,
    stamps: &[&str],
) -> Result<(), ZfsSendError> {
    let refuse = |file: String, reason: &str| ZfsSendError::Record {
        file: format!("{}/{file}", target.address()),
        reason: reason.into(),
    };
    let key = target
        .auth()
        .ok_or_else(|| refuse(format!("streams/{LEDGER}"), "no record key to seal it with"))?;
    if let Some(s) = stamps.iter().find(|s| scan.unchecked.contains(**s)) {
        return Err(refuse(
            format!("streams/{s}.json"),
            "its seal was not checked: refusing to delete it",
        ));
    }
    if scan.tampered.iter().any(|(f, _)| f.ends_with(LEDGER)) {
        return Err(refuse(
            format!("streams/{LEDGER}"),
            "TAMPERED: refusing to rewrite it (what it recorded would be lost)",
        ));
    }
    let removed: Vec<&Link> = stamps.iter().filter_map(|s| scan.sealed.get(*s)).collect();
    if removed.is_empty() {
        return Ok(());
    }
    let mut ledger = scan.ledger.clone().unwrap_or_else(|| Ledger {
        job: target.job().map(str::to_string),
        pruned: Vec::new(),
    });
    ledger.add(removed);
    let mut body = serde_json::to_vec_pretty(&ledger).expect("json");
    body.push(b'\n');
    target.put(runner, Area::Streams, LEDGER, &chain::seal(key, &body))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> StreamRecord {
        StreamRecord {
            job: "j".into(),
            stamp: "20261130T010000Z".into(),
            dataset: "tank/data".into(),
            snapshot: "snapveil-j-20261130T010000Z".into(),
            recursive: false,
            base: None,
            base_stamp: None,
            file: "tank+data@snapveil-j-20261130T010000Z.full.zfs.age".into(),
            sha1: "0".repeat(40),
            bytes: 1,
            raw: false,
            age: true,
            ..Default::default()
        }
    }

    #[test]
    fn names_say_what_the_file_holds() {
        let age = Protection {
            raw: false,
            age: true,
        };
        let raw = Protection {
            raw: true,
            age: false,
        };
        assert_eq!(
            stream_name("tank/data", None, "s1", age),
            "tank+data@s1.full.zfs.age"
        );
        assert_eq!(
            stream_name("tank/a/b", Some("s1"), "s2", raw),
            "tank+a+b@s2.from-s1.raw.zfs"
        );
    }

    #[test]
    fn a_record_is_trusted_only_under_its_own_name_and_job() {
        let r = rec();
        let data = serde_json::to_vec(&r).unwrap();
        assert_eq!(
            StreamRecord::parse(&data, "20261130T010000Z.json", "j").unwrap(),
            r
        );
        assert!(StreamRecord::parse(&data, "20261130T020000Z.json", "j")
            .unwrap_err()
            .contains("not its name"));
        assert!(StreamRecord::parse(&data, "20261130T010000Z.json", "k")
            .unwrap_err()
            .contains("job"));
        for bad in ["../x", ".hidden", "a/b", ""] {
            let mut r = rec();
            r.file = bad.into();
            let data = serde_json::to_vec(&r).unwrap();
            assert!(
                StreamRecord::parse(&data, "20261130T010000Z.json", "j").is_err(),
                "{bad}"
            );
        }
    }

    fn key() -> RecordKey {
        RecordKey::new(&crate::crypto::MasterKey::from_slice(&[5; 32]))
    }

    /// Records `stamps`, sealed and chained (`None`: unsealed).
    fn target_of(recs: &[(&str, Option<u64>)]) -> Vec<(String, Vec<u8>)> {
        let k = key();
        let mut prev: Option<String> = None;
        recs.iter()
            .map(|(stamp, counter)| {
                let r = StreamRecord {
                    stamp: (*stamp).into(),
                    ..rec()
                };
                let data = match counter {
                    Some(c) => {
                        let next = Next {
                            counter: *c,
                            prev: prev.clone(),
                            base: 1,
                        };
                        let (d, h) = seal(&k, &r, &next);
                        prev = Some(h.mac);
                        d
                    }
                    None => serde_json::to_vec_pretty(&r).unwrap(),
                };
                (format!("{stamp}.json"), data)
            })
            .collect()
    }

    const S: [&str; 4] = [
        "20261130T010000Z",
        "20261130T020000Z",
        "20261130T030000Z",
        "20261130T040000Z",
    ];

    #[test]
    fn sealed_records_chain_and_bad_ones_are_named() {
        let k = key();
        let files = target_of(&[(S[0], Some(1)), (S[1], Some(2)), (S[2], Some(3))]);
        let s = classify(files.clone(), None, "j", Some(&k)).unwrap();
        assert_eq!(s.points.len(), 3);
        assert!(s.verdict(None).problems.is_empty());
        assert!(s.restore_chain(S[2], false).is_ok());

        // One byte of a record changed: tampered, never a point, named by restore.
        let mut bad = files.clone();
        bad[1].1[20] ^= 1;
        let s = classify(bad, None, "j", Some(&k)).unwrap();
        assert_eq!(s.points.len(), 2);
        assert_eq!(s.tampered[0].0, format!("streams/{}.json", S[1]));
        let e = s.restore_chain(S[1], false).unwrap_err().to_string();
        assert!(e.contains("TAMPERED") && e.contains(S[1]), "{e}");
        let (problems, _) = s.report(None);
        assert!(
            problems.iter().any(|p| p.contains("TAMPERED: streams/")),
            "{problems:?}"
        );

        // A record deleted: a gap, unless prune's sealed ledger lists it.
        let mut gap = files.clone();
        gap.remove(1);
        let s = classify(gap.clone(), None, "j", Some(&k)).unwrap();
        let p = s.verdict(None).problems;
        assert!(
            p.iter().any(|p| p.to_string().contains("TRUNCATED: run #2")
                && p.to_string().contains("missing from streams/")),
            "{p:?}"
        );
        let full = classify(files, None, "j", Some(&k)).unwrap();
        let mut ledger = Ledger::default();
        ledger.add([&full.sealed[S[1]]]);
        let lg = chain::seal(&k, &serde_json::to_vec(&ledger).unwrap());
        let s = classify(gap, Some(&lg), "j", Some(&k)).unwrap();
        assert!(s.verdict(None).problems.is_empty());

        // Another job's record stops everything.
        let other = StreamRecord {
            job: "x".into(),
            ..rec()
        };
        let e = classify(
            vec![(
                format!("{}.json", S[0]),
                serde_json::to_vec(&other).unwrap(),
            )],
            None,
            "j",
            Some(&k),
        )
        .unwrap_err();
        assert!(e.1.contains("another job"), "{e:?}");
    }

    #[test]
    fn unsealed_records_are_unauthenticated_and_never_newer_than_a_sealed_one() {
        let k = key();
        let files = target_of(&[(S[0], None), (S[1], Some(1)), (S[2], None)]);
        let s = classify(files, None, "j", Some(&k)).unwrap();
        assert_eq!(s.unsealed(), [S[0]]);
        assert_eq!(s.tampered.len(), 1);
        assert!(
            s.tampered[0].1.contains("no MAC but is newer"),
            "{:?}",
            s.tampered
        );
        // S[1] is an increment from S[0]: restoring it needs the unsealed record.
        let mut recs = s.points.clone();
        recs[1].base = Some(format!("snapveil-j-{}", S[0]));
        recs[1].base_stamp = Some(S[0].into());
        let s = Scan { points: recs, ..s };
        let e = s.restore_chain(S[1], false).unwrap_err().to_string();
        assert!(
            e.contains("--accept-unauthenticated") && e.contains(S[0]),
            "{e}"
        );
        assert_eq!(s.restore_chain(S[1], true).unwrap().len(), 2);
        let (_, notes) = s.report(None);
        assert!(notes[0].contains("unauthenticated"), "{notes:?}");
    }

    #[test]
    fn pruned_points_sealed_in_the_ledger_are_no_gap() {
        let dir = tempfile::tempdir().unwrap();
        let streams = dir.path().join("t/streams");
        std::fs::create_dir_all(&streams).unwrap();
        for (name, data) in target_of(&[(S[0], Some(1)), (S[1], Some(2)), (S[2], Some(3))]) {
            std::fs::write(streams.join(name), data).unwrap();
        }
        let target = Target::open(
            crate::target::Address::Local(dir.path().join("t")),
            "rsync",
            Vec::new(),
            dir.path().join("scratch"),
            Some("j"),
        )
        .with_auth(key());
        let r = crate::exec::SystemRunner;
        let before = scan(&r, &target, "j").unwrap();
        record_pruned(&r, &target, &before, &[S[0], S[1]]).unwrap();
        for s in [S[0], S[1]] {
            std::fs::remove_file(streams.join(format!("{s}.json"))).unwrap();
        }
        let after = scan(&r, &target, "j").unwrap();
        assert_eq!(after.ledger.as_ref().unwrap().pruned.len(), 2);
        assert!(after.verdict(None).problems.is_empty(), "{after:?}");
        // A forged ledger is tampered, and never rewritten (its entries would be lost).
        let lg = streams.join(LEDGER);
        let mut d = std::fs::read(&lg).unwrap();
        d[5] ^= 1;
        std::fs::write(&lg, d).unwrap();
        let forged = scan(&r, &target, "j").unwrap();
        assert!(!forged.verdict(None).problems.is_empty());
        assert!(record_pruned(&r, &target, &forged, &[S[2]]).is_err());
    }
}
