//! The forward (decrypting) view: a backup copy of the encrypted view, shown as the
//! plaintext tree it holds, read-only, like forward `gocryptfs`. For browsing a backup
//! (`snapveil open`), locally or through sshfs.
//!
//! The decoding rules are `crypto`'s, shared with `snapveil decrypt`:
//! `names::dir_iv_of` and `names::decode_entry` for listings (undecodable entries are
//! skipped with a warning), `content::FileHeader::parse` and `content::decrypt_block` for
//! reads, which fail with EIO on a bad header or block. Reads decrypt only the blocks
//! they cover, in parallel.

use super::{attr_from, kind_of_ft, AddEntry, Attr, Kind, Listing, Tree, ViewError, ROOT_INO};
use crate::crypto::content::{self, FileHeader, BLOCK, CBLOCK, HEADER_LEN};
use crate::crypto::names::{self, decode_entry, dir_iv_of};
use crate::crypto::{join_cpath, Keys, NameMode};
use rayon::prelude::*;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Clone)]
struct FNode {
    /// Encrypted relative path: where the entry is on disk, and the input of derived IVs.
    cpath: Vec<u8>,
}

pub struct ForwardCore {
    root: PathBuf,
    keys: Keys,
    nodes: RwLock<Vec<FNode>>,
    index: RwLock<std::collections::HashMap<Vec<u8>, u64>>,
    listings: RwLock<std::collections::HashMap<u64, Arc<Listing>>>,
}

pub struct FHandle {
    file: File,
    csize: u64,
    path: PathBuf,
}

impl ForwardCore {
    /// # Errors
    /// `root` missing or not a directory.
    pub fn new(root: &Path, keys: Keys) -> Result<Self, ViewError> {
        let m = fs::metadata(root).map_err(|source| ViewError::Io {
            path: root.into(),
            source,
        })?;
        if !m.is_dir() {
            return Err(ViewError::NotDir { path: root.into() });
        }
        Ok(ForwardCore {
            root: root.into(),
            keys,
            nodes: RwLock::new(vec![FNode { cpath: Vec::new() }]),
            index: RwLock::new(Default::default()),
            listings: RwLock::new(Default::default()),
        })
    }

    fn node(&self, ino: u64) -> Result<FNode, ViewError> {
        let n = self.nodes.read().expect("nodes lock");
        n.get((ino as usize).checked_sub(1).ok_or(ViewError::NotFound)?)
            .cloned()
            .ok_or(ViewError::NotFound)
    }

    fn abs(&self, cpath: &[u8]) -> PathBuf {
        if cpath.is_empty() {
            self.root.clone()
        } else {
            self.root.join(OsStr::from_bytes(cpath))
        }
    }

    fn intern(&self, cpath: Vec<u8>) -> u64 {
        if let Some(i) = self.index.read().expect("index lock").get(&cpath) {
            return *i;
        }
        let mut idx = self.index.write().expect("index lock");
        if let Some(i) = idx.get(&cpath) {
            return *i;
        }
        let mut nodes = self.nodes.write().expect("nodes lock");
        nodes.push(FNode {
            cpath: cpath.clone(),
        });
        let ino = nodes.len() as u64;
        idx.insert(cpath, ino);
        ino
    }
}

impl ForwardCore {
    fn listing(&self, ino: u64) -> Result<Arc<Listing>, ViewError> {
        if let Some(l) = self.listings.read().expect("listings lock").get(&ino) {
            return Ok(Arc::clone(l));
        }
        let node = self.node(ino)?;
        let dir = self.abs(&node.cpath);
        let iv = dir_iv_of(&self.keys, &dir, &node.cpath).map_err(|e| ViewError::Io {
            path: dir.clone(),
            source: std::io::Error::other(e),
        })?;
        let rd = fs::read_dir(&dir).map_err(|source| ViewError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut entries = Vec::new();
        for ent in rd.flatten() {
            let shown = ent.file_name();
            match decode_entry(&self.keys, &dir, &shown, &iv, ino == ROOT_INO) {
                None => {}
                Some(Ok(pname)) => {
                    let kind = ent
                        .file_type()
                        .map(|t| kind_of_ft(&t))
                        .unwrap_or(Kind::File);
                    let cino = self.intern(join_cpath(&node.cpath, shown.as_bytes()));
                    entries.push((cino, OsString::from_vec(pname), kind));
                }
                Some(Err(why)) => {
                    tracing::warn!(path = %ent.path().display(), "skipping undecodable entry: {why}")
                }
            }
        }
        let l = Arc::new(Listing::new(entries));
        Ok(Arc::clone(
            self.listings
                .write()
                .expect("listings lock")
                .entry(ino)
                .or_insert(l),
        ))
    }
}

impl Tree for ForwardCore {
    type Handle = FHandle;

