//! FUSE over io_uring: the view's requests and replies pass through shared buffers, one
//! `io_uring` command per request, instead of a `read` and a `write` on `/dev/fuse`.
//!
//! Linux 6.14 and later offer it when the `fuse` module's `enable_uring` parameter is on
//! (`/sys/module/fuse/parameters/enable_uring`, off by default). fuser 0.15 cannot ask
//! for it (its INIT reply has no second flags word), so where the kernel offers it this
//! module serves the session itself: it answers INIT with `FUSE_OVER_IO_URING`, then
//! registers one queue per possible CPU, each served by a thread pinned to that CPU
//! (the kernel queues a request on the queue of the CPU its caller runs on, so the
//! answer is made where the question was asked). Until every queue is registered, and
//! for what the kernel never sends through the ring (FORGET, INTERRUPT), requests come
//! through `/dev/fuse` as before: that loop stays, and serves everything where
//! registering fails. fuser still mounts, unmounts and pushes pages
//! (`FUSE_NOTIFY_STORE`); the view's code is the same for both transports, and answers
//! through [`super::answer`].
//!
//! Where the kernel does not offer it, or `SNAPVEIL_FUSE_RING=off`, the mount is served
//! by fuser's own loop, as it always was (`view::mount`).

use super::answer::{Answer, DataReply, EmptyReply, Fail, Wire};
use super::fuse::{init, VeilFs};
use super::Tree;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::cell::UnsafeCell;
use std::ffi::OsStr;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether the kernel offers FUSE over io_uring and the user has not turned it off.
pub fn wanted() -> bool {
    if std::env::var("SNAPVEIL_FUSE_RING").is_ok_and(|v| v == "off" || v == "0") {
        return false;
    }
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .is_ok_and(|v| v.trim() == "Y")
}

/// Who may use the mount, as fuser enforces it: `Some(uid)` when only that user may (a
/// mount without `allow_other`, which fuser turns into `allow_other` plus this check
/// because `auto_unmount` needs it).
pub type Owner = Option<u32>;

/// Serves the view on `dev` (the session's `/dev/fuse`) until it is unmounted.
///
/// # Errors
/// Reading `/dev/fuse` failing other than by the unmount.
pub fn serve<T: Tree>(fs: Arc<VeilFs<T>>, dev: OwnedFd, owner: Owner) -> io::Result<()> {
    let dev = Arc::new(dev);
    // Made before INIT is answered: once the ring is agreed on, the kernel holds every
    // request until all queues are registered, so it is only asked for when they exist.
    let mut prepared = match prepare_queues(&dev) {
        Ok(q) => q,
        Err(e) => {
            tracing::warn!("FUSE over io_uring not used: {e}");
            Vec::new()
        }
    };
    let mut queues: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut buf = vec![0u8; MAX_WRITE as usize + 4096];
    let mut answered = 0u64;
    let r = loop {
        let n = match nix::unistd::read(dev.as_raw_fd(), &mut buf) {
            Ok(n) => n,
            // An interrupted request, or a signal: read again.
            Err(
                nix::errno::Errno::ENOENT | nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN,
            ) => continue,
            // Unmounted.
            Err(nix::errno::Errno::ENODEV) => break Ok(()),
            Err(e) => break Err(io::Error::from(e)),
        };
        let Some(h) = pod::<InHeader>(&buf[..n]) else {
            break Err(io::Error::other(format!("a FUSE request of {n} bytes")));
        };
        let rest = &buf[IN_HEADER..n];
        let reply = DevReply(Arc::clone(&dev));
        answered += 1;
        match h.opcode {
            op::INIT => {
                let Some(ring) = answer_init(&h, rest, &reply, !prepared.is_empty())? else {
                    continue;
                };
                if ring {
                    match start_queues(std::mem::take(&mut prepared), &fs, owner, &stop) {
                        Ok(q) => queues = q,
                        Err(e) => {
                            stop.store(true, Ordering::Release);
                            break Err(e);
                        }
                    }
                }
                fs.initialized();
            }
            op::FORGET => {
                if let Some(f) = pod::<ForgetIn>(rest) {
                    fs.forget(h.nodeid, f.nlookup);
                }
            }
            op::BATCH_FORGET => {
                let Some(b) = pod::<BatchForgetIn>(rest) else {
                    continue;
                };
                let ones = rest[size_of::<BatchForgetIn>()..].chunks_exact(size_of::<ForgetOne>());
                for one in ones.take(b.count as usize).filter_map(pod::<ForgetOne>) {
                    fs.forget(one.nodeid, one.nlookup);
                }
            }
            // Not handled (as fuser): ENOSYS tells the kernel to send no more.
            op::INTERRUPT => Answer::new(h.unique, reply).error(libc::ENOSYS),
            op::DESTROY => Answer::new(h.unique, reply).ok(),
            _ => {
                let (args, payload) = rest.split_at(arg_size(h.opcode).min(rest.len()));
                dispatch(&fs, &h, args, payload, owner, reply);
            }
        }
    };
    tracing::debug!(answered, "FUSE device loop ended");
    // The unmount ended the ring too: its commands complete with an error and the
    // queue threads end. One that does not within the limit is left, with a warning,
    // rather than holding the unmount.
    stop.store(true, Ordering::Release);
    let start = Instant::now();
    while !queues.iter().all(|q| q.is_finished()) && start.elapsed() < QUEUE_END_LIMIT {
        std::thread::sleep(Duration::from_millis(5));
    }
    for q in queues {
        if q.is_finished() {
            let _ = q.join();
        } else {
            tracing::warn!("a FUSE ring queue did not end with the mount");
        }
    }
    r
}

