//! Chains of stream records on a directory target: when a run starts a new full stream
//! (`full_every`), and which records and stream files a prune may delete.
//!
//! A restore point is a record; it restores only with every record back to its full
//! stream (its chain). So retention ([`crate::retention`]) decides per restore point, and
//! this module widens the kept set to the chains of the kept points: a stream that a kept
//! point needs is never deleted, and since the newest point is always kept, a chain goes
//! whole only when a newer full stream exists. Deleting runs records first (newest
//! first), then their stream files and `.sha1`, so that a prune killed halfway leaves no
//! record pointing to nothing; the next prune removes the leftover files (stream files no
//! record names). Owns none of the sending or restoring.

use super::record::StreamRecord;
use super::ZfsSendError;
use crate::exec::Runner;
use crate::retention::{self, LocalTime, Policy, RestorePoint};
use crate::target::{Area, Op, Target};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::time::Duration;

/// Whether the run at `stamp` sends a full stream instead of an increment: the full
/// stream the newest record's chain starts with is at least `full_every` old (counted
/// between stamps, so the decision is the same on every host and in tests). A broken
/// chain also asks for a full: its increments cannot restore anyway.
pub fn full_due(recs: &[StreamRecord], stamp: &str, full_every: Option<Duration>) -> bool {
    let (Some(every), Some(newest)) = (full_every, recs.last()) else {
        return false;
    };
    let Ok(chain) = super::chain(recs, &newest.stamp) else {
        tracing::warn!(
            "the chain of {} is broken: starting a new one with a full stream",
            newest.stamp
        );
        return true;
    };
    let (Some(now), Some(full)) = (
        retention::parse_stamp(stamp),
        retention::parse_stamp(&chain[0].stamp),
    ) else {
        return false;
    };
    let age = now.signed_duration_since(full).to_std().unwrap_or_default();
    if age >= every {
        tracing::info!(
            full = %chain[0].stamp,
            "the chain's full stream is older than full_every: sending a new full stream"
        );
        return true;
    }
    false
}

/// One restore point's fate and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fate {
    pub stamp: String,
    pub file: String,
    pub keep: bool,
    pub why: String,
}

/// What a prune of a raw job's target does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPlan {
    /// Per restore point, newest first.
    pub fates: Vec<Fate>,
    /// Stream files (and `.sha1`) no record names: a crashed run's or an interrupted
    /// prune's leftovers.
    pub orphans: Vec<String>,
    /// Kept points whose chain is already broken (their base is not on the target).
    pub broken: Vec<String>,
}

impl StreamPlan {
    pub fn deleted(&self) -> impl Iterator<Item = &Fate> {
        self.fates.iter().filter(|f| !f.keep)
    }

    /// Records first (newest first), then stream files, `.sha1` files and leftovers.
    pub fn ops(&self) -> (Vec<Op>, Vec<Op>) {
        let records = self
            .deleted()
            .map(|f| Op::RemoveStream {
                name: format!("{}.json", f.stamp),
            })
            .collect();
        let mut files = Vec::new();
        for f in self.deleted() {
            files.push(Op::RemoveStream {
                name: f.file.clone(),
            });
            files.push(Op::RemoveStream {
                name: format!("{}.sha1", f.file),
            });
        }
        files.extend(
            self.orphans
                .iter()
                .map(|n| Op::RemoveStream { name: n.clone() }),
        );
        (records, files)
    }
}

