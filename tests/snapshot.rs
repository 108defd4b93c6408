//! Snapshot providers. btrfs and ZFS run for real (loop device, zfs-fuse pool); the
//! `.zfs/snapshot` branch (zfs-fuse lacks it) and LVM (no device-mapper here) are pinned
//! by their exact command sequences with `ScriptedRunner`.

use crate::util::btrfs::BtrfsLoop;
use crate::util::zfs::ZfsPool;
use crate::util::{bin, describe, ok};
use snapveil::exec::scripted::ScriptedRunner;
use snapveil::exec::{Output, Runner, SystemRunner};
use snapveil::snapshot::{
    cleanup_stale, error_chain, take, SnapshotError, SnapshotGuard, SnapshotOptions, Source, Tools,
};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STAMP: &str = "20261124T013000Z";

fn tools() -> Tools {
    Tools::default()
}

fn opts() -> SnapshotOptions {
    SnapshotOptions::default()
}

/// `take` with default options and tools at [`STAMP`].
// `take`'s own error type, as large as src/snapshot allows it to be there.
#[allow(clippy::result_large_err)]
fn take_plain<'a>(
    r: &'a dyn Runner,
    job: &str,
    src: &Source,
    work: &Path,
) -> Result<SnapshotGuard<'a>, SnapshotError> {
    take(r, job, STAMP, src, &opts(), &tools(), work)
}

fn write(p: &Path, s: &str) {
    std::fs::write(p, s).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("snapveil-work-")
        .tempdir()
        .unwrap()
}

/// Snapshot entries (`snapveil-*`) in a btrfs snapshot dir.
fn ours_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Spawns `snapveil snapshot ... --wait|--hold` and reads its `path` line.
fn spawn_snapshot(args: &[&str]) -> (Child, PathBuf) {
    let mut child = Command::new(bin())
        .arg("snapshot")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn snapveil");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut path = None;
    for l in lines.by_ref() {
        let l = l.unwrap();
        if let Some(p) = l.strip_prefix("path ") {
            path = Some(PathBuf::from(p));
        }
        if l.starts_with("consistent ") {
            break;
        }
    }
    let path = path.unwrap_or_else(|| {
        let st = child.wait();
        panic!("snapveil snapshot printed no path ({st:?})")
    });
    // Keep draining stdout on a thread so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, path)
}

/// `--source <source> --job <job> --state-dir <state>`, for `snapshot` and `cleanup`.
fn cli_args<'a>(source: &'a str, job: &'a str, state: &'a Path) -> [&'a str; 6] {
    let state = state.to_str().unwrap();
    ["--source", source, "--job", job, "--state-dir", state]
}

