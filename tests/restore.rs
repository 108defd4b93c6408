//! `snapveil restore` end to end (issue 11, items 6, 7, 10): a real btrfs source on a
//! loop device, the real FUSE view, rsync to a local target, `snapveil run`, then
//! `snapveil restore`. A run that says success is restorable, exactly: the whole source
//! at a point in time, every entry type, names that are not UTF-8, and the metadata each
//! point saw (rsync changes modes and symlinks in place, so no generation keeps them).

use crate::util::btrfs::BtrfsLoop;
use crate::util::tree::{rel_bytes, set_mtime};
use crate::util::{bin, describe, ok, run_stamps};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A btrfs subvolume as the source of job `data`, a key, and a local target.
struct Fx {
    // Dropped in order: nothing of the work dir is mounted, then the loop device goes.
    work: tempfile::TempDir,
    src: PathBuf,
    target: PathBuf,
    config: PathBuf,
    _fs: BtrfsLoop,
}

impl Fx {
    fn new() -> Option<Fx> {
        let b = BtrfsLoop::new()?;
        let src = b.subvolume("data");
        let work = tempfile::Builder::new()
            .prefix("snapveil-restore-")
            .tempdir()
            .unwrap();
        let key = work.path().join("key.conf");
        let pass = work.path().join("key.pass");
        crate::util::init_key(&key, &pass);
        let target = work.path().join("target");
        let config = work.path().join("snapveil.toml");
        fs::write(
            &config,
            format!(
                "state_dir = {:?}\n\n[[job]]\nname = \"data\"\nsource = \"btrfs:{}\"\n\
                 target = {:?}\nkey_config = {:?}\npassfile = {:?}\n",
                work.path().join("state").display().to_string(),
                src.display(),
                target.display().to_string(),
                key.display().to_string(),
                pass.display().to_string(),
            ),
        )
        .unwrap();
        Some(Fx {
            work,
            src,
            target,
            config,
            _fs: b,
        })
    }

    /// `snapveil run data`; returns the new restore point's stamp.
    fn run(&self) -> String {
        // Stamps have one-second resolution.
        std::thread::sleep(Duration::from_millis(1100));
        let out = ok(Command::new(bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .arg("data"));
        assert!(out.contains("data: success"), "{out}");
        let mut runs = run_stamps(&self.target);
        runs.pop().unwrap()
    }

    fn out_dir(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// `snapveil restore --config C data PATHS... --to OUT [--as-of A]`: (success, text).
    fn restore(&self, paths: &[&OsStr], out: &Path, as_of: Option<&str>) -> (bool, String) {
        let mut c = Command::new(bin());
        c.args(["restore", "--config"])
            .arg(&self.config)
            .arg("data")
            .args(paths)
            .arg("--to")
            .arg(out);
        if let Some(a) = as_of {
            c.args(["--as-of", a]);
        }
        let o = c.output().unwrap();
        (o.status.success(), describe(&c, &o))
    }
}

/// Everything a restore must reproduce about one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ent {
    kind: char,
    /// File content or symlink target.
    data: Vec<u8>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
}

type Tree = BTreeMap<Vec<u8>, Ent>;

/// `root` and everything under it, without following symlinks; the root is `""`.
fn tree(root: &Path) -> Tree {
    fn ent(p: &Path) -> Ent {
        let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let ft = m.file_type();
        let (kind, data) = if ft.is_dir() {
            ('d', Vec::new())
        } else if ft.is_symlink() {
            ('l', fs::read_link(p).unwrap().into_os_string().into_vec())
        } else if ft.is_file() {
            ('f', fs::read(p).unwrap())
        } else if ft.is_fifo() {
            ('p', Vec::new())
        } else {
            ('o', Vec::new())
        };
        Ent {
            kind,
            data,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: (m.mtime(), m.mtime_nsec()),
        }
    }
    fn walk(root: &Path, dir: &Path, t: &mut Tree) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = rel_bytes(root, &p);
            let en = ent(&p);
            let is_dir = en.kind == 'd';
            t.insert(rel, en);
            if is_dir {
                walk(root, &p, t);
            }
        }
    }
    let mut t = Tree::new();
    t.insert(Vec::new(), ent(root));
    walk(root, root, &mut t);
    t
}

