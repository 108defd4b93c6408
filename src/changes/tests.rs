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

/// [`super::plan`] over a walk that reads back (its errors are the walk's own).
fn plan(index: Result<Option<Index>, ChangesError>, walk: &ViewWalk, e: &Expect<'_>) -> Plan {
    super::plan(index, walk, e).expect("a test walk reads back")
}

fn head(target: &str, stamp: &str, config: &str, full_at: i64) -> Head {
    Head {
        target: target.into(),
        stamp: stamp.into(),
        config: config.into(),
        full_at,
    }
}

/// The index of `w` for target `/t` and config `c`, saved under `dir` and opened again,
/// as a run finds it.
fn saved(dir: &Path, w: &ViewWalk, stamp: &str, full_at: i64) -> Index {
    let p = dir.join("saved.idx");
    Index::save(w, &head("/t", stamp, "c", full_at), &p).unwrap();
    Index::load(&p).unwrap().unwrap()
}

/// Every entry of the index at `p`, or why it cannot be used.
fn read(p: &Path) -> Result<Vec<(Vec<u8>, u64)>, ChangesError> {
    Index::load(p).and_then(|i| i.expect("an index").read_all())
}

fn entries(w: &[(&str, bool, u64)]) -> Vec<(Vec<u8>, u64)> {
    let mut v: Vec<(Vec<u8>, u64)> = w
        .iter()
        .map(|(p, _, fp)| (p.as_bytes().to_vec(), *fp))
        .collect();
    v.sort();
    v
}

fn expect<'a>(newest: Option<&'a str>) -> Expect<'a> {
    Expect {
        target: "/t",
        newest,
        config: "c",
        frozen: true,
        forced_full: false,
        empty: false,
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
    let t = tempfile::TempDir::new().unwrap();
    let idx = || saved(t.path(), &walk(BEFORE), "S1", 999_000);
    // Nothing changed: nothing to send.
    assert_eq!(
        lines(&plan(Ok(Some(idx())), &walk(BEFORE), &expect(Some("S1")))),
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
    let p = plan(Ok(Some(idx())), &walk(&now), &expect(Some("S1")));
    assert_eq!(lines(&p), [".", "a/g", "b/.", "n/."]);
    // Entries gone from the end, and a name that sorts between a directory and its
    // entries (`a-x`, `-` before `/`): the merge keeps both orders in step.
    let now = [
        ("", true, 1),
        ("a", true, 2),
        ("a-x", false, 9),
        ("a/f", false, 3),
        ("a/g", false, 4),
    ];
    let p = plan(Ok(Some(idx())), &walk(&now), &expect(Some("S1")));
    assert_eq!(lines(&p), ["a-x"]);
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
    let t = tempfile::TempDir::new().unwrap();
    let w = walk(BEFORE);
    let idx = || Ok(Some(saved(t.path(), &w, "S1", 999_000)));
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
    // An index that matches, of a target whose current/ was emptied since.
    assert!(why(plan(
        idx(),
        &w,
        &Expect {
            empty: true,
            ..expect(Some("S1"))
        }
    ))
    .contains("the target's current/ is empty"));
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
    // Damaged where only its end can tell: the entries read before are not used.
    let p = t.path().join("saved.idx");
    let mut bytes = fs::read(&p).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&p, &bytes).unwrap();
    let damaged = Index::load(&p);
    assert!(why(plan(damaged, &w, &expect(Some("S1")))).contains("checksum does not match"));
}

#[test]
fn the_index_round_trips_and_a_damaged_one_is_refused() {
    let t = tempfile::TempDir::new().unwrap();
    let p = index_path(t.path(), "job");
    assert!(Index::load(&p).unwrap().is_none());
    let h = head("ssh://h/t", "20261201T000000Z", "abc", 42);
    Index::save(&walk(BEFORE), &h, &p).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(Index::load(&p).unwrap().unwrap().head, h);
    assert_eq!(read(&p).unwrap(), entries(BEFORE));
    let good = fs::read(&p).unwrap();
    for at in [0, good.len() / 2, good.len() - 33, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        fs::write(&p, &bad).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("not a snapveil index"), "{e}");
    }
    for cut in [5, 33, 40] {
        fs::write(&p, &good[..good.len() - cut]).unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert!(e.contains("not a snapveil index"), "{e}");
    }
    let mut longer = good.clone();
    longer.push(0);
    fs::write(&p, &longer).unwrap();
    assert!(read(&p)
        .unwrap_err()
        .to_string()
        .contains("after its checksum"));
    // An index of the version before (its entries were keys of paths, not paths).
    fs::write(&p, b"# snapveil-changes v1\ntarget=t\n\n").unwrap();
    let e = read(&p).unwrap_err().to_string();
    assert!(
        e.ends_with(
            "job.idx: an index of another snapveil version \
             (snapveil-changes v1; this one reads snapveil-changes v2)"
        ),
        "{e}"
    );
}

/// Entries out of path order are refused even under a good checksum: the merge with the
/// walk would skip entries it has passed.
#[test]
fn an_index_out_of_path_order_is_refused() {
    let t = tempfile::TempDir::new().unwrap();
    let p = t.path().join("i.idx");
    let mut body =
        format!("{HEADER}\ntarget=t\nstamp=s\nconfig=c\nfull_at=1\nentries=3\n\n").into_bytes();
    for (shared, rest) in [(0, &b""[..]), (0, b"b"), (0, b"a")] {
        crate::leb128::push(&mut body, shared);
        crate::leb128::push(&mut body, rest.len() as u64);
        body.extend_from_slice(rest);
        body.extend_from_slice(&7u64.to_le_bytes());
    }
    let sum = sha2::Sha256::digest(&body);
    body.extend_from_slice(&sum);
    fs::write(&p, &body).unwrap();
    let e = read(&p).unwrap_err().to_string();
    assert!(
        e.contains("i.idx: not a snapveil index: entries not in path order"),
        "{e}"
    );
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
    let (old, new) = (walk(BEFORE), walk(&BEFORE[..3]));
    let (h1, h2) = (head("t", "S1", "c", 1), head("t", "S2", "c", 1));
    Index::save(&old, &h1, &p).unwrap();
    let save_new = || Index::save_pending(&new, &h2, &p).unwrap();
    let names = || {
        let mut v: Vec<String> = fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    // A run that fails after writing it: the last good index stays, nothing else.
    let pending = save_new();
    assert_eq!(names(), ["job.idx", "job.idx.pending"]);
    assert_eq!(read(&p).unwrap(), entries(BEFORE));
    drop(pending);
    assert_eq!(names(), ["job.idx"]);
    assert_eq!(Index::load(&p).unwrap().unwrap().head, h1);
    // A run killed with it written: the next run's cleanup removes it.
    std::mem::forget(save_new());
    assert_eq!(names(), ["job.idx", "job.idx.pending"]);
    assert_eq!(
        remove_pending(&p).unwrap(),
        Some(p.with_extension("idx.pending"))
    );
    assert_eq!(remove_pending(&p).unwrap(), None);
    assert_eq!(names(), ["job.idx"]);
    // A run recorded: the new one, in place.
    let n = save_new().commit().unwrap();
    assert_eq!(n, 3);
    assert_eq!(names(), ["job.idx"]);
    assert_eq!(Index::load(&p).unwrap().unwrap().head, h2);
    assert_eq!(read(&p).unwrap(), entries(&BEFORE[..3]));
}
