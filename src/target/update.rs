//! A night whose only changes are files rewritten in place, sent into a local
//! `current/` by this process instead of by rsync through the mount.
//!
//! On the bench's tree (issue 13) rsync took 0.6–0.9 s of a 1.7–2.2 s run to send 1,000
//! rewritten files of 16 KB: its sender looks each up and reads it through the mount,
//! and its receiver (rsync 3.4 and later) opens every directory of every path one
//! component at a time, about 64 `openat` a file, before it links the old file into the
//! generation and renames a temporary copy over it. Here the files are looked up in the
//! view's core, read from the snapshot and encrypted on [`WORKERS`] threads, and written
//! as rsync `--archive --numeric-ids --backup --backup-dir` writes them:
//!
//! - a target copy whose size and mtime (to the nanosecond) are the view's is one rsync's
//!   quick check would not send: it only gets the view's owner and mode, if they differ,
//!   and nothing goes to the generation (the run's checksum pass then compares it by
//!   checksum if its ctime says it changed, as after rsync);
//! - for any other, the new ciphertext is written to a temporary name beside it
//!   (`.NAME.svPID-N`) and gets its owner, mode and mtime; the old file is linked into
//!   the generation (`generations/STAMP/PATH`, whose missing directories get the mode and
//!   owner of `current/`'s, as rsync's do; moved there where the filesystem has no hard
//!   links) and the new one renamed over it: `current/PATH` is one whole version, and
//!   the old one is in the generation before it goes;
//! - the directories of the listed paths, `current/` included, then get the view's owner,
//!   mode and mtime (the renames changed their mtime; rsync sets an implied directory's
//!   attributes too).
//!
//! Only as root, and when every listed path is a regular file in the view and already a
//! regular file in `current/`, below directories that are directories (not symlinks): a
//! night that adds, deletes, renames or changes the type of anything lists the
//! directories that changed too, and rsync sends it, with `--delete`, as before (the log
//! says why). Only for a frozen source without `rsync_args`, as the seed
//! ([`crate::target::seed`]).
//!
//! A run killed while it writes (SIGKILL, the OOM killer: a signal it can catch makes
//! it remove its temporary files itself) leaves them in `current/`, where rsync would
//! back them up as deleted files at the next pass over their directory. So before the
//! first one is made, the update names the directories it writes into in a journal in
//! the job's work dir ([`journal`]), and removes the journal when it is over. The next
//! run's start (or `snapveil cleanup`) finds a dead process's journal and removes that
//! process's temporary files from those directories, and nothing else
//! ([`sweep_leftovers`]).

use super::seed::Meta;
use crate::view::{Attr, Kind, ViewCore, ViewError, ROOT_INO};
use sha1::{Digest, Sha1};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Threads reading, encrypting and writing files: a fresh snapshot's files come from
/// the device one per reader (see the seed's `WORKERS`).
const WORKERS: usize = 4;
/// How much of a file is read and encrypted at a time.
const CHUNK: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {path} from the view: {source}")]
    View { path: String, source: ViewError },
    #[error("{0}")]
    Seed(#[from] super::seed::SeedError),
    #[error("interrupted by {}", crate::signals::last_signal_name())]
    Cancelled,
    #[error("a thread writing files into current/ panicked")]
    Panicked,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpdateError + '_ {
    move |source| UpdateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// View paths and the SHA-1 of the ciphertext written for each, sorted by path.
pub type Sums = Vec<(Vec<u8>, [u8; 20])>;

/// What the update wrote.
#[derive(Debug, Default)]
pub struct Updated {
    /// Files rewritten (each with its old version in the generation).
    pub files: u64,
    /// Their encrypted bytes.
    pub bytes: u64,
    /// Listed files whose target copy rsync's quick check would not have sent.
    pub same: u64,
    /// The rewritten files' view paths and the SHA-1 of what was written, by path: the
    /// manifest takes them instead of reading the files again.
    pub sums: Sums,
}

/// Why a list is not only rewrites, for the log; `None` when it is. Cheap: looks at
/// the list alone (the view and the target are looked at by [`run`]).
pub fn plan(list: &[Vec<u8>]) -> Option<&'static str> {
    let dir = |p: &[u8]| p == b"." || p.ends_with(b"/.");
    list.iter()
        .any(|p| dir(p))
        .then_some("directories changed (entries added, deleted, renamed or retyped)")
}

