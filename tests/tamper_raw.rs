//! Issue 14 for raw ZFS mode: a hostile provider of a raw job's directory target. Three
//! runs of a plain zfs-fuse dataset (age streams: a full and two increments) go to a local
//! target (and, for a subset, to an ssh target: the loopback sshd, full key); then, each
//! time on a fresh copy of that target and of the agent's chain state,
//! the provider: edits a stream record; swaps a stream file for another run's and fixes
//! the `.sha1` file, then the record too; deletes a record; deletes the newest restore
//! point (record, stream, `.sha1`); replaces the whole target with a copy taken two runs
//! earlier; puts another MAC on a record. `verify` and `restore` must each fail naming
//! the file and what is wrong, with no dataset received, and the next `run` must refuse
//! the target before it takes a snapshot. Records of an older snapveil (no seal) are
//! listed as unauthenticated and restored only with `--accept-unauthenticated`.
//! See: issue 14.

use crate::util::setup::{write, Setup};
use crate::util::sshd::Sshd;
use crate::util::zfs::ZfsPool;
use crate::util::{describe, require_tool};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Fx {
    s: Setup,
    pool: ZfsPool,
    ds: String,
    live: PathBuf,
    target: PathBuf,
    /// Pristine copies: the target after run 1 and after run 3, the chain state after 3.
    after1: PathBuf,
    after3: PathBuf,
    chain3: PathBuf,
    stamps: Vec<String>,
    sshd: Option<Sshd>,
}

impl Drop for Fx {
    /// Ends the multiplexing ssh master (it would outlive the test by ControlPersist).
    fn drop(&mut self) {
        if let Some(d) = &self.sshd {
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

/// Every path under a tree with its size and content hash, to see that nothing changed.
fn listing(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), fs::read(&p).unwrap_or_default()))
        .collect();
    v.sort();
    v
}

/// A record's body as JSON, without its seal line.
fn body(p: &Path) -> serde_json::Value {
    let text = fs::read_to_string(p).unwrap();
    let b: String = text
        .lines()
        .filter(|l| !l.starts_with("snapveil-mac-v1 "))
        .collect();
    serde_json::from_str(&b).unwrap()
}

