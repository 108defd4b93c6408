//! gocryptfs-compatible transforms (format spec in ../shared/spec): key config and key
//! derivation, EME file names, AES-SIV content blocks, the path-derived values that make
//! reverse mode deterministic. No I/O besides reading and writing the key config.

pub mod config;
pub mod content;
mod eme;
pub mod names;

pub use config::{ConfigError, KeyConfig};

use aes::cipher::KeyInit;
use aes::Aes256;
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The 32-byte master key. Zeroized on drop; never logged (`Debug` is redacted).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl MasterKey {
    /// # Panics
    /// If `b` is not 32 bytes; callers check lengths first.
    pub fn from_slice(b: &[u8]) -> Self {
        let mut k = [0u8; 32];
        k.copy_from_slice(b);
        MasterKey(k)
    }

    pub fn random() -> Self {
        use rand::RngCore;
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        MasterKey(k)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// How names are shown in the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameMode {
    /// EME with a per-directory IV (`gocryptfs.diriv`): gocryptfs's default.
    DirIv,
    /// EME with an all-zero IV and no diriv files (`-deterministic-names`).
    Deterministic,
    /// Names in clear (`-plaintextnames`).
    Plaintext,
}

/// What the config's feature flags mean for the transforms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flags {
    pub names: NameMode,
    pub hkdf: bool,
    pub long_names: bool,
    /// Encrypted names longer than this become `gocryptfs.longname.*`.
    pub long_name_max: usize,
}

pub(crate) fn hkdf_expand(ikm: &[u8], info: &[u8], len: usize) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![0u8; len]);
    Hkdf::<Sha256>::new(None, ikm)
        .expand(info, &mut out)
        .expect("HKDF output length is small");
    out
}

/// Keys derived from the master key, shared read-only by all FUSE threads.
pub struct Keys {
    siv_key: Zeroizing<Vec<u8>>,
    eme: Aes256,
    pub flags: Flags,
}

impl Keys {
    pub fn new(master: &MasterKey, flags: Flags) -> Self {
        let (siv_key, eme_key) = if flags.hkdf {
            (
                hkdf_expand(master.bytes(), b"AES-SIV file content encryption", 64),
                hkdf_expand(master.bytes(), b"EME filename encryption", 32),
            )
        } else {
            // Legacy configs (gocryptfs < 1.3): emeKey = master, sivKey = SHA-512(master).
            let mut h = sha2::Sha512::new();
            h.update(master.bytes());
            (
                Zeroizing::new(h.finalize().to_vec()),
                Zeroizing::new(master.bytes().to_vec()),
            )
        };
        let eme = Aes256::new_from_slice(&eme_key).expect("32-byte EME key");
        Keys {
            siv_key,
            eme,
            flags,
        }
    }

    pub(crate) fn siv(&self) -> aes_siv::siv::Aes256Siv {
        aes_siv::siv::Aes256Siv::new_from_slice(&self.siv_key).expect("64-byte SIV key")
    }
}

/// `SHA256(cpath || 0x00 || purpose)[..16]`: every IV, nonce and file ID of reverse mode
/// is a function of the encrypted path (spec §5), which is what makes the view
/// deterministic and rsync-friendly.
pub fn derive(cpath: &[u8], purpose: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(cpath);
    h.update([0u8]);
    h.update(purpose.as_bytes());
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

/// Joins encrypted path components the way gocryptfs does: root is empty, no leading `/`.
pub fn join_cpath(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
        p.extend_from_slice(parent);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}