/// One listed file, checked.
struct Item<'a> {
    path: &'a [u8],
    attr: Attr,
    /// Its target copy's size and mtime are the view's.
    same: bool,
}

/// Lookups of the view's core made here, given back (`forget`) when dropped: the
/// kernel never learns of them, and the core keeps a node until every lookup is.
struct Looked<'a> {
    core: &'a ViewCore,
    inos: Vec<u64>,
}

impl Looked<'_> {
    fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<Attr, ViewError> {
        let a = self.core.lookup(parent, OsStr::from_bytes(name))?;
        self.inos.push(a.ino);
        Ok(a)
    }
}

impl Drop for Looked<'_> {
    fn drop(&mut self) {
        let inos = std::mem::take(&mut self.inos);
        // Children before their parents, so that each node can go as it is forgotten.
        for ino in inos.into_iter().rev() {
            self.core.forget(ino, 1);
        }
    }
}

/// This process's journal in `work` (a job's `STATE_DIR/work/JOB`): `update-PID.dirs`,
/// the directories of `current/` it writes temporary files into, each as a path
/// relative to `current/` (`.` for `current/` itself) and a NUL.
pub fn journal(work: &Path) -> PathBuf {
    work.join(format!("{}.dirs", crate::scratch::name("update")))
}

/// The PID of a journal named `update-PID.dirs`.
fn journal_pid(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("update-")?.strip_suffix(".dirs")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `name` is a temporary file name of process `pid`: `.NAME.svPID-N`.
fn is_temp_of(name: &[u8], pid: u32) -> bool {
    let mark = format!(".sv{pid}-");
    let mark = mark.as_bytes();
    let Some(at) = name.windows(mark.len()).rposition(|w| w == mark) else {
        return false;
    };
    let n = &name[at + mark.len()..];
    at > 0 && name[0] == b'.' && !n.is_empty() && n.iter().all(u8::is_ascii_digit)
}

/// Removes what updates killed while writing left in `current`: for each journal in
/// `work` whose process is gone, that process's temporary files (regular files named
/// `.NAME.svPID-N`) in the directories it names, then the journal. A directory that is
/// no longer a directory below `current` (gone, or a symlink on the way) is skipped:
/// nothing is removed through a link. Failures are logged and skipped (the journal then
/// stays, for the next try): a leftover must not stop a backup. Returns what it removed.
pub fn sweep_leftovers(work: &Path, current: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(work) else {
        return removed;
    };
    let Ok(root) = current.canonicalize() else {
        return removed;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(journal_pid) else {
            continue;
        };
        if pid == std::process::id() || crate::scratch::pid_alive(pid) {
            continue;
        }
        let path = e.path();
        let Ok(list) = fs::read(&path) else {
            continue;
        };
        let mut clean = true;
        for rel in list.split(|b| *b == 0).filter(|d| !d.is_empty()) {
            // Only a real directory below current/, reached through no symlink.
            let mut dir = root.clone();
            let mut inside = true;
            for c in Path::new(OsStr::from_bytes(rel)).components() {
                match c {
                    std::path::Component::Normal(n) => dir.push(n),
                    std::path::Component::CurDir => {}
                    _ => inside = false,
                }
            }
            if !inside || dir.canonicalize().ok().as_deref() != Some(dir.as_path()) {
                continue;
            }
            let Ok(names) = fs::read_dir(&dir) else {
                continue;
            };
            for n in names.flatten() {
                let is_file = n.file_type().is_ok_and(|t| t.is_file());
                if !is_file || !is_temp_of(n.file_name().as_bytes(), pid) {
                    continue;
                }
                let tmp = n.path();
                match fs::remove_file(&tmp) {
                    Ok(()) => removed.push(tmp),
                    Err(err) => {
                        clean = false;
                        tracing::warn!(path = %tmp.display(), "cannot remove a killed update's temporary file: {err}");
                    }
                }
            }
        }
        if clean {
            if let Err(err) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), "cannot remove a killed update's journal: {err}");
            }
        }
    }
    removed.sort();
    removed
}

