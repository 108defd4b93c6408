//! gocryptfs-compatible transforms (format spec in ../shared/spec): key config and key
//! derivation, EME file names, AES-SIV content blocks, the path-derived values that make
//! reverse mode deterministic, and the one set of rules for reading what they produce
//! (file headers and whole files in `content`, paths and the entries of an encrypted
//! directory in `names`), used by the reverse and forward views, `snapveil decrypt`,
//! verify and restore alike. File I/O: the key config, and an encrypted directory's
//! `gocryptfs.diriv` and `.name` files (`names::dir_iv_of`, `names::decode_entry`);
//! `content::decrypt_stream` reads and writes only the streams it is given.

pub mod config;
pub mod content;
mod eme;
pub mod names;
mod siv_lanes;

pub use config::{ConfigError, KeyConfig};
pub use siv_lanes::Engine;

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
    /// The same key, expanded once for the laned content encryption.
    lanes: siv_lanes::SivKey,
    eme: Aes256,
    pub flags: Flags,
}

impl Keys {
    /// On the fastest AES engine this CPU runs.
    pub fn new(master: &MasterKey, flags: Flags) -> Self {
        Self::with_engine(master, flags, Engine::best()).expect("the best engine is available")
    }

    /// As [`Keys::new`], with the laned content encryption on `engine` (the crypto
    /// bench compares them); `None` if this CPU does not run it.
    pub fn with_engine(master: &MasterKey, flags: Flags, engine: Engine) -> Option<Self> {
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
        Some(Keys {
            lanes: siv_lanes::SivKey::with_engine(&siv_key, engine)?,
            siv_key,
            eme,
            flags,
        })
    }

    /// The engine the content encryption runs on.
    pub fn engine(&self) -> Engine {
        self.lanes.engine()
    }

    pub(crate) fn siv(&self) -> aes_siv::siv::Aes256Siv {
        aes_siv::siv::Aes256Siv::new_from_slice(&self.siv_key).expect("64-byte SIV key")
    }

    pub(crate) fn lanes(&self) -> &siv_lanes::SivKey {
        &self.lanes
    }
}

/// The key that authenticates what snapveil writes to a target besides the view (run
/// records, manifests, prune's record): HKDF-SHA256 of the master key with a purpose
/// string of our own, so it is independent of gocryptfs's content and name keys (a
/// MAC never reveals or reuses them). Zeroized on drop; never logged.
pub struct RecordKey(Zeroizing<Vec<u8>>);

/// HKDF info of [`RecordKey`]; a new format gets a new string.
const RECORD_MAC_INFO: &[u8] = b"snapveil record MAC v1";

impl RecordKey {
    pub fn new(master: &MasterKey) -> Self {
        RecordKey(hkdf_expand(master.bytes(), RECORD_MAC_INFO, 32))
    }

    fn hmac(&self) -> hmac::Hmac<Sha256> {
        <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(&self.0)
            .expect("HMAC takes any key length")
    }

    /// An HMAC-SHA256 computed over bytes as they are written.
    pub fn start(&self) -> RecordMac {
        RecordMac(self.hmac())
    }

    /// HMAC-SHA256 of `data`.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        use hmac::Mac;
        let mut m = self.hmac();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `data` (compared in constant time).
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        use hmac::Mac;
        let mut m = self.hmac();
        m.update(data);
        m.verify_slice(tag).is_ok()
    }
}

/// A [`RecordKey`] MAC in progress: a manifest is streamed to the target, not held whole.
pub struct RecordMac(hmac::Hmac<Sha256>);

impl RecordMac {
    pub fn update(&mut self, data: &[u8]) {
        hmac::Mac::update(&mut self.0, data);
    }

    pub fn finish(self) -> [u8; 32] {
        hmac::Mac::finalize(self.0).into_bytes().into()
    }

    /// Whether `tag` is the MAC of what was written (compared in constant time).
    pub fn verify(self, tag: &[u8]) -> bool {
        hmac::Mac::verify_slice(self.0, tag).is_ok()
    }
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordKey(<redacted>)")
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

#[cfg(test)]
mod tests {
    use super::config::{dashed_hex, KeyConfig};
    use super::*;
    use std::path::PathBuf;

    fn vectors() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/gocryptfs-reverse")
    }

