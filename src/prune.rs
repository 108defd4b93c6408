//! Pruning a target's restore points and `--backup-dir` generations by a retention
//! policy. This module owns what deleting a restore point means on the target, the
//! merge plan (pure: [`plan_prune`] over a [`Listing`]), and the three executors (local
//! path, ssh with a shell, rsync only). Which restore points to keep is
//! [`crate::retention`]'s decision; writing generations is the job runner's.
//!
//! # Model (derivation in docs/retention.md)
//! Runs r_1 < … < r_n (stamps). T_j is `current/` right after run j. Run j's generation
//! G_j holds, for every path run j replaced or deleted, T_{j-1}(p): the version valid
//! just before run j. A run with `runs/<stamp>.json` succeeded: it is a restore point
//! and T_j is the source as of its snapshot. So the state as of restore point i is, for
//! every path p that existed at i: G_j(p) for the *smallest* j > i with p in G_j, else
//! `current/p`. Paths created after i are in no generation older than their first
//! change, so the path set at i must come from elsewhere (`manifests/<stamp>.sha1`).
//!
//! # What a prune does, in this order (each step keeps every remaining record exact)
//! 1. Removes `runs/<stamp>.json` of the restore points the policy deletes, newest
//!    first, so that an interrupted prune re-plans to the same kept set (the oldest
//!    record is what restic's "keep the oldest" rule looks at; it goes last). Then their
//!    `manifests/<stamp>.sha1`, and orphan manifests older than the newest restore point.
//! 2. For kept restore points k_a < k_{a+1}, merges the generations with stamps in
//!    (k_a, k_{a+1}] into one named k_{a+1}, keeping for each path the version from
//!    the oldest generation that has it (the version valid at k_a). The merge folds
//!    the newer generations into the oldest one, g_1: an entry g_1 lacks is renamed
//!    into it; an entry g_1 has is superseded and removed (files one by one, then the
//!    emptied directories, never `rm -rf`); finally g_1 is renamed to k_{a+1}. Every
//!    single step leaves "smallest generation containing p" unchanged for every kept
//!    restore point, so a prune killed anywhere is safe, and re-running it lists the
//!    target again and continues the same merge.
//! 3. Deletes generations with stamps <= the oldest kept restore point: only restore
//!    points older than that needed them.
//!
//! Failed runs (a generation without a record) are merged like deleted restore points,
//! never dropped whole while a kept restore point needs them. Generations newer than the
//! newest restore point (a failed or running run) are left alone, as is `current/` and
//! anything under `generations/` whose name is not a snapveil stamp (reported).
//!
//! Where the target runs only `rsync --server` (rrsync, an rsync daemon), nothing can be
//! renamed: step 2 becomes "delete the generations of deleted restore points whole",
//! failed runs' generations stay, and the report names the kept restore points that
//! became approximate and how many paths lost their version as of that point.

use crate::exec::{Cmd, CommandError, Runner};
use crate::retention::{self, Decision, LocalTime, Policy, PolicyError, RestorePoint};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fmt::{self, Write as _};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the target lives and what we may run there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    /// A directory on this machine: renames with `std::fs`.
    Local(PathBuf),
    /// `[user@]host:path` over ssh. `shell`: the key may run `sh` (merges by renames);
    /// otherwise it may only run `rsync --server` (rrsync, `command=`), so rsync-only.
    /// `ssh` is the ssh command line (program and options, e.g. `["ssh", "-p", "2222"]`).
    Ssh {
        user: Option<String>,
        host: String,
        path: String,
        shell: bool,
        ssh: Vec<String>,
    },
    /// An rsync daemon: `rsync://host[:port]/module/path` or `host::module/path`.
    Rsync { url: String },
}

impl TargetSpec {
    /// Parses the CLI form: `rsync://…` or `host::module` is a daemon, `[user@]host:path`
    /// is ssh, anything else a local path (write `./a:b` for a local name with a colon).
    pub fn parse(s: &str, ssh: Vec<String>, shell: bool) -> TargetSpec {
        if s.starts_with("rsync://") || s.contains("::") {
            return TargetSpec::Rsync { url: s.into() };
        }
        match s.split_once(':') {
            Some((remote, path)) if !remote.is_empty() && !remote.contains('/') => {
                let (user, host) = match remote.rsplit_once('@') {
                    Some((u, h)) => (Some(u.to_string()), h.to_string()),
                    None => (None, remote.to_string()),
                };
                TargetSpec::Ssh {
                    user,
                    host,
                    path: path.into(),
                    shell,
                    ssh,
                }
            }
            _ => TargetSpec::Local(PathBuf::from(s)),
        }
    }

    fn mode(&self) -> Mode {
        match self {
            TargetSpec::Local(_) | TargetSpec::Ssh { shell: true, .. } => Mode::Merge,
            TargetSpec::Ssh { shell: false, .. } | TargetSpec::Rsync { .. } => Mode::DeleteOnly,
        }
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::Local(p) => write!(f, "{}", p.display()),
            TargetSpec::Ssh { .. } => write!(f, "{}", self.rsync_root().unwrap_or_default()),
            TargetSpec::Rsync { url } => write!(f, "{url}"),
        }
    }
}