/// Plans a prune (pure): the policy's decisions, widened to the chains of the kept points.
/// `names` are the files in `streams/`.
pub fn plan(
    recs: &[StreamRecord],
    names: &[String],
    policy: &Policy,
    local: LocalTime<'_>,
) -> StreamPlan {
    let by_stamp: BTreeMap<&str, &StreamRecord> =
        recs.iter().map(|r| (r.stamp.as_str(), r)).collect();
    let points: Vec<RestorePoint> = recs
        .iter()
        .filter_map(|r| {
            retention::parse_stamp(&r.stamp).map(|time| RestorePoint {
                stamp: r.stamp.clone(),
                time,
            })
        })
        .collect();
    let decisions = retention::plan(&points, policy, local);
    let mut why: BTreeMap<String, String> = BTreeMap::new();
    let mut broken = Vec::new();
    for d in decisions.iter().filter(|d| d.keep) {
        let r: Vec<String> = d.reasons.iter().map(ToString::to_string).collect();
        why.insert(d.stamp.clone(), r.join(", "));
    }
    // Every record a kept point's chain passes through is kept for it.
    let kept_by_policy: Vec<String> = why.keys().cloned().collect();
    for k in &kept_by_policy {
        let mut at = by_stamp[k.as_str()];
        let mut seen = 0;
        while let Some(b) = &at.base_stamp {
            seen += 1;
            let Some(base) = by_stamp.get(b.as_str()) else {
                broken.push(format!(
                    "{k}: its chain is broken ({} is not on the target)",
                    at.base.as_deref().unwrap_or(b)
                ));
                break;
            };
            if seen > recs.len() {
                broken.push(format!("{k}: its chain loops"));
                break;
            }
            why.entry(b.clone())
                .or_insert_with(|| format!("needed by {k} (its chain back to the full stream)"));
            at = base;
        }
    }
    // Newest full stream, to say why a whole chain may go.
    let fulls: Vec<&str> = recs
        .iter()
        .filter(|r| r.base_stamp.is_none())
        .map(|r| r.stamp.as_str())
        .collect();
    let mut fates = Vec::new();
    for d in &decisions {
        let r = by_stamp[d.stamp.as_str()];
        let reason = match why.get(&d.stamp) {
            Some(w) => w.clone(),
            None => {
                let newer_full = fulls.iter().rev().find(|f| **f > d.stamp.as_str());
                match newer_full {
                    Some(f) => format!(
                        "not kept by the policy, no kept point needs it (newer full stream: {f})"
                    ),
                    None => "not kept by the policy, no kept point needs it".to_string(),
                }
            }
        };
        fates.push(Fate {
            stamp: d.stamp.clone(),
            file: r.file.clone(),
            keep: why.contains_key(&d.stamp),
            why: reason,
        });
    }
    // Records without a parseable stamp never reach the planner: keep them.
    let planned: BTreeSet<String> = fates.iter().map(|f| f.stamp.clone()).collect();
    for r in recs.iter().filter(|r| !planned.contains(&r.stamp)) {
        fates.push(Fate {
            stamp: r.stamp.clone(),
            file: r.file.clone(),
            keep: true,
            why: "its stamp does not parse: left alone".into(),
        });
    }
    let named: BTreeSet<String> = recs
        .iter()
        .flat_map(|r| [r.file.clone(), format!("{}.sha1", r.file)])
        .collect();
    let orphans = names
        .iter()
        .filter(|n| !n.starts_with('.') && !named.contains(*n))
        .filter(|n| {
            let n = n.strip_suffix(".sha1").unwrap_or(n);
            n.ends_with(".zfs") || n.ends_with(".zfs.age")
        })
        .cloned()
        .collect();
    StreamPlan {
        fates,
        orphans,
        broken,
    }
}

/// The report of a raw job's prune.
#[derive(Debug, Clone)]
pub struct StreamPruneReport {
    pub target: String,
    pub plan: StreamPlan,
    pub dry_run: bool,
}

impl fmt::Display for StreamPruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.plan;
        let verb = if self.dry_run { "would " } else { "" };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "prune {} (raw ZFS streams){}",
            self.target,
            if self.dry_run { " (dry run)" } else { "" }
        );
        let _ = writeln!(s, "restore points (newest first):");
        for x in &p.fates {
            if x.keep {
                let _ = writeln!(s, "  {}  keep    {}", x.stamp, x.why);
            } else {
                let _ = writeln!(
                    s,
                    "  {}  {verb}delete ({}): {} and its .sha1",
                    x.stamp, x.why, x.file
                );
            }
        }
        for o in &p.orphans {
            let _ = writeln!(s, "{verb}delete streams/{o} (no record names it)");
        }
        for b in &p.broken {
            let _ = writeln!(s, "warning: {b}");
        }
        if p.deleted().next().is_none() && p.orphans.is_empty() {
            let _ = writeln!(s, "nothing to do");
        }
        f.write_str(&s)
    }
}

