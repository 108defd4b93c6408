//! The encrypted reverse view, without FUSE: maps a frozen plaintext tree to the tree
//! `gocryptfs -reverse` would show (encrypted names, diriv and longname companions,
//! `gocryptfs.conf` at the root, encrypted contents and symlink targets).
//!
//! Owns: node numbering, directory listings, attributes, reads. Does not own: the kernel
//! protocol (`fuse.rs`) or mounting (`mount.rs`).
//!
//! The source is a snapshot, so nothing underneath changes: each directory is listed and
//! its names encrypted once, node numbers are assigned once and never reused, and the
//! kernel may cache attributes and pages for as long as the mount lives.
//!
//! Hard links: gocryptfs 2.3 gives every path of a hard-linked inode the file ID of the
//! path opened first, so the ciphertext depends on access order. Here every path derives
//! its own values from its own encrypted path (spec §5 "a compatible implementation may
//! pick any deterministic rule") and is shown as its own file (own node number, link
//! count 1), so the result never depends on order or remounts and `rsync -H` can never
//! link two different ciphertexts together.

pub mod forward;
pub mod fuse;
pub mod mount;

pub use mount::{cleanup_stale_mount, Access, MountedView, ViewOptions};

use crate::crypto::content::{self, FileIvs, BLOCK, CBLOCK, HEADER_LEN};
use crate::crypto::names::{self, CONF_NAME, DIRIV_NAME, LONGNAME_SUFFIX, REVERSE_CONF_NAME};
use crate::crypto::{join_cpath, Keys, NameMode};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const ROOT_INO: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("no such entry")]
    NotFound,
    #[error("excluded from the view")]
    Excluded,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: only regular files can be opened in the view")]
    NotRegular { path: PathBuf },
    #[error("invalid exclude pattern {pattern:?}: {reason}")]
    Exclude { pattern: String, reason: String },
    #[error("{path}: not a directory")]
    NotDir { path: PathBuf },
}

impl ViewError {
    pub fn errno(&self) -> i32 {
        match self {
            ViewError::NotFound => libc::ENOENT,
            ViewError::Excluded => libc::EPERM,
            ViewError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ViewError::NotRegular { .. } => libc::EACCES,
            ViewError::Exclude { .. } => libc::EINVAL,
            ViewError::NotDir { .. } => libc::ENOTDIR,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    fn of(meta: &Metadata) -> Kind {
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::CharDev
        } else if ft.is_block_device() {
            Kind::BlockDev
        } else {
            Kind::File
        }
    }
}

/// Attributes as the view shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

#[derive(Clone, Debug)]
enum NodeKind {
    /// An entry of the plaintext tree.
    Real,
    /// `gocryptfs.diriv` of the parent directory.
    DirIv,
    /// `gocryptfs.longname.H.name`: holds the full encrypted name of `named`.
    LongName { content: Arc<[u8]>, named: PathBuf },
    /// `gocryptfs.conf`, the key config itself.
    Conf,
}

#[derive(Clone, Debug)]
struct Node {
    /// Path relative to the source root (for virtual files: of the directory holding them).
    plain: PathBuf,
    /// Encrypted relative path (long names in their hashed form), the input of every IV.
    cpath: Vec<u8>,
    /// Name as shown in the view (last component of `cpath`).
    shown: Vec<u8>,
    kind: NodeKind,
}

/// One directory's listing, built once.
pub struct Listing {
    pub entries: Vec<(u64, OsString, Kind)>,
    by_name: HashMap<OsString, u64>,
    excluded: HashSet<OsString>,
}

impl Listing {
    pub fn new(entries: Vec<(u64, OsString, Kind)>, excluded: HashSet<OsString>) -> Self {
        let by_name = entries.iter().map(|(i, n, _)| (n.clone(), *i)).collect();
        Listing {
            entries,
            by_name,
            excluded,
        }
    }