/// What the target allows: renames (merge) or only whole deletions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Merge,
    DeleteOnly,
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("{target}: not a snapveil target (neither runs/ nor generations/ exists)")]
    NotATarget { target: String },
    #[error("{target}: cannot parse `rsync --list-only` line {line:?}")]
    ListParse { target: String, line: String },
    #[error(
        "{path}: refusing to overwrite an existing entry (did the target change during prune?)"
    )]
    Exists { path: PathBuf },
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    #[error(
        "the policy would delete restore point {stamp}, which this run just made; nothing \
         was pruned"
    )]
    WouldDeleteNewPoint { stamp: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PruneError + '_ {
    move |source| PruneError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---- listing ---------------------------------------------------------------------------

/// A directory tree inside one generation: names (raw bytes) to entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree(pub BTreeMap<Vec<u8>, Node>);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir(Tree),
    /// A file, symlink or anything else that is not a directory.
    Leaf,
}

impl Tree {
    /// Inserts `path` (components separated by `/`), creating parent directories.
    pub fn insert(&mut self, path: &[u8], dir: bool) {
        let mut t = self;
        let parts: Vec<&[u8]> = path
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        for (i, name) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let node = t.0.entry(name.to_vec()).or_insert_with(|| {
                if last && !dir {
                    Node::Leaf
                } else {
                    Node::Dir(Tree::default())
                }
            });
            match node {
                Node::Dir(sub) => t = sub,
                Node::Leaf => return,
            }
        }
    }

    /// Paths of all non-directory entries.
    pub fn leaves(&self) -> BTreeSet<Vec<u8>> {
        fn walk(t: &Tree, prefix: &[u8], out: &mut BTreeSet<Vec<u8>>) {
            for (name, node) in &t.0 {
                let p = join(prefix, name);
                match node {
                    Node::Dir(sub) => walk(sub, &p, out),
                    Node::Leaf => {
                        out.insert(p);
                    }
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(self, b"", &mut out);
        out
    }
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        name.to_vec()
    } else {
        [prefix, b"/", name].concat()
    }
}

/// What prune needs to know about a target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Stamps with a `runs/<stamp>.json`: the restore points.
    pub records: BTreeSet<String>,
    /// Stamps with a `manifests/<stamp>.sha1`.
    pub manifests: BTreeSet<String>,
    /// Stamps with a `manifests/<stamp>.meta` (a run killed between its two uploads
    /// leaves one without a `.sha1`).
    pub metas: BTreeSet<String>,
    /// Generation directories by stamp, with their contents.
    pub generations: BTreeMap<String, Tree>,
    /// Entries under `generations/` that are not stamp-named directories: left alone.
    pub foreign: Vec<String>,
}

fn is_stamp(s: &str) -> bool {
    retention::parse_stamp(s).is_some()
}

impl Listing {
    /// Builds a listing from paths relative to the target root (`runs/X.json`,
    /// `generations/X/a/b`, …), as `rsync --list-only -r` prints them.
    pub fn from_paths<'a>(paths: impl IntoIterator<Item = (&'a [u8], bool)>) -> Listing {
        let mut l = Listing::default();
        let mut foreign = BTreeSet::new();
        for (path, dir) in paths {
            let mut parts = path.splitn(3, |b| *b == b'/');
            let top = parts.next().unwrap_or_default();
            let Some(name) = parts
                .next()
                .map(|n| String::from_utf8_lossy(n).into_owned())
            else {
                continue;
            };
            let rest = parts.next();
            match (top, rest) {
                (b"runs", None) if !dir => {
                    if let Some(s) = name.strip_suffix(".json").filter(|s| is_stamp(s)) {
                        l.records.insert(s.to_string());
                    }
                }
                (b"manifests", None) if !dir => {
                    if let Some(s) = name.strip_suffix(".sha1").filter(|s| is_stamp(s)) {
                        l.manifests.insert(s.to_string());
                    }
                    if let Some(s) = name.strip_suffix(".meta").filter(|s| is_stamp(s)) {
                        l.metas.insert(s.to_string());
                    }
                }
                (b"generations", rest) => {
                    let gen_dir = if rest.is_some() { true } else { dir };
                    if is_stamp(&name) && gen_dir {
                        let tree = l.generations.entry(name).or_default();
                        if let Some(rest) = rest {
                            tree.insert(rest, dir);
                        }
                    } else {
                        foreign.insert(name);
                    }
                }
                _ => {}
            }
        }
        l.foreign = foreign.into_iter().collect();
        l
    }
}

