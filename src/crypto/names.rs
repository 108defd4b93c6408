//! File names (spec §6): EME over PKCS#7-padded bytes with the directory IV as tweak,
//! unpadded URL-safe base64, and the `gocryptfs.longname.<sha256>` indirection for
//! encrypted names longer than the limit. Also symlink targets (§8), which are
//! encrypted like a content block without file ID.
//!
//! Both directions of paths: [`encrypt_path`] (plaintext relative path to encrypted,
//! computed locally) and [`decrypt_cpath`] (back, for paths without long names). And the
//! decoding rules of an encrypted tree on disk (spec §11 "Directories"), shared by the
//! forward view and `snapveil decrypt`: [`dir_iv_of`] (a directory's `gocryptfs.diriv`,
//! or its derivation when a generation directory lacks it) and [`decode_entry`] (which
//! entries are metadata, long names resolved through their `.name` file). These two
//! are the only functions here that read files.

use super::{derive, eme, join_cpath, Keys, NameMode};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

/// Whether an encrypted path (relative to the tree's root) is one of the format's own
/// files rather than a file of the source: `gocryptfs.conf` at the root, a directory's
/// `gocryptfs.diriv`, a long name's `gocryptfs.longname.HASH.name`.
pub fn is_support_cpath(cpath: &[u8]) -> bool {
    let last = cpath.rsplit(|b| *b == b'/').next().unwrap_or(cpath);
    last == DIRIV_NAME.as_bytes()
        || cpath == CONF_NAME.as_bytes()
        || (last.starts_with(LONGNAME_PREFIX.as_bytes())
            && last.ends_with(LONGNAME_SUFFIX.as_bytes()))
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

/// The IV of encrypted directory `dir` at encrypted path `cpath`: its diriv file, or the
/// reverse-mode derivation when the file is missing. Corrupt diriv files are an error.
///
/// # Errors
/// A diriv file that is not 16 non-zero bytes.
pub fn dir_iv_of(keys: &Keys, dir: &Path, cpath: &[u8]) -> Result<[u8; 16], String> {
    let mode = keys.flags.names;
    if mode != NameMode::DirIv {
        return Ok([0u8; 16]);
    }
    match fs::read(dir.join(DIRIV_NAME)) {
        Ok(b) if b.len() == 16 && b.iter().any(|x| *x != 0) => Ok(b.try_into().expect("16 bytes")),
        Ok(_) => Err(format!(
            "{}: corrupt directory IV (not 16 non-zero bytes)",
            dir.join(DIRIV_NAME).display()
        )),
        Err(_) => Ok(dir_iv(mode, cpath)),
    }
}

/// Plaintext name of entry `shown` of encrypted directory `dir`; `None` for the view's
/// metadata files (config, diriv, long-name companions).
pub fn decode_entry(
    keys: &Keys,
    dir: &Path,
    shown: &OsStr,
    iv: &[u8; 16],
    root: bool,
) -> Option<Result<Vec<u8>, String>> {
    let b = shown.as_bytes();
    if root && b == CONF_NAME.as_bytes() {
        return None;
    }
    if keys.flags.names == NameMode::Plaintext {
        return Some(Ok(b.to_vec()));
    }
    if b == DIRIV_NAME.as_bytes()
        || (b.starts_with(LONGNAME_PREFIX.as_bytes()) && b.ends_with(LONGNAME_SUFFIX.as_bytes()))
    {
        return None;
    }
    let cname = if is_long_hash(b) {
        let np = dir.join(format!("{}{LONGNAME_SUFFIX}", shown.to_string_lossy()));
        match fs::read(&np) {
            Ok(c) if !c.is_empty() && c.len() <= 344 => String::from_utf8_lossy(&c).into_owned(),
            Ok(_) => return Some(Err(format!("{}: invalid long-name file", np.display()))),
            Err(e) => return Some(Err(format!("{}: {e}", np.display()))),
        }
    } else {
        shown.to_string_lossy().into_owned()
    };
    Some(decrypt_name(keys, iv, &cname).map_err(|e| format!("cannot decrypt name: {e}")))
}

/// Plaintext relative path of an encrypted one, with directory IVs derived from the path
/// (reverse mode). `None` when a component does not decrypt, or is a long-name hash
/// (not resolvable from the path alone).
pub fn decrypt_cpath(keys: &Keys, cpath: &[u8]) -> Option<Vec<u8>> {
    if keys.flags.names == NameMode::Plaintext {
        return Some(cpath.to_vec());
    }
    let mut cdir: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    for comp in cpath.split(|b| *b == b'/') {
        if is_long_hash(comp) {
            return None;
        }
        let iv = dir_iv(keys.flags.names, &cdir);
        let p = decrypt_name(keys, &iv, std::str::from_utf8(comp).ok()?).ok()?;
        if !out.is_empty() {
            out.push(b'/');
        }
        out.extend_from_slice(&p);
        cdir = join_cpath(&cdir, comp);
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyConfig;

    fn keys_of(variant: &str) -> Keys {
        let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/vectors/gocryptfs-reverse")
            .join(variant)
            .join("gocryptfs.reverse.conf");
        let kc = KeyConfig::load_public(&p).unwrap();
        Keys::new(&kc.unlock(b"PASSWORD").unwrap(), kc.flags)
    }

    #[test]
    fn decrypt_cpath_inverts_encrypt_path() {
        let k = keys_of("encnames");
        assert_eq!(
            decrypt_cpath(
                &k,
                b"b5ts0S7ODFM70qH0VIzNzQ/QdEHu3UKkF29h2389be2NA/bJUjlYSK-AW9VQFtxxk58w"
            )
            .unwrap(),
            b"sub/deeper/d33.bin"
        );
        for v in ["encnames", "deterministic", "plaintextnames"] {
            let k = keys_of(v);
            for p in ["f", "a/b", "x y/ü/.hidden", "d/e/f/g"] {
                let c = encrypt_path(&k, p.as_bytes()).cpath;
                assert_eq!(decrypt_cpath(&k, &c).unwrap(), p.as_bytes(), "{v}: {p}");
            }
        }
    }

    #[test]
    fn decrypt_cpath_gives_up_on_long_and_undecryptable_names() {
        let k = keys_of("encnames");
        let long = format!("{}/f", "D".repeat(200));
        let c = encrypt_path(&k, long.as_bytes()).cpath;
        assert!(c.starts_with(LONGNAME_PREFIX.as_bytes()));
        assert_eq!(decrypt_cpath(&k, &c), None);
        assert_eq!(decrypt_cpath(&k, b"not-base64!"), None);
        assert_eq!(decrypt_cpath(&k, b"AAAA"), None);
        // A name moved to another directory has the wrong IV there.
        let c = encrypt_path(&k, b"a/b").cpath;
        let last = c.rsplit(|b| *b == b'/').next().unwrap();
        assert_eq!(decrypt_cpath(&k, last), None);
        // Deterministic names do not depend on the directory.
        let k = keys_of("deterministic");
        let c = encrypt_path(&k, b"a/b").cpath;
        let last = c.rsplit(|b| *b == b'/').next().unwrap();
        assert_eq!(decrypt_cpath(&k, last).unwrap(), b"b");
        // Plaintext names pass through, long or not.
        let k = keys_of("plaintextnames");
        assert_eq!(decrypt_cpath(&k, long.as_bytes()).unwrap(), long.as_bytes());
    }

    #[test]
    fn dir_iv_of_reads_derives_or_refuses() {
        let k = keys_of("encnames");
        let t = tempfile::tempdir().unwrap();
        assert_eq!(
            dir_iv_of(&k, t.path(), b"x").unwrap(),
            dir_iv(NameMode::DirIv, b"x")
        );
        fs::write(t.path().join(DIRIV_NAME), [5u8; 16]).unwrap();
        assert_eq!(dir_iv_of(&k, t.path(), b"x").unwrap(), [5u8; 16]);
        fs::write(t.path().join(DIRIV_NAME), [0u8; 16]).unwrap();
        assert!(dir_iv_of(&k, t.path(), b"x")
            .unwrap_err()
            .contains("corrupt directory IV"));
        let k = keys_of("deterministic");
        assert_eq!(dir_iv_of(&k, t.path(), b"x").unwrap(), [0u8; 16]);
    }

    #[test]
    fn decode_entry_hides_metadata_and_resolves_long_names() {
        let k = keys_of("encnames");
        let t = tempfile::tempdir().unwrap();
        let iv = dir_iv(NameMode::DirIv, b"");
        let dec = |s: &str, root| decode_entry(&k, t.path(), OsStr::new(s), &iv, root);
        assert_eq!(dec(CONF_NAME, true), None);
        assert_eq!(dec(DIRIV_NAME, false), None);
        let e = encrypt_component(&k, &iv, "L".repeat(200).as_bytes());
        let companion = format!("{}{LONGNAME_SUFFIX}", e.shown);
        assert_eq!(dec(&companion, false), None);
        assert!(dec(&e.shown, false).unwrap().unwrap_err().contains(".name"));
        fs::write(t.path().join(&companion), e.long.unwrap()).unwrap();
        assert_eq!(
            dec(&e.shown, false).unwrap().unwrap(),
            "L".repeat(200).as_bytes()
        );
        let short = encrypt_component(&k, &iv, b"plain");
        assert_eq!(dec(&short.shown, true).unwrap().unwrap(), b"plain");
        assert!(dec("garbage!", false)
            .unwrap()
            .unwrap_err()
            .starts_with("cannot decrypt name"));
    }
}
