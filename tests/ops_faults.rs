//! Operational faults of `snapveil run`, `restore` and `cleanup` with real parts (btrfs
//! on a loop device, the FUSE view, rsync, tmpfs): a SIGTERM while a hook runs stops the
//! hook and the run at once; what a killed restore or a full disk leaves is removed; a
//! message says each thing once; hook output is logged as it arrives, at info.

use crate::util::btrfs::BtrfsLoop;
use crate::util::setup::{dirs as names, random, wait_for, write, Setup};
use crate::util::{bin, fails, ok};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills a spawned child (and reaps it) if the test fails before it ended.
struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
    fn take(&mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tmpfs mounted for the test; unmounted on drop, also when the test failed.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        ok(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.0).status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn small_tree(root: &Path) {
    write(root, "a.txt", b"alpha\n");
    write(root, "sub/b.bin", &random(3 * 4096 + 5));
}

fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/bin/sh\n{body}")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// True while any process of process group `pgid` exists.
fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 only probes.
    unsafe { libc::kill(-pgid, 0) == 0 }
}

/// A PID above the kernel's maximum: never a live process.
fn dead_pid() -> u32 {
    fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap()
        + 1
}

/// SIGTERM while a 30 s pre-snapshot hook runs (plain, then held and not yet READY):
/// the hook's process group gets the signal, the run exits 1 within seconds, its status
/// says it was interrupted, and nothing is left.
#[test]
fn sigterm_during_a_long_pre_snapshot_hook_stops_hook_and_run() {
    let Some(b) = BtrfsLoop::new() else { return };
    let src = b.subvolume("data");
    small_tree(&src);
    let s = Setup::new();
    let pidfile = s.path("hook.pid");
    let hook = s.path("hook.sh");
    script(
        &hook,
        &format!(
            "echo $$ >{}.tmp && mv {0}.tmp {0}\nsleep 30\necho finished >{0}.done\n",
            pidfile.display()
        ),
    );
    for held in [false, true] {
        let _ = fs::remove_file(&pidfile);
        s.write_config(&[s.job(
            "h",
            &format!("btrfs:{}", src.display()),
            s.path("target").to_str().unwrap(),
            &format!(
                "[[job.hooks]]\nphase = \"pre_snapshot\"\ncommand = [{:?}]\nheld = {held}\ntimeout = \"60s\"\n",
                hook.display().to_string()
            ),
        )]);
        let mut child = KillOnDrop(Some(s.spawn_run("h")));
        wait_for(60, "the hook to start", || {
            assert!(
                child.child().try_wait().unwrap().is_none(),
                "the run ended before the hook started"
            );
            fs::metadata(&pidfile).is_ok()
        });
        let hook_pid: i32 = fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.child().id() as i32, libc::SIGTERM) };
        let out = child.take().wait_with_output().unwrap();
        let took = t0.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            took < Duration::from_secs(5),
            "held={held}: the run took {took:?} to stop after SIGTERM\n{err}"
        );
        assert_eq!(out.status.code(), Some(1), "held={held}: {err}");
        let e = s.status_error("h");
        assert!(
            e.contains("interrupted by SIGTERM") && e.contains("pre_snapshot hook"),
            "held={held}: status error: {e}"
        );
        wait_for(2, "the hook's process group to be gone", || {
            !group_alive(hook_pid)
        });
        assert!(
            !s.path("hook.pid.done").exists(),
            "held={held}: the hook ran to its end"
        );
        s.assert_clean("h", &b);
        assert!(
            !s.path("target/runs").exists(),
            "an interrupted run is not a restore point"
        );
    }
}