/// Reads a local target's listing.
///
/// # Errors
/// Unreadable directories, or a directory that is not a target at all.
pub fn list_local(target: &Path) -> Result<Listing, PruneError> {
    crate::target::check_local_layout(target)?;
    let (runs, gens) = (target.join("runs"), target.join("generations"));
    if !runs.is_dir() && !gens.is_dir() {
        return Err(PruneError::NotATarget {
            target: target.display().to_string(),
        });
    }
    let mut paths: Vec<(Vec<u8>, bool)> = Vec::new();
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut Vec<(Vec<u8>, bool)>,
        recurse: bool,
    ) -> Result<(), PruneError> {
        let rd = match fs::read_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir.parent() == Some(root) => {
                return Ok(())
            }
            r => r.map_err(io_err(dir))?,
        };
        for e in rd {
            let e = e.map_err(io_err(dir))?;
            let p = e.path();
            let is_dir = e.file_type().map_err(io_err(&p))?.is_dir();
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .as_os_str()
                .as_bytes()
                .to_vec();
            out.push((rel, is_dir));
            if is_dir && recurse {
                walk(root, &p, out, true)?;
            }
        }
        Ok(())
    }
    walk(target, &runs, &mut paths, false)?;
    walk(target, &target.join("manifests"), &mut paths, false)?;
    // Only stamp-named generation directories are descended into.
    walk(target, &gens, &mut paths, false)?;
    let tops: Vec<PathBuf> = paths
        .iter()
        .filter(|(p, d)| *d && p.starts_with(b"generations/"))
        .map(|(p, _)| target.join(OsStr::from_bytes(p)))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_stamp))
        .collect();
    for t in tops {
        walk(target, &t, &mut paths, true)?;
    }
    Ok(Listing::from_paths(
        paths.iter().map(|(p, d)| (p.as_slice(), *d)),
    ))
}

/// Parses `rsync --list-only` output into (name, is a directory), byte-exact
/// ([`crate::rsync::parse_listing`]).
///
/// # Errors
/// A line that does not have that shape.
pub fn parse_list_only(target: &str, out: &[u8]) -> Result<Vec<(Vec<u8>, bool)>, PruneError> {
    crate::rsync::parse_listing(out)
        .map(|v| v.into_iter().map(|e| (e.name, e.kind == b'd')).collect())
        .map_err(|line| PruneError::ListParse {
            target: target.into(),
            line,
        })
}

// ---- plan ----------------------------------------------------------------------------

/// One step on the target. Paths inside a generation are relative to it, raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `runs/<stamp>.json`: the restore point ceases to exist.
    RemoveRecord { stamp: String },
    /// `manifests/<stamp>.sha1` and `manifests/<stamp>.meta` (absent is fine).
    RemoveManifest { stamp: String },
    /// Rename `generations/<from>/<path>` to `generations/<to>/<path>`; the destination
    /// must not exist.
    Move {
        from: String,
        to: String,
        path: Vec<u8>,
    },
    /// A superseded non-directory entry.
    RemoveFile { gen: String, path: Vec<u8> },
    /// A directory that must be empty by now (`path` empty: the generation itself).
    RemoveDir { gen: String, path: Vec<u8> },
    /// Rename a whole generation; the destination must not exist.
    RenameGen { from: String, to: String },
    /// A generation no kept restore point needs, deleted whole.
    DeleteGen { stamp: String },
}

/// A merge of generations (`from`, oldest first) into one named `into`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merge {
    pub from: Vec<String>,
    pub into: String,
    /// The kept restore point whose versions the merged generation holds.
    pub as_of: String,
}

