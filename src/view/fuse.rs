//! Links fuser's callbacks to a [`Tree`] (the reverse view's `ViewCore`, the forward
//! view): converts types, replies with errnos, and moves reads off the request loop onto
//! the view's own rayon pool so that several reads are encrypted at once while the loop
//! keeps answering lookups.
//!
//! How much the kernel may cache depends on the source ([`Caching`]). A frozen source (a
//! snapshot) is served with hour-long entry and attribute timeouts and zero-message
//! opens: OPEN answers ENOSYS once, after which the kernel opens files without asking,
//! keeps their page cache across opens, and sends no RELEASE or FLUSH; OPENDIR asks the
//! kernel to keep listings (FOPEN_CACHE_DIR). A small-file read is then one round trip
//! (the READ) after the READDIRPLUS that listed it. A live source (`dir:`) gets one-second
//! timeouts and real opens that drop the page cache, so changes show.
//!
//! fuser 0.15 reads `/dev/fuse` from one thread (`Session::run` takes `&mut self` and
//! cloned device fds are not supported); the work that costs (encrypting reads, opening
//! source files) runs on the pool, so the loop only parses and dispatches.

use super::{Attr, Kind, Tree, ROOT_INO};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the kernel may cache of a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caching {
    /// Nothing under the source changes while it is mounted (a snapshot): names,
    /// attributes, listings and pages for the life of the mount (an hour, refreshed on use).
    Frozen,
    /// The source may change (`dir:`, a backup copy being written): one-second timeouts,
    /// page cache dropped on every open.
    Live,
}

impl Caching {
    fn ttl(self) -> Duration {
        match self {
            Caching::Frozen => Duration::from_secs(3600),
            Caching::Live => Duration::from_secs(1),
        }
    }
}

/// Files opened for zero-message opens (frozen sources), most recent last: a file read
/// in several requests is opened once. Small, since the kernel reads a small file in one
/// request and a big one front to back.
const OPEN_CACHE: usize = 64;

/// Open files by node, oldest first (see [`OPEN_CACHE`]).
type OpenFiles<H> = Mutex<VecDeque<(u64, Arc<H>)>>;

pub struct VeilFs<T: Tree> {
    core: Arc<T>,
    caching: Caching,
    ttl: Duration,
    handles: Mutex<HashMap<u64, Arc<T::Handle>>>,
    /// Frozen sources: open files by node, for reads that come without an OPEN.
    by_ino: Arc<OpenFiles<T::Handle>>,
    next_fh: AtomicU64,
    /// Called once the kernel has initialised the session: the mount answers.
    on_init: Option<Box<dyn FnOnce() + Send>>,
    /// Reads run here, not on rayon's global pool: code in this same process that reads
    /// the mount from global-pool threads (a manifest of the view, a verify) would
    /// otherwise hold every worker while its reads wait for a free one: a deadlock.
    pool: Arc<rayon::ThreadPool>,
    /// Reads handed to the pool and not yet answered: the view is not gone (see the
    /// `Drop`) while one of them still holds a source file open.
    inflight: Arc<AtomicUsize>,
    /// `force_owner`: every entry presented as owned by this uid and gid.
    owner: Option<(u32, u32)>,
}

impl<T: Tree> VeilFs<T> {
    pub fn new(core: Arc<T>, caching: Caching) -> Self {
        VeilFs {
            core,
            caching,
            ttl: caching.ttl(),
            handles: Mutex::new(HashMap::new()),
            by_ino: Arc::new(Mutex::new(VecDeque::with_capacity(OPEN_CACHE))),
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
            inflight: Arc::new(AtomicUsize::new(0)),
            owner: None,
        }
    }

