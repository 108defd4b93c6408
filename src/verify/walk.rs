//! One walk of a view, kept in the run's scratch, not in memory (issue 13: a run's
//! memory must not grow with the tree).
//!
//! A run walks its view once and uses the walk for the plan, this run's index, the
//! checksum pass and the manifest: the view shows a frozen snapshot, so it cannot change
//! in between. Each of those reads the walk once, in path order, beside a file in the
//! same order (the last index, the last manifest), so none of them needs it in memory:
//! the walk is written to a file as it is found, and each step reads it back as a
//! stream. Held in memory it cost 47 bytes an entry at best (names under parents,
//! fingerprints, ctimes), and 24 more for the `.meta` fields until those were written
//! out; a 10-million-file server would have needed 700 MB for it.
//!
//! The `.meta` file is written as the walk goes too, so the walk keeps only what the
//! plan and the manifest need: each entry's path, front-coded against the one before
//! (the length of what it shares with it and the rest, two LEB128 numbers and the
//! bytes), its kind (a byte), its fingerprint and, for a regular file, its ctime (8
//! bytes each, little-endian): about 27 bytes an entry on disk on the bench's
//! 1,000,000-file tree.

use super::{io, VerifyError};
use crate::manifest;
use crate::manifest::meta::{Kind, MetaEntry};
use std::fs;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// A walk of a view, in path order (by the paths' bytes, the root first): what
/// [`crate::view::ViewCore::walk`] gives, on disk ([`ViewWalk::cursor`] reads it).
/// The file is removed with it.
pub struct ViewWalk {
    /// The view's root.
    pub root: PathBuf,
    /// The entries, in the run's scratch.
    file: PathBuf,
    len: usize,
    n_files: usize,
}

/// An entry's kind in the walk's file.
const DIR: u8 = 0;
const FILE: u8 = 1;
const OTHER: u8 = 2;

impl ViewWalk {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How many of the entries are regular files.
    pub fn file_count(&self) -> usize {
        self.n_files
    }

    /// Reads the walk from its first entry.
    ///
    /// # Errors
    /// Its file cannot be opened.
    pub fn cursor(&self) -> Result<Cursor, VerifyError> {
        let f = fs::File::open(&self.file).map_err(io(&self.file))?;
        Ok(Cursor {
            r: BufReader::with_capacity(1 << 16, f),
            file: self.file.clone(),
            left: self.len,
            path: Vec::new(),
            kind: DIR,
            fp: 0,
            ctime: 0,
        })
    }

    /// Regular files, by path: (path relative to the view, ctime).
    ///
    /// # Errors
    /// Its file cannot be opened; reading it later fails item by item.
    pub fn files(&self) -> Result<Files, VerifyError> {
        Ok(Files {
            c: self.cursor()?,
            failed: false,
        })
    }
}

impl Drop for ViewWalk {
    fn drop(&mut self) {
        // Gone already if its scratch directory went first.
        crate::status::remove_or_warn(&self.file);
    }
}

/// Reads a [`ViewWalk`]: [`Cursor::advance`] to the next entry, then its
/// [`Cursor::path`], [`Cursor::fp`] and kind.
pub struct Cursor {
    r: BufReader<fs::File>,
    file: PathBuf,
    left: usize,
    path: Vec<u8>,
    kind: u8,
    fp: u64,
    ctime: i64,
}