/// A kept restore point that rsync-only pruning made approximate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approximate {
    pub stamp: String,
    /// Paths whose version as of this point was in a deleted generation.
    pub lost_paths: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrunePlan {
    pub mode: Mode,
    /// Per restore point, newest first.
    pub decisions: Vec<Decision>,
    pub merges: Vec<Merge>,
    /// Whole generations deleted, with why.
    pub deleted_generations: Vec<(String, &'static str)>,
    /// Generations newer than the newest restore point: left alone.
    pub pending: Vec<String>,
    pub approximate: Vec<Approximate>,
    pub foreign: Vec<String>,
    pub ops: Vec<Op>,
}

/// Plans a prune of `listing` (pure). See the module doc for the order and why.
pub fn plan_prune(
    listing: &Listing,
    policy: &Policy,
    local: LocalTime<'_>,
    mode: Mode,
) -> PrunePlan {
    let points: Vec<RestorePoint> = listing
        .records
        .iter()
        .filter_map(|s| {
            retention::parse_stamp(s).map(|time| RestorePoint {
                stamp: s.clone(),
                time,
            })
        })
        .collect();
    let decisions = retention::plan(&points, policy, local);
    let kept: BTreeSet<String> = decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.stamp.clone())
        .collect();
    let deleted: BTreeSet<String> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.stamp.clone())
        .collect();
    let mut plan = PrunePlan {
        mode,
        decisions,
        merges: Vec::new(),
        deleted_generations: Vec::new(),
        pending: Vec::new(),
        approximate: Vec::new(),
        foreign: listing.foreign.clone(),
        ops: Vec::new(),
    };

    // 1. Records newest first (so the oldest goes last), then manifests.
    for s in deleted.iter().rev() {
        plan.ops.push(Op::RemoveRecord { stamp: s.clone() });
    }
    let newest = kept.iter().next_back().cloned();
    for s in listing.manifests.union(&listing.metas) {
        let orphan = !listing.records.contains(s) && newest.as_ref().is_some_and(|n| s < n);
        if deleted.contains(s) || orphan {
            plan.ops.push(Op::RemoveManifest { stamp: s.clone() });
        }
    }
    let Some(newest) = newest else {
        plan.pending = listing.generations.keys().cloned().collect();
        return plan;
    };
    let oldest = kept.iter().next().cloned().unwrap_or_default();

    // 2. Intervals (k_a, k_{a+1}].
    let kept_v: Vec<&String> = kept.iter().collect();
    let mut removed_whole: BTreeSet<String> = BTreeSet::new();
    for pair in kept_v.windows(2) {
        let (lo, hi) = (pair[0], pair[1]);
        let gens: Vec<&String> = listing
            .generations
            .keys()
            .filter(|g| *g > lo && *g <= hi)
            .collect();
        match mode {
            Mode::Merge => {
                if gens.is_empty() || (gens.len() == 1 && gens[0] == hi) {
                    continue;
                }
                plan.merges.push(Merge {
                    from: gens.iter().map(|g| (*g).clone()).collect(),
                    into: hi.clone(),
                    as_of: lo.clone(),
                });
                let acc_name = gens[0];
                let mut acc = listing.generations[acc_name].clone();
                for g in &gens[1..] {
                    merge_into(
                        &mut acc,
                        &listing.generations[*g],
                        acc_name,
                        g,
                        b"",
                        &mut plan.ops,
                    );
                    plan.ops.push(Op::RemoveDir {
                        gen: (*g).clone(),
                        path: Vec::new(),
                    });
                }
                if acc_name != hi {
                    plan.ops.push(Op::RenameGen {
                        from: acc_name.clone(),
                        to: hi.clone(),
                    });
                }
            }
            Mode::DeleteOnly => {
                for g in gens.into_iter().filter(|g| deleted.contains(*g)) {
                    plan.ops.push(Op::DeleteGen { stamp: g.clone() });
                    plan.deleted_generations
                        .push((g.clone(), "its restore point is deleted"));
                    removed_whole.insert(g.clone());
                }
            }
        }
    }

    // 3. Generations only older restore points needed.
    for g in listing.generations.keys().filter(|g| **g <= oldest) {
        plan.ops.push(Op::DeleteGen { stamp: g.clone() });
        plan.deleted_generations
            .push((g.clone(), "older than the oldest kept restore point"));
    }
    plan.pending = listing
        .generations
        .keys()
        .filter(|g| **g > newest)
        .cloned()
        .collect();

    if !removed_whole.is_empty() {
        let leaves: BTreeMap<&String, BTreeSet<Vec<u8>>> = listing
            .generations
            .iter()
            .map(|(g, t)| (g, t.leaves()))
            .collect();
        for k in &kept {
            let mut lost = BTreeSet::new();
            for d in removed_whole.iter().filter(|d| *d > k) {
                for p in &leaves[d] {
                    // The version as of k is in the first generation after k holding p.
                    let first = leaves.iter().find(|(g, l)| **g > k && l.contains(p));
                    if first.is_some_and(|(g, _)| removed_whole.contains(*g)) {
                        lost.insert(p.clone());
                    }
                }
            }
            if !lost.is_empty() {
                plan.approximate.push(Approximate {
                    stamp: k.clone(),
                    lost_paths: lost.len(),
                });
            }
        }
    }
    plan
}

/// Folds generation `src` into `acc` (the older one): entries `acc` lacks are moved,
/// entries it has are superseded and removed; directories present in both recurse.
fn merge_into(
    acc: &mut Tree,
    src: &Tree,
    acc_name: &str,
    src_name: &str,
    prefix: &[u8],
    ops: &mut Vec<Op>,
) {
    for (name, node) in &src.0 {
        let path = join(prefix, name);
        match (acc.0.get_mut(name), node) {
            (None, _) => {
                ops.push(Op::Move {
                    from: src_name.into(),
                    to: acc_name.into(),
                    path,
                });
                acc.0.insert(name.clone(), node.clone());
            }
            (Some(Node::Dir(a)), Node::Dir(s)) => {
                merge_into(a, s, acc_name, src_name, &path, ops);
                ops.push(Op::RemoveDir {
                    gen: src_name.into(),
                    path,
                });
            }
            (Some(_), node) => remove_subtree(node, src_name, &path, ops),
        }
    }
}

fn remove_subtree(node: &Node, gen: &str, path: &[u8], ops: &mut Vec<Op>) {
    match node {
        Node::Leaf => ops.push(Op::RemoveFile {
            gen: gen.into(),
            path: path.to_vec(),
        }),
        Node::Dir(t) => {
            for (name, n) in &t.0 {
                remove_subtree(n, gen, &join(path, name), ops);
            }
            ops.push(Op::RemoveDir {
                gen: gen.into(),
                path: path.to_vec(),
            });
        }
    }
}

// ---- executors -------------------------------------------------------------------------