fn wait_timeout(child: &mut Child, t: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("snapveil did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

// ---------------------------------------------------------------- btrfs, real

#[test]
fn btrfs_snapshot_is_frozen_read_only_and_released() {
    let Some(fs) = BtrfsLoop::new() else { return };
    let sub = fs.subvolume("data");
    write(&sub.join("a"), "before");
    let src = Source::Btrfs {
        subvolume: sub.clone(),
    };
    let work = workdir();
    let g = take_plain(&SystemRunner, "t1", &src, work.path()).unwrap();
    let expect = fs.mnt.join(".snapveil/snapveil-t1-20261124T013000Z");
    assert_eq!(g.path(), expect);
    assert_eq!(g.name(), "snapveil-t1-20261124T013000Z");
    assert!(g.consistent());
    write(&sub.join("a"), "after");
    write(&sub.join("b"), "new");
    assert_eq!(read(&g.path().join("a")), "before");
    assert!(
        !g.path().join("b").exists(),
        "file written after the snapshot is in it"
    );
    assert!(
        std::fs::write(g.path().join("c"), "x").is_err(),
        "snapshot is writable"
    );
    assert!(fs
        .subvolumes()
        .contains(&".snapveil/snapveil-t1-20261124T013000Z".to_owned()));
    g.release().unwrap();
    assert!(!expect.exists());
    assert_eq!(fs.subvolumes(), vec!["data".to_owned()]);
    assert_eq!(read(&sub.join("a")), "after");
}

#[test]
fn btrfs_guard_releases_on_panic() {
    let Some(fs) = BtrfsLoop::new() else { return };
    let sub = fs.subvolume("data");
    let src = Source::Btrfs { subvolume: sub };
    let work = workdir();
    let path = std::panic::catch_unwind(|| {
        let g = take_plain(&SystemRunner, "t2", &src, work.path()).unwrap();
        assert!(g.path().is_dir());
        panic!("job failed at {}", g.path().display());
    })
    .unwrap_err();
    let msg = path.downcast_ref::<String>().unwrap();
    assert!(msg.contains("snapveil-t2-"), "{msg}");
    assert_eq!(ours_in(&fs.mnt.join(".snapveil")), Vec::<String>::new());
    assert_eq!(fs.subvolumes(), vec!["data".to_owned()]);
}

#[test]
fn btrfs_killed_run_is_removed_by_cleanup_but_user_snapshots_stay() {
    let Some(fs) = BtrfsLoop::new() else { return };
    let sub = fs.subvolume("data");
    let other = fs.subvolume("other");
    write(&sub.join("a"), "x");
    let snapdir = fs.mnt.join(".snapveil");
    let state = workdir();
    let source = format!("btrfs:{}", sub.display());
    let args = cli_args(&source, "killed", state.path());

    let (mut child, path) = spawn_snapshot(&[&args[..], &["--wait"]].concat());
    assert!(
        path.starts_with(&snapdir) && path.is_dir(),
        "{}",
        path.display()
    );
    signal(&child, libc::SIGKILL);
    wait_timeout(&mut child, Duration::from_secs(10));
    assert!(
        path.is_dir(),
        "SIGKILL cannot release: the snapshot must still be there"
    );
    let stale = path.file_name().unwrap().to_string_lossy().into_owned();

    // What a user may keep beside ours: similar names, another job, a snapshot of
    // another subvolume carrying exactly our pattern, and a plain directory.
    let user = [
        "snapveil-killed-manual",
        "snapveil-killed-20261124T013000Z.keep",
        "snapveil-killedx-20261124T013000Z",
        "snapveil-other-20261124T013000Z",
    ];
    for n in user {
        fs.user_snapshot(&sub, &snapdir.join(n));
    }
    fs.user_snapshot(&other, &snapdir.join("snapveil-killed-20200101T000000Z"));
    std::fs::create_dir(snapdir.join("snapveil-killed-20200102T000000Z")).unwrap();

    let out = ok(Command::new(bin()).arg("cleanup").args(args));
    assert_eq!(out, format!("removed {}\n", snapdir.join(&stale).display()));
    assert!(!path.exists());
    let mut left = ours_in(&snapdir);
    left.sort();
    let mut want: Vec<String> = user.iter().map(|s| s.to_string()).collect();
    want.push("snapveil-killed-20200101T000000Z".into());
    want.push("snapveil-killed-20200102T000000Z".into());
    want.sort();
    assert_eq!(left, want);

    // Nothing more to do on the next run.
    let src: Source = source.parse().unwrap();
    let again = cleanup_stale(
        &SystemRunner,
        "killed",
        &src,
        &opts(),
        &tools(),
        state.path(),
    )
    .unwrap();
    assert_eq!(again, Vec::<String>::new());
}

#[test]
fn btrfs_hold_keeps_the_snapshot_until_cleanup() {
    let Some(fs) = BtrfsLoop::new() else { return };
    let sub = fs.subvolume("data");
    write(&sub.join("a"), "held");
    let state = workdir();
    let source = format!("btrfs:{}", sub.display());
    let snapdir = fs.mnt.join("snaps");
    let dir_args = ["--snapshot-dir", snapdir.to_str().unwrap()];
    let args = [&cli_args(&source, "hold", state.path())[..], &dir_args].concat();
    let out = ok(Command::new(bin())
        .arg("snapshot")
        .args(&args)
        .arg("--hold"));
    let path = out
        .lines()
        .find_map(|l| l.strip_prefix("path "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no path line in {out:?}"));
    assert!(out.starts_with("snapshot snapveil-hold-"), "{out}");
    assert!(out.ends_with("consistent yes\n"), "{out}");
    assert!(path.starts_with(&snapdir));
    assert_eq!(read(&path.join("a")), "held");
    let out = ok(Command::new(bin()).arg("cleanup").args(&args));
    assert_eq!(out, format!("removed {}\n", path.display()));
    assert_eq!(ours_in(&snapdir), Vec::<String>::new());

    // Without --hold the snapshot is released before the command returns.
    let out = ok(Command::new(bin()).arg("snapshot").args(&args));
    assert!(out.contains("path "), "{out}");
    assert_eq!(ours_in(&snapdir), Vec::<String>::new());
}

#[test]
fn btrfs_sigint_releases_even_when_repeated() {
    let Some(fs) = BtrfsLoop::new() else { return };
    let sub = fs.subvolume("data");
    let state = workdir();
    let source = format!("btrfs:{}", sub.display());
    let args = cli_args(&source, "sig", state.path());
    let snapdir = fs.mnt.join(".snapveil");

    // --wait: the signal is the normal end; a second one during release changes nothing.
    let (mut child, path) = spawn_snapshot(&[&args[..], &["--wait"]].concat());
    assert!(path.is_dir());
    signal(&child, libc::SIGINT);
    signal(&child, libc::SIGINT);
    let st = wait_timeout(&mut child, Duration::from_secs(20));
    assert!(st.success(), "{st}");
    assert!(!path.exists(), "snapshot left after SIGINT");

    // Plain `snapshot` hit by SIGINTs at arbitrary points: whatever it had taken is
    // released (or it died before taking anything).
    for delay_ms in [0u64, 5, 20, 50] {
        let mut child = Command::new(bin())
            .arg("snapshot")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "snapveil snapshot did not exit");
            signal(&child, libc::SIGINT);
            std::thread::sleep(Duration::from_millis(3));
        }
        assert_eq!(
            ours_in(&snapdir),
            Vec::<String>::new(),
            "delay {delay_ms}ms"
        );
    }
    assert_eq!(fs.subvolumes(), vec!["data".to_owned()]);
}

#[test]
fn btrfs_failure_names_the_subvolume_and_quotes_btrfs() {
    let Some(fs) = BtrfsLoop::new() else { return };
    let plain = fs.mnt.join("plain");
    std::fs::create_dir(&plain).unwrap();
    let src = Source::Btrfs {
        subvolume: plain.clone(),
    };
    let work = workdir();
    let e = take_plain(&SystemRunner, "t3", &src, work.path()).unwrap_err();
    assert!(matches!(e, SnapshotError::Btrfs { .. }), "{e:?}");
    let msg = error_chain(&e);
    assert!(msg.contains(&plain.display().to_string()), "{msg}");
    assert!(msg.contains("btrfs subvolume snapshot -r"), "{msg}");
    assert!(msg.contains("Not a Btrfs subvolume"), "{msg}");

    // The same through the CLI: exit 1, the path and the tool's words on stderr.
    let mut cmd = Command::new(bin());
    cmd.args(["snapshot", "--job", "t3", "--state-dir"])
        .arg(work.path())
        .arg("--source")
        .arg(format!("btrfs:{}", plain.display()));
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&cmd, &out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&plain.display().to_string()) && err.contains("Not a Btrfs subvolume"),
        "{err}"
    );
}