impl Cursor {
    /// Moves to the next entry: false after the last.
    ///
    /// # Errors
    /// The file cannot be read, or is not what the walk wrote.
    pub fn advance(&mut self) -> Result<bool, VerifyError> {
        if self.left == 0 {
            return Ok(false);
        }
        let file = &self.file;
        let damaged = |why: &str| VerifyError::Io {
            path: file.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("the walk's file is damaged ({why})"),
            ),
        };
        let r = &mut self.r;
        let shared = crate::leb128::read(r, |_| {}).map_err(io(file))?;
        let rest = crate::leb128::read(r, |_| {}).map_err(io(file))?;
        if shared > self.path.len() as u64 || rest > MAX_PATH || shared + rest > MAX_PATH {
            return Err(damaged("a length out of range"));
        }
        self.path.truncate(shared as usize);
        let start = self.path.len();
        self.path.resize(start + rest as usize, 0);
        r.read_exact(&mut self.path[start..]).map_err(io(file))?;
        let mut b = [0u8; 9];
        r.read_exact(&mut b).map_err(io(file))?;
        self.kind = b[0];
        self.fp = u64::from_le_bytes(b[1..].try_into().expect("8 bytes"));
        self.ctime = match self.kind {
            FILE => {
                let mut c = [0u8; 8];
                r.read_exact(&mut c).map_err(io(file))?;
                i64::from_le_bytes(c)
            }
            DIR | OTHER => 0,
            _ => return Err(damaged("an unknown kind")),
        };
        self.left -= 1;
        Ok(true)
    }

    /// Moves to the next regular file: false after the last.
    ///
    /// # Errors
    /// As [`Cursor::advance`].
    pub fn next_file(&mut self) -> Result<bool, VerifyError> {
        while self.advance()? {
            if self.kind == FILE {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The entry's path relative to the view (empty for the root).
    pub fn path(&self) -> &[u8] {
        &self.path
    }

    /// [`crate::changes::fingerprint`].
    pub fn fp(&self) -> u64 {
        self.fp
    }

    pub fn is_dir(&self) -> bool {
        self.kind == DIR
    }

    /// A regular file's ctime (unix seconds; 0 for the rest).
    pub fn ctime(&self) -> i64 {
        self.ctime
    }
}

/// [`ViewWalk::files`]: each item a regular file's (path, ctime), or the error that
/// ended the walk's reading (the last item then).
pub struct Files {
    c: Cursor,
    failed: bool,
}

impl Iterator for Files {
    type Item = Result<(Vec<u8>, i64), VerifyError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.c.next_file() {
            Ok(true) => Some(Ok((self.c.path.clone(), self.c.ctime))),
            Ok(false) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// A path of the view is at most this long: a walk refuses a longer one, so the
/// index written from it ([`crate::changes`]) and the file read back have this bound.
/// (Linux's `PATH_MAX` is 4 KiB, and rsync refuses longer paths too.)
pub const MAX_PATH: u64 = 1 << 16;

/// Writes a [`ViewWalk`] entry by entry, in path order, and the `.meta` file's lines
/// beside it.
struct WalkBuilder<'m> {
    root: PathBuf,
    /// Removed if the walk is not finished.
    file: Option<PathBuf>,
    out: BufWriter<fs::File>,
    meta: &'m mut dyn Write,
    buf: Vec<u8>,
    /// The path pushed last: the next is coded against it, and must come after it.
    prev: Vec<u8>,
    len: usize,
    n_files: usize,
}

impl<'m> WalkBuilder<'m> {
    /// A walk of the view at `root` into a new file at `file`, and its `.meta` file
    /// (header and lines) into `meta`.
    fn new(root: &Path, file: &Path, meta: &'m mut dyn Write) -> Result<Self, VerifyError> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
            .map_err(io(file))?;
        let b = WalkBuilder {
            root: root.to_path_buf(),
            file: Some(file.to_path_buf()),
            out: BufWriter::with_capacity(1 << 16, f),
            meta,
            buf: Vec::with_capacity(256),
            prev: Vec::new(),
            len: 0,
            n_files: 0,
        };
        // The header (the file of no entries); [`WalkBuilder::push`] adds each line.
        manifest::meta::format_to(b.meta, std::iter::empty()).map_err(|e| b.meta_err(e))?;
        Ok(b)
    }

    fn meta_err(&self, source: std::io::Error) -> VerifyError {
        VerifyError::Io {
            path: self.root.join("(.meta)"),
            source,
        }
    }

    /// One entry at `path` (`m.path` is not read), the root first, then in path order
    /// (by the paths' bytes): `ctime` (unix seconds) is a regular file's, `fp` the
    /// entry's fingerprint.
    ///
    /// # Errors
    /// Writing fails, or `path` is not after the path before it (a walk out of order
    /// would make every merge of it wrong), or longer than [`MAX_PATH`].
    fn push(
        &mut self,
        path: &[u8],
        m: &MetaEntry,
        ctime: Option<i64>,
        fp: u64,
    ) -> Result<(), VerifyError> {
        let wrong = |why: String| VerifyError::Io {
            path: self.root.clone(),
            source: std::io::Error::other(why),
        };
        // Strictly after the path before (bytes compared in order): the root first.
        let after = if self.len == 0 {
            path.is_empty()
        } else {
            path > self.prev.as_slice()
        };
        if !after {
            return Err(wrong(format!(
                "the walk is not in path order at {}",
                String::from_utf8_lossy(path)
            )));
        }
        if path.len() as u64 > MAX_PATH {
            return Err(wrong(format!(
                "a path longer than {MAX_PATH} bytes ({}…)",
                String::from_utf8_lossy(&path[..64])
            )));
        }
        let kind = match m.kind {
            Kind::Dir => DIR,
            Kind::File => FILE,
            _ => OTHER,
        };
        let b = &mut self.buf;
        b.clear();
        crate::leb128::push_path(b, &mut self.prev, path);
        b.push(kind);
        b.extend_from_slice(&fp.to_le_bytes());
        if kind == FILE {
            b.extend_from_slice(&ctime.unwrap_or(0).to_le_bytes());
            self.n_files += 1;
        }
        let file = self.file.as_deref().expect("not finished");
        self.out.write_all(b).map_err(io(file))?;
        b.clear();
        manifest::meta::push_line(b, m, path);
        if let Err(e) = self.meta.write_all(b) {
            return Err(self.meta_err(e));
        }
        self.len += 1;
        Ok(())
    }

    /// The walk, its file complete (the `.meta` lines are in the caller's writer).
    fn finish(mut self) -> Result<ViewWalk, VerifyError> {
        let file = self.file.take().expect("finished once");
        let done = self
            .out
            .flush()
            .and_then(|()| self.meta.flush())
            .map_err(io(&file));
        if let Err(e) = done {
            let _ = fs::remove_file(&file);
            return Err(e);
        }
        Ok(ViewWalk {
            root: std::mem::take(&mut self.root),
            file,
            len: self.len,
            n_files: self.n_files,
        })
    }
}

impl Drop for WalkBuilder<'_> {
    fn drop(&mut self) {
        if let Some(f) = &self.file {
            let _ = fs::remove_file(f);
        }
    }
}

/// What [`walk_core`] gives each entry to besides its walk: view path, attributes, a
/// symlink's target as the view shows it, and where the view finds it.
pub type AlsoVisit<'a> = dyn FnMut(
        &[u8],
        &crate::view::Attr,
        Option<&[u8]>,
        &crate::view::Resolved,
    ) -> Result<(), VerifyError>
    + 'a;

/// Walks the view mounted at `root` through its core in this process
/// ([`crate::view::ViewCore::walk`]) instead of through the mount (the same entries with
/// the same attributes, without a FUSE round trip per directory page), into a new file
/// at `file` (in the run's scratch), and writes the `.meta` file of it to `meta` as it
/// goes.
///
/// Each entry is also given to `also`, when there is one, before it is kept: a first
/// run into an empty `current/` on this machine writes it there as it is found
/// ([`crate::target::seed`]).
///
/// # Errors
/// An unreadable entry of the source, by path; writing either file; what `also` returns.
pub fn walk_core(
    core: &crate::view::ViewCore,
    root: &Path,
    file: &Path,
    meta: &mut dyn Write,
    mut also: Option<&mut AlsoVisit<'_>>,
) -> Result<ViewWalk, VerifyError> {
    use crate::view::Kind as V;
    use std::time::UNIX_EPOCH;
    fn at(t: std::time::SystemTime) -> i128 {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        }
    }
    let mut b = WalkBuilder::new(root, file, meta)?;
    core.walk::<VerifyError>(&mut |path, a, link, place| {
        if let Some(also) = also.as_mut() {
            also(path, a, link.as_deref(), place)?;
        }
        let kind = match a.kind {
            V::Dir => Kind::Dir,
            V::File => Kind::File,
            V::Symlink => Kind::Symlink(link.unwrap_or_default()),
            V::Fifo => Kind::Fifo,
            V::Socket => Kind::Socket,
            V::CharDev => Kind::Char(u64::from(a.rdev)),
            V::BlockDev => Kind::Block(u64::from(a.rdev)),
        };
        let ctime = (a.kind == V::File).then(|| at(a.ctime).div_euclid(1_000_000_000) as i64);
        let entry = MetaEntry {
            path: Vec::new(), // given beside it
            kind,
            mode: u32::from(a.perm),
            uid: a.uid,
            gid: a.gid,
            mtime_ns: at(a.mtime),
        };
        let fp = crate::changes::fingerprint(&entry, a.size, at(a.ctime));
        b.push(path, &entry, ctime, fp)
    })?;
    b.finish()
}