    pub fn get(&self, name: &OsStr) -> Option<u64> {
        self.by_name.get(name).copied()
    }
}

/// What the FUSE adapter needs from a tree: the reverse (encrypting) view over a
/// snapshot, or the forward (decrypting) view over a backup copy.
pub trait Tree: Send + Sync + 'static {
    type Handle: Send + Sync + 'static;
    fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, ViewError>;
    fn getattr(&self, ino: u64) -> Result<Attr, ViewError>;
    fn listing(&self, ino: u64) -> Result<Arc<Listing>, ViewError>;
    fn readlink(&self, ino: u64) -> Result<Vec<u8>, ViewError>;
    fn open(&self, ino: u64) -> Result<Self::Handle, ViewError>;
    fn read(&self, h: &Self::Handle, offset: u64, size: u32) -> Result<Vec<u8>, ViewError>;
}

impl Tree for ViewCore {
    type Handle = Handle;
    fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, ViewError> {
        ViewCore::lookup(self, parent, name)
    }
    fn getattr(&self, ino: u64) -> Result<Attr, ViewError> {
        ViewCore::getattr(self, ino)
    }
    fn listing(&self, ino: u64) -> Result<Arc<Listing>, ViewError> {
        ViewCore::listing(self, ino)
    }
    fn readlink(&self, ino: u64) -> Result<Vec<u8>, ViewError> {
        ViewCore::readlink(self, ino)
    }
    fn open(&self, ino: u64) -> Result<Handle, ViewError> {
        ViewCore::open(self, ino)
    }
    fn read(&self, h: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, ViewError> {
        ViewCore::read(self, h, offset, size)
    }
}

#[derive(Default)]
struct Table {
    nodes: Vec<Node>,
    index: HashMap<(u64, Vec<u8>), u64>,
}

impl Table {
    fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get((ino as usize).checked_sub(1)?)
    }

    fn intern(&mut self, parent: u64, node: Node) -> u64 {
        let key = (parent, node.shown.clone());
        if let Some(ino) = self.index.get(&key) {
            return *ino;
        }
        self.nodes.push(node);
        let ino = self.nodes.len() as u64;
        self.index.insert(key, ino);
        ino
    }
}

/// The key config shown as `gocryptfs.conf` at the root.
#[derive(Clone)]
pub struct ExportedConf {
    pub bytes: Arc<[u8]>,
    /// The file whose attributes the virtual file reports.
    pub stat_path: PathBuf,
}

pub struct ViewCore {
    root: PathBuf,
    keys: Keys,
    conf: Option<ExportedConf>,
    excludes: Gitignore,
    table: RwLock<Table>,
    listings: RwLock<HashMap<u64, Arc<Listing>>>,
}

/// An open file of the view.
pub enum Handle {
    Real {
        file: File,
        ivs: FileIvs,
        plain_size: u64,
    },
    Virtual(Arc<[u8]>),
}

