//! Pure plan tests with hand-written expectations, the `--list-only` parser on recorded
//! output, and a simulation: random histories built on disk, pruned with a crash after
//! every possible operation, re-run, and every remaining restore point restored and
//! compared with what the target held at that run.

use super::*;
use crate::retention::{format_stamp, utc};
use chrono::{Duration, TimeZone, Utc};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

fn st(day: i64) -> String {
    format_stamp(Utc.with_ymd_and_hms(2026, 1, 1, 2, 0, 0).unwrap() + Duration::days(day))
}

fn listing(records: &[i64], gens: &[(i64, &[&str])]) -> Listing {
    let mut paths: Vec<(Vec<u8>, bool)> = records
        .iter()
        .map(|d| (format!("runs/{}.json", st(*d)).into_bytes(), false))
        .collect();
    for (d, files) in gens {
        paths.push((format!("generations/{}", st(*d)).into_bytes(), true));
        for f in *files {
            let dir = f.ends_with('/');
            paths.push((
                format!("generations/{}/{}", st(*d), f.trim_end_matches('/')).into_bytes(),
                dir,
            ));
        }
    }
    Listing::from_paths(paths.iter().map(|(p, d)| (p.as_slice(), *d)))
}

/// The stamps a plan keeps, newest first.
fn kept(plan: &PrunePlan) -> Vec<&str> {
    plan.decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.stamp.as_str())
        .collect()
}

fn mv(from: i64, to: i64, p: &str) -> Op {
    Op::Move {
        from: st(from),
        to: st(to),
        path: p.as_bytes().to_vec(),
    }
}

#[test]
fn plan_merges_intervals_deletes_below_oldest_leaves_tail() {
    // Restore points on days 1, 3, 5, 7; generation 2, 4, 6, 8 are failed runs (no
    // record). last=2 keeps 7 and 5.
    let l = listing(
        &[1, 3, 5, 7],
        &[
            (2, &["a"]),
            (3, &["a", "b"]),
            (4, &["c"]),
            (5, &["c", "d/x"]),
            (6, &["d/"]),
            (7, &["d/", "d/x", "e"]),
            (8, &["a"]),
        ],
    );
    let p = Policy {
        last: 2,
        ..Policy::default()
    };
    let plan = plan_prune(&l, &p, &utc, Mode::Merge);
    assert_eq!(kept(&plan), [st(7), st(5)]);
    assert_eq!(
        plan.merges,
        [Merge {
            from: vec![st(6), st(7)],
            into: st(7),
            as_of: st(5)
        }]
    );
    assert_eq!(
        plan.ops,
        vec![
            // Records newest first: 3 before 1.
            Op::RemoveRecord { stamp: st(3) },
            Op::RemoveRecord { stamp: st(1) },
            // (5, 7]: 6 is the oldest; 7's d/ and d/x are moved into 6's d/, e too.
            Op::Move {
                from: st(7),
                to: st(6),
                path: b"d/x".to_vec()
            },
            Op::RemoveDir {
                gen: st(7),
                path: b"d".to_vec()
            },
            mv(7, 6, "e"),
            Op::RemoveDir {
                gen: st(7),
                path: vec![]
            },
            Op::RenameGen {
                from: st(6),
                to: st(7)
            },
            // <= 5: nobody needs them.
            Op::DeleteGen { stamp: st(2) },
            Op::DeleteGen { stamp: st(3) },
            Op::DeleteGen { stamp: st(4) },
            Op::DeleteGen { stamp: st(5) },
        ]
    );
    assert_eq!(plan.pending, [st(8)]);
}

