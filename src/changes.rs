//! What changed since the last run, so that a nightly run costs O(changes), not O(tree)
//! (issue 13).
//!
//! rsync over the whole view costs a FUSE round trip for every directory page of a
//! freshly mounted view, every night, to learn that almost nothing changed. Instead, a
//! run that ends well leaves an index in the state directory: for every entry of the
//! view it backed up, a key of its path and a fingerprint of what rsync compares and
//! more (type, mode, owner, size, mtime, ctime, link target). The next run walks the view
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
use crate::verify::ViewWalk;
use sha2::Digest as _;
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

const HEADER: &str = "# snapveil-changes v1";

#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a snapveil index: {why}")]
    Corrupt { path: PathBuf, why: String },
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

/// The index of the last run that ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    /// The target it was written to ([`crate::target::Address`] as text).
    pub target: String,
    /// The restore point that run recorded: the target's newest, if nothing came after.
    pub stamp: String,
    /// [`view_config`] of that run.
    pub config: String,
    /// When the last full pass ran (unix seconds): this run's, or carried over.
    pub full_at: i64,
    /// (path key, fingerprint), sorted by key.
    entries: Vec<([u8; 16], u64)>,
}

impl Index {
    /// The index of `walk` (a run uses [`Index::of_in`]).
    #[cfg(test)]
    pub(crate) fn of(
        walk: &ViewWalk,
        target: &str,
        stamp: &str,
        config: &str,
        full_at: i64,
    ) -> Index {
        Self::of_in(Self::room(walk), walk, target, stamp, config, full_at)
    }

    /// Room for the entries of [`Index::of_in`]: allocated by the thread that calls this,
    /// so that a thread making the index leaves nothing in its own malloc arena.
    pub fn room(walk: &ViewWalk) -> Vec<([u8; 16], u64)> {
        Vec::with_capacity(walk.len())
    }

    /// [`Index::of`], in `room` ([`Index::room`]): filled and sorted in place.
    pub fn of_in(
        room: Vec<([u8; 16], u64)>,
        walk: &ViewWalk,
        target: &str,
        stamp: &str,
        config: &str,
        full_at: i64,
    ) -> Index {
        let mut entries = room;
        entries.clear();
        entries.extend(
            walk.entries()
                .map(|e| (crate::manifest::path_key(&e.path), e.fp)),
        );
        entries.sort_unstable();
        Index {
            target: target.into(),
            stamp: stamp.into(),
            config: config.into(),
            full_at,
            entries,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get(&self, path: &[u8]) -> Option<u64> {
        let k = crate::manifest::path_key(path);
        self.entries
            .binary_search_by(|e| e.0.cmp(&k))
            .ok()
            .map(|i| self.entries[i].1)
    }

    /// Writes the index (0600, atomically): a header of `key=value` lines, a blank line,
    /// the entries (16-byte key, 8-byte little-endian fingerprint), and the SHA-256 of
    /// all that, so that a torn or damaged file is refused, never half used.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, path: &Path) -> Result<(), ChangesError> {
        let head = format!(
            "{HEADER}\ntarget={}\nstamp={}\nconfig={}\nfull_at={}\nentries={}\n\n",
            self.target,
            self.stamp,
            self.config,
            self.full_at,
            self.entries.len()
        );
        let io = |source| ChangesError::Io {
            path: path.into(),
            source,
        };
        // Streamed and summed as it goes: the index is not held twice at the run's peak.
        crate::status::write_atomic_with(path, |w| {
            let mut sum = sha2::Sha256::new();
            sum.update(head.as_bytes());
            w.write_all(head.as_bytes())?;
            for (k, fp) in &self.entries {
                let fp = fp.to_le_bytes();
                sum.update(k);
                sum.update(fp);
                w.write_all(k)?;
                w.write_all(&fp)?;
            }
            w.write_all(&sum.finalize())
        })
        .map_err(io)?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io)
    }

