//! Plaintext test trees and manifests that describe a tree completely (type, size,
//! content hash or link target, mode, mtime) so two trees compare in one assertion.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub size: u64,
    /// sha256 of content (files) or the link target (symlinks).
    pub data: String,
    pub mode: u32,
    pub mtime: i64,
}

pub type Manifest = BTreeMap<Vec<u8>, Entry>;

fn sha(path: &Path) -> String {
    let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex::encode(Sha256::digest(&data))
}

/// Walks `root` without following symlinks. Keys are relative paths as raw bytes.
pub fn manifest(root: &Path) -> Manifest {
    let mut m = Manifest::new();
    walk(root, root, &mut m);
    m
}

/// `p` below `root`, as the raw bytes of the relative path (names need not be UTF-8).
pub fn rel_bytes(root: &Path, p: &Path) -> Vec<u8> {
    p.strip_prefix(root)
        .unwrap()
        .as_os_str()
        .as_bytes()
        .to_vec()
}

fn walk(root: &Path, dir: &Path, m: &mut Manifest) {
    let mut ents: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    ents.sort();
    for p in ents {
        let md = fs::symlink_metadata(&p).unwrap();
        let rel = rel_bytes(root, &p);
        let ft = md.file_type();
        let (kind, data) = if ft.is_dir() {
            ('d', String::new())
        } else if ft.is_symlink() {
            (
                'l',
                String::from_utf8_lossy(fs::read_link(&p).unwrap().as_os_str().as_bytes())
                    .into_owned(),
            )
        } else if ft.is_file() {
            ('f', sha(&p))
        } else {
            ('o', String::new())
        };
        let size = if kind == 'd' { 0 } else { md.len() };
        m.insert(
            rel,
            Entry {
                kind,
                size,
                data,
                mode: md.mode() & 0o7777,
                mtime: md.mtime(),
            },
        );
        if kind == 'd' {
            walk(root, &p, m);
        }
    }
}

/// Human-readable first differences between two manifests (empty when equal).
pub fn diff(a: &Manifest, b: &Manifest) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => out += &format!("only in left: {}\n", String::from_utf8_lossy(k)),
            Some(w) if w != v => {
                out += &format!(
                    "differs: {}\n  left:  {v:?}\n  right: {w:?}\n",
                    String::from_utf8_lossy(k)
                )
            }
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out += &format!("only in right: {}\n", String::from_utf8_lossy(k));
        }
    }
    out.lines().take(40).collect::<Vec<_>>().join("\n")
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| ((i * 7 + seed as usize * 13) % 251) as u8 ^ ((i >> 12) as u8))
        .collect()
}

/// Sets an mtime with nanoseconds, on the link itself for a symlink.
pub fn set_mtime(p: &Path, secs: i64, ns: i64) {
    let t = nix::sys::time::TimeSpec::new(secs, ns);
    nix::sys::stat::utimensat(
        None,
        p,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// The interop tree of the issue: sizes around 4096-byte block edges, empty and sparse
/// files, 255-byte names, non-UTF-8 names, names with newlines, deep paths, symlinks
/// (relative, absolute, dangling), hardlinks, empty directories, modes and mtimes.
/// Returns the paths of the hard-linked pair.
pub fn make_edge_tree(root: &Path) -> (PathBuf, PathBuf) {
    fs::create_dir_all(root).unwrap();
    for (i, n) in [
        0usize,
        1,
        15,
        16,
        17,
        4095,
        4096,
        4097,
        8191,
        8192,
        8193,
        3 * 4096 + 5,
        70_000,
    ]
    .iter()
    .enumerate()
    {
        fs::write(root.join(format!("size_{n}.bin")), pattern(*n, i as u8)).unwrap();
    }
    // Sparse: a hole of 1 MiB, then data.
    let f = fs::File::create(root.join("sparse.img")).unwrap();
    f.set_len(1 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(b"tail after the hole", (1 << 20) - 19).unwrap();
    drop(f);
    fs::write(root.join("n".repeat(255)), b"255-byte name").unwrap();
    fs::write(
        root.join(OsStr::from_bytes(b"caf\xe9-latin1")),
        b"not utf-8",
    )
    .unwrap();
    fs::write(root.join("line\nbreak"), b"newline in name").unwrap();
    fs::write(root.join("h\u{e9}llo w\u{f6}rld.txt"), b"utf-8 name").unwrap();
    let mut deep = root.to_path_buf();
    for i in 0..24 {
        deep = deep.join(format!("level{i:02}"));
    }
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("bottom.txt"), b"deep").unwrap();
    fs::create_dir_all(root.join("empty_dir")).unwrap();
    fs::create_dir_all(root.join("dir with spaces/nested empty")).unwrap();
    std::os::unix::fs::symlink("size_4096.bin", root.join("link_rel")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("link_abs")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("link_dangling")).unwrap();
    std::os::unix::fs::symlink(
        "../../size_1.bin",
        root.join("dir with spaces/nested empty/link_up"),
    )
    .unwrap();
    let h1 = root.join("hard_a.txt");
    let h2 = root.join("dir with spaces/hard_b.txt");
    fs::write(&h1, pattern(5000, 9)).unwrap();
    fs::hard_link(&h1, &h2).unwrap();
    for (name, mode) in [
        ("size_1.bin", 0o600),
        ("size_15.bin", 0o755),
        ("size_16.bin", 0o640),
        ("size_17.bin", 0o444),
    ] {
        fs::set_permissions(root.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::set_permissions(root.join("empty_dir"), fs::Permissions::from_mode(0o700)).unwrap();
    // Fixed mtimes everywhere (children before parents).
    let mut all: Vec<PathBuf> = Vec::new();
    collect(root, &mut all);
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, 1_700_000_000 + i as i64 * 3600, 0);
    }
    (h1, h2)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            collect(&p, out);
        }
        out.push(p);
    }
}
