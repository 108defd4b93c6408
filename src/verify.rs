//! Proof that a backup restores: the per-run checksum manifest of the encrypted view
//! (`TARGET/manifests/STAMP.sha1`, `sha1sum -c` format, paths relative to `current/`),
//! `snapveil verify JOB` (the target's `current/` against the last manifest, without
//! downloading data) and `--deep` (the target's ciphertext decrypted in memory and
//! compared with a fresh snapshot's plaintext). Issue 6.
//!
//! Owns: manifests on the target, the comparisons and their report. Does not own: the
//! run pipeline (job.rs calls [`hash_view`], [`write_manifest`] and [`check_view_against_target`]).
//!
//! A local target is hashed directly. A remote one cannot be hashed from here, so its
//! files are compared with a local tree that should equal them: the encrypted view of a
//! fresh snapshot (reverse mode is deterministic), by `rsync --dry-run --checksum
//! --itemize-changes`, where rsync computes the remote checksums on the backup host.
//! Where the source changed since the last run, the manifest decides which side is wrong.

use crate::config::{Config, Job};
use crate::crypto::content;
use crate::crypto::names::{self, LONGNAME_PREFIX};
use crate::crypto::{KeyConfig, Keys, MasterKey};
use crate::exec::Runner;
use crate::manifest;
use crate::manifest::meta::MetaEntry;
use crate::target::{Area, Target};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
#[cfg(test)]
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Rsync(#[from] crate::target::RsyncError),
    #[error(transparent)]
    Key(#[from] crate::crypto::ConfigError),
    #[error(transparent)]
    Mount(#[from] crate::view::mount::MountError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("{target}: no restore point (runs/*.json) yet")]
    NoRun { target: String },
    #[error("{target}: restore point {stamp} has no manifests/{stamp}.sha1")]
    NoManifest { target: String, stamp: String },
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    #[error(transparent)]
    Chain(#[from] crate::target::chain::StateError),
    #[error(transparent)]
    View(#[from] crate::view::ViewError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.into(),
        source,
    }
}

/// What a verification found. Paths are encrypted, relative to `current/`.
#[derive(Debug, Default)]
pub struct Report {
    pub checked: u64,
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub differing: Vec<String>,
    /// Deep verify: files whose decrypted content is not the snapshot's plaintext.
    pub wrong_plaintext: Vec<String>,
    /// Files the source changed since the last run: the target cannot be judged there.
    pub unverifiable: Vec<String>,
    /// Records that fail their MAC, and a truncated or rolled-back chain (issue 14).
    pub tampered: Vec<String>,
    /// What the user should know although nothing failed.
    pub notes: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.extra.is_empty()
            && self.differing.is_empty()
            && self.wrong_plaintext.is_empty()
            && self.tampered.is_empty()
    }

    pub fn print(&self) {
        for n in &self.notes {
            println!("note: {n}");
        }
        for t in &self.tampered {
            println!("{t}");
        }
        for (what, v) in [
            ("missing", &self.missing),
            ("extra", &self.extra),
            ("differing", &self.differing),
            ("wrong plaintext", &self.wrong_plaintext),
            (
                "unverifiable (source changed since the last run)",
                &self.unverifiable,
            ),
        ] {
            for p in v {
                println!("{what}: {p}");
            }
        }
        println!(
            "{} files checked: {} missing, {} extra, {} differing, {} wrong plaintext",
            self.checked,
            self.missing.len(),
            self.extra.len(),
            self.differing.len(),
            self.wrong_plaintext.len()
        );
    }
}

/// Writes `TARGET/manifests/STAMP.meta` (every entry's type, mode, owner, mtime, link
/// target: [`manifest::meta`]) and then `TARGET/manifests/STAMP.sha1` of a walk of the
/// view (during a run, before `runs/STAMP.json`, so every restore point has both).
/// The metadata goes first: a `.sha1` without its `.meta` would restore as a point made
/// by an older snapveil, losing modes and symlinks without a failure.
///
/// `meta` is the `.meta` file as [`ViewWalk::write_meta`] wrote it when the walk was
/// done (its parts, in order), and `sums` are [`hash_view`]'s: the view is read
/// before, not while, the manifest is written, so that a run lets go of the view and
/// the snapshot in the meantime.
///
/// # Errors
/// Writing/uploading the manifest.
pub fn write_manifest(
    runner: &dyn Runner,
    target: &Target,
    stamp: &str,
    walk: &ViewWalk,
    meta: &[PathBuf],
    sums: Vec<[u8; 20]>,
) -> Result<Written, VerifyError> {
    let mut parts = Vec::new();
    for p in meta {
        parts.push(fs::File::open(p).map_err(io(p))?);
    }
    let meta_mac =
        target.put_sealed_with(runner, Area::Manifests, &format!("{stamp}.meta"), |w| {
            parts
                .iter_mut()
                .try_for_each(|f| std::io::copy(f, w).map(drop))
        })?;
    let sha1_mac =
        target.put_sealed_with(runner, Area::Manifests, &format!("{stamp}.sha1"), |w| {
            manifest::format_pairs_to(w, walk.files().map(|(p, _)| p).zip(sums.iter()))
        })?;
    Ok(Written {
        sums,
        sha1_mac,
        meta_mac,
    })
}

/// What [`write_manifest`] wrote: each walked file's sha1 (in the walk's order), and the
/// MACs (hex) of the two files' exact bytes, for the run record that authenticates them.
pub struct Written {
    pub sums: Vec<[u8; 20]>,
    pub sha1_mac: Option<String>,
    pub meta_mac: Option<String>,
}

/// What a run's manifest can take from the last restore point's: the sha1 of every file
/// the run did not send and that did not change since that point (its ctime is older
/// than the point's stamp, and its encrypted path is the same) is the one in `prev`,
/// because current/ still holds that point's ciphertext of it (reverse mode is
/// deterministic). So a nightly run hashes what changed, not the whole dataset.
pub struct Reuse {
    /// The last restore point's manifest ([`PrevManifest`]).
    pub prev: PrevManifest,
    /// Paths (relative to the view) to hash again: sent, or changed since that point.
    pub rehash: manifest::PathSet,
}

/// The last restore point's manifest, as this run's own checked copy
/// ([`Target::checked_manifest_copy`]), read as a stream when the manifest is made: a
/// manifest snapveil wrote lists its files in the walk's order (by path bytes), so the
/// two are merged as they go and it costs no memory that grows with the tree.
pub struct PrevManifest {
    copy: crate::target::LocalCopy,
    file: String,
}

impl PrevManifest {
    /// [`merge_sums`] from this manifest.
    fn merge(
        &self,
        files: impl Iterator<Item = Vec<u8>>,
        rehash: &manifest::PathSet,
        out: &mut [[u8; 20]],
        known: &mut [u64],
    ) -> Result<usize, VerifyError> {
        let f = fs::File::open(&self.copy.path).map_err(io(&self.copy.path))?;
        let lines =
            manifest::Reader::new(&self.file, std::io::BufReader::with_capacity(1 << 16, f));
        merge_sums(lines, files, rehash, out, known)
    }
}

/// For each of `files` (paths, in the walk's order: by path bytes) that `lines` lists
/// and `rehash` does not: its sum into `out`, and its bit set in `known`. Returns how
/// many. Both go in one order, so they are merged, one line held at a time.
///
/// # Errors
/// A line that does not parse or is not after the one before (then nothing it said may
/// be used).
fn merge_sums<R: std::io::BufRead>(
    mut lines: manifest::Reader<R>,
    files: impl Iterator<Item = Vec<u8>>,
    rehash: &manifest::PathSet,
    out: &mut [[u8; 20]],
    known: &mut [u64],
) -> Result<usize, VerifyError> {
    // The line at hand (path, sum), while there is one.
    let mut line: Vec<u8> = Vec::new();
    let mut sum = [0u8; 20];
    // A parsed line's path is never empty, so the empty start is before every line.
    let mut next = |line: &mut Vec<u8>, sum: &mut [u8; 20]| -> Result<bool, VerifyError> {
        let Some((p, s)) = lines.next_entry()? else {
            return Ok(false);
        };
        if p <= line.as_slice() {
            return Err(manifest::ManifestError::Order {
                file: lines.file().into(),
                line: lines.line(),
            }
            .into());
        }
        line.clear();
        line.extend_from_slice(p);
        *sum = s;
        Ok(true)
    };
    let mut more = next(&mut line, &mut sum)?;
    let mut found = 0;
    for (i, path) in files.enumerate() {
        while more && line < path {
            more = next(&mut line, &mut sum)?;
        }
        if more && line == path && !rehash.contains(&path) {
            out[i] = sum;
            known[i / 64] |= 1 << (i % 64);
            found += 1;
        }
    }
    // The rest is read too: a manifest out of order anywhere is not used anywhere.
    while more {
        more = next(&mut line, &mut sum)?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(manifest: &str, files: &[&str], rehash: &[&str]) -> Result<Vec<Option<u8>>, String> {
        let lines = manifest::Reader::new("m.sha1", manifest.as_bytes());
        let mut set = manifest::PathSet::new();
        for p in rehash {
            set.insert(p.as_bytes());
        }
        set.seal();
        let mut out = vec![[0u8; 20]; files.len()];
        let mut known = vec![0u64; files.len().div_ceil(64)];
        let files = files.iter().map(|f| f.as_bytes().to_vec());
        let found =
            merge_sums(lines, files, &set, &mut out, &mut known).map_err(|e| e.to_string())?;
        let got: Vec<Option<u8>> = (0..out.len())
            .map(|i| (known[i / 64] & (1 << (i % 64)) != 0).then_some(out[i][0]))
            .collect();
        assert_eq!(found, got.iter().flatten().count());
        Ok(got)
    }

    fn line(sum: u8, path: &str) -> String {
        format!("{}  {path}\n", hex::encode([sum; 20]))
    }

    #[test]
    fn the_last_manifest_gives_the_sums_of_the_files_it_lists_and_no_others() {
        let m = [
            line(1, "a"),
            line(2, "a-b"),
            line(3, "a/x"),
            line(4, "b"),
            line(5, "z"),
        ]
        .concat();
        // New files, gone files, and files to hash again are not taken from it.
        let got = merged(&m, &["0", "a", "a/x", "a/y", "b", "c"], &["b"]).unwrap();
        assert_eq!(got, [None, Some(1), Some(3), None, None, None]);
        // Every file, and none.
        let all = merged(&m, &["a", "a-b", "a/x", "b", "z"], &[]).unwrap();
        assert_eq!(all, [Some(1), Some(2), Some(3), Some(4), Some(5)]);
        assert_eq!(merged(&m, &[], &[]).unwrap(), Vec::<Option<u8>>::new());
        assert_eq!(merged("", &["a"], &[]).unwrap(), [None]);
    }

    #[test]
    fn an_escaped_name_is_matched_by_its_bytes() {
        let m = format!("\\{}  a\\nb\n{}", hex::encode([7; 20]), line(8, "c"));
        assert_eq!(merged(&m, &["a\nb", "c"], &[]).unwrap(), [Some(7), Some(8)]);
    }

    #[test]
    fn the_meta_written_out_is_what_the_walk_held_and_the_rest_stays() {
        use crate::manifest::meta::{Kind, MetaEntry};
        let e = |path: &str, kind: Kind, mtime_ns: i128| MetaEntry {
            path: path.into(),
            kind,
            mode: 0o640,
            uid: 7,
            gid: 8,
            mtime_ns,
        };
        let found = vec![
            (e("", Kind::Dir, 1), None, 1),
            (e("d", Kind::Dir, -2), None, 2),
            (e("d/f", Kind::File, 3_000_000_001), Some(3), 3),
            (e("d/l", Kind::Symlink(b"t a\\rget".to_vec()), 4), None, 4),
            (e("d-x", Kind::Char(0x0103), 5), None, 5),
            (e("g", Kind::File, 6), Some(6), 6),
        ];
        let mut w = ViewWalk::from_found(Path::new("/v"), found);
        let mut want = Vec::new();
        manifest::meta::format_to(&mut want, w.meta()).unwrap();
        let before: Vec<_> = w.entries().map(|e| (e.path, e.fp, e.is_dir)).collect();
        let files: Vec<_> = w.files().collect();
        let (mut got, mut rest) = (Vec::new(), Vec::new());
        w.write_meta(&mut got, &mut rest).unwrap();
        assert!(!rest.is_empty(), "the second half has lines");
        got.extend(rest);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want)
        );
        let back = manifest::meta::parse("m", &got).unwrap();
        assert_eq!(back.len(), 6);
        assert_eq!(back[4].kind, Kind::Symlink(b"t a\\rget".to_vec()));
        assert!(w.metas.is_empty() && w.special.is_empty());
        let after: Vec<_> = w.entries().map(|e| (e.path, e.fp, e.is_dir)).collect();
        assert_eq!(after, before);
        assert_eq!(w.files().collect::<Vec<_>>(), files);
        assert_eq!(files, [(b"d/f".to_vec(), 3), (b"g".to_vec(), 6)]);
    }

    #[test]
    fn a_manifest_out_of_order_or_damaged_is_not_used() {
        let m = [line(1, "b"), line(2, "a")].concat();
        let e = merged(&m, &["a", "b"], &[]).unwrap_err();
        assert!(e.contains("m.sha1:2: not in path order"), "{e}");
        let twice = [line(1, "a"), line(2, "a")].concat();
        assert!(merged(&twice, &["a"], &[]).is_err());
        let bad = [line(1, "a"), "xyz  b\n".into()].concat();
        let e = merged(&bad, &["a", "b"], &[]).unwrap_err();
        assert!(e.contains("m.sha1:2: not a sha1sum line"), "{e}");
    }
}

/// One walk of a mounted view: every entry's metadata (lstat, readlink; sorted by
/// path, the root first) and its regular files with their ctimes. A run walks its view
/// once and uses the walk for the plan, the checksum pass and the manifest: the view
/// shows a frozen snapshot, so it cannot change in between.
///
/// A walk is most of a run's memory on a big tree (issue 13), so it is held packed:
/// each entry's own name (not its path: a path repeats its parents' names, and deep
/// trees have long ones) in one buffer with its parent's number, 17 bytes of what the
/// plan and the manifest need ([`Rec`] and a [`KindTag`]) and 24 of what only the
/// `.meta` file needs ([`MetaRec`]), which a run writes out and drops as soon as the
/// walk is done ([`ViewWalk::write_meta`]); not a [`MetaEntry`] with its own
/// allocation (about 2.5 times as much). Paths are put together when asked for.
/// Entries are in the order the walk gives them, which is path order
/// ([`crate::view::ViewCore::walk`]): the order of the manifests, with no sort of its own.
pub struct ViewWalk {
    /// The view's root.
    pub root: PathBuf,
    /// Every entry's name, end to end; entry `i`'s ends at `name_ends[i]` (4 GiB of
    /// names at most: some 100 million entries).
    names: Vec<u8>,
    name_ends: Vec<u32>,
    /// Each entry's parent directory ([`NO_PARENT`] for the root).
    parents: Vec<u32>,
    recs: Vec<Rec>,
    kinds: Vec<KindTag>,
    /// Empty once written out ([`ViewWalk::write_meta`]).
    metas: Vec<MetaRec>,
    /// What a [`MetaRec`] has no room for: symlink targets and device numbers, by entry
    /// (ascending: pushed in walk order). Empty once written out, too.
    special: Vec<(u32, manifest::meta::Kind)>,
    /// [`ViewWalk::write_meta`] ran: `metas` and `special` are gone.
    meta_written: bool,
    /// How many of the entries are regular files.
    n_files: usize,
}

/// The root's parent in [`ViewWalk::parents`].
const NO_PARENT: u32 = u32::MAX;

/// What the plan and the manifest need of an entry of a [`ViewWalk`].
#[derive(Clone, Copy)]
struct Rec {
    /// [`crate::changes::fingerprint`].
    fp: u64,
    /// Regular files: the ctime in unix seconds (0 for the rest).
    ctime_s: i64,
}

/// What only the `.meta` file needs of an entry of a [`ViewWalk`].
#[derive(Clone, Copy)]
struct MetaRec {
    mtime_s: i64,
    uid: u32,
    gid: u32,
    mtime_nsec: u32,
    /// Permission bits (`& 0o7777`).
    mode: u16,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KindTag {
    Dir,
    File,
    Special,
}

/// One entry of a [`ViewWalk`], as the plan needs it.
pub struct WalkEntry {
    /// Relative to the view; empty for the root.
    pub path: Vec<u8>,
    pub fp: u64,
    pub is_dir: bool,
}

impl ViewWalk {
    fn name(&self, i: u32) -> &[u8] {
        let i = i as usize;
        let start = if i == 0 {
            0
        } else {
            self.name_ends[i - 1] as usize
        };
        &self.names[start..self.name_ends[i] as usize]
    }

    /// Entry `i`'s path relative to the view.
    fn path(&self, i: u32) -> Vec<u8> {
        let mut chain = Vec::new();
        let mut cur = i;
        while self.parents[cur as usize] != NO_PARENT {
            chain.push(cur);
            cur = self.parents[cur as usize];
        }
        let mut p = Vec::with_capacity(chain.iter().map(|c| self.name(*c).len() + 1).sum());
        for (k, c) in chain.iter().rev().enumerate() {
            if k > 0 {
                p.push(b'/');
            }
            p.extend_from_slice(self.name(*c));
        }
        p
    }

    pub fn len(&self) -> usize {
        self.recs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Every entry, by path.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = WalkEntry> + '_ {
        (0..self.len() as u32).map(|i| WalkEntry {
            path: self.path(i),
            fp: self.recs[i as usize].fp,
            is_dir: self.kinds[i as usize] == KindTag::Dir,
        })
    }

    /// Writes the `.meta` file of the walk ([`manifest::meta::format_to`] of
    /// [`ViewWalk::meta`]) in two halves, the first (with the header) to `first` and the
    /// rest to `second`, each on a thread of its own (a run waits for it: about 0.04 s
    /// for 100,000 entries on one thread), then drops what only it needed.
    ///
    /// # Errors
    /// Writing fails; the walk keeps its metadata then.
    pub fn write_meta(
        &mut self,
        first: &mut (dyn std::io::Write + Send),
        second: &mut (dyn std::io::Write + Send),
    ) -> std::io::Result<()> {
        let half = self.len() / 2;
        let this = &*self;
        std::thread::scope(|s| {
            let rest =
                s.spawn(move || manifest::meta::format_lines_to(second, this.meta_from(half)));
            let head = manifest::meta::format_to(first, this.meta_from(0).take(half));
            let rest = rest.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            head.and(rest)
        })?;
        self.metas = Vec::new();
        self.special = Vec::new();
        self.meta_written = true;
        Ok(())
    }

    /// Every entry's metadata record, by path (made on the fly: a run writes them once).
    ///
    /// # Panics
    /// After [`ViewWalk::write_meta`].
    pub fn meta(&self) -> impl ExactSizeIterator<Item = MetaEntry> + '_ {
        self.meta_from(0)
    }

    /// [`ViewWalk::meta`] from the `first`th on.
    fn meta_from(&self, first: usize) -> impl ExactSizeIterator<Item = MetaEntry> + '_ {
        use manifest::meta::Kind;
        assert!(
            !self.meta_written,
            "the walk's metadata was written out and dropped"
        );
        (first.min(self.len()) as u32..self.len() as u32).map(|i| {
            let r = &self.metas[i as usize];
            let kind = match self.kinds[i as usize] {
                KindTag::Dir => Kind::Dir,
                KindTag::File => Kind::File,
                KindTag::Special => {
                    let k = self
                        .special
                        .binary_search_by_key(&i, |(j, _)| *j)
                        .expect("a special entry has its kind");
                    self.special[k].1.clone()
                }
            };
            MetaEntry {
                path: self.path(i),
                kind,
                mode: u32::from(r.mode),
                uid: r.uid,
                gid: r.gid,
                mtime_ns: i128::from(r.mtime_s) * 1_000_000_000 + i128::from(r.mtime_nsec),
            }
        })
    }

    /// Regular files, by path: (path relative to the view, ctime).
    pub fn files(&self) -> impl Iterator<Item = (Vec<u8>, i64)> + '_ {
        self.files_from(0)
    }

    /// How many [`ViewWalk::files`] there are.
    pub fn file_count(&self) -> usize {
        self.n_files
    }

    /// [`ViewWalk::files`] from the `first`th on.
    fn files_from(&self, first: usize) -> impl Iterator<Item = (Vec<u8>, i64)> + '_ {
        // Found among the entries (not kept in a list of their own: 4 bytes a file less).
        (0..self.len() as u32)
            .filter(|i| self.kinds[*i as usize] == KindTag::File)
            .skip(first)
            .map(|i| (self.path(i), self.recs[i as usize].ctime_s))
    }
}

