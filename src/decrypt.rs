//! Restoring a copy of the view without FUSE: walks an encrypted tree (what rsync put on
//! the target), decrypts names, contents and symlink targets, and recreates modes, mtimes,
//! owners (as root) and special files. Our first restore path, and the same job forward
//! `gocryptfs` does on a mounted copy.
//!
//! A block that fails authentication fails its file (named with the block number), and
//! so does a file whose header names another path's file ID (reverse mode derives it
//! from the encrypted path: a ciphertext copied onto another name). Each file is
//! decrypted to a temporary name and renamed (never over an existing entry) only once
//! every block authenticated, so unauthenticated plaintext is never left on disk. The
//! walk carries on with the rest and reports every failure at the end.
//!
//! The output stays private while it is written (issue 14): directories are created
//! 0700 and files 0600, and each gets its recorded mode only when complete, directories
//! after their contents, the output root last. Every entry is created new (`mkdir`,
//! `O_EXCL`, `RENAME_NOREPLACE`): an entry that exists already, such as a symlink an
//! earlier entry of the same tree created, is never written through.
//!
//! Missing `gocryptfs.diriv` files (a generation directory holds only the files a run
//! replaced) are re-derived: in reverse mode a directory IV is a function of its
//! encrypted path.
//!
//! The decoding rules are `crypto`'s, the same the forward view applies: entries and
//! directory IVs by `names::decode_entry` and `names::dir_iv_of`, file content (size,
//! header, blocks) by `content::decrypt_stream`, streamed through 1 MiB buffers.

use crate::crypto::content;
use crate::crypto::names::{self, decode_entry, dir_iv_of, DIRIV_NAME};
use crate::crypto::{join_cpath, Keys, NameMode};
use crate::manifest::meta::MetaEntry;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: output directory is not empty; refusing to write into it")]
    OutNotEmpty { path: PathBuf },
}

/// What a decryption did; `failures` name each path that could not be restored.
#[derive(Debug, Default)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub others: u64,
    pub bytes: u64,
    pub failures: Vec<(PathBuf, String)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DecryptError + '_ {
    move |source| DecryptError::Io {
        path: path.into(),
        source,
    }
}

/// Decrypts the tree at `src` into `out` (created if missing, must be empty).
///
/// # Errors
/// Only for problems with `src` or `out` themselves; per-entry problems go into the report.
pub fn decrypt_tree(keys: &Keys, src: &Path, out: &Path) -> Result<Report, DecryptError> {
    decrypt_tree_recorded(keys, src, out, None)
}

/// [`decrypt_tree`], with each entry's mode, owner and mtime taken from `recorded` (by
/// encrypted path relative to `src`, the root being the empty path) where it has the
/// entry, instead of from the copy in `src`: a point-in-time restore stages today's
/// copies of the files but must give them the attributes a run recorded.
///
/// # Errors
/// As [`decrypt_tree`].
pub fn decrypt_tree_recorded(
    keys: &Keys,
    src: &Path,
    out: &Path,
    recorded: Option<&BTreeMap<Vec<u8>, MetaEntry>>,
) -> Result<Report, DecryptError> {
    if out.exists() {
        if fs::read_dir(out).map_err(io(out))?.next().is_some() {
            return Err(DecryptError::OutNotEmpty { path: out.into() });
        }
    } else {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .map_err(io(out))?;
    }
    fs::read_dir(src).map_err(io(src))?;
    let mut report = Report::default();
    let w = Walker {
        keys,
        as_root: nix::unistd::geteuid().is_root(),
        recorded,
    };
    w.dir(src, b"", out, true, &mut report);
    let m = fs::metadata(src).map_err(io(src))?;
    w.finish_meta(out, &w.attrs(b"", &m), &mut report);
    Ok(report)
}

struct Walker<'a> {
    keys: &'a Keys,
    as_root: bool,
    recorded: Option<&'a BTreeMap<Vec<u8>, MetaEntry>>,
}

/// What [`Walker::finish_meta`] applies.
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    /// `None`: leave the access time alone (recorded metadata has none).
    atime: Option<(i64, i64)>,
    mtime: (i64, i64),
}