// ---------------------------------------------------------------- ZFS, real (zfs-fuse)

fn recursive() -> SnapshotOptions {
    SnapshotOptions {
        recursive: true,
        ..opts()
    }
}

fn zfs_source(dataset: &str) -> Source {
    Source::Zfs {
        dataset: dataset.to_owned(),
    }
}

fn no_snapveil_names(pool: &ZfsPool) {
    let all = pool.all();
    assert!(
        all.iter().all(|n| !n.contains("snapveil-")),
        "left behind: {all:?}"
    );
}

#[test]
fn zfs_clone_path_is_frozen_read_only_and_released() {
    let Some(pool) = ZfsPool::new() else { return };
    let ds = pool.dataset("data");
    let live = pool.mountpoint.join("data");
    write(&live.join("a"), "before");
    let work = workdir();
    let src = zfs_source(&ds);
    let g = take_plain(&SystemRunner, "z1", &src, work.path()).unwrap();
    let name = "snapveil-z1-20261124T013000Z";
    // zfs-fuse has no .zfs/snapshot: the tree is a read-only clone in the work dir.
    assert_eq!(g.path(), work.path().join(name));
    let all = pool.all();
    assert!(all.contains(&format!("{ds}@{name}")), "{all:?}");
    assert!(all.contains(&format!("{}/{name}", pool.name)), "{all:?}");
    write(&live.join("a"), "after");
    write(&live.join("b"), "new");
    assert_eq!(read(&g.path().join("a")), "before");
    assert!(!g.path().join("b").exists());
    assert!(
        std::fs::write(g.path().join("c"), "x").is_err(),
        "clone is writable"
    );
    g.release().unwrap();
    no_snapveil_names(&pool);
    assert!(!work.path().join(name).exists());
}

