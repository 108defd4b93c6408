//! A first run into an empty `current/` on this machine, written by this process as the
//! view is walked, instead of by rsync through the mount.
//!
//! Into an empty `current/` rsync has nothing to compare and nothing to keep as a
//! generation: it copies. Through the mount that copy costs a FUSE round trip per
//! lookup and small read, the kernel's page cache twice over, and a pipe between rsync's
//! sender and receiver; on the bench's 100,000 files the mount and rsync kept both cores
//! busy for twice plain rsync's time (issue 13). Here the walk's entries are written as
//! they are found: directories, symlinks and special files on the walking thread, in
//! path order; regular files on [`WORKERS`] threads, [`BATCH`] at a time, each read from
//! the source, encrypted on that thread and written. Reading a fresh
//! snapshot's small files is mostly waiting for the device, which several readers
//! overlap.
//!
//! What lands is what rsync `--archive --numeric-ids` makes of the view: the same names
//! and bytes (the view's core makes both), mode, owner and group (as root, as rsync),
//! and mtime to the nanosecond, a directory's set once everything in it is written. The run's
//! manifest is summed from the bytes as they are written, in path order, so nothing is
//! read a second time. Only for a frozen source with no `rsync_args` (a copy of rsync's
//! behaviour under options of the user's own would be a guess): anything else goes
//! through rsync as before.
//!
//! Files are created in place, not under a temporary name renamed after (`current/` is
//! empty, so nothing is replaced; the renames were 8% of a run's CPU). A file gets its
//! mtime last, and a worker that fails removes the file it was writing. If the run stops
//! half way, `current/` is no longer empty, so the next run makes a full pass with
//! rsync, whose quick check resends every file whose size or mtime is not the source's:
//! a file cut short by a killed run has fewer bytes and this run's mtime.

use crate::view::{Attr, Kind, Resolved, ViewCore, ViewError};
use sha1::{Digest, Sha1};
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Threads writing files. On this 2-core machine the bench's fresh snapshot is read
/// from a loop device: `cat` of its 100,000 files took 14.4 s from one reader, 7.3 s
/// from two and 5.0 s from eight. A first run of the bench's tree took 7.3–8.1 s with
/// four, six or eight (three runs each, one outlier of 14.9 s with four).
const WORKERS: usize = 6;
/// Files handed out but not yet in the manifest: their paths are what the seed holds,
/// whatever the tree's size.
const WINDOW: usize = 1024;
/// How much of a file is read and encrypted at a time.
const CHUNK: u64 = 1 << 20;
/// Files handed to a worker at once (fewer if they add up to [`CHUNK`] first): one
/// wakeup of a worker, and of the walking thread for their sums, per batch, not per file.
const BATCH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("interrupted by {}", crate::signals::last_signal_name())]
    Cancelled,
    #[error("a thread writing files into current/ panicked")]
    Panicked,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SeedError + '_ {
    move |source| SeedError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the seed wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Seeded {
    /// Regular files.
    pub files: u64,
    /// Their encrypted bytes.
    pub bytes: u64,
    /// Every entry below `current/`, whatever its kind.
    pub entries: u64,
}

/// What a directory gets once everything in it is written, and a file once its bytes
/// are.
#[derive(Clone, Copy)]
pub(super) struct Meta {
    perm: u32,
    uid: u32,
    gid: u32,
    pub(super) mtime: SystemTime,
}

impl Meta {
    pub(super) fn of(a: &Attr) -> Self {
        Meta {
            perm: u32::from(a.perm) & 0o7777,
            uid: a.uid,
            gid: a.gid,
            mtime: a.mtime,
        }
    }