impl ViewCore {
    /// # Errors
    /// Root missing or not a directory; an exclude pattern that does not parse.
    pub fn new(
        root: &Path,
        keys: Keys,
        conf: Option<ExportedConf>,
        excludes: &[String],
    ) -> Result<Self, ViewError> {
        let meta = fs::metadata(root).map_err(|source| ViewError::Io {
            path: root.into(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(ViewError::NotDir { path: root.into() });
        }
        let mut gb = GitignoreBuilder::new(root);
        for p in excludes {
            gb.add_line(None, p).map_err(|e| ViewError::Exclude {
                pattern: p.clone(),
                reason: e.to_string(),
            })?;
        }
        let excludes = gb.build().map_err(|e| ViewError::Exclude {
            pattern: String::new(),
            reason: e.to_string(),
        })?;
        let mut table = Table::default();
        table.nodes.push(Node {
            plain: PathBuf::new(),
            cpath: Vec::new(),
            shown: Vec::new(),
            kind: NodeKind::Real,
        });
        Ok(ViewCore {
            root: root.into(),
            keys,
            conf,
            excludes,
            table: RwLock::new(table),
            listings: RwLock::new(HashMap::new()),
        })
    }

    pub fn name_mode(&self) -> NameMode {
        self.keys.flags.names
    }

    fn node(&self, ino: u64) -> Result<Node, ViewError> {
        self.table
            .read()
            .expect("table lock")
            .get(ino)
            .cloned()
            .ok_or(ViewError::NotFound)
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    fn lstat(&self, rel: &Path) -> Result<Metadata, ViewError> {
        let p = self.abs(rel);
        fs::symlink_metadata(&p).map_err(|source| ViewError::Io { path: p, source })
    }

    /// The listing of directory `ino`, built on first use.
    ///
    /// # Errors
    /// Unknown node, not a directory, or the plaintext directory cannot be read.
    pub fn listing(&self, ino: u64) -> Result<Arc<Listing>, ViewError> {
        if let Some(l) = self.listings.read().expect("listings lock").get(&ino) {
            return Ok(Arc::clone(l));
        }
        let dir = self.node(ino)?;
        if !matches!(dir.kind, NodeKind::Real) {
            return Err(ViewError::NotDir { path: dir.plain });
        }
        let l = Arc::new(self.build_listing(ino, &dir)?);
        let mut w = self.listings.write().expect("listings lock");
        Ok(Arc::clone(w.entry(ino).or_insert(l)))
    }

    fn build_listing(&self, ino: u64, dir: &Node) -> Result<Listing, ViewError> {
        let abs = self.abs(&dir.plain);
        let rd = fs::read_dir(&abs).map_err(|source| ViewError::Io {
            path: abs.clone(),
            source,
        })?;
        let mode = self.keys.flags.names;
        let iv = names::dir_iv(mode, &dir.cpath);
        let is_root = ino == ROOT_INO;
        let mut real = Vec::new();
        let mut longs = Vec::new();
        let mut excluded = HashSet::new();
        for ent in rd {
            let ent = ent.map_err(|source| ViewError::Io {
                path: abs.clone(),
                source,
            })?;
            let pname = ent.file_name();
            if is_root && pname == REVERSE_CONF_NAME {
                continue; // shown as gocryptfs.conf instead, like gocryptfs -reverse
            }
            let ft = ent.file_type().map_err(|source| ViewError::Io {
                path: ent.path(),
                source,
            })?;
            let rel = dir.plain.join(&pname);
            let (shown, long) = match mode {
                NameMode::Plaintext => (pname.as_bytes().to_vec(), None),
                _ => {
                    let e = names::encrypt_component(&self.keys, &iv, pname.as_bytes());
                    (e.shown.into_bytes(), e.long)
                }
            };
            if self
                .excludes
                .matched_path_or_any_parents(&rel, ft.is_dir())
                .is_ignore()
            {
                excluded.insert(OsString::from_vec(shown));
                if let Some(l) = long {
                    excluded.insert(OsString::from(format!(
                        "{}{LONGNAME_SUFFIX}",
                        names::long_hash(&l)
                    )));
                }
                continue;
            }
            if is_root && self.conf.is_some() && shown == CONF_NAME.as_bytes() {
                // Only possible with plaintext names. gocryptfs shows an inaccessible
                // renamed entry; a backup must not silently lose the file, so say it loudly.
                tracing::error!(path = %rel.display(), "a source file named gocryptfs.conf collides with the view's key config and is NOT in the view");
                continue;
            }
            let cpath = join_cpath(&dir.cpath, &shown);
            real.push((
                Node {
                    plain: rel.clone(),
                    cpath,
                    shown,
                    kind: NodeKind::Real,
                },
                kind_of_ft(&ft),
            ));
            if let Some(l) = long {
                let hashed = names::long_hash(&l);
                let nname = format!("{hashed}{LONGNAME_SUFFIX}").into_bytes();
                longs.push(Node {
                    plain: rel.clone(),
                    cpath: join_cpath(&dir.cpath, &nname),
                    shown: nname,
                    kind: NodeKind::LongName {
                        content: Arc::from(l.into_bytes()),
                        named: rel,
                    },
                });
            }
        }
        let mut virt = Vec::new();
        if mode == NameMode::DirIv {
            let n = DIRIV_NAME.as_bytes().to_vec();
            virt.push(Node {
                plain: dir.plain.clone(),
                cpath: join_cpath(&dir.cpath, &n),
                shown: n,
                kind: NodeKind::DirIv,
            });
        }
        if is_root && self.conf.is_some() {
            let n = CONF_NAME.as_bytes().to_vec();
            virt.push(Node {
                plain: PathBuf::new(),
                cpath: n.clone(),
                shown: n,
                kind: NodeKind::Conf,
            });
        }
        let mut table = self.table.write().expect("table lock");
        let mut entries = Vec::with_capacity(real.len() + virt.len() + longs.len());
        for (node, kind) in real {
            let name = OsString::from_vec(node.shown.clone());
            entries.push((table.intern(ino, node), name, kind));
        }
        for node in virt.into_iter().chain(longs) {
            let name = OsString::from_vec(node.shown.clone());
            entries.push((table.intern(ino, node), name, Kind::File));
        }
        let by_name = entries.iter().map(|(i, n, _)| (n.clone(), *i)).collect();
        Ok(Listing {
            entries,
            by_name,
            excluded,
        })
    }

    /// # Errors
    /// `NotFound`, `Excluded` (EPERM, as gocryptfs), or I/O errors of the source.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, ViewError> {
        let l = self.listing(parent)?;
        match l.get(name) {
            Some(ino) => self.getattr(ino),
            None if l.excluded.contains(name) => Err(ViewError::Excluded),
            None => Err(ViewError::NotFound),
        }
    }

    /// # Errors
    /// Unknown node or I/O errors of the source.
    pub fn getattr(&self, ino: u64) -> Result<Attr, ViewError> {
        let node = self.node(ino)?;
        match &node.kind {
            NodeKind::Real => {
                let m = self.lstat(&node.plain)?;
                let kind = Kind::of(&m);
                let (size, nlink) = match kind {
                    Kind::File => (content::cipher_size(m.size()), 1),
                    Kind::Symlink => (self.readlink_node(&node)?.len() as u64, 1),
                    _ => (m.size(), m.nlink() as u32),
                };
                Ok(attr_from(
                    ino,
                    kind,
                    size,
                    nlink,
                    (m.mode() & 0o7777) as u16,
                    &m,
                ))
            }
            NodeKind::DirIv => {
                let m = self.lstat(&node.plain)?;
                Ok(attr_from(ino, Kind::File, 16, 1, 0o444, &m))
            }
            NodeKind::LongName { content, named } => {
                let m = self.lstat(named)?;
                Ok(attr_from(
                    ino,
                    Kind::File,
                    content.len() as u64,
                    1,
                    0o444,
                    &m,
                ))
            }
            NodeKind::Conf => {
                let conf = self.conf.as_ref().ok_or(ViewError::NotFound)?;
                let m = fs::metadata(&conf.stat_path).map_err(|source| ViewError::Io {
                    path: conf.stat_path.clone(),
                    source,
                })?;
                Ok(attr_from(
                    ino,
                    Kind::File,
                    conf.bytes.len() as u64,
                    1,
                    (m.mode() & 0o7777) as u16,
                    &m,
                ))
            }
        }
    }

    fn readlink_node(&self, node: &Node) -> Result<Vec<u8>, ViewError> {
        let p = self.abs(&node.plain);
        let target = fs::read_link(&p).map_err(|source| ViewError::Io { path: p, source })?;
        let target = target.into_os_string().into_vec();
        Ok(match self.keys.flags.names {
            NameMode::Plaintext => target,
            _ => names::encrypt_symlink(&self.keys, &node.cpath, &node.shown, &target).into_bytes(),
        })
    }

    /// # Errors
    /// Unknown node, not a symlink, or I/O errors of the source.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, ViewError> {
        let node = self.node(ino)?;
        if !matches!(node.kind, NodeKind::Real) {
            return Err(ViewError::NotFound);
        }
        self.readlink_node(&node)
    }

    /// # Errors
    /// Unknown node, a special file (EACCES, as gocryptfs), or I/O errors.
    pub fn open(&self, ino: u64) -> Result<Handle, ViewError> {
        let node = self.node(ino)?;
        match &node.kind {
            NodeKind::Real => {
                let p = self.abs(&node.plain);
                let m = fs::symlink_metadata(&p).map_err(|source| ViewError::Io {
                    path: p.clone(),
                    source,
                })?;
                if !m.is_file() {
                    return Err(ViewError::NotRegular { path: p });
                }
                use std::os::unix::fs::OpenOptionsExt;
                let file = fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME)
                    .open(&p)
                    .or_else(|_| {
                        fs::OpenOptions::new()
                            .read(true)
                            .custom_flags(libc::O_NOFOLLOW)
                            .open(&p)
                    })
                    .map_err(|source| ViewError::Io {
                        path: p.clone(),
                        source,
                    })?;
                Ok(Handle::Real {
                    file,
                    ivs: FileIvs::for_cpath(&node.cpath),
                    plain_size: m.size(),
                })
            }
            NodeKind::DirIv => Ok(Handle::Virtual(Arc::from(
                &names::dir_iv(NameMode::DirIv, parent_cpath(&node.cpath))[..],
            ))),
            NodeKind::LongName { content, .. } => Ok(Handle::Virtual(Arc::clone(content))),
            NodeKind::Conf => Ok(Handle::Virtual(Arc::clone(
                &self.conf.as_ref().ok_or(ViewError::NotFound)?.bytes,
            ))),
        }
    }

