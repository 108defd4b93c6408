//! How the view answers a request, whichever transport carries it: fuser's reply types
//! (its own `/dev/fuse` loop), or [`Answer`], which encodes the kernel's reply structs
//! itself for `view::ring` (fuser's reply types cannot be given another sender: the
//! trait they take is not exported).
//!
//! One trait per kind of reply, with only what the view uses; the encoding follows
//! fuser 0.15's for ABI 7.31 byte for byte (`ll/reply.rs`), so the kernel sees the same
//! answers from both transports.

use fuser::{FileAttr, FileType};
use std::ffi::OsStr;
use std::io::IoSlice;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Every reply can be an error instead.
pub trait Fail {
    fn error(self, errno: libc::c_int);
}

/// A LOOKUP's reply.
pub trait EntryReply: Fail {
    fn entry(self, ttl: &Duration, attr: &FileAttr, generation: u64);
}

/// A GETATTR's reply.
pub trait AttrReply: Fail {
    fn attr(self, ttl: &Duration, attr: &FileAttr);
}

/// A READ's or READLINK's reply; READs are answered from the view's other threads.
pub trait DataReply: Fail + Send + 'static {
    fn data(self, data: &[u8]);
}

/// An OPEN's or OPENDIR's reply.
pub trait OpenReply: Fail {
    fn opened(self, fh: u64, flags: u32);
}

/// A reply with nothing in it (RELEASE, ACCESS).
pub trait EmptyReply: Fail {
    fn ok(self);
}

/// A STATFS's reply.
pub trait StatfsReply: Fail {
    fn statfs(self, s: &Statfs);
}

/// What STATFS answers (`struct statfs`'s counts and sizes).
#[derive(Clone, Copy, Debug, Default)]
pub struct Statfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// A READDIR's reply: entries while they fit (`add` returns true when full).
pub trait DirReply: Fail {
    fn add(&mut self, ino: u64, offset: i64, kind: FileType, name: &OsStr) -> bool;
    fn done(self);
}

/// A READDIRPLUS's reply: entries with their attributes while they fit.
pub trait DirPlusReply: Fail {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        ino: u64,
        offset: i64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: u64,
    ) -> bool;
    fn done(self);
}

// ---- fuser's reply types ----

macro_rules! fail {
    ($($t:ty),*) => {$(
        impl Fail for $t {
            fn error(self, errno: libc::c_int) {
                <$t>::error(self, errno)
            }
        }
    )*};
}
fail!(
    fuser::ReplyEntry,
    fuser::ReplyAttr,
    fuser::ReplyData,
    fuser::ReplyOpen,
    fuser::ReplyEmpty,
    fuser::ReplyStatfs,
    fuser::ReplyDirectory,
    fuser::ReplyDirectoryPlus
);

impl EntryReply for fuser::ReplyEntry {
    fn entry(self, ttl: &Duration, attr: &FileAttr, generation: u64) {
        fuser::ReplyEntry::entry(self, ttl, attr, generation)
    }
}

impl AttrReply for fuser::ReplyAttr {
    fn attr(self, ttl: &Duration, attr: &FileAttr) {
        fuser::ReplyAttr::attr(self, ttl, attr)
    }
}

impl DataReply for fuser::ReplyData {
    fn data(self, data: &[u8]) {
        fuser::ReplyData::data(self, data)
    }
}

impl OpenReply for fuser::ReplyOpen {
    fn opened(self, fh: u64, flags: u32) {
        fuser::ReplyOpen::opened(self, fh, flags)
    }
}

impl EmptyReply for fuser::ReplyEmpty {
    fn ok(self) {
        fuser::ReplyEmpty::ok(self)
    }
}

impl StatfsReply for fuser::ReplyStatfs {
    fn statfs(self, s: &Statfs) {
        fuser::ReplyStatfs::statfs(
            self, s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        )
    }
}

impl DirReply for fuser::ReplyDirectory {
    fn add(&mut self, ino: u64, offset: i64, kind: FileType, name: &OsStr) -> bool {
        fuser::ReplyDirectory::add(self, ino, offset, kind, name)
    }