/// Applies ops to a local target with renames and single-entry removals.
///
/// # Errors
/// The first failing operation; a destination that exists is refused, not overwritten.
pub fn apply_local(target: &Path, ops: &[Op]) -> Result<(), PruneError> {
    let gen = |g: &str, p: &[u8]| {
        let base = target.join("generations").join(g);
        if p.is_empty() {
            base
        } else {
            base.join(OsStr::from_bytes(p))
        }
    };
    let absent = |p: &Path| match fs::symlink_metadata(p) {
        Ok(_) => Err(PruneError::Exists { path: p.to_owned() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(p)(e)),
    };
    for op in ops {
        tracing::debug!(?op, "prune");
        match op {
            Op::RemoveRecord { stamp } => {
                let p = target.join("runs").join(format!("{stamp}.json"));
                fs::remove_file(&p).map_err(io_err(&p))?;
            }
            Op::RemoveManifest { stamp } => {
                // The metadata record goes with the manifest (absent before snapveil wrote one).
                for ext in ["sha1", "meta"] {
                    let p = target.join("manifests").join(format!("{stamp}.{ext}"));
                    match fs::remove_file(&p) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&p)(e)),
                        _ => {}
                    }
                }
            }
            Op::Move { from, to, path } => {
                let (a, b) = (gen(from, path), gen(to, path));
                absent(&b)?;
                fs::rename(&a, &b).map_err(io_err(&a))?;
            }
            Op::RemoveFile { gen: g, path } => {
                let p = gen(g, path);
                fs::remove_file(&p).map_err(io_err(&p))?;
            }
            Op::RemoveDir { gen: g, path } => {
                let p = gen(g, path);
                fs::remove_dir(&p).map_err(io_err(&p))?;
            }
            Op::RenameGen { from, to } => {
                let (a, b) = (gen(from, b""), gen(to, b""));
                absent(&b)?;
                fs::rename(&a, &b).map_err(io_err(&a))?;
            }
            Op::DeleteGen { stamp } => {
                // A stamp-named directory under generations/: snapveil's own, whole.
                let p = gen(stamp, b"");
                fs::remove_dir_all(&p).map_err(io_err(&p))?;
            }
        }
    }
    Ok(())
}

/// Quotes for a POSIX shell, always (the script runs on a host we don't know).
fn sh_quote(s: &[u8]) -> Vec<u8> {
    let mut v = b"'".to_vec();
    for &b in s {
        if b == b'\'' {
            v.extend_from_slice(b"'\\''");
        } else {
            v.push(b);
        }
    }
    v.push(b'\'');
    v
}

/// The POSIX sh script that applies `ops` inside `path` on a host with a shell. Each line
/// does one operation; `mvnew` refuses an existing destination (plain `mv` would move
/// *into* an existing directory); no `rm -rf` except of a whole stamp-named generation.
pub fn shell_script(path: &str, ops: &[Op]) -> Vec<u8> {
    let g = |gen: &str, p: &[u8]| {
        let mut v = format!("generations/{gen}").into_bytes();
        if !p.is_empty() {
            v.push(b'/');
            v.extend_from_slice(p);
        }
        sh_quote(&v)
    };
    let mut s: Vec<u8> = Vec::new();
    s.extend_from_slice(b"set -eu\ncd -- ");
    s.extend(sh_quote(if path.is_empty() {
        b"."
    } else {
        path.as_bytes()
    }));
    s.extend_from_slice(
        b"\n[ -d generations ] || [ -d runs ] || { echo \"snapveil: $(pwd) is not a snapveil target\" >&2; exit 3; }; \
for a in current generations runs manifests; do if [ -L \"$a\" ]; then echo \"snapveil: $(pwd)/$a is a symlink: refusing to prune through it\" >&2; exit 3; fi; done\n\
mvnew() { if [ -e \"$2\" ] || [ -L \"$2\" ]; then echo \"snapveil: refusing to overwrite $2\" >&2; exit 3; fi; mv -- \"$1\" \"$2\"; }\n",
    );
    for op in ops {
        let line: Vec<u8> = match op {
            Op::RemoveRecord { stamp } => [
                b"rm -- ".as_slice(),
                &sh_quote(format!("runs/{stamp}.json").as_bytes()),
            ]
            .concat(),
            Op::RemoveManifest { stamp } => [
                b"rm -f -- ".as_slice(),
                &sh_quote(format!("manifests/{stamp}.sha1").as_bytes()),
                b" ",
                &sh_quote(format!("manifests/{stamp}.meta").as_bytes()),
            ]
            .concat(),
            Op::Move { from, to, path } => {
                [b"mvnew ".as_slice(), &g(from, path), b" ", &g(to, path)].concat()
            }
            Op::RemoveFile { gen, path } => [b"rm -- ".as_slice(), &g(gen, path)].concat(),
            Op::RemoveDir { gen, path } => [b"rmdir -- ".as_slice(), &g(gen, path)].concat(),
            Op::RenameGen { from, to } => {
                [b"mvnew ".as_slice(), &g(from, b""), b" ", &g(to, b"")].concat()
            }
            Op::DeleteGen { stamp } => [b"rm -rf -- ".as_slice(), &g(stamp, b"")].concat(),
        };
        s.extend(line);
        s.push(b'\n');
    }
    s
}

