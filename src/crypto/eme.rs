//! EME (Halevi–Rogaway "ECB-Mix-ECB") wide-block encryption, as in `rfjakob/eme`, which
//! gocryptfs uses for file names (format spec §6.5). Owned here (about 60 lines over the
//! `aes` block cipher) rather than pulled in as a dependency; pinned by the vectors.

use aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt};
use aes::Aes256;

/// Doubling in GF(2^128) with EME's little-endian convention.
fn x2(b: &[u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0] = (b[0] << 1) ^ if b[15] >= 0x80 { 0x87 } else { 0 };
    for j in 1..16 {
        out[j] = (b[j] << 1) | (b[j - 1] >> 7);
    }
    out
}

fn xor(a: &[u8; 16], b: &[u8; 16]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for i in 0..16 {
        o[i] = a[i] ^ b[i];
    }
    o
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Enc,
    Dec,
}

fn block(aes: &Aes256, dir: Dir, x: &[u8; 16]) -> [u8; 16] {
    let mut b = GenericArray::clone_from_slice(x);
    match dir {
        Dir::Enc => aes.encrypt_block(&mut b),
        Dir::Dec => aes.decrypt_block(&mut b),
    }
    b.into()
}

/// Transforms `data` (a multiple of 16 bytes, 16..=2048) in place.
fn transform(aes: &Aes256, tweak: &[u8; 16], data: &mut [u8], dir: Dir) {
    assert!(
        data.len().is_multiple_of(16) && !data.is_empty() && data.len() <= 2048,
        "EME input length {}",
        data.len()
    );
    let m = data.len() / 16;
    let mut l = Vec::with_capacity(m);
    let mut lj = x2(&block(aes, Dir::Enc, &[0u8; 16]));
    for _ in 0..m {
        l.push(lj);
        lj = x2(&lj);
    }
    let mut ppp: Vec<[u8; 16]> = data
        .chunks_exact(16)
        .zip(&l)
        .map(|(p, lj)| block(aes, dir, &xor(p.try_into().expect("16-byte chunk"), lj)))
        .collect();
    let mut mp = *tweak;
    for p in &ppp {
        mp = xor(&mp, p);
    }
    let mc = block(aes, dir, &mp);
    let mut mm = xor(&mp, &mc);
    let mut c0 = xor(&mc, tweak);
    for p in ppp.iter_mut().skip(1) {
        mm = x2(&mm);
        *p = xor(p, &mm);
        c0 = xor(&c0, p);
    }
    ppp[0] = c0;
    for ((out, c), lj) in data.chunks_exact_mut(16).zip(&ppp).zip(&l) {
        out.copy_from_slice(&xor(&block(aes, dir, c), lj));
    }
}

pub fn encrypt(aes: &Aes256, tweak: &[u8; 16], data: &mut [u8]) {
    transform(aes, tweak, data, Dir::Enc)
}

pub fn decrypt(aes: &Aes256, tweak: &[u8; 16], data: &mut [u8]) {
    transform(aes, tweak, data, Dir::Dec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::KeyInit;

    #[test]
    fn roundtrip_all_lengths() {
        let aes = Aes256::new_from_slice(&[7u8; 32]).unwrap();
        let tweak = [3u8; 16];
        for m in 1..=16 {
            let orig: Vec<u8> = (0..m * 16).map(|i| i as u8).collect();
            let mut d = orig.clone();
            encrypt(&aes, &tweak, &mut d);
            assert_ne!(d, orig);
            decrypt(&aes, &tweak, &mut d);
            assert_eq!(d, orig);
        }
    }
}
