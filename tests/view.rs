//! The encrypted view against the real thing: the stored gocryptfs vectors, live
//! `gocryptfs -reverse` mounts of the same tree and config, forward `gocryptfs` and
//! `gocryptfs -fsck` on a copy of our view, and `snapveil decrypt`.

use crate::util::fuse::{gocryptfs_forward, gocryptfs_reverse, is_mounted, snapveil_mount};
use crate::util::tree::{diff, make_edge_tree, manifest, Manifest};
use crate::util::{
    bin, describe, fails, missing, ok, passfile, private_copy, require_tool, shared,
};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use tempfile::TempDir;

const VARIANTS: [&str; 3] = ["encnames", "deterministic", "plaintextnames"];

/// A manifest in the vectors' TSV format: `f size sha256 path`, `l len target path`,
/// `d - - path`, sorted bytewise.
fn tsv(m: &Manifest) -> Vec<String> {
    let mut v: Vec<String> = m
        .iter()
        .map(|(k, e)| {
            let p = String::from_utf8_lossy(k);
            match e.kind {
                'f' => format!("f\t{}\t{}\t{p}", e.size, e.data),
                'l' => format!("l\t{}\t{}\t{p}", e.size, e.data),
                'd' => format!("d\t-\t-\t{p}"),
                _ => format!("o\t-\t-\t{p}"),
            }
        })
        .collect();
    v.sort();
    v
}

fn vector_tree(dir: &Path) {
    let script = shared().join("vectors/gocryptfs-reverse/make_tree.sh");
    ok(Command::new("bash").arg(script).arg(dir).arg("long"));
}

#[test]
fn view_matches_gocryptfs_vectors_in_all_name_modes() {
    require_tool("fusermount3");
    for v in VARIANTS {
        let t = TempDir::new().unwrap();
        let vdir = shared().join("vectors/gocryptfs-reverse").join(v);
        let plain = t.path().join("plain");
        vector_tree(&plain);
        let conf = t.path().join("conf");
        private_copy(&vdir.join("gocryptfs.reverse.conf"), &conf);
        let pass = t.path().join("pass");
        passfile(&pass, "PASSWORD");
        let mut want: Vec<String> = fs::read_to_string(vdir.join("manifest.tsv"))
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        want.sort();
        assert!(want.len() > 20);
        // Live (short caching, real opens) and --frozen (long caching, zero-message opens).
        for (i, extra) in [&[][..], &["--frozen"][..]].into_iter().enumerate() {
            let m = snapveil_mount(
                &conf,
                &pass,
                &plain,
                &t.path().join(format!("mnt{i}")),
                extra,
            );
            let got = tsv(&manifest(m.path()));
            assert_eq!(
                got, want,
                "variant {v} {extra:?}: view differs from gocryptfs's manifest"
            );
        }
    }
}

/// Sizes of ciphertexts of the hard-linked pair: gocryptfs 2.3 gives both paths the
/// IVs of whichever was opened first, we derive per path, so only sizes compare.
/// `snapveil decrypt --passfile <pass> <copy> <out>` (the key config is in `copy`).
fn decrypt(pass: &Path, copy: &Path, out: &Path) {
    ok(Command::new(bin())
        .arg("decrypt")
        .arg("--passfile")
        .arg(pass)
        .arg(copy)
        .arg(out));
}

/// gocryptfs's view (`gm`) and ours (`sm`) are the same, hardlinked files aside.
fn assert_same_views(mode: &str, mut gm: Manifest, mut sm: Manifest) {
    mask_hardlinks(&mut gm);
    mask_hardlinks(&mut sm);
    let d = diff(&gm, &sm);
    assert!(
        d.is_empty(),
        "mode {mode}: gocryptfs (left) and snapveil (right) views differ:\n{d}"
    );
}

fn mask_hardlinks(m: &mut Manifest) {
    let hl = snapveil::crypto::content::cipher_size(5000);
    for e in m.values_mut() {
        if e.kind == 'f' && e.size == hl {
            e.data.clear();
        }
    }
}

fn init_flags(mode: &str) -> &'static [&'static str] {
    match mode {
        "deterministic" => &["-deterministic-names"],
        "plaintextnames" => &["-plaintextnames"],
        _ => &[],
    }
}