/// Prunes a raw job's target by its policy; `None` when the job has no retention rules.
/// The caller holds the job's lock. `protect` is the restore point the calling run just
/// made: a plan that deletes it is refused (it is the newest, so it never should).
///
/// # Errors
/// A bad policy, the target unreadable or a record that does not parse (nothing is
/// deleted around a record we cannot read), or a removal failing.
pub fn prune_job(
    runner: &dyn Runner,
    target: &Target,
    job: &crate::config::Job,
    dry_run: bool,
    protect: Option<&str>,
) -> Result<Option<StreamPruneReport>, ZfsSendError> {
    let Some(policy) = job
        .retention
        .policy()
        .map_err(|e| ZfsSendError::Policy(e.to_string()))?
    else {
        return Ok(None);
    };
    policy
        .validate()
        .map_err(|e| ZfsSendError::Policy(e.to_string()))?;
    // Sealed records only; a tampered one stops prune, as in file mode: its restore point
    // may be real, and its stream would look like an orphan.
    let scan = super::record::scan(runner, target, &job.name)?;
    if let Some((file, why)) = scan.tampered.first() {
        return Err(ZfsSendError::RecordTampered {
            file: format!("{}/{file}", target.address()),
            why: format!("{why}; nothing was pruned"),
        });
    }
    let recs = &scan.points;
    let names: Vec<String> = target
        .list(runner, Area::Streams)?
        .into_iter()
        .filter(|e| e.kind == b'-')
        .filter_map(|e| String::from_utf8(e.name).ok())
        .collect();
    let plan = plan(recs, &names, &policy, &retention::system_local);
    if let Some(p) = protect {
        if plan.deleted().any(|f| f.stamp == p) {
            return Err(ZfsSendError::Policy(format!(
                "the policy would delete restore point {p}, which this run just made; nothing was pruned"
            )));
        }
    }
    if !dry_run {
        let (records, files) = plan.ops();
        if !records.is_empty() {
            let gone: Vec<&str> = plan.deleted().map(|f| f.stamp.as_str()).collect();
            super::record::record_pruned(runner, target, &scan, &gone)?;
            target.apply(runner, &records)?;
        }
        if !files.is_empty() {
            target.apply(runner, &files)?;
        }
    }
    Ok(Some(StreamPruneReport {
        target: target.address().to_string(),
        plan,
        dry_run,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stamp: &str, base: Option<&str>) -> StreamRecord {
        StreamRecord {
            job: "j".into(),
            stamp: stamp.into(),
            dataset: "tank/d".into(),
            snapshot: format!("snapveil-j-{stamp}"),
            recursive: false,
            base: base.map(|b| format!("snapveil-j-{b}")),
            base_stamp: base.map(str::to_string),
            file: format!("f-{stamp}.zfs.age"),
            sha1: "0".repeat(40),
            bytes: 1,
            raw: false,
            age: true,
            counter: None,
            prev: None,
            base_counter: None,
        }
    }

    /// Two chains, days 1-3 and days 4-5 (full on day 4).
    fn two_chains() -> Vec<StreamRecord> {
        vec![
            rec("20261101T000000Z", None),
            rec("20261102T000000Z", Some("20261101T000000Z")),
            rec("20261103T000000Z", Some("20261102T000000Z")),
            rec("20261104T000000Z", None),
            rec("20261105T000000Z", Some("20261104T000000Z")),
        ]
    }

    fn policy(last: i64) -> Policy {
        Policy::from_parts([last, 0, 0, 0, 0, 0], [None; 6]).unwrap()
    }

    fn kept(p: &StreamPlan) -> Vec<&str> {
        let mut v: Vec<&str> = p
            .fates
            .iter()
            .filter(|f| f.keep)
            .map(|f| f.stamp.as_str())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_kept_point_keeps_its_chain_and_an_old_chain_goes_whole_once_a_newer_full_exists() {
        let recs = two_chains();
        let p = plan(&recs, &[], &policy(1), &retention::utc);
        assert_eq!(kept(&p), ["20261104T000000Z", "20261105T000000Z"]);
        let f4 = p
            .fates
            .iter()
            .find(|f| f.stamp == "20261104T000000Z")
            .unwrap();
        assert!(f4.why.contains("needed by 20261105T000000Z"), "{}", f4.why);
        let f1 = p
            .fates
            .iter()
            .find(|f| f.stamp == "20261101T000000Z")
            .unwrap();
        assert!(
            f1.why.contains("newer full stream: 20261104T000000Z"),
            "{}",
            f1.why
        );
        // Records first, newest first; then each stream and its .sha1.
        let (records, files) = p.ops();
        assert_eq!(
            records,
            ["20261103T000000Z", "20261102T000000Z", "20261101T000000Z"].map(|s| {
                Op::RemoveStream {
                    name: format!("{s}.json"),
                }
            })
        );
        assert_eq!(files.len(), 6);
        assert_eq!(
            files[1],
            Op::RemoveStream {
                name: "f-20261103T000000Z.zfs.age.sha1".into()
            }
        );
    }

    #[test]
    fn a_policy_keeping_an_increment_keeps_every_stream_back_to_its_full() {
        // last = 3 keeps days 3-5; day 3 needs days 1 and 2: nothing goes.
        let p = plan(&two_chains(), &[], &policy(3), &retention::utc);
        assert_eq!(p.deleted().count(), 0, "{p:?}");
        // One chain only (no full_every): nothing is ever deleted by last = 1.
        let one: Vec<StreamRecord> = (1..=4)
            .map(|d| {
                rec(
                    &format!("2026110{d}T000000Z"),
                    (d > 1)
                        .then(|| format!("2026110{}T000000Z", d - 1))
                        .as_deref(),
                )
            })
            .collect();
        let p = plan(&one, &[], &policy(1), &retention::utc);
        assert_eq!(p.deleted().count(), 0);
    }

    #[test]
    fn leftover_files_are_named_but_temporary_and_foreign_files_are_not() {
        let recs = two_chains();
        let names: Vec<String> = [
            "f-20261101T000000Z.zfs.age",
            "old@s.full.zfs.age",
            "old@s.full.zfs.age.sha1",
            ".x.zfs.age.tmp-12",
            "README",
            "20261101T000000Z.json",
        ]
        .map(String::from)
        .to_vec();
        let p = plan(&recs, &names, &policy(5), &retention::utc);
        assert_eq!(p.orphans, ["old@s.full.zfs.age", "old@s.full.zfs.age.sha1"]);
    }

    #[test]
    fn removals_apply_locally_and_over_a_shell_quoted_and_idempotent() {
        let p = plan(&two_chains(), &[], &policy(1), &retention::utc);
        let (records, files) = p.ops();
        let dir = tempfile::tempdir().unwrap();
        let streams = dir.path().join("streams");
        std::fs::create_dir(&streams).unwrap();
        for r in two_chains() {
            for n in [
                format!("{}.json", r.stamp),
                r.file.clone(),
                format!("{}.sha1", r.file),
            ] {
                std::fs::write(streams.join(n), b"x").unwrap();
            }
        }
        crate::target::ops::apply_local(dir.path(), &records).unwrap();
        assert!(!streams.join("20261101T000000Z.json").exists());
        assert!(
            streams.join("f-20261101T000000Z.zfs.age").exists(),
            "records go first"
        );
        crate::target::ops::apply_local(dir.path(), &files).unwrap();
        // A prune killed after some removals runs again without failing.
        crate::target::ops::apply_local(dir.path(), &files).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&streams)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".json"))
            .collect();
        left.sort();
        assert_eq!(left, ["20261104T000000Z.json", "20261105T000000Z.json"]);
        assert_eq!(std::fs::read_dir(&streams).unwrap().count(), 6);
        let sh = String::from_utf8(crate::target::ops::shell_script("/srv/b k", &files)).unwrap();
        assert!(sh.contains("[ -d streams ]"), "{sh}");
        assert!(
            sh.contains("rm -f -- 'streams/f-20261101T000000Z.zfs.age.sha1'"),
            "{sh}"
        );
    }

    #[test]
    fn full_every_counts_from_the_chains_full_stream() {
        let recs = two_chains();
        let day = Duration::from_secs(86400);
        assert!(!full_due(&recs, "20261106T000000Z", None));
        assert!(!full_due(&recs, "20261106T000000Z", Some(3 * day)));
        assert!(full_due(&recs, "20261107T000000Z", Some(3 * day)));
        assert!(!full_due(&[], "20261107T000000Z", Some(day)));
        // A broken chain starts over.
        let broken = vec![rec("20261105T000000Z", Some("20261104T000000Z"))];
        assert!(full_due(&broken, "20261106T000000Z", Some(30 * day)));
    }
}
