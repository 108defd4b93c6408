//! File content: an 18-byte header (`00 02` + file ID) followed by 4096-byte plaintext
//! blocks, each stored as `nonce[16] || SIV tag[16] || ciphertext` (spec §4), and the
//! size arithmetic between the two (§9). In reverse mode the file ID and block nonces
//! are derived from the encrypted path (§5).
//!
//! The one rule set for reading ciphertext (spec §11 "File content"): [`FileHeader::parse`]
//! checks a header, [`decrypt_stream`] / [`decrypt_all`] decrypt a whole file (size,
//! header, optionally the expected file ID, every block), and [`decrypt_block`] one
//! block. The forward view, `snapveil decrypt` and `verify --deep` all read through
//! these; the reverse view writes headers with [`FileHeader::to_bytes`].

use super::{derive, Keys};
use std::io::{Read, Write};
use zeroize::Zeroize;

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

    pub fn header(&self) -> [u8; HEADER_LEN as usize] {
        FileHeader {
            file_id: self.file_id,
        }
        .to_bytes()
    }
}

/// The only header version there is: the first two bytes of every non-empty file.
pub const HEADER_VERSION: [u8; 2] = [0, 2];

/// A ciphertext file header: version `00 02` and the file ID (the AAD of every block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHeader {
    pub file_id: [u8; 16],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("file header too short ({0} of 18 bytes)")]
    TooShort(usize),
    #[error("unsupported file header version {:02x}{:02x}", .0[0], .0[1])]
    Version([u8; 2]),
    #[error("all-zero file ID in header")]
    ZeroFileId,
}

