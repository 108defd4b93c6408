use super::*;
use crate::manifest::meta::{Kind, MetaEntry};

/// A walk of entries (path, is_dir, fingerprint), sorted as a walk is.
fn walk(entries: &[(&str, bool, u64)]) -> ViewWalk {
    let found = entries
        .iter()
        .map(|(p, d, fp)| {
            let m = MetaEntry {
                path: p.as_bytes().to_vec(),
                kind: if *d { Kind::Dir } else { Kind::File },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime_ns: 0,
            };
            (m, (!d).then_some(0), *fp)
        })
        .collect();
    ViewWalk::from_found(Path::new("/v"), found)
}

fn expect<'a>(newest: Option<&'a str>) -> Expect<'a> {
    Expect {
        target: "/t",
        newest,
        config: "c",
        frozen: true,
        forced_full: false,
        full_every: 7 * 86400,
        now: 1_000_000,
    }
}

fn lines(p: &Plan) -> Vec<String> {
    match p {
        Plan::Changes { list, .. } => list
            .iter()
            .map(|l| String::from_utf8(l.clone()).unwrap())
            .collect(),
        Plan::Full(why) => panic!("full pass: {why}"),
    }
}

const BEFORE: &[(&str, bool, u64)] = &[
    ("", true, 1),
    ("a", true, 2),
    ("a/f", false, 3),
    ("a/g", false, 4),
    ("b", true, 5),
    ("b/h", false, 6),
    ("c", false, 7),
];

#[test]
fn lists_changed_directories_with_dot_and_changed_files_outside_them() {
    let idx = Index::of(&walk(BEFORE), "/t", "S1", "c", 999_000);
    // Nothing changed: nothing to send.
    assert_eq!(
        lines(&plan(
            Ok(Some(idx.clone())),
            &walk(BEFORE),
            &expect(Some("S1"))
        )),
        Vec::<String>::new()
    );
    // a/g rewritten in place (its directory unchanged); b/h deleted (b changed); a new
    // directory n with a file; the root changed because n appeared.
    let now = [
        ("", true, 10),
        ("a", true, 2),
        ("a/f", false, 3),
        ("a/g", false, 40),
        ("b", true, 50),
        ("c", false, 7),
        ("n", true, 80),
        ("n/x", false, 81),
    ];
    let p = plan(Ok(Some(idx.clone())), &walk(&now), &expect(Some("S1")));
    assert_eq!(lines(&p), [".", "a/g", "b/.", "n/."]);
    assert!(matches!(
        p,
        Plan::Changes {
            full_at: 999_000,
            ..
        }
    ));
}

#[test]
fn a_full_pass_whenever_the_index_does_not_describe_the_target() {
    let w = walk(BEFORE);
    let idx = || Ok(Some(Index::of(&w, "/t", "S1", "c", 999_000)));
    let why = |p: Plan| match p {
        Plan::Full(why) => why,
        p => panic!("{p:?}"),
    };
    assert!(why(plan(Ok(None), &w, &expect(Some("S1")))).contains("no index"));
    assert!(why(plan(idx(), &w, &expect(Some("S2")))).contains("newest is S2"));
    assert!(why(plan(idx(), &w, &expect(None))).contains("newest is none"));
    assert!(why(plan(
        idx(),
        &w,
        &Expect {
            target: "/u",
            ..expect(Some("S1"))
        }
    ))
    .contains("another target"));
    assert!(why(plan(
        idx(),
        &w,
        &Expect {
            config: "d",
            ..expect(Some("S1"))
        }
    ))
    .contains("excludes"));
    assert!(why(plan(
        idx(),
        &w,
        &Expect {
            frozen: false,
            ..expect(Some("S1"))
        }
    ))
    .contains("live"));
    assert!(why(plan(
        idx(),
        &w,
        &Expect {
            forced_full: true,
            ..expect(Some("S1"))
        }
    ))
    .contains("--full"));
    let late = Expect {
        now: 999_000 + 7 * 86400,
        ..expect(Some("S1"))
    };
    assert!(why(plan(idx(), &w, &late)).contains("7 days old"));
    let behind = Expect {
        now: 998_999,
        ..expect(Some("S1"))
    };
    assert!(why(plan(idx(), &w, &behind)).contains("clock is behind"));
    let bad = Err(ChangesError::Corrupt {
        path: "/s/i".into(),
        why: "x".into(),
    });
    assert!(why(plan(bad, &w, &expect(Some("S1")))).contains("cannot be used"));
}

