//! File names (spec §6): EME over PKCS#7-padded bytes with the directory IV as tweak,
//! unpadded URL-safe base64, and the `gocryptfs.longname.<sha256>` indirection for
//! encrypted names longer than the limit. Also symlink targets (§8), which are
//! encrypted like a content block without file ID.

use super::{derive, eme, join_cpath, Keys, NameMode};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

pub const DIRIV_NAME: &str = "gocryptfs.diriv";
pub const CONF_NAME: &str = "gocryptfs.conf";
pub const LONGNAME_PREFIX: &str = "gocryptfs.longname.";
pub const LONGNAME_SUFFIX: &str = ".name";
/// The config's name in a gocryptfs-reverse plaintext root; the view shows it as
/// `gocryptfs.conf` instead.
pub const REVERSE_CONF_NAME: &str = ".gocryptfs.reverse.conf";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is not valid base64")]
    Base64,
    #[error("decoded name length {0} is not a non-zero multiple of 16")]
    Length(usize),
    #[error("invalid padding")]
    Padding,
    #[error("decrypted name is not a valid file name")]
    Invalid,
}

/// An entry's name as the view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncName {
    /// What readdir shows and what goes into child paths: the encrypted name, or its
    /// `gocryptfs.longname.<hash>` form when too long.
    pub shown: String,
    /// Content of the `.name` companion when `shown` is a long-name hash.
    pub long: Option<String>,
}

/// The EME tweak of a directory: derived from its encrypted path, or zero with
/// deterministic names.
pub fn dir_iv(mode: NameMode, cdir: &[u8]) -> [u8; 16] {
    match mode {
        NameMode::DirIv => derive(cdir, "DIRIV"),
        NameMode::Deterministic | NameMode::Plaintext => [0u8; 16],
    }
}

pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
}

pub fn encrypt_name(keys: &Keys, iv: &[u8; 16], pname: &[u8]) -> String {
    let pad = 16 - pname.len() % 16;
    let mut buf = Vec::with_capacity(pname.len() + pad);
    buf.extend_from_slice(pname);
    buf.resize(pname.len() + pad, pad as u8);
    eme::encrypt(&keys.eme, iv, &mut buf);
    URL_SAFE_NO_PAD.encode(&buf)
}

/// # Errors
/// When the name does not decode, decrypt and unpad to a valid file name.
pub fn decrypt_name(keys: &Keys, iv: &[u8; 16], cname: &str) -> Result<Vec<u8>, NameError> {
    let mut buf = URL_SAFE_NO_PAD
        .decode(cname.trim_end_matches('='))
        .map_err(|_| NameError::Base64)?;
    if buf.is_empty() || buf.len() % 16 != 0 || buf.len() > 2048 {
        return Err(NameError::Length(buf.len()));
    }
    eme::decrypt(&keys.eme, iv, &mut buf);
    let p = *buf.last().expect("non-empty") as usize;
    if p == 0 || p > 16 || p >= buf.len() || !buf[buf.len() - p..].iter().all(|b| *b as usize == p)
    {
        return Err(NameError::Padding);
    }
    buf.truncate(buf.len() - p);
    if !valid_name(&buf) {
        return Err(NameError::Invalid);
    }
    Ok(buf)
}

pub fn long_hash(cname: &str) -> String {
    format!(
        "{LONGNAME_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(Sha256::digest(cname.as_bytes()))
    )
}

/// True for `gocryptfs.longname.<43 chars>` (not its `.name` companion).
pub fn is_long_hash(name: &[u8]) -> bool {
    name.starts_with(LONGNAME_PREFIX.as_bytes()) && name.len() == LONGNAME_PREFIX.len() + 43
}

/// Encrypts one name component for a directory whose IV is `iv`.
pub fn encrypt_component(keys: &Keys, iv: &[u8; 16], pname: &[u8]) -> EncName {
    let c = encrypt_name(keys, iv, pname);
    if keys.flags.long_names && c.len() > keys.flags.long_name_max {
        EncName {
            shown: long_hash(&c),
            long: Some(c),
        }
    } else {
        EncName {
            shown: c,
            long: None,
        }
    }
}

/// Encrypts a symlink target at `clink` (the link's encrypted path, whose last component
/// is `cname`). The nonce path repeats the link's own name: gocryptfs does this (§8),
/// and byte-identity needs it.
pub fn encrypt_symlink(keys: &Keys, clink: &[u8], cname: &[u8], target: &[u8]) -> String {
    let nonce = derive(&join_cpath(clink, cname), "SYMLINKIV");
    let mut out = vec![0u8; target.len() + 32];
    super::content::encrypt_block(keys, 0, None, &nonce, target, &mut out);
    URL_SAFE_NO_PAD.encode(out)
}

/// # Errors
/// When the target does not decode or authenticate.
pub fn decrypt_symlink(keys: &Keys, shown: &[u8]) -> Result<Vec<u8>, NameError> {
    if shown.is_empty() {
        return Ok(Vec::new());
    }
    let s = std::str::from_utf8(shown).map_err(|_| NameError::Base64)?;
    // An rsync daemon without chroot stores symlink targets "munged" (prefixed) unless the
    // module says `munge symlinks = no`. An encrypted target is base64 and never starts
    // with '/', so the prefix is unambiguous and a copy read straight from such a
    // module's directory still restores.
    let s = s.strip_prefix("/rsyncd-munged/").unwrap_or(s);
    let blob = URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| NameError::Base64)?;
    super::content::decrypt_block(keys, 0, None, &blob).map_err(|_| NameError::Invalid)
}

/// Where a plaintext path lives in the encrypted tree, computed locally (reverse mode
/// derives every directory IV from the encrypted path), so a restore can fetch exactly
/// the files it needs without listing the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncPath {
    /// Encrypted relative path of the entry itself.
    pub cpath: Vec<u8>,
    /// Encrypted paths of the `.name` companions of long-named components.
    pub long_name_files: Vec<Vec<u8>>,
    /// Encrypted paths of the parent directories, outermost first (the root excluded).
    pub parents: Vec<Vec<u8>>,
}

/// Maps a plaintext relative path (components separated by `/`) to its encrypted path.
pub fn encrypt_path(keys: &Keys, plain_rel: &[u8]) -> EncPath {
    let mut cdir: Vec<u8> = Vec::new();
    let mut out = EncPath {
        cpath: Vec::new(),
        long_name_files: Vec::new(),
        parents: Vec::new(),
    };
    for comp in plain_rel
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
    {
        let shown = match keys.flags.names {
            NameMode::Plaintext => comp.to_vec(),
            mode => {
                let e = encrypt_component(keys, &dir_iv(mode, &cdir), comp);
                if e.long.is_some() {
                    out.long_name_files.push(join_cpath(
                        &cdir,
                        format!("{}{LONGNAME_SUFFIX}", e.shown).as_bytes(),
                    ));
                }
                e.shown.into_bytes()
            }
        };
        if !out.cpath.is_empty() || !cdir.is_empty() {
            out.parents.push(cdir.clone());
        }
        cdir = join_cpath(&cdir, &shown);
        out.cpath = cdir.clone();
    }
    out
}