#[test]
fn merge_keeps_the_oldest_version_and_resolves_type_changes() {
    // Kept: 1 and 4. Generations 2, 3, 4 merge into 4 with 2's versions winning.
    let l = listing(
        &[1, 4],
        &[
            (2, &["f", "d"]),
            (3, &["f", "d/x", "g/", "g/y"]),
            (4, &["f", "g", "h/i/j"]),
        ],
    );
    let p = Policy {
        last: -1,
        ..Policy::default()
    };
    let plan = plan_prune(&l, &p, &utc, Mode::Merge);
    let rm = |g: i64, p: &str| Op::RemoveFile {
        gen: st(g),
        path: p.as_bytes().to_vec(),
    };
    let rmdir = |g: i64, p: &str| Op::RemoveDir {
        gen: st(g),
        path: p.as_bytes().to_vec(),
    };
    assert_eq!(
        plan.ops,
        vec![
            // 3 into 2: d is a file in 2 (valid at 1), 3's directory d is superseded.
            rm(3, "d/x"),
            rmdir(3, "d"),
            rm(3, "f"),
            mv(3, 2, "g"),
            rmdir(3, ""),
            // 4 into 2: f superseded; g is a directory in 2 now, 4's file g superseded.
            rm(4, "f"),
            rm(4, "g"),
            mv(4, 2, "h"),
            rmdir(4, ""),
            Op::RenameGen {
                from: st(2),
                to: st(4)
            },
        ]
    );
}

#[test]
fn delete_only_mode_reports_approximate_points_and_keeps_failed_runs() {
    // Records on days 1, 3, 5 (2026-01-02 Fri and 01-04 Sun share ISO week 2026-W01,
    // 01-06 is in W02): weekly=2 keeps 5 and 3, deletes 1.
    let l = listing(
        &[1, 3, 5],
        &[(2, &["x"]), (3, &["a", "b"]), (4, &["b"]), (5, &["c", "a"])],
    );
    let p = Policy {
        weekly: 2,
        ..Policy::default()
    };
    let plan = plan_prune(&l, &p, &utc, Mode::DeleteOnly);
    assert_eq!(kept(&plan), [st(5), st(3)]);
    // (3, 5] holds 4 (a failed run: stays) and 5 (the kept point's own): nothing lost.
    assert!(plan.approximate.is_empty(), "{:?}", plan.approximate);
    assert_eq!(
        plan.ops,
        vec![
            Op::RemoveRecord { stamp: st(1) },
            Op::DeleteGen { stamp: st(2) },
            Op::DeleteGen { stamp: st(3) },
        ]
    );

    // Now keep 1 and 5 and delete 3: within (1, 5], generation 3 goes whole. a and b
    // as of 1 were in 3 first: b survives in 4 (a failed run: its version of b is the
    // one after 3, so that counts as lost too), a only in 5 (newer): both lost for 1.
    let l = listing(
        &[1, 3, 5],
        &[(3, &["a", "b"]), (4, &["b", "z"]), (5, &["c", "a"])],
    );
    let p = Policy {
        last: 1,
        yearly: 2,
        ..Policy::default()
    };
    let mut l2 = l.clone();
    // Move record 1 into 2025 so that yearly keeps it as its own year.
    l2.records.remove(&st(1));
    let old = format_stamp(Utc.with_ymd_and_hms(2025, 12, 31, 2, 0, 0).unwrap());
    l2.records.insert(old.clone());
    let plan = plan_prune(&l2, &p, &utc, Mode::DeleteOnly);
    assert_eq!(kept(&plan), [st(5), old.clone()]);
    assert_eq!(
        plan.ops,
        vec![
            Op::RemoveRecord { stamp: st(3) },
            Op::DeleteGen { stamp: st(3) }
        ]
    );
    assert_eq!(
        plan.approximate,
        [Approximate {
            stamp: old,
            lost_paths: 2
        }]
    );
    let _ = l;
}

#[test]
fn foreign_entries_and_no_restore_points() {
    let mut paths: Vec<(&[u8], bool)> = vec![
        (b"generations/lost+found", true),
        (b"generations/20260101T020000Z.tmp", true),
        (b"generations/20260101T020000Z", false),
        (b"generations/20260102T020000Z", true),
        (b"runs/notes.txt", false),
        (b"manifests/20260102T020000Z.sha1", false),
    ];
    let l = Listing::from_paths(paths.drain(..));
    assert_eq!(
        l.foreign,
        ["20260101T020000Z", "20260101T020000Z.tmp", "lost+found"]
    );
    assert!(l.records.is_empty());
    let plan = plan_prune(
        &l,
        &Policy {
            last: 1,
            ..Policy::default()
        },
        &utc,
        Mode::Merge,
    );
    // No restore point: nothing is touched, everything is pending.
    assert!(plan.ops.is_empty(), "{:?}", plan.ops);
    assert_eq!(plan.pending, ["20260102T020000Z"]);
}