    pub(super) fn mtime(&self) -> nix::sys::time::TimeSpec {
        let ns = match self.mtime.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        };
        nix::sys::time::TimeSpec::new(
            ns.div_euclid(1_000_000_000) as i64,
            ns.rem_euclid(1_000_000_000) as i64,
        )
    }

    /// [`Meta::apply`] through an open file.
    pub(super) fn apply_to(&self, f: &fs::File, p: &Path, as_root: bool) -> Result<(), SeedError> {
        use std::os::fd::AsRawFd;
        let err = |what: &str, e: nix::Error| SeedError::Io {
            path: p.to_path_buf(),
            source: std::io::Error::other(format!("{what}: {e}")),
        };
        if as_root {
            nix::unistd::fchown(f.as_raw_fd(), Some(self.uid.into()), Some(self.gid.into()))
                .map_err(|e| err("chown", e))?;
        } else {
            // As rsync -g does without root: the group, where this user may give it.
            let _ = nix::unistd::fchown(f.as_raw_fd(), None, Some(self.gid.into()));
        }
        f.set_permissions(fs::Permissions::from_mode(self.perm))
            .map_err(io(p))?;
        nix::sys::stat::futimens(
            f.as_raw_fd(),
            &nix::sys::time::TimeSpec::UTIME_OMIT,
            &self.mtime(),
        )
        .map_err(|e| err("futimens", e))
    }

    /// Owner and group (as root; otherwise the group where allowed), mode, then mtime,
    /// by path, not following a symlink: chown clears the set-id bits, so the mode comes
    /// after it.
    pub(super) fn apply(&self, p: &Path, as_root: bool, symlink: bool) -> Result<(), SeedError> {
        let err = |what: &str, e: nix::Error| SeedError::Io {
            path: p.to_path_buf(),
            source: std::io::Error::other(format!("{what}: {e}")),
        };
        let owner = |uid: Option<u32>| {
            nix::unistd::fchownat(
                None,
                p,
                uid.map(Into::into),
                Some(self.gid.into()),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
        };
        if as_root {
            owner(Some(self.uid)).map_err(|e| err("chown", e))?;
        } else {
            // As rsync -g does without root: the group, where this user may give it.
            let _ = owner(None);
        }
        if !symlink {
            fs::set_permissions(p, fs::Permissions::from_mode(self.perm)).map_err(io(p))?;
        }
        nix::sys::stat::utimensat(
            None,
            p,
            &nix::sys::time::TimeSpec::UTIME_OMIT,
            &self.mtime(),
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .map_err(|e| err("utimensat", e))
    }
}

/// One file for a worker.
struct Job {
    n: u64,
    /// Its path under `current/`.
    dest: PathBuf,
    place: Resolved,
    meta: Meta,
    /// Only summed, not written: the key config, which the run sends before anything
    /// else ([`crate::job`]).
    sum_only: bool,
}

type Done = Vec<(u64, Result<([u8; 20], u64), SeedError>)>;

/// Feeds the walk's entries to the seed; see [`run`].
pub struct Feed<'a> {
    current: &'a Path,
    as_root: bool,
    jobs: Option<mpsc::SyncSender<Vec<Job>>>,
    /// Files not yet handed out, and their size.
    batch: (Vec<Job>, u64),
    done: mpsc::Receiver<Done>,
    /// Files handed out, from ordinal `base` on: view path, and sum once written.
    window: VecDeque<(Vec<u8>, Option<[u8; 20]>)>,
    base: u64,
    /// Directories entered and not yet left, the innermost last: view path, metadata.
    open: Vec<(Vec<u8>, Meta)>,
    /// Directories left, to be finished once the files handed out before they were left
    /// (ordinal below the first number) are written.
    left: VecDeque<(u64, Vec<u8>, Meta)>,
    sha1: std::io::BufWriter<fs::File>,
    sha1_path: &'a Path,
    stats: Seeded,
    /// The key config's metadata, applied once the run's own copy of it is in place.
    conf: Option<Meta>,
}

