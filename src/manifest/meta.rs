//! `TARGET/manifests/STAMP.meta`: what a run saw of every entry of the encrypted view
//! (type, mode, owner, mtime, symlink target, device number), so that a restore as of
//! any restore point recreates the tree as it was then. The `.sha1` manifest cannot:
//! it lists regular files only (so `sha1sum -c` keeps working), and rsync applies a
//! mode-, owner- or mtime-only change to `current/` in place, so no generation keeps
//! the old value.
//!
//! Nothing new leaks to the backup host: it already sees every mode, owner and mtime on
//! `current/` (rsync `-a`), and paths and symlink targets are written as the view shows
//! them, i.e. encrypted (unless the key uses plaintext names, where `current/` shows them
//! in clear anyway).
//!
//! # Format (version 1)
//!
//! ```text
//! # snapveil-meta v1
//! TYPE MODE UID GID MTIME_NS PATH [EXTRA]
//! ```
//!
//! One line per entry, `\n`-terminated, fields separated by one space, sorted by path.
//! - TYPE: `d` directory, `f` regular file, `l` symlink, `p` FIFO, `s` socket,
//!   `c` character device, `b` block device.
//! - MODE: the permission bits (`& 0o7777`) in octal, e.g. `0644`.
//! - UID, GID: decimal numeric ids.
//! - MTIME_NS: modification time in nanoseconds since the epoch, decimal, may be negative.
//! - PATH: relative to `current/`, escaped (below); the root itself is `.`.
//! - EXTRA: for `l` the escaped link target as the view shows it (encrypted); for `c`
//!   and `b` the device number (`st_rdev`) in decimal; absent otherwise.
//!
//! Escaping: `\` is written `\\` and every byte outside `!`..`~` (space, control
//! bytes, DEL, bytes >= 0x80) as `\xHH`, so the file is ASCII and any path byte
//! (newline, space, non-UTF-8) round-trips. Lines starting with `#` are comments; a
//! first line other than the header is an error (an unknown version is refused, not
//! guessed at).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

pub const HEADER: &str = "# snapveil-meta v1";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{file}: not a snapveil metadata file (first line is not {HEADER:?}: {found:?})")]
    Header { file: String, found: String },
    #[error("{file}:{line}: {why}")]
    Parse {
        file: String,
        line: usize,
        why: String,
    },
}

/// An entry's type, with what only that type has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    /// The link target as the view shows it (encrypted).
    Symlink(Vec<u8>),
    Fifo,
    Socket,
    /// `st_rdev`.
    Char(u64),
    Block(u64),
}