/// Collects a [`ViewWalk`] entry by entry, parents before their entries.
struct WalkBuilder {
    walk: ViewWalk,
    /// The directories whose entries may still come, from the root down: (path, entry).
    stack: Vec<(Vec<u8>, u32)>,
    /// The path pushed last (debug builds check the order).
    #[cfg(debug_assertions)]
    last: Option<Vec<u8>>,
}

impl WalkBuilder {
    fn new(root: &Path) -> Self {
        WalkBuilder {
            walk: ViewWalk {
                root: root.to_path_buf(),
                names: Vec::new(),
                name_ends: Vec::new(),
                parents: Vec::new(),
                recs: Vec::new(),
                kinds: Vec::new(),
                metas: Vec::new(),
                special: Vec::new(),
                meta_written: false,
                n_files: 0,
            },
            stack: Vec::new(),
            #[cfg(debug_assertions)]
            last: None,
        }
    }

    /// One entry at `path` (`m.path` is not read), the root first, then in path order
    /// (by the paths' bytes): `ctime` (unix seconds) is a regular file's, `fp` the
    /// entry's fingerprint.
    ///
    /// # Panics
    /// When `path`'s parent was not given before it, or was left behind: a walk out of
    /// order.
    fn push(
        &mut self,
        path: &[u8],
        m: MetaEntry,
        ctime: Option<i64>,
        fp: u64,
    ) -> Result<(), VerifyError> {
        use manifest::meta::Kind;
        let too_big = |what: &str| VerifyError::Io {
            path: self.walk.root.clone(),
            source: std::io::Error::other(format!("more than {what} in one view")),
        };
        let i = u32::try_from(self.walk.recs.len())
            .ok()
            .filter(|i| *i != NO_PARENT)
            .ok_or_else(|| too_big("2^32 - 1 entries"))?;
        let end = u32::try_from(self.walk.names.len() + path.len())
            .map_err(|_| too_big("4 GiB of names"))?;
        #[cfg(debug_assertions)]
        {
            let last = self.last.replace(path.to_vec());
            assert!(
                last.is_none_or(|l| l.as_slice() < path),
                "a walk gives its entries in path order"
            );
        }
        let (parent, name) = if i == 0 {
            assert!(path.is_empty(), "a walk starts at the root");
            (NO_PARENT, path)
        } else {
            let (dir, name) = match path.iter().rposition(|b| *b == b'/') {
                Some(k) => (&path[..k], &path[k + 1..]),
                None => (&path[..0], path),
            };
            let k = self
                .stack
                .iter()
                .rposition(|(p, _)| p.as_slice() == dir)
                .expect("a walk gives each directory before its entries");
            let parent = self.stack[k].1;
            // The directories above it whose entries are all behind: in path order a
            // directory's entries may still come after this one only when this one's
            // path extends the directory's with a byte below `/` (`L`, `L.name`, `L/x`).
            let mut j = self.stack.len();
            while j > k + 1 {
                j -= 1;
                let p = &self.stack[j].0;
                let still = path.len() > p.len() && path.starts_with(p) && path[p.len()] < b'/';
                if !still {
                    self.stack.remove(j);
                }
            }
            (parent, name)
        };
        if m.kind == Kind::Dir {
            self.stack.push((path.to_vec(), i));
        }
        let w = &mut self.walk;
        w.names.extend_from_slice(name);
        debug_assert!(w.names.len() <= end as usize);
        w.name_ends.push(w.names.len() as u32);
        w.parents.push(parent);
        let (s, n) = m.mtime();
        let kind = match m.kind {
            Kind::Dir => KindTag::Dir,
            Kind::File => KindTag::File,
            other => {
                w.special.push((i, other));
                KindTag::Special
            }
        };
        w.recs.push(Rec {
            fp,
            ctime_s: ctime.unwrap_or(0),
        });
        w.kinds.push(kind);
        w.metas.push(MetaRec {
            mtime_s: s,
            uid: m.uid,
            gid: m.gid,
            mtime_nsec: n as u32,
            mode: (m.mode & 0o7777) as u16,
        });
        Ok(())
    }