fn snapveil_init_flags(mode: &str) -> &'static [&'static str] {
    match mode {
        "deterministic" => &["--deterministic-names"],
        "plaintextnames" => &["--plaintext-names"],
        _ => &[],
    }
}

#[test]
fn gocryptfs_config_works_with_snapveil_and_views_are_identical() {
    require_tool("gocryptfs");
    for mode in VARIANTS {
        let t = TempDir::new().unwrap();
        let src = t.path().join("src");
        make_edge_tree(&src);
        let pass = t.path().join("pass");
        passfile(&pass, "correct horse");
        let mut c = Command::new("gocryptfs");
        c.args(["-init", "-reverse", "-q", "-scryptn", "10", "-passfile"])
            .arg(&pass)
            .args(init_flags(mode))
            .arg(&src);
        ok(&mut c);
        let conf = src.join(".gocryptfs.reverse.conf");
        let g = gocryptfs_reverse(None, &pass, &src, &t.path().join("g"));
        let s = snapveil_mount(&conf, &pass, &src, &t.path().join("s"), &[]);
        let (gm, sm) = (manifest(g.path()), manifest(s.path()));
        assert!(
            gm.len() > 40,
            "gocryptfs view unexpectedly small: {}",
            gm.len()
        );
        assert_same_views(mode, gm.clone(), sm);
        // Issue 13: a --frozen mount (zero-message opens, kernel caches kept) is the same
        // view, read cold and again from the kernel's caches.
        let f = snapveil_mount(&conf, &pass, &src, &t.path().join("f"), &["--frozen"]);
        assert_same_views(mode, gm.clone(), manifest(f.path()));
        assert_same_views(mode, gm, manifest(f.path()));
    }
}

#[test]
fn snapveil_config_works_with_gocryptfs_and_copies_restore_with_stock_gocryptfs() {
    require_tool("gocryptfs");
    for mode in VARIANTS {
        let t = TempDir::new().unwrap();
        let src = t.path().join("src");
        make_edge_tree(&src);
        let keys = t.path().join("keys");
        fs::create_dir(&keys).unwrap();
        let conf = keys.join("home.conf");
        let pass = keys.join("home.pass");
        let mut c = Command::new(bin());
        c.args(["init", "--scrypt-n", "10", "--config"])
            .arg(&conf)
            .arg("--passfile")
            .arg(&pass)
            .args(snapveil_init_flags(mode));
        let out = ok(&mut c);
        assert!(
            out.lines()
                .any(|l| l.trim().len() == 71 && l.trim().split('-').count() == 8),
            "no dashed master key in:\n{out}"
        );
        assert_eq!(fs::metadata(&pass).unwrap().mode() & 0o777, 0o600);

        // 2. our config drives gocryptfs -reverse, and both show the same tree.
        let g = gocryptfs_reverse(Some(&conf), &pass, &src, &t.path().join("g"));
        let s = snapveil_mount(&conf, &pass, &src, &t.path().join("s"), &[]);
        let (gm, mut sm) = (manifest(g.path()), manifest(s.path()));
        // With -config elsewhere gocryptfs shows no gocryptfs.conf; ours always does.
        assert!(
            sm.remove(b"gocryptfs.conf".as_slice()).is_some(),
            "view lacks gocryptfs.conf"
        );
        assert_same_views(mode, gm, sm);
        drop(g);

        // 3. a copy of our view (self-describing: it carries gocryptfs.conf) restores
        // with the stock binary, passes its fsck, and with snapveil decrypt.
        let copy = t.path().join("copy");
        ok(Command::new("cp").arg("-a").arg(s.path()).arg(&copy));
        drop(s);
        ok(Command::new("gocryptfs")
            .args(["-fsck", "-q", "-passfile"])
            .arg(&pass)
            .arg(&copy));
        let plain = manifest(&src);
        let fwd = gocryptfs_forward(&pass, &copy, &t.path().join("fwd"));
        let d = diff(&plain, &manifest(fwd.path()));
        assert!(
            d.is_empty(),
            "mode {mode}: forward gocryptfs of the copy differs from the source:\n{d}"
        );
        drop(fwd);
        let out = t.path().join("out");
        decrypt(&pass, &copy, &out);
        let d = diff(&plain, &manifest(&out));
        assert!(
            d.is_empty(),
            "mode {mode}: snapveil decrypt differs from the source:\n{d}"
        );
    }
}