impl Kind {
    pub(crate) fn letter(&self) -> char {
        match self {
            Kind::Dir => 'd',
            Kind::File => 'f',
            Kind::Symlink(_) => 'l',
            Kind::Fifo => 'p',
            Kind::Socket => 's',
            Kind::Char(_) => 'c',
            Kind::Block(_) => 'b',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaEntry {
    /// Relative to `current/`, raw bytes; empty for the root.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits only (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
}

impl MetaEntry {
    /// The record of an lstat result; `link` is the symlink's target (readlink) when
    /// `m` is a symlink's.
    pub fn from_metadata(path: Vec<u8>, m: &fs::Metadata, link: Option<Vec<u8>>) -> MetaEntry {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink(link.unwrap_or_default())
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::Char(m.rdev())
        } else if ft.is_block_device() {
            Kind::Block(m.rdev())
        } else {
            Kind::File
        };
        MetaEntry {
            path,
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }

    /// A symlink's target, empty for the rest.
    pub fn link(&self) -> &[u8] {
        match &self.kind {
            Kind::Symlink(l) => l,
            _ => &[],
        }
    }

    /// `st_rdev` of a device, 0 for the rest.
    pub fn rdev(&self) -> u64 {
        match self.kind {
            Kind::Char(r) | Kind::Block(r) => r,
            _ => 0,
        }
    }

    /// The mtime as (seconds, nanoseconds in 0..1e9), as utimensat takes it.
    pub fn mtime(&self) -> (i64, i64) {
        let s = self.mtime_ns.div_euclid(1_000_000_000);
        let n = self.mtime_ns.rem_euclid(1_000_000_000);
        (
            i64::try_from(s).unwrap_or(if s < 0 { i64::MIN } else { i64::MAX }),
            n as i64,
        )
    }
}

fn escape(out: &mut Vec<u8>, b: &[u8]) {
    if b.iter().all(|c| matches!(c, b'!'..=b'~') && *c != b'\\') {
        out.extend_from_slice(b);
        return;
    }
    for &c in b {
        match c {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'!'..=b'~' => out.push(c),
            _ => out.extend_from_slice(format!("\\x{c:02x}").as_bytes()),
        }
    }
}

fn num<T: std::str::FromStr>(b: &[u8]) -> Option<T> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn unescape(b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => match b.get(i + 1) {
                Some(b'\\') => {
                    out.push(b'\\');
                    i += 2;
                }
                Some(b'x') => {
                    let h = b.get(i + 2..i + 4).ok_or("truncated \\x escape")?;
                    let mut v = [0u8; 1];
                    hex::decode_to_slice(h, &mut v).map_err(|_| "bad \\x escape")?;
                    out.push(v[0]);
                    i += 4;
                }
                _ => return Err("unknown escape".into()),
            },
            c @ b'!'..=b'~' => {
                out.push(c);
                i += 1;
            }
            c => return Err(format!("unescaped byte 0x{c:02x}")),
        }
    }
    Ok(out)
}

/// The file's text: header, then one line per entry in the given order.
pub fn format(entries: &[MetaEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 * entries.len() + 20);
    format_to(&mut out, entries.iter().cloned()).expect("writing to memory");
    out
}

/// [`format`], streamed to `w` a few lines at a time.
///
/// # Errors
/// Writing to `w`.
pub fn format_to(
    w: &mut dyn std::io::Write,
    entries: impl IntoIterator<Item = MetaEntry>,
) -> std::io::Result<()> {
    w.write_all(HEADER.as_bytes())?;
    w.write_all(b"\n")?;
    let mut entries = entries.into_iter().peekable();
    while entries.peek().is_some() {
        w.write_all(&format_lines(entries.by_ref().take(512)))?;
    }
    Ok(())
}

fn format_lines(entries: impl IntoIterator<Item = MetaEntry>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    for e in entries {
        push_line(&mut out, &e, &e.path);
    }
    out
}

/// Appends the line of `e` at `path` (`e.path` is not read: a walk keeps paths apart).
pub fn push_line(out: &mut Vec<u8>, e: &MetaEntry, path: &[u8]) {
    use std::io::Write as _;
    // Into the buffer itself: a run writes a line for every entry of the tree.
    write!(
        out,
        "{} {:04o} {} {} {} ",
        e.kind.letter(),
        e.mode,
        e.uid,
        e.gid,
        e.mtime_ns
    )
    .expect("writing to a Vec");
    if path.is_empty() {
        out.push(b'.');
    } else {
        escape(out, path);
    }
    match &e.kind {
        Kind::Symlink(t) => {
            out.push(b' ');
            escape(out, t);
        }
        Kind::Char(r) | Kind::Block(r) => write!(out, " {r}").expect("writing to a Vec"),
        _ => {}
    }
    out.push(b'\n');
}

/// Parses what [`format`] writes. Paths are returned as written (the caller decides
/// what it trusts: see `restore`, which refuses `..`, absolute and empty components).
///
/// # Errors
/// A missing or unknown header, or a malformed line, naming `file` and the line number.
pub fn parse(file: &str, data: &[u8]) -> Result<Vec<MetaEntry>, MetaError> {
    let mut lines = data.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    if first != HEADER.as_bytes() {
        return Err(MetaError::Header {
            file: file.into(),
            found: String::from_utf8_lossy(&first[..first.len().min(60)]).into_owned(),
        });
    }
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        let err = |why: &str| MetaError::Parse {
            file: file.into(),
            line: i + 2,
            why: why.into(),
        };
        let f: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        if f.len() < 6 {
            return Err(err("expected TYPE MODE UID GID MTIME_NS PATH [EXTRA]"));
        }
        let mode = std::str::from_utf8(f[1])
            .ok()
            .and_then(|t| u32::from_str_radix(t, 8).ok())
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| err("bad mode"))?;
        let uid = num(f[2]).ok_or_else(|| err("bad uid"))?;
        let gid = num(f[3]).ok_or_else(|| err("bad gid"))?;
        let mtime_ns = num(f[4]).ok_or_else(|| err("bad mtime"))?;
        let path = match f[5] {
            b"." => Vec::new(),
            p => unescape(p).map_err(|w| err(&format!("path: {w}")))?,
        };
        // Whoever writes the target can write this file: a path must stay inside the
        // tree it describes.
        if !path.is_empty()
            && path
                .split(|b| *b == b'/')
                .any(|c| c.is_empty() || c == b"." || c == b".." || c.contains(&0))
        {
            return Err(err(&format!(
                "unsafe path {:?} (absolute, or an empty, `.` or `..` component)",
                String::from_utf8_lossy(&path)
            )));
        }
        let extra = f.get(6).copied();
        let rdev = || -> Result<u64, MetaError> {
            num(extra.ok_or_else(|| err("device without number"))?)
                .ok_or_else(|| err("bad device number"))
        };
        let kind = match f[0] {
            b"d" => Kind::Dir,
            b"f" => Kind::File,
            b"l" => Kind::Symlink(
                unescape(extra.ok_or_else(|| err("symlink without target"))?)
                    .map_err(|w| err(&format!("link target: {w}")))?,
            ),
            b"p" => Kind::Fifo,
            b"s" => Kind::Socket,
            b"c" => Kind::Char(rdev()?),
            b"b" => Kind::Block(rdev()?),
            _ => return Err(err("unknown type")),
        };
        let want = match kind {
            Kind::Symlink(_) | Kind::Char(_) | Kind::Block(_) => 7,
            _ => 6,
        };
        if f.len() != want {
            return Err(err("wrong number of fields"));
        }
        out.push(MetaEntry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime_ns,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &[u8], kind: Kind) -> MetaEntry {
        MetaEntry {
            path: path.to_vec(),
            kind,
            mode: 0o644,
            uid: 1000,
            gid: 100,
            mtime_ns: 1_764_000_000_123_456_789,
        }
    }