impl Walker<'_> {
    /// The attributes to give the entry at encrypted path `cpath`, whose copy in the
    /// source tree has metadata `m`.
    fn attrs(&self, cpath: &[u8], m: &fs::Metadata) -> Attrs {
        match self.recorded.and_then(|r| r.get(cpath)) {
            Some(e) => Attrs {
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                atime: None,
                mtime: e.mtime(),
            },
            None => Attrs {
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                atime: Some((m.atime(), m.atime_nsec())),
                mtime: (m.mtime(), m.mtime_nsec()),
            },
        }
    }

    fn fail(&self, r: &mut Report, path: &Path, why: impl Into<String>) {
        let why = why.into();
        tracing::error!(path = %path.display(), "{why}");
        r.failures.push((path.into(), why));
    }

    fn dir_iv(&self, dir: &Path, cpath: &[u8], r: &mut Report) -> [u8; 16] {
        dir_iv_of(self.keys, dir, cpath).unwrap_or_else(|why| {
            self.fail(r, &dir.join(DIRIV_NAME), why);
            names::dir_iv(self.keys.flags.names, cpath)
        })
    }

    fn dir(&self, src: &Path, cpath: &[u8], out: &Path, root: bool, r: &mut Report) {
        let iv = self.dir_iv(src, cpath, r);
        let rd = match fs::read_dir(src) {
            Ok(rd) => rd,
            Err(e) => return self.fail(r, src, e.to_string()),
        };
        let mut ents: Vec<(OsString, PathBuf)> = rd
            .filter_map(|e| e.ok())
            .map(|e| (e.file_name(), e.path()))
            .collect();
        ents.sort();
        for (shown, path) in ents {
            let pname = match decode_entry(self.keys, src, &shown, &iv, root) {
                None => continue,
                Some(Ok(p)) => p,
                Some(Err(why)) => {
                    self.fail(r, &path, why);
                    continue;
                }
            };
            let ccpath = join_cpath(cpath, shown.as_bytes());
            let dest = out.join(OsString::from_vec(pname));
            let m = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    self.fail(r, &path, e.to_string());
                    continue;
                }
            };
            let ft = m.file_type();
            if ft.is_dir() {
                use std::os::unix::fs::DirBuilderExt;
                if let Err(e) = fs::DirBuilder::new().mode(0o700).create(&dest) {
                    self.fail(r, &dest, e.to_string());
                    continue;
                }
                r.dirs += 1;
                self.dir(&path, &ccpath, &dest, false, r);
                self.finish_meta(&dest, &self.attrs(&ccpath, &m), r);
            } else if ft.is_symlink() {
                self.symlink(&path, &dest, &self.attrs(&ccpath, &m), r);
            } else if ft.is_file() {
                match self.file(&path, &dest, &ccpath) {
                    Ok(n) => {
                        r.files += 1;
                        r.bytes += n;
                        self.finish_meta(&dest, &self.attrs(&ccpath, &m), r);
                    }
                    Err(why) => self.fail(r, &path, why),
                }
            } else {
                self.special(&path, &dest, &m, &self.attrs(&ccpath, &m), r);
            }
        }
    }

    fn symlink(&self, path: &Path, dest: &Path, a: &Attrs, r: &mut Report) {
        let shown = match fs::read_link(path) {
            Ok(t) => t.into_os_string().into_vec(),
            Err(e) => return self.fail(r, path, e.to_string()),
        };
        let target = if self.keys.flags.names == NameMode::Plaintext {
            shown
        } else {
            match names::decrypt_symlink(self.keys, &shown) {
                Ok(t) => t,
                Err(e) => return self.fail(r, path, format!("cannot decrypt symlink target: {e}")),
            }
        };
        if let Err(e) = std::os::unix::fs::symlink(OsStr::from_bytes(&target), dest) {
            return self.fail(r, dest, e.to_string());
        }
        r.symlinks += 1;
        if self.as_root {
            let _ = nix::unistd::fchownat(
                None,
                dest,
                Some(a.uid.into()),
                Some(a.gid.into()),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
        let t = nix::sys::time::TimeSpec::new(a.mtime.0, a.mtime.1);
        let _ = nix::sys::stat::utimensat(
            None,
            dest,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
    }

    fn special(&self, path: &Path, dest: &Path, m: &fs::Metadata, a: &Attrs, r: &mut Report) {
        let kind = nix::sys::stat::SFlag::from_bits_truncate(m.mode() & libc::S_IFMT);
        let perm = nix::sys::stat::Mode::from_bits_truncate(a.mode);
        match nix::sys::stat::mknod(dest, kind, perm, m.rdev()) {
            Ok(()) => {
                r.others += 1;
                self.finish_meta(dest, a, r);
            }
            Err(e) => self.fail(r, path, format!("cannot recreate special file: {e}")),
        }
    }

    /// Decrypts one file (encrypted path `cpath`) into `dest`, through a temporary name
    /// that is renamed only when every block authenticated; returns the plaintext size.
    fn file(&self, path: &Path, dest: &Path, cpath: &[u8]) -> Result<u64, String> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let f = File::open(path).map_err(|e| e.to_string())?;
        let size = f.metadata().map_err(|e| e.to_string())?.len();
        content::checked_plain_size(size).map_err(|e| e.to_string())?;
        let tmp = dest.with_file_name(format!(
            ".snapveil-partial-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode_private()
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        let result = (|| {
            let mut w = BufWriter::with_capacity(1 << 20, out);
            let mut rd = BufReader::with_capacity(1 << 20, f);
            let expect = content::FileIvs::for_cpath(cpath).file_id;
            let total = content::decrypt_stream(self.keys, size, &mut rd, &mut w, Some(&expect))
                .map_err(|e| match e {
                    content::ContentError::Write(e) => format!("{}: {e}", dest.display()),
                    e => e.to_string(),
                })?;
            w.flush().map_err(|e| format!("{}: {e}", dest.display()))?;
            nix::fcntl::renameat2(
                None,
                &tmp,
                None,
                dest,
                nix::fcntl::RenameFlags::RENAME_NOREPLACE,
            )
            .map_err(|e| format!("{}: {e}", dest.display()))?;
            Ok(total)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Mode, owner (as root) and times, applied after content so mtimes stick.
    fn finish_meta(&self, dest: &Path, at: &Attrs, r: &mut Report) {
        if self.as_root {
            if let Err(e) = nix::unistd::chown(dest, Some(at.uid.into()), Some(at.gid.into())) {
                self.fail(r, dest, format!("chown: {e}"));
            }
        }
        if let Err(e) = fs::set_permissions(dest, fs::Permissions::from_mode(at.mode)) {
            self.fail(r, dest, format!("chmod: {e}"));
        }
        let t = nix::sys::time::TimeSpec::new(at.mtime.0, at.mtime.1);
        let a = match at.atime {
            Some((s, n)) => nix::sys::time::TimeSpec::new(s, n),
            None => nix::sys::time::TimeSpec::UTIME_OMIT,
        };
        if let Err(e) = nix::sys::stat::utimensat(
            None,
            dest,
            &a,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        ) {
            self.fail(r, dest, format!("utimensat: {e}"));
        }
    }
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for fs::OpenOptions {
    /// Plaintext is created unreadable by others until its real mode is applied.
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}