impl Feed<'_> {
    fn dest(&self, path: &[u8]) -> PathBuf {
        if path.is_empty() {
            self.current.to_path_buf()
        } else {
            self.current.join(OsStr::from_bytes(path))
        }
    }

    /// One entry of the walk, in path order (the root first).
    ///
    /// # Errors
    /// Writing it, or a file written before it, failed; the run was cancelled.
    pub fn entry(
        &mut self,
        path: &[u8],
        a: &Attr,
        link: Option<&[u8]>,
        place: &Resolved,
    ) -> Result<(), SeedError> {
        if crate::signals::cancelled() {
            return Err(SeedError::Cancelled);
        }
        self.collect(false)?;
        // Directories whose entries are all past: every path under `D` sorts in
        // [`D/`, `D0`), so `D` is left once a path at or past `D0` comes (not at `D.x`,
        // which sorts before `D/`: a long name's `.name` file beside its directory).
        while let Some((d, _)) = self.open.last() {
            let not_past = path.len() > d.len() && path.starts_with(d) && path[d.len()] <= b'/';
            if d.is_empty() || not_past {
                break;
            }
            let (d, m) = self.open.pop().expect("checked above");
            self.left
                .push_back((self.base + self.window.len() as u64, d, m));
        }
        let dest = self.dest(path);
        let meta = Meta::of(a);
        if !path.is_empty() {
            self.stats.entries += 1;
        }
        match a.kind {
            Kind::Dir => {
                if !path.is_empty() {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&dest)
                        .map_err(io(&dest))?;
                }
                self.open.push((path.to_vec(), meta));
            }
            Kind::File => {
                let n = self.base + self.window.len() as u64;
                self.window.push_back((path.to_vec(), None));
                let sum_only = path == crate::crypto::names::CONF_NAME.as_bytes();
                if sum_only {
                    self.conf = Some(meta);
                }
                self.batch.0.push(Job {
                    n,
                    dest,
                    place: place.clone(),
                    meta,
                    sum_only,
                });
                self.batch.1 += a.size;
                if self.batch.0.len() >= BATCH || self.batch.1 >= CHUNK {
                    self.hand_out()?;
                }
                if self.window.len() >= WINDOW {
                    self.hand_out()?;
                    while self.window.len() >= WINDOW {
                        self.collect(true)?;
                    }
                }
            }
            Kind::Symlink => {
                let t = link.unwrap_or_default();
                std::os::unix::fs::symlink(OsStr::from_bytes(t), &dest).map_err(io(&dest))?;
                meta.apply(&dest, self.as_root, true)?;
            }
            Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {
                use nix::sys::stat::{mknod, Mode, SFlag};
                let kind = match a.kind {
                    Kind::Fifo => SFlag::S_IFIFO,
                    Kind::Socket => SFlag::S_IFSOCK,
                    Kind::CharDev => SFlag::S_IFCHR,
                    _ => SFlag::S_IFBLK,
                };
                mknod(&dest, kind, Mode::from_bits_truncate(0o600), a.rdev.into()).map_err(
                    |e| SeedError::Io {
                        path: dest.clone(),
                        source: e.into(),
                    },
                )?;
                meta.apply(&dest, self.as_root, false)?;
            }
        }
        Ok(())
    }

    /// Hands the files batched so far to the workers.
    fn hand_out(&mut self) -> Result<(), SeedError> {
        let (jobs, _) = std::mem::take(&mut self.batch);
        if jobs.is_empty() {
            return Ok(());
        }
        self.jobs
            .as_ref()
            .expect("open until finished")
            .send(jobs)
            .map_err(|_| SeedError::Panicked)
    }

    /// Takes what the workers finished (waiting for one if `wait`), writes the manifest
    /// lines now in order, and finishes the directories now complete.
    fn collect(&mut self, wait: bool) -> Result<(), SeedError> {
        let got = |d: Done,
                   w: &mut VecDeque<_>,
                   base: u64,
                   stats: &mut Seeded|
         -> Result<(), SeedError> {
            for (n, r) in d {
                let (sum, bytes) = r?;
                let slot: &mut (Vec<u8>, Option<[u8; 20]>) = &mut w[(n - base) as usize];
                slot.1 = Some(sum);
                stats.bytes += bytes;
            }
            Ok(())
        };
        if wait {
            let d = self.done.recv().map_err(|_| SeedError::Panicked)?;
            got(d, &mut self.window, self.base, &mut self.stats)?;
        }
        while let Ok(d) = self.done.try_recv() {
            got(d, &mut self.window, self.base, &mut self.stats)?;
        }
        while let Some((p, Some(sum))) = self.window.front() {
            crate::manifest::format_pairs_to(&mut self.sha1, std::iter::once((p, sum)))
                .map_err(io(self.sha1_path))?;
            self.window.pop_front();
            self.base += 1;
            self.stats.files += 1;
        }
        while self.left.front().is_some_and(|(n, _, _)| *n <= self.base) {
            let (_, d, m) = self.left.pop_front().expect("checked above");
            m.apply(&self.dest(&d), self.as_root, false)?;
        }
        Ok(())
    }

    /// Waits for every file, then finishes the directories, `current/` itself last.
    fn finish(mut self) -> Result<Seeded, SeedError> {
        self.hand_out()?;
        drop(self.jobs.take());
        while !self.window.is_empty() {
            self.collect(true)?;
        }
        if let Some(m) = self.conf {
            m.apply(
                &self.dest(crate::crypto::names::CONF_NAME.as_bytes()),
                self.as_root,
                false,
            )?;
        }
        while let Some((d, m)) = self.open.pop() {
            self.left.push_back((self.base, d, m));
        }
        self.collect(false)?;
        self.sha1.flush().map_err(io(self.sha1_path))?;
        Ok(self.stats)
    }
}

