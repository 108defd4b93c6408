//! Issue 14: a hostile storage provider. Three runs of a small `dir:` source go to a
//! local and to an ssh target (the loopback sshd, full key); then, each time on a fresh
//! copy of that target and of the agent's state, the provider: edits one manifest line;
//! swaps a current file for an older generation's copy and fixes the manifest; copies
//! one ciphertext onto another name; truncates a file at a 4128-byte block boundary;
//! deletes a run record; deletes the newest restore point entirely; replaces the whole
//! target with a copy taken two runs earlier; alters a run record (its MAC fails).
//! `verify` and `restore` must each fail naming the path and what is wrong, and the next
//! `run` must refuse a rolled-back or truncated target before transferring anything.
//! See: issue 14.

use crate::util::setup::{random, write, Setup};
use crate::util::sshd::Sshd;
use crate::util::{describe, run_stamps};
use snapveil::crypto::{names, KeyConfig, Keys};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A target with three restore points, pristine copies of it (after run 1 and after
/// run 3) and of the agent's chain state, to start every scenario from.
struct Fx {
    s: Setup,
    src: PathBuf,
    target: PathBuf,
    /// The target and `STATE/chain` after run 3, and the target after run 1.
    after3: (PathBuf, PathBuf),
    after1: PathBuf,
    stamps: Vec<String>,
    _sshd: Option<Sshd>,
}

/// `cp -a` of a directory tree (replacing `to`).
fn copy_tree(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

impl Drop for Fx {
    /// Ends the multiplexing ssh master (it would outlive the test by ControlPersist).
    fn drop(&mut self) {
        if let Some(d) = &self._sshd {
            let _ = Command::new("ssh")
                .args(d.ssh_args(&d.full_key))
                .args([
                    "-o",
                    &format!("ControlPath={}", self.s.path("ssh-%C").display()),
                ])
                .args(["-O", "exit"])
                .arg(format!("{}@127.0.0.1", d.user))
                .output();
        }
    }
}

impl Fx {
    fn new(ssh: bool) -> Fx {
        assert!(crate::util::require_tool("rsync"));
        let s = Setup::new();
        let src = s.path("src");
        let target = s.path("target");
        let sshd = ssh.then(|| s.sshd_with_jail().1);
        // Over ssh, one multiplexed connection for the whole suite: every command opens
        // several rsync sessions, and each handshake costs about a second on a busy host.
        let (addr, extra) = match &sshd {
            Some(d) => {
                let mut args = d.ssh_args(&d.full_key);
                args.extend([
                    "-o".into(),
                    "ControlMaster=auto".into(),
                    "-o".into(),
                    format!("ControlPath={}", s.path("ssh-%C").display()),
                    "-o".into(),
                    "ControlPersist=120".into(),
                ]);
                let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
                (
                    d.target(&target),
                    format!("ssh_args = [{}]", quoted.join(", ")),
                )
            }
            None => (target.display().to_string(), String::new()),
        };
        s.write_config(&[s.job("home", &format!("dir:{}", src.display()), &addr, &extra)]);
        write(&src, "c.txt", b"constant\n");
        // Three 4 KiB blocks of plaintext, the last one short.
        write(&src, "b.bin", &random(10_000));
        let mut stamps = Vec::new();
        for i in 1..=3 {
            write(&src, "a.txt", format!("version {i}\n").as_bytes());
            std::thread::sleep(std::time::Duration::from_millis(1100));
            let o = s.run(&["home"]);
            assert!(
                o.status.success(),
                "run {i}: {}",
                describe(&s.cmd(&["run"]), &o)
            );
            stamps = run_stamps(&target);
            if i == 1 {
                copy_tree(&target, &s.path("after1"));
            }
        }
        assert_eq!(stamps.len(), 3);
        copy_tree(&target, &s.path("after3"));
        copy_tree(&s.state.join("chain"), &s.path("chain3"));
        Fx {
            after3: (s.path("after3"), s.path("chain3")),
            after1: s.path("after1"),
            s,
            src,
            target,
            stamps,
            _sshd: sshd,
        }
    }

    /// Back to the target and state right after run 3.
    fn reset(&self) {
        copy_tree(&self.after3.0, &self.target);
        copy_tree(&self.after3.1, &self.s.state.join("chain"));
    }

    fn keys(&self) -> Keys {
        let kc = KeyConfig::load(&self.s.key).unwrap();
        Keys::new(&kc.unlock_with_passfile(&self.s.pass).unwrap(), kc.flags)
    }

    /// The encrypted path of plaintext `rel`, relative to `current/`.
    fn cpath(&self, rel: &str) -> String {
        String::from_utf8(names::encrypt_path(&self.keys(), rel.as_bytes()).cpath).unwrap()
    }

    fn current(&self, rel: &str) -> PathBuf {
        self.target.join("current").join(self.cpath(rel))
    }

    fn cmd(&self, args: &[&str]) -> (bool, String) {
        let mut c = self.s.cmd(args);
        let o = c.output().unwrap();
        (o.status.success(), describe(&c, &o))
    }

    fn verify(&self) -> String {
        let (ok, text) = self.cmd(&["verify", "home"]);
        assert!(!ok, "verify passed a tampered target:\n{text}");
        text
    }

    fn restore(&self, as_of: Option<&str>) -> (String, PathBuf) {
        let out = self.s.path(&format!(
            "restore-{}",
            fs::read_dir(self.s.work.path()).unwrap().count()
        ));
        let mut args = vec!["restore", "home", "/", "--to", out.to_str().unwrap()];
        if let Some(a) = as_of {
            args.extend(["--as-of", a]);
        }
        let (ok, text) = self.cmd(&args);
        assert!(!ok, "restore passed a tampered target:\n{text}");
        (text, out)
    }

    /// The next run refuses, naming `flag`, and changes nothing on the target.
    fn run_refuses(&self, flag: &str) {
        let before = listing(&self.target);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write(&self.src, "a.txt", b"version 4\n");
        let (ok, text) = self.cmd(&["run", "home"]);
        assert!(
            !ok && text.contains("refusing") && text.contains(flag),
            "{text}"
        );
        assert_eq!(
            listing(&self.target),
            before,
            "the refused run changed the target"
        );
        write(&self.src, "a.txt", b"version 3\n");
    }

    fn sha1_line(&self, stamp: &str) -> PathBuf {
        self.target.join("manifests").join(format!("{stamp}.sha1"))
    }
}

/// Every path under a tree with its size, to see that nothing changed.
fn listing(root: &Path) -> Vec<(PathBuf, u64)> {
    let mut v = Vec::new();
    fn walk(root: &Path, d: &Path, v: &mut Vec<(PathBuf, u64)>) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            v.push((e.path().strip_prefix(root).unwrap().into(), m.len()));
            if m.is_dir() {
                walk(root, &e.path(), v);
            }
        }
    }
    walk(root, root, &mut v);
    v.sort();
    v
}