    fn done(self) {
        fuser::ReplyDirectory::ok(self)
    }
}

impl DirPlusReply for fuser::ReplyDirectoryPlus {
    fn add(
        &mut self,
        ino: u64,
        offset: i64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: u64,
    ) -> bool {
        fuser::ReplyDirectoryPlus::add(self, ino, offset, name, ttl, attr, generation)
    }

    fn done(self) {
        fuser::ReplyDirectoryPlus::ok(self)
    }
}

// ---- our own encoding ----

/// Where an [`Answer`] goes: `/dev/fuse`, or a ring entry. `data` is the whole reply,
/// `fuse_out_header` first.
pub trait Wire: Send + Sync + 'static {
    fn send(&self, data: &[IoSlice<'_>]) -> std::io::Result<()>;
}

/// A reply to request `unique`, encoded here and handed to a [`Wire`]. Dropped
/// unanswered, it answers EIO (as fuser's do), so that no request is left hanging.
pub struct Answer<S: Wire> {
    unique: u64,
    to: Option<S>,
    /// A listing being filled, and the most it may hold (the request's size).
    dir: Vec<u8>,
    max: usize,
}

impl<S: Wire> Answer<S> {
    pub fn new(unique: u64, to: S) -> Self {
        Answer {
            unique,
            to: Some(to),
            dir: Vec::new(),
            max: 0,
        }
    }

    /// A listing's reply, of at most `max` bytes.
    pub fn listing(unique: u64, to: S, max: usize) -> Self {
        Answer {
            unique,
            to: Some(to),
            dir: Vec::with_capacity(max.min(64 << 10)),
            max,
        }
    }

    fn send(mut self, error: libc::c_int, parts: &[&[u8]]) {
        let Some(to) = self.to.take() else {
            return;
        };
        let len = OUT_HEADER + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut header = [0u8; OUT_HEADER];
        header[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&(-error).to_ne_bytes());
        header[8..16].copy_from_slice(&self.unique.to_ne_bytes());
        let mut iov = Vec::with_capacity(1 + parts.len());
        iov.push(IoSlice::new(&header));
        iov.extend(parts.iter().map(|p| IoSlice::new(p)));
        if let Err(e) = to.send(&iov) {
            tracing::warn!(unique = self.unique, "FUSE reply not sent: {e}");
        }
    }

    /// Whether an entry of `len` bytes (8-byte aligned in the listing) still fits.
    fn fits(&self, len: usize) -> bool {
        self.dir.len() + len.next_multiple_of(8) <= self.max
    }

    fn send_listing(mut self) {
        let dir = std::mem::take(&mut self.dir);
        self.send(0, &[&dir]);
    }
}

impl<S: Wire> Drop for Answer<S> {
    fn drop(&mut self) {
        if self.to.is_some() {
            let me = Answer {
                unique: self.unique,
                to: self.to.take(),
                dir: Vec::new(),
                max: 0,
            };
            me.send(libc::EIO, &[]);
        }
    }
}

impl<S: Wire> Fail for Answer<S> {
    fn error(self, errno: libc::c_int) {
        self.send(errno, &[])
    }
}

impl<S: Wire> EntryReply for Answer<S> {
    fn entry(self, ttl: &Duration, attr: &FileAttr, generation: u64) {
        let mut b = Vec::with_capacity(ENTRY_OUT);
        entry_out(&mut b, ttl, attr, generation);
        self.send(0, &[&b])
    }
}

impl<S: Wire> AttrReply for Answer<S> {
    fn attr(self, ttl: &Duration, attr: &FileAttr) {
        let mut b = Vec::with_capacity(ATTR_OUT);
        b.extend_from_slice(&ttl.as_secs().to_ne_bytes());
        b.extend_from_slice(&ttl.subsec_nanos().to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        fuse_attr(&mut b, attr);
        self.send(0, &[&b])
    }
}

impl<S: Wire> DataReply for Answer<S> {
    fn data(self, data: &[u8]) {
        self.send(0, &[data])
    }
}

impl<S: Wire> OpenReply for Answer<S> {
    fn opened(self, fh: u64, flags: u32) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&fh.to_ne_bytes());
        b[8..12].copy_from_slice(&flags.to_ne_bytes());
        self.send(0, &[&b])
    }
}