impl TargetSpec {
    /// The rsync address of the target root, with a trailing slash.
    fn rsync_root(&self) -> Option<String> {
        match self {
            TargetSpec::Local(_) => None,
            TargetSpec::Ssh {
                user, host, path, ..
            } => {
                let user = user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
                let path = if path.is_empty() { "." } else { path };
                Some(format!("{user}{host}:{}/", path.trim_end_matches('/')))
            }
            TargetSpec::Rsync { url } => Some(format!("{}/", url.trim_end_matches('/'))),
        }
    }

    /// `-e SSH` for rsync over ssh, quoted the way rsync splits it.
    fn rsh(&self) -> Option<String> {
        match self {
            TargetSpec::Ssh { ssh, .. } => Some(
                ssh.iter()
                    .map(|a| String::from_utf8_lossy(&sh_quote(a.as_bytes())).into_owned())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => None,
        }
    }

    fn rsync(&self, rsync: &OsStr) -> Cmd {
        let c = Cmd::new(rsync);
        match self.rsh() {
            Some(e) => c.arg("-e").arg(e),
            None => c,
        }
    }
}

/// Lists a remote target with `rsync --list-only` (works with rrsync and daemons).
///
/// # Errors
/// rsync failing (unreachable, no such path) or output that does not parse.
pub fn list_remote(
    runner: &dyn Runner,
    target: &TargetSpec,
    rsync: &OsStr,
) -> Result<Listing, PruneError> {
    let root = target.rsync_root().unwrap_or_default();
    let out = target
        .rsync(rsync)
        .args([
            "--list-only",
            "-rl",
            // Areas without a trailing slash, so that a symlink named like one is listed.
            "--include=/runs",
            "--include=/runs/*.json",
            "--include=/manifests",
            "--include=/manifests/*.sha1",
            "--include=/manifests/*.meta",
            "--include=/generations",
            "--include=/generations/**",
            "--include=/current",
            "--exclude=*",
        ])
        .arg(&root)
        .run_checked(runner)?;
    let entries =
        crate::rsync::parse_listing(&out.stdout).map_err(|line| PruneError::ListParse {
            target: root.clone(),
            line,
        })?;
    for a in crate::target::Area::ALL {
        match entries.iter().find(|e| e.name == a.dir().as_bytes()) {
            Some(e) if e.kind == b'l' => {
                return Err(crate::target::TargetError::Symlink {
                    target: target.to_string(),
                    area: a.dir(),
                    to: String::new(),
                }
                .into())
            }
            Some(e) if e.kind != b'd' => {
                return Err(crate::target::TargetError::NotADirectory {
                    target: target.to_string(),
                    area: a.dir(),
                }
                .into())
            }
            _ => {}
        }
    }
    let paths: Vec<(Vec<u8>, bool)> = entries
        .into_iter()
        .filter(|e| e.name != b"current")
        .map(|e| (e.name, e.kind == b'd'))
        .collect();
    let l = Listing::from_paths(paths.iter().map(|(p, d)| (p.as_slice(), *d)));
    let has = |top: &[u8]| paths.iter().any(|(p, d)| *d && p == top);
    if !has(b"runs") && !has(b"generations") {
        return Err(PruneError::NotATarget { target: root });
    }
    Ok(l)
}

/// An empty directory to sync from; removed on drop.
struct EmptyDir(PathBuf);

impl EmptyDir {
    fn new() -> Result<Self, PruneError> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "snapveil-prune-empty-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&p).map_err(io_err(&p))?;
        Ok(EmptyDir(p))
    }
}

impl Drop for EmptyDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.0) {
            tracing::warn!("removing {}: {e}", self.0.display());
        }
    }
}

/// Applies ops with rsync alone: deletion by syncing an empty directory with include
/// filters naming exactly the entries to delete, `--exclude=*` protecting everything
/// else, and `--delete`. Only whole deletions exist here; the plan never asks for more.
///
/// # Errors
/// rsync failing.
pub fn apply_rsync(
    runner: &dyn Runner,
    target: &TargetSpec,
    rsync: &OsStr,
    ops: &[Op],
) -> Result<(), PruneError> {
    let root = target.rsync_root().unwrap_or_default();
    let empty = EmptyDir::new()?;
    let mut src: OsString = empty.0.clone().into_os_string();
    src.push("/");
    let delete = |dir: &str, includes: Vec<String>| -> Result<(), PruneError> {
        if includes.is_empty() {
            return Ok(());
        }
        target
            .rsync(rsync)
            .args(["-r", "--delete"])
            .args(includes.iter().map(|i| format!("--include={i}")))
            .arg("--exclude=*")
            .arg(&src)
            .arg(format!("{root}{dir}/"))
            .run_checked(runner)?;
        Ok(())
    };
    // One record per call, in plan order: the oldest record goes last.
    let mut manifests = Vec::new();
    let mut gens = Vec::new();
    for op in ops {
        match op {
            Op::RemoveRecord { stamp } => delete("runs", vec![format!("/{stamp}.json")])?,
            Op::RemoveManifest { stamp } => {
                manifests.push(format!("/{stamp}.sha1"));
                manifests.push(format!("/{stamp}.meta"));
            }
            Op::DeleteGen { stamp } => gens.push(format!("/{stamp}/***")),
            other => unreachable_in_rsync_mode(other)?,
        }
    }
    delete("manifests", manifests)?;
    delete("generations", gens)
}