fn sha1_hex(data: &[u8]) -> String {
    use sha1::Digest;
    hex::encode(sha1::Sha1::digest(data))
}

/// Replaces the manifest line of `cpath` with `hex`.
fn set_manifest_line(manifest: &Path, cpath: &str, hex: &str) {
    let text = fs::read_to_string(manifest).unwrap();
    let mut found = false;
    let new: String = text
        .lines()
        .map(|l| {
            if l.ends_with(&format!("  {cpath}")) {
                found = true;
                format!("{hex}  {cpath}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(found, "{cpath} not in {}", manifest.display());
    fs::write(manifest, new).unwrap();
}

/// Output that names `file` as tampered, and why.
fn tampered(text: &str, file: &str) -> bool {
    text.lines().any(|l| {
        l.contains("TAMPERED") && l.contains(file) && l.contains("do not match the MAC in runs/")
    })
}

fn hostile_provider(ssh: bool) {
    let fx = Fx::new(ssh);
    let [_r1, r2, r3] = [&fx.stamps[0], &fx.stamps[1], &fx.stamps[2]];
    let m3 = format!("manifests/{r3}.sha1");

    // 1. One manifest line edited.
    fx.reset();
    set_manifest_line(&fx.sha1_line(r3), &fx.cpath("b.bin"), &"0".repeat(40));
    let t = fx.verify();
    assert!(tampered(&t, &m3), "{t}");
    let (t, _) = fx.restore(None);
    assert!(tampered(&t, &m3), "{t}");

    // 2. current/a.txt swapped for the older generation's copy, the manifest fixed.
    fx.reset();
    let old = fx
        .target
        .join("generations")
        .join(r3)
        .join(fx.cpath("a.txt"));
    let old_bytes = fs::read(&old).unwrap();
    fs::write(fx.current("a.txt"), &old_bytes).unwrap();
    set_manifest_line(&fx.sha1_line(r3), &fx.cpath("a.txt"), &sha1_hex(&old_bytes));
    let t = fx.verify();
    assert!(tampered(&t, &m3), "{t}");
    let (t, out) = fx.restore(None);
    assert!(tampered(&t, &m3), "{t}");
    assert!(!out.join("a.txt").exists(), "the old version was restored");

    // 3. One ciphertext copied onto another name.
    fx.reset();
    fs::copy(fx.current("a.txt"), fx.current("c.txt")).unwrap();
    let t = fx.verify();
    assert!(
        t.contains(&format!("differing: {}", fx.cpath("c.txt"))),
        "{t}"
    );
    let (t, out) = fx.restore(None);
    assert!(
        t.contains("UNRECOVERABLE (the target's copy does not match")
            && t.contains(&format!("c.txt ({})", fx.cpath("c.txt"))),
        "{t}"
    );
    assert!(!out.join("c.txt").exists());
    assert_eq!(fs::read(out.join("a.txt")).unwrap(), b"version 3\n", "{t}");
    // snapveil decrypt checks the file ID against the path too.
    let dec = fx.s.path("decrypted");
    let mut c = Command::new(crate::util::bin());
    c.args(["decrypt", "--config"])
        .arg(&fx.s.key)
        .arg("--passfile")
        .arg(&fx.s.pass)
        .arg(fx.target.join("current"))
        .arg(&dec);
    let o = c.output().unwrap();
    let t = describe(&c, &o);
    assert!(!o.status.success() && t.contains(&fx.cpath("c.txt")), "{t}");
    assert!(t.contains("file ID"), "{t}");
    assert!(!dec.join("c.txt").exists(), "{t}");
    assert_eq!(fs::read(dec.join("a.txt")).unwrap(), b"version 3\n");

    // 4. A file cut at a block boundary (it would decrypt to 8192 bytes).
    fx.reset();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(fx.current("b.bin"))
        .unwrap();
    f.set_len(18 + 2 * 4128).unwrap();
    drop(f);
    let t = fx.verify();
    assert!(
        t.contains(&format!("differing: {}", fx.cpath("b.bin"))),
        "{t}"
    );
    let (t, out) = fx.restore(None);
    assert!(
        t.contains("does not match") && t.contains(&format!("b.bin ({})", fx.cpath("b.bin"))),
        "{t}"
    );
    assert!(!out.join("b.bin").exists());

    // 5. A run record deleted: a gap prune did not make.
    fx.reset();
    fs::remove_file(fx.target.join("runs").join(format!("{r2}.json"))).unwrap();
    let t = fx.verify();
    assert!(t.contains("TRUNCATED: run #2"), "{t}");
    let (t, _) = fx.restore(None);
    assert!(t.contains("TRUNCATED: run #2"), "{t}");
    fx.run_refuses("--accept-truncation");

    // 6. The newest restore point deleted entirely.
    fx.reset();
    fs::remove_file(fx.target.join("runs").join(format!("{r3}.json"))).unwrap();
    fs::remove_file(fx.sha1_line(r3)).unwrap();
    fs::remove_file(fx.target.join("manifests").join(format!("{r3}.meta"))).unwrap();
    fs::remove_dir_all(fx.target.join("generations").join(r3)).unwrap();
    let t = fx.verify();
    assert!(
        t.contains("ROLLED BACK") && t.contains(&format!("runs/{r3}.json (run #3)")),
        "{t}"
    );
    let (t, _) = fx.restore(None);
    assert!(t.contains("ROLLED BACK"), "{t}");
    fx.run_refuses("--accept-rollback");

    // 7. The whole target replaced by a copy taken two runs earlier.
    fx.reset();
    copy_tree(&fx.after1, &fx.target);
    let t = fx.verify();
    assert!(t.contains("ROLLED BACK") && t.contains("(run #1)"), "{t}");
    let (t, _) = fx.restore(None);
    assert!(t.contains("ROLLED BACK"), "{t}");
    fx.run_refuses("--accept-rollback");
    if !ssh {
        // Told so, a run backs up into it, and the chain is checked from that run on.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let (ok, t) = fx.cmd(&["run", "home", "--accept-rollback"]);
        assert!(ok, "{t}");
        let (ok, t) = fx.cmd(&["verify", "home"]);
        assert!(ok, "{t}");
    }

    // 8. A run record altered: its MAC fails.
    fx.reset();
    let rec = fx.target.join("runs").join(format!("{r2}.json"));
    let text = fs::read_to_string(&rec).unwrap();
    fs::write(&rec, text.replacen("\"files\": ", "\"files\": 1", 1)).unwrap();
    let t = fx.verify();
    let named = format!("TAMPERED: runs/{r2}.json: its MAC does not match");
    assert!(t.contains(&named), "{t}");
    let (t, _) = fx.restore(Some(r2));
    assert!(t.contains(&named), "{t}");
    let (_, t) = fx.cmd(&["list", "home"]);
    assert!(
        t.lines()
            .any(|l| l.starts_with(r2.as_str()) && l.contains("TAMPERED")),
        "{t}"
    );
    fx.run_refuses("--accept-truncation");

    // An untouched copy passes, and a run accepting the truncation restarts the chain
    // check at itself: the damage it accepted is not reported again.
    fx.reset();
    let (ok, t) = fx.cmd(&["verify", "home"]);
    assert!(ok, "{t}");
    fs::remove_file(fx.target.join("runs").join(format!("{r2}.json"))).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (ok, t) = fx.cmd(&["run", "home", "--accept-truncation"]);
    assert!(ok, "{t}");
    let (ok, t) = fx.cmd(&["verify", "home"]);
    assert!(ok, "{t}");
}

#[test]
fn a_hostile_local_target_is_detected() {
    hostile_provider(false);
}

#[test]
fn a_hostile_ssh_target_is_detected() {
    hostile_provider(true);
}

/// Prune records what it removed, so its deletions are no gap; sha1sum still checks the
/// manifests, and the seal is the record's last line.
#[test]
fn pruned_points_are_recorded_and_manifests_stay_sha1sum_files() {
    let s = Setup::new();
    let src = s.path("src");
    let target = s.path("target");
    s.write_config(&[s.job(
        "home",
        &format!("dir:{}", src.display()),
        target.to_str().unwrap(),
        "[job.retention]\nlast = 2\n",
    )]);
    for i in 1..=3 {
        write(&src, "a.txt", format!("version {i}\n").as_bytes());
        std::thread::sleep(std::time::Duration::from_millis(1100));
        s.run_ok(&["home"]);
    }
    let stamps = run_stamps(&target);
    assert_eq!(stamps.len(), 2, "{stamps:?}");
    let ledger = fs::read_to_string(target.join("runs/pruned.json")).unwrap();
    assert!(
        ledger.contains("\"counter\": 1")
            && ledger
                .lines()
                .last()
                .unwrap()
                .starts_with("snapveil-mac-v1 "),
        "{ledger}"
    );
    let rec = fs::read_to_string(target.join("runs").join(format!("{}.json", stamps[1]))).unwrap();
    assert!(
        rec.contains("\"counter\": 3") && rec.contains("\"sha1_mac\""),
        "{rec}"
    );
    let (ok, t) = {
        let mut c = s.cmd(&["verify", "home"]);
        let o = c.output().unwrap();
        (o.status.success(), describe(&c, &o))
    };
    assert!(ok, "{t}");
    // Without the job's key, prune cannot seal what it removes: it refuses.
    let mut c = Command::new(crate::util::bin());
    c.args([
        "prune",
        "--target",
        target.to_str().unwrap(),
        "--keep-last",
        "1",
    ]);
    let t = crate::util::fails(&mut c);
    assert!(t.contains("is sealed") && t.contains(&stamps[0]), "{t}");
    assert_eq!(run_stamps(&target), stamps);
    crate::util::ok(
        Command::new("sha1sum")
            .args(["-c", "--quiet", "--strict"])
            .arg(format!("../manifests/{}.sha1", stamps[1]))
            .current_dir(target.join("current")),
    );
}

/// One look at a restore's output while it runs: whether the root lets others in, the
/// regular files (path, mode, size) and how many entries there are.
fn look(root: &Path) -> (bool, Vec<(PathBuf, u32, u64)>) {
    use std::os::unix::fs::PermissionsExt;
    fn walk(d: &Path, out: &mut Vec<(PathBuf, u32, u64)>) {
        let Ok(rd) = fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.is_dir() {
                walk(&e.path(), out);
            } else {
                out.push((e.path(), m.permissions().mode() & 0o777, m.len()));
            }
        }
    }
    let open = fs::metadata(root).is_ok_and(|m| m.permissions().mode() & 0o005 != 0);
    let mut files = Vec::new();
    walk(root, &mut files);
    (open, files)
}

/// A restore of a tree whose files are world-readable exposes none of them to other
/// users while it runs (directories 0700 and files 0600 until complete, the output root
/// last), and ends with the recorded modes.
#[test]
fn a_restore_is_private_until_it_is_complete() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let src = s.path("src");
    let target = s.path("target");
    s.write_config(&[s.job(
        "home",
        &format!("dir:{}", src.display()),
        target.to_str().unwrap(),
        "",
    )]);
    for d in 0..20 {
        for f in 0..15 {
            write(
                &src,
                &format!("d{d}/f{f}.txt"),
                format!("{d}/{f}\n").as_bytes(),
            );
        }
    }
    write(&src, "big.bin", &random(8 << 20));
    ok_chmod(&src, 0o755);
    s.run_ok(&["home"]);
    let out = s.path("out");
    let mut child = s
        .cmd(&["restore", "home", "/", "--to", out.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While the root is private, a file others could read (once the root opens) must
    // be complete, and a partial one is 0600; once it opens, everything is there.
    let size = |p: &Path| {
        if p.ends_with("big.bin") {
            8 << 20
        } else {
            // "d{d}/f{f}.txt" holds "{d}/{f}\n".
            (p.parent().unwrap().file_name().unwrap().len() + p.file_stem().unwrap().len()) as u64
        }
    };
    let mut busy_looks = 0;
    while child.try_wait().unwrap().is_none() {
        let (open, files) = look(&out);
        for (p, mode, len) in &files {
            let partial = p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".snapveil-partial-");
            // A stat that looked the name up just before the restore renamed the file
            // can read its mode just after the chmod that follows the rename (seen
            // once in `make test`): a partial file leaks only if its name still
            // shows that mode.
            let leaks = |p: &Path| {
                fs::symlink_metadata(p).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
            };
            assert!(
                !(partial && *mode & 0o077 != 0 && leaks(p)),
                "partial file readable by others: {}",
                p.display()
            );
            assert!(
                partial || *mode & 0o004 == 0 || *len == size(p),
                "{} is readable by others ({mode:o}) before it is complete",
                p.display()
            );
            assert!(
                !(open && partial),
                "the root opened with {} still partial",
                p.display()
            );
        }
        if open {
            assert_eq!(
                files.len(),
                301,
                "the root opened before the tree was complete"
            );
        } else {
            busy_looks += usize::from(!files.is_empty());
        }
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(busy_looks > 0, "the restore was never seen at work");
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o755
    );
    let m = fs::metadata(out.join("d3/f4.txt")).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o644);
    assert_eq!(
        fs::metadata(out.join("d3")).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(fs::read(out.join("d3/f4.txt")).unwrap(), b"3/4\n");
}

/// `chmod -R` of a source tree: directories `mode`, files `mode & 0o666`.
fn ok_chmod(root: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            ok_chmod(&p, mode);
        } else {
            fs::set_permissions(
                &p,
                fs::Permissions::from_mode(mode & 0o666 & !0o022 | 0o644),
            )
            .unwrap();
        }
    }
    fs::set_permissions(root, fs::Permissions::from_mode(mode)).unwrap();
}

/// A target made by a snapveil before sealed records: its points stay usable, shown as
/// unauthenticated; the first run of this version starts the chain, and an unsealed
/// record that appears after it is tampered.
#[test]
fn records_of_an_older_snapveil_are_unauthenticated_but_usable() {
    let s = Setup::new();
    let src = s.path("src");
    let target = s.path("target");
    s.write_config(&[s.job(
        "home",
        &format!("dir:{}", src.display()),
        target.to_str().unwrap(),
        "",
    )]);
    write(&src, "a.txt", b"old\n");
    s.run_ok(&["home"]);
    crate::util::as_made_by_older_snapveil(&target, &s.state);
    let old = run_stamps(&target);
    let list = crate::util::ok(&mut s.cmd(&["list", "home"]));
    assert!(
        list.contains("yes (unauth.)") && list.contains("unauthenticated (older version"),
        "{list}"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(&src, "a.txt", b"new\n");
    s.run_ok(&["home"]);
    let v = crate::util::ok(&mut s.cmd(&["verify", "home"]));
    assert!(
        v.contains(&format!(
            "unauthenticated (older version of snapveil, no MAC): {}",
            old[0]
        )),
        "{v}"
    );
    let out = s.path("asof-old");
    crate::util::ok(&mut s.cmd(&[
        "restore",
        "home",
        "a.txt",
        "--as-of",
        &old[0],
        "--to",
        out.to_str().unwrap(),
    ]));
    assert_eq!(fs::read(out.join("a.txt")).unwrap(), b"old\n");
    // An unsealed record newer than the sealed one: no snapveil wrote it.
    let forged = "20991231T000000Z";
    fs::write(
        target.join("runs").join(format!("{forged}.json")),
        format!("{{\"stamp\":\"{forged}\",\"job\":\"home\"}}\n"),
    )
    .unwrap();
    let newest = run_stamps(&target)[1].clone();
    for ext in ["sha1", "meta"] {
        fs::copy(
            target.join("manifests").join(format!("{newest}.{ext}")),
            target.join("manifests").join(format!("{forged}.{ext}")),
        )
        .unwrap();
    }
    let mut c = s.cmd(&["verify", "home"]);
    let o = c.output().unwrap();
    let t = describe(&c, &o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "TAMPERED: runs/{forged}.json: it has no MAC but is newer"
        )),
        "{t}"
    );
}
