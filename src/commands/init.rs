//! `snapveil init`: a new key config (gocryptfs format) and, if missing, a random
//! passfile; prints the master key once.

use super::Outcome;
use crate::cli::InitArgs;
use crate::crypto::config::{self, dashed_hex, write_new_private};
use crate::crypto::{KeyConfig, MasterKey, NameMode};
use crate::exec::Runner;
use anyhow::{bail, Result};
use base64::Engine;
use std::io::Write;

pub fn run(_runner: &dyn Runner, a: InitArgs) -> Result<Outcome> {
    if a.key.config.exists() {
        bail!(
            "{}: already exists; refusing to overwrite a key config",
            a.key.config.display()
        );
    }
    let password = if a.key.passfile.exists() {
        config::read_passfile(&a.key.passfile)?
    } else {
        // A random password: the view carries the scrypt-wrapped key to the target,
        // where a weak password could be brute-forced offline.
        use rand::RngCore;
        let mut raw = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut raw[..]);
        let mut line = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .encode(&raw[..])
                .into_bytes(),
        );
        line.push(b'\n');
        write_new_private(&a.key.passfile, &line)?;
        eprintln!(
            "snapveil: created passfile {} (32 random bytes, base64, mode 0600)",
            a.key.passfile.display()
        );
        line.pop();
        zeroize::Zeroizing::new(line.to_vec())
    };
    let names = if a.plaintext_names {
        NameMode::Plaintext
    } else if a.deterministic_names {
        NameMode::Deterministic
    } else {
        NameMode::DirIv
    };
    let master = MasterKey::random();
    let doc = config::new_config(&master, &password, names, a.scrypt_n);
    write_new_private(&a.key.config, &config::to_json(&doc))?;
    // Round-trip: what we wrote must load and unlock with the same password.
    let check = KeyConfig::load(&a.key.config)?.unlock(&password)?;
    if check.bytes() != master.bytes() {
        bail!(
            "{}: written config does not unlock to the generated key",
            a.key.config.display()
        );
    }
    let hexkey = dashed_hex(&master);
    let mut out = std::io::stdout().lock();
    writeln!(out, "Key config written to {}.", a.key.config.display())?;
    writeln!(out, "Your master key is:\n\n    {}\n", &*hexkey)?;
    writeln!(
        out,
        "If the key config is lost or the passfile forgotten, this key is the only way back to\n\
         your data (gocryptfs -masterkey=... -aessiv). Print it, keep it in a drawer. It is not shown again."
    )?;
    Ok(Outcome::Success)
}
