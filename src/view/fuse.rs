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
//! (the READ) after the READDIRPLUS that listed it, and the files after it in its
//! directory are read and encrypted ahead of the reader ([`ReadAhead`]) and pushed into
//! the kernel's page cache, so that most files take no request at all. A live source
//! (`dir:`) gets one-second timeouts and real opens that drop the page cache, so changes
//! show, and no read-ahead.
//!
//! The view's operations answer through [`super::answer`]'s reply traits, so the same
//! code serves fuser's loop on `/dev/fuse` ([`Served`]) and FUSE over io_uring
//! (`view::ring`). fuser 0.15 reads `/dev/fuse` from one thread (`Session::run` takes
//! `&mut self` and cloned device fds are not supported); the ring has a thread per CPU.
//! Either way the work that costs (encrypting reads, opening source files) runs on the
//! pool, so the loops only parse and dispatch.

use super::answer::{
    AttrReply, DataReply, DirPlusReply, DirReply, EmptyReply, EntryReply, OpenReply, Statfs,
    StatfsReply,
};
use super::{Attr, Kind, Tree, ROOT_INO};
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};
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
    on_init: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Reads run here, not on rayon's global pool: code in this same process that reads
    /// the mount from global-pool threads (a manifest of the view, a verify) would
    /// otherwise hold every worker while its reads wait for a free one: a deadlock.
    pool: Arc<rayon::ThreadPool>,
    /// Reads handed to the pool and not yet answered: the view is not gone (see the
    /// `Drop`) while one of them still holds a source file open.
    inflight: Arc<AtomicUsize>,
    /// `force_owner`: every entry presented as owned by this uid and gid.
    owner: Option<(u32, u32)>,
    /// Frozen sources: the files after the one being read, read ahead ([`ReadAhead`]).
    ahead: Option<Arc<ReadAhead<T>>>,
}