    /// Runs `read` on the pool, counted in `inflight` until it has answered.
    fn spawn_read(&self, read: impl FnOnce() + Send + 'static) {
        /// Uncounts the read however it ends.
        struct Done(Arc<AtomicUsize>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.inflight.fetch_add(1, Ordering::AcqRel);
        let done = Done(Arc::clone(&self.inflight));
        self.pool.spawn(move || {
            let _done = done;
            read()
        });
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

/// The session ends (unmounted) with the view: when this returns, no read of the pool
/// holds a source file open any more, so the snapshot under the view can be unmounted
/// and destroyed at once (a read still running made its `umount` fail as busy). Reads
/// take milliseconds; a read stuck longer than [`DRAIN_LIMIT`] is left, with a warning.
impl<T: Tree> Drop for VeilFs<T> {
    fn drop(&mut self) {
        let start = std::time::Instant::now();
        while self.inflight.load(Ordering::Acquire) > 0 {
            if start.elapsed() > DRAIN_LIMIT {
                tracing::warn!(
                    reads = self.inflight.load(Ordering::Acquire),
                    "reads of the view still running after it ended"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// How long the end of a view waits for reads still running on its pool.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

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
        // Large reads: fewer round trips, more blocks to encrypt in parallel per request
        // (fuser asks for max_pages to match, so a READ carries up to 1 MiB).
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
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
            Ok(a) => reply.entry(&self.ttl, &self.attr(&a), 0),
            Err(e) => {
                log_err("lookup", parent, &e);
                reply.error(e.errno())
            }
        }
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        self.core.forget(ino, nlookup);
    }

    fn batch_forget(&mut self, _req: &Request<'_>, nodes: &[fuser::fuse_forget_one]) {
        for n in nodes {
            self.core.forget(n.nodeid, n.nlookup);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.core.getattr(ino) {
            Ok(mut a) => {
                if ino == ROOT_INO {
                    a.ino = ROOT_INO;
                }
                reply.attr(&self.ttl, &self.attr(&a))
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
        if self.caching == Caching::Frozen {
            // Zero-message opens from now on (module doc); the read opens the file.
            return reply.error(libc::ENOSYS);
        }
        match self.core.open(ino) {
            Ok(h) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.handles
                    .lock()
                    .expect("handles lock")
                    .insert(fh, Arc::new(h));
                reply.opened(fh, 0)
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
        tracing::trace!(ino, offset, size, "read");
        let core = Arc::clone(&self.core);
        if fh == 0 && self.caching == Caching::Frozen {
            // No OPEN came: find or open the file on the pool, not in the request loop.
            let cache = Arc::clone(&self.by_ino);
            self.spawn_read(move || {
                let h = match cached_open(&*core, &cache, ino) {
                    Ok(h) => h,
                    Err(e) => {
                        log_err("open", ino, &e);
                        return reply.error(e.errno());
                    }
                };
                match core.read(&h, offset.max(0) as u64, size) {
                    Ok(d) => reply.data(&d),
                    Err(e) => {
                        log_err("read", ino, &e);
                        reply.error(e.errno())
                    }
                }
            });
            return;
        }
        let Some(h) = self.handles.lock().expect("handles lock").get(&fh).cloned() else {
            return reply.error(libc::EBADF);
        };
        self.spawn_read(move || match core.read(&h, offset.max(0) as u64, size) {
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
        // A real OPENDIR even when frozen (one per directory, cheap): fusermount's
        // auto_unmount decides that the server died by opening the mountpoint, which
        // must then fail with ENOTCONN, not succeed from the kernel's caches.
        let flags = match self.caching {
            Caching::Frozen => fuser::consts::FOPEN_CACHE_DIR | fuser::consts::FOPEN_KEEP_CACHE,
            Caching::Live => 0,
        };
        match self.core.opendir(ino) {
            Ok(()) => reply.opened(0, flags),
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
        let r = self
            .core
            .readdir(ino, offset, false, &mut |eino, next, name, kind, _| {
                reply.add(eino, next, file_type(kind), name)
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("readdir", ino, &e);
                reply.error(e.errno())
            }
        }
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let ttl = self.ttl;
        let owner = self.owner;
        let r = self
            .core
            .readdir(ino, offset, true, &mut |eino, next, name, kind, attr| {
                let mut a = match attr {
                    Some(a) => to_fuse(a),
                    None => return false,
                };
                if let Some((uid, gid)) = owner {
                    a.uid = uid;
                    a.gid = gid;
                }
                a.kind = file_type(kind);
                if eino == ROOT_INO {
                    a.ino = ROOT_INO;
                }
                reply.add(eino, next, name, &ttl, &a, 0)
            });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => {
                log_err("readdirplus", ino, &e);
                reply.error(e.errno())
            }
        }
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

/// The open file of node `ino` for a read without OPEN: from the cache, or opened now
/// and remembered (the oldest falls out).
fn cached_open<T: Tree>(
    core: &T,
    cache: &OpenFiles<T::Handle>,
    ino: u64,
) -> Result<Arc<T::Handle>, super::ViewError> {
    if let Some(h) = cache
        .lock()
        .expect("open cache lock")
        .iter()
        .rev()
        .find(|(i, _)| *i == ino)
        .map(|(_, h)| Arc::clone(h))
    {
        return Ok(h);
    }
    let h = Arc::new(core.open(ino)?);
    let mut c = cache.lock().expect("open cache lock");
    if c.len() >= OPEN_CACHE {
        c.pop_front();
    }
    c.push_back((ino, Arc::clone(&h)));
    Ok(h)
}
