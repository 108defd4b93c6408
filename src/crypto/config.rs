//! The key config in gocryptfs's own format (format spec §2–3): JSON with an
//! scrypt-wrapped 32-byte master key and feature flags. Loading validates it the way
//! gocryptfs does, so a config we accept is one gocryptfs accepts, and the reverse.
//!
//! Owns: parsing, validation, unlocking with a password, creating a new config, the
//! dashed-hex paper form of the master key. Does not own: where configs live.

use super::{hkdf_expand, Flags, MasterKey, NameMode};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::AesGcm;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use zeroize::{Zeroize, Zeroizing};

type Aes256Gcm16 = AesGcm<Aes256, aes_gcm::aead::consts::U16>;

/// Flags gocryptfs 2.3 knows; anything else makes it refuse the config, so do we.
const KNOWN_FLAGS: &[&str] = &[
    "PlaintextNames",
    "DirIV",
    "EMENames",
    "GCMIV128",
    "LongNames",
    "LongNameMax",
    "AESSIV",
    "Raw64",
    "HKDF",
    "FIDO2",
    "XChaCha20Poly1305",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read key config: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a gocryptfs config (invalid JSON: {source})")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{path}: permissions {mode:04o} allow group or others to read it; run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: cannot read passfile: {source}")]
    Passfile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: passfile is empty (its first line is the password)")]
    EmptyPassword { path: PathBuf },
    #[error("{path}: password incorrect (the key config could not be unlocked)")]
    WrongPassword { path: PathBuf },
    #[error("{path}: already exists; refusing to overwrite a key config")]
    Exists { path: PathBuf },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ScryptObject {
    pub salt: String,
    #[serde(rename = "N")]
    pub n: u64,
    #[serde(rename = "R")]
    pub r: u32,
    #[serde(rename = "P")]
    pub p: u32,
    pub key_len: usize,
}

/// The JSON document, field for field in gocryptfs's order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ConfigFile {
    pub creator: String,
    pub encrypted_key: String,
    pub scrypt_object: ScryptObject,
    pub version: u16,
    pub feature_flags: Vec<String>,
    #[serde(default, rename = "FIDO2", skip_serializing_if = "Option::is_none")]
    pub fido2: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_name_max: Option<u32>,
}

/// A loaded and validated key config. `raw` keeps the file's bytes: the view exports them
/// unchanged as `gocryptfs.conf`.
#[derive(Debug, Clone)]
pub struct KeyConfig {
    pub path: PathBuf,
    pub file: ConfigFile,
    pub raw: Vec<u8>,
    pub flags: Flags,
}

/// Refuses a secret file that group or others may access.
///
/// # Errors
/// `TooOpen` naming the path and mode, or `Read` if it cannot be stat'ed.
pub fn check_private(path: &Path) -> Result<(), ConfigError> {
    let meta = fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::TooOpen {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

/// Reads the password the way gocryptfs does: the first line, without its newline,
/// at most 2048 bytes, never empty.
///
/// # Errors
/// Missing or too-open passfile, or an empty first line.
pub fn read_passfile(path: &Path) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    let data = Zeroizing::new(fs::read(path).map_err(|source| ConfigError::Passfile {
        path: path.into(),
        source,
    })?);
    check_private(path).map_err(|e| match e {
        ConfigError::Read { path, source } => ConfigError::Passfile { path, source },
        e => e,
    })?;
    let line = data.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err(ConfigError::EmptyPassword { path: path.into() });
    }
    Ok(Zeroizing::new(line[..line.len().min(2048)].to_vec()))
}