impl<T: Tree> VeilFs<T> {
    pub fn new(core: Arc<T>, caching: Caching) -> Self {
        let ahead = (caching == Caching::Frozen).then(|| ReadAhead::start(Arc::clone(&core)));
        VeilFs {
            core,
            caching,
            ttl: caching.ttl(),
            handles: Mutex::new(HashMap::new()),
            by_ino: Arc::new(Mutex::new(VecDeque::with_capacity(OPEN_CACHE))),
            next_fh: AtomicU64::new(1),
            on_init: Mutex::new(None),
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
            ahead,
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
        self.on_init = Mutex::new(Some(Box::new(f)));
        self
    }

    /// Where this view's read-ahead pushes files into the kernel's page cache, once
    /// connected to the session's notifier (frozen sources; `None` for live ones).
    pub fn kernel_pages(&self) -> Option<KernelPages> {
        self.ahead
            .as_ref()
            .map(|ra| KernelPages(Arc::clone(&ra.kernel)))
    }
}

/// Stores a file's content in the kernel's page cache for it (`FUSE_NOTIFY_STORE`):
/// a reader then reads it with no request to the view at all.
pub trait PagePush: Send + Sync {
    /// Stores `data` as the whole content of node `ino`.
    ///
    /// # Errors
    /// The write to the FUSE device failing (e.g. the session ended).
    fn store(&self, ino: u64, data: &[u8]) -> std::io::Result<()>;
}

impl PagePush for fuser::Notifier {
    fn store(&self, ino: u64, data: &[u8]) -> std::io::Result<()> {
        fuser::Notifier::store(self, ino, 0, data)
    }
}

/// A view's read-ahead, waiting for the session's notifier: the session is made from
/// the view, so the notifier exists only after it ([`VeilFs::kernel_pages`]).
pub struct KernelPages(Arc<OnceLock<Box<dyn PagePush>>>);

impl KernelPages {
    /// From now on, files read ahead (but every [`MARK_EVERY`]th) are pushed to `to`.
    pub fn connect(self, to: impl PagePush + 'static) {
        let _ = self.0.set(Box::new(to));
    }
}

/// The session ends (unmounted) with the view: when this returns, no read of the pool
/// holds a source file open any more, so the snapshot under the view can be unmounted
/// and destroyed at once (a read still running made its `umount` fail as busy). Reads
/// take milliseconds; a read stuck longer than [`DRAIN_LIMIT`] is left, with a warning.
impl<T: Tree> Drop for VeilFs<T> {
    fn drop(&mut self) {
        if let Some(ra) = &self.ahead {
            ra.shutdown();
        }
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

impl<T: Tree> VeilFs<T> {
    /// The kernel has initialised the session: the mount answers from now on.
    pub(super) fn initialized(&self) {
        if let Some(f) = self.on_init.lock().expect("on_init lock").take() {
            f();
        }
    }

    pub(super) fn lookup(&self, parent: u64, name: &OsStr, reply: impl EntryReply) {
        match self.core.lookup(parent, name) {
            Ok(a) => reply.entry(&self.ttl, &self.attr(&a), 0),
            Err(e) => {
                log_err("lookup", parent, &e);
                reply.error(e.errno())
            }
        }
    }

    pub(super) fn forget(&self, ino: u64, nlookup: u64) {
        self.core.forget(ino, nlookup);
    }

    pub(super) fn getattr(&self, ino: u64, reply: impl AttrReply) {
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

    pub(super) fn readlink(&self, ino: u64, reply: impl DataReply) {
        match self.core.readlink(ino) {
            Ok(t) => reply.data(&t),
            Err(e) => {
                log_err("readlink", ino, &e);
                reply.error(e.errno())
            }
        }
    }

    pub(super) fn open(&self, ino: u64, flags: i32, reply: impl OpenReply) {
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

    pub(super) fn read(&self, ino: u64, fh: u64, offset: i64, size: u32, reply: impl DataReply) {
        tracing::trace!(ino, offset, size, "read");
        let core = Arc::clone(&self.core);
        if fh == 0 && self.caching == Caching::Frozen {
            if let Some(ra) = &self.ahead {
                if offset == 0 {
                    ra.first_read(ino);
                }
                match ra.take(ino, false) {
                    // Read ahead: answered here, with no hand-off to the pool.
                    Some(Ahead::Hit(d)) => return ra.answer(ino, &d, offset, size, reply),
                    Some(Ahead::Miss) => {}
                    // Being read ahead: wait for it on the pool, not in the loop.
                    None => {
                        let cache = Arc::clone(&self.by_ino);
                        let ra = Arc::clone(ra);
                        return self.spawn_read(move || match ra.take(ino, true) {
                            Some(Ahead::Hit(d)) => ra.answer(ino, &d, offset, size, reply),
                            _ => read_unopened(&*core, &cache, ino, offset, size, reply),
                        });
                    }
                }
            }
            // No OPEN came: find or open the file on the pool, not in the request loop.
            let cache = Arc::clone(&self.by_ino);
            self.spawn_read(move || read_unopened(&*core, &cache, ino, offset, size, reply));
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

    pub(super) fn release(&self, fh: u64, reply: impl EmptyReply) {
        self.handles.lock().expect("handles lock").remove(&fh);
        reply.ok();
    }

    pub(super) fn opendir(&self, ino: u64, reply: impl OpenReply) {
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

    pub(super) fn readdir(&self, ino: u64, offset: i64, mut reply: impl DirReply) {
        let r = self
            .core
            .readdir(ino, offset, false, &mut |eino, next, name, kind, _| {
                reply.add(eino, next, file_type(kind), name)
            });
        match r {
            Ok(()) => reply.done(),
            Err(e) => {
                log_err("readdir", ino, &e);
                reply.error(e.errno())
            }
        }
    }

    pub(super) fn readdirplus(&self, ino: u64, offset: i64, mut reply: impl DirPlusReply) {
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
            Ok(()) => reply.done(),
            Err(e) => {
                log_err("readdirplus", ino, &e);
                reply.error(e.errno())
            }
        }
    }

    pub(super) fn statfs(&self, reply: impl StatfsReply) {
        reply.statfs(&Statfs {
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
            ..Statfs::default()
        });
    }

    pub(super) fn access(&self, mask: i32, reply: impl EmptyReply) {
        if mask & libc::W_OK != 0 {
            reply.error(libc::EROFS)
        } else {
            reply.ok()
        }
    }
}

/// What the kernel is asked for at INIT, whichever transport serves the view
/// ([`Served`] through fuser, or `view::ring`).
pub(super) mod init {
    /// Large reads: fewer round trips, more blocks to encrypt in parallel per request
    /// (a READ then carries up to 1 MiB).
    pub const MAX_READAHEAD: u32 = 1 << 20;
    /// Requests the kernel keeps in flight in the background (read-ahead), and where it
    /// starts to hold writers back.
    pub const MAX_BACKGROUND: u16 = 64;
    pub const CONGESTION_THRESHOLD: u16 = 48;
}

/// A view served by fuser's session loop: the loop owns its filesystem, so it gets a
/// handle, and the view stays reachable for the other transport (`view::ring`).
pub struct Served<T: Tree>(pub Arc<VeilFs<T>>);

impl<T: Tree> Filesystem for Served<T> {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_readahead(init::MAX_READAHEAD);
        let _ = config.set_max_background(init::MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(init::CONGESTION_THRESHOLD);
        // Entries and their attributes in one reply: a `find` or rsync walk then needs no
        // separate LOOKUP per file.
        let _ = config.add_capabilities(fuser::consts::FUSE_DO_READDIRPLUS);
        self.0.initialized();
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        self.0.lookup(parent, name, reply)
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        self.0.forget(ino, nlookup)
    }

    fn batch_forget(&mut self, _req: &Request<'_>, nodes: &[fuser::fuse_forget_one]) {
        for n in nodes {
            self.0.forget(n.nodeid, n.nlookup);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        self.0.getattr(ino, reply)
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        self.0.readlink(ino, reply)
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        self.0.open(ino, flags, reply)
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
        self.0.read(ino, fh, offset, size, reply)
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
        self.0.release(fh, reply)
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        self.0.opendir(ino, reply)
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        reply: ReplyDirectory,
    ) {
        self.0.readdir(ino, offset, reply)
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        reply: fuser::ReplyDirectoryPlus,
    ) {
        self.0.readdirplus(ino, offset, reply)
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        self.0.statfs(reply)
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, mask: i32, reply: ReplyEmpty) {
        self.0.access(mask, reply)
    }
}

/// A read that came without an OPEN (frozen sources), answered.
fn read_unopened<T: Tree>(
    core: &T,
    cache: &OpenFiles<T::Handle>,
    ino: u64,
    offset: i64,
    size: u32,
    reply: impl DataReply,
) {
    let h = match cached_open(core, cache, ino) {
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

/// How many files ahead of a reader are read (frozen sources): enough to keep the read
/// ahead threads busy while the reader reads the files pushed to the kernel (`tar` of
/// the bench's tree: 8.5 and 7.0 s with 16, 6.0 and 6.5 s with 64; 128 no better).
const AHEAD_FILES: usize = 64;
/// Files larger than this (encrypted) are not read ahead: the kernel's own read-ahead
/// and the pool's parallel blocks serve them.
const AHEAD_MAX_BYTES: u64 = 256 << 10;
/// Files tracked at most (oldest dropped). Twice the files ahead: with no more, the
/// files about to be read were dropped to make room for later ones (measured: 32 ahead
/// in 32 slots read slower than none). A file pushed to the kernel is tracked without
/// its content, so what is held is the markers and the files not pushed yet: at worst
/// (every push failing) all of them, 32 MiB.
const AHEAD_SLOTS: usize = 2 * AHEAD_FILES;
/// Threads that read ahead. Their own, not the pool's: a reader waiting for a file
/// read ahead must never wait for a job queued behind itself.
const AHEAD_THREADS: usize = 2;

/// Every this many files queued, one is kept back from the kernel's page cache (a
/// marker): files pushed there are read with no request to the view, so the marker's
/// READ is what tells the read-ahead where the reader is, and moves it on. Half the
/// files ahead: a marker is reached while the other half is still ahead of the reader.
const MARK_EVERY: u64 = AHEAD_FILES as u64 / 2;

/// Files started on last that a reader in order may follow: a few readers at once (the
/// manifest's two hashing threads, a user's `cp -r` beside a run) keep their order.
const RECENT: usize = 4;

/// A file read ahead of the reader, by the state of its read.
enum Slot {
    /// Waiting for a read-ahead thread; a reader that comes first reads it itself.
    /// `push`: once read, also stored in the kernel's page cache (not a marker).
    Queued { push: bool },
    /// Being read: a reader waits for it.
    Running,
    /// Its whole encrypted content.
    Ready(Arc<Vec<u8>>),
    /// In the kernel's page cache: read there with no request. A READ of it all the
    /// same (the kernel did not hold the node, which fuser reports as success, or
    /// dropped the pages) is a miss, read by the reader itself.
    Pushed,
}

#[derive(Default)]
struct Slots {
    by_ino: HashMap<u64, Slot>,
    /// Inos in the order they were queued (some may be gone), for dropping the oldest.
    order: VecDeque<u64>,
    /// Files queued so far: every [`MARK_EVERY`]th is a marker.
    queued: u64,
}

/// What a reader finds of its file.
enum Ahead {
    /// The content, read ahead.
    Hit(Arc<Vec<u8>>),
    /// Not read ahead (or its read ahead failed): read it now.
    Miss,
}

/// Read-ahead across files, for frozen sources. `tar`, rsync's sender and a manifest
/// read a tree one small file after the other, each waiting for its read: one FUSE round
/// trip, a hand-off to the pool, the source's read (from the device, on a fresh
/// snapshot) and the encryption, in turn. The files a reader will read next are the
/// ones after it in its directory's listing, so while it reads, the next files are read
/// and encrypted on threads of their own and stored in the kernel's page cache
/// ([`PagePush`]): the reader then reads them like a local file's cached pages, with no
/// round trip. A marker now and then ([`MARK_EVERY`]) stays in memory instead, answered
/// on the request loop when its READ comes, which is how the read-ahead learns that
/// the reader moved on. Only frozen sources: a file read ahead of a live source could
/// change before it is read.
struct ReadAhead<T: Tree> {
    core: Arc<T>,
    slots: Mutex<Slots>,
    changed: Condvar,
    jobs: Mutex<Option<mpsc::Sender<u64>>>,
    stop: AtomicBool,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The files readers started on last, most recent last ([`ReadAhead::first_read`]).
    recent: Mutex<VecDeque<u64>>,
    /// Reads answered from memory (a debug figure, logged when the view ends).
    hits: AtomicU64,
    /// Where files read ahead go into the kernel's page cache, once connected.
    kernel: Arc<OnceLock<Box<dyn PagePush>>>,
    /// Files pushed into the kernel's page cache (a debug figure).
    pushed: AtomicU64,
}

impl<T: Tree> ReadAhead<T> {
    fn start(core: Arc<T>) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<u64>();
        let ra = Arc::new(ReadAhead {
            core,
            slots: Mutex::new(Slots::default()),
            changed: Condvar::new(),
            jobs: Mutex::new(Some(tx)),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            hits: AtomicU64::new(0),
            kernel: Arc::new(OnceLock::new()),
            pushed: AtomicU64::new(0),
        });
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..AHEAD_THREADS)
            .map(|i| {
                let (ra, rx) = (Arc::clone(&ra), Arc::clone(&rx));
                std::thread::Builder::new()
                    .name(format!("snapveil-ahead-{i}"))
                    .spawn(move || loop {
                        let job = rx.lock().expect("read-ahead queue").recv();
                        match job {
                            Ok(ino) if !ra.stop.load(Ordering::Acquire) => ra.run(ino),
                            _ => return,
                        }
                    })
                    .expect("a read-ahead thread")
            })
            .collect();
        *ra.threads.lock().expect("read-ahead threads") = threads;
        ra
    }

    /// Reads file `ino` ahead, unless a reader took it first, and pushes it into the
    /// kernel's page cache unless it is a marker.
    fn run(&self, ino: u64) {
        let push = {
            let mut s = self.slots.lock().expect("read-ahead slots");
            let Some(slot) = s.by_ino.get_mut(&ino) else {
                return;
            };
            let Slot::Queued { push } = *slot else {
                return;
            };
            *slot = Slot::Running;
            push
        };
        let got = self.core.read_small(ino, AHEAD_MAX_BYTES);
        let mut s = self.slots.lock().expect("read-ahead slots");
        let mut ready = None;
        if let Some(slot) = s.by_ino.get_mut(&ino) {
            match got {
                Ok(Some(data)) if matches!(slot, Slot::Running) => {
                    let data = Arc::new(data);
                    *slot = Slot::Ready(Arc::clone(&data));
                    ready = Some(data);
                }
                // Too big, not a file, or an error: the reader's own read says which.
                _ => {
                    s.by_ino.remove(&ino);
                }
            }
        }
        drop(s);
        // Readers waiting for it first: a reader whose READ is in flight holds the
        // pages locked that the push would fill, so pushing before they are answered
        // would wait for them forever.
        self.changed.notify_all();
        let (Some(data), Some(kernel)) = (ready, self.kernel.get()) else {
            return;
        };
        if !push || data.is_empty() {
            return;
        }
        match kernel.store(ino, &data) {
            Ok(()) => {
                self.pushed.fetch_add(1, Ordering::Relaxed);
                // Its memory goes unless a reader holds it (then it forgets it itself).
                let mut s = self.slots.lock().expect("read-ahead slots");
                if let Some(slot @ Slot::Ready(_)) = s.by_ino.get_mut(&ino) {
                    *slot = Slot::Pushed;
                }
            }
            Err(e) => tracing::debug!(ino, "not pushed to the kernel's cache: {e}"),
        }
    }

    /// A reader started on file `ino`. Only a reader going through a directory in
    /// order is read ahead of: one whose file was read ahead, or follows a file just
    /// started (by it or, with several readers, by another). A reader jumping from
    /// directory to directory (rsync sending a list of changed files) would waste every
    /// file read ahead of it.
    fn first_read(&self, ino: u64) {
        // The common case first: the file was read ahead (one lookup, no listing).
        let ahead = self
            .slots
            .lock()
            .expect("read-ahead slots")
            .by_ino
            .contains_key(&ino);
        let in_order = {
            let mut recent = self.recent.lock().expect("read-ahead recent");
            let follows = ahead
                || recent
                    .iter()
                    .any(|&prev| self.core.next_files(prev, 1).first() == Some(&ino));
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(ino);
            follows
        };
        if in_order {
            self.schedule(ino);
        }
    }

    /// Queues the files after `ino` that are not queued yet; drops the oldest beyond
    /// [`AHEAD_SLOTS`].
    fn schedule(&self, ino: u64) {
        let next = self.core.next_files(ino, AHEAD_FILES);
        if next.is_empty() {
            return;
        }
        let jobs = self.jobs.lock().expect("read-ahead queue");
        let Some(tx) = jobs.as_ref() else {
            return;
        };
        let mut s = self.slots.lock().expect("read-ahead slots");
        for n in next {
            if s.by_ino.contains_key(&n) {
                continue;
            }
            let push = !s.queued.is_multiple_of(MARK_EVERY);
            s.queued += 1;
            s.by_ino.insert(n, Slot::Queued { push });
            s.order.push_back(n);
            let _ = tx.send(n);
        }
        while s.by_ino.len() > AHEAD_SLOTS {
            let Some(old) = s.order.pop_front() else {
                break;
            };
            s.by_ino.remove(&old);
        }
        if s.order.len() > 4 * AHEAD_SLOTS {
            let Slots { by_ino, order, .. } = &mut *s;
            order.retain(|i| by_ino.contains_key(i));
        }
    }

    /// What a reader of `ino` finds: the content read ahead, or a miss, after which the
    /// reader reads the file itself. While the file is being read ahead: with `wait`,
    /// waits for it; without, `None` (the request loop does not wait).
    fn take(&self, ino: u64, wait: bool) -> Option<Ahead> {
        let mut s = self.slots.lock().expect("read-ahead slots");
        loop {
            match s.by_ino.get(&ino) {
                None => return Some(Ahead::Miss),
                Some(Slot::Queued { .. } | Slot::Pushed) => {
                    s.by_ino.remove(&ino);
                    return Some(Ahead::Miss);
                }
                Some(Slot::Ready(d)) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Some(Ahead::Hit(Arc::clone(d)));
                }
                Some(Slot::Running) if !wait => return None,
                Some(Slot::Running) => {
                    s = self.changed.wait(s).expect("read-ahead slots");
                }
            }
        }
    }

    /// Answers a read of `ino` from `data` (its whole content); forgets it once read to
    /// its end (the kernel keeps the pages).
    fn answer(&self, ino: u64, data: &[u8], offset: i64, size: u32, reply: impl DataReply) {
        let part = slice(data, offset, size);
        if offset.max(0) as usize + part.len() >= data.len() {
            self.slots
                .lock()
                .expect("read-ahead slots")
                .by_ino
                .remove(&ino);
        }
        reply.data(part);
    }

    /// Stops the threads, once their current file is read: no read ahead holds a
    /// source file open when this returns.
    fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.jobs.lock().expect("read-ahead queue").take();
        for t in self.threads.lock().expect("read-ahead threads").drain(..) {
            let _ = t.join();
        }
        tracing::debug!(
            hits = self.hits.load(Ordering::Relaxed),
            pushed = self.pushed.load(Ordering::Relaxed),
            "read ahead ended"
        );
    }
}

/// The slice `[offset, offset+size)` of `data`.
fn slice(data: &[u8], offset: i64, size: u32) -> &[u8] {
    let start = (offset.max(0) as usize).min(data.len());
    &data[start..(start + size as usize).min(data.len())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{AddEntry, ViewError};
    use std::sync::mpsc::{Receiver, SyncSender};
    use std::time::Duration;

    /// Files 2..=N in one directory, in order; file `i` holds `i` repeated `i` times
    /// (file 100 is too big to read ahead). Reads ahead report on `started` and, when
    /// `gate` is set, wait for a token before they return.
    struct Files {
        n: u64,
        started: Mutex<SyncSender<u64>>,
        gate: Option<Mutex<Receiver<()>>>,
        open: AtomicUsize,
    }

    impl Tree for Files {
        type Handle = ();
        fn lookup(&self, _: u64, _: &OsStr) -> Result<Attr, ViewError> {
            Err(ViewError::NotFound)
        }
        fn getattr(&self, _: u64) -> Result<Attr, ViewError> {
            Err(ViewError::NotFound)
        }
        fn opendir(&self, _: u64) -> Result<(), ViewError> {
            Err(ViewError::NotFound)
        }
        fn readdir(&self, _: u64, _: i64, _: bool, _: &mut AddEntry<'_>) -> Result<(), ViewError> {
            Err(ViewError::NotFound)
        }
        fn readlink(&self, _: u64) -> Result<Vec<u8>, ViewError> {
            Err(ViewError::NotFound)
        }
        fn open(&self, _: u64) -> Result<(), ViewError> {
            Ok(())
        }
        fn read(&self, _: &(), _: u64, _: u32) -> Result<Vec<u8>, ViewError> {
            Err(ViewError::NotFound)
        }
        fn next_files(&self, ino: u64, n: usize) -> Vec<u64> {
            (ino + 1..=self.n).take(n).collect()
        }
        fn read_small(&self, ino: u64, max: u64) -> Result<Option<Vec<u8>>, ViewError> {
            self.open.fetch_add(1, Ordering::SeqCst);
            let _ = self.started.lock().unwrap().send(ino);
            if let Some(g) = &self.gate {
                let _ = g.lock().unwrap().recv_timeout(Duration::from_secs(10));
            }
            let got = (ino < 100 && ino <= max).then(|| vec![ino as u8; ino as usize]);
            self.open.fetch_sub(1, Ordering::SeqCst);
            Ok(got)
        }
    }

    fn files(n: u64, gated: bool) -> (Arc<Files>, Receiver<u64>, Option<SyncSender<()>>) {
        let (stx, srx) = mpsc::sync_channel(1000);
        let (gtx, grx) = mpsc::sync_channel(1000);
        let f = Files {
            n,
            started: Mutex::new(stx),
            gate: gated.then(|| Mutex::new(grx)),
            open: AtomicUsize::new(0),
        };
        (Arc::new(f), srx, gated.then_some(gtx))
    }

    fn wait_ready(ra: &ReadAhead<Files>, ino: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !matches!(
            ra.slots.lock().unwrap().by_ino.get(&ino),
            Some(Slot::Ready(_) | Slot::Pushed)
        ) {
            assert!(
                std::time::Instant::now() < deadline,
                "{ino} never read ahead"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_files_after_a_read_one_are_read_ahead_and_answered_from_memory() {
        let (f, started, _) = files(100, false);
        let ra = ReadAhead::start(Arc::clone(&f) as Arc<Files>);
        ra.schedule(1);
        for ino in 2..2 + AHEAD_FILES as u64 {
            wait_ready(&ra, ino);
        }
        assert!(
            ra.slots.lock().unwrap().by_ino.len() == AHEAD_FILES,
            "only the next {AHEAD_FILES} files are read ahead"
        );
        match ra.take(5, false) {
            Some(Ahead::Hit(d)) => {
                assert_eq!(*d, vec![5u8; 5]);
                assert_eq!(slice(&d, 1, 2), &[5, 5]);
                assert_eq!(slice(&d, 4, 100), &[5]);
                assert!(slice(&d, 9, 100).is_empty());
            }
            _ => panic!("file 5 was read ahead"),
        }
        // Scheduling again from the next file queues only what is new.
        let before: Vec<u64> = started.try_iter().collect();
        assert_eq!(before.len(), AHEAD_FILES);
        ra.schedule(2);
        wait_ready(&ra, 2 + AHEAD_FILES as u64);
        assert_eq!(
            started.try_iter().collect::<Vec<_>>(),
            vec![2 + AHEAD_FILES as u64]
        );
        ra.shutdown();
        assert_eq!(ra.hits.load(Ordering::SeqCst), 1);
    }

    /// Records what the read-ahead pushed into the "kernel's" page cache.
    #[derive(Default)]
    struct Pushed(Mutex<Vec<(u64, usize)>>);

    impl PagePush for Arc<Pushed> {
        fn store(&self, ino: u64, data: &[u8]) -> std::io::Result<()> {
            self.0.lock().unwrap().push((ino, data.len()));
            Ok(())
        }
    }

    #[test]
    fn files_read_ahead_go_to_the_kernel_but_the_markers_that_move_it_on() {
        let (f, _, _) = files(100, false);
        let ra = ReadAhead::start(Arc::clone(&f) as Arc<Files>);
        let pushed = Arc::new(Pushed::default());
        KernelPages(Arc::clone(&ra.kernel)).connect(Arc::clone(&pushed));
        ra.schedule(1);
        for ino in 2..2 + AHEAD_FILES as u64 {
            wait_ready(&ra, ino);
        }
        // The reader reaches the second marker: its READ (a hit) queues what follows.
        let marker = 2 + MARK_EVERY;
        ra.first_read(marker);
        assert!(matches!(ra.take(marker, false), Some(Ahead::Hit(_))));
        for ino in 2 + AHEAD_FILES as u64..=marker + AHEAD_FILES as u64 {
            wait_ready(&ra, ino);
        }
        ra.shutdown();
        let mut got = pushed.0.lock().unwrap().clone();
        got.sort();
        // Every file read ahead, with its whole content, but every MARK_EVERY-th queued.
        let want: Vec<(u64, usize)> = (2..=marker + AHEAD_FILES as u64)
            .filter(|i| (i - 2) % MARK_EVERY != 0)
            .map(|i| (i, i as usize))
            .collect();
        assert_eq!(got, want);
        assert_eq!(ra.pushed.load(Ordering::SeqCst), want.len() as u64);
        // What was pushed is no longer held; the markers are, until read.
        for (ino, slot) in &ra.slots.lock().unwrap().by_ino {
            let marker = (ino - 2) % MARK_EVERY == 0;
            assert!(
                matches!(
                    (marker, slot),
                    (true, Slot::Ready(_)) | (false, Slot::Pushed)
                ),
                "file {ino}"
            );
        }
    }

    #[test]
    fn a_reader_first_reads_itself_and_a_reader_during_waits() {
        let (f, started, gate) = files(100, true);
        let gate = gate.unwrap();
        let ra = ReadAhead::start(Arc::clone(&f) as Arc<Files>);
        ra.schedule(1);
        // Both threads hold files 2 and 3 at the gate; 4 and on are still queued.
        let mut running = vec![
            started.recv_timeout(Duration::from_secs(10)).unwrap(),
            started.recv_timeout(Duration::from_secs(10)).unwrap(),
        ];
        running.sort();
        assert_eq!(running, [2, 3]);
        assert!(
            matches!(ra.take(4, false), Some(Ahead::Miss)),
            "queued: a miss"
        );
        assert!(
            ra.take(2, false).is_none(),
            "running: the loop does not wait"
        );
        let waiter = {
            let ra = Arc::clone(&ra);
            std::thread::spawn(move || match ra.take(2, true) {
                Some(Ahead::Hit(d)) => d.len(),
                _ => 0,
            })
        };
        for _ in 0..AHEAD_FILES {
            gate.send(()).unwrap();
        }
        assert_eq!(waiter.join().unwrap(), 2, "the waiting reader gets file 2");
        // File 4 was taken by its reader: no thread read it ahead after that.
        ra.shutdown();
        let read: Vec<u64> = started.try_iter().collect();
        assert!(!read.contains(&4), "{read:?}");
        assert_eq!(f.open.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn only_a_reader_in_order_is_read_ahead_of() {
        let (f, started, _) = files(200, false);
        let ra = ReadAhead::start(Arc::clone(&f) as Arc<Files>);
        // Jumping about (a list of changed files): nothing read ahead.
        for ino in [10, 50, 90, 130, 170, 12] {
            ra.first_read(ino);
        }
        assert!(ra.slots.lock().unwrap().by_ino.is_empty());
        // 20 then 21: in order, so the files after 21 are read ahead...
        ra.first_read(20);
        ra.first_read(21);
        wait_ready(&ra, 22);
        assert!(ra
            .slots
            .lock()
            .unwrap()
            .by_ino
            .contains_key(&(21 + AHEAD_FILES as u64)));
        // ...and a file read ahead keeps it going, even after another reader's start.
        ra.first_read(150);
        ra.first_read(22);
        wait_ready(&ra, 22 + AHEAD_FILES as u64);
        ra.shutdown();
        let read: Vec<u64> = started.try_iter().collect();
        assert_eq!(read.len(), AHEAD_FILES + 1, "{read:?}");
        assert!(read
            .iter()
            .all(|i| (22..=22 + AHEAD_FILES as u64).contains(i)));
    }

    #[test]
    fn big_files_are_not_kept_and_old_ones_make_room() {
        let (f, _, _) = files(200, false);
        let ra = ReadAhead::start(Arc::clone(&f) as Arc<Files>);
        // Files 90..=105 ahead of 89: 100 and on are "too big" here, so nothing is kept.
        ra.schedule(89);
        for ino in 90..100 {
            wait_ready(&ra, ino);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ra.slots.lock().unwrap().by_ino.keys().any(|i| *i >= 100) {
            assert!(std::time::Instant::now() < deadline, "big files kept");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Read ahead from far later files: the slots never exceed the cap.
        for ino in (0..80).step_by(5) {
            ra.schedule(ino);
            assert!(ra.slots.lock().unwrap().by_ino.len() <= AHEAD_SLOTS);
        }
        ra.shutdown();
        assert_eq!(f.open.load(Ordering::SeqCst), 0);
    }
}