fn unreachable_in_rsync_mode(op: &Op) -> Result<(), PruneError> {
    Err(PruneError::Io {
        path: PathBuf::from("generations"),
        source: io::Error::other(format!("rsync-only target cannot {op:?}")),
    })
}

/// Applies ops over ssh with a shell: one `sh -s` with the script on stdin.
///
/// # Errors
/// ssh or the script failing (the script stops at the first failing line).
pub fn apply_ssh(runner: &dyn Runner, target: &TargetSpec, ops: &[Op]) -> Result<(), PruneError> {
    let TargetSpec::Ssh {
        user,
        host,
        path,
        ssh,
        ..
    } = target
    else {
        return Ok(());
    };
    let dest = match user {
        Some(u) => format!("{u}@{host}"),
        None => host.clone(),
    };
    let (prog, args) = ssh
        .split_first()
        .map(|(p, a)| (p.as_str(), a))
        .unwrap_or(("ssh", &[]));
    Cmd::new(prog)
        .args(args)
        .arg(dest)
        .args(["sh", "-s"])
        .stdin(shell_script(path, ops))
        .run_checked(runner)?;
    Ok(())
}

/// The run records of the listing, read (local) or copied to `scratch` and read (remote:
/// rsync without `--links` skips a symlinked record, which then reads as not a file).
fn read_records(
    runner: &dyn Runner,
    target: &TargetSpec,
    rsync: &OsStr,
    listing: &Listing,
    scratch: &Path,
) -> Result<Vec<crate::target::RecordFile>, PruneError> {
    let read = |dir: &Path| -> Result<Vec<crate::target::RecordFile>, PruneError> {
        let mut v = Vec::new();
        for s in &listing.records {
            let p = dir.join(format!("{s}.json"));
            let data = match fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() => Some(fs::read(&p).map_err(io_err(&p))?),
                _ => None,
            };
            v.push(crate::target::RecordFile {
                stamp: s.clone(),
                data,
            });
        }
        Ok(v)
    };
    match target {
        TargetSpec::Local(p) => read(&p.join("runs")),
        _ if listing.records.is_empty() => Ok(Vec::new()),
        _ => {
            let dir = scratch.join(format!("records-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let root = target.rsync_root().unwrap_or_default();
            let r = target
                .rsync(rsync)
                .args(["--recursive", "--include=/*.json", "--exclude=*"])
                .arg(format!("{root}runs/"))
                .arg(format!("{}/", dir.display()))
                .run_checked(runner)
                .map_err(PruneError::from)
                .and_then(|_| read(&dir));
            let _ = fs::remove_dir_all(&dir);
            r
        }
    }
}

// ---- the command ------------------------------------------------------------------------

pub struct PruneOptions<'a> {
    pub dry_run: bool,
    /// The job whose target this is: its records must name it (another job's stop the
    /// prune). `None` for `prune --target`.
    pub job: Option<String>,
    /// The restore point the calling run just made: a plan that deletes it is refused.
    pub protect: Option<String>,
    /// Where to copy a remote target's run records to read them.
    pub scratch: PathBuf,
    /// rsync program (from `[tools]`).
    pub rsync: OsString,
    /// Wall clock in which periods are counted.
    pub local: LocalTime<'a>,
}

#[derive(Clone, Debug)]
pub struct PruneReport {
    pub target: String,
    pub plan: PrunePlan,
    pub dry_run: bool,
}

/// Lists the target, plans by `policy`, and (unless `dry_run`) applies the plan.
///
/// # Errors
/// An invalid policy (before anything is touched), listing or applying failures.
pub fn prune(
    runner: &dyn Runner,
    target: &TargetSpec,
    policy: &Policy,
    opts: &PruneOptions<'_>,
) -> Result<PruneReport, PruneError> {
    policy.validate()?;
    let mut listing = match target {
        TargetSpec::Local(p) => list_local(p)?,
        _ => list_remote(runner, target, &opts.rsync)?,
    };
    // Only records that are restore points count; junk is left alone, reported.
    let records = read_records(runner, target, &opts.rsync, &listing, &opts.scratch)?;
    let (points, ignored) = crate::target::classify(
        &target.to_string(),
        records,
        &listing.manifests,
        opts.job.as_deref(),
    )?;
    for (f, why) in &ignored {
        tracing::warn!("{target}/{f}: not a restore point: {why} (left alone)");
    }
    listing.records = points.into_iter().collect();
    let plan = plan_prune(&listing, policy, opts.local, target.mode());
    if let Some(p) = &opts.protect {
        if plan.decisions.iter().any(|d| &d.stamp == p && !d.keep) {
            return Err(PruneError::WouldDeleteNewPoint { stamp: p.clone() });
        }
    }
    if !opts.dry_run && !plan.ops.is_empty() {
        match target {
            TargetSpec::Local(p) => apply_local(p, &plan.ops)?,
            TargetSpec::Ssh { shell: true, .. } => apply_ssh(runner, target, &plan.ops)?,
            _ => apply_rsync(runner, target, &opts.rsync, &plan.ops)?,
        }
    }
    for f in &plan.foreign {
        tracing::warn!("generations/{f}: not a snapveil generation, left alone");
    }
    Ok(PruneReport {
        target: target.to_string(),
        plan,
        dry_run: opts.dry_run,
    })
}

