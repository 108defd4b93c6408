//! Tamper evidence for what snapveil writes to a target besides the view. Issue 14.
//!
//! The target is untrusted storage: without this, it could edit a manifest, drop a
//! restore point's record or present last week's complete target, and verify and restore
//! would believe it. Three things close that:
//!
//! 1. **Sealed records.** `runs/STAMP.json` and `runs/pruned.json` end with one line
//!    `snapveil-mac-v1 HEX`: HMAC-SHA256 ([`RecordKey`], keyed from the job's master key
//!    by HKDF with our own purpose string) over the exact bytes before that line. A run
//!    record carries the MACs of its `manifests/STAMP.sha1` and `.meta`, so those stay
//!    plain files (`sha1sum -c` still reads the `.sha1`) and are authenticated through
//!    their record. A record whose MAC fails is *tampered*: never a restore point, always
//!    reported. A record without the line was written by a snapveil before this format
//!    (*unauthenticated, older version*): still a restore point, with a warning, unless it
//!    is newer than a sealed one (no such snapveil wrote it after us).
//! 2. **A chain.** Each sealed run record has a counter (1, 2, ...), its predecessor's MAC
//!    and the counter its chain is checked from (`base`). Prune seals what it removed
//!    (stamp, counter, MAC) in `runs/pruned.json` before removing it. So every counter
//!    from `base` to the newest must be on the target as a record or in that ledger, and
//!    each record must name the MAC of the one before: a deleted record is a gap
//!    (*truncated*), a reordered or replaced one a broken link.
//! 3. **What this machine last wrote.** The agent keeps the newest record it wrote to
//!    each target (stamp, counter, MAC) in `STATE/chain/JOB.json`, as borg keeps its
//!    security directory. A target whose newest record is older (a deleted newest point,
//!    a restored old copy of the whole target) is *rolled back*.
//!
//! A run refuses a target with problems before anything is transferred, unless told
//! which problem to accept (`--accept-rollback`, `--accept-truncation`); its record then
//! restarts the chain check at its own counter (`base`), so the accepted damage is not
//! reported again, while tampered records stay reported until someone removes them.
//! Without the agent's state (a new machine, a lost state dir) a rollback to a complete
//! older target cannot be told from the truth; gaps and tampering still can.
//!
//! Raw ZFS mode's stream records (`streams/STAMP.json`, `streams/pruned.json`,
//! [`crate::zfs_send::record`]) are sealed and chained the same way, with the same key
//! and state file: [`check_in`] names the area the records are in.

use crate::crypto::RecordKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The seal's line prefix; the version says which key derivation and MAC.
pub const MAC_LINE: &[u8] = b"snapveil-mac-v1 ";

/// The file in `runs/` that lists what prune removed.
pub const LEDGER: &str = "pruned.json";

/// `body` followed by its seal line. `body` should end with a newline.
pub fn seal(key: &RecordKey, body: &[u8]) -> Vec<u8> {
    let mut out = body.to_vec();
    if !out.ends_with(b"\n") {
        out.push(b'\n');
    }
    let mac = key.mac(&out);
    out.extend_from_slice(MAC_LINE);
    out.extend_from_slice(hex::encode(mac).as_bytes());
    out.push(b'\n');
    out
}

/// A record file's bytes, opened.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<'a> {
    /// The seal is this key's: the body (without the seal line) and the MAC.
    Authentic(&'a [u8], [u8; 32]),
    /// A seal that is not this key's MAC of the body.
    Forged(&'a [u8]),
    /// No seal line: written by a snapveil before sealed records.
    Unsealed(&'a [u8]),
    /// A seal, not checked (no key: `prune --target`).
    Unchecked(&'a [u8]),
}

/// Splits off and checks the seal line, if any.
pub fn open<'a>(key: Option<&RecordKey>, data: &'a [u8]) -> Opened<'a> {
    let trimmed = data.strip_suffix(b"\n").unwrap_or(data);
    let start = trimmed
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let Some(hexmac) = trimmed[start..].strip_prefix(MAC_LINE) else {
        return Opened::Unsealed(data);
    };
    let body = &data[..start];
    let Some(key) = key else {
        return Opened::Unchecked(body);
    };
    let mut mac = [0u8; 32];
    if hex::decode_to_slice(hexmac, &mut mac).is_err() || !key.verify(body, &mac) {
        return Opened::Forged(body);
    }
    Opened::Authentic(body, mac)
}

/// One restore point prune removed, as `runs/pruned.json` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pruned {
    pub stamp: String,
    pub counter: u64,
    /// The MAC of its record (hex).
    pub mac: String,
}

