//! Retention end to end: a target built by real `rsync --backup-dir` runs from a source
//! that changes between runs (one run fails half way), pruned with `snapveil prune`
//! on a local path, through an ssh-style shell transport, and through a real rsync
//! daemon (rsync-only); then every remaining restore point is restored (overlay of
//! generations, path set from its manifest) and compared with the source at that run.

use crate::util::{self, rsyncd::RsyncDaemon};
use snapveil::manifest;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

type Files = BTreeMap<String, Vec<u8>>;

/// Runs: (stamp, succeeded). Chosen so that --keep-last 2 --keep-daily 3 --keep-weekly 2
/// (UTC) keeps r10, r9 (last, daily), r7 (daily), r5 (weekly: 2026-W10) and deletes
/// r6, r4, r2, r1; r3 and r8 fail.
const RUNS: [(&str, bool); 10] = [
    ("20260302T013000Z", true),  // r1 Mon W10
    ("20260303T013000Z", true),  // r2
    ("20260304T013000Z", false), // r3 fails half way
    ("20260305T013000Z", true),  // r4
    ("20260305T133000Z", true),  // r5
    ("20260309T013000Z", true),  // r6 Mon W11
    ("20260310T013000Z", true),  // r7
    ("20260311T013000Z", false), // r8 fails half way
    ("20260311T133000Z", true),  // r9
    ("20260312T013000Z", true),  // r10
];
const KEPT: [usize; 4] = [4, 6, 8, 9];
const POLICY: [&str; 6] = [
    "--keep-last",
    "2",
    "--keep-daily",
    "3",
    "--keep-weekly",
    "2",
];

fn put(src: &Path, rel: &str, content: &str, run: usize) {
    let p = src.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    // rsync's quick check is size + mtime: give every write its own second.
    let f = fs::File::options().write(true).open(&p).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(1_700_000_000 + run as u64 * 1000))
        .unwrap();
}

/// The source before run `i` (0-based): files created, changed, deleted, a directory
/// replaced by a file and back.
fn mutate(src: &Path, i: usize) {
    if i == 0 {
        put(src, "b", "b0", 0);
        put(src, "d/x", "x0", 0);
        put(src, "d/y", "y0", 0);
        put(src, "keep/k", "k", 0);
    }
    put(src, "a", &format!("a{i}"), i);
    put(src, &format!("n{i}"), &format!("new {i}"), i);
    if i >= 2 {
        let _ = fs::remove_file(src.join(format!("n{}", i - 2)));
    }
    if i.is_multiple_of(2) {
        put(src, "b", &format!("b{i}"), i);
    }
    if i.is_multiple_of(3) && src.join("d").is_dir() {
        put(src, "d/x", &format!("x{i}"), i);
    }
    if i == 3 {
        fs::remove_dir_all(src.join("d")).unwrap();
    }
    if i == 5 {
        put(src, "d", "d is a file now", i);
    }
    if i == 7 {
        fs::remove_file(src.join("d")).unwrap();
        put(src, "d/x", "x7", i);
    }
    if i == 8 {
        put(src, "e/f/g", "deep", i);
    }
}

fn files(root: &Path) -> Files {
    manifest::build(root)
        .unwrap()
        .into_iter()
        .map(|e| {
            let rel = String::from_utf8(e.path).unwrap();
            let data = fs::read(root.join(&rel)).unwrap();
            (rel, data)
        })
        .collect()
}

/// Builds the target with real rsync; returns the source's files at every run.
fn build_target(work: &Path, target: &Path) -> Vec<Files> {
    util::require_tool("rsync");
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    for d in ["current", "generations", "runs", "manifests"] {
        fs::create_dir_all(target.join(d)).unwrap();
    }
    let mut seen = Vec::new();
    for (i, (stamp, ok)) in RUNS.iter().enumerate() {
        mutate(&src, i);
        let mut cmd = Command::new("rsync");
        cmd.args(["-a", "--delete", "--backup"]).arg(format!(
            "--backup-dir={}",
            target.join("generations").join(stamp).display()
        ));
        if !ok {
            // Interrupted: only part of the tree made it (d/ and n* were not synced).
            cmd.args(["--exclude=/d/", "--exclude=/d", "--exclude=/n*"]);
        }
        cmd.arg(format!("{}/", src.display()))
            .arg(format!("{}/", target.join("current").display()));
        util::ok(&mut cmd);
        if *ok {
            let m = manifest::build(&target.join("current")).unwrap();
            fs::write(
                target.join("manifests").join(format!("{stamp}.sha1")),
                manifest::format(&m),
            )
            .unwrap();
            fs::write(
                target.join("runs").join(format!("{stamp}.json")),
                format!("{{\"stamp\":\"{stamp}\"}}"),
            )
            .unwrap();
        }
        seen.push(files(&src));
    }
    // Something that is not ours: must survive and be reported.
    fs::create_dir_all(target.join("generations/lost+found")).unwrap();
    fs::write(target.join("generations/lost+found/x"), "keep me").unwrap();
    seen
}