impl Fx {
    fn new(ssh: bool) -> Option<Fx> {
        if !require_tool("age") {
            return None;
        }
        let pool = ZfsPool::new()?;
        let ds = pool.dataset("db");
        let live = pool.mountpoint.join("db");
        let s = Setup::new();
        let pass = s.path("age-pass");
        crate::util::passfile(&pass, "correct horse battery staple");
        let target = s.path("target");
        let sshd = ssh.then(|| s.sshd_with_jail().1);
        // Over ssh, one multiplexed connection for the whole test (as tests/tamper.rs).
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
                    format!("ssh_args = [{}]\n", quoted.join(", ")),
                )
            }
            None => (target.display().to_string(), String::new()),
        };
        let job = s.job(
            "db",
            &format!("zfs:{ds}"),
            &addr,
            &format!(
                "{extra}mode = \"zfs-raw\"\nage_passphrase_file = {:?}",
                pass.display().to_string()
            ),
        );
        s.write_config(&[job]);
        let mut fx = Fx {
            after1: s.path("after1"),
            after3: s.path("after3"),
            chain3: s.path("chain3"),
            s,
            pool,
            ds,
            live,
            target,
            stamps: Vec::new(),
            sshd,
        };
        for i in 1..=3 {
            write(&fx.live, "a", format!("version {i}\n").as_bytes());
            let (ok, t) = fx.cmd(&["run", "db"]);
            assert!(ok, "run {i}: {t}");
            if i == 1 {
                copy_tree(&fx.target, &fx.after1);
            }
        }
        fx.stamps = fx.records();
        assert_eq!(fx.stamps.len(), 3);
        copy_tree(&fx.target, &fx.after3);
        copy_tree(&fx.s.state.join("chain"), &fx.chain3);
        Some(fx)
    }

    fn reset(&self) {
        copy_tree(&self.after3, &self.target);
        copy_tree(&self.chain3, &self.s.state.join("chain"));
    }

    fn cmd(&self, args: &[&str]) -> (bool, String) {
        let mut c = self.s.cmd(args);
        let o = c.output().unwrap();
        (o.status.success(), describe(&c, &o))
    }

    /// Stamps of the records in streams/, oldest first.
    fn records(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.target.join("streams"))
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.strip_suffix(".json")
                    .filter(|s| *s != "pruned")
                    .map(str::to_string)
            })
            .collect();
        v.sort();
        v
    }

    fn record(&self, stamp: &str) -> PathBuf {
        self.target.join("streams").join(format!("{stamp}.json"))
    }

    fn stream(&self, stamp: &str) -> PathBuf {
        let f = body(&self.record(stamp))["file"]
            .as_str()
            .unwrap()
            .to_string();
        self.target.join("streams").join(f)
    }

    fn verify(&self) -> String {
        let (ok, t) = self.cmd(&["verify", "db"]);
        assert!(!ok, "verify passed a tampered target:\n{t}");
        t
    }

    /// A restore of `stamp` that must fail, leaving no dataset behind.
    fn restore(&self, stamp: &str, extra: &[&str]) -> String {
        let into = format!("{}/back", self.pool.name);
        let mut args = vec!["restore", "db", "--snapshot", stamp, "--into", &into];
        args.extend(extra.iter().copied());
        let (ok, t) = self.cmd(&args);
        assert!(!ok, "restore passed a tampered target:\n{t}");
        let listed = Command::new("zfs").args(["list", &into]).output().unwrap();
        assert!(!listed.status.success(), "a dataset was received:\n{t}");
        t
    }

    /// The next run refuses, naming `flag`, before any snapshot; the target is unchanged.
    fn run_refuses(&self, flag: &str) {
        let before = listing(&self.target.join("streams"));
        let snaps = self.snapshots();
        let (ok, t) = self.cmd(&["run", "db"]);
        assert!(!ok && t.contains("refusing") && t.contains(flag), "{t}");
        assert_eq!(listing(&self.target.join("streams")), before, "{t}");
        assert_eq!(self.snapshots(), snaps, "the refused run took a snapshot");
    }

    fn snapshots(&self) -> String {
        crate::util::ok(
            Command::new("zfs")
                .args(["list", "-H", "-o", "name", "-t", "snapshot", "-r", &self.ds]),
        )
    }
}

fn sha1_hex(data: &[u8]) -> String {
    use sha1::Digest;
    hex::encode(sha1::Sha1::digest(data))
}

