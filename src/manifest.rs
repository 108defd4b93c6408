//! Checksum manifests of an encrypted tree in `sha1sum` format, so that on the backup
//! host `cd TARGET/current && sha1sum -c ../manifests/STAMP.sha1` works with no snapveil
//! installed. Regular files only: symlink targets in the view are ciphertext, which
//! `sha1sum` would try to follow. Everything else a restore needs (types, modes, owners,
//! mtimes, symlink targets) is in the run's metadata file: [`meta`].

pub mod meta;

use rayon::prelude::*;
use sha1::{Digest, Sha1};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A path's key for sets and lookups that must not hold the path itself: the first 16
/// bytes of its SHA-256. 16 bytes a file whatever the path's length, so a big tree's
/// sets cost a few MB (issue 13); two of 10 million paths share a key with a chance of
/// about 1e-25.
pub fn path_key(path: &[u8]) -> [u8; 16] {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(path);
    d[..16].try_into().expect("16 bytes")
}

/// A set of paths by [`path_key`]: what rsync sent, what a manifest hashes again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathSet(Vec<[u8; 16]>);

impl PathSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a path. Call [`PathSet::seal`] before the first lookup.
    pub fn insert(&mut self, path: &[u8]) {
        self.0.push(path_key(path));
    }

    /// Adds every key of `other`. Call [`PathSet::seal`] before the first lookup.
    pub fn merge(&mut self, other: PathSet) {
        self.0.extend(other.0);
    }

    /// Sorts and deduplicates: lookups are binary searches.
    pub fn seal(&mut self) {
        self.0.sort_unstable();
        self.0.dedup();
        self.0.shrink_to_fit();
    }

    pub fn contains(&self, path: &[u8]) -> bool {
        debug_assert!(self.0.is_sorted(), "PathSet::seal before lookups");
        self.0.binary_search(&path_key(path)).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the tree root, raw bytes.
    pub path: Vec<u8>,
    pub sha1: [u8; 20],
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{file}:{line}: not a sha1sum line")]
    Parse { file: String, line: usize },
    #[error("{file}:{line}: not in path order (snapveil writes its manifests sorted)")]
    Order { file: String, line: usize },
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let rd = fs::read_dir(dir).map_err(|source| ManifestError::Io {
        path: dir.into(),
        source,
    })?;
    for e in rd {
        let e = e.map_err(|source| ManifestError::Io {
            path: dir.into(),
            source,
        })?;
        let ft = e.file_type().map_err(|source| ManifestError::Io {
            path: e.path(),
            source,
        })?;
        if ft.is_dir() {
            files(&e.path(), out)?;
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

pub fn sha1_file(path: &Path) -> io::Result<[u8; 20]> {
    sha1_file_with(path, &mut vec![0u8; SHA1_BUF])
}

/// The read buffer [`sha1_file_with`] wants: large reads of a large file through the view.
pub const SHA1_BUF: usize = 1 << 20;

/// [`sha1_file`] reading through `buf`: a caller hashing many files keeps one buffer (a
/// fresh 1 MiB buffer is an mmap, page faults and a munmap for every file: about 1 s
/// on 100,000 small files).
pub fn sha1_file_with(path: &Path, buf: &mut [u8]) -> io::Result<[u8; 20]> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha1::new();
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Hashes every regular file under `root` (several at once), sorted by path.
///
/// # Errors
/// The first unreadable directory or file, by path.
pub fn build(root: &Path) -> Result<Vec<Entry>, ManifestError> {
    let mut paths = Vec::new();
    files(root, &mut paths)?;
    let mut out: Vec<Entry> = paths
        .par_iter()
        .map_init(
            || vec![0u8; SHA1_BUF],
            |buf, p| {
                let sha1 = sha1_file_with(p, buf).map_err(|source| ManifestError::Io {
                    path: p.clone(),
                    source,
                })?;
                let rel = p
                    .strip_prefix(root)
                    .expect("under root")
                    .as_os_str()
                    .as_bytes()
                    .to_vec();
                Ok(Entry { path: rel, sha1 })
            },
        )
        .collect::<Result<_, ManifestError>>()?;
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// `sha1sum` output format, with GNU's escaping of `\` and newline in names.
pub fn format(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    format_to(&mut out, entries).expect("writing to memory");
    out
}

/// [`format`], streamed to `w` a few lines at a time.
///
/// # Errors
/// Writing to `w`.
pub fn format_to(w: &mut dyn io::Write, entries: &[Entry]) -> io::Result<()> {
    format_pairs_to(w, entries.iter().map(|e| (e.path.as_slice(), &e.sha1)))
}

/// [`format_to`] of (path, sha1) pairs, so a caller need not build [`Entry`]s.
///
/// # Errors
/// Writing to `w`.
pub fn format_pairs_to<'a, P: AsRef<[u8]>>(
    w: &mut dyn io::Write,
    entries: impl Iterator<Item = (P, &'a [u8; 20])>,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(1 << 16);
    for (path, sha1) in entries {
        let path = path.as_ref();
        let needs = path.iter().any(|b| *b == b'\\' || *b == b'\n');
        if needs {
            out.push(b'\\');
        }
        let mut hex = [0u8; 40];
        hex::encode_to_slice(sha1, &mut hex).expect("40 hex digits for 20 bytes");
        out.extend_from_slice(&hex);
        out.extend_from_slice(b"  ");
        for b in path {
            match b {
                b'\\' if needs => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b => out.push(*b),
            }
        }
        out.push(b'\n');
        if out.len() >= 1 << 16 {
            w.write_all(&out)?;
            out.clear();
        }
    }
    w.write_all(&out)
}

/// Parses `sha1sum` output (as written by [`format`] or by `sha1sum` itself).
///
/// # Errors
/// A line that is not `HEX40  PATH`, naming `file` and the line number.
pub fn parse(file: &str, data: &[u8]) -> Result<Vec<Entry>, ManifestError> {
    let mut out = Vec::new();
    parse_each(file, data, |path, sha1| {
        out.push(Entry {
            path: path.to_vec(),
            sha1,
        })
    })?;
    Ok(out)
}

/// [`parse`], handing each (path, sha1) to `f` instead of collecting them.
///
/// # Errors
/// As [`parse`].
pub fn parse_each(
    file: &str,
    data: &[u8],
    mut f: impl FnMut(&[u8], [u8; 20]),
) -> Result<(), ManifestError> {
    let mut unescaped = Vec::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        let parsed = parse_line(line, &mut unescaped).map_err(|()| ManifestError::Parse {
            file: file.into(),
            line: i + 1,
        })?;
        if let Some((path, sha1)) = parsed {
            f(path, sha1);
        }
    }
    Ok(())
}

/// A manifest line's (path, sha1).
pub type Line<'a> = (&'a [u8], [u8; 20]);

/// One line of `sha1sum` output, without its newline: `None` for an empty line. An
/// escaped path (`\` first: a name with a newline or a backslash) is unescaped into
/// `unescaped`.
fn parse_line<'a>(line: &'a [u8], unescaped: &'a mut Vec<u8>) -> Result<Option<Line<'a>>, ()> {
    if line.is_empty() {
        return Ok(None);
    }
    let (escaped, line) = match line.strip_prefix(b"\\") {
        Some(rest) => (true, rest),
        None => (false, line),
    };
    if line.len() < 43 || &line[40..42] != b"  " && &line[40..42] != b" *" {
        return Err(());
    }
    let mut sha1 = [0u8; 20];
    hex::decode_to_slice(&line[..40], &mut sha1).map_err(|_| ())?;
    let raw = &line[42..];
    if !escaped {
        return Ok(Some((raw, sha1)));
    }
    unescaped.clear();
    let mut it = raw.iter();
    while let Some(b) = it.next() {
        if *b == b'\\' {
            match it.next() {
                Some(b'n') => unescaped.push(b'\n'),
                Some(b'\\') => unescaped.push(b'\\'),
                _ => return Err(()),
            }
        } else {
            unescaped.push(*b);
        }
    }
    Ok(Some((&unescaped[..], sha1)))
}

/// A manifest read line by line from a file ([`parse`] without holding it): what a run
/// merges with its walk, so that the last restore point's manifest costs no memory that
/// grows with the tree.
pub struct Reader<R> {
    file: String,
    r: R,
    line: Vec<u8>,
    unescaped: Vec<u8>,
    at: usize,
}

impl<R: std::io::BufRead> Reader<R> {
    /// `file` names it in errors.
    pub fn new(file: &str, r: R) -> Self {
        Reader {
            file: file.into(),
            r,
            line: Vec::new(),
            unescaped: Vec::new(),
            at: 0,
        }
    }

    /// The number of the line [`Reader::next_entry`] returned last.
    pub fn line(&self) -> usize {
        self.at
    }

    /// `file`, as errors name it.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The next (path, sha1); `None` at the end.
    ///
    /// # Errors
    /// Reading fails, or a line does not parse (by file and line number).
    pub fn next_entry(&mut self) -> Result<Option<Line<'_>>, ManifestError> {
        loop {
            self.line.clear();
            self.at += 1;
            let n =
                self.r
                    .read_until(b'\n', &mut self.line)
                    .map_err(|source| ManifestError::Io {
                        path: self.file.clone().into(),
                        source,
                    })?;
            if n == 0 {
                return Ok(None);
            }
            if self.line.last() == Some(&b'\n') {
                self.line.pop();
            }
            if self.line.is_empty() {
                continue;
            }
            let at = self.at;
            let file = &self.file;
            return parse_line(&self.line, &mut self.unescaped).map_err(|()| {
                ManifestError::Parse {
                    file: file.clone(),
                    line: at,
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_set_finds_exactly_its_paths_by_key() {
        let mut set = PathSet::new();
        set.insert(b"a/b");
        set.insert(b"a/b\n");
        let mut more = PathSet::new();
        more.insert(b"z");
        more.insert(b"a/b");
        set.merge(more);
        set.seal();
        assert_eq!(set.len(), 3, "a path added twice is there once");
        for p in [&b"a/b"[..], b"a/b\n", b"z"] {
            assert!(set.contains(p), "{p:?}");
        }
        for p in [&b"a"[..], b"a/", b"", b"Z"] {
            assert!(!set.contains(p), "{p:?}");
        }
    }

    #[test]
    fn format_and_parse_round_trip_with_escapes() {
        let e = vec![
            Entry {
                path: b"a/b".to_vec(),
                sha1: [1; 20],
            },
            Entry {
                path: b"new\nline\\x".to_vec(),
                sha1: [2; 20],
            },
        ];
        let text = format(&e);
        assert!(text.starts_with(b"0101010101010101010101010101010101010101  a/b\n\\0202"));
        assert_eq!(parse("m", &text).unwrap(), e);
        assert!(matches!(
            parse("m", b"zz  x\n"),
            Err(ManifestError::Parse { line: 1, .. })
        ));
    }

    #[test]
    fn sha1sum_checks_what_we_write() {
        let t = tempfile::TempDir::new().unwrap();
        let root = t.path().join("tree");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"hello").unwrap();
        fs::write(root.join("odd\\name"), b"x").unwrap();
        let m = build(&root).unwrap();
        assert_eq!(m.len(), 2);
        let mf = t.path().join("m.sha1");
        fs::write(&mf, format(&m)).unwrap();
        let check = || {
            std::process::Command::new("sha1sum")
                .arg("-c")
                .arg("--quiet")
                .arg(&mf)
                .current_dir(&root)
                .status()
                .unwrap()
        };
        assert!(check().success());
        fs::write(root.join("d/f"), b"tampered").unwrap();
        assert!(!check().success());
    }
}