/// Writes one file: `(sum, bytes)` of its ciphertext. It is created in place
/// (`current/` was empty, so nothing is replaced) and gets its mtime last: a file cut
/// short by a killed run has this run's mtime and fewer bytes, which rsync's quick check
/// in the next run's full pass sees. On an error it is removed.
fn write_file(
    core: &ViewCore,
    job: &Job,
    as_root: bool,
    stop: &AtomicBool,
) -> Result<([u8; 20], u64), SeedError> {
    let h = core.open_walked_file(&job.place)?;
    let mut out = if job.sum_only {
        None
    } else {
        Some(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&job.dest)
                .map_err(io(&job.dest))?,
        )
    };
    let result = (|| {
        let mut hasher = Sha1::new();
        let (mut off, mut total) = (0u64, 0u64);
        loop {
            if stop.load(Ordering::Relaxed) || crate::signals::cancelled() {
                return Err(SeedError::Cancelled);
            }
            let data = core
                .read_here(&h, off, CHUNK)
                .map_err(|source| SeedError::Read {
                    path: core.source_path(&job.place),
                    source,
                })?;
            if data.is_empty() {
                break;
            }
            hasher.update(&data);
            if let Some(f) = out.as_mut() {
                f.write_all(&data).map_err(io(&job.dest))?;
            }
            off += data.len() as u64;
            total += data.len() as u64;
            if (data.len() as u64) < CHUNK {
                break;
            }
        }
        if let Some(f) = out.take() {
            job.meta.apply_to(&f, &job.dest, as_root)?;
        }
        Ok((
            hasher.finalize().into(),
            if job.sum_only { 0 } else { total },
        ))
    })();
    if result.is_err() && !job.sum_only {
        let _ = fs::remove_file(&job.dest);
    }
    result
}