impl fmt::Display for PruneReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.plan;
        let mut s = String::new();
        let verb = if self.dry_run { "would " } else { "" };
        let _ = writeln!(
            s,
            "prune {}{}",
            self.target,
            if self.dry_run { " (dry run)" } else { "" }
        );
        let _ = writeln!(s, "restore points (newest first):");
        for d in &p.decisions {
            if d.keep {
                let r: Vec<String> = d.reasons.iter().map(ToString::to_string).collect();
                let _ = writeln!(s, "  {}  keep    {}", d.stamp, r.join(", "));
            } else {
                let _ = writeln!(s, "  {}  {verb}delete", d.stamp);
            }
        }
        for m in &p.merges {
            let _ = writeln!(
                s,
                "{verb}merge generations {} into {} (versions as of {})",
                m.from.join(", "),
                m.into,
                m.as_of
            );
        }
        for (g, why) in &p.deleted_generations {
            let _ = writeln!(s, "{verb}delete generation {g} ({why})");
        }
        for g in &p.pending {
            let _ = writeln!(
                s,
                "left generation {g} (newer than the newest restore point)"
            );
        }
        for a in &p.approximate {
            let _ = writeln!(
                s,
                "approximate: restore point {} {} the version of {} path(s) (rsync-only target: no merges)",
                a.stamp,
                if self.dry_run { "would lose" } else { "lost" },
                a.lost_paths
            );
        }
        for x in &p.foreign {
            let _ = writeln!(s, "left alone: generations/{x} (not a snapveil generation)");
        }
        if p.ops.is_empty() {
            let _ = writeln!(s, "nothing to do");
        }
        f.write_str(&s)
    }
}

/// The prune target of a configured job. For ssh, whether the key may run a shell decides
/// between merges and whole deletions: a harmless `echo` is tried, and a key restricted to
/// rrsync or another forced command does not answer it.
///
/// # Errors
/// Only spawning ssh failing; a refused shell is not an error.
pub fn job_target(
    runner: &dyn Runner,
    cfg: &crate::config::Config,
    job: &crate::config::Job,
) -> Result<TargetSpec, PruneError> {
    use crate::config::Target;
    Ok(match &job.target {
        Target::Local(p) => TargetSpec::Local(p.clone()),
        Target::Ssh { user, host, path } => {
            let mut ssh = vec![cfg.tools.ssh.to_string_lossy().into_owned()];
            ssh.extend(job.ssh_args.iter().cloned());
            const MARK: &str = "snapveil-shell-ok";
            let dest = match user {
                Some(u) => format!("{u}@{host}"),
                None => host.clone(),
            };
            let probe = Cmd::new(&ssh[0])
                .args(&ssh[1..])
                .arg(dest)
                .arg(format!("echo {MARK}"));
            let shell = runner
                .output(&probe)
                .map(|o| o.exit == crate::exec::Exit::Code(0) && o.stdout_str().trim() == MARK)
                .unwrap_or(false);
            if !shell {
                tracing::info!(target = %job.target, "the ssh key runs no shell (rrsync?): prune deletes whole generations, no merges");
            }
            TargetSpec::Ssh {
                user: user.clone(),
                host: host.clone(),
                path: path.clone(),
                shell,
                ssh,
            }
        }
        Target::RsyncDaemon { .. } => TargetSpec::Rsync {
            url: job.target.to_string(),
        },
    })
}

/// Prunes one configured job's target by its policy; `None` when the job has no
/// retention rules (everything is kept). The caller holds the job's lock.
///
/// # Errors
/// A bad policy, listing or applying failing.
pub fn prune_job(
    runner: &dyn Runner,
    cfg: &crate::config::Config,
    job: &crate::config::Job,
    dry_run: bool,
    protect: Option<&str>,
) -> anyhow::Result<Option<PruneReport>> {
    use anyhow::Context;
    let Some(policy) = job
        .retention
        .policy()
        .with_context(|| format!("job {}: retention", job.name))?
    else {
        return Ok(None);
    };
    let target = job_target(runner, cfg, job)?;
    let opts = PruneOptions {
        dry_run,
        job: Some(job.name.clone()),
        protect: protect.map(str::to_string),
        scratch: crate::snapshot::cmd::work_dir(&cfg.state_dir, &job.name),
        rsync: cfg.tools.rsync.clone().into(),
        local: &retention::system_local,
    };
    let report = prune(runner, &target, &policy, &opts)
        .with_context(|| format!("prune {target} ({policy})"))?;
    Ok(Some(report))
}

#[cfg(test)]
mod tests;