#[test]
fn hardlinks_are_separate_files_with_path_derived_ciphertext() {
    let t = TempDir::new().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("a"), vec![7u8; 9000]).unwrap();
    fs::hard_link(src.join("a"), src.join("b")).unwrap();
    let (conf, pass) = (t.path().join("c"), t.path().join("p"));
    crate::util::init_key_with(&["--plaintext-names"], &conf, &pass);
    let read = |first: &str, second: &str| {
        let m = snapveil_mount(&conf, &pass, &src, &t.path().join("m"), &[]);
        let x = fs::read(m.path().join(first)).unwrap();
        let y = fs::read(m.path().join(second)).unwrap();
        let (ma, mb) = (
            fs::metadata(m.path().join("a")).unwrap(),
            fs::metadata(m.path().join("b")).unwrap(),
        );
        assert_eq!(
            (ma.nlink(), mb.nlink()),
            (1, 1),
            "hardlinked paths must show link count 1"
        );
        assert_ne!(
            ma.ino(),
            mb.ino(),
            "hardlinked paths must be separate files in the view"
        );
        if first == "a" {
            (x, y)
        } else {
            (y, x)
        }
    };
    let (a1, b1) = read("a", "b");
    let (a2, b2) = read("b", "a");
    assert_eq!(a1, a2, "ciphertext of a depends on access order");
    assert_eq!(b1, b2, "ciphertext of b depends on access order");
    assert_ne!(a1, b1, "each path derives its own file ID");
}

#[test]
fn excludes_hide_plaintext_paths_gitignore_style() {
    let t = TempDir::new().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("logs/deep")).unwrap();
    fs::create_dir_all(src.join("keep")).unwrap();
    fs::write(src.join("keep/a.log"), b"x").unwrap();
    fs::write(src.join("keep/a.txt"), b"x").unwrap();
    fs::write(src.join("logs/deep/z"), b"x").unwrap();
    fs::write(src.join("cache.tmp"), b"x").unwrap();
    let (conf, pass) = (t.path().join("c"), t.path().join("p"));
    crate::util::init_key_with(&["--plaintext-names"], &conf, &pass);
    let m = snapveil_mount(
        &conf,
        &pass,
        &src,
        &t.path().join("m"),
        &[
            "--exclude",
            "*.log",
            "--exclude",
            "/logs/",
            "--exclude",
            "cache.tmp",
        ],
    );
    let names: Vec<String> = manifest(m.path())
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(names, vec!["gocryptfs.conf", "keep", "keep/a.txt"]);
    let e = fs::metadata(m.path().join("keep/a.log")).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EPERM),
        "direct access to an excluded path"
    );
}