#[test]
fn zfs_recursive_mounts_children_beneath_and_cleans_up() {
    let Some(pool) = ZfsPool::new() else { return };
    let ds = pool.dataset("data");
    pool.dataset("data/child");
    pool.dataset("data/child/grand");
    let live = pool.mountpoint.join("data");
    write(&live.join("top"), "t");
    write(&live.join("child/c"), "c");
    write(&live.join("child/grand/g"), "g");
    let work = workdir();
    let o = recursive();
    let src = zfs_source(&ds);
    let g = take(&SystemRunner, "z2", STAMP, &src, &o, &tools(), work.path()).unwrap();
    write(&live.join("child/c"), "changed");
    write(&live.join("child/grand/late"), "late");
    assert_eq!(read(&g.path().join("top")), "t");
    assert_eq!(read(&g.path().join("child/c")), "c");
    assert_eq!(read(&g.path().join("child/grand/g")), "g");
    assert!(!g.path().join("child/grand/late").exists());
    let all = pool.all();
    for s in ["data", "data/child", "data/child/grand"] {
        let snap = format!("{}/{s}@snapveil-z2-{STAMP}", pool.name);
        assert!(all.contains(&snap), "{snap} missing in {all:?}");
    }
    g.release().unwrap();
    no_snapveil_names(&pool);
}

#[test]
fn zfs_stale_cleanup_removes_ours_only() {
    let Some(pool) = ZfsPool::new() else { return };
    let ds = pool.dataset("data");
    pool.dataset("data/child");
    let work = workdir();
    let o = recursive();
    let src = zfs_source(&ds);
    // A run that died holding its snapshot: clones and snapshots stay behind.
    let g = take(&SystemRunner, "z3", STAMP, &src, &o, &tools(), work.path()).unwrap();
    let kept = g.keep();
    assert_eq!(kept, format!("snapveil-z3-{STAMP}"));
    let user = [
        format!("{ds}@snapveil-z3-manual"),
        format!("{ds}@snapveil-z3x-{STAMP}"),
        format!("{ds}@snapveil-z3-{STAMP}-keep"),
        format!("{ds}@snapveil-other-{STAMP}"),
        format!("{ds}/child@snapveil-z3-20200101T00000Z"),
    ];
    for u in &user {
        ok(Command::new("zfs").args(["snapshot", u]));
    }
    // A user's dataset at the pool top named like our clone, but no clone of ours.
    let decoy = pool.dataset("snapveil-z3-20200101T000000Z");

    let mut removed = cleanup_stale(&SystemRunner, "z3", &src, &o, &tools(), work.path()).unwrap();
    removed.sort();
    let mut want = vec![
        format!("{}/snapveil-z3-{STAMP}", pool.name),
        format!("{ds}@snapveil-z3-{STAMP}"),
        format!("{ds}/child@snapveil-z3-{STAMP}"),
    ];
    want.sort();
    assert_eq!(removed, want);
    let all = pool.all();
    for u in user.iter().chain([&decoy]) {
        assert!(all.contains(u), "user's {u} was removed: {all:?}");
    }
    assert!(
        !all.iter()
            .any(|n| n.contains(&format!("snapveil-z3-{STAMP}")) && !n.ends_with("-keep")),
        "{all:?}"
    );
    assert!(!work.path().join(&kept).exists());
    let again = cleanup_stale(&SystemRunner, "z3", &src, &o, &tools(), work.path()).unwrap();
    assert_eq!(again, Vec::<String>::new());
}

#[test]
fn zfs_missing_dataset_is_named_with_zfs_stderr() {
    let Some(pool) = ZfsPool::new() else { return };
    let ds = format!("{}/nope", pool.name);
    let work = workdir();
    let src = zfs_source(&ds);
    let e = take_plain(&SystemRunner, "z4", &src, work.path()).unwrap_err();
    assert!(
        matches!(e, SnapshotError::ZfsDatasetNotFound { .. }),
        "{e:?}"
    );
    let msg = error_chain(&e);
    assert!(
        msg.contains(&format!("ZFS dataset {ds} does not exist")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("`zfs snapshot {ds}@snapveil-z4-{STAMP}` failed")),
        "{msg}"
    );
    assert!(msg.contains("dataset does not exist"), "{msg}");
}

// ---------------------------------------------------------------- ZFS, recorded commands

/// The snapshot name every recorded test uses (job `web`).
fn web_name() -> String {
    format!("snapveil-web-{STAMP}")
}

#[test]
fn zfs_reads_dot_zfs_snapshot_when_present() {
    let mp = workdir();
    let name = web_name();
    let snapdir = mp.path().join(".zfs/snapshot").join(&name);
    std::fs::create_dir_all(&snapdir).unwrap();
    let mpv = format!("{}\nyes\n", mp.path().display());
    let work = workdir();
    let snap = format!("tank/home@{name}");
    let r = ScriptedRunner::new();
    r.expect_zfs_snapshot(&snap, Output::ok(""))
        .expect_zfs_get_mountpoint("tank/home", Output::ok(mpv))
        .expect_zfs_destroy(&snap, Output::ok(""));
    let src: Source = "zfs:tank/home".parse().unwrap();
    let g = take_plain(&r, "web", &src, work.path()).unwrap();
    assert_eq!(g.path(), snapdir);
    g.release().unwrap();
}