impl FileHeader {
    /// Parses the first 18 bytes of `b` (the rest is ignored).
    ///
    /// # Errors
    /// Fewer than 18 bytes, a version other than `00 02`, or an all-zero file ID: what
    /// forward gocryptfs refuses.
    pub fn parse(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < HEADER_LEN as usize {
            return Err(HeaderError::TooShort(b.len()));
        }
        if b[..2] != HEADER_VERSION {
            return Err(HeaderError::Version([b[0], b[1]]));
        }
        let file_id: [u8; 16] = b[2..HEADER_LEN as usize].try_into().expect("16 bytes");
        if file_id == [0u8; 16] {
            return Err(HeaderError::ZeroFileId);
        }
        Ok(FileHeader { file_id })
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[..2].copy_from_slice(&HEADER_VERSION);
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

/// Blocks that [`encrypt_blocks`] encrypts together.
pub use super::siv_lanes::LANES;

/// Encrypts consecutive blocks of one file, [`LANES`] at a time (see `siv_lanes` for
/// why): `pt` is the plaintext of blocks `first..` (all full but perhaps the last), `out`
/// their stored form (32 bytes more a block). The same bytes as [`encrypt_block`] on
/// each block.
pub fn encrypt_blocks(keys: &Keys, first: u64, ivs: &FileIvs, pt: &[u8], out: &mut [u8]) {
    use super::siv_lanes::Job;
    debug_assert_eq!(
        out.len(),
        pt.len() + OVERHEAD as usize * pt.len().div_ceil(BLOCK as usize)
    );
    let key = keys.lanes();
    let groups = pt
        .chunks(BLOCK as usize * LANES)
        .zip(out.chunks_mut(CBLOCK as usize * LANES));
    for (g, (p, c)) in groups.enumerate() {
        let base = first + (g * LANES) as u64;
        let mut aads = [[0u8; 24]; LANES];
        let mut nonces = [[0u8; 16]; LANES];
        for (i, (a, n)) in aads.iter_mut().zip(nonces.iter_mut()).enumerate() {
            *a = aad(base + i as u64, Some(&ivs.file_id)).0;
            *n = ivs.nonce(base + i as u64);
        }
        let mut jobs: Vec<Job<'_>> = p
            .chunks(BLOCK as usize)
            .zip(c.chunks_mut(CBLOCK as usize))
            .zip(aads.iter().zip(nonces.iter()))
            .map(|((pt, out), (aad, nonce))| Job {
                aad,
                nonce,
                pt,
                out,
            })
            .collect();
        key.encrypt(&mut jobs);
    }
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

/// Decrypts consecutive stored blocks of one file, [`LANES`] at a time (see `siv_lanes`
/// for why): `c` holds blocks `first..` (all full but perhaps the last), and their
/// plaintext is appended to `out`. The same result as [`decrypt_block`] on each block,
/// holes included.
///
/// # Errors
/// The first block that does not decrypt, by number; nothing of its group of
/// [`LANES`] is appended then.
pub fn decrypt_blocks(
    keys: &Keys,
    first: u64,
    file_id: Option<&[u8; 16]>,
    c: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), (u64, BlockError)> {
    use super::siv_lanes::Open;
    let key = keys.lanes();
    for (g, group) in c.chunks(CBLOCK as usize * LANES).enumerate() {
        let base = first + (g * LANES) as u64;
        let blocks: Vec<&[u8]> = group.chunks(CBLOCK as usize).collect();
        // Each block's plaintext length, and what is wrong with it before any AES.
        let mut lens = [0usize; LANES];
        let mut hole = [false; LANES];
        let mut bad: [Option<BlockError>; LANES] = [None; LANES];
        for (i, b) in blocks.iter().enumerate() {
            if b.len() as u64 == CBLOCK && b.iter().all(|x| *x == 0) {
                hole[i] = true;
                lens[i] = BLOCK as usize;
            } else if b.len() < 32 {
                bad[i] = Some(BlockError::Short);
            } else if b[..16] == [0u8; 16] {
                bad[i] = Some(BlockError::ZeroNonce);
            } else {
                lens[i] = b.len() - 32;
            }
        }
        let mut aads = [[0u8; 24]; LANES];
        let mut alen = [0usize; LANES];
        for (i, (a, l)) in aads.iter_mut().zip(alen.iter_mut()).enumerate() {
            (*a, *l) = aad(base + i as u64, file_id);
        }
        let start = out.len();
        out.resize(start + lens.iter().sum::<usize>(), 0);
        let mut rest = &mut out[start..];
        let mut jobs = Vec::with_capacity(LANES);
        let mut which = Vec::with_capacity(LANES);
        for (i, b) in blocks.iter().enumerate() {
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(lens[i]);
            rest = tail;
            if hole[i] || bad[i].is_some() {
                continue; // zeros, or not decrypted at all
            }
            jobs.push(Open {
                aad: &aads[i][..alen[i]],
                block: b,
                out: mine,
            });
            which.push(i);
        }
        let ok = key.decrypt(&mut jobs);
        drop(jobs);
        for (k, i) in which.iter().enumerate() {
            if !ok[k] {
                bad[*i] = Some(BlockError::Auth);
            }
        }
        if let Some(i) = bad.iter().position(Option::is_some) {
            out[start..].zeroize();
            out.truncate(start);
            return Err((base + i as u64, bad[i].expect("found")));
        }
    }
    Ok(())
}

/// Why a whole file does not decrypt.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("impossible ciphertext size {0} (truncated?)")]
    Size(u64),
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("file ID does not belong to this path (ciphertext of another file?)")]
    ForeignFileId,
    #[error("block {0}: {1}")]
    Block(u64, BlockError),
    /// Reading the ciphertext failed.
    #[error("{0}")]
    Read(std::io::Error),
    /// Writing the plaintext failed.
    #[error("{0}")]
    Write(std::io::Error),
}

/// Checks a ciphertext size and returns its plaintext size.
///
/// # Errors
/// [`ContentError::Size`] for a size no encoder produces ([`plain_size`] is `None`).
pub fn checked_plain_size(csize: u64) -> Result<u64, ContentError> {
    plain_size(csize).ok_or(ContentError::Size(csize))
}

/// Decrypts a whole file of `csize` bytes read from `r` into `w`; returns the plaintext
/// length. Sizes 0 and 18 (header only) are empty files and nothing is read. With
/// `expect`, the header's file ID must be that one: reverse mode derives it from the
/// path, so another file's ciphertext put in this place fails even though each of its
/// blocks authenticates. Blocks are written as they authenticate; the first failure
/// stops, and the caller must discard what was written.
///
/// # Errors
/// Impossible size, bad header, foreign file ID, a block failing (numbered from 0), or
/// I/O on either side.
pub fn decrypt_stream(
    keys: &Keys,
    csize: u64,
    r: &mut impl Read,
    w: &mut impl Write,
    expect: Option<&[u8; 16]>,
) -> Result<u64, ContentError> {
    checked_plain_size(csize)?;
    if csize <= HEADER_LEN {
        return Ok(0);
    }
    let mut header = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut header).map_err(ContentError::Read)?;
    let file_id = FileHeader::parse(&header)?.file_id;
    if expect.is_some_and(|e| *e != file_id) {
        return Err(ContentError::ForeignFileId);
    }
    // [`LANES`] blocks at a time, decrypted together.
    let mut buf = vec![0u8; CBLOCK as usize * LANES];
    let mut pt = Vec::with_capacity(BLOCK as usize * LANES);
    let mut n = 0u64;
    let mut total = 0u64;
    loop {
        let got = read_full(r, &mut buf).map_err(ContentError::Read)?;
        if got == 0 {
            break;
        }
        pt.clear();
        decrypt_blocks(keys, n, Some(&file_id), &buf[..got], &mut pt)
            .map_err(|(no, e)| ContentError::Block(no, e))?;
        w.write_all(&pt).map_err(ContentError::Write)?;
        total += pt.len() as u64;
        n += got.div_ceil(CBLOCK as usize) as u64;
    }
    Ok(total)
}