/// `runs/pruned.json`: every sealed restore point prune removed from this target.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ledger {
    #[serde(default)]
    pub job: Option<String>,
    pub pruned: Vec<Pruned>,
}

impl Ledger {
    /// Adds sealed restore points about to be removed (each counter once, kept in
    /// counter order): what prune seals before it deletes anything.
    pub fn add<'a>(&mut self, removed: impl IntoIterator<Item = &'a Link>) {
        for l in removed {
            if !self.pruned.iter().any(|p| p.counter == l.counter) {
                self.pruned.push(Pruned {
                    stamp: l.stamp.clone(),
                    counter: l.counter,
                    mac: l.mac.clone(),
                });
            }
        }
        self.pruned.sort_by_key(|p| p.counter);
    }
}

/// A sealed run record, as the chain needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub stamp: String,
    pub counter: u64,
    /// Its own MAC (hex).
    pub mac: String,
    /// Its predecessor's MAC (hex); `None` for the first.
    pub prev: Option<String>,
    /// The counter the chain is checked from, as of this record.
    pub base: u64,
}

/// Where a new record links into a target's chain: its counter, its predecessor's MAC
/// (hex) and the counter its chain is checked from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Next {
    pub counter: u64,
    pub prev: Option<String>,
    pub base: u64,
}

/// The newest record this machine wrote to a target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Head {
    pub stamp: String,
    pub counter: u64,
    pub mac: String,
}

/// What is wrong with a target's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A record whose seal fails, or which cannot be one of ours.
    Tampered { file: String, why: String },
    /// A counter between the chain's base and its newest record that is neither on the
    /// target nor in prune's ledger. `area`: where the records are (`runs`, `streams`).
    Gap {
        area: &'static str,
        counter: u64,
        after: String,
    },
    /// Records that do not link up (a predecessor's MAC, counters out of order).
    Broken { file: String, why: String },
    /// The target's newest record is older than what this machine last wrote there.
    RolledBack {
        area: &'static str,
        newest: Option<Head>,
        expected: Head,
    },
}

impl Problem {
    /// The `snapveil run` flag that accepts this problem.
    pub fn flag(&self) -> &'static str {
        match self {
            Problem::RolledBack { .. } => "--accept-rollback",
            _ => "--accept-truncation",
        }
    }

    pub fn is_rollback(&self) -> bool {
        matches!(self, Problem::RolledBack { .. })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Tampered { file, why } => write!(f, "TAMPERED: {file}: {why}"),
            Problem::Gap {
                area,
                counter,
                after,
            } => write!(
                f,
                "TRUNCATED: run #{counter} (after {after}) is missing from {area}/, and prune \
                 did not remove it (it is not in {area}/{LEDGER}): a restore point was deleted \
                 behind snapveil's back"
            ),
            Problem::Broken { file, why } => write!(f, "TRUNCATED: {file}: {why}"),
            Problem::RolledBack {
                area,
                newest,
                expected,
            } => {
                let have = match newest {
                    Some(h) => format!("{area}/{}.json (run #{})", h.stamp, h.counter),
                    None => "no sealed record at all".into(),
                };
                write!(
                    f,
                    "ROLLED BACK: the newest restore point on the target is {have}, but this \
                     machine last wrote {area}/{}.json (run #{}) there: the target was rolled \
                     back or its newest restore points deleted",
                    expected.stamp, expected.counter
                )
            }
        }
    }
}

