//! [`warm`]: the paths a changes-only transfer will ask for, looked up (and small files
//! read) through the mount from several threads while rsync works through them.
//!
//! rsync's sender looks at its `--files-from` paths one after the other, and on a fresh
//! mount each path is a FUSE round trip (two for a file in a directory nothing has
//! looked at yet), each waiting for the request loop to wake, answer and wake the
//! sender again: about 200 µs apiece on this 2-core machine, half a second for the
//! bench's 1% run (1,000 files in 1,000 directories). Asked from several threads at
//! once, the same lookups keep the loop busy instead of asleep between them: 1,010
//! paths took 0.42 and 0.56 s from one thread, 0.15 and 0.18 s from four. A frozen
//! view lets the kernel keep names, attributes and pages for the life of the mount
//! ([`super::fuse::Caching::Frozen`]), so rsync then finds them all in the kernel.
//!
//! It is only a hint to the kernel's caches: whatever fails here is left for rsync to
//! meet and report.

use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Threads asking at once: enough that the request loop always has the next request
/// waiting (the view's reads run on a pool of their own).
const WARM_THREADS: usize = 4;
/// Files larger than this (encrypted) are left to rsync: a big file is read in large
/// requests with the kernel's own read-ahead, so there is little to gain by reading
/// it twice.
const WARM_FILE_MAX: u64 = 1 << 20;
/// What may be read ahead in all: the pages must still be in the page cache when rsync
/// comes to them.
const WARM_BYTES: u64 = 128 << 20;

/// What [`warm`] did, for the log.
#[derive(Debug)]
pub struct Warmed {
    /// Paths taken from the list (all of them unless stopped).
    pub paths: usize,
    pub files_read: u64,
    pub bytes_read: u64,
    pub secs: f32,
}

/// Looks up every path of `list` (rsync `--files-from` lines, relative to the view
/// mounted at `mountpoint`; `DIR/.` is directory `DIR`, which rsync will list, so it is
/// listed here) and reads the small regular files among them, in `list`'s order, until
/// `stop`.
///
/// It runs beside rsync, not before it: rsync reads the same list in the same order, one
/// path at a time, so the threads here stay ahead of it, and a path they are still
/// asking for when rsync comes to it is asked once (the kernel lets the second lookup
/// wait for the first).
pub fn warm(mountpoint: &Path, list: &[Vec<u8>], stop: &AtomicBool) -> Warmed {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let budget = AtomicU64::new(WARM_BYTES);
    let files_read = AtomicU64::new(0);
    let bytes_read = AtomicU64::new(0);
    std::thread::scope(|s| {
        for i in 0..WARM_THREADS.min(list.len()) {
            let (next, budget, files_read, bytes_read) = (&next, &budget, &files_read, &bytes_read);
            let spawned = std::thread::Builder::new()
                .name(format!("snapveil-warm-{i}"))
                .spawn_scoped(s, move || {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(line) = list.get(i) else { return };
                        if let Some(n) = warm_one(mountpoint, line, budget) {
                            files_read.fetch_add(1, Ordering::Relaxed);
                            bytes_read.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                });
            if let Err(e) = spawned {
                // The threads started so far do the whole list.
                tracing::debug!("warming the view's caches: {e}");
                break;
            }
        }
    });
    Warmed {
        paths: next.into_inner().min(list.len()),
        files_read: files_read.into_inner(),
        bytes_read: bytes_read.into_inner(),
        secs: start.elapsed().as_secs_f32(),
    }
}

/// One `--files-from` line: looked up, listed if it is `DIR/.`, read if it is a small
/// file and `budget` allows; the bytes read, if it was.
fn warm_one(mountpoint: &Path, line: &[u8], budget: &AtomicU64) -> Option<u64> {
    let (rel, list_dir) = match line.strip_suffix(b"/.") {
        Some(dir) => (dir, true),
        None if line == b"." => (&b""[..], true),
        None => (line, false),
    };
    if rel.starts_with(b"/") {
        // Not a path of the view (joined, it would replace the mountpoint).
        return None;
    }
    let path = mountpoint.join(std::ffi::OsStr::from_bytes(rel));
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if list_dir {
        // READDIRPLUS: the entries' names and attributes come with the listing. Only a
        // directory: read_dir would follow a symlink out of the view.
        if meta.is_dir() {
            std::fs::read_dir(&path).ok()?.for_each(drop);
        }
        return None;
    }
    let len = meta.len();
    let take = |b: u64| b.checked_sub(len);
    if !meta.is_file()
        || len > WARM_FILE_MAX
        || budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, take)
            .is_err()
    {
        return None;
    }
    let mut f = std::fs::File::open(&path).ok()?;
    std::io::copy(&mut f, &mut std::io::sink()).ok()
}

#[cfg(test)]
mod tests;