    fn opendir(&self, ino: u64) -> Result<(), ViewError> {
        self.listing(ino).map(|_| ())
    }

    fn readdir(
        &self,
        ino: u64,
        offset: i64,
        plus: bool,
        add: &mut AddEntry<'_>,
    ) -> Result<(), ViewError> {
        self.listing(ino)?.readdir(self, ino, offset, plus, add)
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, ViewError> {
        let ino = self.listing(parent)?.get(name).ok_or(ViewError::NotFound)?;
        self.getattr(ino)
    }

    fn getattr(&self, ino: u64) -> Result<Attr, ViewError> {
        let node = self.node(ino)?;
        let p = self.abs(&node.cpath);
        let m = fs::symlink_metadata(&p).map_err(|source| ViewError::Io {
            path: p.clone(),
            source,
        })?;
        let kind = kind_of_ft(&m.file_type());
        let size = match kind {
            Kind::File => content::plain_size(m.size()).unwrap_or(0),
            Kind::Symlink => self.readlink(ino)?.len() as u64,
            _ => m.size(),
        };
        Ok(attr_from(
            ino,
            kind,
            size,
            m.nlink() as u32,
            (m.mode() & 0o7777) as u16,
            &super::Stat::of(&m),
        ))
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>, ViewError> {
        let node = self.node(ino)?;
        let p = self.abs(&node.cpath);
        let t = fs::read_link(&p)
            .map_err(|source| ViewError::Io {
                path: p.clone(),
                source,
            })?
            .into_os_string()
            .into_vec();
        if self.keys.flags.names == NameMode::Plaintext {
            return Ok(t);
        }
        names::decrypt_symlink(&self.keys, &t).map_err(|e| ViewError::Io {
            path: p,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    }

    fn open(&self, ino: u64) -> Result<FHandle, ViewError> {
        let node = self.node(ino)?;
        let p = self.abs(&node.cpath);
        let file = File::open(&p).map_err(|source| ViewError::Io {
            path: p.clone(),
            source,
        })?;
        let csize = file
            .metadata()
            .map_err(|source| ViewError::Io {
                path: p.clone(),
                source,
            })?
            .len();
        if !fs::symlink_metadata(&p)
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            return Err(ViewError::NotRegular { path: p });
        }
        Ok(FHandle {
            file,
            csize,
            path: p,
        })
    }

    /// Decrypts the blocks a read covers (in parallel). A block that fails
    /// authentication fails the read with EIO, naming the file and block in the log.
    fn read(&self, h: &FHandle, offset: u64, size: u32) -> Result<Vec<u8>, ViewError> {
        let psize = content::plain_size(h.csize).unwrap_or(0);
        if offset >= psize || size == 0 {
            return Ok(Vec::new());
        }
        let end = (offset + size as u64).min(psize);
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let cstart = HEADER_LEN + first * CBLOCK;
        let clen = ((last + 1 - first) * CBLOCK).min(h.csize - cstart);
        let io = |source| ViewError::Io {
            path: h.path.clone(),
            source,
        };
        let mut header = [0u8; HEADER_LEN as usize];
        h.file.read_exact_at(&mut header, 0).map_err(io)?;
        let file_id = match FileHeader::parse(&header) {
            Ok(fh) => fh.file_id,
            Err(e) => {
                tracing::error!(path = %h.path.display(), "bad file header: {e}");
                return Err(ViewError::Io {
                    path: h.path.clone(),
                    source: std::io::Error::from_raw_os_error(libc::EIO),
                });
            }
        };
        let mut ct = vec![0u8; clen as usize];
        h.file.read_exact_at(&mut ct, cstart).map_err(io)?;
        // Groups of LANES blocks in parallel, each group's blocks together.
        let blocks: Vec<Result<Vec<u8>, (u64, content::BlockError)>> = ct
            .par_chunks(CBLOCK as usize * content::LANES)
            .enumerate()
            .map(|(g, c)| {
                let mut p = Vec::with_capacity(BLOCK as usize * content::LANES);
                let n = first + (g * content::LANES) as u64;
                content::decrypt_blocks(&self.keys, n, Some(&file_id), c, &mut p).map(|()| p)
            })
            .collect();
        let mut out = Vec::with_capacity((end - first * BLOCK) as usize);
        for b in blocks {
            match b {
                Ok(p) => out.extend_from_slice(&p),
                Err((n, e)) => {
                    tracing::error!(path = %h.path.display(), block = n, "{e}");
                    return Err(ViewError::Io {
                        path: h.path.clone(),
                        source: std::io::Error::from_raw_os_error(libc::EIO),
                    });
                }
            }
        }
        let skip = (offset - first * BLOCK) as usize;
        Ok(out[skip.min(out.len())..((end - first * BLOCK) as usize).min(out.len())].to_vec())
    }
}