/// How long the end of the mount waits for its ring's queue threads.
const QUEUE_END_LIMIT: Duration = Duration::from_secs(5);

/// Answers INIT with what fuser would ask for, plus `FUSE_OVER_IO_URING` when the
/// kernel offers it. Returns whether it was asked for (`None`: a version to renegotiate).
fn answer_init(
    h: &InHeader,
    rest: &[u8],
    reply: &DevReply,
    can_ring: bool,
) -> io::Result<Option<bool>> {
    let Some(i) = pod::<InitIn>(rest) else {
        return Err(io::Error::other("a short FUSE INIT"));
    };
    if i.major < KERNEL_MAJOR {
        Answer::new(h.unique, reply.clone()).error(libc::EPROTO);
        return Err(io::Error::other(format!(
            "the kernel speaks FUSE {}.{}, older than {KERNEL_MAJOR}",
            i.major, i.minor
        )));
    }
    let ext = i.flags & flags::INIT_EXT != 0;
    let ring = can_ring && ext && i.flags2 & flags::OVER_IO_URING_2 != 0;
    let wanted = flags::ASYNC_READ | flags::BIG_WRITES | flags::MAX_PAGES | flags::DO_READDIRPLUS;
    let out = InitOut {
        major: KERNEL_MAJOR,
        minor: KERNEL_MINOR,
        max_readahead: init::MAX_READAHEAD.min(i.max_readahead),
        flags: (i.flags & wanted) | if ring { flags::INIT_EXT } else { 0 },
        max_background: init::MAX_BACKGROUND,
        congestion_threshold: init::CONGESTION_THRESHOLD,
        max_write: MAX_WRITE,
        time_gran: 1,
        max_pages: (MAX_WRITE / PAGE) as u16,
        flags2: if ring { flags::OVER_IO_URING_2 } else { 0 },
        ..InitOut::default()
    };
    Answer::new(h.unique, reply.clone()).data(bytes_of(&out));
    // A kernel of a newer major version sends INIT again, in ours.
    if i.major > KERNEL_MAJOR {
        return Ok(None);
    }
    tracing::debug!(ring, "FUSE INIT answered");
    Ok(Some(ring))
}