/// A file for a test's walk, removed with it.
#[cfg(test)]
fn test_file() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "snapveil-test-walk-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl ViewWalk {
    /// The walk of `found` (entry, ctime of a regular file, fingerprint), and its
    /// `.meta` file: the tests' way to make one.
    #[cfg(test)]
    pub(crate) fn from_found_meta(
        root: &Path,
        found: Vec<(MetaEntry, Option<i64>, u64)>,
    ) -> (ViewWalk, Vec<u8>) {
        let mut found = found;
        // In path order, as a walk gives them.
        found.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        let mut meta = Vec::new();
        let mut b = WalkBuilder::new(root, &test_file(), &mut meta).expect("a test walk");
        for (m, ct, fp) in &found {
            b.push(&m.path, m, *ct, fp.to_owned())
                .expect("a small test walk");
        }
        let w = b.finish().expect("a test walk");
        (w, meta)
    }

    /// [`ViewWalk::from_found_meta`] without the `.meta` file.
    #[cfg(test)]
    pub(crate) fn from_found(root: &Path, found: Vec<(MetaEntry, Option<i64>, u64)>) -> ViewWalk {
        Self::from_found_meta(root, found).0
    }

    /// Every entry as (path, fingerprint, is a directory): the tests' way to read one.
    #[cfg(test)]
    pub(crate) fn entries_vec(&self) -> Vec<(Vec<u8>, u64, bool)> {
        let mut c = self.cursor().unwrap();
        let mut out = Vec::new();
        while c.advance().unwrap() {
            out.push((c.path().to_vec(), c.fp(), c.is_dir()));
        }
        out
    }

    /// Every regular file as (path, ctime): the tests' way.
    #[cfg(test)]
    pub(crate) fn files_vec(&self) -> Vec<(Vec<u8>, i64)> {
        self.files().unwrap().map(Result::unwrap).collect()
    }
}