/// Restore as of `stamp`: paths from its manifest; each from the oldest generation after
/// it that holds the file, else current/. Checks the manifest's sha1 on the way.
fn restore(target: &Path, stamp: &str) -> Files {
    let mf = target.join("manifests").join(format!("{stamp}.sha1"));
    let entries = manifest::parse(&mf.display().to_string(), &fs::read(&mf).unwrap()).unwrap();
    let mut gens: Vec<String> = fs::read_dir(target.join("generations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|g| g.as_str() > stamp && g.len() == 16)
        .collect();
    gens.sort();
    entries
        .into_iter()
        .map(|e| {
            let rel = String::from_utf8(e.path).unwrap();
            let from = gens
                .iter()
                .map(|g| target.join("generations").join(g).join(&rel))
                .find(|p| p.is_file())
                .unwrap_or_else(|| target.join("current").join(&rel));
            // Missing only where a generation was deleted whole (approximate points).
            let data = fs::read(&from)
                .unwrap_or_else(|e| format!("<{}: {e}>", from.display()).into_bytes());
            (rel, data)
        })
        .collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn prune(target: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new(util::bin());
    cmd.args(["prune", "--utc", "--target", target])
        .args(POLICY)
        .args(extra);
    util::ok(&mut cmd)
}

fn stamp(i: usize) -> &'static str {
    RUNS[i].0
}

fn check_common(target: &Path, out: &str) {
    assert_eq!(
        names(&target.join("runs")),
        KEPT.iter()
            .map(|i| format!("{}.json", stamp(*i)))
            .collect::<Vec<_>>(),
        "{out}"
    );
    assert_eq!(
        names(&target.join("manifests")),
        KEPT.iter()
            .map(|i| format!("{}.sha1", stamp(*i)))
            .collect::<Vec<_>>(),
        "{out}"
    );
    assert_eq!(
        fs::read_to_string(target.join("generations/lost+found/x")).unwrap(),
        "keep me"
    );
    assert!(out.contains("left alone: generations/lost+found"), "{out}");
    assert!(
        out.contains(&format!("{}  keep    last, daily, weekly", stamp(9))),
        "{out}"
    );
    assert!(
        out.contains(&format!("{}  keep    weekly", stamp(4))),
        "{out}"
    );
    for d in [0, 1, 3, 5] {
        assert!(out.contains(&format!("{}  delete", stamp(d))), "{out}");
    }
}

fn check_restores(target: &Path, seen: &[Files], inexact: &[usize]) {
    for i in KEPT {
        let got = restore(target, stamp(i));
        if inexact.contains(&i) {
            assert_ne!(
                got,
                seen[i],
                "restore point {} was reported approximate",
                stamp(i)
            );
        } else {
            assert_eq!(got, seen[i], "restore as of {}", stamp(i));
        }
    }
}

fn merge_mode(target_arg: impl Fn(&Path) -> (String, Vec<String>)) {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    let seen = build_target(tmp.path(), &target);
    let before = files(&target);
    // Every restore point is exact before pruning (the test's restore is right).
    for (i, (s, ok)) in RUNS.iter().enumerate() {
        if *ok {
            assert_eq!(restore(&target, s), seen[i], "before prune, {s}");
        }
    }
    let (arg, extra) = target_arg(tmp.path());
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();

    let dry = prune(&arg, &[&["--dry-run"], extra.as_slice()].concat());
    assert!(dry.contains("would delete"), "{dry}");
    assert_eq!(files(&target), before, "dry run changed the target");

    let out = prune(&arg, &extra);
    check_common(&target, &out);
    let merges = [
        format!(
            "merge generations {}, {} into {} (versions as of {})",
            stamp(5),
            stamp(6),
            stamp(6),
            stamp(4)
        ),
        format!(
            "merge generations {}, {} into {} (versions as of {})",
            stamp(7),
            stamp(8),
            stamp(8),
            stamp(6)
        ),
    ];
    for m in &merges {
        assert!(out.contains(m.as_str()), "missing {m:?} in\n{out}");
    }
    // Generations <= the oldest kept (r5) are gone, merged ones carry the kept names.
    assert_eq!(
        names(&target.join("generations")),
        [stamp(6), stamp(8), stamp(9), "lost+found"]
    );
    check_restores(&target, &seen, &[]);
    let again = prune(&arg, &extra);
    assert!(again.contains("nothing to do"), "{again}");
}

#[test]
fn prune_local_target_merges_and_keeps_restores_exact() {
    merge_mode(|tmp| (tmp.join("target").display().to_string(), vec![]));
}

/// The ssh-with-shell executor end to end, with `sh` standing in for the ssh hop (the
/// script and rsync's remote side run for real on this machine; the loopback sshd test
/// comes with the sshd fixture).
#[test]
fn prune_shell_target_runs_the_same_merge_as_a_script() {
    merge_mode(|tmp| {
        let hop = tmp.join("hop");
        fs::write(
            &hop,
            "#!/bin/sh\n# argv: HOST COMMAND...; run COMMAND here\nshift\nexec sh -c \"$*\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&hop, fs::Permissions::from_mode(0o755)).unwrap();
        (
            format!("localhost:{}", tmp.join("target").display()),
            vec!["--ssh".into(), hop.display().to_string()],
        )
    });
}

#[test]
fn prune_rsync_daemon_target_deletes_whole_and_reports_approximate() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    let seen = build_target(tmp.path(), &target);
    let daemon = RsyncDaemon::start(tmp.path(), "bk", &target);
    rsync_only(&target, &seen, &daemon.url("bk"), &[]);
    drop(daemon);
}

/// A key restricted to rrsync (`command="rrsync DIR"`): the hop runs the requested
/// command the way sshd does for a forced command, through the real rrsync script.
#[test]
fn prune_rrsync_target_deletes_whole_and_reports_approximate() {
    util::require_tool("rrsync");
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    let seen = build_target(tmp.path(), &target);
    let hop = tmp.path().join("hop");
    fs::write(
        &hop,
        format!(
            "#!/bin/sh\n[ \"$1\" = -l ] && shift 2\nshift\nSSH_ORIGINAL_COMMAND=\"$*\" exec rrsync {}\n",
            target.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&hop, fs::Permissions::from_mode(0o755)).unwrap();
    let hop = hop.display().to_string();
    rsync_only(
        &target,
        &seen,
        "backup@localhost:",
        &["--rsync-only", "--ssh", &hop],
    );
}

fn rsync_only(target: &Path, seen: &[Files], url: &str, extra: &[&str]) {
    let target = target.to_path_buf();
    let out = prune(url, extra);
    check_common(&target, &out);
    // (r5, r7]: r6's generation goes whole, so r5 loses versions first replaced by r6;
    // (r7, r9]: r8 failed, its generation stays, so r7 stays exact.
    assert!(
        out.contains(&format!(
            "delete generation {} (its restore point is deleted)",
            stamp(5)
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "approximate: restore point {} lost the version of",
            stamp(4)
        )),
        "{out}"
    );
    assert_eq!(out.matches("approximate:").count(), 1, "{out}");
    assert_eq!(
        names(&target.join("generations")),
        [stamp(6), stamp(7), stamp(8), stamp(9), "lost+found"]
    );
    check_restores(&target, seen, &[4]);
    let again = prune(url, extra);
    assert!(again.contains("nothing to do"), "{again}");
}

#[test]
fn prune_refuses_a_policy_that_keeps_nothing_and_a_non_target() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(util::bin());
    cmd.args(["prune", "--target"]).arg(tmp.path());
    let err = util::fails(&mut cmd);
    assert!(err.contains("retention policy keeps nothing"), "{err}");
    let mut cmd = Command::new(util::bin());
    cmd.args(["prune", "--keep-last", "1", "--target"])
        .arg(tmp.path());
    let err = util::fails(&mut cmd);
    assert!(err.contains("not a snapveil target"), "{err}");
    let mut cmd = Command::new(util::bin());
    cmd.args(["prune", "--keep-within", "2x", "--target"])
        .arg(tmp.path());
    let err = util::fails(&mut cmd);
    assert!(err.contains("within: duration \"2x\""), "{err}");
}