impl KeyConfig {
    /// Loads and validates a config, refusing one that group or others can read.
    ///
    /// # Errors
    /// Unreadable, too open, not JSON, or failing gocryptfs's validation rules.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let raw = fs::read(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        check_private(path)?;
        Self::parse(path, raw)
    }

    /// Loads without the permission check: for a config inside a backup copy, which
    /// rsync may have stored with any mode and which is not secret on its own.
    ///
    /// # Errors
    /// As [`KeyConfig::load`], without `TooOpen`.
    pub fn load_public(path: &Path) -> Result<Self, ConfigError> {
        let raw = fs::read(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, raw)
    }

    /// # Errors
    /// Not JSON, or failing gocryptfs's validation rules (§2).
    pub fn parse(path: &Path, raw: Vec<u8>) -> Result<Self, ConfigError> {
        let file: ConfigFile =
            serde_json::from_slice(&raw).map_err(|source| ConfigError::Json {
                path: path.into(),
                source,
            })?;
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.into(),
            reason,
        };
        if file.version != 2 {
            return Err(invalid(format!(
                "unsupported config version {} (gocryptfs format 2 expected)",
                file.version
            )));
        }
        for f in &file.feature_flags {
            if !KNOWN_FLAGS.contains(&f.as_str()) {
                return Err(invalid(format!("unknown feature flag {f:?}")));
            }
        }
        let has = |f: &str| file.feature_flags.iter().any(|x| x == f);
        let s = &file.scrypt_object;
        if s.n < 1024 || !s.n.is_power_of_two() || s.r < 8 || s.p < 1 || s.key_len < 32 {
            return Err(invalid(format!(
                "scrypt parameters N={} R={} P={} KeyLen={} below gocryptfs's minimums",
                s.n, s.r, s.p, s.key_len
            )));
        }
        match STANDARD.decode(&s.salt) {
            Ok(salt) if salt.len() >= 32 => {}
            _ => {
                return Err(invalid(
                    "ScryptObject.Salt must be base64 of at least 32 bytes".into(),
                ))
            }
        }
        if has("FIDO2") {
            return Err(invalid("FIDO2-protected configs need a security key; snapveil supports password configs only".into()));
        }
        if has("XChaCha20Poly1305") || !has("AESSIV") {
            return Err(invalid("reverse mode needs the AESSIV content cipher (create the config with `snapveil init` or `gocryptfs -init -reverse`)".into()));
        }
        if !has("GCMIV128") {
            return Err(invalid("AESSIV requires the GCMIV128 flag".into()));
        }
        let plaintext = has("PlaintextNames");
        if plaintext
            && ["EMENames", "DirIV", "LongNames", "Raw64", "LongNameMax"]
                .iter()
                .any(|f| has(f))
        {
            return Err(invalid(
                "PlaintextNames excludes EMENames, DirIV, LongNames, Raw64 and LongNameMax".into(),
            ));
        }
        if !plaintext && !has("EMENames") {
            return Err(invalid("neither PlaintextNames nor EMENames is set".into()));
        }
        if has("LongNameMax") != file.long_name_max.is_some_and(|n| n != 0) {
            return Err(invalid(
                "the LongNameMax field must be set if and only if the LongNameMax flag is".into(),
            ));
        }
        if let Some(n) = file.long_name_max {
            if has("LongNameMax") && !(62..=254).contains(&n) {
                return Err(invalid(format!("LongNameMax {n} out of range 62..254")));
            }
        }
        if !plaintext && !has("Raw64") {
            return Err(invalid(
                "configs without Raw64 (padded base64 names) are not supported".into(),
            ));
        }
        let names = if plaintext {
            NameMode::Plaintext
        } else if has("DirIV") {
            NameMode::DirIv
        } else {
            NameMode::Deterministic
        };
        let flags = Flags {
            names,
            hkdf: has("HKDF"),
            long_names: has("LongNames"),
            long_name_max: if has("LongNameMax") {
                file.long_name_max.unwrap_or(255).min(255) as usize
            } else {
                255
            },
        };
        Ok(KeyConfig {
            path: path.into(),
            file,
            raw,
            flags,
        })
    }

    /// Unlocks the master key with a password.
    ///
    /// # Errors
    /// `WrongPassword` when GCM authentication of the wrapped key fails.
    pub fn unlock(&self, password: &[u8]) -> Result<MasterKey, ConfigError> {
        let s = &self.file.scrypt_object;
        let salt = STANDARD.decode(&s.salt).expect("validated on load");
        let kek = scrypt_kek(password, &salt, s.n, s.r, s.p, s.key_len);
        let wrap_key = self.wrap_key(&kek);
        let blob = STANDARD
            .decode(&self.file.encrypted_key)
            .map_err(|_| ConfigError::Invalid {
                path: self.path.clone(),
                reason: "EncryptedKey is not base64".into(),
            })?;
        let nonce_len = if self.flags.hkdf { 16 } else { 12 };
        if blob.len() != nonce_len + 32 + 16 || nonce_len != 16 {
            return Err(ConfigError::Invalid {
                path: self.path.clone(),
                reason: format!(
                    "EncryptedKey has {} bytes; a 128-bit-nonce GCM-wrapped 32-byte key expected",
                    blob.len()
                ),
            });
        }
        let cipher = Aes256Gcm16::new_from_slice(&wrap_key[..]).expect("32-byte key");
        let (nonce, ct) = blob.split_at(16);
        let mut key = cipher
            .decrypt(
                nonce.into(),
                Payload {
                    msg: ct,
                    aad: &[0u8; 8],
                },
            )
            .map_err(|_| ConfigError::WrongPassword {
                path: self.path.clone(),
            })?;
        let mk = MasterKey::from_slice(&key);
        key.zeroize();
        Ok(mk)
    }

    /// Reads the passfile and unlocks.
    ///
    /// # Errors
    /// Passfile problems, or a wrong password (naming the config).
    pub fn unlock_with_passfile(&self, passfile: &Path) -> Result<MasterKey, ConfigError> {
        let pw = read_passfile(passfile)?;
        self.unlock(&pw)
    }

    fn wrap_key(&self, kek: &[u8]) -> Zeroizing<Vec<u8>> {
        if self.flags.hkdf {
            hkdf_expand(kek, b"AES-GCM file content encryption", 32)
        } else {
            Zeroizing::new(kek.to_vec())
        }
    }
}

