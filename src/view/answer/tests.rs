use super::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What was sent, as one buffer.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<Vec<u8>>>>);

impl Wire for Capture {
    fn send(&self, data: &[IoSlice<'_>]) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(data.iter().flat_map(|d| d.iter().copied()).collect());
        Ok(())
    }
}

impl Capture {
    fn one(&self) -> Vec<u8> {
        let sent = self.0.lock().unwrap();
        assert_eq!(sent.len(), 1, "replies sent: {}", sent.len());
        sent[0].clone()
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().unwrap())
}

fn attr() -> FileAttr {
    let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
    FileAttr {
        ino: 42,
        size: 4096 + 18,
        blocks: 9,
        atime: t,
        mtime: t + Duration::from_secs(1),
        ctime: t + Duration::from_secs(2),
        crtime: t,
        kind: FileType::RegularFile,
        perm: 0o640,
        nlink: 1,
        uid: 1000,
        gid: 100,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// A LOOKUP's reply is `fuse_out_header` then `fuse_entry_out` with `fuse_attr` at the
/// kernel's offsets (ABI 7.31).
#[test]
fn an_entry_is_the_kernels_fuse_entry_out() {
    let c = Capture::default();
    Answer::new(7, c.clone()).entry(&Duration::new(3600, 5), &attr(), 0);
    let b = c.one();
    assert_eq!(b.len(), OUT_HEADER + ENTRY_OUT);
    assert_eq!(u32_at(&b, 0) as usize, b.len());
    assert_eq!(u32_at(&b, 4), 0);
    assert_eq!(u64_at(&b, 8), 7);
    let e = &b[OUT_HEADER..];
    assert_eq!(u64_at(e, 0), 42, "nodeid");
    assert_eq!(u64_at(e, 16), 3600, "entry_valid");
    assert_eq!(u64_at(e, 24), 3600, "attr_valid");
    assert_eq!(u32_at(e, 32), 5, "entry_valid_nsec");
    let a = &e[40..];
    assert_eq!(u64_at(a, 0), 42);
    assert_eq!(u64_at(a, 8), 4114, "size");
    assert_eq!(u64_at(a, 16), 9, "blocks");
    assert_eq!(u64_at(a, 32), 1_700_000_001, "mtime");
    assert_eq!(u32_at(a, 48), 123, "atimensec");
    assert_eq!(u32_at(a, 60), libc::S_IFREG | 0o640, "mode");
    assert_eq!(u32_at(a, 68), 1000, "uid");
    assert_eq!(u32_at(a, 80), 4096, "blksize");
}

/// An error is a bare header with the negated errno; a reply dropped unanswered says
/// EIO, so that no request is left waiting.
#[test]
fn errors_and_forgotten_replies_are_bare_headers() {
    let c = Capture::default();
    Answer::new(9, c.clone()).error(libc::ENOENT);
    let b = c.one();
    assert_eq!(b.len(), OUT_HEADER);
    assert_eq!(u32_at(&b, 4) as i32, -libc::ENOENT);

    let c = Capture::default();
    drop(Answer::new(10, c.clone()));
    let b = c.one();
    assert_eq!((u32_at(&b, 4) as i32, u64_at(&b, 8)), (-libc::EIO, 10));
}

/// Listing entries are padded to 8 bytes and stop (returning true) at the first that
/// would not fit in the request's size.
#[test]
fn a_listing_fills_to_its_size_in_padded_entries() {
    let c = Capture::default();
    let mut a = Answer::listing(3, c.clone(), 90);
    assert!(!DirReply::add(
        &mut a,
        5,
        1,
        FileType::Directory,
        OsStr::new("abc")
    ));
    assert!(!DirReply::add(
        &mut a,
        6,
        2,
        FileType::RegularFile,
        OsStr::new("12345678")
    ));
    assert!(DirReply::add(
        &mut a,
        7,
        3,
        FileType::RegularFile,
        OsStr::new("full")
    ));
    DirReply::done(a);
    let b = c.one();
    let d = &b[OUT_HEADER..];
    assert_eq!(d.len(), 32 + 32, "{d:?}");
    assert_eq!((u64_at(d, 0), u64_at(d, 8), u32_at(d, 16)), (5, 1, 3));
    assert_eq!(u32_at(d, 20), libc::S_IFDIR >> 12);
    assert_eq!(&d[24..27], b"abc");
    assert_eq!(&d[27..32], &[0; 5]);
    assert_eq!(u64_at(d, 32), 6);
}

/// A READDIRPLUS entry is a whole `fuse_entry_out` then the dirent, its node the
/// attributes' inode (as fuser).
#[test]
fn a_listing_plus_entry_carries_its_attributes() {
    let c = Capture::default();
    let mut a = Answer::listing(4, c.clone(), 4096);
    let ttl = Duration::from_secs(1);
    assert!(!DirPlusReply::add(
        &mut a,
        99,
        1,
        OsStr::new("f"),
        &ttl,
        &attr(),
        0
    ));
    DirPlusReply::done(a);
    let b = c.one();
    let d = &b[OUT_HEADER..];
    assert_eq!(d.len(), (ENTRY_OUT + DIRENT + 1).next_multiple_of(8));
    assert_eq!(u64_at(d, 0), 42);
    assert_eq!(u64_at(d, ENTRY_OUT), 42, "dirent ino");
    assert_eq!(u32_at(d, ENTRY_OUT + 16), 1, "namelen");
    assert_eq!(u32_at(d, ENTRY_OUT + 20), libc::S_IFREG >> 12);
}

#[test]
fn statfs_and_open_have_the_kernels_sizes() {
    let c = Capture::default();
    let fs = Statfs {
        blocks: 1,
        bfree: 2,
        bavail: 3,
        files: 4,
        ffree: 5,
        bsize: 4096,
        namelen: 255,
        frsize: 4096,
    };
    Answer::new(1, c.clone()).statfs(&fs);
    let b = c.one();
    assert_eq!(b.len(), OUT_HEADER + 80);
    assert_eq!(u32_at(&b, OUT_HEADER + 40), 4096);
    assert_eq!(u32_at(&b, OUT_HEADER + 44), 255);

    let c = Capture::default();
    Answer::new(1, c.clone()).opened(77, 3);
    let b = c.one();
    assert_eq!(b.len(), OUT_HEADER + 16);
    assert_eq!((u64_at(&b, 16), u32_at(&b, 24)), (77, 3));
}