    /// Writes the index next to `path`, to be put in its place by [`Pending::commit`]
    /// once the run it describes is recorded. A run saves it beside its transfer and
    /// hashing: made at the end, it would sit beside the manifest's sums at the run's
    /// peak.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save_pending(&self, path: &Path) -> Result<Pending, ChangesError> {
        let pending = pending_path(path);
        self.save(&pending)?;
        Ok(Pending {
            pending,
            path: path.into(),
            entries: self.entries.len(),
        })
    }

    /// Reads the index at `path`; `None` when there is none. Read as a stream into its
    /// entries, summed as it goes: the file is not held beside them (24 bytes an entry
    /// twice, at the plan's peak on a big tree).
    ///
    /// # Errors
    /// Unreadable, or not a whole index of this version.
    pub fn load(path: &Path) -> Result<Option<Index>, ChangesError> {
        use std::io::{BufRead, Read};
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
        let bad = |why: &str| ChangesError::Corrupt {
            path: path.into(),
            why: why.into(),
        };
        let size = file.metadata().map_err(io)?.len();
        let mut r = std::io::BufReader::with_capacity(1 << 16, file);
        let mut sum = sha2::Sha256::new();
        // The header: `key=value` lines up to a blank one.
        let mut head = Vec::new();
        let mut read = 0u64;
        loop {
            let before = head.len();
            let n = r.read_until(b'\n', &mut head).map_err(io)?;
            read += n as u64;
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
        if lines.next() != Some(HEADER) {
            return Err(bad("unknown version"));
        }
        let mut field = std::collections::HashMap::new();
        for l in lines {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| bad("header line without '='"))?;
            field.insert(k, v);
        }
        let get = |k: &str| field.get(k).copied().ok_or_else(|| bad(&format!("no {k}")));
        let n: u64 = get("entries")?.parse().map_err(|_| bad("entries"))?;
        // The size says whether the count is true before anything is allocated for it.
        if n.checked_mul(24).and_then(|b| b.checked_add(read + 32)) != Some(size) {
            return Err(bad("entry count does not match"));
        }
        let mut entries: Vec<([u8; 16], u64)> = Vec::with_capacity(n as usize);
        let mut e = [0u8; 24];
        for _ in 0..n {
            r.read_exact(&mut e).map_err(io)?;
            sum.update(e);
            entries.push((
                e[..16].try_into().expect("16"),
                u64::from_le_bytes(e[16..].try_into().expect("8")),
            ));
        }
        let mut want = [0u8; 32];
        r.read_exact(&mut want).map_err(io)?;
        if sum.finalize()[..] != want {
            return Err(bad("checksum does not match (torn or damaged)"));
        }
        if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(bad("entries not sorted"));
        }
        Ok(Some(Index {
            target: get("target")?.into(),
            stamp: get("stamp")?.into(),
            config: get("config")?.into(),
            full_at: get("full_at")?.parse().map_err(|_| bad("full_at"))?,
            entries,
        }))
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
        match fs::remove_file(&self.pending) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.pending.display(), "cannot remove: {e}");
            }
            _ => {}
        }
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
    /// Seconds after the last full pass when the next is due (`full_every`).
    pub full_every: i64,
    pub now: i64,
}

/// Decides the transfer: the changes since `index`, or a full pass and why.
pub fn plan(index: Result<Option<Index>, ChangesError>, walk: &ViewWalk, e: &Expect<'_>) -> Plan {
    let index = match index {
        _ if e.forced_full => return Plan::Full("--full".into()),
        _ if !e.frozen => return Plan::Full("the source is live (dir:), not a snapshot".into()),
        Ok(None) => return Plan::Full("no index of an earlier run".into()),
        Err(err) => return Plan::Full(format!("the index cannot be used ({err})")),
        Ok(Some(i)) => i,
    };
    if index.target != e.target {
        return Plan::Full(format!("the index is of another target ({})", index.target));
    }
    if e.newest != Some(index.stamp.as_str()) {
        return Plan::Full(format!(
            "the index is of restore point {}, the target's newest is {}",
            index.stamp,
            e.newest.unwrap_or("none")
        ));
    }
    if index.config != e.config {
        return Plan::Full("excludes, rsync_args or source changed since the index".into());
    }
    if e.now < index.full_at {
        return Plan::Full("the clock is behind the last full pass".into());
    }
    if e.now - index.full_at >= e.full_every {
        return Plan::Full(format!(
            "the last full pass is {} days old (full_every)",
            (e.now - index.full_at) / 86400
        ));
    }
    Plan::Changes {
        list: changed_list(&index, walk),
        full_at: index.full_at,
    }
}

/// The `--files-from` lines for what differs from `index` (see the module doc).
fn changed_list(index: &Index, walk: &ViewWalk) -> Vec<Vec<u8>> {
    let mut dirs: HashSet<Vec<u8>> = HashSet::new();
    let mut others: Vec<Vec<u8>> = Vec::new();
    for e in walk.entries() {
        if index.get(&e.path) == Some(e.fp) {
            continue;
        }
        if e.is_dir {
            dirs.insert(e.path);
        } else {
            others.push(e.path);
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
    list
}

#[cfg(test)]
mod tests;