/// Seeds `current/` (a local target's, empty but for the key config) from the view of
/// `core`, while `walk` walks it and gives each entry to the [`Feed`]; the manifest's
/// lines go to `sha1` (the `.sha1` file of the run, as [`crate::verify::hash_view`]
/// would have written it). The threads are stopped and joined whatever happens; on an
/// error, what was written stays (see the module's doc).
///
/// # Errors
/// What `walk` returns, or a file or directory that could not be written.
pub fn run<T, E: From<SeedError>>(
    core: &ViewCore,
    current: &Path,
    sha1: &Path,
    walk: impl FnOnce(&mut Feed<'_>) -> Result<T, E>,
) -> Result<(T, Seeded), E> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(sha1)
        .map_err(|e| E::from(io(sha1)(e)))?;
    // The key config may still be on its way (sent beside the walk, which creates
    // current/ for it).
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(current)
        .map_err(|e| E::from(io(current)(e)))?;
    let as_root = nix::unistd::geteuid().is_root();
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Vec<Job>>(WORKERS);
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let jobs_rx = Mutex::new(jobs_rx);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for i in 0..WORKERS {
            let (jobs, done, stop) = (&jobs_rx, done_tx.clone(), &stop);
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name(format!("snapveil-seed-{i}"))
                .spawn_scoped(s, move || {
                    let _in = span.enter();
                    loop {
                        let batch = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(b) => b,
                            Err(_) => return,
                        };
                        let mut out = Vec::with_capacity(batch.len());
                        for job in &batch {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                write_file(core, job, as_root, stop)
                            }))
                            .unwrap_or(Err(SeedError::Panicked));
                            let failed = r.is_err();
                            out.push((job.n, r));
                            if failed {
                                break;
                            }
                        }
                        if done.send(out).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| E::from(io(current)(e)))?;
        }
        drop(done_tx);
        let mut feed = Feed {
            current,
            as_root,
            jobs: Some(jobs_tx),
            batch: (Vec::with_capacity(BATCH), 0),
            done: done_rx,
            window: VecDeque::with_capacity(WINDOW),
            base: 0,
            open: Vec::new(),
            left: VecDeque::new(),
            sha1: std::io::BufWriter::with_capacity(1 << 16, file),
            sha1_path: sha1,
            stats: Seeded::default(),
            conf: None,
        };
        let walked = walk(&mut feed);
        let result = walked.and_then(|t| feed.finish().map(|s| (t, s)).map_err(E::from));
        // On an error the workers stop at their next chunk; the feed, dropped, closes
        // their queue, and the scope joins them.
        stop.store(true, Ordering::Relaxed);
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::node_tests::core;
    use std::os::unix::fs::MetadataExt;

    /// Every kind the seed writes itself, files across chunk edges, a read-only
    /// directory and a long name.
    fn tree(root: &Path) {
        let w = |rel: &str, data: &[u8]| {
            let p = root.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data).unwrap();
        };
        for i in 0..40 {
            w(&format!("d{}/f{i}", i % 4), &vec![i as u8; i * 997]);
        }
        w("big", &vec![7u8; (2 * CHUNK + 5) as usize]);
        w("empty", b"");
        w(&format!("{}/x", "L".repeat(200)), b"long\n");
        w("ro/f", b"ro\n");
        std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    }

    /// A temporary directory holding [`tree`] at `src`, and a view of it.
    fn fixture() -> (tempfile::TempDir, PathBuf, ViewCore) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        tree(&src);
        let c = core(&src);
        (t, src, c)
    }

    fn seed_with(
        c: &ViewCore,
        src: &Path,
        current: &Path,
        sha1: &Path,
        stop_after: Option<usize>,
    ) -> Result<Seeded, crate::verify::VerifyError> {
        let walk_file = sha1.with_extension("walk");
        run(c, current, sha1, |feed| {
            let mut seen = 0;
            crate::verify::walk_core(
                c,
                src,
                &walk_file,
                &mut std::io::sink(),
                Some(&mut |p, a, l, r| {
                    seen += 1;
                    if stop_after.is_some_and(|n| seen > n) {
                        // What was handed out is written first, so that something is.
                        feed.hand_out()?;
                        while !feed.window.is_empty() {
                            feed.collect(true)?;
                        }
                        return Err(SeedError::Cancelled.into());
                    }
                    feed.entry(p, a, l, r).map_err(Into::into)
                }),
            )
        })
        .map(|(_, s)| s)
    }

    #[test]
    fn writes_every_entry_and_sums_what_it_wrote_in_path_order() {
        let (t, src, c) = fixture();
        let (current, sha1) = (t.path().join("current"), t.path().join("view.sha1"));
        let s = seed_with(&c, &src, &current, &sha1, None).unwrap();
        // The manifest is the one `sha1sum` makes of what landed, byte for byte.
        let built = crate::manifest::format(&crate::manifest::build(&current).unwrap());
        assert_eq!(fs::read(&sha1).unwrap(), built);
        // 40 + big + empty + the long name's file + ro/f, the directory IVs (root, d0-d3,
        // the long name's, ro) and the long name's `.name` file; no key config in this
        // view.
        assert_eq!(s.files, 44 + 7 + 1);
        let on_disk: u64 = crate::manifest::build(&current)
            .unwrap()
            .iter()
            .map(|e| {
                fs::metadata(current.join(OsStr::from_bytes(&e.path)))
                    .unwrap()
                    .len()
            })
            .sum();
        assert_eq!(s.bytes, on_disk);
        // Directories get the source's mode and mtime once filled; current/ the root's.
        let (ms, mc) = (fs::metadata(&src).unwrap(), fs::metadata(&current).unwrap());
        assert_eq!(
            (ms.mode(), ms.mtime(), ms.mtime_nsec()),
            (mc.mode(), mc.mtime(), mc.mtime_nsec())
        );
        let mut kinds = std::collections::BTreeMap::new();
        for e in walkdir(&current) {
            let m = fs::symlink_metadata(&e).unwrap();
            *kinds.entry(m.mode() & libc::S_IFMT).or_insert(0) += 1;
            if m.is_dir() && m.mode() & 0o777 == 0o555 {
                kinds.entry(0o555).or_insert(0);
            }
        }
        assert_eq!(kinds.get(&libc::S_IFLNK), Some(&1), "{kinds:?}");
        assert_eq!(kinds.get(&libc::S_IFIFO), Some(&1), "{kinds:?}");
        assert!(
            kinds.contains_key(&0o555),
            "the read-only directory: {kinds:?}"
        );
    }

    fn walkdir(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            out.push(p.clone());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                out.extend(walkdir(&p));
            }
        }
        out
    }

    #[test]
    fn a_walk_that_fails_half_way_stops_the_writers_and_leaves_only_whole_files() {
        let (t, src, c) = fixture();
        let (current, sha1) = (t.path().join("current"), t.path().join("view.sha1"));
        let e = seed_with(&c, &src, &current, &sha1, Some(30)).unwrap_err();
        assert!(e.to_string().contains("interrupted"), "{e}");
        // What stays is whole: every file there is the one a complete seed writes.
        let whole = t.path().join("whole");
        seed_with(&c, &src, &whole, &t.path().join("whole.sha1"), None).unwrap();
        let written: Vec<PathBuf> = walkdir(&current)
            .into_iter()
            .filter(|p| fs::symlink_metadata(p).unwrap().is_file())
            .collect();
        assert!(!written.is_empty(), "what was written stays");
        for p in written {
            let rel = p.strip_prefix(&current).unwrap();
            assert_eq!(
                fs::read(&p).unwrap(),
                fs::read(whole.join(rel)).unwrap(),
                "{rel:?}"
            );
        }
    }

    #[test]
    fn an_entry_that_cannot_be_written_is_an_error_naming_it() {
        let (t, src, c) = fixture();
        let (current, sha1) = (t.path().join("current"), t.path().join("view.sha1"));
        seed_with(&c, &src, &current, &sha1, None).unwrap();
        // Into a current/ that is not empty (never done by a run): the first directory
        // is there already.
        let e = seed_with(&c, &src, &current, &sha1, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("writing") && msg.contains(current.to_str().unwrap()),
            "{msg}"
        );
    }
}