    #[test]
    fn every_kind_and_odd_bytes_round_trip() {
        let mut v = vec![
            MetaEntry {
                mode: 0o7755,
                ..e(b"", Kind::Dir)
            },
            e(b"a b/new\nline\\x\xff\x01", Kind::File),
            e(b"l", Kind::Symlink(b"t a\\r\xfe get\n".to_vec())),
            e(b"l2", Kind::Symlink(Vec::new())),
            e(b"p", Kind::Fifo),
            e(b"s", Kind::Socket),
            e(b"c", Kind::Char(0x0103)),
            e(b"b", Kind::Block(u64::MAX)),
            MetaEntry {
                mtime_ns: -1_500_000_000,
                ..e(b"old", Kind::File)
            },
        ];
        v[1].mode = 0;
        let text = format(&v);
        assert!(text.is_ascii());
        assert_eq!(parse("m", &text).unwrap(), v);
        let s = String::from_utf8(text).unwrap();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], HEADER);
        assert_eq!(lines[1], "d 7755 1000 100 1764000000123456789 .");
        assert_eq!(
            lines[2],
            "f 0000 1000 100 1764000000123456789 a\\x20b/new\\x0aline\\\\x\\xff\\x01"
        );
        assert_eq!(
            lines[3],
            "l 0644 1000 100 1764000000123456789 l t\\x20a\\\\r\\xfe\\x20get\\x0a"
        );
        assert_eq!(lines[7], "c 0644 1000 100 1764000000123456789 c 259");
        assert_eq!(v[8].mtime(), (-2, 500_000_000));
        assert_eq!(v[0].mtime(), (1_764_000_000, 123_456_789));
    }

    #[test]
    fn malformed_input_names_the_line() {
        let bad = |body: &str| parse("x.meta", format!("{HEADER}\n{body}\n").as_bytes());
        for body in [
            "f 0644 0 0 1",
            "f 0648 0 0 1 a",
            "f 17777 0 0 1 a",
            "q 0644 0 0 1 a",
            "f 0644 0 0 1 a extra",
            "l 0644 0 0 1 a",
            "c 0644 0 0 1 a x",
            "f 0644 0 0 1 a\\q",
            "f 0644 0 0 1 a\\x4",
            "f 0644 -1 0 1 a",
            "f 0644 0 0 1 ../x",
            "f 0644 0 0 1 a/../../x",
            "f 0644 0 0 1 /etc/x",
            "f 0644 0 0 1 a//b",
            "f 0644 0 0 1 a/./b",
            "f 0644 0 0 1 a/",
            "f 0644 0 0 1 a\\x00b",
        ] {
            match bad(body) {
                Err(MetaError::Parse { line: 2, file, .. }) => assert_eq!(file, "x.meta"),
                other => panic!("{body:?}: {other:?}"),
            }
        }
        let e = parse("x.meta", b"# snapveil-meta v9\n").unwrap_err();
        assert!(
            e.to_string().contains("x.meta") && e.to_string().contains("v9"),
            "{e}"
        );
        assert!(matches!(parse("x", b""), Err(MetaError::Header { .. })));
        assert_eq!(
            parse("x", format!("{HEADER}\n").as_bytes()).unwrap(),
            vec![]
        );
    }

    #[test]
    fn from_metadata_reads_lstat() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::TempDir::new().unwrap();
        let f = t.path().join("f");
        fs::write(&f, b"x").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("tgt", t.path().join("l")).unwrap();
        let m = fs::symlink_metadata(&f).unwrap();
        let r = MetaEntry::from_metadata(b"f".to_vec(), &m, None);
        assert_eq!((r.kind.clone(), r.mode), (Kind::File, 0o640));
        assert_eq!(r.mtime(), (m.mtime(), m.mtime_nsec()));
        let m = fs::symlink_metadata(t.path().join("l")).unwrap();
        let r = MetaEntry::from_metadata(b"l".to_vec(), &m, Some(b"tgt".to_vec()));
        assert_eq!(r.kind, Kind::Symlink(b"tgt".to_vec()));
    }
}