#[test]
fn zfs_unmounted_dataset_is_read_through_a_clone() {
    let work = workdir();
    let name = web_name();
    let mnt = work.path().join(&name);
    let snap = format!("tank/db/pg@{name}");
    let clone = format!("tank/{name}");
    let r = ScriptedRunner::new();
    r.expect_zfs_snapshot(&snap, Output::ok(""))
        .expect_zfs_get_mountpoint("tank/db/pg", Output::ok("legacy\nno\n"))
        .expect_zfs_clone(&snap, &clone, &mnt, Output::ok(""))
        .expect_zfs_destroy_recursive(&clone, Output::ok(""))
        .expect_zfs_destroy(&snap, Output::ok(""));
    let src: Source = "zfs:tank/db/pg".parse().unwrap();
    let g = take_plain(&r, "web", &src, work.path()).unwrap();
    assert_eq!(g.path(), mnt);
    drop(g); // Drop releases too.
}

#[test]
fn zfs_failed_clone_destroys_the_snapshot_and_quotes_zfs() {
    let work = workdir();
    let name = web_name();
    let mnt = work.path().join(&name);
    let snap = format!("tank/home@{name}");
    let r = ScriptedRunner::new();
    r.expect_zfs_snapshot(&snap, Output::ok(""))
        .expect_zfs_get_mountpoint("tank/home", Output::ok("/home\nno\n"))
        .expect_zfs_clone(
            &snap,
            &format!("tank/{name}"),
            &mnt,
            Output::fail(1, "cannot create 'tank/x': out of space\n"),
        )
        .expect_zfs_destroy(&snap, Output::ok(""));
    let src: Source = "zfs:tank/home".parse().unwrap();
    let e = take_plain(&r, "web", &src, work.path()).unwrap_err();
    let msg = error_chain(&e);
    assert!(
        msg.starts_with(&format!("ZFS dataset {snap}: clone failed")),
        "{msg}"
    );
    assert!(msg.contains("out of space"), "{msg}");
}

#[test]
fn zfs_snapshot_failure_quotes_zfs_and_busy_destroy_is_retried() {
    let work = workdir();
    let name = web_name();
    let snap = format!("tank/home@{name}");
    let r = ScriptedRunner::new();
    r.expect_zfs_snapshot(
        &snap,
        Output::fail(
            1,
            "cannot create snapshot 'tank/home@x': permission denied\n",
        ),
    );
    let src: Source = "zfs:tank/home".parse().unwrap();
    let e = take_plain(&r, "web", &src, work.path()).unwrap_err();
    let msg = error_chain(&e);
    assert!(
        msg.starts_with("ZFS dataset tank/home: snapshot failed"),
        "{msg}"
    );
    assert!(msg.contains("permission denied"), "{msg}");

    let mp = workdir();
    std::fs::create_dir_all(mp.path().join(".zfs/snapshot").join(&name)).unwrap();
    r.expect_zfs_snapshot(&snap, Output::ok(""))
        .expect_zfs_get_mountpoint(
            "tank/home",
            Output::ok(format!("{}\nyes\n", mp.path().display())),
        )
        .expect_zfs_destroy(
            &snap,
            Output::fail(1, "cannot destroy snapshot: dataset is busy\n"),
        )
        .expect_zfs_destroy(&snap, Output::ok(""));
    let g = take_plain(&r, "web", &src, work.path()).unwrap();
    g.release().unwrap();
}

// ---------------------------------------------------------------- LVM, recorded commands

const ROOT_10G: &str = "  root|vg0|-wi-ao----|10737418240||\n";

/// The one snapshot LV every LVM test takes: `vg0/snapveil-web-<STAMP>` of `vg0/root`,
/// mounted at `<work>/snapveil-web-<STAMP>`.
struct Lvm {
    name: String,
    dev: String,
    mnt: PathBuf,
}

/// A work dir, the names of the snapshot LV taken into it, and an empty runner.
fn lvm_case() -> (tempfile::TempDir, Lvm, ScriptedRunner) {
    let work = workdir();
    let name = web_name();
    let l = Lvm {
        dev: format!("/dev/vg0/{name}"),
        mnt: work.path().join(&name),
        name,
    };
    (work, l, ScriptedRunner::new())
}

/// The origin every LVM test snapshots.
fn lvm_root() -> Source {
    "lvm:vg0/root".parse().unwrap()
}

impl Lvm {
    /// `vg0/<name>`, as lvs and lvremove take it.
    fn lv(&self) -> String {
        format!("vg0/{}", self.name)
    }

