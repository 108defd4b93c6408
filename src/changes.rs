//! What changed since the last run, so that a nightly run costs O(changes), not O(tree)
//! (issue 13).
//!
//! rsync over the whole view costs a FUSE round trip for every directory page of a
//! freshly mounted view, every night, to learn that almost nothing changed. Instead, a
//! run that ends well leaves an index in the state directory: for every entry of the
//! view it backed up, in path order, its path and a fingerprint of what rsync compares
//! and more (type, mode, owner, size, mtime, ctime, link target). The next run walks the view
//! in process ([`crate::view::ViewCore::walk`], about the cost of a native walk), and
//! hands rsync only what differs:
//!
//! - `DIR/.` for each directory that is new or whose fingerprint changed. A directory
//!   gains or loses an entry only by changing its mtime and ctime, so every creation,
//!   deletion and rename shows here; rsync `--delete` with `--files-from` then lists that
//!   one directory (not its subdirectories) and deletes what is gone, into the run's
//!   `--backup-dir` like a full pass would.
//! - each other entry that is new or changed, unless its directory is listed already.
//!
//! ctime is part of the fingerprint, so a file rewritten with its old size and mtime
//! is listed too (and then compared by checksum, as in a full pass).
//!
//! A run does the full pass instead whenever the index cannot be trusted to describe
//! the target: none, unreadable or corrupt; written for another target, another view
//! configuration (excludes, rsync arguments, source) or another restore point than the
//! target's newest (a failed run, a run from elsewhere, a rollback); a live `dir:`
//! source; `snapveil run --full`; and when the last full pass is `full_every` old
//! or the clock is behind it (default 7 days), so that a target changed behind snapveil's back is mended within
//! a week.

use crate::manifest::meta::MetaEntry;
// A path in an index is at most MAX_PATH long: the walk it is written from refuses a
// longer one, so an index it wrote is always readable.
use crate::verify::{VerifyError, ViewWalk, MAX_PATH};
use sha2::Digest as _;
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

const HEADER: &str = "# snapveil-changes v2";

#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a snapveil index: {why}")]
    Corrupt { path: PathBuf, why: String },
    /// An index another version of snapveil wrote (an upgrade's first run: it does the
    /// full pass and writes its own).
    #[error("{path}: an index of another snapveil version ({found}; this one reads {})", &HEADER[2..])]
    Version { path: PathBuf, found: String },
    /// The walk it is made from or merged with could not be read.
    #[error(transparent)]
    Walk(#[from] VerifyError),
}

/// Where a job's index lives.
pub fn index_path(state_dir: &Path, job: &str) -> PathBuf {
    state_dir.join("changes").join(format!("{job}.idx"))
}