    /// The walk, its buffers trimmed.
    fn finish(self) -> ViewWalk {
        let WalkBuilder { mut walk, .. } = self;
        walk.names.shrink_to_fit();
        walk.name_ends.shrink_to_fit();
        walk.parents.shrink_to_fit();
        walk.recs.shrink_to_fit();
        walk.kinds.shrink_to_fit();
        walk.metas.shrink_to_fit();
        walk.special.shrink_to_fit();
        walk.n_files = walk.kinds.iter().filter(|k| **k == KindTag::File).count();
        walk
    }
}

/// Walks the view at `view` ([`ViewWalk`]) through the mount: what a run walked before
/// [`walk_core`], kept as the oracle `walk_core` is tested against.
///
/// # Errors
/// An unreadable entry, by path.
#[cfg(test)]
pub fn walk_view(view: &Path) -> Result<ViewWalk, VerifyError> {
    /// Entries with the ctime of regular files (`None` for the others).
    type Found = Vec<(MetaEntry, Option<i64>, u64)>;
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
    Ok(ViewWalk::from_found(view, found))
}

/// What [`walk_view`] finds in the view mounted at `root`, learnt from the view's core in
/// this process ([`crate::view::ViewCore::walk`]) instead of through the mount: the same
/// entries with the same attributes, without a FUSE round trip per directory page.
///
/// # Errors
/// An unreadable entry of the source, by path.
pub fn walk_core(core: &crate::view::ViewCore, root: &Path) -> Result<ViewWalk, VerifyError> {
    use crate::manifest::meta::Kind as M;
    use crate::view::Kind as V;
    use std::time::UNIX_EPOCH;
    fn at(t: std::time::SystemTime) -> i128 {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_nanos() as i128,
            Err(e) => -(e.duration().as_nanos() as i128),
        }
    }
    let mut b = WalkBuilder::new(root);
    core.walk::<VerifyError>(&mut |path, a, link| {
        let kind = match a.kind {
            V::Dir => M::Dir,
            V::File => M::File,
            V::Symlink => M::Symlink(link.unwrap_or_default()),
            V::Fifo => M::Fifo,
            V::Socket => M::Socket,
            V::CharDev => M::Char(u64::from(a.rdev)),
            V::BlockDev => M::Block(u64::from(a.rdev)),
        };
        let ctime = (a.kind == V::File).then(|| at(a.ctime).div_euclid(1_000_000_000) as i64);
        let entry = MetaEntry {
            path: Vec::new(), // in the walk's buffer instead
            kind,
            mode: u32::from(a.perm),
            uid: a.uid,
            gid: a.gid,
            mtime_ns: at(a.mtime),
        };
        let fp = crate::changes::fingerprint(&entry, a.size, at(a.ctime));
        b.push(path, entry, ctime, fp)
    })?;
    Ok(b.finish())
}