/// The differences between two trees, one line each, for assertion messages.
fn diff(want: &Tree, got: &Tree) -> String {
    let mut s = String::new();
    for (k, w) in want {
        let name = String::from_utf8_lossy(k);
        match got.get(k) {
            None => s += &format!("missing: {name:?} {w:?}\n"),
            Some(g) if g != w => s += &format!("differs: {name:?}\n  want {w:?}\n  got  {g:?}\n"),
            Some(_) => {}
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        s += &format!("extra: {:?}\n", String::from_utf8_lossy(k));
    }
    s
}

fn write(p: &Path, data: &[u8], mode: u32) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn mkfifo(p: &Path) {
    ok(Command::new("mkfifo").arg(p));
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// Every entry type and the names that need care: nested and empty directories, a long
/// name (its `.name` companion must not count as a file), a non-UTF-8 name, relative,
/// absolute and dangling symlinks, a FIFO, odd modes, another owner, mtimes with
/// nanoseconds, set last (directories after their contents).
fn rich_tree(s: &Path) {
    write(&s.join("a.txt"), b"alpha\n", 0o644);
    write(&s.join("secret"), b"only me\n", 0o600);
    write(&s.join("bin/tool"), b"#!/bin/sh\necho hi\n", 0o4755);
    write(
        &s.join("sub/deep/block.bin"),
        &vec![7u8; 4096 * 3 + 1],
        0o640,
    );
    write(&s.join("sub/empty-file"), b"", 0o444);
    let long = "L".repeat(200);
    write(&s.join("sub").join(&long), b"long name\n", 0o644);
    write(
        &s.join(OsStr::from_bytes(b"caf\xe9 \xff.txt")),
        b"latin-1 name\n",
        0o644,
    );
    fs::create_dir_all(s.join("emptydir")).unwrap();
    fs::set_permissions(s.join("emptydir"), fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink("sub/deep/block.bin", s.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", s.join("link-abs")).unwrap();
    std::os::unix::fs::symlink("no/such/thing", s.join("sub/dangling")).unwrap();
    mkfifo(&s.join("sub/fifo"));
    lchown(&s.join("secret"), 1234, 5678);
    lchown(&s.join("link-rel"), 4321, 8765);
    let mut n = 0;
    for (p, _) in tree(s).iter().rev() {
        n += 1;
        set_mtime(
            &s.join(OsStr::from_bytes(p)),
            1_700_000_000 + n,
            123_456_789 + n,
        );
    }
}

/// The number of regular files in a tree.
fn regular_files(t: &Tree) -> usize {
    t.values().filter(|e| e.kind == 'f').count()
}

/// The README's whole-source restore command line (the one naming `/`), as words.
fn readme_restore_command() -> Vec<String> {
    let readme = crate::util::readme();
    let line = readme
        .lines()
        .find(|l| l.starts_with("snapveil restore ") && l.contains(" / "))
        .expect("README shows `snapveil restore ... / ...`");
    line.split('#')
        .next()
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Item 6: `/`, `.` and `""` restore the whole source as it was at a restore point, also
/// by the README's command line, and `restored N files` counts the source's files.
#[test]
fn whole_source_restore_as_of_a_point_equals_the_source_then() {
    let Some(fx) = Fx::new() else { return };
    rich_tree(&fx.src);
    let p1 = fx.run();
    let t1 = tree(&fx.src);

    // Change everything that can change; run two is the newest point.
    write(&fx.src.join("a.txt"), b"alpha two, longer\n", 0o600);
    fs::remove_file(fx.src.join("secret")).unwrap();
    fs::remove_file(fx.src.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("a.txt", fx.src.join("link-rel")).unwrap();
    fs::remove_dir(fx.src.join("emptydir")).unwrap();
    fs::remove_file(fx.src.join("sub/fifo")).unwrap();
    write(&fx.src.join("new/file"), b"new\n", 0o644);
    fs::set_permissions(fx.src.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    let p2 = fx.run();
    let t2 = tree(&fx.src);
    assert_ne!(t1, t2);

    for (i, root) in ["/", ".", "", "./"].iter().enumerate() {
        let out = fx.out_dir(&format!("p1-{i}"));
        let (ok, text) = fx.restore(&[OsStr::new(root)], &out, Some(&p1));
        assert!(ok, "restore {root:?} as of {p1}:\n{text}");
        let d = diff(&t1, &tree(&out));
        assert!(
            d.is_empty(),
            "restore {root:?} as of {p1} differs:\n{d}\n{text}"
        );
        assert!(
            text.contains(&format!("restored {} files as of {p1}", regular_files(&t1))),
            "the count is of the source's regular files ({}), no .name/diriv files:\n{text}",
            regular_files(&t1)
        );
    }
    // Without --as-of: the newest point.
    let out = fx.out_dir("latest");
    let (ok, text) = fx.restore(&[OsStr::new("/")], &out, None);
    assert!(ok, "{text}");
    let d = diff(&t2, &tree(&out));
    assert!(d.is_empty(), "restore / as of {p2} differs:\n{d}");

    // The README's command line, as written but for its placeholders' values.
    let words = readme_restore_command();
    assert_eq!(words[..2], ["snapveil", "restore"], "{words:?}");
    let out = fx.out_dir("readme");
    let mut args: Vec<OsString> = Vec::new();
    let mut it = words[2..].iter();
    let mut positional = 0;
    while let Some(w) = it.next() {
        args.push(w.into());
        match w.as_str() {
            "--config" => args.push(fx.config.clone().into()),
            "--to" => args.push(out.clone().into()),
            "--as-of" => args.push(p1.clone().into()),
            "/" => {}
            _ if w.starts_with('-') => panic!("README's restore line has an unexpected {w}"),
            _ => {
                // The job name.
                positional += 1;
                *args.last_mut().unwrap() = "data".into();
                continue;
            }
        }
        if ["--config", "--to", "--as-of"].contains(&w.as_str()) {
            it.next().expect("a value after the option");
        }
    }
    assert_eq!(positional, 1, "{words:?}");
    assert!(words.contains(&"/".to_string()) && words.contains(&"--as-of".to_string()));
    let mut c = Command::new(bin());
    c.arg("restore").args(&args);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", describe(&c, &o));
    let d = diff(&t1, &tree(&out));
    assert!(d.is_empty(), "the README's restore differs:\n{d}");
}

/// Item 6: an entry is found by its name whatever its type or bytes: a non-UTF-8 file
/// name, a symlink, a FIFO, an empty directory, `./x` and trailing slashes.
#[test]
fn restore_names_non_utf8_files_symlinks_fifos_and_empty_dirs() {
    let Some(fx) = Fx::new() else { return };
    rich_tree(&fx.src);
    let p1 = fx.run();
    let t1 = tree(&fx.src);
    let only = |names: &[&[u8]]| -> Tree {
        // The named entries with their subtrees.
        t1.iter()
            .filter(|(k, _)| {
                names.iter().any(|n| {
                    k.as_slice() == *n || (k.starts_with(n) && k.get(n.len()) == Some(&b'/'))
                })
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    for (i, (arg, want)) in [
        (
            OsStr::from_bytes(b"caf\xe9 \xff.txt"),
            &b"caf\xe9 \xff.txt"[..],
        ),
        (OsStr::new("link-rel"), b"link-rel"),
        (OsStr::new("/sub/dangling"), b"sub/dangling"),
        (OsStr::new("./sub/fifo"), b"sub/fifo"),
        (OsStr::new("emptydir/"), b"emptydir"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = fx.out_dir(&format!("n{i}"));
        let (ok, text) = fx.restore(&[arg], &out, Some(&p1));
        assert!(ok, "restore {arg:?}:\n{text}");
        // Without the root and the directory on the way.
        let got: Tree = tree(&out)
            .into_iter()
            .filter(|(k, _)| !k.is_empty() && (k.as_slice() != b"sub"))
            .collect();
        let d = diff(&only(&[want]), &got);
        assert!(d.is_empty(), "restore {arg:?} differs:\n{d}\n{text}");
    }
    // A directory by name comes with its whole subtree, exactly.
    let out = fx.out_dir("sub");
    let (ok, text) = fx.restore(&[OsStr::new("sub/")], &out, Some(&p1));
    assert!(ok, "{text}");
    let got: Tree = tree(&out)
        .into_iter()
        .filter(|(k, _)| !k.is_empty())
        .collect();
    let d = diff(&only(&[b"sub"]), &got);
    assert!(d.is_empty(), "restore sub/ differs:\n{d}");
    // A path that was never there, and `..`, are refused by name.
    let (ok, text) = fx.restore(&[OsStr::from_bytes(b"nope\xff")], &fx.out_dir("x"), None);
    assert!(!ok && text.contains("not in the backup as of"), "{text}");
    let (ok, text) = fx.restore(&[OsStr::new("sub/../../etc")], &fx.out_dir("y"), None);
    assert!(!ok && text.contains(".."), "{text}");
    // A hostile record cannot make a restore write outside --to: refused, by file and line.
    let meta = fx.target.join("manifests").join(format!("{p1}.meta"));
    let mut m = fs::read(&meta).unwrap();
    let line = m.iter().filter(|b| **b == b'\n').count() + 1;
    m.extend_from_slice(b"f 0644 0 0 1 ../../escape\n");
    fs::write(&meta, m).unwrap();
    // The record's MAC of the .meta catches the edit first (issue 14) ...
    let (ok, text) = fx.restore(&[OsStr::new("/")], &fx.out_dir("z0"), Some(&p1));
    assert!(
        !ok && text.contains(&format!("manifests/{p1}.meta: TAMPERED")),
        "{text}"
    );
    // ... and a point of an older snapveil (no MACs) still has its paths checked.
    crate::util::as_made_by_older_snapveil(&fx.target, &fx.work.path().join("state"));
    let (ok, text) = fx.restore(&[OsStr::new("/")], &fx.out_dir("z"), Some(&p1));
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("manifests/{p1}.meta:{line}: unsafe path")),
        "{text}"
    );
    assert!(!fx.out_dir("z").exists() || fs::read_dir(fx.out_dir("z")).unwrap().count() == 0);
    assert!(!fx.work.path().join("escape").exists());
}

/// Item 7: each restore point restores the metadata it saw, although rsync applied the
/// later mode, owner, mtime and symlink changes in place (no generation holds them).
#[test]
fn as_of_restores_that_points_mode_owner_mtime_and_symlink_target() {
    let Some(fx) = Fx::new() else { return };
    let s = &fx.src;
    write(&s.join("f"), b"same content\n", 0o644);
    write(&s.join("d/g"), b"g\n", 0o644);
    fs::set_permissions(s.join("d"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("f", s.join("link")).unwrap();
    set_mtime(&s.join("f"), 1_600_000_000, 111);
    let p1 = fx.run();
    let t1 = tree(s);

    fs::set_permissions(s.join("f"), fs::Permissions::from_mode(0o600)).unwrap();
    lchown(&s.join("f"), 1000, 1000);
    fs::set_permissions(s.join("d"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::remove_file(s.join("link")).unwrap();
    std::os::unix::fs::symlink("d/g", s.join("link")).unwrap();
    let p2 = fx.run();
    let t2 = tree(s);
    // Nothing but metadata changed for f: run two kept no copy of it (so only a record
    // of what run one saw can restore its mode).
    let kc = snapveil::crypto::KeyConfig::load(&fx.work.path().join("key.conf")).unwrap();
    let keys = snapveil::crypto::Keys::new(
        &kc.unlock_with_passfile(&fx.work.path().join("key.pass"))
            .unwrap(),
        kc.flags,
    );
    let cf = snapveil::crypto::names::encrypt_path(&keys, b"f").cpath;
    let gen = fx.target.join("generations").join(&p2);
    assert!(
        !gen.join(OsStr::from_bytes(&cf)).exists(),
        "generation {p2} holds f: {:?}",
        fs::read_dir(&gen).map(|d| d.map(|e| e.unwrap().file_name()).collect::<Vec<_>>())
    );
    for (point, t) in [(&p1, &t1), (&p2, &t2)] {
        let out = fx.out_dir(&format!("f-{point}"));
        let (ok, text) = fx.restore(&[OsStr::new("f")], &out, Some(point));
        assert!(ok, "{text}");
        let got = tree(&out);
        assert_eq!(
            got[&b"f".to_vec()],
            t[&b"f".to_vec()],
            "f as of {point}:\n{text}"
        );
        let out = fx.out_dir(&format!("link-{point}"));
        let (ok, text) = fx.restore(&[OsStr::new("link")], &out, Some(point));
        assert!(ok, "{text}");
        assert_eq!(
            tree(&out).get(b"link".as_slice()),
            t.get(b"link".as_slice()),
            "link as of {point}:\n{text}"
        );
        let out = fx.out_dir(&format!("all-{point}"));
        let (ok, text) = fx.restore(&[OsStr::new("/")], &out, Some(point));
        assert!(ok, "{text}");
        let d = diff(t, &tree(&out));
        assert!(d.is_empty(), "/ as of {point}:\n{d}");
    }
    assert_eq!(t1[&b"f".to_vec()].mode, 0o644);
    assert_eq!(
        fs::read_link(fx.out_dir(&format!("link-{p1}")).join("link")).unwrap(),
        Path::new("f")
    );
}

/// A restore point made by an older snapveil (no `manifests/STAMP.meta`) restores its
/// regular files as before and says what it cannot do.
#[test]
fn restore_point_without_metadata_restores_regular_files_and_says_so() {
    let Some(fx) = Fx::new() else { return };
    rich_tree(&fx.src);
    let p1 = fx.run();
    let t1 = tree(&fx.src);
    let meta = fx.target.join("manifests").join(format!("{p1}.meta"));
    assert!(meta.is_file(), "a run writes {}", meta.display());
    fs::remove_file(&meta).unwrap();
    // A sealed record names its .meta: its absence is tampering (issue 14).
    let (ok, text) = fx.restore(&[OsStr::new("/")], &fx.out_dir("gone"), Some(&p1));
    assert!(
        !ok && text.contains(&format!("manifests/{p1}.meta: TAMPERED")),
        "{text}"
    );
    crate::util::as_made_by_older_snapveil(&fx.target, &fx.work.path().join("state"));
    let out = fx.out_dir("old");
    let (ok, text) = fx.restore(&[OsStr::new("/")], &out, Some(&p1));
    assert!(ok, "{text}");
    assert!(
        text.contains("note:") && text.contains("older snapveil"),
        "a note says the point has no metadata:\n{text}"
    );
    let files = |t: &Tree| -> BTreeMap<Vec<u8>, (Vec<u8>, u32)> {
        t.iter()
            .filter(|(_, e)| e.kind == 'f')
            .map(|(k, e)| (k.clone(), (e.data.clone(), e.mode)))
            .collect()
    };
    assert_eq!(files(&tree(&out)), files(&t1));
    assert!(
        text.contains(&format!("restored {} files", regular_files(&t1))),
        "{text}"
    );
}

/// Item 10: UNRECOVERABLE says what happened: a tampered copy, a missing one, and a
/// version lost to pruning (told by the copy being a newer restore point's version).
#[test]
fn unrecoverable_says_tampered_missing_or_pruned() {
    let Some(fx) = Fx::new() else { return };
    let s = &fx.src;
    write(&s.join("tamper"), &vec![1u8; 10_000], 0o644);
    write(&s.join("gone"), b"gone\n", 0o644);
    write(&s.join("changes"), b"version one\n", 0o644);
    let p1 = fx.run();
    write(&s.join("changes"), b"version two!\n", 0o644);
    let p2 = fx.run();
    let keys = {
        let dir = fx.work.path();
        let kc = snapveil::crypto::KeyConfig::load(&dir.join("key.conf")).unwrap();
        snapveil::crypto::Keys::new(
            &kc.unlock_with_passfile(&dir.join("key.pass")).unwrap(),
            kc.flags,
        )
    };
    let cipher = |rel: &str| {
        let c = snapveil::crypto::names::encrypt_path(&keys, rel.as_bytes()).cpath;
        fx.target.join("current").join(OsStr::from_bytes(&c))
    };
    let mut bad = fs::read(cipher("tamper")).unwrap();
    bad[5000] ^= 1;
    fs::write(cipher("tamper"), bad).unwrap();
    fs::remove_file(cipher("gone")).unwrap();
    // A prune that lost run one's version of `changes`: its generation is gone.
    fs::remove_dir_all(fx.target.join("generations").join(&p2)).unwrap();

    let out = fx.out_dir("r");
    let (ok, text) = fx.restore(&[OsStr::new("/")], &out, Some(&p1));
    assert!(!ok, "{text}");
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with("UNRECOVERABLE") && l.contains(&format!(": {name} (")))
            .unwrap_or_else(|| panic!("no UNRECOVERABLE line for {name}:\n{text}"))
            .to_string()
    };
    assert!(
        line("tamper").contains("tampered with or corrupt"),
        "{text}"
    );
    assert!(line("gone").contains("missing from the target"), "{text}");
    assert!(
        line("changes").contains(&format!(
            "pruned: the target holds the version of restore point {p2}"
        )),
        "{text}"
    );
    assert!(!line("tamper").contains("pruned"), "{text}");
    assert!(!out.join("tamper").exists() && !out.join("changes").exists());
}
