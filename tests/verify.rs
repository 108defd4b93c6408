//! Issue 6 end to end on the loopback sshd target: per-run manifests, `snapveil verify`
//! (plain and --deep) and `snapveil restore` as of each run.

use crate::util::{self, sshd::Sshd};
use snapveil::crypto::{names, KeyConfig, Keys};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

struct Fx {
    tmp: tempfile::TempDir,
    sshd: Sshd,
    config: PathBuf,
    src: PathBuf,
    target: PathBuf,
    key: PathBuf,
    pass: PathBuf,
}

impl Fx {
    fn new() -> Fx {
        assert!(util::require_tool("rsync"));
        let tmp = tempfile::TempDir::new().unwrap();
        let t = tmp.path();
        let sshd = Sshd::start(t, &t.join("rr"));
        let src = t.join("src");
        let target = t.join("target");
        let keys = t.join("keys");
        fs::create_dir_all(&keys).unwrap();
        fs::set_permissions(&keys, fs::Permissions::from_mode(0o700)).unwrap();
        let key = keys.join("v.conf");
        let pass = keys.join("v.pass");
        util::init_key(&key, &pass);
        let config = t.join("snapveil.toml");
        let ssh_args: Vec<String> = sshd
            .ssh_args(&sshd.full_key)
            .iter()
            .map(|a| format!("{a:?}"))
            .collect();
        fs::write(
            &config,
            format!(
                "state_dir = {:?}\n[[job]]\nname = \"v\"\nsource = \"dir:{}\"\ntarget = {:?}\n\
                 key_config = {:?}\npassfile = {:?}\nssh_args = [{}]\nverify_every = 2\n",
                t.join("state").display().to_string(),
                src.display(),
                sshd.target(&target),
                key.display().to_string(),
                pass.display().to_string(),
                ssh_args.join(", ")
            ),
        )
        .unwrap();
        Fx {
            tmp,
            sshd,
            config,
            src,
            target,
            key,
            pass,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(util::bin());
        c.args(args).arg("--config").arg(&self.config);
        c
    }

    fn run(&self) -> String {
        // Stamps have one-second resolution.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let out = util::run(&mut self.cmd(&["run", "v"]));
        assert!(
            out.status.success(),
            "{}\n--- sshd\n{}",
            util::describe(&self.cmd(&["run", "v"]), &out),
            self.sshd.log()
        );
        let mut runs = util::run_stamps(&self.target);
        // verify_every = 2: every second run checks the target against its manifest.
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.contains("verified the target against the manifest"),
            runs.len().is_multiple_of(2),
            "{stderr}"
        );
        runs.pop().unwrap()
    }

    fn keys(&self) -> Keys {
        let kc = KeyConfig::load(&self.key).unwrap();
        Keys::new(&kc.unlock_with_passfile(&self.pass).unwrap(), kc.flags)
    }

    /// The target's copy of plaintext file `rel`.
    fn cipher_of(&self, rel: &str) -> PathBuf {
        let c = names::encrypt_path(&self.keys(), rel.as_bytes()).cpath;
        self.target
            .join("current")
            .join(std::ffi::OsStr::from_bytes(&c))
    }

    fn restore(
        &self,
        paths: &[&str],
        as_of: Option<&str>,
        extra: &[&str],
    ) -> (bool, PathBuf, String) {
        let out = self.tmp.path().join(format!(
            "restore-{}",
            fs::read_dir(self.tmp.path()).unwrap().count()
        ));
        let mut c = self.cmd(&["restore", "v"]);
        c.args(paths).arg("--to").arg(&out).args(extra);
        if let Some(a) = as_of {
            c.args(["--as-of", a]);
        }
        let o = util::run(&mut c);
        let text = util::describe(&c, &o);
        (o.status.success(), out, text)
    }
}

/// Regular files under `root` (relative path → content, mode, mtime).
fn files(root: &Path) -> BTreeMap<String, (Vec<u8>, u32, i64)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (Vec<u8>, u32, i64)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                walk(root, &e.path(), out);
            } else if m.is_file() {
                let rel = e.path().strip_prefix(root).unwrap().display().to_string();
                out.insert(
                    rel,
                    (fs::read(e.path()).unwrap(), m.mode() & 0o7777, m.mtime()),
                );
            }
        }
    }
    if root.exists() {
        walk(root, root, &mut out);
    }
    out
}

