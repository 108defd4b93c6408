//! The encrypted reverse view, without FUSE: maps a frozen plaintext tree to the tree
//! `gocryptfs -reverse` would show (encrypted names, diriv and longname companions,
//! `gocryptfs.conf` at the root, encrypted contents and symlink targets).
//!
//! Owns: node numbering, directory listings, attributes, reads. Does not own: the kernel
//! protocol (`fuse.rs`) or mounting (`mount.rs`).
//!
//! Each directory is listed and its names encrypted once per life of its node (a
//! snapshot does not change; a live `dir:` source is read as it was when first listed).
//! Memory follows what the kernel holds, not the tree (issue 13): a node is the place of
//! an entry (parent, index in the parent's listing) and its lookup count, a listing keeps
//! two names per entry, and both go when the kernel forgets the node. Node numbers are
//! never reused; an entry looked up again after that gets a new one.
//!
//! Hard links: gocryptfs 2.3 gives every path of a hard-linked inode the file ID of the
//! path opened first, so the ciphertext depends on access order. Here every path derives
//! its own values from its own encrypted path (spec §5 "a compatible implementation may
//! pick any deterministic rule") and is shown as its own file (own node number, link
//! count 1), so the result never depends on order or remounts and `rsync -H` can never
//! link two different ciphertexts together.

mod answer;
pub mod forward;
pub mod fuse;
pub mod mount;
pub mod ring;
mod walk;
pub mod warm;

pub use mount::{cleanup_stale_mount, Access, MountedView, ViewOptions};

use crate::crypto::content::{self, FileIvs, BLOCK, CBLOCK, HEADER_LEN, LANES};
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
    fn of(st: &Stat) -> Kind {
        match st.mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => Kind::File,
        }
    }
}