    /// Reads `size` bytes of the encrypted content at `offset`. The blocks a read touches
    /// are encrypted in parallel: one 1 MiB read is 256 independent AES-SIV operations.
    ///
    /// # Errors
    /// I/O errors of the source file.
    pub fn read(&self, h: &Handle, offset: u64, size: u32) -> Result<Vec<u8>, ViewError> {
        match h {
            Handle::Virtual(data) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                Ok(data[start..end].to_vec())
            }
            Handle::Real {
                file,
                ivs,
                plain_size,
            } => read_encrypted(&self.keys, file, ivs, *plain_size, offset, size as u64).map_err(
                |source| ViewError::Io {
                    path: PathBuf::from("(open file)"),
                    source,
                },
            ),
        }
    }
}

fn parent_cpath(cpath: &[u8]) -> &[u8] {
    match cpath.iter().rposition(|b| *b == b'/') {
        Some(i) => &cpath[..i],
        None => &[],
    }
}

pub(crate) fn kind_of_ft(ft: &fs::FileType) -> Kind {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        Kind::Dir
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDev
    } else if ft.is_block_device() {
        Kind::BlockDev
    } else {
        Kind::File
    }
}

pub(crate) fn attr_from(
    ino: u64,
    kind: Kind,
    size: u64,
    nlink: u32,
    perm: u16,
    m: &Metadata,
) -> Attr {
    Attr {
        ino,
        kind,
        size,
        perm,
        nlink,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
    }
}