/// A held hook's stderr ("tables locked") is logged when it is printed, at INFO, so it
/// comes before "snapshot taken"; a plain hook's stderr is INFO too. Nothing at WARN.
#[test]
fn hook_output_is_logged_as_it_arrives_at_info() {
    let Some(b) = BtrfsLoop::new() else { return };
    let src = b.subvolume("data");
    small_tree(&src);
    let s = Setup::new();
    let held = s.path("held.sh");
    script(
        &held,
        "echo 'tables locked' >&2\necho READY\ncat >/dev/null\necho 'tables unlocked' >&2\n",
    );
    s.write_config(&[s.job(
        "i",
        &format!("btrfs:{}", src.display()),
        s.path("target").to_str().unwrap(),
        &format!(
            "[[job.hooks]]\nphase = \"pre_snapshot\"\ncommand = \"echo 'pre says hello' >&2\"\n\
             [[job.hooks]]\nphase = \"pre_snapshot\"\ncommand = [{:?}]\nheld = true\ntimeout = \"30s\"\n",
            held.display().to_string()
        ),
    )]);
    let out = s.run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    let find = |what: &str| {
        lines
            .iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no log line with {what:?}:\n{err}"))
    };
    let locked = find("tables locked");
    let taken = find("snapshot taken");
    assert!(
        locked < taken,
        "the held hook's stderr must be logged before \"snapshot taken\":\n{err}"
    );
    for what in ["tables locked", "pre says hello", "tables unlocked"] {
        let l = lines[find(what)];
        assert!(
            l.contains(" INFO ") && !l.contains("WARN"),
            "{what:?} at INFO: {l}"
        );
    }
    assert!(
        lines.iter().all(|l| !l.contains("WARN")),
        "a healthy run warns about nothing:\n{err}"
    );
    assert!(
        find("tables unlocked") > taken,
        "released after the snapshot:\n{err}"
    );
    s.assert_clean("i", &b);
}