/// Answers one request with the view's code: the same for both transports.
fn dispatch<T: Tree, S: Wire>(
    fs: &VeilFs<T>,
    h: &InHeader,
    args: &[u8],
    payload: &[u8],
    owner: Owner,
    s: S,
) {
    let u = h.unique;
    if refused(owner, h.uid, h.opcode) {
        return Answer::new(u, s).error(libc::EACCES);
    }
    match h.opcode {
        op::LOOKUP => {
            let name = payload.split(|b| *b == 0).next().unwrap_or_default();
            fs.lookup(h.nodeid, OsStr::from_bytes(name), Answer::new(u, s))
        }
        op::GETATTR => fs.getattr(h.nodeid, Answer::new(u, s)),
        op::READLINK => fs.readlink(h.nodeid, Answer::new(u, s)),
        op::OPEN => match pod::<OpenIn>(args) {
            Some(o) => fs.open(h.nodeid, o.flags as i32, Answer::new(u, s)),
            None => Answer::new(u, s).error(libc::EIO),
        },
        op::READ | op::READDIR | op::READDIRPLUS => {
            let Some(r) = pod::<ReadIn>(args) else {
                return Answer::new(u, s).error(libc::EIO);
            };
            let offset = r.offset as i64;
            match h.opcode {
                op::READ => fs.read(h.nodeid, r.fh, offset, r.size, Answer::new(u, s)),
                op::READDIR => fs.readdir(h.nodeid, offset, Answer::listing(u, s, r.size as usize)),
                _ => fs.readdirplus(h.nodeid, offset, Answer::listing(u, s, r.size as usize)),
            }
        }
        op::RELEASE => match pod::<ReleaseIn>(args) {
            Some(r) => fs.release(r.fh, Answer::new(u, s)),
            None => Answer::new(u, s).error(libc::EIO),
        },
        op::OPENDIR => fs.opendir(h.nodeid, Answer::new(u, s)),
        op::RELEASEDIR => Answer::new(u, s).ok(),
        op::STATFS => fs.statfs(Answer::new(u, s)),
        op::ACCESS => match pod::<AccessIn>(args) {
            Some(a) => fs.access(a.mask as i32, Answer::new(u, s)),
            None => Answer::new(u, s).error(libc::EIO),
        },
        // What the view does not implement, as fuser answers it.
        _ => Answer::new(u, s).error(libc::ENOSYS),
    }
}

/// Whether a request from `uid` is refused on a mount only `owner` may use (root
/// always may). Operations the kernel may send without the caller's uid pass (fuser's
/// list).
fn refused(owner: Owner, uid: u32, opcode: u32) -> bool {
    owner.is_some_and(|o| uid != o && uid != 0) && !without_uid(opcode)
}

fn without_uid(opcode: u32) -> bool {
    matches!(
        opcode,
        op::READ
            | op::READDIR
            | op::READDIRPLUS
            | op::RELEASE
            | op::RELEASEDIR
            | op::FORGET
            | op::BATCH_FORGET
            | op::WRITE
            | op::FSYNC
            | op::FSYNCDIR
            | op::INIT
            | op::DESTROY
    )
}

/// A reply written to `/dev/fuse`.
#[derive(Clone)]
struct DevReply(Arc<OwnedFd>);

impl Wire for DevReply {
    fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let n = nix::sys::uio::writev(&*self.0, data)?;
        let want: usize = data.iter().map(|d| d.len()).sum();
        if n != want {
            return Err(io::Error::other(format!(
                "FUSE reply: {n} of {want} bytes written"
            )));
        }
        Ok(())
    }
}

// ---- the ring ----

/// Requests a queue holds at once: the loop hands reads to the view's pool and answers
/// from there, so a queue takes new requests while reads are encrypted.
const QUEUE_DEPTH: usize = 8;

/// One queue per possible CPU (the kernel uses the ring only once all of them are
/// registered), with its `io_uring` and buffers. Failing here (io_uring disabled, a
/// seccomp filter, no memory) leaves the view on `/dev/fuse`.
fn prepare_queues(dev: &Arc<OwnedFd>) -> io::Result<Vec<Queue>> {
    (0..possible_cpus())
        .map(|qid| Queue::new(qid, dev))
        .collect()
}