/// Removes the journal when the update is over, however it ends (a kill excepted).
struct Journal(PathBuf);

impl Journal {
    /// Names the directories of `dirs` (relative to `current/`, `""` for itself).
    fn write<'d>(path: &Path, dirs: impl Iterator<Item = &'d [u8]>) -> Result<Self, UpdateError> {
        if let Some(work) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(work)
                .map_err(io(work))?;
        }
        let mut text = Vec::new();
        for d in dirs {
            text.extend_from_slice(if d.is_empty() { b"." } else { d });
            text.push(0);
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io(path))?;
        f.write_all(&text)
            .and_then(|()| f.sync_all())
            .map_err(io(path))?;
        Ok(Journal(path.to_path_buf()))
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.0) {
            tracing::warn!(path = %self.0.display(), "cannot remove the update's journal: {e}");
        }
    }
}

fn parent(p: &[u8]) -> &[u8] {
    p.iter().rposition(|b| *b == b'/').map_or(&[], |i| &p[..i])
}

fn under(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

/// Writes the listed files (`--files-from` lines of a changes-only plan, none a
/// directory: see [`plan`]) from the view of `core` into `current`, their old versions
/// into `generation`, with `journal` ([`journal`]) naming where temporary files are
/// while they may be; `Ok(None)`, with nothing written, when one of them is not a
/// rewrite of a regular file already in `current` (rsync then sends the night).
///
/// # Errors
/// A file could not be read from the view or written; the run was cancelled. What was
/// written stays: each file in `current/` is whole, old or new, and every replaced
/// version is in the generation.
pub fn run(
    core: &ViewCore,
    current: &Path,
    generation: &Path,
    list: &[Vec<u8>],
    journal: &Path,
) -> Result<Option<Updated>, UpdateError> {
    let mut looked = Looked {
        core,
        inos: Vec::new(),
    };
    // Directories of the listed files: view attributes, by path (the root as "").
    let mut dirs: BTreeMap<Vec<u8>, Attr> = BTreeMap::new();
    let mut items = Vec::with_capacity(list.len());
    for path in list {
        let mut ino = ROOT_INO;
        let mut at = 0;
        let mut attr = None;
        for name in path.split(|b| *b == b'/') {
            let here = &path[..at + name.len()];
            let a = match dirs.get(here) {
                Some(a) if a.kind == Kind::Dir && here.len() < path.len() => a.clone(),
                _ => match looked.lookup(ino, name) {
                    Ok(a) => a,
                    Err(ViewError::NotFound) => return not_rewrite(path, "gone from the view"),
                    Err(source) => {
                        return Err(UpdateError::View {
                            path: String::from_utf8_lossy(path).into_owned(),
                            source,
                        })
                    }
                },
            };
            at += name.len() + 1;
            ino = a.ino;
            if here.len() < path.len() {
                if a.kind != Kind::Dir {
                    return not_rewrite(path, "below something not a directory");
                }
                dirs.entry(here.to_vec()).or_insert_with(|| a.clone());
            }
            attr = Some(a);
        }
        let attr = attr.expect("a path has a name");
        if attr.kind != Kind::File {
            return not_rewrite(path, "not a regular file in the view");
        }
        let dest = under(current, path);
        let m = match fs::symlink_metadata(&dest) {
            Ok(m) if m.file_type().is_file() => m,
            _ => return not_rewrite(path, "not a regular file in current/"),
        };
        let t = Meta::of(&attr).mtime();
        let same =
            m.size() == attr.size && m.mtime() == t.tv_sec() && m.mtime_nsec() == t.tv_nsec();
        items.push(Item { path, attr, same });
    }
    if !dirs.contains_key(&b""[..]) {
        dirs.insert(
            Vec::new(),
            core.getattr(ROOT_INO).map_err(|source| UpdateError::View {
                path: ".".into(),
                source,
            })?,
        );
    }
    // current/'s directories must be directories: nothing is written through a link.
    for d in dirs.keys() {
        match fs::symlink_metadata(under(current, d)) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => {
                return not_rewrite(d, "a directory of it is not a directory in current/");
            }
        }
    }
    // Without root a read-only directory cannot take a new file, and owners cannot be
    // given: rsync knows its ways around both.
    if !nix::unistd::geteuid().is_root() {
        return not_rewrite(b".", "not running as root");
    }
    let as_root = true;
    // The generation's directories: made open, and given the mode and owner of
    // current/'s (as rsync makes them; their mtime is when) once every file is in.
    let mut made: BTreeMap<&[u8], bool> = BTreeMap::new();
    if items.iter().any(|i| !i.same) {
        fs::create_dir_all(generation).map_err(io(generation))?;
    }
    for i in items.iter().filter(|i| !i.same) {
        let d = parent(i.path);
        let mut at = 0;
        while at < d.len() {
            let end = d[at..]
                .iter()
                .position(|b| *b == b'/')
                .map_or(d.len(), |n| at + n);
            let sub = &d[..end];
            if !made.contains_key(sub) {
                let g = under(generation, sub);
                let new = match fs::DirBuilder::new().mode(0o700).create(&g) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                    Err(e) => return Err(io(&g)(e)),
                };
                made.insert(sub, new);
            }
            at = end + 1;
        }
    }
    let temps: std::collections::BTreeSet<&[u8]> = items
        .iter()
        .filter(|i| !i.same)
        .map(|i| parent(i.path))
        .collect();
    let _journal = if temps.is_empty() {
        None
    } else {
        Some(Journal::write(journal, temps.into_iter())?)
    };
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let out: Mutex<Updated> = Mutex::new(Updated::default());
    let first_err: Mutex<Option<UpdateError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(items.len()) {
            let span = tracing::Span::current();
            let (next, stop, out, first_err, items) = (&next, &stop, &out, &first_err, &items);
            s.spawn(move || {
                let _in = span.enter();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= items.len() || stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        one(core, current, generation, &items[n], as_root, n)
                    }))
                    .unwrap_or(Err(UpdateError::Panicked));
                    match r {
                        Ok(Some((sum, bytes))) => {
                            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                            o.files += 1;
                            o.bytes += bytes;
                            o.sums.push((items[n].path.to_vec(), sum));
                        }
                        Ok(None) => out.lock().unwrap_or_else(|p| p.into_inner()).same += 1,
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            first_err
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    // The directories last, deepest first (the renames in them changed their mtime).
    for (d, a) in dirs.iter().rev() {
        Meta::of(a).apply(&under(current, d), as_root, false)?;
    }
    for (d, _) in made.iter().rev().filter(|(_, new)| **new) {
        let mut m = Meta::of(&dirs[*d]);
        m.mtime = std::time::SystemTime::now();
        m.apply(&under(generation, d), as_root, false)?;
    }
    let mut out = out.into_inner().unwrap_or_else(|p| p.into_inner());
    out.sums.sort_unstable();
    Ok(Some(out))
}

