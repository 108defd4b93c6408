use super::*;
use crate::crypto::KeyConfig;
use crate::view::mount::{MountedView, ViewOptions};
use std::os::unix::fs::symlink;

/// A walk gives back exactly what was put in, sorted by path: every kind (link
/// targets, device numbers in the `.meta` file), modes, owners, mtimes before 1970 and
/// with nanoseconds, file ctimes and fingerprints.
#[test]
fn a_walk_gives_back_every_entry_sorted() {
    let e = |path: &str, kind: Kind, mode: u32, mtime_ns: i128| MetaEntry {
        path: path.as_bytes().to_vec(),
        kind,
        mode,
        uid: 1000,
        gid: 100,
        mtime_ns,
    };
    let found = vec![
        (
            e("b/f", Kind::File, 0o640, 1_700_000_000_123_456_789),
            Some(1_700_000_001),
            7,
        ),
        (e("", Kind::Dir, 0o755, 0), None, 1),
        (e("b", Kind::Dir, 0o7777, -1_500_000_000), None, 2),
        (
            e("a-link", Kind::Symlink(b"../x y".to_vec()), 0o777, -1),
            None,
            3,
        ),
        (e("b/tty", Kind::Char(0x0504), 0o620, 5), None, 4),
        (e("a", Kind::File, 0o600, 6), Some(-2), 5),
        (e("b/blk", Kind::Block(u64::MAX), 0o660, 7), None, 6),
    ];
    let mut want: Vec<_> = found.iter().map(|(m, _, _)| m.clone()).collect();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    let (w, meta) = ViewWalk::from_found_meta(Path::new("/v"), found);
    assert_eq!(w.len(), 7);
    assert_eq!(w.file_count(), 2);
    assert_eq!(manifest::meta::parse("m", &meta).unwrap(), want);
    assert_eq!(
        w.files_vec(),
        vec![(b"a".to_vec(), -2), (b"b/f".to_vec(), 1_700_000_001)]
    );
    let entries: Vec<_> = w
        .entries_vec()
        .into_iter()
        .map(|(p, fp, d)| (String::from_utf8(p).unwrap(), fp, d))
        .collect();
    assert_eq!(
        entries,
        [
            ("", 1, true),
            ("a", 5, false),
            ("a-link", 3, false),
            ("b", 2, true)
        ]
        .into_iter()
        .chain([("b/blk", 6, false), ("b/f", 7, false), ("b/tty", 4, false)])
        .map(|(p, fp, d)| (p.to_string(), fp, d))
        .collect::<Vec<_>>()
    );
    // The file goes with the walk.
    let file = w.file.clone();
    assert!(file.exists());
    drop(w);
    assert!(!file.exists());
}

fn entry(path: &str) -> MetaEntry {
    MetaEntry {
        path: path.as_bytes().to_vec(),
        kind: Kind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    }
}

/// Paths are front-coded against the one before, across directories and back out of
/// them, with names that extend a directory's name (`d-e`, `d.f` sort before `d/x`).
#[test]
fn a_walk_reads_back_paths_coded_against_each_other() {
    let mut paths = vec![
        "", "d", "d/x", "d/x/y", "d/x-", "d-e", "d.f", "d0", "c", "c/z", "e", "e/a/b", "e/a",
        "\u{ff}",
    ];
    let long = "n".repeat(300);
    paths.push(&long);
    let found = paths.iter().map(|p| (entry(p), Some(0), 0)).collect();
    let w = ViewWalk::from_found(Path::new("/v"), found);
    let mut want: Vec<Vec<u8>> = paths.iter().map(|p| p.as_bytes().to_vec()).collect();
    want.sort();
    let got: Vec<_> = w.entries_vec().into_iter().map(|e| e.0).collect();
    assert_eq!(got, want);
}

/// A walk out of path order, or one that does not start at the root, is an error that
/// names the path, not a walk that every merge would read wrong; the file is not left.
#[test]
fn a_walk_out_of_order_is_refused_and_leaves_no_file() {
    for (paths, bad) in [
        (&["", "b", "a"][..], "a"),
        (&["", "a", "a"][..], "a"),
        (&["", "a/b", "a"][..], "a"),
        (&["x"][..], "x"),
    ] {
        let file = test_file();
        let mut meta = Vec::new();
        let mut b = WalkBuilder::new(Path::new("/v"), &file, &mut meta).unwrap();
        let mut err = None;
        for p in paths {
            if let Err(e) = b.push(p.as_bytes(), &entry(p), Some(0), 0) {
                err = Some(e.to_string());
                break;
            }
        }
        drop(b);
        let err = err.expect("refused");
        assert!(
            err.contains(&format!("not in path order at {bad}")),
            "{paths:?}: {err}"
        );
        assert!(!file.exists());
    }
}

/// A path longer than the index and the walk's reader take is refused by the walk, with
/// the start of the path: an index written from the walk is then always readable.
#[test]
fn a_path_too_long_is_refused() {
    let file = test_file();
    let mut meta = Vec::new();
    let mut b = WalkBuilder::new(Path::new("/v"), &file, &mut meta).unwrap();
    let root = MetaEntry {
        kind: Kind::Dir,
        ..entry("")
    };
    b.push(b"", &root, None, 0).unwrap();
    let long = "x".repeat(MAX_PATH as usize);
    b.push(long.as_bytes(), &entry(&long), Some(0), 0).unwrap();
    let longer = format!("{long}y");
    let e = b
        .push(longer.as_bytes(), &entry(&longer), Some(0), 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("a path longer than {MAX_PATH} bytes (xxxx")),
        "{e}"
    );
    let w = b.finish().unwrap();
    let files = w.files_vec();
    assert!(
        files.len() == 1 && files[0].0 == long.as_bytes(),
        "the long path, read back"
    );
}