/// Starts a thread per queue, which registers its entries, and waits until every queue
/// has. The kernel holds every request until then, so a queue the kernel refuses ends
/// the mount with an error rather than leave its requests waiting forever.
fn start_queues<T: Tree>(
    prepared: Vec<Queue>,
    fs: &Arc<VeilFs<T>>,
    owner: Owner,
    stop: &Arc<AtomicBool>,
) -> io::Result<Vec<std::thread::JoinHandle<()>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    for queue in prepared {
        let (fs, stop, tx) = (Arc::clone(fs), Arc::clone(stop), tx.clone());
        let qid = queue.qid;
        let queue = Arc::new(queue);
        threads.push(
            std::thread::Builder::new()
                .name(format!("snapveil-ring-{qid}"))
                .spawn(move || queue.run(&fs, owner, &stop, tx))?,
        );
    }
    drop(tx);
    for _ in 0..threads.len() {
        match rx.recv_timeout(REGISTER_LIMIT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::other(
                    "FUSE over io_uring: a queue never registered",
                ))
            }
        }
    }
    tracing::debug!(
        queues = threads.len(),
        depth = QUEUE_DEPTH,
        "FUSE over io_uring"
    );
    Ok(threads)
}

/// How long the mount waits for its queues to register (milliseconds, normally).
const REGISTER_LIMIT: Duration = Duration::from_secs(10);

/// The kernel's `nr_cpu_ids`: one more than the last CPU in
/// `/sys/devices/system/cpu/possible` ("0-1", "0,2-3").
fn possible_cpus() -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .rsplit([',', '-'])
                .next()
                .and_then(|l| l.parse::<usize>().ok())
        })
        .map_or_else(
            || std::thread::available_parallelism().map_or(1, |n| n.get()),
            |last| last + 1,
        )
}

/// One queue of the ring: its `io_uring`, and the buffers of its entries, shared with
/// the kernel.
struct Queue {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    dev: Arc<OwnedFd>,
    /// Held while an entry is pushed: replies come from the pool's threads.
    push: Mutex<()>,
    ents: Box<[Ent]>,
}

/// One entry's buffers: the headers, and the payload (a request's arguments after its
/// own header, a reply's data).
struct Ent {
    headers: Box<UnsafeCell<Headers>>,
    payload: Payload,
    /// What REGISTER hands the kernel: the two buffers' places (read then, not kept).
    iov: [libc::iovec; 2],
}

/// A payload buffer: zeroed memory that the kernel and the entry's reply write through
/// raw pointers. Its pages are real only once used.
struct Payload {
    ptr: *mut u8,
    len: usize,
}

impl Payload {
    fn new(len: usize) -> io::Result<Self> {
        let layout = Self::layout(len)?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Payload { ptr, len })
    }

    /// Aligned to 16 bytes, not to a page: with a larger alignment the allocator zeroes
    /// the buffer itself (posix_memalign and memset), making all of it resident at once;
    /// at 16, `calloc` maps it untouched.
    fn layout(len: usize) -> io::Result<std::alloc::Layout> {
        std::alloc::Layout::from_size_align(len.max(1), 16)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Ok(layout) = Self::layout(self.len) {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.ptr, layout) }
        }
    }
}

// SAFETY: an entry's buffers are written by the kernel before it completes the entry's
// command, read by the queue's thread after that completion, and written by exactly one
// reply (the request's `RingReply`, moved into the view's code) before the commit hands
// them back to the kernel; nothing touches them at the same time. The ring is shared
// through `push` for submissions and read for completions by the queue's thread alone.
unsafe impl Sync for Queue {}
unsafe impl Send for Queue {}

