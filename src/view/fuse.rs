//! Links fuser's callbacks to [`ViewCore`]: converts types, replies with errnos, and
//! moves reads off the request loop onto the view's own rayon pool so that several reads are
//! encrypted at once while the loop keeps answering lookups.

use super::{Attr, Kind, Tree, ROOT_INO};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The tree under the view is frozen: let the kernel cache names and attributes for
/// the life of the mount (an hour, refreshed on use).
const TTL: Duration = Duration::from_secs(3600);

pub struct VeilFs<T: Tree> {
    core: Arc<T>,
    handles: Mutex<HashMap<u64, Arc<T::Handle>>>,
    next_fh: AtomicU64,
    /// Called once the kernel has initialised the session: the mount answers.
    on_init: Option<Box<dyn FnOnce() + Send>>,
    /// Reads run here, not on rayon's global pool: code in this same process that reads
    /// the mount from global-pool threads (a manifest of the view, a verify) would
    /// otherwise hold every worker while its reads wait for a free one: a deadlock.
    pool: Arc<rayon::ThreadPool>,
    /// `force_owner`: every entry presented as owned by this uid and gid.
    owner: Option<(u32, u32)>,
}

impl<T: Tree> VeilFs<T> {
    pub fn new(core: Arc<T>) -> Self {
        VeilFs {
            core,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            on_init: None,
            pool: Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(
                        std::thread::available_parallelism()
                            .map(|n| n.get())
                            .unwrap_or(2),
                    )
                    .thread_name(|i| format!("snapveil-read-{i}"))
                    .build()
                    .expect("a thread pool for reads"),
            ),
            owner: None,
        }
    }

    /// Presents every entry as owned by `owner` (uid, gid), so that with
    /// `default_permissions` an unprivileged pulling account can read what only root
    /// could read in clear (gocryptfs's `-force_owner`).
    pub fn force_owner(mut self, owner: Option<(u32, u32)>) -> Self {
        self.owner = owner;
        self
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        let mut f = to_fuse(a);
        if let Some((uid, gid)) = self.owner {
            f.uid = uid;
            f.gid = gid;
        }
        f
    }

    pub fn on_init(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_init = Some(Box::new(f));
        self
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn to_fuse(a: &Attr) -> FileAttr {
    FileAttr {
        ino: a.ino,
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn log_err(op: &str, ino: u64, e: &super::ViewError) {
    match e {
        super::ViewError::NotFound | super::ViewError::Excluded => tracing::trace!(op, ino, "{e}"),
        _ => tracing::warn!(op, ino, "{e}"),
    }
}

impl<T: Tree> Filesystem for VeilFs<T> {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // Large reads: fewer round trips, more blocks to encrypt in parallel per request.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(16);
        // Entries and their attributes in one reply: a `find` or rsync walk then needs no
        // separate LOOKUP per file.
        let _ = config.add_capabilities(fuser::consts::FUSE_DO_READDIRPLUS);
        if let Some(f) = self.on_init.take() {
            f();
        }
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        match self.core.lookup(parent, name) {
            Ok(a) => reply.entry(&TTL, &self.attr(&a), 0),
            Err(e) => {
                log_err("lookup", parent, &e);
                reply.error(e.errno())
            }
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.core.getattr(ino) {
            Ok(mut a) => {
                if ino == ROOT_INO {
                    a.ino = ROOT_INO;
                }
                reply.attr(&TTL, &self.attr(&a))
            }
            Err(e) => {
                log_err("getattr", ino, &e);
                reply.error(e.errno())
            }
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        match self.core.readlink(ino) {
            Ok(t) => reply.data(&t),
            Err(e) => {
                log_err("readlink", ino, &e);
                reply.error(e.errno())
            }
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        match self.core.open(ino) {
            Ok(h) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.handles
                    .lock()
                    .expect("handles lock")
                    .insert(fh, Arc::new(h));
                // Frozen source: cached pages stay valid across opens.
                reply.opened(fh, fuser::consts::FOPEN_KEEP_CACHE)
            }
            Err(e) => {
                log_err("open", ino, &e);
                reply.error(e.errno())
            }
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(h) = self.handles.lock().expect("handles lock").get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        tracing::trace!(ino, offset, size, "read");
        let core = Arc::clone(&self.core);
        self.pool
            .spawn(move || match core.read(&h, offset.max(0) as u64, size) {
                Ok(d) => reply.data(&d),
                Err(e) => {
                    log_err("read", ino, &e);
                    reply.error(e.errno())
                }
            });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().expect("handles lock").remove(&fh);
        reply.ok();
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.core.listing(ino) {
            Ok(_) => reply.opened(0, 0),
            Err(e) => {
                log_err("opendir", ino, &e);
                reply.error(e.errno())
            }
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let l = match self.core.listing(ino) {
            Ok(l) => l,
            Err(e) => {
                log_err("readdir", ino, &e);
                return reply.error(e.errno());
            }
        };
        // Offsets: 1 = ".", 2 = "..", 3.. = entries; each reply entry carries the offset
        // of the one after it.
        let mut off = offset;
        if off < 1 && reply.add(ino, 1, FileType::Directory, ".") {
            return reply.ok();
        }
        off = off.max(1);
        if off < 2 && reply.add(ino, 2, FileType::Directory, "..") {
            return reply.ok();
        }
        off = off.max(2);
        for (i, (eino, name, kind)) in l.entries.iter().enumerate().skip((off - 2) as usize) {
            if reply.add(*eino, i as i64 + 3, file_type(*kind), name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let l = match self.core.listing(ino) {
            Ok(l) => l,
            Err(e) => {
                log_err("readdirplus", ino, &e);
                return reply.error(e.errno());
            }
        };
        let dir = match self.core.getattr(ino) {
            Ok(mut a) => {
                if ino == ROOT_INO {
                    a.ino = ROOT_INO;
                }
                self.attr(&a)
            }
            Err(e) => {
                log_err("readdirplus", ino, &e);
                return reply.error(e.errno());
            }
        };
        let mut off = offset;
        if off < 1 && reply.add(ino, 1, ".", &TTL, &dir, 0) {
            return reply.ok();
        }
        off = off.max(1);
        if off < 2 && reply.add(ino, 2, "..", &TTL, &dir, 0) {
            return reply.ok();
        }
        off = off.max(2);
        for (i, (eino, name, _)) in l.entries.iter().enumerate().skip((off - 2) as usize) {
            let attr = match self.core.getattr(*eino) {
                Ok(a) => self.attr(&a),
                Err(e) => {
                    // Vanished under a live (dir:) source: leave it out of this listing.
                    log_err("readdirplus", *eino, &e);
                    continue;
                }
            };
            if reply.add(*eino, i as i64 + 3, name, &TTL, &attr, 0) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, mask: i32, reply: ReplyEmpty) {
        if mask & libc::W_OK != 0 {
            reply.error(libc::EROFS)
        } else {
            reply.ok()
        }
    }
}
