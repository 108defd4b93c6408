use super::*;
use crate::crypto::config::write_test_key;
use crate::crypto::content::cipher_size;
use crate::crypto::KeyConfig;
use crate::view::fuse::Caching;
use crate::view::mount::{MountedView, ViewOptions};
use std::fs;
use std::os::unix::ffi::OsStringExt as _;

fn mount(src: &Path, mp: &Path, keys: &Path) -> MountedView {
    let key = KeyConfig::load(&keys.join("k.conf")).unwrap();
    let master = key.unlock(b"pw").unwrap();
    MountedView::mount(
        src,
        mp,
        ViewOptions {
            key,
            master,
            excludes: Vec::new(),
            access: Default::default(),
            caching: Caching::Frozen,
        },
    )
    .unwrap()
}

/// The entries of `dir` (a view directory) but its directory IV, with their sizes.
fn entries(dir: &Path) -> Vec<(Vec<u8>, u64)> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "gocryptfs.diriv")
        .map(|e| (e.file_name().into_vec(), e.metadata().unwrap().len()))
        .collect()
}

#[test]
fn looks_up_lists_and_reads_what_rsync_will_ask_for() {
    let t = tempfile::tempdir().unwrap();
    let (src, mp, names_mp) = (
        t.path().join("src"),
        t.path().join("mp"),
        t.path().join("names"),
    );
    for d in ["d0", "d1", "d2"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    fs::create_dir_all(&mp).unwrap();
    fs::create_dir_all(&names_mp).unwrap();
    fs::write(src.join("d0/a"), b"a").unwrap();
    fs::write(src.join("d0/b"), b"bb").unwrap();
    fs::write(src.join("d1/c"), vec![7u8; 5000]).unwrap();
    fs::write(src.join("d2/big"), vec![1u8; 2 << 20]).unwrap();
    write_test_key(t.path());
    // The view's names, learnt through another mount of the same source.
    let (d0, d1, d2, c, big) = {
        let v = mount(&src, &names_mp, t.path());
        let dirs: Vec<Vec<u8>> = fs::read_dir(&names_mp)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.file_name().into_vec())
            .collect();
        // The directory holding one file of `size`, and that file.
        let holding = |size: u64| {
            dirs.iter()
                .find_map(|d| {
                    let e = entries(&names_mp.join(std::ffi::OsStr::from_bytes(d)));
                    (e.len() == 1 && e[0].1 == size).then(|| (d.clone(), e[0].0.clone()))
                })
                .unwrap()
        };
        let (d1, c) = holding(cipher_size(5000));
        let (d2, big) = holding(cipher_size(2 << 20));
        let d0 = dirs
            .iter()
            .find(|d| **d != d1 && **d != d2)
            .unwrap()
            .clone();
        v.unmount().unwrap();
        (d0, d1, d2, c, big)
    };
    let join = |a: &[u8], b: &[u8]| [a, b"/", b].concat();
    let list = vec![
        join(&d0, b"."),
        join(&d1, &c),
        join(&d2, &big),
        join(&d2, b"not-there"),
    ];
    let v = mount(&src, &mp, t.path());
    assert_eq!(v.core().nodes(), 1, "a fresh mount knows only its root");
    let w = warm(&mp, &list, &AtomicBool::new(false));
    // Looked up: d0 and, listed with it, a, b and its IV; d1 and c; d2 and big.
    let nodes = v.core().nodes();
    v.unmount().unwrap();
    assert_eq!(nodes, 1 + 4 + 2 + 2);
    assert_eq!(w.paths, 4);
    // Only c is read: a and b are in a listed directory, big is over WARM_FILE_MAX.
    assert_eq!((w.files_read, w.bytes_read), (1, cipher_size(5000)));
}

#[test]
fn stopped_it_asks_for_nothing_more() {
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), b"f").unwrap();
    let w = warm(
        t.path(),
        &[b"f".to_vec(), b"f".to_vec()],
        &AtomicBool::new(true),
    );
    assert_eq!((w.paths, w.files_read), (0, 0));
}

#[test]
fn reads_no_more_than_its_budget() {
    let budget = AtomicU64::new(10);
    let t = tempfile::tempdir().unwrap();
    fs::write(t.path().join("f"), vec![0u8; 11]).unwrap();
    fs::write(t.path().join("g"), vec![0u8; 10]).unwrap();
    assert_eq!(warm_one(t.path(), b"f", &budget), None);
    assert_eq!(warm_one(t.path(), b"g", &budget), Some(10));
    assert_eq!(budget.load(Ordering::Relaxed), 0);
    assert_eq!(warm_one(t.path(), b"g", &budget), None);
}

#[test]
fn reads_nothing_outside_the_view() {
    let t = tempfile::tempdir().unwrap();
    let outside = t.path().join("outside");
    fs::write(&outside, b"not the view's").unwrap();
    let view = t.path().join("view");
    fs::create_dir(&view).unwrap();
    let budget = AtomicU64::new(1 << 20);
    let line = outside.as_os_str().as_bytes();
    assert_eq!(warm_one(&view, line, &budget), None);
    assert_eq!(budget.load(Ordering::Relaxed), 1 << 20);
}