impl Queue {
    fn new(qid: usize, dev: &Arc<OwnedFd>) -> io::Result<Self> {
        let ring =
            IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(2 * QUEUE_DEPTH as u32)?;
        let payload_len = MAX_WRITE as usize;
        let ents = (0..QUEUE_DEPTH)
            .map(|_| {
                let headers = Box::new(UnsafeCell::new(Headers::default()));
                let payload = Payload::new(payload_len)?;
                let iov = [
                    libc::iovec {
                        iov_base: headers.get().cast(),
                        iov_len: size_of::<Headers>(),
                    },
                    libc::iovec {
                        iov_base: payload.ptr.cast(),
                        iov_len: payload.len,
                    },
                ];
                Ok(Ent {
                    headers,
                    payload,
                    iov,
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Queue {
            qid: qid as u16,
            ring,
            dev: Arc::clone(dev),
            push: Mutex::new(()),
            ents,
        })
    }

    /// Registers the entries, then answers what the kernel queues on them until the
    /// mount ends.
    fn run<T: Tree>(
        self: Arc<Self>,
        fs: &Arc<VeilFs<T>>,
        owner: Owner,
        stop: &AtomicBool,
        registered: std::sync::mpsc::Sender<io::Result<()>>,
    ) {
        pin_to_cpu(self.qid as usize);
        ON_QUEUE_THREAD.set(true);
        let early = match self.register() {
            Ok(early) => {
                let _ = registered.send(Ok(()));
                early
            }
            Err(e) => {
                let _ = registered.send(Err(e));
                return;
            }
        };
        let mut live = self.ents.len();
        let mut answered = 0u64;
        for i in early {
            self.answer(i, fs, owner);
            answered += 1;
        }
        while live > 0 && !stop.load(Ordering::Acquire) {
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(qid = self.qid, "FUSE ring: {e}");
                    return;
                }
            }
            // SAFETY: only this thread reads the completion queue.
            let done: Vec<(u64, i32)> = unsafe { self.ring.completion_shared() }
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (i, res) in done {
                if res < 0 {
                    live -= 1;
                    // The mount ended (ENOTCONN, ECONNABORTED) or the ring was cancelled.
                    if ![
                        libc::ENOTCONN,
                        libc::ECONNABORTED,
                        libc::ECANCELED,
                        libc::ENODEV,
                    ]
                    .contains(&-res)
                    {
                        tracing::warn!(
                            qid = self.qid,
                            "FUSE ring entry: {}",
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                    continue;
                }
                self.answer(i as usize, fs, owner);
                answered += 1;
            }
        }
        tracing::debug!(qid = self.qid, answered, "FUSE ring queue ended");
    }

    /// Registers every entry. The kernel takes or refuses a REGISTER as it is submitted,
    /// so a refusal is in the completion queue when the submission returns; requests
    /// already there (the ring became ready at once) are returned, to be answered.
    fn register(&self) -> io::Result<Vec<usize>> {
        for (i, e) in self.ents.iter().enumerate() {
            let sqe = opcode::UringCmd80::new(types::Fd(self.dev.as_raw_fd()), cmd::REGISTER)
                .cmd(self.cmd_req(0))
                .addr(Some(e.iov.as_ptr() as u64))
                .build()
                .user_data(i as u64);
            self.submit(with_len(sqe, 2))?;
        }
        self.ring.submit()?;
        let mut early = Vec::new();
        // SAFETY: only this thread reads the completion queue.
        for c in unsafe { self.ring.completion_shared() } {
            if c.result() < 0 {
                return Err(io::Error::other(format!(
                    "FUSE over io_uring: the kernel refused queue {}: {} (SNAPVEIL_FUSE_RING=off serves the view without it)",
                    self.qid,
                    io::Error::from_raw_os_error(-c.result())
                )));
            }
            early.push(c.user_data() as usize);
        }
        Ok(early)
    }

    /// Answers the request the kernel put in entry `i`.
    fn answer<T: Tree>(self: &Arc<Self>, i: usize, fs: &VeilFs<T>, owner: Owner) {
        let e = &self.ents[i];
        // SAFETY: the kernel completed this entry's command, so the entry is ours until
        // the reply commits it (see `Queue`'s `Sync`). Everything the view needs is
        // copied out first, since the reply writes into the same buffers.
        let headers = unsafe { std::ptr::read(e.headers.get()) };
        let Some(h) = pod::<InHeader>(&headers.in_out) else {
            return;
        };
        let mut payload = [0u8; 4096];
        let n = (headers.ring.payload_sz as usize).min(payload.len());
        // SAFETY: as above; `n` is within the payload buffer.
        unsafe { std::ptr::copy_nonoverlapping(e.payload.ptr, payload.as_mut_ptr(), n) };
        let reply = RingReply {
            queue: Arc::clone(self),
            ent: i,
            commit_id: headers.ring.commit_id,
        };
        let args = &headers.op_in[..arg_size(h.opcode)];
        dispatch(fs, &h, args, &payload[..n], owner, reply);
    }

    fn cmd_req(&self, commit_id: u64) -> [u8; 80] {
        let req = CmdReq {
            flags: 0,
            commit_id,
            qid: self.qid,
            padding: [0; 6],
        };
        let mut cmd = [0u8; 80];
        cmd[..size_of::<CmdReq>()].copy_from_slice(bytes_of(&req));
        cmd
    }

    /// Queues `sqe` and, unless this is the queue's own thread (whose next wait submits
    /// it in the same system call), submits it.
    fn submit(&self, sqe: squeue::Entry128) -> io::Result<()> {
        let _g = self.push.lock().expect("ring push lock");
        // SAFETY: submissions are serialised by `push`; the buffers `sqe` points to
        // live as long as the queue.
        unsafe {
            while self.ring.submission_shared().push(&sqe).is_err() {
                self.ring.submit()?;
            }
        }
        if !ON_QUEUE_THREAD.get() {
            self.ring.submit()?;
        }
        Ok(())
    }
}

thread_local! {
    /// Whether this thread is a queue's own: its replies are submitted by its next wait.
    static ON_QUEUE_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Pins the calling thread to `cpu`, so that the queue of that CPU is answered there.
/// Best effort: a CPU that is offline or outside the cgroup's set leaves it unpinned.
fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// The `len` field of an SQE (the io-uring crate sets only `addr` for a URING_CMD;
/// FUSE's REGISTER takes its two iovecs there, and their count in `len`).
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    // SAFETY: `Entry128` is `repr(C)`: the kernel's 64-byte `io_uring_sqe` then 64
    // bytes of command; `len` is the `u32` at byte 24 of `io_uring_sqe`.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&len.to_ne_bytes());
    unsafe { std::mem::transmute(raw) }
}

/// A reply written into its ring entry and committed (which also fetches the entry's
/// next request).
struct RingReply {
    queue: Arc<Queue>,
    ent: usize,
    commit_id: u64,
}

impl Wire for RingReply {
    fn send(&self, data: &[IoSlice<'_>]) -> io::Result<()> {
        let e = &self.queue.ents[self.ent];
        let total: usize = data.iter().map(|d| d.len()).sum();
        if total < OUT_HEADER || total - OUT_HEADER > e.payload.len {
            return Err(io::Error::other(format!("FUSE reply of {total} bytes")));
        }
        // The out header goes into the headers' first part, the rest into the payload.
        let mut header = [0u8; OUT_HEADER];
        let base = e.payload.ptr;
        let mut at = 0usize;
        for d in data {
            let mut d: &[u8] = d;
            if at < OUT_HEADER {
                let k = (OUT_HEADER - at).min(d.len());
                header[at..at + k].copy_from_slice(&d[..k]);
                at += k;
                d = &d[k..];
            }
            // SAFETY: this reply owns the entry until it commits it (see `Queue`);
            // `at - OUT_HEADER + d.len()` is within the payload, checked above.
            unsafe {
                std::ptr::copy_nonoverlapping(d.as_ptr(), base.add(at - OUT_HEADER), d.len())
            };
            at += d.len();
        }
        // SAFETY: as above.
        unsafe {
            let h = &mut *e.headers.get();
            h.in_out[..OUT_HEADER].copy_from_slice(&header);
            h.ring.payload_sz = (total - OUT_HEADER) as u32;
        }
        let q = &self.queue;
        let sqe = opcode::UringCmd80::new(types::Fd(q.dev.as_raw_fd()), cmd::COMMIT_AND_FETCH)
            .cmd(q.cmd_req(self.commit_id))
            .build()
            .user_data(self.ent as u64);
        q.submit(sqe)
    }
}

// ---- the kernel's ABI (include/uapi/linux/fuse.h) ----

const KERNEL_MAJOR: u32 = 7;
/// The minor version fuser speaks (`abi-7-31`): the kernel then formats everything as
/// it does for fuser's loop.
const KERNEL_MINOR: u32 = 31;
/// The largest WRITE (none come: the view is read-only) and, through `max_pages`, the
/// largest READ: 1 MiB. Each ring entry's payload buffer must hold it.
const MAX_WRITE: u32 = 1 << 20;
const PAGE: u32 = 4096;

mod flags {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const INIT_EXT: u32 = 1 << 30;
    /// `FUSE_OVER_IO_URING` (bit 41), in the second flags word.
    pub const OVER_IO_URING_2: u32 = 1 << (41 - 32);
}

mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
}

mod cmd {
    pub const REGISTER: u32 = 1;
    pub const COMMIT_AND_FETCH: u32 = 2;
}

/// The size of an operation's own header: on `/dev/fuse` it comes right after the
/// common header; on the ring it has its own buffer, and what follows is the payload.
fn arg_size(opcode: u32) -> usize {
    match opcode {
        op::GETATTR => size_of::<GetattrIn>(),
        op::OPEN | op::OPENDIR => size_of::<OpenIn>(),
        op::READ | op::READDIR | op::READDIRPLUS => size_of::<ReadIn>(),
        op::RELEASE | op::RELEASEDIR => size_of::<ReleaseIn>(),
        op::ACCESS => size_of::<AccessIn>(),
        _ => 0,
    }
}

const IN_HEADER: usize = size_of::<InHeader>();
const OUT_HEADER: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InHeader {
    len: u32,
    opcode: u32,
    unique: u64,
    nodeid: u64,
    uid: u32,
    gid: u32,
    pid: u32,
    total_extlen: u16,
    padding: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InitIn {
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
    flags2: u32,
    unused: [u32; 11],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InitOut {
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
    max_background: u16,
    congestion_threshold: u16,
    max_write: u32,
    time_gran: u32,
    max_pages: u16,
    map_alignment: u16,
    flags2: u32,
    max_stack_depth: u32,
    request_timeout: u16,
    unused: [u16; 11],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ForgetIn {
    nlookup: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct BatchForgetIn {
    count: u32,
    dummy: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ForgetOne {
    nodeid: u64,
    nlookup: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GetattrIn {
    getattr_flags: u32,
    dummy: u32,
    fh: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct OpenIn {
    flags: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReadIn {
    fh: u64,
    offset: u64,
    size: u32,
    read_flags: u32,
    lock_owner: u64,
    flags: u32,
    padding: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReleaseIn {
    fh: u64,
    flags: u32,
    release_flags: u32,
    lock_owner: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AccessIn {
    mask: u32,
    padding: u32,
}

/// `struct fuse_uring_req_header`: an entry's headers buffer.
#[repr(C)]
#[derive(Clone, Copy)]
struct Headers {
    /// `fuse_in_header` from the kernel, `fuse_out_header` back.
    in_out: [u8; 128],
    /// The operation's own header.
    op_in: [u8; 128],
    ring: EntInOut,
}

impl Default for Headers {
    fn default() -> Self {
        Headers {
            in_out: [0; 128],
            op_in: [0; 128],
            ring: EntInOut::default(),
        }
    }
}

/// `struct fuse_uring_ent_in_out`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct EntInOut {
    flags: u64,
    commit_id: u64,
    payload_sz: u32,
    padding: u32,
    reserved: u64,
}

/// `struct fuse_uring_cmd_req`, in an SQE's command bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CmdReq {
    flags: u64,
    commit_id: u64,
    qid: u16,
    padding: [u8; 6],
}

/// The ABI's structs: plain integers, no padding, any bit pattern valid.
///
/// # Safety
/// Only for `repr(C)` structs of integers (and arrays of them) without padding.
unsafe trait Pod: Copy {}
macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: a `repr(C)` struct of integers without padding (sizes pinned in tests).
        unsafe impl Pod for $t {}
    )*};
}
pod!(
    InHeader,
    InitIn,
    InitOut,
    ForgetIn,
    BatchForgetIn,
    ForgetOne,
    GetattrIn,
    OpenIn,
    ReadIn,
    ReleaseIn,
    AccessIn,
    CmdReq
);

/// The `T` at the start of `b`, if `b` holds one.
fn pod<T: Pod>(b: &[u8]) -> Option<T> {
    // SAFETY: `T: Pod` takes any bit pattern; the length is checked; unaligned read.
    (b.len() >= size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) })
}

fn bytes_of<T: Pod>(t: &T) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so every byte is initialised.
    unsafe { std::slice::from_raw_parts((t as *const T).cast(), size_of::<T>()) }
}

mod guard;
pub use guard::Guardian;

#[cfg(test)]
mod tests;