/// [`decrypt_stream`] of a ciphertext held in memory.
///
/// # Errors
/// As [`decrypt_stream`] (no I/O errors).
pub fn decrypt_all(
    keys: &Keys,
    c: &[u8],
    expect: Option<&[u8; 16]>,
) -> Result<Vec<u8>, ContentError> {
    let mut out = Vec::with_capacity(c.len());
    decrypt_stream(keys, c.len() as u64, &mut &c[..], &mut out, expect)?;
    Ok(out)
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
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

    fn keys() -> Keys {
        Keys::new(
            &super::super::MasterKey::from_slice(&[7u8; 32]),
            super::super::Flags {
                names: super::super::NameMode::DirIv,
                hkdf: true,
                long_names: true,
                long_name_max: 255,
            },
        )
    }

    /// What the reverse view serves for `pt` at `cpath`.
    fn encrypt_file(keys: &Keys, cpath: &[u8], pt: &[u8]) -> Vec<u8> {
        if pt.is_empty() {
            return Vec::new();
        }
        let ivs = FileIvs::for_cpath(cpath);
        let mut out = ivs.header().to_vec();
        for (n, b) in pt.chunks(BLOCK as usize).enumerate() {
            let mut c = vec![0u8; b.len() + 32];
            encrypt_block(
                keys,
                n as u64,
                Some(&ivs.file_id),
                &ivs.nonce(n as u64),
                b,
                &mut c,
            );
            out.extend_from_slice(&c);
        }
        assert_eq!(out.len() as u64, cipher_size(pt.len() as u64));
        out
    }

    /// Decrypting eight at a time is decrypting block by block: whole groups, a group
    /// and a bit, a short last block, holes among them, a first block other than 0; and
    /// a damaged file fails at the first bad block, by number, as block by block.
    #[test]
    fn laned_decryption_is_the_blocks_one_by_one() {
        let k = keys();
        let ivs = FileIvs::for_cpath(b"x/y");
        for (first, len) in [
            (0u64, 8 * 4096),
            (0, 9 * 4096 + 77),
            (3, 4096 * 2 + 1),
            (5, 100),
        ] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 13 + i / 4096) as u8).collect();
            let mut c = vec![0u8; pt.len() + 32 * pt.len().div_ceil(4096)];
            encrypt_blocks(&k, first, &ivs, &pt, &mut c);
            // A hole as gocryptfs stores one: a whole stored block of zeros.
            if len > 4096 * 2 {
                c[4128..8256].fill(0);
            }
            let want: Vec<u8> = c
                .chunks(4128)
                .enumerate()
                .flat_map(|(i, b)| {
                    decrypt_block(&k, first + i as u64, Some(&ivs.file_id), b).unwrap()
                })
                .collect();
            let mut got = b"before".to_vec();
            decrypt_blocks(&k, first, Some(&ivs.file_id), &c, &mut got).unwrap();
            assert_eq!(&got[..6], b"before");
            assert_eq!(got[6..], want[..], "first {first} len {len}");
            // Damage blocks 6 and 2 (if there): the error names block 2, as a block by
            // block decryption would have stopped there.
            let nblocks = c.len().div_ceil(4128);
            let mut bad = c.clone();
            for b in [6usize, 2] {
                if b < nblocks {
                    bad[b * 4128 + 20] ^= 1; // in the tag: every block has one
                }
            }
            let mut out = Vec::new();
            let e = decrypt_blocks(&k, first, Some(&ivs.file_id), &bad, &mut out);
            if nblocks > 2 {
                assert_eq!(e, Err((first + 2, BlockError::Auth)));
            }
            // The wrong file ID fails block 0 of the group.
            let other = FileIvs::for_cpath(b"x/z").file_id;
            let mut out = Vec::new();
            let e = decrypt_blocks(&k, first, Some(&other), &c, &mut out).unwrap_err();
            assert_eq!((e.0, e.1), (first, BlockError::Auth));
            assert!(out.is_empty());
        }
    }

    /// Blocks encrypted eight at a time are the blocks encrypted one by one: whole
    /// groups, a group and a bit, a short last block, a first block other than 0.
    #[test]
    fn laned_blocks_are_the_blocks_one_by_one() {
        let keys = keys();
        let ivs = FileIvs::for_cpath(b"dir/laned");
        for (first, len) in [
            (0u64, 1usize),
            (0, 4096),
            (3, 3 * 4096 + 5),
            (0, 8 * 4096),
            (9, 17 * 4096 + 4095),
        ] {
            let pt: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
            let mut want = Vec::new();
            for (i, b) in pt.chunks(BLOCK as usize).enumerate() {
                let n = first + i as u64;
                let mut c = vec![0u8; b.len() + 32];
                encrypt_block(&keys, n, Some(&ivs.file_id), &ivs.nonce(n), b, &mut c);
                want.extend_from_slice(&c);
            }
            let mut got = vec![0u8; want.len()];
            encrypt_blocks(&keys, first, &ivs, &pt, &mut got);
            assert!(got == want, "first {first} len {len}");
        }
    }

    #[test]
    fn header_round_trips_and_is_what_the_writer_emits() {
        let ivs = FileIvs::for_cpath(b"dir/file");
        let h = ivs.header();
        assert_eq!(&h[..2], &[0, 2]);
        assert_eq!(
            FileHeader::parse(&h),
            Ok(FileHeader {
                file_id: ivs.file_id
            })
        );
        assert_eq!(FileHeader::parse(&h).unwrap().to_bytes(), h);
        let mut longer = h.to_vec();
        longer.extend_from_slice(&[9; 40]);
        assert_eq!(FileHeader::parse(&longer).unwrap().file_id, ivs.file_id);
    }

    #[test]
    fn header_parse_refuses_each_bad_header() {
        let good = FileIvs::for_cpath(b"f").header();
        assert_eq!(FileHeader::parse(&[]), Err(HeaderError::TooShort(0)));
        assert_eq!(
            FileHeader::parse(&good[..17]),
            Err(HeaderError::TooShort(17))
        );
        let mut v = good;
        v[1] = 3;
        let e = FileHeader::parse(&v).unwrap_err();
        assert_eq!(e, HeaderError::Version([0, 3]));
        assert_eq!(e.to_string(), "unsupported file header version 0003");
        let mut v = good;
        v[0] = 0xab;
        assert_eq!(FileHeader::parse(&v), Err(HeaderError::Version([0xab, 2])));
        let mut z = [0u8; 18];
        z[1] = 2;
        let e = FileHeader::parse(&z).unwrap_err();
        assert_eq!(e, HeaderError::ZeroFileId);
        assert_eq!(e.to_string(), "all-zero file ID in header");
    }

    #[test]
    fn decrypt_all_applies_every_rule() {
        let k = keys();
        let pt: Vec<u8> = (0..9000u32).map(|i| i as u8).collect();
        let c = encrypt_file(&k, b"a/b", &pt);
        let id = FileIvs::for_cpath(b"a/b").file_id;
        assert_eq!(decrypt_all(&k, &c, Some(&id)).unwrap(), pt);
        assert_eq!(decrypt_all(&k, &c, None).unwrap(), pt);
        let e = decrypt_all(&k, &c, Some(&FileIvs::for_cpath(b"a/c").file_id)).unwrap_err();
        assert!(matches!(e, ContentError::ForeignFileId));
        assert!(e
            .to_string()
            .contains("file ID does not belong to this path"));
        // Empty and header-only files are empty; sizes no encoder makes are refused.
        assert_eq!(decrypt_all(&k, &[], Some(&id)).unwrap(), b"");
        assert_eq!(decrypt_all(&k, &c[..18], Some(&id)).unwrap(), b"");
        let e = decrypt_all(&k, &c[..10], None).unwrap_err();
        assert!(matches!(e, ContentError::Size(10)));
        assert!(e.to_string().contains("impossible ciphertext size 10"));
        assert!(matches!(
            decrypt_all(&k, &c[..18 + 4128 + 20], None),
            Err(ContentError::Size(_))
        ));
        let mut bad = c.clone();
        bad[1] = 1;
        assert!(matches!(
            decrypt_all(&k, &bad, None),
            Err(ContentError::Header(HeaderError::Version([0, 1])))
        ));
        let mut bad = c.clone();
        bad[2..18].fill(0);
        assert!(matches!(
            decrypt_all(&k, &bad, None),
            Err(ContentError::Header(HeaderError::ZeroFileId))
        ));
        let mut bad = c.clone();
        bad[18 + 4128 + 100] ^= 1;
        let e = decrypt_all(&k, &bad, Some(&id)).unwrap_err();
        assert!(matches!(e, ContentError::Block(1, BlockError::Auth)));
        assert!(e.to_string().starts_with("block 1: "));
    }
}