    fn kat(variant: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(vectors().join(variant).join("kat.json")).unwrap())
            .unwrap()
    }

    fn keys_of(variant: &str) -> (KeyConfig, MasterKey) {
        let p = vectors().join(variant).join("gocryptfs.reverse.conf");
        let kc = KeyConfig::load_public(&p).unwrap();
        let mk = kc.unlock(b"PASSWORD").unwrap();
        (kc, mk)
    }

    #[test]
    fn unlocks_gocryptfs_configs_to_the_known_master_key() {
        for v in ["encnames", "deterministic", "plaintextnames"] {
            let (_, mk) = keys_of(v);
            let want = std::fs::read_to_string(vectors().join(v).join("masterkey.hex")).unwrap();
            assert_eq!(hex::encode(mk.bytes()), want.trim().replace('-', ""), "{v}");
        }
        let (kc, _) = keys_of("encnames");
        assert!(matches!(
            kc.unlock(b"wrong"),
            Err(ConfigError::WrongPassword { .. })
        ));
    }

    #[test]
    fn dashed_hex_is_gocryptfs_paper_form() {
        let (_, mk) = keys_of("encnames");
        assert_eq!(
            &*dashed_hex(&mk),
            "99efb9c8-e12526c6-ae7c4dc3-f6249446-8baf88f1-c8cf903d-5781c7c9-d6469356"
        );
        assert_eq!(format!("{mk:?}"), "MasterKey(<redacted>)");
    }

    #[test]
    fn names_dirivs_and_symlinks_match_known_answers() {
        let (kc, mk) = keys_of("encnames");
        let keys = Keys::new(&mk, kc.flags);
        let k = kat("encnames");
        for d in k["dirs"].as_array().unwrap() {
            let cdir = d["cipher_dir"].as_str().unwrap();
            assert_eq!(
                hex::encode(names::dir_iv(NameMode::DirIv, cdir.as_bytes())),
                d["diriv_hex"].as_str().unwrap(),
                "diriv of {cdir:?}"
            );
        }
        let mut checked = 0;
        for n in k["names"].as_array().unwrap() {
            let cdir = n["cipher_dir"].as_str().unwrap();
            let iv = names::dir_iv(NameMode::DirIv, cdir.as_bytes());
            let plain = n["plain_name"].as_str().unwrap();
            let enc = names::encrypt_component(&keys, &iv, plain.as_bytes());
            let want = n["encrypted_name"].as_str().unwrap();
            assert_eq!(
                enc.long.as_deref().unwrap_or(&enc.shown),
                want,
                "name {plain:?}"
            );
            assert_eq!(
                names::decrypt_name(&keys, &iv, want).unwrap(),
                plain.as_bytes()
            );
            checked += 1;
        }
        assert!(checked >= 10);
        for s in k["symlinks"].as_array().unwrap() {
            let cpath = s["cipher_path"].as_str().unwrap();
            let name = cpath.rsplit_once('/').map_or(cpath, |(_, n)| n);
            let got = names::encrypt_symlink(
                &keys,
                cpath.as_bytes(),
                name.as_bytes(),
                s["target"].as_str().unwrap().as_bytes(),
            );
            assert_eq!(got, s["encrypted_target"].as_str().unwrap());
        }
    }

    #[test]
    fn refuses_what_gocryptfs_refuses() {
        let base =
            std::fs::read_to_string(vectors().join("encnames/gocryptfs.reverse.conf")).unwrap();
        for (from, to, why) in [
            ("\"Version\": 2", "\"Version\": 1", "version"),
            ("\"AESSIV\"", "\"AESSIV\", \"Nope\"", "unknown feature flag"),
            ("\"N\": 1024", "\"N\": 512", "scrypt"),
            (
                "\"DirIV\",",
                "\"DirIV\", \"PlaintextNames\",",
                "PlaintextNames excludes",
            ),
            ("\t\t\"AESSIV\"\n", "\t\t\"XChaCha20Poly1305\"\n", "AESSIV"),
        ] {
            assert!(base.contains(from), "{from}");
            let e = KeyConfig::parse(
                std::path::Path::new("x.conf"),
                base.replace(from, to).into_bytes(),
            )
            .unwrap_err();
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
    }
}

#[cfg(test)]
mod path_tests {
    use super::*;

    #[test]
    fn encrypt_path_matches_the_vectors_tree() {
        let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/vectors/gocryptfs-reverse/encnames/gocryptfs.reverse.conf");
        let kc = KeyConfig::load_public(&p).unwrap();
        let keys = Keys::new(&kc.unlock(b"PASSWORD").unwrap(), kc.flags);
        let e = names::encrypt_path(&keys, "sub/deeper/d33.bin".as_bytes());
        assert_eq!(
            String::from_utf8(e.cpath).unwrap(),
            "b5ts0S7ODFM70qH0VIzNzQ/QdEHu3UKkF29h2389be2NA/bJUjlYSK-AW9VQFtxxk58w"
        );
        assert_eq!(e.parents.len(), 2);
        let d = "D".repeat(200);
        let e = names::encrypt_path(&keys, format!("{d}/link_to_long").as_bytes());
        assert_eq!(
            String::from_utf8(e.cpath).unwrap(),
            "gocryptfs.longname.ltcGDYcovqxi_r8NLqg0aBTqXZklDeUmpolEHDm7VAI/hiKQ6qteRq30ISJBY7WuSw"
        );
        assert_eq!(
            e.long_name_files,
            vec![b"gocryptfs.longname.ltcGDYcovqxi_r8NLqg0aBTqXZklDeUmpolEHDm7VAI.name".to_vec()]
        );
    }
}
