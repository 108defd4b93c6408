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
//! 0. Seals the restore points it deletes (stamp, run counter, MAC) into
//!    `runs/pruned.json`, so that their absence is no gap in the chain of runs
//!    (`target::chain`). A target with a tampered record is not pruned.
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

use crate::exec::{CommandError, Runner};
use crate::retention::{self, Decision, LocalTime, Policy, PolicyError, RestorePoint};
#[cfg(test)]
use crate::target::ops::{apply_local, shell_script};
use crate::target::{Area, Target};
pub use crate::target::{Mode, Op};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Target(#[from] crate::target::TargetError),
    #[error(
        "the policy would delete restore point {stamp}, which this run just made; nothing \
         was pruned"
    )]
    WouldDeleteNewPoint { stamp: String },
    #[error(
        "restore point {stamp} is sealed (issue 14): deleting it needs the job's key, so \
         that the deletion is recorded in runs/pruned.json; prune it with `snapveil prune \
         JOB`; nothing was pruned"
    )]
    NeedsKey { stamp: String },
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
            let area = Area::ALL.into_iter().find(|a| a.dir().as_bytes() == top);
            match (area, rest) {
                (Some(Area::Runs), None) if !dir => {
                    if let Some(s) = name
                        .strip_suffix(".json")
                        .filter(|s| crate::snapshot::valid_stamp(s))
                    {
                        l.records.insert(s.to_string());
                    }
                }
                (Some(Area::Manifests), None) if !dir => {
                    if let Some(s) = name
                        .strip_suffix(".sha1")
                        .filter(|s| crate::snapshot::valid_stamp(s))
                    {
                        l.manifests.insert(s.to_string());
                    }
                    if let Some(s) = name
                        .strip_suffix(".meta")
                        .filter(|s| crate::snapshot::valid_stamp(s))
                    {
                        l.metas.insert(s.to_string());
                    }
                }
                (Some(Area::Generations), rest) => {
                    let gen_dir = if rest.is_some() { true } else { dir };
                    if crate::snapshot::valid_stamp(&name) && gen_dir {
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

/// Reads a local target's listing ([`crate::target::ops::local_paths`]).
///
/// # Errors
/// Unreadable directories, a symlinked area, or a directory that is not a target.
pub fn list_local(target: &Path) -> Result<Listing, PruneError> {
    let paths = crate::target::ops::local_paths(target)?;
    Ok(Listing::from_paths(
        paths.iter().map(|(p, d)| (p.as_slice(), *d)),
    ))
}

/// `rsync --list-only` output as prune's listing sees it: (name, is a directory), with
/// the target's parse error ([`crate::target::rsync::parse_listing`]). The remote
/// listing itself is [`crate::target::Target::prune_paths`].
#[cfg(test)]
fn parse_list_only(target: &str, out: &[u8]) -> Result<Vec<(Vec<u8>, bool)>, PruneError> {
    crate::target::rsync::parse_listing(out)
        .map(|v| v.into_iter().map(|e| (e.name, e.kind == b'd')).collect())
        .map_err(|line| {
            crate::target::TargetError::ListParse {
                target: target.into(),
                line,
            }
            .into()
        })
}

// ---- plan ----------------------------------------------------------------------------

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

// ---- the command ------------------------------------------------------------------------

pub struct PruneOptions<'a> {
    pub dry_run: bool,
    /// The restore point the calling run just made: a plan that deletes it is refused.
    pub protect: Option<String>,
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
    target: &Target,
    policy: &Policy,
    opts: &PruneOptions<'_>,
) -> Result<PruneReport, PruneError> {
    policy.validate()?;
    let paths = target.prune_paths(runner)?;
    let mut listing = Listing::from_paths(paths.iter().map(|(p, d)| (p.as_slice(), *d)));
    // Only records that are restore points count; junk is left alone, reported; a
    // tampered one stops prune (its restore point may be real: nothing is planned
    // around a record we cannot read).
    let contents = target.scan(runner)?;
    if let Some((file, why)) = contents.tampered.first() {
        return Err(crate::target::TargetError::Tampered {
            target: target.address().to_string(),
            file: file.clone(),
            why: why.clone(),
        }
        .into());
    }
    listing.records = contents.points.iter().cloned().collect();
    let plan = plan_prune(&listing, policy, opts.local, target.mode(runner));
    if let Some(p) = &opts.protect {
        if plan.decisions.iter().any(|d| &d.stamp == p && !d.keep) {
            return Err(PruneError::WouldDeleteNewPoint { stamp: p.clone() });
        }
    }
    if !opts.dry_run && !plan.ops.is_empty() {
        record_pruned(runner, target, &contents, &plan)?;
        target.apply(runner, &plan.ops)?;
    }
    for f in &plan.foreign {
        tracing::warn!("generations/{f}: not a snapveil generation, left alone");
    }
    Ok(PruneReport {
        target: target.address().to_string(),
        plan,
        dry_run: opts.dry_run,
    })
}

/// Seals the restore points the plan deletes into `runs/pruned.json` before anything is
/// deleted, so that their absence is not taken for a truncated target
/// ([`crate::target::chain`]). Without the key (`prune --target`) sealed points are
/// not deleted at all: the gap they would leave could not be told from tampering.
fn record_pruned(
    runner: &dyn Runner,
    target: &Target,
    contents: &crate::target::Contents,
    plan: &PrunePlan,
) -> Result<(), PruneError> {
    use crate::target::chain::{Ledger, Pruned, LEDGER};
    let deleted: Vec<&str> = plan
        .decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.stamp.as_str())
        .collect();
    if let Some(s) = deleted.iter().find(|s| contents.unchecked.contains(**s)) {
        return Err(PruneError::NeedsKey {
            stamp: (*s).to_string(),
        });
    }
    let new: Vec<Pruned> = deleted
        .iter()
        .filter_map(|s| contents.sealed.get(*s))
        .map(|(_, l)| Pruned {
            stamp: l.stamp.clone(),
            counter: l.counter,
            mac: l.mac.clone(),
        })
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let mut ledger = contents.ledger.clone().unwrap_or_else(|| Ledger {
        job: target.job().map(str::to_string),
        pruned: Vec::new(),
    });
    for p in new {
        if !ledger.pruned.iter().any(|q| q.counter == p.counter) {
            ledger.pruned.push(p);
        }
    }
    ledger.pruned.sort_by_key(|p| p.counter);
    let body = serde_json::to_vec_pretty(&ledger).expect("json");
    target.put(runner, Area::Runs, LEDGER, &target.seal(&body))?;
    Ok(())
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

/// Prunes one configured job's target by its policy; `None` when the job has no
/// retention rules (everything is kept). The caller holds the job's lock.
///
/// # Errors
/// A bad policy, listing or applying failing.
pub fn prune_job(
    runner: &dyn Runner,
    target: &Target,
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
    let opts = PruneOptions {
        dry_run,
        protect: protect.map(str::to_string),
        local: &retention::system_local,
    };
    let report = prune(runner, target, &policy, &opts)
        .with_context(|| format!("prune {} ({policy})", target.address()))?;
    Ok(Some(report))
}

#[cfg(test)]
mod tests;