/// The result of [`check`].
#[derive(Debug, Default)]
pub struct Verdict {
    pub problems: Vec<Problem>,
    /// Acknowledged damage (tampered records below the chain's base): reported, not held
    /// against the target.
    pub warnings: Vec<String>,
    /// The newest sealed record: what a new run links to.
    pub head: Option<Link>,
}

/// Checks the chain of a target's sealed records (pure). `tampered` are the record files
/// whose seal failed, `ledger` prune's (already opened; `None` when absent or forged,
/// which `tampered` then names), `state` what this machine last wrote there.
pub fn check(
    links: &[Link],
    tampered: &[(String, String)],
    ledger: Option<&Ledger>,
    state: Option<&Head>,
) -> Verdict {
    check_in("runs", links, tampered, ledger, state)
}

/// [`check`] of records kept in `area` (`runs` for file mode, `streams` for raw ZFS
/// mode's stream records, each with its own `pruned.json`): the same chain, named where
/// its files are.
pub fn check_in(
    area: &'static str,
    links: &[Link],
    tampered: &[(String, String)],
    ledger: Option<&Ledger>,
    state: Option<&Head>,
) -> Verdict {
    let rec = |stamp: &str| format!("{area}/{stamp}.json");
    let mut v = Verdict::default();
    let mut by_stamp: Vec<&Link> = links.iter().collect();
    by_stamp.sort_by(|a, b| a.stamp.cmp(&b.stamp));
    let head = by_stamp.last().copied();
    v.head = head.cloned();
    let base = head.map_or(1, |h| h.base);
    let base_stamp = by_stamp
        .iter()
        .find(|l| l.counter == base)
        .map(|l| l.stamp.clone());
    for (file, why) in tampered {
        let acknowledged = base_stamp.as_deref().is_some_and(|b| {
            crate::target::layout::stamp_of(
                file.strip_prefix(area)
                    .unwrap_or(file)
                    .trim_start_matches('/'),
            )
            .is_some_and(|s| s < b)
        });
        if acknowledged {
            v.warnings
                .push(format!("TAMPERED (accepted earlier): {file}: {why}"));
        } else {
            v.problems.push(Problem::Tampered {
                file: file.clone(),
                why: why.clone(),
            });
        }
    }
    // Counters must grow with stamps.
    for w in by_stamp.windows(2) {
        if w[1].counter <= w[0].counter {
            v.problems.push(Problem::Broken {
                file: rec(&w[1].stamp),
                why: format!(
                    "its run counter #{} does not follow #{} of the older {}: the counter \
                     went back",
                    w[1].counter,
                    w[0].counter,
                    rec(&w[0].stamp)
                ),
            });
        }
    }
    // Every counter from the base to the newest: a record or a pruned entry, each
    // record naming its predecessor's MAC.
    let mut known: BTreeMap<u64, (&str, &str)> = BTreeMap::new();
    for l in &by_stamp {
        known.entry(l.counter).or_insert((&l.stamp, &l.mac));
    }
    if let Some(lg) = ledger {
        for p in &lg.pruned {
            match known.get(&p.counter) {
                Some((_, mac)) if *mac != p.mac => v.problems.push(Problem::Broken {
                    file: format!("{area}/{LEDGER}"),
                    why: format!(
                        "lists run #{} ({}) with another MAC than the record on the target",
                        p.counter, p.stamp
                    ),
                }),
                Some(_) => {}
                None => {
                    known.insert(p.counter, (&p.stamp, &p.mac));
                }
            }
        }
    }
    if let Some(h) = head {
        if let Some((&top, (stamp, _))) = known.iter().next_back() {
            if top > h.counter {
                v.problems.push(Problem::Broken {
                    file: format!("{area}/{LEDGER}"),
                    why: format!(
                        "prune removed run #{top} ({stamp}), newer than the newest record \
                         on the target (#{}, {}): newer restore points were deleted",
                        h.counter, h.stamp
                    ),
                });
            }
        }
        let mut after = String::from("the chain's start");
        for n in base..=h.counter {
            match known.get(&n) {
                None => v.problems.push(Problem::Gap {
                    area,
                    counter: n,
                    after: after.clone(),
                }),
                Some((stamp, _)) => after = rec(stamp),
            }
        }
        for l in &by_stamp {
            if l.counter <= base {
                continue;
            }
            if let Some((pstamp, pmac)) = known.get(&(l.counter - 1)) {
                if l.prev.as_deref() != Some(*pmac) {
                    v.problems.push(Problem::Broken {
                        file: rec(&l.stamp),
                        why: format!(
                            "does not name run #{} ({pstamp}) as its predecessor: records \
                             were replaced or reordered",
                            l.counter - 1
                        ),
                    });
                }
            }
        }
    }
    if let Some(s) = state {
        let newest = head.map(|h| Head {
            stamp: h.stamp.clone(),
            counter: h.counter,
            mac: h.mac.clone(),
        });
        match (head, known.get(&s.counter)) {
            (Some(h), _) if h.counter < s.counter => v.problems.push(Problem::RolledBack {
                area,
                newest,
                expected: s.clone(),
            }),
            (None, _) => v.problems.push(Problem::RolledBack {
                area,
                newest,
                expected: s.clone(),
            }),
            (Some(_), Some((_, mac))) if *mac != s.mac => v.problems.push(Problem::Broken {
                file: rec(&s.stamp),
                why: format!(
                    "run #{} on the target is not the record this machine wrote: the target \
                     was replaced by another chain",
                    s.counter
                ),
            }),
            _ => {}
        }
    }
    v
}