#[test]
fn list_only_parser() {
    let out = b"drwxr-xr-x          4,096 2026/11/24 12:29:32 .\n\
drwxr-xr-x          4,096 2026/11/24 12:29:32 generations\n\
drwxr-xr-x          4,096 2026/11/24 12:29:32 generations/20260101T000000Z\n\
lrwxrwxrwx              6 2026/11/24 12:29:32 generations/20260101T000000Z/l -> target\n\
-rw-r--r--              1 2026/11/24 12:29:32 generations/20260101T000000Z/nl\\#012x\n\
-rw-r--r--              3 2026/11/24 12:29:32 generations/20260101T000000Z/d/a b\n\
-rw-r--r--              0 2026/11/24 12:29:32 runs/20260101T000000Z.json\n";
    let v = parse_list_only("t", out).unwrap();
    let names: Vec<(String, bool)> = v
        .iter()
        .map(|(p, d)| (String::from_utf8_lossy(p).into_owned(), *d))
        .collect();
    assert_eq!(
        names,
        [
            ("generations".into(), true),
            ("generations/20260101T000000Z".into(), true),
            ("generations/20260101T000000Z/l".into(), false),
            ("generations/20260101T000000Z/nl\nx".into(), false),
            ("generations/20260101T000000Z/d/a b".into(), false),
            ("runs/20260101T000000Z.json".into(), false),
        ]
    );
    let e = parse_list_only("host:/t/", b"garbage line\n").unwrap_err();
    assert!(
        e.to_string().contains("host:/t/") && e.to_string().contains("garbage line"),
        "{e}"
    );
}

#[test]
fn shell_script_quotes_and_refuses_overwrites() {
    let ops = vec![
        Op::Move {
            from: st(3),
            to: st(2),
            path: b"it's a/x".to_vec(),
        },
        Op::RemoveFile {
            gen: st(3),
            path: b"f".to_vec(),
        },
        Op::RemoveDir {
            gen: st(3),
            path: vec![],
        },
        Op::DeleteGen { stamp: st(1) },
        Op::RemoveRecord { stamp: st(1) },
    ];
    let s = String::from_utf8(shell_script("/srv/backup dir", &ops)).unwrap();
    assert!(s.starts_with("set -eu\ncd -- '/srv/backup dir'\n"), "{s}");
    let body: Vec<&str> = s.lines().skip(4).collect();
    assert_eq!(
        body,
        [
            "mvnew 'generations/20260104T020000Z/it'\\''s a/x' 'generations/20260103T020000Z/it'\\''s a/x'",
            "rm -- 'generations/20260104T020000Z/f'",
            "rmdir -- 'generations/20260104T020000Z'",
            "rm -rf -- 'generations/20260102T020000Z'",
            "rm -- 'runs/20260102T020000Z.json'",
        ]
    );
}

// ---- simulation ---------------------------------------------------------------------------

const UNIVERSE: [&str; 8] = ["a", "b", "d", "d/x", "d/y", "e/f/g", "e/h", "k/l"];

/// The target's `current/` after each run (path → content), and whether the run
/// succeeded (a restore point).
#[derive(Clone, Debug)]
struct History {
    runs: Vec<(String, BTreeMap<String, String>, bool)>,
}

fn arb_state() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::vec(prop::option::of(0u8..3), UNIVERSE.len()).prop_map(|v| {
        let mut m = BTreeMap::new();
        for (p, c) in UNIVERSE.iter().zip(v) {
            if let Some(c) = c {
                m.insert(p.to_string(), format!("{p}:{c}"));
            }
        }
        // A path cannot be a file and a directory at once.
        if m.contains_key("d") {
            m.remove("d/x");
            m.remove("d/y");
        }
        m
    })
}