    /// `lvs` of the snapshot LV, answered with its row (`attr`, `pct` full).
    fn expect_status(&self, r: &ScriptedRunner, attr: &str, pct: &str) {
        let row = format!("  {}|vg0|{attr}|1073741824|root|{pct}\n", self.name);
        r.expect_lvs(&self.lv(), Output::ok(row));
    }

    /// `lvs` of the origin and `lvcreate` of a snapshot of `size`, answered with `out`.
    fn expect_create(&self, r: &ScriptedRunner, size: &str, out: Output) {
        r.expect_lvs("vg0/root", Output::ok(ROOT_10G))
            .expect_lvcreate_snapshot(size, &self.name, "vg0/root", out);
    }

    /// The commands of a take up to the mount, answering blkid with `fstype`.
    fn expect_take_until_mount(
        &self,
        r: &ScriptedRunner,
        size: &str,
        fstype: &str,
        mount_opts: &str,
    ) {
        let created = format!("  Logical volume \"{}\" created.\n", self.name);
        self.expect_create(r, size, Output::ok(created));
        r.expect_blkid_type(&self.dev, Output::ok(format!("{fstype}\n")))
            .expect_mount(fstype, mount_opts, &self.dev, &self.mnt, Output::ok(""));
    }

    /// A release: the status check, then umount and lvremove.
    fn expect_release(&self, r: &ScriptedRunner, attr: &str, pct: &str) {
        self.expect_status(r, attr, pct);
        r.expect_umount(&self.mnt, Output::ok(""))
            .expect_lvremove(&self.lv(), Output::ok(""));
    }
}

#[test]
fn lvm_ext4_happy_path_with_default_ten_percent() {
    let (work, l, r) = lvm_case();
    l.expect_take_until_mount(&r, "1073741824b", "ext4", "ro,noload");
    l.expect_status(&r, "swi-aos---", "0.01");
    let g = take_plain(&r, "web", &lvm_root(), work.path()).unwrap();
    assert_eq!(g.path(), l.mnt);
    assert!(l.mnt.is_dir());
    l.expect_status(&r, "swi-aos---", "40.00");
    g.verify().unwrap();
    l.expect_release(&r, "swi-aos---", "41.00");
    g.release().unwrap();
    assert!(!l.mnt.exists(), "mountpoint dir left behind");
}

#[test]
fn lvm_xfs_gets_nouuid_and_absolute_size_and_extra_options() {
    let (work, l, r) = lvm_case();
    l.expect_take_until_mount(&r, "2G", "xfs", "ro,nouuid,inode64");
    l.expect_status(&r, "swi-aos---", "0.00");
    let o = SnapshotOptions {
        size: Some("2G".into()),
        mount_options: vec!["inode64".into()],
        ..opts()
    };
    let src = lvm_root();
    let g = take(&r, "web", STAMP, &src, &o, &tools(), work.path()).unwrap();
    l.expect_release(&r, "swi-aos---", "1.00");
    drop(g); // Drop releases with the same sequence.
}

#[test]
fn lvm_size_percentage_is_computed_from_the_origin() {
    let (work, l, r) = lvm_case();
    // 25% of 10 GiB = 2684354560 bytes.
    l.expect_take_until_mount(&r, "2684354560b", "ext4", "ro,noload");
    l.expect_status(&r, "swi-aos---", "0.00");
    let o = SnapshotOptions {
        size: Some("25%".into()),
        ..opts()
    };
    let src = lvm_root();
    let g = take(&r, "web", STAMP, &src, &o, &tools(), work.path()).unwrap();
    l.expect_release(&r, "swi-aos---", "0.00");
    g.release().unwrap();

    let bad = SnapshotOptions {
        size: Some("150%".into()),
        ..opts()
    };
    r.expect_lvs("vg0/root", Output::ok(ROOT_10G));
    let e = take(&r, "web", STAMP, &src, &bad, &tools(), work.path()).unwrap_err();
    assert!(e.to_string().contains("\"150%\" for vg0/root"), "{e}");
}

#[test]
fn lvm_origin_missing() {
    let work = workdir();
    let r = ScriptedRunner::new();
    r.expect_lvs(
        "vg0/nope",
        Output::fail(5, "  Failed to find logical volume \"vg0/nope\"\n"),
    );
    let src: Source = "lvm:vg0/nope".parse().unwrap();
    let e = take_plain(&r, "web", &src, work.path()).unwrap_err();
    assert!(
        matches!(e, SnapshotError::LvmOriginNotFound { .. }),
        "{e:?}"
    );
    let msg = error_chain(&e);
    assert!(
        msg.starts_with("LVM origin vg0/nope does not exist"),
        "{msg}"
    );
    assert!(msg.contains("Failed to find logical volume"), "{msg}");
}