impl<S: Wire> EmptyReply for Answer<S> {
    fn ok(self) {
        self.send(0, &[])
    }
}

impl<S: Wire> StatfsReply for Answer<S> {
    fn statfs(self, s: &Statfs) {
        let mut b = Vec::with_capacity(STATFS_OUT);
        for v in [s.blocks, s.bfree, s.bavail, s.files, s.ffree] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        for v in [s.bsize, s.namelen, s.frsize] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.resize(STATFS_OUT, 0);
        self.send(0, &[&b])
    }
}

impl<S: Wire> DirReply for Answer<S> {
    fn add(&mut self, ino: u64, offset: i64, kind: FileType, name: &OsStr) -> bool {
        if !self.fits(DIRENT + name.len()) {
            return true;
        }
        dirent(&mut self.dir, ino, offset, kind, name);
        false
    }

    fn done(self) {
        self.send_listing()
    }
}

impl<S: Wire> DirPlusReply for Answer<S> {
    fn add(
        &mut self,
        _ino: u64,
        offset: i64,
        name: &OsStr,
        ttl: &Duration,
        attr: &FileAttr,
        generation: u64,
    ) -> bool {
        if !self.fits(ENTRY_OUT + DIRENT + name.len()) {
            return true;
        }
        // As fuser: the entry's node is its attributes' inode.
        entry_out(&mut self.dir, ttl, attr, generation);
        dirent(&mut self.dir, attr.ino, offset, attr.kind, name);
        false
    }

    fn done(self) {
        self.send_listing()
    }
}

const OUT_HEADER: usize = 16;
/// `fuse_attr` (ABI 7.9 and later: with `blksize`).
const ATTR: usize = 88;
const ATTR_OUT: usize = 16 + ATTR;
const ENTRY_OUT: usize = 40 + ATTR;
const DIRENT: usize = 24;
const STATFS_OUT: usize = 80;

/// `fuse_entry_out`, appended.
fn entry_out(b: &mut Vec<u8>, ttl: &Duration, attr: &FileAttr, generation: u64) {
    for v in [attr.ino, generation, ttl.as_secs(), ttl.as_secs()] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    b.extend_from_slice(&ttl.subsec_nanos().to_ne_bytes());
    b.extend_from_slice(&ttl.subsec_nanos().to_ne_bytes());
    fuse_attr(b, attr);
}

/// `fuse_attr`, appended.
fn fuse_attr(b: &mut Vec<u8>, a: &FileAttr) {
    let (at, atn) = time(a.atime);
    let (mt, mtn) = time(a.mtime);
    let (ct, ctn) = time(a.ctime);
    for v in [a.ino, a.size, a.blocks] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    for v in [at, mt, ct] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
    for v in [
        atn,
        mtn,
        ctn,
        mode(a.kind) | u32::from(a.perm),
        a.nlink,
        a.uid,
        a.gid,
        a.rdev,
        a.blksize,
        0,
    ] {
        b.extend_from_slice(&v.to_ne_bytes());
    }
}

/// `fuse_dirent` with `name`, padded to 8 bytes, appended.
fn dirent(b: &mut Vec<u8>, ino: u64, offset: i64, kind: FileType, name: &OsStr) {
    let start = b.len();
    b.extend_from_slice(&ino.to_ne_bytes());
    b.extend_from_slice(&offset.to_ne_bytes());
    b.extend_from_slice(&(name.len() as u32).to_ne_bytes());
    b.extend_from_slice(&(mode(kind) >> 12).to_ne_bytes());
    b.extend_from_slice(name.as_bytes());
    b.resize(start + (b.len() - start).next_multiple_of(8), 0);
}

/// Seconds and nanoseconds since the epoch, negative seconds before it (as fuser).
fn time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => (
            -(e.duration().as_secs() as i64),
            e.duration().subsec_nanos(),
        ),
    }
}

fn mode(kind: FileType) -> u32 {
    match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

#[cfg(test)]
mod tests;