/// rsync failing in the transfer: its stderr is in the error, once, not also logged
/// line by line.
#[test]
fn failing_transfer_shows_rsync_stderr_once() {
    let Some(b) = BtrfsLoop::new() else { return };
    let src = b.subvolume("data");
    small_tree(&src);
    let s = Setup::new();
    s.write_config(&[s.job(
        "r",
        &format!("btrfs:{}", src.display()),
        s.path("target").to_str().unwrap(),
        "rsync_args = [\"--no-such-option-xyz\"]\n",
    )]);
    let out = s.run(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let n = err.matches("no-such-option-xyz: unknown option").count();
    assert_eq!(
        n, 1,
        "rsync's complaint appears {n} times on stderr:\n{err}"
    );
    s.assert_clean("r", &b);
}

/// kill -9 of a restore leaves its staging dir (STATE/work/JOB/restore-PID);
/// `snapveil cleanup` removes it, and so does the next restore for dead processes'
/// scratch, while a live process's scratch stays.
#[test]
fn scratch_of_a_killed_restore_is_removed_by_cleanup_and_by_the_next_restore() {
    let Some(b) = BtrfsLoop::new() else { return };
    let src = b.subvolume("data");
    small_tree(&src);
    write(&src, "big.bin", &random(96 << 20));
    let s = Setup::new();
    let target = s.path("target");
    s.write_config(&[s.job(
        "k",
        &format!("btrfs:{}", src.display()),
        target.to_str().unwrap(),
        "",
    )]);
    let out = s.run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let work = s.state.join("work").join("k");

    // Restore, killed with SIGKILL as soon as its stage exists.
    let to = s.path("restored");
    let mut child = KillOnDrop(Some(
        s.cmd(&["restore", "k", "/"])
            .arg("--to")
            .arg(&to)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    let stage = work.join(format!("restore-{}", child.child().id()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stage.exists() {
        assert!(
            child.child().try_wait().unwrap().is_none(),
            "the restore ended before its stage was seen"
        );
        assert!(Instant::now() < deadline, "no stage {}", stage.display());
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut c = child.take();
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(stage.exists(), "kill -9 leaves the stage");

    let out = ok(&mut s.cmd(&["cleanup", "k"]));
    assert!(!stage.exists(), "cleanup left {}\n{out}", stage.display());
    assert!(
        out.contains("removed scratch") && out.contains(&format!("restore-{}", c.id())),
        "{out}"
    );

    // The next restore sweeps dead processes' scratch first, and leaves a live one's.
    let dead = work.join(format!("fetch-{}", dead_pid()));
    let live = work.join(format!("deep-{}", std::process::id()));
    for d in [&dead, &live] {
        write(d, "x/y", b"scratch");
    }
    ok(s.cmd(&["restore", "k", "a.txt"])
        .arg("--to")
        .arg(s.path("r2")));
    assert_eq!(fs::read(s.path("r2/a.txt")).unwrap(), b"alpha\n");
    assert!(!dead.exists(), "the next restore left {}", dead.display());
    assert!(live.exists(), "a live process's scratch was removed");
    fs::remove_dir_all(&live).unwrap();
    assert_eq!(names(&work), Vec::<String>::new(), "work dir of k");
}

/// ENOSPC while writing the manifest on a local target (manifests/ on a full tmpfs):
/// the run fails, says "No space left on device" once, and leaves no
/// `.STAMP.sha1.tmp-PID`. Temp files of dead processes in manifests/ and runs/ are
/// removed at the next run's start; a live process's stays.
#[test]
fn full_disk_while_writing_the_manifest_leaves_no_temp_file() {
    let Some(b) = BtrfsLoop::new() else { return };
    let src = b.subvolume("data");
    small_tree(&src);
    write(&src, "more.bin", &random(64 << 10));
    let s = Setup::new();
    let target = s.path("target");
    s.write_config(&[s.job(
        "m",
        &format!("btrfs:{}", src.display()),
        target.to_str().unwrap(),
        "",
    )]);
    let manifests = target.join("manifests");
    {
        let _fs = Tmpfs::mount(&manifests, "64k");
        // Fill it up; creating a file still works, writing to it does not.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k", "status=none"])
            .arg(format!("of={}", manifests.join("fill").display()))
            .status();
        let out = s.run(&[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let enospc = "No space left on device";
        assert!(err.contains(enospc), "{err}");
        for l in err.lines() {
            assert!(
                l.matches(enospc).count() <= 1,
                "a message repeats its cause: {l}"
            );
        }
        let left: Vec<String> = names(&manifests)
            .into_iter()
            .filter(|n| n != "fill")
            .collect();
        assert_eq!(left, Vec::<String>::new(), "left in manifests/");
        s.assert_clean("m", &b);
    }

    // Temp files of a killed writer (dead PID) go at the next run's start.
    let dead = dead_pid();
    let mine = std::process::id();
    for dir in ["manifests", "runs"] {
        write(
            &target,
            &format!("{dir}/.20200101T000000Z.x.tmp-{dead}"),
            b"half",
        );
        write(
            &target,
            &format!("{dir}/.20200101T000000Z.x.tmp-{mine}"),
            b"live",
        );
    }
    let out = s.run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    for dir in ["manifests", "runs"] {
        let n = names(&target.join(dir));
        assert!(
            !n.iter().any(|n| n.ends_with(&format!(".tmp-{dead}"))),
            "{dir}: {n:?}"
        );
        assert!(
            n.iter().any(|n| n.ends_with(&format!(".tmp-{mine}"))),
            "{dir}: a live process's temp file was removed: {n:?}"
        );
        // The run's files (.meta and .sha1, or .json) and the live temp file.
        let run_files = if dir == "manifests" { 2 } else { 1 };
        assert_eq!(
            n.len(),
            run_files + 1,
            "{dir}: the run's files and the live temp file: {n:?}"
        );
    }
    assert!(err.contains("removed temporary file"), "{err}");
}

/// A `btrfs:` source that is a plain directory: the run fails with btrfs's own words
/// and the path, and leaves no `.snapveil/` beside it (in the user's tree).
#[test]
fn btrfs_source_that_is_not_a_subvolume_leaves_no_snapshot_dir() {
    let Some(b) = BtrfsLoop::new() else { return };
    let plain = b.mnt.join("home/plain");
    small_tree(&plain);
    let s = Setup::new();
    s.write_config(&[s.job(
        "p",
        &format!("btrfs:{}", plain.display()),
        s.path("target").to_str().unwrap(),
        "",
    )]);
    let out = s.run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Not a Btrfs subvolume") && err.contains(plain.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(
        names(&b.mnt.join("home")),
        ["plain"],
        "the run left something beside the source"
    );
    s.assert_clean("p", &b);

    // The same through `snapveil snapshot`, with a nested snapshot dir to create.
    let snapdir = b.mnt.join("snaps/deeper");
    let mut cmd = Command::new(bin());
    cmd.args(["snapshot", "--job", "p", "--state-dir"])
        .arg(&s.state)
        .arg("--source")
        .arg(format!("btrfs:{}", plain.display()))
        .arg("--snapshot-dir")
        .arg(&snapdir);
    let err = fails(&mut cmd);
    assert!(err.contains("Not a Btrfs subvolume"), "{err}");
    assert!(
        !b.mnt.join("snaps").exists(),
        "left {}\n{err}",
        b.mnt.join("snaps").display()
    );
}