#[test]
fn a_hostile_raw_target_is_detected() {
    let Some(fx) = Fx::new(false) else { return };
    let [r1, r2, r3] = [&fx.stamps[0], &fx.stamps[1], &fx.stamps[2]];
    let rec2 = format!("streams/{r2}.json");
    let forged = format!("TAMPERED: {rec2}: its MAC does not match its contents");

    // An untouched target passes, and every point is sealed.
    let (ok, t) = fx.cmd(&["verify", "db"]);
    assert!(ok, "{t}");
    let (ok, t) = fx.cmd(&["list", "db"]);
    assert!(ok && t.matches(" yes ").count() == 3, "{t}");

    // 1. A record edited: its MAC fails; never used, named by everything that reads it.
    fx.reset();
    let text = fs::read_to_string(fx.record(r2)).unwrap();
    fs::write(
        fx.record(r2),
        text.replacen("\"bytes\": ", "\"bytes\": 1", 1),
    )
    .unwrap();
    let t = fx.verify();
    assert!(t.contains(&forged), "{t}");
    let t = fx.restore(r2, &[]);
    assert!(t.contains(&forged), "{t}");
    // A later point needs it as its base: refused, naming it.
    let t = fx.restore(r3, &[]);
    assert!(t.contains(&forged), "{t}");
    let (ok, t) = fx.cmd(&["list", "db"]);
    assert!(
        !ok && t
            .lines()
            .any(|l| l.starts_with(r2.as_str()) && l.contains("TAMPERED")),
        "{t}"
    );
    fx.run_refuses("--accept-truncation");

    // 2. Run 2's stream file swapped for run 3's, its .sha1 file fixed: the sealed sha1
    //    catches it before zfs receive sees a byte.
    fx.reset();
    let swapped = fs::read(fx.stream(r3)).unwrap();
    let f2 = fx.stream(r2);
    fs::write(&f2, &swapped).unwrap();
    let name2 = f2.file_name().unwrap().to_string_lossy().into_owned();
    fs::write(
        fx.target.join("streams").join(format!("{name2}.sha1")),
        format!("{}  {name2}\n", sha1_hex(&swapped)),
    )
    .unwrap();
    let t = fx.verify();
    assert!(
        t.contains(&format!("streams/{name2}: sha1 {}", sha1_hex(&swapped)))
            && t.contains(&format!("streams/{r2}.json records")),
        "{t}"
    );
    let t = fx.restore(r3, &[]);
    assert!(t.contains(&name2) && t.contains("altered or cut"), "{t}");
    //    ... and the record's sha1 fixed too: now the record is forged.
    let text = fs::read_to_string(fx.record(r2)).unwrap();
    let old_sha = body(&fx.record(r2))["sha1"].as_str().unwrap().to_string();
    fs::write(fx.record(r2), text.replace(&old_sha, &sha1_hex(&swapped))).unwrap();
    let t = fx.verify();
    assert!(t.contains(&forged), "{t}");
    let t = fx.restore(r3, &[]);
    assert!(t.contains(&forged), "{t}");

    // 3. A record deleted: a gap prune did not make.
    fx.reset();
    fs::remove_file(fx.record(r2)).unwrap();
    let t = fx.verify();
    assert!(
        t.contains("TRUNCATED: run #2") && t.contains("missing from streams/"),
        "{t}"
    );
    let t = fx.restore(r3, &[]);
    assert!(t.contains("TRUNCATED: run #2"), "{t}");
    fx.run_refuses("--accept-truncation");

    // 4. The newest restore point deleted entirely (record, stream, .sha1).
    fx.reset();
    let f3 = fx.stream(r3);
    fs::remove_file(fx.record(r3)).unwrap();
    fs::remove_file(format!("{}.sha1", f3.display())).unwrap();
    fs::remove_file(&f3).unwrap();
    let t = fx.verify();
    assert!(
        t.contains("ROLLED BACK") && t.contains(&format!("streams/{r3}.json (run #3)")),
        "{t}"
    );
    let t = fx.restore(r3, &[]);
    assert!(t.contains("ROLLED BACK"), "{t}");
    fx.run_refuses("--accept-rollback");

    // 5. The whole target replaced by a copy taken two runs earlier.
    fx.reset();
    copy_tree(&fx.after1, &fx.target);
    let t = fx.verify();
    assert!(t.contains("ROLLED BACK") && t.contains("(run #1)"), "{t}");
    let t = fx.restore(r3, &[]);
    assert!(t.contains("ROLLED BACK"), "{t}");
    fx.run_refuses("--accept-rollback");

    // 6. A record carrying another record's MAC.
    fx.reset();
    let mac_of = |s: &str| {
        fs::read_to_string(fx.record(s))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("snapveil-mac-v1 "))
            .unwrap()
            .to_string()
    };
    let (m1, m2) = (mac_of(r1), mac_of(r2));
    let text = fs::read_to_string(fx.record(r2)).unwrap();
    fs::write(fx.record(r2), text.replace(&m2, &m1)).unwrap();
    let t = fx.verify();
    assert!(t.contains(&forged), "{t}");
    let t = fx.restore(r2, &[]);
    assert!(t.contains(&forged), "{t}");
    fx.run_refuses("--accept-truncation");

    // Told so, a run backs up into the rolled-back target; its record restarts the chain
    // check, and the target verifies again.
    fx.reset();
    copy_tree(&fx.after1, &fx.target);
    write(&fx.live, "a", b"version 4\n");
    let (ok, t) = fx.cmd(&["run", "db", "--accept-rollback"]);
    assert!(ok, "{t}");
    let (ok, t) = fx.cmd(&["verify", "db"]);
    assert!(ok, "{t}");
}