/// The fingerprint of one entry of the view: any change that rsync or the manifest must
/// see changes it. `size` and `ctime_ns` are the view's (the entry does not keep them).
pub fn fingerprint(m: &MetaEntry, size: u64, ctime_ns: i128) -> u64 {
    let mut h = sha2::Sha256::new();
    h.update([m.kind.letter() as u8]);
    for v in [
        u64::from(m.mode),
        u64::from(m.uid),
        u64::from(m.gid),
        m.rdev(),
        size,
    ] {
        h.update(v.to_le_bytes());
    }
    h.update(m.mtime_ns.to_le_bytes());
    h.update(ctime_ns.to_le_bytes());
    h.update(m.link());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// What the view is made of besides the source's contents: an index written under
/// another one says nothing about this view.
pub fn view_config(source: &str, excludes: &[String], rsync_args: &[String]) -> String {
    let mut h = sha2::Sha256::new();
    for part in [&[source.to_string()][..], excludes, rsync_args] {
        h.update((part.len() as u64).to_le_bytes());
        for s in part {
            h.update((s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
    }
    hex::encode(&h.finalize()[..16])
}

/// What an index describes: its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The target it was written to ([`crate::target::Address`] as text).
    pub target: String,
    /// The restore point that run recorded: the target's newest, if nothing came after.
    pub stamp: String,
    /// [`view_config`] of that run.
    pub config: String,
    /// When the last full pass ran (unix seconds): this run's, or carried over.
    pub full_at: i64,
}

/// The index of the last run that ended well, its header read and its entries not yet:
/// [`plan`] reads them once, as a stream, beside the walk. Both are in path order, so
/// neither is held (issue 13: the index was 24 bytes an entry in memory, and the next
/// one 24 more while it was made). Its entries are trusted only once the last is read:
/// the file's checksum is at its end.
///
/// The file: a header of `key=value` lines, a blank line, then each entry (every entry
/// of the view, in path order) as the length of the path it shares with the entry
/// before and the rest of it (two LEB128 numbers and the bytes), and its fingerprint
/// (8 bytes, little-endian); then the SHA-256 of all that, so that a torn or damaged
/// file is refused, never half used.
pub struct Index {
    pub head: Head,
    /// How many entries its header says it holds.
    count: u64,
    path: PathBuf,
    r: std::io::BufReader<fs::File>,
    sum: sha2::Sha256,
}

impl Index {
    /// Writes the index of `walk` (0600, atomically) to `path`.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(walk: &ViewWalk, head: &Head, path: &Path) -> Result<(), ChangesError> {
        let text = format!(
            "{HEADER}\ntarget={}\nstamp={}\nconfig={}\nfull_at={}\nentries={}\n\n",
            head.target,
            head.stamp,
            head.config,
            head.full_at,
            walk.len()
        );
        let io = |source| ChangesError::Io {
            path: path.into(),
            source,
        };
        // Streamed and summed as it goes, from the walk: nothing per entry is held.
        crate::status::write_atomic_with(path, |w| {
            let mut sum = sha2::Sha256::new();
            let mut out = |b: &[u8]| -> std::io::Result<()> {
                sum.update(b);
                w.write_all(b)
            };
            out(text.as_bytes())?;
            let mut prev: Vec<u8> = Vec::new();
            let mut buf = Vec::with_capacity(64);
            let mut e = walk.cursor().map_err(std::io::Error::other)?;
            while e.advance().map_err(std::io::Error::other)? {
                buf.clear();
                crate::leb128::push_path(&mut buf, &mut prev, e.path());
                buf.extend_from_slice(&e.fp().to_le_bytes());
                out(&buf)?;
            }
            let sum = std::mem::take(&mut sum).finalize();
            w.write_all(&sum)
        })
        .map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)
    }

    /// Writes the index of `walk` next to `path`, to be put in its place by
    /// [`Pending::commit`] once the run it describes is recorded. A run saves it beside
    /// its transfer and hashing.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save_pending(
        walk: &ViewWalk,
        head: &Head,
        path: &Path,
    ) -> Result<Pending, ChangesError> {
        let pending = pending_path(path);
        Self::save(walk, head, &pending)?;
        Ok(Pending {
            pending,
            path: path.into(),
            entries: walk.len(),
        })
    }

    /// Opens the index at `path` and reads its header; `None` when there is none.
    ///
    /// # Errors
    /// Unreadable, or not an index of this version.
    pub fn load(path: &Path) -> Result<Option<Index>, ChangesError> {
        use std::io::BufRead;
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ChangesError::Io {
                    path: path.into(),
                    source,
                })
            }
        };
        let io = |source| ChangesError::Io {
            path: path.into(),
            source,
        };
        let bad = |why: &str| corrupt(path, why);
        let mut r = std::io::BufReader::with_capacity(1 << 16, file);
        let mut sum = sha2::Sha256::new();
        // The header: `key=value` lines up to a blank one.
        let mut head = Vec::new();
        loop {
            let before = head.len();
            let n = r.read_until(b'\n', &mut head).map_err(io)?;
            if n == 0 || head.len() > 64 * 1024 {
                return Err(bad("no end of header"));
            }
            if &head[before..] == b"\n" {
                break;
            }
        }
        sum.update(&head);
        let head = &head[..head.len().saturating_sub(2)];
        let head = std::str::from_utf8(head).map_err(|_| bad("header not UTF-8"))?;
        let mut lines = head.lines();
        match lines.next() {
            Some(HEADER) => {}
            Some(v) if v.starts_with("# snapveil-changes v") => {
                return Err(ChangesError::Version {
                    path: path.into(),
                    found: v[2..].into(),
                })
            }
            _ => return Err(bad("unknown version")),
        }
        let mut field = std::collections::HashMap::new();
        for l in lines {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| bad("header line without '='"))?;
            field.insert(k, v);
        }
        let get = |k: &str| field.get(k).copied().ok_or_else(|| bad(&format!("no {k}")));
        Ok(Some(Index {
            head: Head {
                target: get("target")?.into(),
                stamp: get("stamp")?.into(),
                config: get("config")?.into(),
                full_at: get("full_at")?.parse().map_err(|_| bad("full_at"))?,
            },
            count: get("entries")?.parse().map_err(|_| bad("entries"))?,
            path: path.into(),
            r,
            sum,
        }))
    }

    /// Its entries, one at a time ([`Entries`]).
    pub fn entries(self) -> Entries {
        Entries {
            index: self,
            read: 0,
            path: Vec::new(),
            rest: Vec::new(),
            fp: 0,
        }
    }

    /// Every entry, in memory: the tests' way.
    #[cfg(test)]
    pub(crate) fn read_all(self) -> Result<Vec<(Vec<u8>, u64)>, ChangesError> {
        let mut e = self.entries();
        let mut all = Vec::new();
        while e.advance()? {
            all.push((e.path().to_vec(), e.fp()));
        }
        Ok(all)
    }
}