fn not_rewrite<T>(path: &[u8], why: &str) -> Result<Option<T>, UpdateError> {
    tracing::info!(
        path = %String::from_utf8_lossy(path),
        "rsync sends this night: {why}"
    );
    Ok(None)
}

/// One listed file: `None` when rsync's quick check would not have sent it (its owner
/// and mode set), otherwise the sum and size of the ciphertext written.
fn one(
    core: &ViewCore,
    current: &Path,
    generation: &Path,
    item: &Item<'_>,
    as_root: bool,
    n: usize,
) -> Result<Option<([u8; 20], u64)>, UpdateError> {
    if crate::signals::cancelled() {
        return Err(UpdateError::Cancelled);
    }
    let dest = under(current, item.path);
    let meta = Meta::of(&item.attr);
    if item.same {
        meta.apply(&dest, as_root, false)?;
        return Ok(None);
    }
    let view_err = |source| UpdateError::View {
        path: String::from_utf8_lossy(item.path).into_owned(),
        source,
    };
    let h = core.open(item.attr.ino).map_err(view_err)?;
    let name = dest
        .file_name()
        .expect("a listed path has a name")
        .as_bytes();
    // Short enough for any name: `.` + at most 230 bytes of it + `.sv` + a number.
    let mut tmp_name = b".".to_vec();
    tmp_name.extend_from_slice(&name[..name.len().min(230)]);
    tmp_name.extend_from_slice(format!(".sv{}-{n}", std::process::id()).as_bytes());
    let tmp = dest.with_file_name(OsStr::from_bytes(&tmp_name));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    let written = (|| {
        let mut hasher = Sha1::new();
        let mut off = 0u64;
        loop {
            if crate::signals::cancelled() {
                return Err(UpdateError::Cancelled);
            }
            let data = core.read_here(&h, off, CHUNK).map_err(|e| {
                view_err(ViewError::Io {
                    path: PathBuf::from(OsStr::from_bytes(item.path)),
                    source: e,
                })
            })?;
            if data.is_empty() {
                break;
            }
            hasher.update(&data);
            f.write_all(&data).map_err(io(&tmp))?;
            off += data.len() as u64;
            if (data.len() as u64) < CHUNK {
                break;
            }
        }
        meta.apply_to(&f, &tmp, as_root)?;
        keep_old(&dest, &under(generation, item.path))?;
        fs::rename(&tmp, &dest).map_err(io(&dest))?;
        Ok((hasher.finalize().into(), off))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map(Some)
}

/// The version in `current/` into the generation, once its successor is written: a
/// hard link, as rsync makes it; where the target's filesystem has none, the file itself
/// moved there, as rsync then does (`current/PATH` is missing until the rename that
/// follows). An entry already in the generation is never replaced.
fn keep_old(dest: &Path, old: &Path) -> Result<(), UpdateError> {
    match fs::hard_link(dest, old) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(io(old)(e)),
        Err(_) if fs::symlink_metadata(old).is_ok() => Err(io(old)(std::io::Error::from(
            std::io::ErrorKind::AlreadyExists,
        ))),
        Err(_) => fs::rename(dest, old).map_err(io(old)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::node_tests::core;

    /// `current/` as the seed writes it from the view of `src` (what an earlier run left).
    fn seed(c: &ViewCore, src: &Path, current: &Path) {
        let sha1 = current.with_extension("sha1");
        crate::target::seed::run(c, current, &sha1, |feed| {
            crate::verify::walk_core(
                c,
                src,
                &sha1.with_extension("walk"),
                &mut std::io::sink(),
                Some(&mut |p, a, l, r| feed.entry(p, a, l, r).map_err(Into::into)),
            )
        })
        .unwrap();
    }

    /// Every regular file of `root`, by relative path.
    fn files(root: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
        crate::manifest::build(root)
            .unwrap()
            .into_iter()
            .map(|e| {
                let data = fs::read(under(root, &e.path)).unwrap();
                (e.path, data)
            })
            .collect()
    }

    /// Writes the twelve small files of the fixture's source, file `i` holding `data(i)`.
    fn small_files(src: &Path, data: impl Fn(usize) -> Vec<u8>) {
        for i in 0..12 {
            let p = src.join(format!("d{}/f{i}", i % 3));
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, data(i)).unwrap();
        }
    }

    /// A source, its view, and `current/` as the seed wrote it from that view.
    fn fixture() -> (tempfile::TempDir, PathBuf, ViewCore, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        small_files(&src, |i| vec![i as u8; i * 1000]);
        fs::write(src.join("big"), vec![1u8; (2 * CHUNK + 3) as usize]).unwrap();
        let c = core(&src);
        let current = t.path().join("current");
        seed(&c, &src, &current);
        (t, src, c, current)
    }

    /// Whether this test may run: it needs root, and without it fails (a silent skip
    /// would pass vacuously) unless SNAPVEIL_TEST_SKIP_MISSING=1, as for a missing tool
    /// in tests/util.
    fn as_root(why: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("SNAPVEIL_TEST_SKIP_MISSING").as_deref() == Ok("1") {
            eprintln!("SKIP: not root ({why})");
            return false;
        }
        panic!("{why}: run as root (or set SNAPVEIL_TEST_SKIP_MISSING=1 locally)");
    }

    /// Listed with everything else unchanged, the rewritten files alone are replaced:
    /// `current/` is then what the seed makes of the source now, byte for byte, the
    /// generation holds exactly their old versions, the sums are of what was written,
    /// and the core keeps no node the update looked up.
    #[test]
    fn replaces_the_rewritten_files_and_keeps_their_old_versions() {
        if !as_root("the update runs as root only") {
            return;
        }
        let (t, src, c, current) = fixture();
        let before = files(&current);
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::write(src.join("d1/f4"), vec![9u8; 4000]).unwrap();
        fs::write(src.join("big"), vec![2u8; (2 * CHUNK + 3) as usize]).unwrap();
        let list: Vec<Vec<u8>> = before.keys().cloned().collect();
        let generation = t.path().join("generations/S");
        let u = run(&c, &current, &generation, &list, &journal(t.path()))
            .unwrap()
            .expect("only rewrites");
        assert_eq!((u.files, u.same), (2, list.len() as u64 - 2));
        assert_eq!(c.nodes(), 1, "the lookups are given back");
        let want = t.path().join("want");
        seed(&c, &src, &want);
        let now = files(&current);
        assert_eq!(now, files(&want));
        let kept = files(&generation);
        assert_eq!(kept.len(), 2);
        for (p, data) in &kept {
            assert_eq!(Some(data), before.get(p));
            assert_ne!(Some(data), now.get(p));
        }
        let sums: Vec<_> = u.sums.iter().map(|(p, s)| (p.clone(), *s)).collect();
        let want_sums: Vec<_> = kept
            .keys()
            .map(|p| (p.clone(), <[u8; 20]>::from(Sha1::digest(&now[p]))))
            .collect();
        assert_eq!(sums, want_sums);
        // Over: no journal, no temporary file.
        assert!(!journal(t.path()).exists(), "the journal stays");
        let pid = std::process::id();
        for p in files(&current).keys() {
            let name = p.rsplit(|b| *b == b'/').next().unwrap();
            assert!(!is_temp_of(name, pid), "{}", String::from_utf8_lossy(p));
        }
    }

    /// What an update killed while writing left: its temporary files in the directories
    /// its journal names go, and nothing else (another process's, a name that only looks
    /// like one, a directory, a directory not named, one reached through a symlink or
    /// `..`); a live process's journal and files stay.
    #[test]
    fn a_killed_updates_temporary_files_go_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let (work, current) = (t.path().join("work"), t.path().join("current"));
        for d in ["a/b", "c", "x"] {
            fs::create_dir_all(current.join(d)).unwrap();
        }
        fs::create_dir_all(&work).unwrap();
        std::os::unix::fs::symlink("a", current.join("link")).unwrap();
        let dead = fs::read_to_string("/proc/sys/kernel/pid_max")
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap()
            + 1;
        let mine = std::process::id();
        let dirs = |d: &[&str]| {
            d.iter()
                .flat_map(|d| [d.as_bytes(), b"\0"].concat())
                .collect::<Vec<u8>>()
        };
        fs::write(
            work.join(format!("update-{dead}.dirs")),
            dirs(&[".", "a/b", "link", "../x", "gone"]),
        )
        .unwrap();
        fs::write(work.join(format!("update-{mine}.dirs")), dirs(&["c"])).unwrap();
        let gone = [
            format!(".f.sv{dead}-1"),
            format!("a/b/.g.sv{dead}-22"),
            format!("a/b/..hidden.sv{dead}-3"),
        ];
        let kept = [
            format!("a/.h.sv{dead}-3"),
            format!("a/b/.g.sv{mine}-1"),
            format!("a/b/g.sv{dead}-1"),
            format!("a/b/.g.sv{dead}-x"),
            format!("a/b/.g.sv{dead}-"),
            format!(".sv{dead}-1"),
            format!("c/.k.sv{mine}-1"),
            format!("c/.k.sv{dead}-1"),
            format!("x/.y.sv{dead}-1"),
            "a/b/f".to_string(),
        ];
        for f in gone.iter().chain(&kept) {
            fs::write(current.join(f), b"x").unwrap();
        }
        fs::create_dir(current.join(format!("a/b/.d.sv{dead}-4"))).unwrap();
        let removed = sweep_leftovers(&work, &current);
        let root = current.canonicalize().unwrap();
        let mut want: Vec<PathBuf> = gone.iter().map(|f| root.join(f)).collect();
        want.sort();
        assert_eq!(removed, want);
        for f in &kept {
            assert!(current.join(f).exists(), "{f} was removed");
        }
        assert!(current.join(format!("a/b/.d.sv{dead}-4")).is_dir());
        assert!(
            !work.join(format!("update-{dead}.dirs")).exists(),
            "the dead journal stays"
        );
        assert!(
            work.join(format!("update-{mine}.dirs")).exists(),
            "a live journal went"
        );
        // Nothing left to do: a second sweep removes nothing.
        assert_eq!(sweep_leftovers(&work, &current), Vec::<PathBuf>::new());
    }

    #[test]
    fn names_of_journals_and_temporary_files() {
        assert_eq!(journal_pid("update-42.dirs"), Some(42));
        for n in [
            "update-.dirs",
            "update-4x.dirs",
            "update-42",
            "restore-42.dirs",
        ] {
            assert_eq!(journal_pid(n), None, "{n}");
        }
        assert!(is_temp_of(b".name.sv42-0", 42));
        assert!(is_temp_of(b".a.sv42-b.sv42-17", 42));
        for n in [
            &b".name.sv42-"[..],
            b"name.sv42-1",
            b".name.sv421-1",
            b".name.sv4-1",
            b".sv42-1",
        ] {
            assert!(!is_temp_of(n, 42), "{}", String::from_utf8_lossy(n));
        }
    }

    /// A listed path that is not a rewrite of a regular file already in `current/`
    /// (missing there, or a directory in the list) is left to rsync: nothing written,
    /// no generation made.
    #[test]
    fn anything_but_rewrites_is_left_to_rsync_and_nothing_is_written() {
        let (t, src, c, current) = fixture();
        let before = files(&current);
        let mut list: Vec<Vec<u8>> = before.keys().cloned().collect();
        assert!(plan(&list).is_none());
        let gone = list[0].clone();
        fs::remove_file(under(&current, &gone)).unwrap();
        fs::write(src.join("big"), vec![3u8; 10]).unwrap();
        let generation = t.path().join("generations/S");
        assert!(run(&c, &current, &generation, &list, &journal(t.path()))
            .unwrap()
            .is_none());
        assert!(!generation.exists());
        let mut after = files(&current);
        after.insert(gone.clone(), before[&gone].clone());
        assert_eq!(after, before);
        assert_eq!(c.nodes(), 1);
        list.push(b"d0/.".to_vec());
        assert!(plan(&list).is_some());
        assert!(plan(&[b".".to_vec()]).is_some());
    }

    /// A rewrite-only night where a directory on the way is a symlink in `current/`
    /// (swapped behind snapveil's back) is left to rsync: nothing is written through the
    /// link, and no generation is made.
    #[test]
    fn nothing_is_written_through_a_symlinked_directory_of_current() {
        let (t, src, c, current) = fixture();
        let before = files(&current);
        let file = before
            .keys()
            .find(|p| p.contains(&b'/') && before[*p].len() > 100)
            .unwrap()
            .clone();
        let dir = parent(&file).to_vec();
        let elsewhere = t.path().join("elsewhere");
        fs::rename(under(&current, &dir), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, under(&current, &dir)).unwrap();
        let held = files(&elsewhere);
        small_files(&src, |i| vec![0xee; i * 1000 + 1]);
        let generation = t.path().join("generations/S");
        assert!(run(&c, &current, &generation, &[file], &journal(t.path()))
            .unwrap()
            .is_none());
        assert!(!generation.exists());
        assert_eq!(files(&elsewhere), held, "written through the link");
        assert_eq!(c.nodes(), 1);
    }

    /// A real exFAT (the FUSE driver, on a loop device): a filesystem with no hard
    /// links, as on a USB disk. Unmounted and detached on drop, also after a panic.
    struct Exfat {
        dir: tempfile::TempDir,
        dev: Option<String>,
        mounted: bool,
    }

    impl Exfat {
        fn new() -> Option<Exfat> {
            use std::process::Command;
            if !as_root("mounting an exFAT") {
                return None;
            }
            let ok = |c: &mut Command| {
                let o = c.output();
                match o {
                    Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap(),
                    _ => panic!("{c:?} (exfatprogs, exfat-fuse: scripts/install-deps.sh): {o:?}"),
                }
            };
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("exfat.img");
            fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
            ok(Command::new("mkfs.exfat").arg(&img));
            fs::create_dir(dir.path().join("mnt")).unwrap();
            let mut x = Exfat {
                dir,
                dev: None,
                mounted: false,
            };
            let dev = ok(Command::new("losetup").args(["-f", "--show"]).arg(&img));
            x.dev = Some(dev.trim().to_owned());
            ok(Command::new("mount.exfat-fuse")
                .arg(dev.trim())
                .arg(x.mnt()));
            x.mounted = true;
            Some(x)
        }

        fn mnt(&self) -> PathBuf {
            self.dir.path().join("mnt")
        }
    }

    impl Drop for Exfat {
        fn drop(&mut self) {
            use std::process::Command;
            if self.mounted {
                let _ = Command::new("umount").arg(self.mnt()).status();
            }
            if let Some(dev) = &self.dev {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }

    /// Where the target's filesystem refuses hard links, the old version is moved into
    /// the generation instead, whole; an old version already there is never replaced
    /// (neither by the link nor by the move).
    #[test]
    fn keeps_the_old_version_by_moving_it_where_there_are_no_hard_links() {
        let Some(x) = Exfat::new() else { return };
        let m = x.mnt();
        fs::create_dir_all(m.join("current")).unwrap();
        fs::create_dir_all(m.join("gen")).unwrap();
        let dest = m.join("current/f");
        fs::write(&dest, b"old version").unwrap();
        assert!(
            fs::hard_link(&dest, m.join("probe")).is_err(),
            "exFAT took a hard link"
        );
        keep_old(&dest, &m.join("gen/f")).unwrap();
        assert!(!dest.exists(), "moved, not copied");
        assert_eq!(fs::read(m.join("gen/f")).unwrap(), b"old version");

        fs::write(&dest, b"newer").unwrap();
        let e = keep_old(&dest, &m.join("gen/f")).unwrap_err();
        assert!(e.to_string().contains("gen/f"), "{e}");
        assert_eq!(fs::read(m.join("gen/f")).unwrap(), b"old version");
        assert_eq!(fs::read(&dest).unwrap(), b"newer");
    }
}