/// What the view shows of a source entry's `lstat`, from `std`'s metadata or from an
/// `fstatat` relative to its directory (a listing looks at each entry of one directory:
/// through the directory's descriptor the kernel resolves one name, not the whole path).
pub(crate) struct Stat {
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    size: u64,
    nlink: u64,
    atime: (i64, i64),
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stat {
    pub(crate) fn of(m: &Metadata) -> Stat {
        Stat {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            rdev: m.rdev(),
            size: m.size(),
            nlink: m.nlink(),
            atime: (m.atime(), m.atime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }

    /// `lstat` of `name` in the directory open as `dir`.
    fn at(dir: &File, name: &[u8]) -> std::io::Result<Stat> {
        use std::os::fd::AsRawFd;
        let name = std::ffi::CString::new(name)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `name` is NUL-terminated, `st` is written by a successful call.
        let rc = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fstatat returned 0.
        let st = unsafe { st.assume_init() };
        Ok(Stat {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            // u32 on some architectures (aarch64), u64 on x86-64.
            #[allow(clippy::useless_conversion)]
            nlink: u64::from(st.st_nlink),
            atime: (st.st_atime, st.st_atime_nsec),
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        })
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

/// What an entry of a directory is.
#[derive(Clone, Debug)]
enum Virt {
    /// An entry of the plaintext tree.
    Real,
    /// `gocryptfs.diriv` of the directory.
    DirIv,
    /// `gocryptfs.longname.H.name`: holds the full encrypted name of the entry whose
    /// plaintext name is this entry's `plain`.
    LongName(Arc<[u8]>),
    /// `gocryptfs.conf`, the key config itself.
    Conf,
}

/// One entry of a directory of the reverse view, 16 bytes: its two names live in the
/// listing's one buffer (no paths: a path is put together from the parents when
/// needed), so a mount's memory grows by these and the names' bytes per entry listed,
/// not by two allocations more (issue 13).
#[derive(Clone, Copy)]
struct DirEntry {
    /// Where the name as shown in the view (encrypted; long names in their hashed form)
    /// starts in [`DirListing::names`]; the plaintext name in the source follows it (for
    /// a long-name file: of the entry it names; empty for the directory IV and the
    /// config).
    at: u64,
    shown_len: u16,
    plain_len: u16,
    kind: Kind,
    virt: VirtTag,
}

/// [`Virt`] without the long-name file's content, which the listing keeps aside.
#[derive(Clone, Copy, PartialEq, Eq)]
enum VirtTag {
    Real,
    DirIv,
    LongName,
    Conf,
}

/// One directory's listing, built once per life of its node, sorted by shown name.
struct DirListing {
    names: Box<[u8]>,
    entries: Box<[DirEntry]>,
    /// The node of each entry while the kernel knows it (0: none), kept here rather
    /// than in a table by (directory, entry): 8 bytes an entry against a hash map's 30
    /// to 60 a node (issue 13). Changed only under the node table's write lock.
    inos: Box<[std::sync::atomic::AtomicU64]>,
    /// The content of each long-name file, by entry (ascending).
    longs: Box<[(u32, Arc<[u8]>)]>,
    excluded: HashSet<Box<[u8]>>,
}

/// An entry of a directory while its listing is built.
struct NewEntry {
    shown: Vec<u8>,
    plain: Vec<u8>,
    kind: Kind,
    virt: Virt,
}

impl DirListing {
    /// The listing of `entries`, sorted by shown name.
    fn new(mut entries: Vec<NewEntry>, excluded: HashSet<Box<[u8]>>) -> Self {
        entries.sort_by(|a, b| a.shown.cmp(&b.shown));
        let mut names =
            Vec::with_capacity(entries.iter().map(|e| e.shown.len() + e.plain.len()).sum());
        let mut packed = Vec::with_capacity(entries.len());
        let mut longs = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            let at = names.len() as u64;
            names.extend_from_slice(&e.shown);
            names.extend_from_slice(&e.plain);
            let virt = match e.virt {
                Virt::Real => VirtTag::Real,
                Virt::DirIv => VirtTag::DirIv,
                Virt::Conf => VirtTag::Conf,
                Virt::LongName(c) => {
                    longs.push((i as u32, c));
                    VirtTag::LongName
                }
            };
            packed.push(DirEntry {
                at,
                // A name is at most 255 bytes, its encrypted form under 400.
                shown_len: u16::try_from(e.shown.len()).expect("a name under 64 KiB"),
                plain_len: u16::try_from(e.plain.len()).expect("a name under 64 KiB"),
                kind: e.kind,
                virt,
            });
        }
        DirListing {
            names: names.into_boxed_slice(),
            inos: packed.iter().map(|_| Default::default()).collect(),
            entries: packed.into_boxed_slice(),
            longs: longs.into_boxed_slice(),
            excluded,
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    /// The node of entry `i`, if the kernel knows it.
    fn ino(&self, i: usize) -> Option<u64> {
        match self.inos[i].load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ino => Some(ino),
        }
    }

    fn set_ino(&self, i: usize, ino: u64) {
        self.inos[i].store(ino, std::sync::atomic::Ordering::Relaxed);
    }

    fn shown(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        &self.names[e.at as usize..e.at as usize + e.shown_len as usize]
    }

    fn plain(&self, i: usize) -> &[u8] {
        let e = &self.entries[i];
        let start = e.at as usize + e.shown_len as usize;
        &self.names[start..start + e.plain_len as usize]
    }

    fn kind(&self, i: usize) -> Kind {
        self.entries[i].kind
    }

    /// Whether entry `i` is an entry of the plaintext tree (not a virtual file).
    fn is_real(&self, i: usize) -> bool {
        self.entries[i].virt == VirtTag::Real
    }

    fn virt(&self, i: usize) -> Virt {
        match self.entries[i].virt {
            VirtTag::Real => Virt::Real,
            VirtTag::DirIv => Virt::DirIv,
            VirtTag::Conf => Virt::Conf,
            VirtTag::LongName => {
                let k = self
                    .longs
                    .binary_search_by_key(&(i as u32), |(j, _)| *j)
                    .expect("a long-name file has its content");
                Virt::LongName(self.longs[k].1.clone())
            }
        }
    }

    fn find(&self, shown: &[u8]) -> Option<u32> {
        self.entries
            .binary_search_by(|e| {
                let at = e.at as usize;
                self.names[at..at + e.shown_len as usize].cmp(shown)
            })
            .ok()
            .map(|i| i as u32)
    }
}

/// One directory's listing as the forward view builds it.
pub struct Listing {
    pub entries: Vec<(u64, OsString, Kind)>,
    by_name: HashMap<OsString, u64>,
}

impl Listing {
    pub fn new(entries: Vec<(u64, OsString, Kind)>) -> Self {
        let by_name = entries.iter().map(|(i, n, _)| (n.clone(), *i)).collect();
        Listing { entries, by_name }
    }

    pub fn get(&self, name: &OsStr) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    /// Answers a READDIR(PLUS) from this listing (see [`Tree::readdir`]); attributes
    /// come from `tree`. Entries are not counted as lookups: the forward view never
    /// releases nodes.
    pub fn readdir<T: Tree + ?Sized>(
        &self,
        tree: &T,
        ino: u64,
        offset: i64,
        plus: bool,
        add: &mut AddEntry<'_>,
    ) -> Result<(), ViewError> {
        let dir = if plus { Some(tree.getattr(ino)?) } else { None };
        let Some(off) = add_dots(ino, offset, dir.as_ref(), add) else {
            return Ok(());
        };
        for (i, (eino, name, kind)) in self.entries.iter().enumerate().skip((off - 2) as usize) {
            let attr = if plus {
                match tree.getattr(*eino) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(ino = *eino, "readdirplus: {e}");
                        continue;
                    }
                }
            } else {
                None
            };
            if add(*eino, i as i64 + 3, name, *kind, attr.as_ref()) {
                break;
            }
        }
        Ok(())
    }
}

/// Adds one directory entry to a READDIR(PLUS) reply: (node, offset of the next entry,
/// name, kind, attributes for READDIRPLUS). Returns true when the reply is full and the
/// entry was NOT added.
pub type AddEntry<'a> = dyn FnMut(u64, i64, &OsStr, Kind, Option<&Attr>) -> bool + 'a;

/// `.` and `..` of a READDIR(PLUS) reply, at offsets 1 and 2 (both views number a
/// directory's entries from 3). Returns the offset the entries continue from (at least
/// 2), or `None` when the reply filled up.
fn add_dots(ino: u64, offset: i64, dir: Option<&Attr>, add: &mut AddEntry<'_>) -> Option<i64> {
    if offset < 1 && add(ino, 1, OsStr::new("."), Kind::Dir, dir) {
        return None;
    }
    if offset < 2 && add(ino, 2, OsStr::new(".."), Kind::Dir, dir) {
        return None;
    }
    Some(offset.max(2))
}

/// What the FUSE adapter needs from a tree: the reverse (encrypting) view over a
/// snapshot, or the forward (decrypting) view over a backup copy.
pub trait Tree: Send + Sync + 'static {
    type Handle: Send + Sync + 'static;
    /// The entry `name` of `parent`; counts as one lookup of the node returned.
    fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, ViewError>;
    fn getattr(&self, ino: u64) -> Result<Attr, ViewError>;
    /// Whether directory `ino` can be listed.
    fn opendir(&self, ino: u64) -> Result<(), ViewError>;
    /// Lists directory `ino` from `offset` (1 = ".", 2 = "..", 3.. = its entries) until
    /// `add` says the reply is full. With `plus` every entry carries its attributes and
    /// counts as a lookup of its node (the kernel will forget it like one).
    fn readdir(
        &self,
        ino: u64,
        offset: i64,
        plus: bool,
        add: &mut AddEntry<'_>,
    ) -> Result<(), ViewError>;
    fn readlink(&self, ino: u64) -> Result<Vec<u8>, ViewError>;
    fn open(&self, ino: u64) -> Result<Self::Handle, ViewError>;
    fn read(&self, h: &Self::Handle, offset: u64, size: u32) -> Result<Vec<u8>, ViewError>;
    /// The kernel dropped `n` lookups of `ino`: state kept only for it may go.
    fn forget(&self, _ino: u64, _n: u64) {}
    /// Up to `n` regular files that follow `ino` in its directory's listing, the order
    /// in which `tar` and rsync's sender read them: what to read ahead of them.
    fn next_files(&self, _ino: u64, _n: usize) -> Vec<u64> {
        Vec::new()
    }
    /// The whole content of regular file `ino` if it is at most `max` bytes, read on
    /// the calling thread alone (no pool): a read ahead of the reader. `None`: larger,
    /// or nothing to read ahead.
    fn read_small(&self, _ino: u64, _max: u64) -> Result<Option<Vec<u8>>, ViewError> {
        Ok(None)
    }
}

impl Tree for ViewCore {
    type Handle = Handle;
    fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, ViewError> {
        ViewCore::lookup(self, parent, name)
    }
    fn getattr(&self, ino: u64) -> Result<Attr, ViewError> {
        ViewCore::getattr(self, ino)
    }
    fn opendir(&self, ino: u64) -> Result<(), ViewError> {
        let dir = self.resolve(ino)?;
        self.listing_of(ino, &dir).map(|_| ())
    }
    fn readdir(
        &self,
        ino: u64,
        offset: i64,
        plus: bool,
        add: &mut AddEntry<'_>,
    ) -> Result<(), ViewError> {
        ViewCore::readdir(self, ino, offset, plus, add)
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
    fn forget(&self, ino: u64, n: u64) {
        ViewCore::forget(self, ino, n)
    }
    fn next_files(&self, ino: u64, n: usize) -> Vec<u64> {
        ViewCore::next_files(self, ino, n)
    }
    fn read_small(&self, ino: u64, max: u64) -> Result<Option<Vec<u8>>, ViewError> {
        ViewCore::read_small(self, ino, max)
    }
}

/// A node the kernel knows (or the root): where it sits, and how often the kernel
/// looked it up. It goes when the kernel forgot every lookup and no child is left.
struct NodeRec {
    parent: u64,
    /// Index of the entry in the parent's listing.
    idx: u32,
    nlookup: u64,
    children: u32,
    /// For a directory, once listed.
    listing: Option<Arc<DirListing>>,
}

impl NodeRec {
    fn free() -> Self {
        NodeRec {
            parent: FREE,
            idx: 0,
            nlookup: 0,
            children: 0,
            listing: None,
        }
    }
}

/// Node numbers a [`NodeTable`] page holds.
const NODE_PAGE: usize = 256;

/// A [`NodeTable`] slot no node is in (no node's parent is `u64::MAX`: numbers are
/// handed out from 1 up).
const FREE: u64 = u64::MAX;

/// The nodes the kernel knows, by number: pages of [`NODE_PAGE`] consecutive numbers,
/// each allocated with its first node and freed with its last. Numbers are handed out
/// in order and never reused, so the nodes a listing or a lookup creates share pages,
/// and the slots a mount ever used cost 10 bytes a page once they are free. Issue 13: a
/// hash map from number to node cost 41 bytes a slot at a load of 44 to 87%, and twice
/// that while it grew (84 MB for 1,000,000 nodes, 168 MB during the last growth); this
/// costs 32 bytes a node in pages that hold a live one.
struct NodeTable {
    pages: Vec<Option<Box<[NodeRec]>>>,
    /// Live nodes in each page of `pages`.
    live: Vec<u16>,
}

impl NodeTable {
    fn new() -> Self {
        NodeTable {
            pages: Vec::new(),
            live: Vec::new(),
        }
    }

    fn at(ino: u64) -> (usize, usize) {
        (
            (ino / NODE_PAGE as u64) as usize,
            (ino % NODE_PAGE as u64) as usize,
        )
    }

    fn get(&self, ino: &u64) -> Option<&NodeRec> {
        let (p, i) = Self::at(*ino);
        let n = &self.pages.get(p)?.as_ref()?[i];
        (n.parent != FREE).then_some(n)
    }

    fn get_mut(&mut self, ino: &u64) -> Option<&mut NodeRec> {
        let (p, i) = Self::at(*ino);
        let n = &mut self.pages.get_mut(p)?.as_mut()?[i];
        (n.parent != FREE).then_some(n)
    }

    fn insert(&mut self, ino: u64, node: NodeRec) {
        assert_ne!(node.parent, FREE, "a node has a parent");
        let (p, i) = Self::at(ino);
        if self.pages.len() <= p {
            self.pages.resize_with(p + 1, || None);
            self.live.resize(p + 1, 0);
        }
        let page =
            self.pages[p].get_or_insert_with(|| (0..NODE_PAGE).map(|_| NodeRec::free()).collect());
        if page[i].parent == FREE {
            self.live[p] += 1;
        }
        page[i] = node;
    }

    fn remove(&mut self, ino: &u64) -> Option<NodeRec> {
        let (p, i) = Self::at(*ino);
        let page = self.pages.get_mut(p)?.as_mut()?;
        if page[i].parent == FREE {
            return None;
        }
        let n = std::mem::replace(&mut page[i], NodeRec::free());
        self.live[p] -= 1;
        if self.live[p] == 0 {
            self.pages[p] = None;
        }
        Some(n)
    }

    /// Nodes kept (tests and debug figures: it counts the pages' counts).
    fn len(&self) -> usize {
        self.live.iter().map(|n| usize::from(*n)).sum()
    }
}

struct Table {
    nodes: NodeTable,
    /// Node numbers are never reused: a number the kernel forgot never names another entry.
    next: u64,
}

impl Table {
    /// Removes `ino` if nothing refers to it any more, then its parent likewise.
    fn collect(&mut self, mut ino: u64) {
        while ino != ROOT_INO {
            match self.nodes.get(&ino) {
                Some(n) if n.nlookup == 0 && n.children == 0 => {}
                _ => return,
            }
            let Some(n) = self.nodes.remove(&ino) else {
                return;
            };
            match self.nodes.get_mut(&n.parent) {
                Some(p) => {
                    p.children = p.children.saturating_sub(1);
                    if let Some(l) = &p.listing {
                        l.set_ino(n.idx as usize, 0);
                    }
                }
                None => return,
            }
            ino = n.parent;
        }
    }
}

/// Readdir without attributes shows node numbers the kernel does not keep; entries not
/// looked up yet get a number from this range, which never names a node.
const UNLOOKED_INO: u64 = 1 << 63;

/// A node's place, put together from its parents on demand; also what the walk gives
/// with each entry, so that a file can be opened without a node
/// ([`ViewCore::open_walked_file`]).
#[derive(Clone)]
pub struct Resolved {
    /// Path relative to the source root (for virtual files: of the directory holding
    /// them; for long-name files: of the entry they name).
    plain: PathBuf,
    /// Encrypted relative path (long names in their hashed form), the input of every IV.
    cpath: Vec<u8>,
    virt: Virt,
}

impl Resolved {
    fn root() -> Self {
        Resolved {
            plain: PathBuf::new(),
            cpath: Vec::new(),
            virt: Virt::Real,
        }
    }

    /// Entry `i` of `l`, this directory's listing.
    fn child(&self, l: &DirListing, i: usize) -> Self {
        let plain = l.plain(i);
        Resolved {
            plain: if plain.is_empty() {
                self.plain.clone()
            } else {
                self.plain.join(OsStr::from_bytes(plain))
            },
            cpath: join_cpath(&self.cpath, l.shown(i)),
            virt: l.virt(i),
        }
    }

    /// Name as shown in the view (last component of `cpath`).
    fn shown(&self) -> &[u8] {
        match self.cpath.iter().rposition(|b| *b == b'/') {
            Some(i) => &self.cpath[i + 1..],
            None => &self.cpath,
        }
    }
}

/// The key config shown as `gocryptfs.conf` at the root.
#[derive(Clone)]
pub struct ExportedConf {
    pub bytes: Arc<[u8]>,
    /// The file whose attributes the virtual file reports.
    pub stat_path: PathBuf,
}

/// What [`ViewCore::walk`] calls for each entry: (view path, attributes, link target,
/// its place in the source, to open it by).
pub type WalkVisit<'v, E> =
    dyn FnMut(&[u8], &Attr, Option<Vec<u8>>, &Resolved) -> Result<(), E> + 'v;

pub struct ViewCore {
    root: PathBuf,
    keys: Keys,
    conf: Option<ExportedConf>,
    excludes: Gitignore,
    table: RwLock<Table>,
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
        let mut nodes = NodeTable::new();
        nodes.insert(
            ROOT_INO,
            NodeRec {
                parent: 0,
                idx: 0,
                nlookup: 1,
                children: 0,
                listing: None,
            },
        );
        Ok(ViewCore {
            root: root.into(),
            keys,
            conf,
            excludes,
            table: RwLock::new(Table {
                nodes,
                next: ROOT_INO + 1,
            }),
        })
    }

    pub fn name_mode(&self) -> NameMode {
        self.keys.flags.names
    }

    /// Nodes the view currently keeps (the root included): what `forget` gives back.
    pub fn nodes(&self) -> usize {
        self.table.read().expect("table lock").nodes.len()
    }

    fn resolve(&self, ino: u64) -> Result<Resolved, ViewError> {
        let mut chain: Vec<(Arc<DirListing>, u32)> = Vec::new();
        {
            let t = self.table.read().expect("table lock");
            let mut cur = ino;
            while cur != ROOT_INO {
                let n = t.nodes.get(&cur).ok_or(ViewError::NotFound)?;
                let l = t
                    .nodes
                    .get(&n.parent)
                    .and_then(|p| p.listing.clone())
                    .ok_or(ViewError::NotFound)?;
                chain.push((l, n.idx));
                cur = n.parent;
            }
        }
        let mut r = Resolved::root();
        for (l, idx) in chain.iter().rev() {
            r = r.child(l, *idx as usize);
        }
        Ok(r)
    }

    /// The node of entry `idx` of directory `parent`, created if new, with `n` more
    /// lookups counted.
    fn intern(&self, parent: u64, idx: u32, n: u64) -> Result<u64, ViewError> {
        let mut t = self.table.write().expect("table lock");
        let p = t.nodes.get_mut(&parent).ok_or(ViewError::NotFound)?;
        let l = p.listing.clone().ok_or(ViewError::NotFound)?;
        if let Some(ino) = l.ino(idx as usize) {
            if let Some(node) = t.nodes.get_mut(&ino) {
                node.nlookup += n;
            }
            return Ok(ino);
        }
        p.children += 1;
        let ino = t.next;
        t.next += 1;
        t.nodes.insert(
            ino,
            NodeRec {
                parent,
                idx,
                nlookup: n,
                children: 0,
                listing: None,
            },
        );
        l.set_ino(idx as usize, ino);
        Ok(ino)
    }

    /// The kernel dropped `n` lookups of `ino` (FUSE FORGET): once none is left and no
    /// child of it is known, the node and its listing go, and so may its parent.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.table.write().expect("table lock");
        if let Some(node) = t.nodes.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_sub(n);
            t.collect(ino);
        }
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

    /// The listing of directory `ino` (at `dir`), built on first use.
    fn listing_of(&self, ino: u64, dir: &Resolved) -> Result<Arc<DirListing>, ViewError> {
        if let Some(l) = self
            .table
            .read()
            .expect("table lock")
            .nodes
            .get(&ino)
            .and_then(|n| n.listing.clone())
        {
            return Ok(l);
        }
        if !matches!(dir.virt, Virt::Real) {
            return Err(ViewError::NotDir {
                path: dir.plain.clone(),
            });
        }
        let l = Arc::new(self.build_listing(ino == ROOT_INO, dir)?);
        let mut t = self.table.write().expect("table lock");
        match t.nodes.get_mut(&ino) {
            Some(n) => Ok(Arc::clone(n.listing.get_or_insert(l))),
            None => Err(ViewError::NotFound),
        }
    }

    fn build_listing(&self, is_root: bool, dir: &Resolved) -> Result<DirListing, ViewError> {
        let abs = self.abs(&dir.plain);
        let rd = fs::read_dir(&abs).map_err(|source| ViewError::Io {
            path: abs.clone(),
            source,
        })?;
        let mode = self.keys.flags.names;
        let iv = names::dir_iv(mode, &dir.cpath);
        let mut entries = Vec::new();
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
            let (shown, long) = match mode {
                NameMode::Plaintext => (pname.as_bytes().to_vec(), None),
                _ => {
                    let e = names::encrypt_component(&self.keys, &iv, pname.as_bytes());
                    (e.shown.into_bytes(), e.long)
                }
            };
            if !self.excludes.is_empty()
                && self
                    .excludes
                    .matched_path_or_any_parents(dir.plain.join(&pname), ft.is_dir())
                    .is_ignore()
            {
                excluded.insert(shown.into_boxed_slice());
                if let Some(l) = long {
                    excluded.insert(
                        format!("{}{LONGNAME_SUFFIX}", names::long_hash(&l))
                            .into_bytes()
                            .into_boxed_slice(),
                    );
                }
                continue;
            }
            if is_root && self.conf.is_some() && shown == CONF_NAME.as_bytes() {
                // Only possible with plaintext names. gocryptfs shows an inaccessible
                // renamed entry; a backup must not silently lose the file, so say it loudly.
                tracing::error!(path = %dir.plain.join(&pname).display(), "a source file named gocryptfs.conf collides with the view's key config and is NOT in the view");
                continue;
            }
            let plain = pname.into_vec();
            if let Some(l) = long {
                let nname = format!("{}{LONGNAME_SUFFIX}", names::long_hash(&l));
                longs.push(NewEntry {
                    shown: nname.into_bytes(),
                    plain: plain.clone(),
                    kind: Kind::File,
                    virt: Virt::LongName(Arc::from(l.into_bytes())),
                });
            }
            entries.push(NewEntry {
                shown,
                plain,
                kind: kind_of_ft(&ft),
                virt: Virt::Real,
            });
        }
        if mode == NameMode::DirIv {
            entries.push(NewEntry {
                shown: DIRIV_NAME.as_bytes().into(),
                plain: Vec::new(),
                kind: Kind::File,
                virt: Virt::DirIv,
            });
        }
        if is_root && self.conf.is_some() {
            entries.push(NewEntry {
                shown: CONF_NAME.as_bytes().into(),
                plain: Vec::new(),
                kind: Kind::File,
                virt: Virt::Conf,
            });
        }
        entries.extend(longs);
        Ok(DirListing::new(entries, excluded))
    }