/// Walks the view at `view` through the mount: what a run walked before
/// [`walk_core`], kept as the oracle `walk_core` is tested against. Returns the walk and
/// its `.meta` file.
///
/// # Errors
/// An unreadable entry, by path.
#[cfg(test)]
pub fn walk_view(view: &Path) -> Result<(ViewWalk, Vec<u8>), VerifyError> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    /// Entries with the ctime of regular files (`None` for the others).
    type Found = Vec<(MetaEntry, Option<i64>, u64)>;
    fn ns(secs: i64, nsecs: i64) -> i128 {
        i128::from(secs) * 1_000_000_000 + i128::from(nsecs)
    }
    fn walk(view: &Path, dir: &Path, w: &mut Found) -> Result<(), VerifyError> {
        use std::os::unix::fs::MetadataExt;
        for e in fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let p = e.path();
            // DirEntry::metadata does not follow symlinks.
            let m = e.metadata().map_err(io(&p))?;
            let ft = m.file_type();
            let link = if ft.is_symlink() {
                Some(
                    fs::read_link(&p)
                        .map_err(io(&p))?
                        .into_os_string()
                        .into_vec(),
                )
            } else {
                None
            };
            let rel = p
                .strip_prefix(view)
                .expect("under root")
                .as_os_str()
                .as_bytes()
                .to_vec();
            let ctime = ft.is_file().then(|| m.ctime());
            let entry = MetaEntry::from_metadata(rel, &m, link);
            let fp = crate::changes::fingerprint(&entry, m.size(), ns(m.ctime(), m.ctime_nsec()));
            w.push((entry, ctime, fp));
            if ft.is_dir() {
                walk(view, &p, w)?;
            }
        }
        Ok(())
    }
    let root = fs::symlink_metadata(view).map_err(io(view))?;
    let root_entry = MetaEntry::from_metadata(Vec::new(), &root, None);
    let fp = {
        use std::os::unix::fs::MetadataExt;
        crate::changes::fingerprint(
            &root_entry,
            root.size(),
            ns(root.ctime(), root.ctime_nsec()),
        )
    };
    let mut found: Found = vec![(root_entry, None, fp)];
    walk(view, view, &mut found)?;
    Ok(ViewWalk::from_found_meta(view, found))
}

#[cfg(test)]
mod tests;