fn subset(
    all: &BTreeMap<String, (Vec<u8>, u32, i64)>,
    prefix: &str,
) -> BTreeMap<String, (Vec<u8>, u32, i64)> {
    all.iter()
        .filter(|(k, _)| *k == prefix || k.starts_with(&format!("{prefix}/")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn write(p: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn verify_and_restore_as_of_each_run_over_ssh() {
    let fx = Fx::new();
    let s = &fx.src;
    write(&s.join("a.txt"), b"alpha one\n", 0o644);
    write(&s.join("d/b.txt"), b"bravo\n", 0o600);
    write(&s.join("d/e/c.bin"), &vec![7u8; 10_000], 0o640);
    write(&s.join("keep.txt"), b"unchanged\n", 0o644);
    let r1 = fx.run();
    let t1 = files(s);

    // sha1sum -c works on the backup host with no snapveil.
    let m1 = fx.target.join("manifests").join(format!("{r1}.sha1"));
    util::ok(
        Command::new("sha1sum")
            .args(["-c", "--quiet"])
            .arg(&m1)
            .current_dir(fx.target.join("current")),
    );

    write(&s.join("a.txt"), b"alpha two, longer\n", 0o600);
    fs::remove_file(s.join("d/b.txt")).unwrap();
    write(&s.join("d/new.txt"), b"new in run 2\n", 0o644);
    write(&s.join("d/e/c.bin"), &vec![9u8; 20_000], 0o640);
    let r2 = fx.run();
    let t2 = files(s);
    assert!(r1 < r2);

    for (point, tree) in [(r1.as_str(), &t1), (r2.as_str(), &t2)] {
        // A single file.
        let (ok, out, text) = fx.restore(&["a.txt"], Some(point), &[]);
        assert!(ok, "{text}");
        assert_eq!(files(&out), subset(tree, "a.txt"), "a.txt as of {point}");
        // A subtree.
        let (ok, out, text) = fx.restore(&["d"], Some(point), &[]);
        assert!(ok, "{text}");
        assert_eq!(files(&out), subset(tree, "d"), "d/ as of {point}");
        // --raw: encrypted, mountable by stock gocryptfs (diriv files and conf present),
        // and decrypts to the same tree.
        let (ok, raw, text) = fx.restore(&["d"], Some(point), &["--raw"]);
        assert!(ok, "{text}");
        assert!(raw.join("gocryptfs.conf").is_file());
        let dirs: Vec<PathBuf> = walkdirs(&raw);
        assert!(dirs.len() >= 3);
        for d in dirs {
            assert!(d.join("gocryptfs.diriv").is_file(), "{}", d.display());
        }
        let dec = fx.tmp.path().join(format!("dec-{point}"));
        util::ok(
            Command::new(util::bin())
                .arg("decrypt")
                .arg("--passfile")
                .arg(&fx.pass)
                .arg(&raw)
                .arg(&dec),
        );
        assert_eq!(files(&dec), subset(tree, "d"));
    }
    // A file deleted by run 2 is not restored as of run 2, and is as of run 1.
    let (ok, out, text) = fx.restore(&["d/b.txt"], Some(&r2), &[]);
    assert!(!ok && text.contains("not in the backup"), "{text}");
    assert!(files(&out).is_empty());
    // No --as-of: the latest run.
    let (ok, out, text) = fx.restore(&["d", "keep.txt"], None, &[]);
    assert!(ok, "{text}");
    let mut want = subset(&t2, "d");
    want.extend(subset(&t2, "keep.txt"));
    assert_eq!(files(&out), want);

    // verify and verify --deep pass on a good backup.
    util::ok(&mut fx.cmd(&["verify", "v"]));
    util::ok(&mut fx.cmd(&["verify", "v", "--deep"]));
    // Without --deep, an ssh target with a shell is checked against the authenticated
    // manifest alone: the source is not read (here it is not even there).
    let away = fx.src.with_extension("away");
    fs::rename(&fx.src, &away).unwrap();
    let out = fx.cmd(&["verify", "v"]).output().unwrap();
    fs::rename(&away, &fx.src).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A flipped byte on the target is found.
    let victim = fx.cipher_of("d/e/c.bin");
    let good = fs::read(&victim).unwrap();
    let mut bad = good.clone();
    bad[5000] ^= 1;
    fs::write(&victim, &bad).unwrap();
    let mut c = fx.cmd(&["verify", "v"]);
    let o = util::run(&mut c);
    let text = util::describe(&c, &o);
    let cname = victim
        .strip_prefix(fx.target.join("current"))
        .unwrap()
        .display()
        .to_string();
    assert!(!o.status.success(), "{text}");
    assert!(text.contains(&format!("differing: {cname}")), "{text}");
    // ...and a restore reports it instead of writing bad data.
    let (ok, out, text) = fx.restore(&["d/e/c.bin"], None, &[]);
    assert!(!ok && text.contains("UNRECOVERABLE"), "{text}");
    assert!(files(&out).is_empty());
    fs::write(&victim, &good).unwrap();
    util::ok(&mut fx.cmd(&["verify", "v"]));

    // Deep verify fails when a file's ciphertext is replaced by another's (same size,
    // so only the decryption can tell).
    write(&s.join("x1"), b"same size 1", 0o644);
    write(&s.join("x2"), b"same size 2", 0o644);
    fx.run();
    util::ok(&mut fx.cmd(&["verify", "v", "--deep"]));
    let (x1, x2) = (fx.cipher_of("x1"), fx.cipher_of("x2"));
    let saved = fs::read(&x2).unwrap();
    fs::copy(&x1, &x2).unwrap();
    let mut c = fx.cmd(&["verify", "v", "--deep"]);
    let o = util::run(&mut c);
    let text = util::describe(&c, &o);
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("wrong plaintext"), "{text}");
    fs::write(&x2, saved).unwrap();
    util::ok(&mut fx.cmd(&["verify", "v", "--deep"]));
}

fn walkdirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.push(e.path());
            }
        }
        i += 1;
    }
    out
}