#[test]
fn special_files_are_listed_but_not_readable_and_decrypt_recreates_them() {
    let t = TempDir::new().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    nix::unistd::mkfifo(
        &src.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    let (conf, pass) = (t.path().join("c"), t.path().join("p"));
    crate::util::init_key(&conf, &pass);
    let m = snapveil_mount(&conf, &pass, &src, &t.path().join("m"), &[]);
    let view = manifest(m.path());
    let fifo = view
        .iter()
        .find(|(_, e)| e.kind == 'o')
        .map(|(k, _)| m.path().join(String::from_utf8_lossy(k).as_ref()));
    let fifo = fifo.expect("the FIFO is listed under an encrypted name");
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    let copy = t.path().join("copy");
    ok(Command::new("cp").arg("-a").arg(m.path()).arg(&copy));
    drop(m);
    let out = t.path().join("out");
    decrypt(&pass, &copy, &out);
    let md = fs::symlink_metadata(out.join("pipe")).unwrap();
    assert!(md.file_type().is_fifo());
    assert_eq!(md.mode() & 0o777, 0o640);
}

#[test]
fn sigterm_unmounts_a_foreground_mount_cleanly() {
    let (t, src, conf, pass) = bad_input::setup();
    let mnt = t.path().join("m");
    let guard = crate::util::fuse::Mounted { path: mnt.clone() };
    let mut child = Command::new(bin())
        .arg("mount")
        .arg("--config")
        .arg(&conf)
        .arg("--passfile")
        .arg(&pass)
        .arg(&src)
        .arg(&mnt)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !is_mounted(&mnt) {
        assert!(
            std::time::Instant::now() < deadline,
            "foreground mount never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(fs::read_dir(&mnt).unwrap().count() >= 3);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "mount exited with {st} after SIGTERM");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
    drop(guard);
}

/// Issue 13: a frozen view reads the files after the one being read ahead of the reader,
/// on threads of its own. Read one file after the other in name order (as rsync's sender
/// and `tar` read), most READs are answered from what was read ahead, and every file is
/// the bytes `gocryptfs -reverse` serves; read by three readers at once, each backwards
/// through its own directory (every read ahead wasted), too.
#[test]
fn a_frozen_view_reads_ahead_and_serves_the_same_bytes_as_gocryptfs() {
    require_tool("gocryptfs");
    let t = TempDir::new().unwrap();
    let src = t.path().join("src");
    let mut files = 0;
    for d in 0..3 {
        let dir = src.join(format!("d{d}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..120usize {
            // Empty (no READ), one block exactly, too big to read ahead (> 256 KiB
            // encrypted), and small files of all sizes between.
            let size = match i % 10 {
                0 => 0,
                3 => 4096,
                7 => 300_000,
                _ => 100 + (i * 7919 + d * 131) % 40_000,
            };
            let data: Vec<u8> = (0..size).map(|k| (k * 31 + i + d) as u8).collect();
            fs::write(dir.join(format!("f{i:03}")), data).unwrap();
            files += 1;
        }
    }
    let (conf, pass) = (t.path().join("conf"), t.path().join("pass"));
    crate::util::init_key(&conf, &pass);
    let g = gocryptfs_reverse(Some(&conf), &pass, &src, &t.path().join("g"));
    let want = manifest(g.path());
    assert!(
        want.len() > files,
        "gocryptfs view too small: {}",
        want.len()
    );

    // Serial, in name order, on a foreground mount whose debug log counts the hits.
    let mnt = t.path().join("s");
    let served = Served::start(&conf, &pass, &src, &mnt, &["--frozen"], &[]);
    let mut got = manifest(&mnt);
    got.remove(&b"gocryptfs.conf"[..]); // ours shows the key config, gocryptfs with -config does not
    assert!(diff(&want, &got).is_empty(), "{}", diff(&want, &got));
    let log = served.end();
    let figure = |name: &str| -> usize {
        log.lines()
            .find(|l| l.contains("read ahead ended"))
            .and_then(|l| l.split(&format!(" {name}=")).nth(1))
            .and_then(|h| h.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no read-ahead {name} in the mount's log:\n{log}"))
    };
    let (hits, pushed) = (figure("hits"), figure("pushed"));
    // 360 files: 36 empty and 36 too big are never read ahead, nor the first read of
    // each directory; of the 285 left, most must have been served from the read-ahead:
    // pushed into the kernel's page cache (read above with no request at all, and
    // still gocryptfs's bytes) or, the markers, answered from memory.
    assert!(
        pushed >= 150 && hits + pushed >= 200,
        "only {pushed} files pushed and {hits} reads answered from the read-ahead"
    );

    // Three readers at once, each backwards through its own directory.
    let s = snapveil_mount(&conf, &pass, &src, &t.path().join("s2"), &["--frozen"]);
    std::thread::scope(|scope| {
        for d in 0..3 {
            let (gdir, sdir) = (
                g.path().join(enc_name(&g, d)),
                s.path().join(enc_name(&g, d)),
            );
            scope.spawn(move || {
                let mut names: Vec<_> = fs::read_dir(&gdir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                names.sort();
                for n in names.iter().rev() {
                    assert_eq!(
                        fs::read(sdir.join(n)).unwrap(),
                        fs::read(gdir.join(n)).unwrap(),
                        "{n:?} in d{d} differs"
                    );
                }
            });
        }
    });
}

/// The `d`-th directory of the view at `m`, in name order (each reader gets its own).
fn enc_name(m: &crate::util::fuse::Mounted, d: usize) -> std::ffi::OsString {
    let mut dirs: Vec<_> = fs::read_dir(m.path())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name())
        .collect();
    dirs.sort();
    assert_eq!(dirs.len(), 3, "{dirs:?}");
    dirs.swap_remove(d)
}

mod bad_input {
    use super::*;

    /// A source with one file, a key, and an empty `m` to mount on.
    pub(super) fn setup() -> (
        TempDir,
        std::path::PathBuf,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        let t = TempDir::new().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"data").unwrap();
        let (conf, pass) = (t.path().join("c"), t.path().join("p"));
        crate::util::init_key(&conf, &pass);
        fs::create_dir(t.path().join("m")).unwrap();
        (t, src, conf, pass)
    }

    fn mount(conf: &Path, pass: &Path, src: &Path, mnt: &Path) -> String {
        let mut c = Command::new(bin());
        c.arg("mount")
            .arg("--background")
            .arg("--config")
            .arg(conf)
            .arg("--passfile")
            .arg(pass)
            .arg(src)
            .arg(mnt);
        let err = fails(&mut c);
        assert!(!is_mounted(mnt), "mounted despite the error");
        err
    }

    #[test]
    fn wrong_password() {
        let (t, src, conf, _) = setup();
        let wrong = t.path().join("wrong");
        passfile(&wrong, "not the password");
        let err = mount(&conf, &wrong, &src, &t.path().join("m"));
        assert!(
            err.contains("password incorrect") && err.contains(&conf.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn passfile_too_open_or_missing() {
        let (t, src, conf, pass) = setup();
        fs::set_permissions(&pass, fs::Permissions::from_mode(0o644)).unwrap();
        let err = mount(&conf, &pass, &src, &t.path().join("m"));
        assert!(
            err.contains(&pass.display().to_string()) && err.contains("chmod 600"),
            "{err}"
        );
        let err = mount(&conf, &t.path().join("nope"), &src, &t.path().join("m"));
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn corrupt_or_unknown_version_config() {
        let (t, src, conf, pass) = setup();
        let text = fs::read_to_string(&conf).unwrap();
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&conf, text.replace("\"Version\": 2", "\"Version\": 3")).unwrap();
        let err = mount(&conf, &pass, &src, &t.path().join("m"));
        assert!(
            err.contains("version 3") && err.contains(&conf.display().to_string()),
            "{err}"
        );
        fs::write(&conf, &text[..text.len() / 2]).unwrap();
        let err = mount(&conf, &pass, &src, &t.path().join("m"));
        assert!(err.contains("not a gocryptfs config"), "{err}");
        fs::write(
            &conf,
            text.replace("\"AESSIV\"", "\"AESSIV\",\n\t\t\"Bogus\""),
        )
        .unwrap();
        let err = mount(&conf, &pass, &src, &t.path().join("m"));
        assert!(err.contains("unknown feature flag \"Bogus\""), "{err}");
    }

    #[test]
    fn source_missing_mountpoint_nonempty_or_busy() {
        let (t, src, conf, pass) = setup();
        let m = t.path().join("m");
        let err = mount(&conf, &pass, &t.path().join("absent"), &m);
        assert!(err.contains("absent") && err.contains("source"), "{err}");
        fs::write(m.join("x"), b"").unwrap();
        let err = mount(&conf, &pass, &src, &m);
        assert!(
            err.contains("not empty") && err.contains(&m.display().to_string()),
            "{err}"
        );
        fs::remove_file(m.join("x")).unwrap();
        let _held = snapveil_mount(&conf, &pass, &src, &m, &[]);
        let mut c = Command::new(bin());
        c.arg("mount")
            .arg("--background")
            .arg("--config")
            .arg(&conf)
            .arg("--passfile")
            .arg(&pass)
            .arg(&src)
            .arg(&m);
        let err = fails(&mut c);
        assert!(err.contains("busy"), "{err}");
    }

    #[test]
    fn init_refuses_overwrite_and_open_passfile() {
        let (t, _src, conf, pass) = setup();
        let before = fs::read(&conf).unwrap();
        let err = fails(
            Command::new(bin())
                .args(["init", "--scrypt-n", "10", "--config"])
                .arg(&conf)
                .arg("--passfile")
                .arg(&pass),
        );
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert_eq!(fs::read(&conf).unwrap(), before);
        let open = t.path().join("open.pass");
        fs::write(&open, "pw\n").unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o640)).unwrap();
        let err = fails(
            Command::new(bin())
                .args(["init", "--scrypt-n", "10", "--config"])
                .arg(t.path().join("c2"))
                .arg("--passfile")
                .arg(&open),
        );
        assert!(
            err.contains("open.pass") && err.contains("group or others"),
            "{err}"
        );
        assert!(!t.path().join("c2").exists());
    }

    #[test]
    fn decrypt_of_a_tampered_block_fails_that_file_only() {
        let (t, src, conf, pass) = setup();
        fs::write(src.join("big"), vec![1u8; 3 * 4096]).unwrap();
        fs::write(src.join("other"), b"intact").unwrap();
        let copy = t.path().join("copy");
        {
            let m = snapveil_mount(&conf, &pass, &src, &t.path().join("m"), &[]);
            ok(Command::new("cp").arg("-a").arg(m.path()).arg(&copy));
        }
        // Find the ciphertext of "big" (the only 3-block file) and flip a byte in block 1.
        let victim = fs::read_dir(&copy)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| fs::metadata(p).unwrap().len() == 18 + 3 * 4128)
            .unwrap();
        let mut data = fs::read(&victim).unwrap();
        data[18 + 4128 + 100] ^= 0x01;
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&victim, data).unwrap();
        let out = t.path().join("out");
        let mut c = Command::new(bin());
        c.arg("decrypt")
            .arg("--passfile")
            .arg(&pass)
            .arg(&copy)
            .arg(&out);
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", describe(&c, &o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&victim.display().to_string()) && err.contains("block 1"),
            "{err}"
        );
        assert!(
            !out.join("big").exists(),
            "unauthenticated plaintext written"
        );
        assert_eq!(fs::read(out.join("other")).unwrap(), b"intact");
        assert_eq!(fs::read(out.join("f")).unwrap(), b"data");
    }
}

#[test]
fn open_mounts_a_backup_copy_as_the_plaintext_tree() {
    for mode in VARIANTS {
        let t = TempDir::new().unwrap();
        let src = t.path().join("src");
        make_edge_tree(&src);
        let (conf, pass) = (t.path().join("c"), t.path().join("p"));
        ok(Command::new(bin())
            .args(["init", "--scrypt-n", "10", "--config"])
            .arg(&conf)
            .arg("--passfile")
            .arg(&pass)
            .args(snapveil_init_flags(mode)));
        let copy = t.path().join("copy");
        {
            let m = snapveil_mount(&conf, &pass, &src, &t.path().join("m"), &[]);
            ok(Command::new("cp").arg("-a").arg(m.path()).arg(&copy));
        }
        let mnt = t.path().join("open");
        fs::create_dir(&mnt).unwrap();
        let _g = crate::util::fuse::Mounted { path: mnt.clone() };
        ok(Command::new(bin())
            .arg("open")
            .arg("--background")
            .arg("--passfile")
            .arg(&pass)
            .arg(&copy)
            .arg(&mnt));
        let d = diff(&manifest(&src), &manifest(&mnt));
        assert!(
            d.is_empty(),
            "mode {mode}: open view differs from the source:\n{d}"
        );
    }
}

/// A kernel setting changed for one test and put back when it ends, however it ends.
struct Knob {
    path: &'static str,
    was: String,
}

impl Knob {
    /// Remembers `path`'s value, put back on drop; `None` when the kernel has no such
    /// setting.
    fn keep(path: &'static str) -> Option<Knob> {
        let was = fs::read_to_string(path).ok()?;
        Some(Knob {
            path,
            was: was.trim().to_string(),
        })
    }
}

impl Drop for Knob {
    fn drop(&mut self) {
        let _ = fs::write(self.path, &self.was);
    }
}

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";
/// The README's line that turns the kernel's FUSE over io_uring on, run as written.
const RING_ON: &str = "echo Y > /sys/module/fuse/parameters/enable_uring";

/// FUSE over io_uring turned on for the test. `None` (and the test skipped) only with
/// SNAPVEIL_TEST_SKIP_MISSING=1 on a kernel without it (before 6.14): a silent skip
/// would pass vacuously.
fn ring_on() -> Option<Knob> {
    let Some(k) = Knob::keep(ENABLE_URING) else {
        missing(&format!(
            "this kernel has no FUSE over io_uring ({ENABLE_URING})"
        ));
        return None;
    };
    assert!(
        crate::util::readme().contains(RING_ON),
        "README lacks {RING_ON:?}"
    );
    ok(Command::new("sh").args(["-c", RING_ON]));
    Some(k)
}

/// `snapveil mount` in the foreground with a debug log (read-ahead and ring figures); ended
/// with SIGTERM by [`Served::end`].
struct Served {
    child: std::process::Child,
    guard: crate::util::fuse::Mounted,
    log: std::path::PathBuf,
}

impl Served {
    fn start(
        conf: &Path,
        pass: &Path,
        src: &Path,
        mnt: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Served {
        fs::create_dir_all(mnt).unwrap();
        let guard = crate::util::fuse::Mounted { path: mnt.into() };
        let log = mnt.with_extension("log");
        let child = Command::new(bin())
            .args(["mount", "--config"])
            .arg(conf)
            .arg("--passfile")
            .arg(pass)
            .args(args)
            .arg(src)
            .arg(mnt)
            .env("SNAPVEIL_LOG", "snapveil=debug")
            .envs(env.iter().copied())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !is_mounted(mnt) {
            assert!(std::time::Instant::now() < deadline, "mount never appeared");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Served { child, guard, log }
    }

    /// Ends the mount and returns its log.
    fn end(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        )
        .unwrap();
        let st = self.child.wait().unwrap();
        let log = fs::read_to_string(&self.log).unwrap();
        assert!(st.success(), "mount ended with {st}:\n{log}");
        assert!(!is_mounted(&self.guard.path), "still mounted after SIGTERM");
        log
    }
}

/// Requests answered through the ring's queues and through `/dev/fuse`, from a mount's
/// debug log (`None`: our own loop did not serve it).
fn ring_figures(log: &str) -> Option<(u64, u64)> {
    let answered = |l: &str| -> u64 {
        l.split(" answered=")
            .nth(1)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no count in {l:?}"))
    };
    let dev = log
        .lines()
        .find(|l| l.contains("FUSE device loop ended"))
        .map(answered)?;
    let ring = log
        .lines()
        .filter(|l| l.contains("FUSE ring queue ended"))
        .map(answered)
        .sum();
    Some((ring, dev))
}

/// The edge tree and a few hundred small files, with gocryptfs -reverse's view of it
/// (the oracle; hard links masked: their ciphertext is per path in ours).
fn ring_tree(
    t: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    Manifest,
) {
    let src = t.join("src");
    make_edge_tree(&src);
    for d in 0..3 {
        let dir = src.join(format!("many{d}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..100usize {
            let data: Vec<u8> = (0..(i * 397 + d) % 20_000).map(|k| (k + i) as u8).collect();
            fs::write(dir.join(format!("f{i:03}")), data).unwrap();
        }
    }
    let (conf, pass) = (t.join("conf"), t.join("pass"));
    crate::util::init_key(&conf, &pass);
    let g = gocryptfs_reverse(Some(&conf), &pass, &src, &t.join("g"));
    let mut want = manifest(g.path());
    assert!(want.len() > 300, "gocryptfs view too small: {}", want.len());
    mask_hardlinks(&mut want);
    (src, conf, pass, want)
}

/// Fails unless the view at `mnt` shows what gocryptfs showed (`want` of [`ring_tree`]).
fn assert_shows(want: &Manifest, mnt: &Path, name: &str) {
    let mut got = manifest(mnt);
    got.remove(&b"gocryptfs.conf"[..]);
    mask_hardlinks(&mut got);
    assert!(diff(want, &got).is_empty(), "{name}: {}", diff(want, &got));
}

/// With the kernel's FUSE over io_uring on, a view (frozen and live) is served through
/// the ring: every entry, attribute, link and byte is gocryptfs's, and most requests
/// came through the ring's queues.
#[test]
fn the_view_over_io_uring_serves_gocryptfs_bytes_through_the_ring() {
    require_tool("gocryptfs");
    let Some(_ring) = ring_on() else { return };
    let t = TempDir::new().unwrap();
    let (src, conf, pass, want) = ring_tree(t.path());
    for (name, args) in [("frozen", &["--frozen"][..]), ("live", &[][..])] {
        let mnt = t.path().join(name);
        let s = Served::start(&conf, &pass, &src, &mnt, args, &[]);
        assert_shows(&want, &mnt, name);
        // STATFS, and access(2).
        ok(Command::new("stat").arg("-f").arg(&mnt));
        ok(Command::new("test")
            .arg("-r")
            .arg(mnt.join("gocryptfs.diriv")));
        let log = s.end();
        assert!(
            log.contains("FUSE INIT answered ring=true"),
            "{name}: no ring in:\n{log}"
        );
        let (ring, dev) =
            ring_figures(&log).unwrap_or_else(|| panic!("{name}: no figures in:\n{log}"));
        assert!(
            ring > 100 && ring > 10 * dev,
            "{name}: {ring} requests through the ring, {dev} through /dev/fuse"
        );
    }
}

/// A view served over io_uring whose process is killed (SIGKILL) is unmounted all the
/// same, even mounted through a symlink: fusermount3 leaves it (its open fails with
/// ECONNABORTED, not ENOTCONN), the view's guardian does not.
#[test]
fn a_killed_view_over_io_uring_is_unmounted() {
    let Some(_ring) = ring_on() else { return };
    let t = TempDir::new().unwrap();
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), vec![7u8; 300_000]).unwrap();
    let (conf, pass) = (t.path().join("conf"), t.path().join("pass"));
    crate::util::init_key(&conf, &pass);
    // Mounted through a symlink: the guardian knows the mount by its real path.
    let real = t.path().join("m");
    fs::create_dir(&real).unwrap();
    let mnt = t.path().join("m-link");
    std::os::unix::fs::symlink(&real, &mnt).unwrap();
    let mut s = Served::start(&conf, &pass, &src, &mnt, &["--frozen"], &[]);
    assert!(manifest(&mnt).len() > 3);
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while is_mounted(&mnt) {
        assert!(
            std::time::Instant::now() < deadline,
            "killed, still mounted: {}",
            crate::util::fuse::why_still_mounted(&mnt)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let log = fs::read_to_string(&s.log).unwrap();
    assert!(
        log.contains("FUSE INIT answered ring=true"),
        "no ring in:\n{log}"
    );
}

/// Where the ring is off (`SNAPVEIL_FUSE_RING=off`) fuser's loop serves the view, and
/// where the kernel refuses it (io_uring disabled) our loop on `/dev/fuse` serves every
/// request: the same bytes either way.
#[test]
fn without_the_ring_the_view_is_served_through_dev_fuse() {
    require_tool("gocryptfs");
    let Some(_ring) = ring_on() else { return };
    let t = TempDir::new().unwrap();
    let (src, conf, pass, want) = ring_tree(t.path());
    let check = |name: &str, s: Served| -> String {
        assert_shows(&want, &s.guard.path, name);
        s.end()
    };

    let off = Served::start(
        &conf,
        &pass,
        &src,
        &t.path().join("off"),
        &["--frozen"],
        &[("SNAPVEIL_FUSE_RING", "off")],
    );
    let log = check("off", off);
    assert!(
        !log.contains("FUSE INIT answered"),
        "ring off, yet our loop served:\n{log}"
    );
    assert_eq!(ring_figures(&log), None);

    let refused = {
        let no_uring = "/proc/sys/kernel/io_uring_disabled";
        let _was = Knob::keep(no_uring).expect("this kernel has kernel.io_uring_disabled");
        fs::write(no_uring, "2").unwrap();
        Served::start(
            &conf,
            &pass,
            &src,
            &t.path().join("refused"),
            &["--frozen"],
            &[],
        )
    };
    let log = check("refused", refused);
    assert!(
        log.contains("FUSE over io_uring not used"),
        "no word of the refusal:\n{log}"
    );
    let (ring, dev) = ring_figures(&log).unwrap_or_else(|| panic!("no figures in:\n{log}"));
    assert_eq!(ring, 0, "{log}");
    assert!(dev > 100, "only {dev} requests through /dev/fuse");
}