/// Encrypted bytes `[offset, offset+size)` of a file whose plaintext is `file`.
pub fn read_encrypted(
    keys: &Keys,
    file: &File,
    ivs: &FileIvs,
    plain_size: u64,
    offset: u64,
    size: u64,
) -> std::io::Result<Vec<u8>> {
    let csize = content::cipher_size(plain_size);
    if offset >= csize || size == 0 {
        return Ok(Vec::new());
    }
    let end = (offset + size).min(csize);
    let mut out = Vec::with_capacity((end - offset) as usize);
    if offset < HEADER_LEN {
        out.extend_from_slice(&ivs.header()[offset as usize..(end.min(HEADER_LEN)) as usize]);
        if end <= HEADER_LEN {
            return Ok(out);
        }
    }
    let body_start = offset.max(HEADER_LEN) - HEADER_LEN;
    let body_end = end - HEADER_LEN;
    let first = body_start / CBLOCK;
    let last = (body_end - 1) / CBLOCK;
    let pt_start = first * BLOCK;
    let pt_len = ((last + 1) * BLOCK).min(plain_size) - pt_start;
    let mut pt = vec![0u8; pt_len as usize];
    let mut got = 0usize;
    while got < pt.len() {
        match file.read_at(&mut pt[got..], pt_start + got as u64) {
            Ok(0) => break, // file shrank under a live (dir:) source; serve what exists
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    pt.truncate(got);
    let n = pt.len().div_ceil(BLOCK as usize) as u64;
    // The file may have shrunk under a live (dir:) source: serve what exists.
    let body_end = body_end.min(first * CBLOCK + pt.len() as u64 + 32 * n);
    if n == 0 || body_end <= body_start {
        return Ok(out);
    }
    // Encrypt straight into the reply: blocks that lie wholly inside the requested range
    // (all but at most the first and the last) in parallel, in place; the partial ones
    // through a small buffer. The bulk of the data is written once, never copied again.
    let hdr = out.len();
    out.resize(hdr + (body_end - body_start) as usize, 0);
    let body = &mut out[hdr..];
    let clen = |i: u64| (BLOCK.min(pt.len() as u64 - i * BLOCK) + 32) as usize;
    let start = |i: u64| (first + i) * CBLOCK;
    let inside = |i: u64| start(i) >= body_start && start(i) + clen(i) as u64 <= body_end;
    let lo = if inside(0) { 0 } else { 1 };
    let hi = if inside(n - 1) { n } else { n - 1 };
    if lo < hi {
        let a = (start(lo) - body_start) as usize;
        let b = (start(hi - 1) - body_start) as usize + clen(hi - 1);
        let p_end = (hi * BLOCK).min(pt.len() as u64) as usize;
        body[a..b]
            .par_chunks_mut(CBLOCK as usize)
            .zip(pt[(lo * BLOCK) as usize..p_end].par_chunks(BLOCK as usize))
            .enumerate()
            .for_each(|(k, (c, p))| {
                let bn = first + lo + k as u64;
                content::encrypt_block(keys, bn, Some(&ivs.file_id), &ivs.nonce(bn), p, c);
            });
    }
    let mut partial: Vec<u64> = vec![0, n - 1];
    partial.dedup();
    let mut tmp = vec![0u8; CBLOCK as usize];
    for i in partial.into_iter().filter(|i| !(lo..hi).contains(i)) {
        let bn = first + i;
        let p0 = (i * BLOCK) as usize;
        let p = &pt[p0..(p0 + BLOCK as usize).min(pt.len())];
        let c = &mut tmp[..clen(i)];
        content::encrypt_block(keys, bn, Some(&ivs.file_id), &ivs.nonce(bn), p, c);
        let s = start(i);
        let a = s.max(body_start);
        let b = (s + clen(i) as u64).min(body_end);
        if a < b {
            body[(a - body_start) as usize..(b - body_start) as usize]
                .copy_from_slice(&c[(a - s) as usize..(b - s) as usize]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use crate::crypto::{Flags, MasterKey, NameMode};
    use std::io::Write;

    /// Any (offset, size) read equals the same slice of one whole-file read: partial first
    /// and last blocks, the header, reads past the end, single bytes at block edges.
    #[test]
    fn reads_at_any_offset_are_slices_of_the_whole() {
        let keys = Keys::new(
            &MasterKey::random(),
            Flags {
                names: NameMode::DirIv,
                hkdf: true,
                long_names: true,
                long_name_max: 255,
            },
        );
        let ivs = FileIvs::for_cpath(b"dir/file");
        for plain in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 100, 40 * 4096] {
            let mut f = tempfile::tempfile().unwrap();
            let data: Vec<u8> = (0..plain).map(|i| (i * 7 + i / 4096) as u8).collect();
            f.write_all(&data).unwrap();
            let csize = content::cipher_size(plain as u64);
            let whole = read_encrypted(&keys, &f, &ivs, plain as u64, 0, csize + 10).unwrap();
            assert_eq!(whole.len() as u64, csize);
            // The whole file is the header and each block encrypted on its own.
            let mut want = if plain > 0 {
                ivs.header().to_vec()
            } else {
                Vec::new()
            };
            for (b, p) in data.chunks(BLOCK as usize).enumerate() {
                let mut c = vec![0u8; p.len() + 32];
                let bn = b as u64;
                content::encrypt_block(&keys, bn, Some(&ivs.file_id), &ivs.nonce(bn), p, &mut c);
                want.extend_from_slice(&c);
            }
            assert_eq!(whole, want, "plain {plain}");
            let edges = [
                0u64, 1, 17, 18, 19, 50, 4113, 4114, 4145, 4146, 4147, 8000, 8274,
            ];
            for off in edges
                .iter()
                .copied()
                .chain([csize.saturating_sub(1), csize])
            {
                for size in [1u64, 31, 32, 33, 4128, 5000, 131072] {
                    let got = read_encrypted(&keys, &f, &ivs, plain as u64, off, size).unwrap();
                    let a = off.min(csize) as usize;
                    let b = (off + size).min(csize) as usize;
                    assert_eq!(got, whole[a..b], "plain {plain}, offset {off}, size {size}");
                }
            }
        }
    }
}