#[cfg(test)]
fn ns(secs: i64, nsecs: i64) -> i128 {
    i128::from(secs) * 1_000_000_000 + i128::from(nsecs)
}

impl ViewWalk {
    /// The walk of `found` (entry, ctime of a regular file, fingerprint): the tests' way
    /// to make one.
    #[cfg(test)]
    pub(crate) fn from_found(root: &Path, found: Vec<(MetaEntry, Option<i64>, u64)>) -> ViewWalk {
        let mut found = found;
        // In path order, as a walk gives them.
        found.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        let mut b = WalkBuilder::new(root);
        for (mut m, ct, fp) in found {
            let path = std::mem::take(&mut m.path);
            b.push(&path, m, ct, fp).expect("a small test walk");
        }
        b.finish()
    }
}

/// Hashes the files of `walk` for the manifest. The FUSE handlers of a view served by
/// this process encrypt on rayon's pool, so hashing must not run on that pool too (its
/// workers would block in reads only the pool can answer: a deadlock): two plain
/// threads instead.
///
/// # Errors
/// Reading a file of the view.
pub fn hash_view(walk: &ViewWalk, reuse: Option<&Reuse>) -> Result<Vec<[u8; 20]>, VerifyError> {
    let n = walk.file_count();
    // In walk order (sorted by path). `known`: taken from the last manifest, a bit a file.
    let mut out = vec![[0u8; 20]; n];
    let mut known = vec![0u64; n.div_ceil(64)];
    if let Some(r) = reuse {
        let files = walk.files().map(|(p, _)| p);
        if let Err(e) = r.prev.merge(files, &r.rehash, &mut out, &mut known) {
            tracing::warn!(
                "the last restore point's manifest cannot be used ({}): hashing every file",
                crate::error::Chain(&e)
            );
            known.fill(0);
        }
    }
    let half = n.div_ceil(2).max(1);
    let hashed = std::sync::atomic::AtomicUsize::new(0);
    // Each thread fills its half of the result in place: no list of paths, no second
    // copy of the sums to join (both per file, at the run's peak).
    let known = &known;
    let hash = |first: usize, out: &mut [[u8; 20]]| -> Result<(), VerifyError> {
        let mut buf = vec![0u8; manifest::SHA1_BUF];
        for (k, ((rel, _), sum)) in walk.files_from(first).zip(out.iter_mut()).enumerate() {
            let i = first + k;
            if known[i / 64] & (1 << (i % 64)) != 0 {
                continue;
            }
            hashed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = walk.root.join(OsStr::from_bytes(&rel));
            *sum = manifest::sha1_file_with(&p, &mut buf).map_err(io(&p))?;
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let hs: Vec<_> = out
            .chunks_mut(half)
            .enumerate()
            .map(|(i, c)| s.spawn(move || hash(i * half, c)))
            .collect();
        hs.into_iter()
            .try_for_each(|h| h.join().expect("hash thread"))
    })?;
    tracing::info!(
        files = out.len(),
        hashed = hashed.into_inner(),
        "manifest of the view"
    );
    Ok(out)
}

