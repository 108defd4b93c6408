//! What prune does to a target, as operations ([`Op`]) and the executors that apply them
//! where each kind of target allows: renames on a local path ([`apply_local`]), one
//! POSIX sh script over ssh ([`shell_script`]), whole deletions with rsync alone (see
//! [`super::Target::apply`]). Which operations to run is `crate::prune`'s plan.

use super::{io, TargetError};
use std::ffi::OsStr;
use std::fs;
use std::io as stdio;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What the target allows: renames (merge) or only whole deletions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Merge,
    DeleteOnly,
}

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
    /// Raw ZFS mode: `streams/<name>` (a record, a stream file or its `.sha1`; absent is
    /// fine, so that a prune interrupted after some removals can run again).
    RemoveStream { name: String },
}

/// Applies ops to a local target with renames and single-entry removals.
///
/// # Errors
/// The first failing operation; a destination that exists is refused, not overwritten.
pub fn apply_local(target: &Path, ops: &[Op]) -> Result<(), TargetError> {
    let gen = |g: &str, p: &[u8]| {
        let base = target.join("generations").join(g);
        if p.is_empty() {
            base
        } else {
            base.join(OsStr::from_bytes(p))
        }
    };
    let absent = |p: &Path| match fs::symlink_metadata(p) {
        Ok(_) => Err(TargetError::Exists { path: p.to_owned() }),
        Err(e) if e.kind() == stdio::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(p)(e)),
    };
    for op in ops {
        tracing::debug!(?op, "prune");
        match op {
            Op::RemoveRecord { stamp } => {
                let p = target.join("runs").join(format!("{stamp}.json"));
                fs::remove_file(&p).map_err(io(&p))?;
            }
            Op::RemoveManifest { stamp } => {
                // The metadata record goes with the manifest (absent before snapveil wrote one).
                for ext in ["sha1", "meta"] {
                    let p = target.join("manifests").join(format!("{stamp}.{ext}"));
                    match fs::remove_file(&p) {
                        Err(e) if e.kind() != stdio::ErrorKind::NotFound => return Err(io(&p)(e)),
                        _ => {}
                    }
                }
            }
            Op::Move { from, to, path } => {
                let (a, b) = (gen(from, path), gen(to, path));
                absent(&b)?;
                fs::rename(&a, &b).map_err(io(&a))?;
            }
            Op::RemoveFile { gen: g, path } => {
                let p = gen(g, path);
                fs::remove_file(&p).map_err(io(&p))?;
            }
            Op::RemoveDir { gen: g, path } => {
                let p = gen(g, path);
                fs::remove_dir(&p).map_err(io(&p))?;
            }
            Op::RenameGen { from, to } => {
                let (a, b) = (gen(from, b""), gen(to, b""));
                absent(&b)?;
                fs::rename(&a, &b).map_err(io(&a))?;
            }
            Op::DeleteGen { stamp } => {
                // A stamp-named directory under generations/: snapveil's own, whole.
                let p = gen(stamp, b"");
                fs::remove_dir_all(&p).map_err(io(&p))?;
            }
            Op::RemoveStream { name } => {
                let p = target.join("streams").join(name);
                match fs::remove_file(&p) {
                    Err(e) if e.kind() != stdio::ErrorKind::NotFound => return Err(io(&p)(e)),
                    _ => {}
                }
            }
        }
    }
    Ok(())
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
        super::rsync::sh_quote(&v)
    };
    let mut s: Vec<u8> = Vec::new();
    s.extend_from_slice(b"set -eu\ncd -- ");
    s.extend(super::rsync::sh_quote(if path.is_empty() {
        b"."
    } else {
        path.as_bytes()
    }));
    s.extend_from_slice(
        b"\n[ -d generations ] || [ -d runs ] || [ -d streams ] || { echo \"snapveil: $(pwd) is not a snapveil target\" >&2; exit 3; }; \
for a in current generations runs manifests streams; do if [ -L \"$a\" ]; then echo \"snapveil: $(pwd)/$a is a symlink: refusing to prune through it\" >&2; exit 3; fi; done\n\
mvnew() { if [ -e \"$2\" ] || [ -L \"$2\" ]; then echo \"snapveil: refusing to overwrite $2\" >&2; exit 3; fi; mv -- \"$1\" \"$2\"; }\n",
    );
    for op in ops {
        let line: Vec<u8> = match op {
            Op::RemoveRecord { stamp } => [
                b"rm -- ".as_slice(),
                &super::rsync::sh_quote(format!("runs/{stamp}.json").as_bytes()),
            ]
            .concat(),
            Op::RemoveManifest { stamp } => [
                b"rm -f -- ".as_slice(),
                &super::rsync::sh_quote(format!("manifests/{stamp}.sha1").as_bytes()),
                b" ",
                &super::rsync::sh_quote(format!("manifests/{stamp}.meta").as_bytes()),
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
            Op::RemoveStream { name } => [
                b"rm -f -- ".as_slice(),
                &super::rsync::sh_quote(format!("streams/{name}").as_bytes()),
            ]
            .concat(),
        };
        s.extend(line);
        s.push(b'\n');
    }
    s
}

/// The entries of a local target that prune looks at, as paths relative to it with
/// whether each is a directory: `runs/*`, `manifests/*`, `generations/*` and everything
/// below stamp-named generations (the same set a remote listing gives).
///
/// # Errors
/// Unreadable directories, a symlinked area, or a directory that is not a target at all.
pub fn local_paths(target: &Path) -> Result<Vec<(Vec<u8>, bool)>, TargetError> {
    super::layout::check_local_layout(target)?;
    let (runs, gens) = (target.join("runs"), target.join("generations"));
    if !runs.is_dir() && !gens.is_dir() {
        return Err(TargetError::NotATarget {
            target: target.display().to_string(),
        });
    }
    let mut paths: Vec<(Vec<u8>, bool)> = Vec::new();
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut Vec<(Vec<u8>, bool)>,
        recurse: bool,
    ) -> Result<(), TargetError> {
        let rd = match fs::read_dir(dir) {
            Err(e) if e.kind() == stdio::ErrorKind::NotFound && dir.parent() == Some(root) => {
                return Ok(())
            }
            r => r.map_err(io(dir))?,
        };
        for e in rd {
            let e = e.map_err(io(dir))?;
            let p = e.path();
            let is_dir = e.file_type().map_err(io(&p))?.is_dir();
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
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(crate::snapshot::valid_stamp)
        })
        .collect();
    for t in tops {
        walk(target, &t, &mut paths, true)?;
    }
    Ok(paths)
}
