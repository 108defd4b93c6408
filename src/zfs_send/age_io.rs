//! The age format for streams snapveil encrypts itself, so that stock `age -d` restores
//! them. Recipients (X25519) let the host back up what it cannot read back; a passphrase
//! file (scrypt) is the alternative. Secrets are read from private files and held in
//! `SecretString`, which zeroizes on drop.

use super::ZfsSendError;
use crate::config::RawOptions;
use age::secrecy::SecretString;
use std::io::{BufRead, Read};
use std::path::Path;
use std::str::FromStr;

fn read_private(p: &Path) -> Result<SecretString, ZfsSendError> {
    crate::crypto::config::check_private(p)
        .map_err(|e| ZfsSendError::Age(format!("{}: {e}", p.display())))?;
    let s = std::fs::read_to_string(p).map_err(|err| ZfsSendError::Io {
        what: p.display().to_string(),
        err,
    })?;
    Ok(SecretString::from(
        s.trim_end_matches(['\n', '\r']).to_owned(),
    ))
}

/// An encryptor for the job's recipients or passphrase.
///
/// # Errors
/// No age keys configured, a bad recipient, or an unreadable passphrase file.
pub fn encryptor(opts: &RawOptions) -> Result<age::Encryptor, ZfsSendError> {
    if let Some(p) = &opts.age_passphrase_file {
        return Ok(age::Encryptor::with_user_passphrase(read_private(p)?));
    }
    let rs: Vec<age::x25519::Recipient> = opts
        .age_recipients
        .iter()
        .map(|r| {
            age::x25519::Recipient::from_str(r).map_err(|e| ZfsSendError::Age(format!("{r}: {e}")))
        })
        .collect::<Result<_, _>>()?;
    age::Encryptor::with_recipients(rs.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| ZfsSendError::Age(e.to_string()))
}

/// A reader of the plaintext of an age file: with the passphrase file for scrypt files,
/// else with `identity` (an age identity file, private).
///
/// # Errors
/// The header does not parse, no key is configured, or the key does not fit.
pub fn decryptor<'a, R: BufRead + 'a>(
    opts: &RawOptions,
    identity: Option<&Path>,
    input: R,
) -> Result<Box<dyn Read + 'a>, ZfsSendError> {
    let d = age::Decryptor::new_buffered(input)
        .map_err(|e| ZfsSendError::Age(format!("not an age file: {e}")))?;
    let reader = if d.is_scrypt() {
        let p = opts.age_passphrase_file.as_ref().ok_or_else(|| {
            ZfsSendError::Age(
                "the stream is passphrase-encrypted and the job has no age_passphrase_file".into(),
            )
        })?;
        let id = age::scrypt::Identity::new(read_private(p)?);
        d.decrypt(std::iter::once(&id as &dyn age::Identity))
    } else {
        let p = identity.ok_or_else(|| {
            ZfsSendError::Age(
                "no age identity: set age_identity_file in the job or pass --identity".into(),
            )
        })?;
        crate::crypto::config::check_private(p)
            .map_err(|e| ZfsSendError::Age(format!("{}: {e}", p.display())))?;
        let f = std::fs::File::open(p).map_err(|err| ZfsSendError::Io {
            what: p.display().to_string(),
            err,
        })?;
        let ids = age::IdentityFile::from_buffer(std::io::BufReader::new(f))
            .map_err(|e| ZfsSendError::Age(format!("{}: {e}", p.display())))?
            .into_identities()
            .map_err(|e| ZfsSendError::Age(format!("{}: {e}", p.display())))?;
        d.decrypt(ids.iter().map(|i| i.as_ref()))
    };
    reader
        .map(|r| Box::new(r) as Box<dyn Read>)
        .map_err(|e| ZfsSendError::Age(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_with_an_identity_and_a_cut_stream_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = age::x25519::Identity::generate();
        let idf = dir.path().join("key.txt");
        std::fs::write(
            &idf,
            format!(
                "{}\n",
                age::secrecy::ExposeSecret::expose_secret(&id.to_string())
            ),
        )
        .unwrap();
        std::fs::set_permissions(&idf, std::fs::Permissions::from_mode(0o600)).unwrap();
        let opts = RawOptions {
            age_recipients: vec![id.to_public().to_string()],
            ..Default::default()
        };
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        let mut ct = Vec::new();
        let mut w = encryptor(&opts).unwrap().wrap_output(&mut ct).unwrap();
        w.write_all(&data).unwrap();
        w.finish().unwrap();
        let mut back = Vec::new();
        decryptor(&opts, Some(&idf), &ct[..])
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        // Cut at a chunk boundary (64 KiB + tag): age's last-chunk flag catches it.
        let cut = &ct[..ct.len() - 1000];
        let mut r = decryptor(&opts, Some(&idf), cut).unwrap();
        assert!(r.read_to_end(&mut Vec::new()).is_err());
    }
}