/// The manifest of restore point `stamp` (of `contents`, as scanned): sha1 by
/// encrypted path, checked against the MAC in its sealed record first.
///
/// # Errors
/// No restore point, no manifest for it, a tampered manifest, or a transfer/parse
/// failure.
pub fn manifest_of(
    runner: &dyn Runner,
    target: &Target,
    contents: &crate::target::Contents,
    stamp: &str,
) -> Result<BTreeMap<Vec<u8>, [u8; 20]>, VerifyError> {
    let sub = format!("manifests/{stamp}.sha1");
    let data = checked_manifest(runner, target, contents, stamp)?;
    Ok(manifest::parse(&sub, &data)?
        .into_iter()
        .map(|e| (e.path, e.sha1))
        .collect())
}

/// The manifest of restore point `stamp`, for the next one to take its sums from
/// ([`PrevManifest`]). Its hashes go into the new manifest, which the new record seals:
/// a provider's edit must not be laundered into an authenticated manifest, so it is
/// checked against its MAC on the way in.
///
/// # Errors
/// As [`manifest_of`].
pub fn prev_manifest(
    runner: &dyn Runner,
    target: &Target,
    contents: &crate::target::Contents,
    stamp: &str,
) -> Result<PrevManifest, VerifyError> {
    let copy = target
        .checked_manifest_copy(runner, contents, stamp, "sha1")?
        .ok_or_else(|| VerifyError::NoManifest {
            target: target.address().to_string(),
            stamp: stamp.into(),
        })?;
    Ok(PrevManifest {
        copy,
        file: format!("manifests/{stamp}.sha1"),
    })
}

