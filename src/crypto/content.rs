//! File content: an 18-byte header (`00 02` + file ID) followed by 4096-byte plaintext
//! blocks, each stored as `nonce[16] || SIV tag[16] || ciphertext` (spec §4), and the
//! size arithmetic between the two (§9). In reverse mode the file ID and block nonces
//! are derived from the encrypted path (§5).

use super::{derive, Keys};

pub const HEADER_LEN: u64 = 18;
pub const BLOCK: u64 = 4096;
pub const OVERHEAD: u64 = 32;
pub const CBLOCK: u64 = BLOCK + OVERHEAD;

pub fn cipher_size(plain: u64) -> u64 {
    if plain == 0 {
        0
    } else {
        HEADER_LEN + plain + OVERHEAD * plain.div_ceil(BLOCK)
    }
}

/// Plaintext size of a ciphertext size, as forward gocryptfs computes it. `None` for an
/// impossible size (1..17 bytes, or a last block of 1..32 bytes).
pub fn plain_size(c: u64) -> Option<u64> {
    if c == 0 || c == HEADER_LEN {
        return Some(0);
    }
    if c < HEADER_LEN {
        return None;
    }
    let body = c - HEADER_LEN;
    let r = body % CBLOCK;
    if (1..=OVERHEAD).contains(&r) {
        return None;
    }
    let blocks = body.div_ceil(CBLOCK);
    Some(body - OVERHEAD * blocks)
}

/// The per-file values of reverse mode, derived from the encrypted path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIvs {
    pub file_id: [u8; 16],
    pub block0: [u8; 16],
}

impl FileIvs {
    pub fn for_cpath(cpath: &[u8]) -> Self {
        FileIvs {
            file_id: derive(cpath, "FILEID"),
            block0: derive(cpath, "BLOCK0IV"),
        }
    }

    /// Block n's nonce: the low 8 bytes of block 0's nonce count up, wrapping, with no
    /// carry into the high half.
    pub fn nonce(&self, n: u64) -> [u8; 16] {
        let mut out = self.block0;
        let low = u64::from_be_bytes(self.block0[8..].try_into().expect("8 bytes")).wrapping_add(n);
        out[8..].copy_from_slice(&low.to_be_bytes());
        out
    }

    pub fn header(&self) -> [u8; 18] {
        let mut h = [0u8; 18];
        h[1] = 2;
        h[2..].copy_from_slice(&self.file_id);
        h
    }
}

fn aad(block_no: u64, file_id: Option<&[u8; 16]>) -> ([u8; 24], usize) {
    let mut a = [0u8; 24];
    a[..8].copy_from_slice(&block_no.to_be_bytes());
    match file_id {
        Some(id) => {
            a[8..].copy_from_slice(id);
            (a, 24)
        }
        None => (a, 8),
    }
}

/// Encrypts one plaintext block into `out` (exactly `pt.len() + 32` bytes).
pub fn encrypt_block(
    keys: &Keys,
    block_no: u64,
    file_id: Option<&[u8; 16]>,
    nonce: &[u8; 16],
    pt: &[u8],
    out: &mut [u8],
) {
    debug_assert_eq!(out.len(), pt.len() + 32);
    let (a, alen) = aad(block_no, file_id);
    out[..16].copy_from_slice(nonce);
    out[32..].copy_from_slice(pt);
    let tag = keys
        .siv()
        .encrypt_in_place_detached([&a[..alen], &nonce[..]], &mut out[32..])
        .expect("two headers are within AES-SIV's limit");
    out[16..32].copy_from_slice(&tag);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block shorter than 32 bytes")]
    Short,
    #[error("all-zero nonce")]
    ZeroNonce,
    #[error("authentication failed (tampered or wrong key)")]
    Auth,
}

/// Decrypts one stored block (`nonce || tag || ct`) and returns the plaintext. A full-size
/// all-zero block is a hole and decrypts to zeros, as in gocryptfs.
///
/// # Errors
/// Short block, all-zero nonce, or failed authentication; nothing unauthenticated is returned.
pub fn decrypt_block(
    keys: &Keys,
    block_no: u64,
    file_id: Option<&[u8; 16]>,
    block: &[u8],
) -> Result<Vec<u8>, BlockError> {
    if block.len() as u64 == CBLOCK && block.iter().all(|b| *b == 0) {
        return Ok(vec![0u8; BLOCK as usize]);
    }
    if block.len() < 32 {
        return Err(BlockError::Short);
    }
    let nonce: [u8; 16] = block[..16].try_into().expect("16 bytes");
    if nonce == [0u8; 16] {
        return Err(BlockError::ZeroNonce);
    }
    let tag = aes_siv::Tag::clone_from_slice(&block[16..32]);
    let mut pt = block[32..].to_vec();
    let (a, alen) = aad(block_no, file_id);
    keys.siv()
        .decrypt_in_place_detached([&a[..alen], &nonce[..]], &mut pt, &tag)
        .map_err(|_| BlockError::Auth)?;
    Ok(pt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_spec_examples() {
        for (p, c) in [
            (0, 0),
            (1, 51),
            (33, 83),
            (4095, 4145),
            (4096, 4146),
            (4097, 4179),
            (5000, 5082),
            (10000, 10114),
            (300001, 302387),
        ] {
            assert_eq!(cipher_size(p), c, "plain {p}");
            assert_eq!(plain_size(c), Some(p), "cipher {c}");
        }
        assert_eq!(plain_size(10), None);
    }

    #[test]
    fn nonce_counts_in_low_half_without_carry() {
        let ivs = FileIvs {
            file_id: [0; 16],
            block0: [0xff; 16],
        };
        let n1 = ivs.nonce(1);
        assert_eq!(&n1[..8], &[0xff; 8]);
        assert_eq!(&n1[8..], &[0; 8]);
    }
}