/// A damaged walk file is an error naming it, not a wrong walk.
#[test]
fn a_damaged_walk_file_is_an_error() {
    let found = ["", "a", "b"]
        .iter()
        .map(|p| (entry(p), Some(0), 0))
        .collect();
    let w = ViewWalk::from_found(Path::new("/v"), found);
    let mut data = fs::read(&w.file).unwrap();
    // The second entry's kind byte (after its two lengths and one byte of name).
    let k = 1 + 1 + 1 + 8 + 8 + 1 + 1 + 1;
    assert_eq!(data[k], FILE);
    data[k] = 9;
    fs::write(&w.file, &data).unwrap();
    let e = w.files().unwrap().find_map(Result::err).unwrap();
    assert!(e.to_string().contains("the walk's file is damaged"), "{e}");
    data[k] = FILE;
    fs::write(&w.file, &data[..data.len() - 3]).unwrap();
    let e = w.files().unwrap().find_map(Result::err).unwrap();
    assert_eq!(
        std::error::Error::source(&e).map(|s| s.to_string()),
        Some("failed to fill whole buffer".into()),
        "{e}"
    );
}

/// A damaged length that would make a path longer than a walk writes is refused, not
/// followed: each entry may add at most [`MAX_PATH`] bytes to the one before.
#[test]
fn a_path_grown_past_the_bound_by_a_damaged_file_is_refused() {
    let root = MetaEntry {
        kind: Kind::Dir,
        ..entry("")
    };
    let mut w = ViewWalk::from_found(Path::new("/v"), vec![(root, None, 0)]);
    // After the root: a path of MAX_PATH bytes, then one that keeps all of it and adds a
    // byte.
    let mut data = fs::read(&w.file).unwrap();
    for (shared, rest) in [(0, MAX_PATH), (MAX_PATH, 1)] {
        crate::leb128::push(&mut data, shared);
        crate::leb128::push(&mut data, rest);
        data.extend(std::iter::repeat_n(b'x', rest as usize));
        data.push(OTHER);
        data.extend_from_slice(&0u64.to_le_bytes());
    }
    fs::write(&w.file, &data).unwrap();
    w.len = 3;
    let mut c = w.cursor().unwrap();
    assert!(c.advance().unwrap() && c.advance().unwrap());
    assert_eq!(c.path().len() as u64, MAX_PATH);
    let e = c.advance().unwrap_err().to_string();
    assert!(e.contains("damaged (a length out of range)"), "{e}");
}

/// The walk a run takes in process is the walk through the mount, entry for entry:
/// names (long ones, the IVs, the key config), kinds, modes, owners, mtimes, link
/// targets, file ctimes, with excluded entries left out.
#[test]
fn walk_core_matches_the_walk_through_the_mount() {
    if !Path::new("/dev/fuse").exists() {
        panic!("this test needs /dev/fuse (make test installs fuse3)");
    }
    let t = tempfile::TempDir::new().unwrap();
    let (src, mp) = (t.path().join("src"), t.path().join("mnt"));
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::create_dir_all(src.join("skip/deep")).unwrap();
    fs::create_dir(&mp).unwrap();
    fs::write(src.join("a/f"), b"one").unwrap();
    fs::write(src.join("a/b/c/g"), vec![7u8; 70_000]).unwrap();
    fs::write(src.join("n".repeat(200)), b"long name").unwrap();
    fs::write(src.join("skip/deep/x"), b"excluded").unwrap();
    fs::write(src.join("a/excluded.tmp"), b"excluded").unwrap();
    symlink("a/f", src.join("link")).unwrap();
    nix::unistd::mkfifo(
        &src.join("a/fifo"),
        nix::sys::stat::Mode::from_bits(0o640).unwrap(),
    )
    .unwrap();
    fs::set_permissions(
        src.join("a/f"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let master = crate::crypto::config::write_test_key(t.path());
    let key = KeyConfig::load(&t.path().join("k.conf")).unwrap();
    let v = MountedView::mount(
        &src,
        &mp,
        ViewOptions {
            key,
            master,
            excludes: vec!["/skip".into(), "*.tmp".into()],
            access: Default::default(),
            caching: crate::view::fuse::Caching::Frozen,
        },
    )
    .unwrap();
    let through = walk_view(&mp);
    let mut inside_meta = Vec::new();
    let inside = walk_core(
        v.core(),
        &mp,
        &t.path().join("walk"),
        &mut inside_meta,
        None,
    );
    v.unmount().unwrap();
    let ((through, through_meta), inside) = (through.unwrap(), inside.unwrap());
    // root, gocryptfs.conf, its diriv; a/ with diriv, f, fifo, b/ (diriv, c/ with diriv
    // and g); the link; the long name and its .name file. Nothing excluded.
    assert_eq!(through.len(), 15);
    assert_eq!(inside.len(), 15);
    assert_eq!(
        String::from_utf8_lossy(&inside_meta),
        String::from_utf8_lossy(&through_meta)
    );
    assert_eq!(inside.files_vec(), through.files_vec());
    assert_eq!(inside.entries_vec(), through.entries_vec());
    let meta = manifest::meta::parse("m", &inside_meta).unwrap();
    assert!(meta
        .iter()
        .any(|m| matches!(m.kind, Kind::Symlink(ref l) if !l.is_empty())));
}