/// The entries of an [`Index`], read as a stream: [`Entries::advance`] to the next,
/// then its [`Entries::path`] and [`Entries::fp`].
pub struct Entries {
    index: Index,
    read: u64,
    path: Vec<u8>,
    /// The part of the next path that differs from the last, as read.
    rest: Vec<u8>,
    fp: u64,
}

impl Entries {
    /// Moves to the next entry: false after the last, once the file's checksum matched
    /// (what was read before is trusted only then).
    ///
    /// # Errors
    /// Unreadable, damaged, torn, or not in path order.
    pub fn advance(&mut self) -> Result<bool, ChangesError> {
        use std::io::Read;
        let at = &self.index.path;
        let io = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt(at, "torn (ends early)")
            } else {
                ChangesError::Io {
                    path: at.clone(),
                    source,
                }
            }
        };
        let r = &mut self.index.r;
        if self.read == self.index.count {
            let mut want = [0u8; 32];
            r.read_exact(&mut want).map_err(io)?;
            let mut rest = [0u8; 1];
            if r.read(&mut rest).map_err(io)? != 0 {
                return Err(corrupt(at, "bytes after its checksum"));
            }
            let sum = std::mem::take(&mut self.index.sum).finalize();
            if sum[..] != want {
                return Err(corrupt(at, "checksum does not match (torn or damaged)"));
            }
            self.read += 1;
            return Ok(false);
        }
        if self.read > self.index.count {
            return Ok(false);
        }
        let sum = &mut self.index.sum;
        let mut num = || -> Result<u64, ChangesError> {
            crate::leb128::read(r, |b| sum.update([b])).map_err(|e| {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    corrupt(at, "a length too long")
                } else {
                    io(e)
                }
            })
        };
        let shared = num()?;
        let rest = num()?;
        if shared > self.path.len() as u64 || rest > MAX_PATH || shared + rest > MAX_PATH {
            return Err(corrupt(at, "an entry's length out of range"));
        }
        let shared = shared as usize;
        self.rest.resize(rest as usize, 0);
        r.read_exact(&mut self.rest).map_err(io)?;
        let mut fp = [0u8; 8];
        r.read_exact(&mut fp).map_err(io)?;
        sum.update(&self.rest);
        sum.update(fp);
        // Strictly after the entry before (the first, the root, is the empty path).
        if self.read > 0 && self.rest[..] <= self.path[shared..] {
            return Err(corrupt(at, "entries not in path order"));
        }
        self.path.truncate(shared);
        self.path.extend_from_slice(&self.rest);
        self.fp = u64::from_le_bytes(fp);
        self.read += 1;
        Ok(true)
    }

    /// The entry's path (relative to the view; empty for the root).
    pub fn path(&self) -> &[u8] {
        &self.path
    }

    pub fn fp(&self) -> u64 {
        self.fp
    }
}

fn corrupt(path: &Path, why: &str) -> ChangesError {
    ChangesError::Corrupt {
        path: path.into(),
        why: why.into(),
    }
}

/// Removes the pending index next to `path` ([`Index::save_pending`]) left by a run
/// that was killed: returns its path if there was one.
///
/// # Errors
/// It exists but cannot be removed.
pub fn remove_pending(path: &Path) -> Result<Option<PathBuf>, ChangesError> {
    let p = pending_path(path);
    match fs::remove_file(&p) {
        Ok(()) => Ok(Some(p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ChangesError::Io { path: p, source }),
    }
}

fn pending_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".pending");
    PathBuf::from(name)
}

/// An index written but not yet in place ([`Index::save_pending`]): dropped without
/// [`Pending::commit`] (the run failed), it is removed, and the last good index stays.
#[derive(Debug)]
pub struct Pending {
    pending: PathBuf,
    path: PathBuf,
    entries: usize,
}