    /// Entry `name` of `parent`, as one lookup of its node.
    ///
    /// # Errors
    /// `NotFound`, `Excluded` (EPERM, as gocryptfs), or I/O errors of the source.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, ViewError> {
        let dir = self.resolve(parent)?;
        let l = self.listing_of(parent, &dir)?;
        let Some(idx) = l.find(name.as_bytes()) else {
            return Err(if l.excluded.contains(name.as_bytes()) {
                ViewError::Excluded
            } else {
                ViewError::NotFound
            });
        };
        let mut a = self.attr_of(0, &dir.child(&l, idx as usize))?;
        a.ino = self.intern(parent, idx, 1)?;
        Ok(a)
    }

    /// See [`Tree::readdir`].
    ///
    /// # Errors
    /// Unknown node, not a directory, or the plaintext directory cannot be read.
    pub fn readdir(
        &self,
        ino: u64,
        offset: i64,
        plus: bool,
        add: &mut AddEntry<'_>,
    ) -> Result<(), ViewError> {
        let dir = self.resolve(ino)?;
        let l = self.listing_of(ino, &dir)?;
        let dattr = if plus {
            Some(self.attr_of(ino, &dir)?)
        } else {
            None
        };
        let Some(off) = add_dots(ino, offset, dattr.as_ref(), add) else {
            return Ok(());
        };
        let dfd = if plus { self.open_dir(&dir) } else { None };
        for i in (off - 2) as usize..l.len() {
            let name = OsStr::from_bytes(l.shown(i));
            let next = i as i64 + 3;
            if !plus {
                let shown_ino = l.ino(i).unwrap_or(UNLOOKED_INO | (ino << 24) | i as u64);
                if add(shown_ino, next, name, l.kind(i), None) {
                    break;
                }
                continue;
            }
            let mut a = match self.attr_in(0, &dir.child(&l, i), dfd.as_ref()) {
                Ok(a) => a,
                Err(err) => {
                    // Vanished under a live (dir:) source: leave it out of this listing.
                    tracing::debug!(ino, "readdirplus: {err}");
                    continue;
                }
            };
            a.ino = self.intern(ino, i as u32, 1)?;
            if add(a.ino, next, name, a.kind, Some(&a)) {
                // Not sent: the kernel will not count it.
                self.forget(a.ino, 1);
                break;
            }
        }
        Ok(())
    }

    /// # Errors
    /// Unknown node or I/O errors of the source.
    pub fn getattr(&self, ino: u64) -> Result<Attr, ViewError> {
        let r = self.resolve(ino)?;
        self.attr_of(ino, &r)
    }

    fn attr_of(&self, ino: u64, node: &Resolved) -> Result<Attr, ViewError> {
        self.attr_in(ino, node, None)
    }

    /// The directory `dir` (a listing's), open to look at its entries by name
    /// ([`Stat::at`]); `None` if it cannot be, and they are looked at by path.
    fn open_dir(&self, dir: &Resolved) -> Option<File> {
        use std::os::unix::fs::OpenOptionsExt;
        if !matches!(dir.virt, Virt::Real) {
            return None;
        }
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(self.abs(&dir.plain))
            .ok()
    }

    /// The `lstat` of what `node` shows: through `dir`, its directory open, if given.
    fn stat_of(&self, node: &Resolved, dir: Option<&File>) -> Result<Stat, ViewError> {
        let io = |source| ViewError::Io {
            path: self.abs(&node.plain),
            source,
        };
        match (dir, &node.virt, node.plain.file_name()) {
            // The directory IV shows the directory's own times.
            (Some(d), Virt::DirIv, _) => d.metadata().map(|m| Stat::of(&m)).map_err(io),
            (Some(d), Virt::Real | Virt::LongName(_), Some(name)) => {
                Stat::at(d, name.as_bytes()).map_err(io)
            }
            _ => self.lstat(&node.plain).map(|m| Stat::of(&m)),
        }
    }

    /// [`ViewCore::attr_of`] of an entry of the directory open as `dir`, if given.
    fn attr_in(&self, ino: u64, node: &Resolved, dir: Option<&File>) -> Result<Attr, ViewError> {
        match &node.virt {
            Virt::Real => {
                let m = self.stat_of(node, dir)?;
                let kind = Kind::of(&m);
                let (size, nlink) = match kind {
                    Kind::File => (content::cipher_size(m.size), 1),
                    Kind::Symlink => (self.readlink_node(node)?.len() as u64, 1),
                    _ => (m.size, m.nlink as u32),
                };
                Ok(attr_from(
                    ino,
                    kind,
                    size,
                    nlink,
                    (m.mode & 0o7777) as u16,
                    &m,
                ))
            }
            Virt::DirIv => {
                let m = self.stat_of(node, dir)?;
                Ok(attr_from(ino, Kind::File, 16, 1, 0o444, &m))
            }
            Virt::LongName(content) => {
                let m = self.stat_of(node, dir)?;
                Ok(attr_from(
                    ino,
                    Kind::File,
                    content.len() as u64,
                    1,
                    0o444,
                    &m,
                ))
            }
            Virt::Conf => {
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
                    &Stat::of(&m),
                ))
            }
        }
    }

    fn readlink_node(&self, node: &Resolved) -> Result<Vec<u8>, ViewError> {
        let p = self.abs(&node.plain);
        let target = fs::read_link(&p).map_err(|source| ViewError::Io { path: p, source })?;
        let target = target.into_os_string().into_vec();
        Ok(match self.keys.flags.names {
            NameMode::Plaintext => target,
            _ => {
                names::encrypt_symlink(&self.keys, &node.cpath, node.shown(), &target).into_bytes()
            }
        })
    }

    /// # Errors
    /// Unknown node, not a symlink, or I/O errors of the source.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, ViewError> {
        let node = self.resolve(ino)?;
        if !matches!(node.virt, Virt::Real) {
            return Err(ViewError::NotFound);
        }
        self.readlink_node(&node)
    }

    /// # Errors
    /// Unknown node, a special file (EACCES, as gocryptfs), or I/O errors.
    pub fn open(&self, ino: u64) -> Result<Handle, ViewError> {
        self.open_resolved(&self.resolve(ino)?)
    }

    /// [`ViewCore::open`] of an entry by its place, which an entry the walk gave
    /// ([`ViewCore::walk`]) has without a node.
    fn open_resolved(&self, node: &Resolved) -> Result<Handle, ViewError> {
        match &node.virt {
            Virt::Real => {
                let p = self.abs(&node.plain);
                // lstat first: opening a FIFO or a device to find out would block or
                // touch the device.
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
            Virt::DirIv => Ok(Handle::Virtual(Arc::from(
                &names::dir_iv(NameMode::DirIv, parent_cpath(&node.cpath))[..],
            ))),
            Virt::LongName(content) => Ok(Handle::Virtual(Arc::clone(content))),
            Virt::Conf => Ok(Handle::Virtual(Arc::clone(
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
        self.read_with(h, offset, u64::from(size), Blocks::Parallel)
            .map_err(|source| ViewError::Io {
                path: PathBuf::from("(open file)"),
                source,
            })
    }

    /// [`ViewCore::read`] and [`ViewCore::read_here`]: `blocks` says where.
    fn read_with(
        &self,
        h: &Handle,
        offset: u64,
        size: u64,
        blocks: Blocks,
    ) -> std::io::Result<Vec<u8>> {
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
            } => encrypt_range(&self.keys, file, ivs, *plain_size, offset, size, blocks),
        }
    }
}

impl ViewCore {
    /// See [`Tree::next_files`]. Only entries the kernel knows (listed with their
    /// attributes, or looked up) have a node to name; at most `4 n` entries are looked at.
    pub fn next_files(&self, ino: u64, n: usize) -> Vec<u64> {
        let t = self.table.read().expect("table lock");
        let Some(node) = t.nodes.get(&ino) else {
            return Vec::new();
        };
        let Some(l) = t.nodes.get(&node.parent).and_then(|p| p.listing.as_ref()) else {
            return Vec::new();
        };
        (node.idx as usize + 1..l.len())
            .take(4 * n)
            .filter(|&i| l.kind(i) == Kind::File && l.is_real(i))
            .filter_map(|i| l.ino(i))
            .take(n)
            .collect()
    }

    /// [`ViewCore::open_resolved`] of an entry the walk found to be a regular file in a
    /// frozen source, which cannot have changed since: opened without the `lstat`
    /// before (`O_NONBLOCK`, so that a FIFO in its place could not block), and checked
    /// to be a regular file after.
    ///
    /// # Errors
    /// As [`ViewCore::open`].
    pub fn open_walked_file(&self, node: &Resolved) -> Result<Handle, ViewError> {
        use std::os::unix::fs::OpenOptionsExt;
        if !matches!(node.virt, Virt::Real) {
            return self.open_resolved(node);
        }
        let p = self.abs(&node.plain);
        let io = |source| ViewError::Io {
            path: p.clone(),
            source,
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME | libc::O_NONBLOCK)
            .open(&p)
            .or_else(|_| {
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&p)
            })
            .map_err(io)?;
        let m = file.metadata().map_err(io)?;
        if !m.is_file() {
            return Err(ViewError::NotRegular { path: p });
        }
        Ok(Handle::Real {
            file,
            ivs: FileIvs::for_cpath(&node.cpath),
            plain_size: m.size(),
        })
    }

    /// Where the source holds the entry at `place` (for a virtual file: its directory).
    pub fn source_path(&self, place: &Resolved) -> PathBuf {
        self.abs(&place.plain)
    }

    /// [`ViewCore::read`], its blocks encrypted on the calling thread: for a caller that
    /// reads several files at once on threads of its own ([`crate::target::seed`]).
    ///
    /// # Errors
    /// I/O errors of the source file.
    pub fn read_here(&self, h: &Handle, offset: u64, size: u64) -> std::io::Result<Vec<u8>> {
        self.read_with(h, offset, size, Blocks::OneThread)
    }

    /// See [`Tree::read_small`].
    ///
    /// # Errors
    /// Those of [`ViewCore::open`] and of reading the source file.
    pub fn read_small(&self, ino: u64, max: u64) -> Result<Option<Vec<u8>>, ViewError> {
        let Handle::Real {
            file,
            ivs,
            plain_size,
        } = self.open(ino)?
        else {
            return Ok(None);
        };
        let csize = content::cipher_size(plain_size);
        if csize > max {
            return Ok(None);
        }
        encrypt_range(
            &self.keys,
            &file,
            &ivs,
            plain_size,
            0,
            csize,
            Blocks::OneThread,
        )
        .map(Some)
        .map_err(|source| ViewError::Io {
            path: PathBuf::from("(read ahead)"),
            source,
        })
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

pub(crate) fn attr_from(ino: u64, kind: Kind, size: u64, nlink: u32, perm: u16, m: &Stat) -> Attr {
    Attr {
        ino,
        kind,
        size,
        perm,
        nlink,
        uid: m.uid,
        gid: m.gid,
        rdev: m.rdev as u32,
        atime: time(m.atime.0, m.atime.1),
        mtime: time(m.mtime.0, m.mtime.1),
        ctime: time(m.ctime.0, m.ctime.1),
    }
}

/// Encrypted bytes `[offset, offset+size)` of a file whose plaintext is `file`, its
/// blocks encrypted in parallel on the current rayon pool.
pub fn read_encrypted(
    keys: &Keys,
    file: &File,
    ivs: &FileIvs,
    plain_size: u64,
    offset: u64,
    size: u64,
) -> std::io::Result<Vec<u8>> {
    encrypt_range(keys, file, ivs, plain_size, offset, size, Blocks::Parallel)
}

/// Where a read's blocks are encrypted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Blocks {
    /// On the current rayon pool, several at once (a read the reader waits for).
    Parallel,
    /// On the calling thread: a read ahead runs on a thread of its own, beside the pool.
    OneThread,
}

fn encrypt_range(
    keys: &Keys,
    file: &File,
    ivs: &FileIvs,
    plain_size: u64,
    offset: u64,
    size: u64,
    blocks: Blocks,
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
        // Eight blocks at a time (`content::encrypt_blocks`), groups spread on the pool.
        let (cg, pg) = (CBLOCK as usize * LANES, BLOCK as usize * LANES);
        let work = |(k, (c, p)): (usize, (&mut [u8], &[u8]))| {
            content::encrypt_blocks(keys, first + lo + (k * LANES) as u64, ivs, p, c);
        };
        let (c, p) = (&mut body[a..b], &pt[(lo * BLOCK) as usize..p_end]);
        match blocks {
            Blocks::Parallel => c
                .par_chunks_mut(cg)
                .zip(p.par_chunks(pg))
                .enumerate()
                .for_each(work),
            Blocks::OneThread => work((0, (c, p))),
        }
    }
    let mut partial: Vec<u64> = vec![0, n - 1];
    partial.dedup();
    let mut tmp = vec![0u8; CBLOCK as usize];
    for i in partial.into_iter().filter(|i| !(lo..hi).contains(i)) {
        let bn = first + i;
        let p0 = (i * BLOCK) as usize;
        let p = &pt[p0..(p0 + BLOCK as usize).min(pt.len())];
        let c = &mut tmp[..clen(i)];
        content::encrypt_blocks(keys, bn, ivs, p, c);
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

#[cfg(test)]
pub(crate) mod node_tests {
    use super::*;
    use crate::crypto::{Flags, MasterKey, NameMode};

    /// A view of `root` under a fresh key (also the walk's tests' view).
    pub(crate) fn core(root: &Path) -> ViewCore {
        let keys = Keys::new(
            &MasterKey::random(),
            Flags {
                names: NameMode::DirIv,
                hkdf: true,
                long_names: true,
                long_name_max: 255,
            },
        );
        ViewCore::new(root, keys, None, &[]).unwrap()
    }

    fn names(c: &ViewCore, ino: u64, plus: bool) -> Vec<(u64, OsString)> {
        let mut out = Vec::new();
        c.readdir(ino, 0, plus, &mut |i, _, n, _, _| {
            out.push((i, n.to_os_string()));
            false
        })
        .unwrap();
        out.into_iter().skip(2).collect()
    }

    /// Issue 13: the node table keeps a page only while a node in it lives, and a
    /// number never found (free slot, freed page, never handed out) is no node.
    #[test]
    fn node_pages_go_with_their_last_node() {
        let node = |parent| NodeRec {
            parent,
            ..NodeRec::free()
        };
        let mut t = NodeTable::new();
        let n = 3 * NODE_PAGE as u64;
        for ino in 1..n {
            t.insert(ino, node(ino - 1));
        }
        assert_eq!(t.len(), n as usize - 1);
        assert_eq!(
            t.get(&(NODE_PAGE as u64 + 7)).unwrap().parent,
            NODE_PAGE as u64 + 6
        );
        assert!(t.get(&0).is_none() && t.get(&n).is_none() && t.get(&u64::MAX).is_none());
        // The middle page, all but one node: it stays.
        let mid = NODE_PAGE as u64..2 * NODE_PAGE as u64;
        for ino in mid.clone().skip(1) {
            assert_eq!(t.remove(&ino).unwrap().parent, ino - 1);
        }
        assert!(t.remove(&(NODE_PAGE as u64 + 1)).is_none(), "removed once");
        assert!(t.pages[1].is_some());
        t.get_mut(&mid.start).unwrap().nlookup = 5;
        assert_eq!(t.get(&mid.start).unwrap().nlookup, 5);
        t.remove(&mid.start).unwrap();
        assert!(t.pages[1].is_none(), "the page goes with its last node");
        assert!(t.get(&mid.start).is_none() && t.get_mut(&(mid.start + 3)).is_none());
        assert_eq!(t.len(), n as usize - 1 - NODE_PAGE);
        // A number handed out later lands in a page of its own.
        t.insert(n + 1, node(1));
        assert_eq!(t.len(), n as usize - NODE_PAGE);
        assert_eq!(t.pages.iter().flatten().count(), 3);
    }

    /// Issue 13: nodes live while the kernel holds a lookup of them (LOOKUP and every
    /// READDIRPLUS entry count one), and go with their listings once it forgot them all,
    /// parents after their children; a forgotten entry looked up again gets a new number
    /// and the same attributes.
    #[test]
    fn forget_releases_nodes_and_their_listings() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("d/e")).unwrap();
        fs::write(t.path().join("d/e/f"), b"hello").unwrap();
        fs::write(t.path().join("g"), b"x").unwrap();
        let c = core(t.path());
        assert_eq!(c.nodes(), 1);
        let root = names(&c, ROOT_INO, true);
        // d, g and gocryptfs.diriv, each counted once
        assert_eq!(root.len(), 3);
        assert_eq!(c.nodes(), 4);
        let d = root
            .iter()
            .find(|(i, _)| c.getattr(*i).unwrap().kind == Kind::Dir)
            .cloned()
            .unwrap();
        let da = c.lookup(ROOT_INO, &d.1).unwrap();
        assert_eq!(da.ino, d.0, "same entry, same node while it is held");
        let e = names(&c, d.0, false);
        assert_eq!(c.nodes(), 4, "plain READDIR creates no nodes");
        let e_name = e
            .iter()
            .find(|(_, n)| n != DIRIV_NAME)
            .map(|(_, n)| n.clone())
            .unwrap();
        let ea = c.lookup(d.0, &e_name).unwrap();
        let f = names(&c, ea.ino, true);
        let f_ino = f
            .iter()
            .find(|(_, n)| n != DIRIV_NAME)
            .map(|(i, _)| *i)
            .unwrap();
        let before = c.getattr(f_ino).unwrap();
        assert_eq!(before.size, content::cipher_size(5));
        assert_eq!(c.nodes(), 7);
        // The kernel forgets d first (two lookups): its children keep it.
        c.forget(d.0, 2);
        assert!(c.getattr(d.0).is_ok());
        for (i, _) in &f {
            c.forget(*i, 1);
        }
        assert_eq!(c.nodes(), 7 - f.len());
        c.forget(ea.ino, 1);
        // e had no lookups left and no children: gone, and with it d.
        assert_eq!(c.nodes(), 3);
        assert!(matches!(c.getattr(d.0), Err(ViewError::NotFound)));
        assert!(matches!(c.getattr(f_ino), Err(ViewError::NotFound)));
        // Looked up again: new numbers, same attributes.
        let d2 = c.lookup(ROOT_INO, &d.1).unwrap();
        assert_ne!(d2.ino, d.0);
        let e2 = c.lookup(d2.ino, &e_name).unwrap();
        let f2 = names(&c, e2.ino, true);
        let mut again = c
            .getattr(f2.iter().find(|(_, n)| n != DIRIV_NAME).unwrap().0)
            .unwrap();
        assert_ne!(again.ino, f_ino);
        again.ino = before.ino;
        assert_eq!(again, before);
    }
}