/// The bytes of `manifests/STAMP.sha1`, checked against the MAC its record carries.
fn checked_manifest(
    runner: &dyn Runner,
    target: &Target,
    contents: &crate::target::Contents,
    stamp: &str,
) -> Result<Vec<u8>, VerifyError> {
    let data = target
        .fetch(runner, Area::Manifests, &format!("{stamp}.sha1"))?
        .ok_or_else(|| VerifyError::NoManifest {
            target: target.address().to_string(),
            stamp: stamp.into(),
        })?;
    target.check_manifest(contents, stamp, "sha1", &data)?;
    Ok(data)
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Compares a local tree (a local target's `current/`) with a manifest.
///
/// # Errors
/// The tree cannot be read.
pub fn check_local(
    current: &Path,
    want: &BTreeMap<Vec<u8>, [u8; 20]>,
) -> Result<Report, VerifyError> {
    let have: BTreeMap<Vec<u8>, [u8; 20]> = manifest::build(current)?
        .into_iter()
        .map(|e| (e.path, e.sha1))
        .collect();
    Ok(compare(&have, want))
}

/// What `current/` holds (`have`: path → sha1) against the manifest `want`.
fn compare(have: &BTreeMap<Vec<u8>, [u8; 20]>, want: &BTreeMap<Vec<u8>, [u8; 20]>) -> Report {
    let mut r = Report {
        checked: have.len() as u64,
        ..Report::default()
    };
    for (p, s) in want {
        match have.get(p) {
            None => r.missing.push(lossy(p)),
            Some(h) if h != s => r.differing.push(lossy(p)),
            Some(_) => {}
        }
    }
    r.extra = have
        .keys()
        .filter(|p| !want.contains_key(*p))
        .map(|p| lossy(p))
        .collect();
    r
}

/// Compares the target's `current/` with the encrypted view at `view` by rsync
/// `--dry-run --checksum --itemize-changes` (the checksums of the remote files are
/// computed on the backup host; no data is downloaded), judging each difference with
/// the manifest `want` of the last run.
///
/// # Errors
/// rsync failing.
pub fn check_view_against_target(
    runner: &dyn Runner,
    target: &Target,
    view: &Path,
    want: &BTreeMap<Vec<u8>, [u8; 20]>,
) -> Result<Report, VerifyError> {
    let out = target.compare_view(runner, view)?;
    let mut r = Report {
        checked: want.len() as u64,
        ..Report::default()
    };
    for line in out.lines() {
        let (code, path) = match line.split_once(' ') {
            Some((c, p)) => (c, p.trim_start()),
            None => continue,
        };
        let pb = path.as_bytes().to_vec();
        if code == "*deleting" {
            if path.ends_with('/') {
                // A directory only on the target: its files are listed one by one too.
                continue;
            }
            // On the target, not in the view: fine if the last run had it (the source
            // deleted it since), an extra file otherwise.
            if !want.contains_key(&pb) {
                r.extra.push(path.into());
            }
        } else if code.len() >= 3 && code.as_bytes()[1] == b'f' {
            let new = code[2..].starts_with('+');
            match want.get(&pb) {
                None if new => {} // created in the source since the last run
                None => r.unverifiable.push(path.into()),
                Some(s) => {
                    let now =
                        manifest::sha1_file(&view.join(path)).map_err(io(&view.join(path)))?;
                    if &now != s {
                        r.unverifiable.push(path.into());
                    } else if new {
                        r.missing.push(path.into());
                    } else {
                        r.differing.push(path.into());
                    }
                }
            }
        }
    }
    Ok(r)
}

/// Loads and unlocks a job's key.
///
/// # Errors
/// Unreadable or too open key files, wrong password.
pub fn unlock(job: &Job) -> Result<(KeyConfig, MasterKey), VerifyError> {
    let key = KeyConfig::load(&job.key_config)?;
    let master = key.unlock_with_passfile(&job.passfile)?;
    Ok((key, master))
}

/// Deep check: every file of the target's `current/` (as listed by the manifest) is
/// decrypted in memory and compared with the plaintext at its decrypted path in
/// `snapshot`. Remote files are fetched one at a time into a scratch file that is
/// deleted right after, so no second copy of the backup exists on disk.
///
/// # Errors
/// Transfer failures; per-file problems go into the report.
pub fn deep(
    runner: &dyn Runner,
    target: &Target,
    keys: &Keys,
    snapshot: &Path,
    want: &BTreeMap<Vec<u8>, [u8; 20]>,
) -> Result<Report, VerifyError> {
    let mut r = Report::default();
    for cpath in want.keys() {
        // Long-named files need their `.name` file to be placed; not resolved here.
        let last = cpath.rsplit(|b| *b == b'/').next().unwrap_or(cpath);
        if names::is_support_cpath(cpath) || last.starts_with(LONGNAME_PREFIX.as_bytes()) {
            continue;
        }
        let shown = lossy(cpath);
        let plain = match names::decrypt_cpath(keys, cpath) {
            Some(p) => p,
            None => {
                // Long-named components need their `.name` file; not resolved here.
                r.unverifiable
                    .push(format!("{shown} (long or undecryptable name)"));
                continue;
            }
        };
        let cipher = target.read_current(runner, cpath)?;
        r.checked += 1;
        let cipher = match cipher {
            Ok(c) => c,
            Err(e) => {
                r.missing.push(format!("{shown}: {e}"));
                continue;
            }
        };
        let ppath = snapshot.join(OsStr::from_bytes(&plain));
        let mut expected = Vec::new();
        if let Err(e) = fs::File::open(&ppath).and_then(|mut f| f.read_to_end(&mut expected)) {
            r.unverifiable
                .push(format!("{shown}: {}: {e}", ppath.display()));
            continue;
        }
        match content::decrypt_all(
            keys,
            &cipher,
            Some(&content::FileIvs::for_cpath(cpath).file_id),
        ) {
            Ok(p) if p == expected => {}
            Ok(_) => r
                .wrong_plaintext
                .push(format!("{shown} ({})", lossy(&plain))),
            Err(why) => r
                .wrong_plaintext
                .push(format!("{shown} ({}): {why}", lossy(&plain))),
        }
    }
    Ok(r)
}

/// The work of `snapveil verify`, also used by a run every `verify_every` runs.
///
/// # Errors
/// Key, snapshot, mount or transfer failures.
pub fn verify_job(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    deep_check: bool,
) -> Result<Report, VerifyError> {
    let (key, master) = unlock(job)?;
    let target = Target::for_job(cfg, job).with_auth(crate::crypto::RecordKey::new(&master));
    let contents = target.scan(runner)?;
    let (chain, notes) = chain_report(cfg, job, &target, &contents)?;
    let stamp = contents
        .points
        .last()
        .cloned()
        .ok_or_else(|| VerifyError::NoRun {
            target: target.address().to_string(),
        })?;
    let want = match manifest_of(runner, &target, &contents, &stamp) {
        Ok(w) => w,
        // A tampered manifest is a finding, reported with the rest.
        Err(VerifyError::Target(crate::target::TargetError::Tampered { file, why, .. })) => {
            return Ok(Report {
                tampered: [chain, vec![format!("TAMPERED: {file}: {why}")]].concat(),
                notes,
                ..Report::default()
            })
        }
        Err(e) => return Err(e),
    };
    tracing::info!(stamp = %stamp, files = want.len(), "verifying against the manifest of the last run");
    let here = target.current_here();
    if let (Some(current), false) = (&here, deep_check) {
        let mut r = check_local(current, &want)?;
        r.tampered = chain;
        r.notes = notes;
        return Ok(r);
    }
    // An ssh target with a shell hashes its own files: checked against the
    // authenticated manifest alone, without reading the source (a weekly verify).
    if !deep_check {
        if let Some(have) = target.remote_sums(runner)? {
            let mut r = compare(&have, &want);
            r.tampered = chain;
            r.notes = notes;
            return Ok(r);
        }
    }
    // A fresh snapshot: the view to compare a remote target with, and the plaintext for
    // a deep check. The job lock keeps a run from using the same names meanwhile.
    let _lock = crate::lock::JobLock::acquire(&cfg.state_dir, &job.name)?;
    let guard = crate::job::take_snapshot(runner, cfg, job, &crate::snapshot::now_stamp())
        .map_err(|e| VerifyError::Snapshot(crate::snapshot::error_chain(&e)))?;
    let snap = guard.path().to_path_buf();
    let mut report = match &here {
        Some(current) => check_local(current, &want)?,
        None => {
            let mp = cfg
                .state_dir
                .join("view")
                .join(format!("{}.verify", job.name));
            let view = crate::job::mount_view(
                job,
                &snap,
                guard.consistent(),
                &mp,
                key.clone(),
                master.clone(),
            )?;
            let r = check_view_against_target(runner, &target, &mp, &want);
            view.unmount()?;
            r?
        }
    };
    if deep_check {
        let keys = Keys::new(&master, key.flags);
        let d = deep(runner, &target, &keys, &snap, &want)?;
        report.wrong_plaintext = d.wrong_plaintext;
        report.missing.extend(d.missing);
        report.unverifiable.extend(d.unverifiable);
    }
    guard
        .release()
        .map_err(|e| VerifyError::Snapshot(crate::snapshot::error_chain(&e)))?;
    report.tampered = chain;
    report.notes = notes;
    Ok(report)
}

/// The chain check of a target's records (tampered records, gaps, rollback against what
/// this machine last wrote: [`crate::target::chain`]) as report lines: problems, and
/// notes (unauthenticated restore points of older snapveils, accepted damage).
///
/// # Errors
/// The agent's chain state cannot be read.
pub fn chain_report(
    cfg: &Config,
    job: &Job,
    target: &Target,
    contents: &crate::target::Contents,
) -> Result<(Vec<String>, Vec<String>), VerifyError> {
    let state =
        crate::target::chain::load_state(&cfg.state_dir, &job.name, &target.address().to_string())?;
    let v = contents.chain(state.as_ref());
    let mut notes = v.warnings;
    let old = contents.unsealed();
    if !old.is_empty() {
        notes.push(format!(
            "{} restore point(s) unauthenticated (older version of snapveil, no MAC): {}",
            old.len(),
            old.join(", ")
        ));
    }
    Ok((v.problems.iter().map(ToString::to_string).collect(), notes))
}

#[cfg(test)]
mod walk_tests {
    use super::*;
    use crate::view::mount::{MountedView, ViewOptions};
    use std::os::unix::fs::symlink;

    /// A packed walk gives back exactly what was put in, sorted by path: every kind
    /// (link targets, device numbers), modes, owners, mtimes before 1970 and with
    /// nanoseconds, file ctimes and fingerprints.
    #[test]
    fn a_packed_walk_gives_back_every_entry_sorted() {
        use manifest::meta::Kind;
        let e = |path: &str, kind: Kind, mode: u32, mtime_ns: i128| MetaEntry {
            path: path.as_bytes().to_vec(),
            kind,
            mode,
            uid: 1000,
            gid: 100,
            mtime_ns,
        };
        let found = vec![
            (
                e("b/f", Kind::File, 0o640, 1_700_000_000_123_456_789),
                Some(1_700_000_001),
                7,
            ),
            (e("", Kind::Dir, 0o755, 0), None, 1),
            (e("b", Kind::Dir, 0o7777, -1_500_000_000), None, 2),
            (
                e("a-link", Kind::Symlink(b"../x y".to_vec()), 0o777, -1),
                None,
                3,
            ),
            (e("b/tty", Kind::Char(0x0504), 0o620, 5), None, 4),
            (e("a", Kind::File, 0o600, 6), Some(-2), 5),
            (e("b/blk", Kind::Block(u64::MAX), 0o660, 7), None, 6),
        ];
        let mut want: Vec<_> = found.iter().map(|(m, _, _)| m.clone()).collect();
        want.sort_by(|a, b| a.path.cmp(&b.path));
        let w = ViewWalk::from_found(Path::new("/v"), found);
        assert_eq!(w.len(), 7);
        assert_eq!(w.meta().collect::<Vec<_>>(), want);
        assert_eq!(
            w.files().collect::<Vec<_>>(),
            vec![(b"a".to_vec(), -2), (b"b/f".to_vec(), 1_700_000_001)]
        );
        let entries: Vec<_> = w
            .entries()
            .map(|e| (String::from_utf8(e.path).unwrap(), e.fp, e.is_dir))
            .collect();
        assert_eq!(
            entries,
            [
                ("", 1, true),
                ("a", 5, false),
                ("a-link", 3, false),
                ("b", 2, true)
            ]
            .into_iter()
            .chain([("b/blk", 6, false), ("b/f", 7, false), ("b/tty", 4, false)])
            .map(|(p, fp, d)| (p.to_string(), fp, d))
            .collect::<Vec<_>>()
        );
    }

    /// Paths sort by their bytes, though a walk is held as names under parents: a
    /// directory's entries come after its siblings whose names continue with a byte
    /// below `/` (`d-e`, `d.f` before `d/x`) and before those above it.
    #[test]
    fn a_packed_walk_sorts_by_path_bytes_across_directories() {
        use manifest::meta::Kind;
        let paths = [
            "", "d", "d/x", "d/x/y", "d/x-", "d-e", "d.f", "d0", "c", "c/z", "e", "e/a/b", "e/a",
            "\u{ff}",
        ];
        let found = paths
            .iter()
            .map(|p| {
                let is_dir = ["", "d", "d/x", "c", "e", "e/a"].contains(p);
                let m = MetaEntry {
                    path: p.as_bytes().to_vec(),
                    kind: if is_dir { Kind::Dir } else { Kind::File },
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 0,
                };
                (m, (!is_dir).then_some(0), 0)
            })
            .collect();
        let w = ViewWalk::from_found(Path::new("/v"), found);
        let mut want: Vec<Vec<u8>> = paths.iter().map(|p| p.as_bytes().to_vec()).collect();
        want.sort();
        assert_eq!(w.entries().map(|e| e.path).collect::<Vec<_>>(), want);
        assert_eq!(w.meta().map(|m| m.path).collect::<Vec<_>>(), want);
    }

    /// The walk a run takes in process is the walk through the mount, entry for entry:
    /// names (long ones, the IVs, the key config), kinds, modes, owners, mtimes, link
    /// targets, file ctimes, with excluded entries left out.
    #[test]
    fn walk_core_matches_the_walk_through_the_mount() {
        if !Path::new("/dev/fuse").exists() {
            panic!("this test needs /dev/fuse (make test installs fuse3)");
        }
        let t = tempfile::TempDir::new().unwrap();
        let (src, mp) = (t.path().join("src"), t.path().join("mnt"));
        fs::create_dir_all(src.join("a/b/c")).unwrap();
        fs::create_dir_all(src.join("skip/deep")).unwrap();
        fs::create_dir(&mp).unwrap();
        fs::write(src.join("a/f"), b"one").unwrap();
        fs::write(src.join("a/b/c/g"), vec![7u8; 70_000]).unwrap();
        fs::write(src.join("n".repeat(200)), b"long name").unwrap();
        fs::write(src.join("skip/deep/x"), b"excluded").unwrap();
        fs::write(src.join("a/excluded.tmp"), b"excluded").unwrap();
        symlink("a/f", src.join("link")).unwrap();
        nix::unistd::mkfifo(
            &src.join("a/fifo"),
            nix::sys::stat::Mode::from_bits(0o640).unwrap(),
        )
        .unwrap();
        fs::set_permissions(
            src.join("a/f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let master = crate::crypto::config::write_test_key(t.path());
        let key = KeyConfig::load(&t.path().join("k.conf")).unwrap();
        let v = MountedView::mount(
            &src,
            &mp,
            ViewOptions {
                key,
                master,
                excludes: vec!["/skip".into(), "*.tmp".into()],
                access: Default::default(),
                caching: crate::view::fuse::Caching::Frozen,
            },
        )
        .unwrap();
        let through = walk_view(&mp);
        let inside = walk_core(v.core(), &mp);
        v.unmount().unwrap();
        let (through, inside) = (through.unwrap(), inside.unwrap());
        // root, gocryptfs.conf, its diriv; a/ with diriv, f, fifo, b/ (diriv, c/ with diriv
        // and g); the link; the long name and its .name file. Nothing excluded.
        let meta = |w: &ViewWalk| w.meta().collect::<Vec<_>>();
        let fps = |w: &ViewWalk| {
            w.entries()
                .map(|e| (e.path, e.fp, e.is_dir))
                .collect::<Vec<_>>()
        };
        assert_eq!(through.len(), 15, "{:?}", meta(&through));
        assert_eq!(meta(&inside), meta(&through));
        assert_eq!(
            inside.files().collect::<Vec<_>>(),
            through.files().collect::<Vec<_>>()
        );
        assert_eq!(fps(&inside), fps(&through));
        assert!(meta(&inside)
            .iter()
            .any(|m| matches!(m.kind, manifest::meta::Kind::Symlink(ref l) if !l.is_empty())));
    }
}