/// Records written before sealed stream records: listed as unauthenticated, verified
/// against their sha1 with a note, restored only when told; the next run seals.
#[test]
fn raw_records_of_an_older_snapveil_are_unauthenticated() {
    let Some(fx) = Fx::new(false) else { return };
    for s in &fx.stamps {
        let mut b = body(&fx.record(s));
        for k in ["counter", "prev", "base_counter"] {
            b.as_object_mut().unwrap().remove(k);
        }
        fs::write(fx.record(s), serde_json::to_vec_pretty(&b).unwrap()).unwrap();
    }
    fs::remove_dir_all(fx.s.state.join("chain")).unwrap();
    let (ok, t) = fx.cmd(&["list", "db"]);
    assert!(ok && t.matches("yes (unauth.)").count() == 3, "{t}");
    let (ok, t) = fx.cmd(&["verify", "db"]);
    assert!(ok && t.contains("unauthenticated"), "{t}");
    let r3 = &fx.stamps[2];
    let t = fx.restore(r3, &[]);
    assert!(
        t.contains("--accept-unauthenticated") && t.contains(&format!("streams/{r3}.json")),
        "{t}"
    );
    let into = format!("{}/back", fx.pool.name);
    let (ok, t) = fx.cmd(&[
        "restore",
        "db",
        "--snapshot",
        r3,
        "--into",
        &into,
        "--accept-unauthenticated",
    ]);
    assert!(ok, "{t}");
    crate::util::ok(Command::new("zfs").args(["mount", &into]));
    assert_eq!(
        fs::read(fx.pool.mountpoint.join("back/a")).unwrap(),
        b"version 3\n"
    );
    // The next run seals its record (run #1 of the chain) and links nothing older.
    write(&fx.live, "a", b"version 4\n");
    let (ok, t) = fx.cmd(&["run", "db"]);
    assert!(ok, "{t}");
    let newest = fx.records().pop().unwrap();
    assert_eq!(body(&fx.record(&newest))["counter"], 1);
    let (ok, t) = fx.cmd(&["list", "db"]);
    assert!(ok && t.matches("yes (unauth.)").count() == 3, "{t}");
    let (ok, t) = fx.cmd(&["verify", "db"]);
    assert!(ok, "{t}");
}

/// Over ssh (records listed and fetched by rsync): an edited record, the newest point
/// deleted, and an older copy of the whole target.
#[test]
fn a_hostile_raw_ssh_target_is_detected() {
    let Some(fx) = Fx::new(true) else { return };
    let [_, r2, r3] = [&fx.stamps[0], &fx.stamps[1], &fx.stamps[2]];
    let (ok, t) = fx.cmd(&["verify", "db"]);
    assert!(ok, "{t}");

    let text = fs::read_to_string(fx.record(r2)).unwrap();
    fs::write(
        fx.record(r2),
        text.replacen("\"bytes\": ", "\"bytes\": 1", 1),
    )
    .unwrap();
    let forged = format!("TAMPERED: streams/{r2}.json: its MAC does not match its contents");
    let t = fx.verify();
    assert!(t.contains(&forged), "{t}");
    let t = fx.restore(r3, &[]);
    assert!(t.contains(&forged), "{t}");
    fx.run_refuses("--accept-truncation");

    fx.reset();
    fs::remove_file(fx.record(r3)).unwrap();
    let t = fx.verify();
    assert!(
        t.contains("ROLLED BACK") && t.contains(&format!("streams/{r3}.json (run #3)")),
        "{t}"
    );
    fx.run_refuses("--accept-rollback");

    fx.reset();
    copy_tree(&fx.after1, &fx.target);
    let t = fx.restore(r3, &[]);
    assert!(t.contains("ROLLED BACK") && t.contains("(run #1)"), "{t}");
    fx.run_refuses("--accept-rollback");
}