#[test]
fn lvm_vg_full() {
    let (work, l, r) = lvm_case();
    l.expect_create(
        &r,
        "1073741824b",
        Output::fail(
            5,
            "  Volume group \"vg0\" has insufficient free space (12 extents): 256 required.\n",
        ),
    );
    let e = take_plain(&r, "web", &lvm_root(), work.path()).unwrap_err();
    assert!(matches!(e, SnapshotError::LvmVgFull { .. }), "{e:?}");
    let msg = error_chain(&e);
    assert!(
        msg.contains(
            "volume group vg0 has not enough free space for a 1073741824b snapshot of root"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("insufficient free space (12 extents)"),
        "{msg}"
    );
    assert!(!l.mnt.exists());
}

#[test]
fn lvm_other_lvcreate_failure_names_origin_and_quotes_stderr() {
    let (work, l, r) = lvm_case();
    l.expect_create(
        &r,
        "1073741824b",
        Output::fail(5, "  Snapshots of raid4 LVs are not supported.\n"),
    );
    let e = take_plain(&r, "web", &lvm_root(), work.path()).unwrap_err();
    let msg = error_chain(&e);
    assert!(
        msg.starts_with("LVM vg0/root: lvcreate --snapshot failed"),
        "{msg}"
    );
    assert!(
        msg.contains("Snapshots of raid4 LVs are not supported"),
        "{msg}"
    );
}

#[test]
fn lvm_snapshot_invalidated_while_held_is_reported_and_still_removed() {
    let (work, l, r) = lvm_case();
    l.expect_take_until_mount(&r, "1073741824b", "ext4", "ro,noload");
    l.expect_status(&r, "swi-aos---", "12.00");
    let g = take_plain(&r, "web", &lvm_root(), work.path()).unwrap();
    l.expect_status(&r, "swi-I-s---", "100.00");
    let e = g.verify().unwrap_err();
    assert!(matches!(e, SnapshotError::LvmInvalidated { .. }), "{e:?}");
    assert!(e.to_string().contains("overflowed"), "{e}");
    l.expect_release(&r, "swi-I-s---", "100.00");
    let e = g.release().unwrap_err();
    assert!(matches!(e, SnapshotError::LvmInvalidated { .. }), "{e:?}");
    assert!(r
        .seen()
        .last()
        .unwrap()
        .starts_with(&["lvremove".to_owned()]));
    assert!(!l.mnt.exists());
}

#[test]
fn lvm_snapshot_already_invalid_after_mount_is_not_handed_out() {
    let (work, l, r) = lvm_case();
    l.expect_take_until_mount(&r, "1073741824b", "ext4", "ro,noload");
    l.expect_release(&r, "Swi-I-s---", "100.00");
    let e = take_plain(&r, "web", &lvm_root(), work.path()).unwrap_err();
    assert!(matches!(e, SnapshotError::LvmInvalidated { .. }), "{e:?}");
    assert!(!l.mnt.exists());
}

#[test]
fn lvm_mount_failure_removes_the_snapshot_lv() {
    let (work, l, r) = lvm_case();
    l.expect_create(&r, "1073741824b", Output::ok(""));
    r.expect_blkid_type(&l.dev, Output::ok("ext4\n"))
        .expect_mount(
            "ext4",
            "ro,noload",
            &l.dev,
            &l.mnt,
            Output::fail(32, "mount: wrong fs type, bad option, bad superblock\n"),
        )
        .expect_lvremove(&l.lv(), Output::ok(""));
    let e = take_plain(&r, "web", &lvm_root(), work.path()).unwrap_err();
    let msg = error_chain(&e);
    assert!(
        msg.contains(&format!("mounting {}", l.dev)) && msg.contains("bad superblock"),
        "{msg}"
    );
    assert!(!l.mnt.exists());
}

#[test]
fn lvm_failed_umount_keeps_the_lv_and_reports() {
    let (work, l, r) = lvm_case();
    l.expect_take_until_mount(&r, "1073741824b", "ext4", "ro,noload");
    l.expect_status(&r, "swi-aos---", "0.00");
    let g = take_plain(&r, "web", &lvm_root(), work.path()).unwrap();
    l.expect_status(&r, "swi-aos---", "0.00");
    // Busy on every try: the first and five more, then the error (the LV is kept).
    for _ in 0..6 {
        r.expect_umount(&l.mnt, Output::fail(32, "umount: target is busy.\n"));
    }
    let e = g.release().unwrap_err();
    assert!(matches!(e, SnapshotError::Umount { .. }), "{e:?}");
    assert!(error_chain(&e).contains("target is busy"));
}

/// Something holds the snapshot for a moment after the transfer (the view's last reads,
/// udev probing the LV): umount and lvremove are tried again, and the release succeeds.
#[test]
fn lvm_busy_umount_and_lvremove_are_retried() {
    let (work, l, r) = lvm_case();
    l.expect_take_until_mount(&r, "1073741824b", "ext4", "ro,noload");
    l.expect_status(&r, "swi-aos---", "0.00");
    let g = take_plain(&r, "web", &lvm_root(), work.path()).unwrap();
    l.expect_status(&r, "swi-aos---", "0.00");
    r.expect_umount(&l.mnt, Output::fail(32, "umount: target is busy.\n"))
        .expect_umount(&l.mnt, Output::ok(""))
        .expect_lvremove(&l.lv(), Output::fail(5, "  Logical volume vg0/x in use.\n"))
        .expect_lvremove(&l.lv(), Output::ok(""));
    g.release().unwrap();
    let seen = r.seen();
    assert_eq!(seen.iter().filter(|c| c[0] == "umount").count(), 2);
    assert_eq!(seen.iter().filter(|c| c[0] == "lvremove").count(), 2);
}

#[test]
fn lvm_stale_cleanup_removes_ours_only() {
    let work = workdir();
    let stale = "snapveil-web-20261123T013000Z";
    let stale2 = "snapveil-web-20261122T013000Z";
    std::fs::create_dir(work.path().join(stale)).unwrap();
    let rows = format!(
        "  root|vg0|-wi-ao----|10737418240||\n\
         \x20 {stale}|vg0|swi-aos---|1073741824|root|5.00\n\
         \x20 {stale2}|vg0|swi-I-s---|1073741824|root|100.00\n\
         \x20 snapveil-web-manual|vg0|swi-a-s---|1073741824|root|1.00\n\
         \x20 snapveil-other-20261123T013000Z|vg0|swi-a-s---|1073741824|root|1.00\n\
         \x20 snapveil-web-20261121T013000Z|vg0|swi-a-s---|1073741824|home|1.00\n\
         \x20 snapveil-web-20261120T013000Z|vg0|-wi-a-----|1073741824||\n"
    );
    let stale_mnt = work.path().join(stale);
    let r = ScriptedRunner::new();
    r.expect_lvs("vg0", Output::ok(rows))
        .expect_umount(
            &stale_mnt,
            Output::fail(
                32,
                &*format!("umount: {}: not mounted.\n", stale_mnt.display()),
            ),
        )
        .expect_lvremove(&format!("vg0/{stale}"), Output::ok(""))
        .expect_lvremove(&format!("vg0/{stale2}"), Output::ok(""));
    let removed = cleanup_stale(&r, "web", &lvm_root(), &opts(), &tools(), work.path()).unwrap();
    assert_eq!(
        removed,
        vec![format!("vg0/{stale}"), format!("vg0/{stale2}")]
    );
    assert!(!work.path().join(stale).exists());
}

// ---------------------------------------------------------------- dir

#[test]
fn dir_source_is_the_live_tree_and_not_consistent() {
    let d = workdir();
    let r = ScriptedRunner::new(); // no commands at all
    let src = Source::Dir {
        path: d.path().to_owned(),
    };
    let g = take_plain(&r, "web", &src, d.path()).unwrap();
    assert_eq!(g.path(), d.path());
    assert!(!g.consistent());
    g.release().unwrap();
    assert!(d.path().is_dir());
    assert_eq!(
        cleanup_stale(&r, "web", &src, &opts(), &tools(), d.path()).unwrap(),
        Vec::<String>::new()
    );
    let missing = Source::Dir {
        path: d.path().join("nope"),
    };
    let e = take_plain(&r, "web", &missing, d.path()).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
}

#[test]
fn bad_job_names_and_stamps_are_refused_before_any_command() {
    let d = workdir();
    let r = ScriptedRunner::new();
    let src: Source = "zfs:tank/home".parse().unwrap();
    for job in ["", "a b", "../x", "a/b"] {
        let e = take_plain(&r, job, &src, d.path()).unwrap_err();
        assert!(
            matches!(e, SnapshotError::InvalidJob { .. }),
            "{job}: {e:?}"
        );
    }
    let e = take(&r, "web", "2026-11-24", &src, &opts(), &tools(), d.path()).unwrap_err();
    assert!(matches!(e, SnapshotError::InvalidStamp { .. }), "{e:?}");
}