#[test]
fn the_index_round_trips_and_a_damaged_one_is_refused() {
    let t = tempfile::TempDir::new().unwrap();
    let p = index_path(t.path(), "job");
    assert!(Index::load(&p).unwrap().is_none());
    let idx = Index::of(&walk(BEFORE), "ssh://h/t", "20261201T000000Z", "abc", 42);
    idx.save(&p).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(Index::load(&p).unwrap(), Some(idx.clone()));
    assert_eq!(idx.len(), BEFORE.len());
    let good = fs::read(&p).unwrap();
    for at in [0, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        fs::write(&p, &bad).unwrap();
        let e = Index::load(&p).unwrap_err().to_string();
        assert!(e.contains("not a snapveil index"), "{e}");
    }
    fs::write(&p, &good[..good.len() - 5]).unwrap();
    assert!(Index::load(&p).is_err());
}

#[test]
fn fingerprint_sees_ctime_size_mode_owner_and_link() {
    let m = |kind: Kind, mode: u32, uid: u32| MetaEntry {
        path: b"p".to_vec(),
        kind,
        mode,
        uid,
        gid: 2,
        mtime_ns: 5,
    };
    let base = fingerprint(&m(Kind::File, 0o644, 1), 10, 6);
    assert_ne!(base, fingerprint(&m(Kind::File, 0o644, 1), 10, 7));
    assert_ne!(base, fingerprint(&m(Kind::File, 0o644, 1), 11, 6));
    assert_ne!(base, fingerprint(&m(Kind::File, 0o600, 1), 10, 6));
    assert_ne!(base, fingerprint(&m(Kind::File, 0o644, 3), 10, 6));
    assert_ne!(
        base,
        fingerprint(&m(Kind::Symlink(b"x".to_vec()), 0o644, 1), 10, 6)
    );
    assert_eq!(base, fingerprint(&m(Kind::File, 0o644, 1), 10, 6));
}

#[test]
fn a_pending_index_takes_the_place_of_the_last_only_when_committed() {
    let t = tempfile::TempDir::new().unwrap();
    let p = index_path(t.path(), "job");
    let old = Index::of(&walk(BEFORE), "t", "S1", "c", 1);
    old.save(&p).unwrap();
    let new = Index::of(&walk(&BEFORE[..3]), "t", "S2", "c", 1);
    let names = || {
        let mut v: Vec<String> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    // A run that fails after writing it: the last good index stays, nothing else.
    let pending = new.save_pending(&p).unwrap();
    assert_eq!(names(), ["job.idx", "job.idx.pending"]);
    assert_eq!(Index::load(&p).unwrap(), Some(old.clone()));
    drop(pending);
    assert_eq!(names(), ["job.idx"]);
    assert_eq!(Index::load(&p).unwrap(), Some(old));
    // A run killed with it written: the next run's cleanup removes it.
    std::mem::forget(new.save_pending(&p).unwrap());
    assert_eq!(names(), ["job.idx", "job.idx.pending"]);
    assert_eq!(
        remove_pending(&p).unwrap(),
        Some(p.with_extension("idx.pending"))
    );
    assert_eq!(remove_pending(&p).unwrap(), None);
    assert_eq!(names(), ["job.idx"]);
    // A run recorded: the new one, in place.
    let entries = new.save_pending(&p).unwrap().commit().unwrap();
    assert_eq!(entries, new.len());
    assert_eq!(names(), ["job.idx"]);
    assert_eq!(Index::load(&p).unwrap(), Some(new));
}