fn scrypt_kek(
    password: &[u8],
    salt: &[u8],
    n: u64,
    r: u32,
    p: u32,
    len: usize,
) -> Zeroizing<Vec<u8>> {
    let log_n = n.trailing_zeros() as u8;
    let params = scrypt::Params::new(log_n, r, p, len).expect("validated scrypt parameters");
    let mut out = Zeroizing::new(vec![0u8; len]);
    scrypt::scrypt(password, salt, &params, &mut out).expect("output length matches params");
    out
}

/// Builds a new config document for `master` wrapped with `password`.
pub fn new_config(master: &MasterKey, password: &[u8], names: NameMode, log_n: u8) -> ConfigFile {
    let mut salt = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let n = 1u64 << log_n;
    let kek = scrypt_kek(password, &salt, n, 8, 1, 32);
    let wrap_key = hkdf_expand(&kek, b"AES-GCM file content encryption", 32);
    let mut nonce = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let cipher = Aes256Gcm16::new_from_slice(&wrap_key[..]).expect("32-byte key");
    let ct = cipher
        .encrypt(
            (&nonce).into(),
            Payload {
                msg: master.bytes(),
                aad: &[0u8; 8],
            },
        )
        .expect("GCM encryption of 32 bytes cannot fail");
    let mut blob = nonce.to_vec();
    blob.extend_from_slice(&ct);
    let flags: &[&str] = match names {
        NameMode::DirIv => &[
            "HKDF",
            "GCMIV128",
            "DirIV",
            "EMENames",
            "LongNames",
            "Raw64",
            "AESSIV",
        ],
        NameMode::Deterministic => &[
            "HKDF",
            "GCMIV128",
            "EMENames",
            "LongNames",
            "Raw64",
            "AESSIV",
        ],
        NameMode::Plaintext => &["HKDF", "GCMIV128", "PlaintextNames", "AESSIV"],
    };
    ConfigFile {
        creator: format!("snapveil {}", env!("CARGO_PKG_VERSION")),
        encrypted_key: STANDARD.encode(blob),
        scrypt_object: ScryptObject {
            salt: STANDARD.encode(salt),
            n,
            r: 8,
            p: 1,
            key_len: 32,
        },
        version: 2,
        feature_flags: flags.iter().map(|s| s.to_string()).collect(),
        fido2: None,
        long_name_max: None,
    }
}

/// Serializes like gocryptfs: TAB indentation and a final newline.
pub fn to_json(file: &ConfigFile) -> Vec<u8> {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    file.serialize(&mut ser).expect("config serializes");
    out.push(b'\n');
    out
}

/// Writes a new file with mode 0600, refusing to replace an existing one.
///
/// # Errors
/// `Exists` if something is already at `path`; `Write` on I/O failure.
pub fn write_new_private(path: &Path, data: &[u8]) -> Result<(), ConfigError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                ConfigError::Exists { path: path.into() }
            } else {
                ConfigError::Write {
                    path: path.into(),
                    source,
                }
            }
        })?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|source| ConfigError::Write {
            path: path.into(),
            source,
        })
}

/// Tests: `DIR/k.conf` and `DIR/k.pass` (password `pw`, fast scrypt), as `snapveil init`
/// makes them, for configs that name a key; returns the master key.
#[cfg(test)]
pub fn write_test_key(dir: &Path) -> MasterKey {
    let master = MasterKey::random();
    let conf = new_config(&master, b"pw", NameMode::DirIv, 10);
    write_new_private(&dir.join("k.conf"), &to_json(&conf)).unwrap();
    write_new_private(&dir.join("k.pass"), b"pw").unwrap();
    master
}

/// The paper form gocryptfs prints: 64 hex digits in eight dash-separated groups.
pub fn dashed_hex(master: &MasterKey) -> Zeroizing<String> {
    let h = Zeroizing::new(hex::encode(master.bytes()));
    let groups: Vec<&str> = (0..8).map(|i| &h[i * 8..i * 8 + 8]).collect();
    Zeroizing::new(groups.join("-"))
}