fn arb_history() -> impl Strategy<Value = History> {
    prop::collection::vec((arb_state(), 0u8..5, 1i64..40), 2..10).prop_map(|v| {
        let mut hours = 0;
        let runs = v
            .into_iter()
            .map(|(state, fail, gap)| {
                hours += gap * 6;
                let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::hours(hours);
                (format_stamp(t), state, fail != 0)
            })
            .collect();
        History { runs }
    })
}

fn write(p: &Path, content: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

/// Lays the history out as rsync --backup-dir would have.
fn build(dir: &Path, h: &History) {
    let mut prev: BTreeMap<String, String> = BTreeMap::new();
    for (stamp, state, ok) in &h.runs {
        for (p, c) in &prev {
            if state.get(p) != Some(c) {
                write(&dir.join("generations").join(stamp).join(p), c);
            }
        }
        if *ok {
            write(&dir.join("runs").join(format!("{stamp}.json")), "{}");
            write(&dir.join("manifests").join(format!("{stamp}.sha1")), "");
        }
        prev = state.clone();
    }
    fs::create_dir_all(dir.join("current")).unwrap();
    fs::create_dir_all(dir.join("generations")).unwrap();
    for (p, c) in &prev {
        write(&dir.join("current").join(p), c);
    }
}

/// Restore as of `stamp`: for each path of that run, the oldest generation after it
/// holding the path as a file, else current/.
fn restore(
    dir: &Path,
    stamp: &str,
    paths: impl Iterator<Item = String>,
) -> BTreeMap<String, String> {
    let mut gens: Vec<String> = fs::read_dir(dir.join("generations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|g| g.as_str() > stamp)
        .collect();
    gens.sort();
    paths
        .map(|p| {
            let from = gens
                .iter()
                .map(|g| dir.join("generations").join(g).join(&p))
                .find(|f| f.is_file())
                .unwrap_or_else(|| dir.join("current").join(&p));
            let c =
                fs::read_to_string(&from).unwrap_or_else(|e| format!("<{}: {e}>", from.display()));
            (p, c)
        })
        .collect()
}

fn records(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir.join("runs"))
        .map(|rd| {
            rd.map(|e| {
                e.unwrap()
                    .file_name()
                    .into_string()
                    .unwrap()
                    .replace(".json", "")
            })
            .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every record on the target restores to what the target held after that run.
fn check_exact(dir: &Path, h: &History, skip: &[String], when: &str) -> Result<(), TestCaseError> {
    for r in records(dir) {
        if skip.contains(&r) {
            continue;
        }
        let (_, state, _) = h.runs.iter().find(|(s, _, _)| *s == r).unwrap();
        let got = restore(dir, &r, state.keys().cloned());
        prop_assert_eq!(&got, state, "restore as of {} {}", r, when);
    }
    Ok(())
}

fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                out.insert(rel + "/", String::new());
                walk(root, &p, out);
            } else {
                out.insert(rel, fs::read_to_string(&p).unwrap());
            }
        }
    }
    let mut m = BTreeMap::new();
    walk(dir, dir, &mut m);
    m
}

fn policies() -> Vec<Policy> {
    vec![
        Policy {
            last: 2,
            ..Policy::default()
        },
        Policy {
            daily: 2,
            weekly: 2,
            ..Policy::default()
        },
        Policy {
            last: 1,
            monthly: 2,
            ..Policy::default()
        },
        Policy {
            within: Some("3d".parse().unwrap()),
            weekly: 1,
            ..Policy::default()
        },
        Policy {
            daily: 1,
            yearly: -1,
            ..Policy::default()
        },
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn merge_prune_is_exact_at_every_step_and_converges(h in arb_history(), pi in 0usize..5) {
        let policy = &policies()[pi];
        let tmp = tempfile::tempdir().unwrap();
        let full = tmp.path().join("full");
        build(&full, &h);
        let plan = plan_prune(&list_local(&full).unwrap(), policy, &utc, Mode::Merge);
        apply_local(&full, &plan.ops).unwrap();
        check_exact(&full, &h, &[], "after prune")?;
        let kept: Vec<String> = {
            let mut k: Vec<String> = plan.decisions.iter().filter(|d| d.keep).map(|d| d.stamp.clone()).collect();
            k.sort();
            k
        };
        prop_assert_eq!(records(&full), kept.clone());
        // Pruning again does nothing.
        let again = plan_prune(&list_local(&full).unwrap(), policy, &utc, Mode::Merge);
        prop_assert!(again.ops.is_empty(), "second prune: {:?}", again.ops);
        let want = snapshot(&full);

        // A prune killed after any operation: every remaining record is exact, and a
        // re-run ends in exactly the uninterrupted result.
        for k in 0..plan.ops.len() {
            let dir = tmp.path().join(format!("crash{k}"));
            build(&dir, &h);
            apply_local(&dir, &plan.ops[..k]).unwrap();
            check_exact(&dir, &h, &[], &format!("after a crash at op {k}"))?;
            let re = plan_prune(&list_local(&dir).unwrap(), policy, &utc, Mode::Merge);
            apply_local(&dir, &re.ops).unwrap();
            prop_assert_eq!(snapshot(&dir), want.clone(), "re-run after crash at op {}", k);
            fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn delete_only_prune_is_exact_except_where_reported(h in arb_history(), pi in 0usize..5) {
        let policy = &policies()[pi];
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("t");
        build(&dir, &h);
        let failed_gens: Vec<String> = fs::read_dir(dir.join("generations")).unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|g| h.runs.iter().any(|(s, _, ok)| s == g && !ok))
            .collect();
        let plan = plan_prune(&list_local(&dir).unwrap(), policy, &utc, Mode::DeleteOnly);
        let only_deletions = plan.ops.iter().all(|o| matches!(o, Op::RemoveRecord { .. } | Op::RemoveManifest { .. } | Op::DeleteGen { .. }));
        prop_assert!(only_deletions, "{:?}", plan.ops);
        apply_local(&dir, &plan.ops).unwrap();
        let approx: Vec<String> = plan.approximate.iter().map(|a| a.stamp.clone()).collect();
        check_exact(&dir, &h, &approx, "after rsync-only prune")?;
        // A failed run's generation goes only when no kept restore point is older.
        let oldest = records(&dir).into_iter().next().unwrap_or_default();
        for g in failed_gens.iter().filter(|g| **g > oldest) {
            prop_assert!(dir.join("generations").join(g).is_dir(), "failed run {} dropped", g);
        }
    }
}

#[test]
fn orphan_manifests_and_metadata_older_than_the_newest_point_go() {
    // Day 2: a run killed between its .meta and .sha1 uploads; day 4: between .sha1 and
    // its record. Both are older than the newest restore point (day 5).
    let paths: Vec<(Vec<u8>, bool)> = [
        format!("runs/{}.json", st(5)),
        format!("manifests/{}.sha1", st(5)),
        format!("manifests/{}.meta", st(5)),
        format!("manifests/{}.meta", st(2)),
        format!("manifests/{}.sha1", st(4)),
        format!("manifests/{}.meta", st(4)),
        format!("manifests/{}.meta", st(6)),
    ]
    .into_iter()
    .map(|p| (p.into_bytes(), false))
    .collect();
    let l = Listing::from_paths(paths.iter().map(|(p, d)| (p.as_slice(), *d)));
    let p = Policy {
        last: 1,
        ..Policy::default()
    };
    let plan = plan_prune(&l, &p, &utc, Mode::Merge);
    assert_eq!(
        plan.ops,
        [
            Op::RemoveManifest { stamp: st(2) },
            Op::RemoveManifest { stamp: st(4) }
        ],
        "the newest point's and a newer (running) one's are kept"
    );
}