impl Pending {
    /// Puts the index in place (a rename: the old one or the new one, never a mix).
    /// Returns its number of entries.
    ///
    /// # Errors
    /// The rename fails; the pending file is then removed.
    pub fn commit(self) -> Result<usize, ChangesError> {
        fs::rename(&self.pending, &self.path).map_err(|source| ChangesError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.entries)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // After a commit the pending name is gone: NotFound is the normal case.
        crate::status::remove_or_warn(&self.pending);
    }
}

/// What the transfer of a run covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// rsync over the whole view; why (for the log).
    Full(String),
    /// rsync over `list` only (`--files-from` lines, [`plan`]); `full_at` carried over.
    Changes { list: Vec<Vec<u8>>, full_at: i64 },
}

/// What this run must know to trust an index.
pub struct Expect<'a> {
    pub target: &'a str,
    /// The target's newest restore point.
    pub newest: Option<&'a str>,
    pub config: &'a str,
    /// The source is a frozen snapshot (a `dir:` source can change under the walk).
    pub frozen: bool,
    /// `snapveil run --full`.
    pub forced_full: bool,
    /// The target's `current/` is empty: whatever the index says, it holds none of it.
    pub empty: bool,
    /// Seconds after the last full pass when the next is due (`full_every`).
    pub full_every: i64,
    pub now: i64,
}

/// Decides the transfer: the changes since `index`, or a full pass and why.
///
/// # Errors
/// The walk cannot be read (an index that cannot be used is a full pass, not an error).
pub fn plan(
    index: Result<Option<Index>, ChangesError>,
    walk: &ViewWalk,
    e: &Expect<'_>,
) -> Result<Plan, VerifyError> {
    let full = |why: String| Ok(Plan::Full(why));
    let index = match index {
        _ if e.forced_full => return full("--full".into()),
        _ if !e.frozen => return full("the source is live (dir:), not a snapshot".into()),
        Ok(None) => return full("no index of an earlier run".into()),
        Err(err) => return full(format!("the index cannot be used ({err})")),
        _ if e.empty => return full("the target's current/ is empty".into()),
        Ok(Some(i)) => i,
    };
    let head = &index.head;
    if head.target != e.target {
        return full(format!("the index is of another target ({})", head.target));
    }
    if e.newest != Some(head.stamp.as_str()) {
        return full(format!(
            "the index is of restore point {}, the target's newest is {}",
            head.stamp,
            e.newest.unwrap_or("none")
        ));
    }
    if head.config != e.config {
        return full("excludes, rsync_args or source changed since the index".into());
    }
    if e.now < head.full_at {
        return full("the clock is behind the last full pass".into());
    }
    if e.now - head.full_at >= e.full_every {
        return full(format!(
            "the last full pass is {} days old (full_every)",
            (e.now - head.full_at) / 86400
        ));
    }
    let full_at = head.full_at;
    match changed_list(index, walk) {
        Ok(list) => Ok(Plan::Changes { list, full_at }),
        Err(ChangesError::Walk(err)) => Err(err),
        Err(err) => full(format!("the index cannot be used ({err})")),
    }
}

/// The `--files-from` lines for what differs from `index` (see the module doc): the
/// walk and the index merged, both in path order.
///
/// # Errors
/// The index is unreadable or damaged anywhere: the list is returned only once every
/// entry was read and the checksum at its end matched.
fn changed_list(index: Index, walk: &ViewWalk) -> Result<Vec<Vec<u8>>, ChangesError> {
    let mut dirs: HashSet<Vec<u8>> = HashSet::new();
    let mut others: Vec<Vec<u8>> = Vec::new();
    let mut last = index.entries();
    let mut more = last.advance()?;
    let mut e = walk.cursor()?;
    while e.advance()? {
        // Past the entries gone since (their directories changed, and show).
        while more && last.path() < e.path() {
            more = last.advance()?;
        }
        if more && last.path() == e.path() && last.fp() == e.fp() {
            continue;
        }
        if e.is_dir() {
            dirs.insert(e.path().to_vec());
        } else {
            others.push(e.path().to_vec());
        }
    }
    fn parent(p: &[u8]) -> &[u8] {
        p.iter().rposition(|b| *b == b'/').map_or(&[], |i| &p[..i])
    }
    others.retain(|p| !dirs.contains(parent(p)));
    let mut list: Vec<Vec<u8>> = dirs
        .into_iter()
        .map(|mut d| {
            if d.is_empty() {
                d.push(b'.');
            } else {
                d.extend_from_slice(b"/.");
            }
            d
        })
        .collect();
    list.extend(others);
    list.sort();
    // The rest of the index: what was read is trusted only once its checksum matched.
    while more {
        more = last.advance()?;
    }
    Ok(list)
}

#[cfg(test)]
mod tests;