/// `STATE/chain/JOB.json`: per target address, the newest record this machine wrote.
pub fn state_path(state_dir: &Path, job: &str) -> PathBuf {
    state_dir.join("chain").join(format!("{job}.json"))
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a snapveil chain state file ({source}); move it away to start over (the next run then trusts the target as it is)")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

type States = BTreeMap<String, Head>;

fn load_all(path: &Path) -> Result<States, StateError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|source| StateError::Parse {
            path: path.into(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(States::new()),
        Err(source) => Err(StateError::Io {
            path: path.into(),
            source,
        }),
    }
}

/// What this machine last wrote to `target` for `job`.
///
/// # Errors
/// An unreadable or corrupt state file.
pub fn load_state(state_dir: &Path, job: &str, target: &str) -> Result<Option<Head>, StateError> {
    Ok(load_all(&state_path(state_dir, job))?.remove(target))
}

/// Records `head` as the newest record written to `target` for `job`.
///
/// # Errors
/// The state file cannot be read or written.
pub fn save_state(
    state_dir: &Path,
    job: &str,
    target: &str,
    head: &Head,
) -> Result<(), StateError> {
    let path = state_path(state_dir, job);
    let mut all = load_all(&path)?;
    all.insert(target.to_string(), head.clone());
    let data = serde_json::to_vec_pretty(&all).expect("json");
    crate::status::write_atomic(&path, &data).map_err(|source| StateError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MasterKey;

    fn key(b: u8) -> RecordKey {
        RecordKey::new(&MasterKey::from_slice(&[b; 32]))
    }

    #[test]
    fn a_seal_authenticates_the_exact_bytes() {
        let k = key(1);
        let body = b"{\"stamp\":\"x\"}\n";
        let s = seal(&k, body);
        assert!(s.starts_with(body) && s.ends_with(b"\n"));
        match open(Some(&k), &s) {
            Opened::Authentic(b, _) => assert_eq!(b, body),
            o => panic!("{o:?}"),
        }
        // One byte changed, another key, no key, no seal.
        let mut bad = s.clone();
        bad[3] ^= 1;
        assert!(matches!(open(Some(&k), &bad), Opened::Forged(_)));
        assert!(matches!(open(Some(&key(2)), &s), Opened::Forged(_)));
        assert!(matches!(open(None, &s), Opened::Unchecked(b) if b == body));
        assert!(matches!(open(Some(&k), body), Opened::Unsealed(_)));
        // The record key is none of gocryptfs's keys.
        let m = MasterKey::from_slice(&[1; 32]);
        let k2 = crate::crypto::hkdf_expand(m.bytes(), b"AES-SIV file content encryption", 32);
        assert!(!k.verify(b"x", &{
            use hmac::Mac;
            let mut h = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&k2).unwrap();
            h.update(b"x");
            <[u8; 32]>::from(h.finalize().into_bytes())
        }));
    }

    fn link(stamp: &str, counter: u64, prev: Option<&str>, base: u64) -> Link {
        Link {
            stamp: stamp.into(),
            counter,
            mac: format!("m{counter}"),
            prev: prev.map(str::to_string),
            base,
        }
    }

    fn chain(n: u64) -> Vec<Link> {
        (1..=n)
            .map(|i| {
                let prev = (i > 1).then(|| format!("m{}", i - 1));
                link(&format!("2026112{i}T000000Z"), i, prev.as_deref(), 1)
            })
            .collect()
    }

    fn head(l: &Link) -> Head {
        Head {
            stamp: l.stamp.clone(),
            counter: l.counter,
            mac: l.mac.clone(),
        }
    }

    #[test]
    fn an_intact_chain_with_pruned_points_passes() {
        let c = chain(4);
        let v = check(&c, &[], None, Some(&head(&c[3])));
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        assert_eq!(v.head.unwrap().counter, 4);
        let ledger = Ledger {
            job: None,
            pruned: vec![Pruned {
                stamp: c[1].stamp.clone(),
                counter: 2,
                mac: "m2".into(),
            }],
        };
        let kept: Vec<Link> = c.iter().filter(|l| l.counter != 2).cloned().collect();
        assert!(check(&kept, &[], Some(&ledger), None).problems.is_empty());
        // Without the ledger the same target has a gap.
        let v = check(&kept, &[], None, None);
        assert!(
            matches!(v.problems[..], [Problem::Gap { counter: 2, .. }]),
            "{:?}",
            v.problems
        );
    }

    #[test]
    fn rollback_truncation_and_broken_links_are_found() {
        let c = chain(4);
        // The newest point deleted, or the whole target two runs older.
        let v = check(&c[..2], &[], None, Some(&head(&c[3])));
        assert!(
            v.problems.iter().any(Problem::is_rollback),
            "{:?}",
            v.problems
        );
        assert_eq!(v.problems[0].flag(), "--accept-rollback");
        let v = check(&[], &[], None, Some(&head(&c[3])));
        assert!(v.problems.iter().any(Problem::is_rollback));
        // A record replaced by one that does not link.
        let mut r = c.clone();
        r[2].prev = Some("m9".into());
        let v = check(&r, &[], None, None);
        assert!(
            matches!(&v.problems[..], [Problem::Broken { file, .. }] if file.contains(&c[2].stamp)),
            "{:?}",
            v.problems
        );
        // A counter going back.
        let mut r = c.clone();
        r[3].counter = 1;
        assert!(!check(&r, &[], None, None).problems.is_empty());
        // Tampered records are problems above the base, warnings below it.
        let t = vec![(format!("runs/{}.json", c[0].stamp), "bad MAC".to_string())];
        assert_eq!(check(&c, &t, None, None).problems.len(), 1);
        let mut r = c.clone();
        r[3].base = 3;
        let v = check(&r, &t, None, None);
        assert!(v.problems.is_empty() && v.warnings.len() == 1, "{v:?}");
        // A base at the newest accepts earlier gaps.
        let mut r = vec![c[0].clone(), c[3].clone()];
        assert!(!check(&r, &[], None, None).problems.is_empty());
        r[1].base = 4;
        assert!(check(&r, &[], None, None).problems.is_empty());
    }

    #[test]
    fn state_is_per_job_and_target() {
        let t = tempfile::TempDir::new().unwrap();
        let h = Head {
            stamp: "20261124T000000Z".into(),
            counter: 3,
            mac: "ab".into(),
        };
        assert_eq!(load_state(t.path(), "j", "/a").unwrap(), None);
        save_state(t.path(), "j", "/a", &h).unwrap();
        assert_eq!(load_state(t.path(), "j", "/a").unwrap(), Some(h));
        assert_eq!(load_state(t.path(), "j", "/b").unwrap(), None);
        assert_eq!(load_state(t.path(), "k", "/a").unwrap(), None);
    }
}
