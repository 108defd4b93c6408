//! AES-SIV (RFC 5297) of content blocks, eight at a time, with the output of the
//! `aes-siv` crate ([`super::content::encrypt_block`] stays the reference, and the tests
//! hold the two equal).
//!
//! Why: AES-SIV's tag is a CMAC, a chain in which every AES call needs the result of
//! the one before. One block's chain keeps the AES unit mostly idle: a round takes
//! several cycles to finish, but a new one can start every cycle. The view always has
//! several blocks to encrypt at once (the blocks of a read, the blocks of a file read
//! ahead), so their chains step together here: eight blocks through one call of the
//! cipher's back end (a `BlockClosure`), which `aes`'s AES-NI back end runs
//! interleaved. CTR is parallel already; it stays per block, eight counters per call.

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::typenum::Unsigned;
use aes::cipher::{BlockBackend, BlockClosure, BlockEncrypt, BlockSizeUser, KeyInit};
use aes::{Aes256, Block};
use zeroize::Zeroize;

/// Blocks encrypted together: as many as `aes`'s AES-NI back end interleaves.
pub const LANES: usize = 8;

/// One content block to encrypt.
pub struct Job<'a> {
    /// The block's associated data (block number, file ID).
    pub aad: &'a [u8],
    pub nonce: &'a [u8; 16],
    pub pt: &'a [u8],
    /// `nonce || tag || ciphertext`: `pt.len() + 32` bytes.
    pub out: &'a mut [u8],
}

/// The content key, expanded once for every block (the `aes-siv` crate expands both
/// halves again for each one): CMAC's cipher and subkeys, the CMAC of the zero block
/// that starts every S2V, and CTR's cipher. Zeroized on drop (the ciphers through
/// `aes`'s `zeroize` feature).
pub struct SivKey {
    mac: Aes256,
    ctr: Aes256,
    k1: u128,
    k2: u128,
    d0: u128,
}

impl Drop for SivKey {
    fn drop(&mut self) {
        self.k1.zeroize();
        self.k2.zeroize();
        self.d0.zeroize();
    }
}

/// GF(2^128) doubling of RFC 5297 (and CMAC's subkeys), on a big-endian block; without
/// a branch on the (secret) top bit, as the `dbl` crate that `aes-siv` uses.
fn dbl(x: u128) -> u128 {
    (x << 1) ^ ((x >> 127).wrapping_neg() & 0x87)
}

fn be(b: &[u8]) -> u128 {
    u128::from_be_bytes(b.try_into().expect("16 bytes"))
}

/// A last CMAC block shorter than 16 bytes, padded with `10*`.
fn padded(b: &[u8]) -> u128 {
    let mut t = [0u8; 16];
    t[..b.len()].copy_from_slice(b);
    t[b.len()] = 0x80;
    be(&t)
}

/// `b ^= m`, 16 bytes.
#[inline(always)]
fn xor16(b: &mut Block, m: &[u8]) {
    let x = u128::from_ne_bytes((*b).into()) ^ u128::from_ne_bytes(m.try_into().expect("16"));
    *b = Block::from(x.to_ne_bytes());
}

/// Encrypts the [`LANES`] blocks interleaved: one call of the AES-NI back end (eight
/// blocks at a time), or as many as another back end takes.
#[inline(always)]
fn step<B: BlockBackend<BlockSize = U16>>(backend: &mut B, blocks: &mut [Block; LANES]) {
    let par = B::ParBlocksSize::USIZE;
    if par > 1 {
        let mut chunks = blocks.chunks_exact_mut(par);
        for c in &mut chunks {
            backend.proc_par_blocks_inplace(GenericArray::from_mut_slice(c));
        }
        for b in chunks.into_remainder() {
            backend.proc_block_inplace(b);
        }
    } else {
        for b in blocks.iter_mut() {
            backend.proc_block_inplace(b);
        }
    }
}

/// CMAC of each lane's message (at least 16 bytes), with `end[l]` xored into its last
/// 16 bytes first (S2V's "xorend"; zero for a plain CMAC).
fn cmac<B: BlockBackend<BlockSize = U16>>(
    backend: &mut B,
    key: &SivKey,
    msgs: &[&[u8]; LANES],
    end: &[u128; LANES],
) -> [u128; LANES] {
    // Per lane: how many CMAC blocks, and from where on the message is copied out with
    // the "xorend", the padding and the subkey applied (its last one or two blocks).
    let mut n = [0usize; LANES];
    let mut tail_at = [0usize; LANES];
    let mut tail = [[0u8; 32]; LANES];
    for l in 0..LANES {
        let m = msgs[l];
        debug_assert!(m.len() >= 16);
        n[l] = m.len().div_ceil(16);
        tail_at[l] = (n[l] - if m.len() % 16 == 0 { 1 } else { 2 }) * 16;
        let t = &mut tail[l];
        let len = m.len() - tail_at[l];
        t[..len].copy_from_slice(&m[tail_at[l]..]);
        for (x, y) in t[len - 16..len].iter_mut().zip(end[l].to_be_bytes()) {
            *x ^= y;
        }
        let last = (n[l] - 1) * 16 - tail_at[l];
        let sub = if len % 16 == 0 {
            key.k1
        } else {
            t[len] = 0x80;
            key.k2
        };
        for (x, y) in t[last..last + 16].iter_mut().zip(sub.to_be_bytes()) {
            *x ^= y;
        }
    }
    // The blocks before every lane's tail, in lockstep, then the rest lane by lane.
    let common = tail_at.iter().min().expect("lanes") / 16;
    let steps = *n.iter().max().expect("lanes");
    let mut s = [Block::default(); LANES];
    for j in 0..common {
        let at = j * 16;
        for (b, m) in s.iter_mut().zip(msgs.iter()) {
            xor16(b, &m[at..at + 16]);
        }
        step(backend, &mut s);
    }
    let mut out = [0u128; LANES];
    for j in common..steps {
        let at = j * 16;
        for l in 0..LANES {
            if j >= n[l] {
                continue;
            }
            if at < tail_at[l] {
                xor16(&mut s[l], &msgs[l][at..at + 16]);
            } else {
                let t = at - tail_at[l];
                xor16(&mut s[l], &tail[l][t..t + 16]);
            }
        }
        step(backend, &mut s);
        for l in 0..LANES {
            if j + 1 == n[l] {
                out[l] = be(&s[l]);
            }
        }
    }
    tail.zeroize();
    for b in s.iter_mut() {
        b.as_mut_slice().zeroize();
    }
    out
}

/// S2V of up to [`LANES`] blocks (associated data, nonce, plaintext), on CMAC's
/// cipher: their tags. Lanes past `n` compute on empty input and are not used.
struct S2v<'a> {
    key: &'a SivKey,
    aads: [&'a [u8]; LANES],
    nonces: [&'a [u8]; LANES],
    pts: [&'a [u8]; LANES],
    n: usize,
    tags: &'a mut [u128; LANES],
}

impl BlockSizeUser for S2v<'_> {
    type BlockSize = U16;
}

/// What an unused lane of [`S2v`] reads.
const EMPTY: &[u8] = &[0u8; 16];

impl BlockClosure for S2v<'_> {
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        let key = self.key;
        let lanes = 0..self.n;
        let mut aads = [EMPTY; LANES];
        for l in lanes.clone() {
            if self.aads[l].len() >= 16 {
                aads[l] = self.aads[l];
            }
        }
        // D = CMAC(0); D = dbl(D) ^ CMAC(header), for the AAD and the nonce. An AAD
        // shorter than a block (no file ID) is one padded block.
        let zero = [0u128; LANES];
        let mut c_aad = cmac(backend, key, &aads, &zero);
        for l in lanes.clone() {
            if self.aads[l].len() < 16 {
                let mut one = [Block::default(); LANES];
                one[0] = Block::from((padded(self.aads[l]) ^ key.k2).to_be_bytes());
                step(backend, &mut one);
                c_aad[l] = be(&one[0]);
            }
        }
        let c_nonce = cmac(backend, key, &self.nonces, &zero);
        // Then the plaintext: "xorend" D when it is a block or longer, else
        // CMAC(dbl(D) ^ pad(P)).
        let mut short = [[0u8; 16]; LANES];
        let mut end = [0u128; LANES];
        for l in lanes.clone() {
            let d = dbl(dbl(key.d0) ^ c_aad[l]) ^ c_nonce[l];
            if self.pts[l].len() >= 16 {
                end[l] = d;
            } else {
                short[l] = (dbl(d) ^ padded(self.pts[l])).to_be_bytes();
            }
        }
        let mut msgs = [EMPTY; LANES];
        for l in lanes {
            msgs[l] = if self.pts[l].len() >= 16 {
                self.pts[l]
            } else {
                &short[l]
            };
        }
        *self.tags = cmac(backend, key, &msgs, &end);
        short.zeroize();
        end.zeroize();
    }
}

/// CTR of up to [`LANES`] blocks, on CTR's cipher: `output = input ^ keystream` from
/// each block's tag, with a 128-bit big-endian counter, as `aes-siv` uses. The same
/// either way: encryption (plaintext in) and decryption (ciphertext in).
struct Ctr<'a, 'j> {
    /// (input, output of the same length, tag).
    lanes: &'a mut [(&'j [u8], &'j mut [u8], u128)],
}

impl BlockSizeUser for Ctr<'_, '_> {
    type BlockSize = U16;
}

impl BlockClosure for Ctr<'_, '_> {
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        let mut ks = [Block::default(); LANES];
        for (input, output, tag) in self.lanes.iter_mut() {
            // The tag with bit 31 of its last two 32-bit words cleared.
            let iv = *tag & !(1u128 << 63 | 1u128 << 31);
            for (i, (p, c)) in input
                .chunks(16 * LANES)
                .zip(output.chunks_mut(16 * LANES))
                .enumerate()
            {
                for (k, b) in ks.iter_mut().enumerate() {
                    *b = Block::from(iv.wrapping_add((i * LANES + k) as u128).to_be_bytes());
                }
                step(backend, &mut ks);
                for ((p, c), k) in p.chunks(16).zip(c.chunks_mut(16)).zip(ks.iter_mut()) {
                    if p.len() == 16 {
                        xor16(k, p);
                        c.copy_from_slice(k);
                    } else {
                        for ((c, p), k) in c.iter_mut().zip(p).zip(k.iter()) {
                            *c = p ^ k;
                        }
                    }
                }
            }
        }
        for k in ks.iter_mut() {
            k.as_mut_slice().zeroize();
        }
    }
}

/// One stored content block to decrypt.
pub struct Open<'a> {
    /// The block's associated data (block number, file ID).
    pub aad: &'a [u8],
    /// `nonce || tag || ciphertext`, at least 32 bytes.
    pub block: &'a [u8],
    /// The plaintext: `block.len() - 32` bytes.
    pub out: &'a mut [u8],
}

impl SivKey {
    /// `key`: the 64-byte AES-SIV key; the first half authenticates, the second encrypts
    /// (as the `aes-siv` crate and gocryptfs split it).
    pub fn new(key: &[u8]) -> Self {
        let mac = Aes256::new_from_slice(&key[..32]).expect("32-byte CMAC key");
        let ctr = Aes256::new_from_slice(&key[32..]).expect("32-byte CTR key");
        let mut l = Block::default();
        mac.encrypt_block(&mut l);
        let k1 = dbl(be(&l));
        let k2 = dbl(k1);
        // CMAC of the one full block 0^128.
        let mut d = Block::from(k1.to_be_bytes());
        mac.encrypt_block(&mut d);
        l.zeroize();
        let d0 = be(&d);
        d.zeroize();
        SivKey {
            mac,
            ctr,
            k1,
            k2,
            d0,
        }
    }

    /// S2V of up to [`LANES`] blocks given as (AAD, nonce, plaintext): their tags.
    fn s2v<'p>(
        &self,
        blocks: impl ExactSizeIterator<Item = (&'p [u8], &'p [u8], &'p [u8])>,
    ) -> [u128; LANES] {
        let n = blocks.len();
        let (mut aads, mut nonces, mut pts) = ([EMPTY; LANES], [EMPTY; LANES], [EMPTY; LANES]);
        for (l, (a, nonce, p)) in blocks.enumerate() {
            (aads[l], nonces[l], pts[l]) = (a, nonce, p);
        }
        let mut tags = [0u128; LANES];
        self.mac.encrypt_with_backend(S2v {
            key: self,
            aads,
            nonces,
            pts,
            n,
            tags: &mut tags,
        });
        tags
    }

    /// Encrypts up to [`LANES`] blocks, each exactly as `aes-siv`'s
    /// `encrypt_in_place_detached([aad, nonce], pt)`, with the tag before the ciphertext.
    ///
    /// # Panics
    /// More than [`LANES`] jobs, or an `out` that is not `pt.len() + 32` bytes.
    pub fn encrypt(&self, jobs: &mut [Job<'_>]) {
        assert!(jobs.len() <= LANES);
        for j in jobs.iter() {
            assert_eq!(j.out.len(), j.pt.len() + 32);
        }
        let mut tags = self.s2v(jobs.iter().map(|j| (j.aad, &j.nonce[..], j.pt)));
        let mut lanes: Vec<(&[u8], &mut [u8], u128)> = jobs
            .iter_mut()
            .zip(tags.iter())
            .map(|(j, t)| {
                let (head, ct) = j.out.split_at_mut(32);
                head[..16].copy_from_slice(j.nonce);
                head[16..].copy_from_slice(&t.to_be_bytes());
                (j.pt, ct, *t)
            })
            .collect();
        self.ctr.encrypt_with_backend(Ctr { lanes: &mut lanes });
        for l in lanes.iter_mut() {
            l.2.zeroize();
        }
        tags.zeroize();
    }

    /// Decrypts up to [`LANES`] stored blocks, each exactly as `aes-siv`'s
    /// `decrypt_in_place_detached([aad, nonce], ct, tag)`: whether each one is
    /// authentic. The plaintext of a block that is not is zeroed, never returned.
    ///
    /// # Panics
    /// More than [`LANES`] jobs, a block shorter than 32 bytes, or an `out` that is not
    /// 32 bytes shorter than its block.
    pub fn decrypt(&self, jobs: &mut [Open<'_>]) -> [bool; LANES] {
        assert!(jobs.len() <= LANES);
        for j in jobs.iter() {
            assert!(j.block.len() >= 32);
            assert_eq!(j.out.len(), j.block.len() - 32);
        }
        let mut lanes: Vec<(&[u8], &mut [u8], u128)> = jobs
            .iter_mut()
            .map(|j| (&j.block[32..], &mut *j.out, be(&j.block[16..32])))
            .collect();
        self.ctr.encrypt_with_backend(Ctr { lanes: &mut lanes });
        drop(lanes);
        let mut tags = self.s2v(jobs.iter().map(|j| (j.aad, &j.block[..16], &*j.out)));
        let mut ok = [false; LANES];
        for (l, j) in jobs.iter_mut().enumerate() {
            // The whole tag at once: no early exit on the first differing byte.
            ok[l] = (tags[l] ^ be(&j.block[16..32])) == 0;
            if !ok[l] {
                j.out.zeroize();
            }
        }
        tags.zeroize();
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_siv::siv::Aes256Siv;
    use proptest::prelude::*;

    fn reference(key: &[u8], aad: &[u8], nonce: &[u8; 16], pt: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; pt.len() + 32];
        out[..16].copy_from_slice(nonce);
        out[32..].copy_from_slice(pt);
        let tag = Aes256Siv::new_from_slice(key)
            .unwrap()
            .encrypt_in_place_detached([aad, &nonce[..]], &mut out[32..])
            .unwrap();
        out[16..32].copy_from_slice(&tag);
        out
    }

    fn lanes(key: &[u8], blocks: &[(Vec<u8>, [u8; 16], Vec<u8>)]) -> Vec<Vec<u8>> {
        let k = SivKey::new(key);
        let mut outs: Vec<Vec<u8>> = blocks.iter().map(|b| vec![0u8; b.2.len() + 32]).collect();
        let mut jobs: Vec<Job<'_>> = blocks
            .iter()
            .zip(outs.iter_mut())
            .map(|(b, out)| Job {
                aad: &b.0,
                nonce: &b.1,
                pt: &b.2,
                out,
            })
            .collect();
        k.encrypt(&mut jobs);
        outs
    }

    /// Every length class of S2V and CMAC: under a block, exactly one, between, whole
    /// multiples, a full content block; AADs with and without a file ID.
    #[test]
    fn equals_the_aes_siv_crate_at_every_length_edge() {
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        let lens = [1usize, 15, 16, 17, 31, 32, 33, 100, 4095, 4096];
        for aad_len in [8usize, 24] {
            for chunk in lens.chunks(LANES) {
                let blocks: Vec<_> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| {
                        let aad: Vec<u8> = (0..aad_len).map(|k| (k * 3 + i) as u8).collect();
                        let nonce = [i as u8 + 1; 16];
                        let pt: Vec<u8> = (0..len).map(|k| (k * 7 + len) as u8).collect();
                        (aad, nonce, pt)
                    })
                    .collect();
                let got = lanes(&key, &blocks);
                for (b, g) in blocks.iter().zip(&got) {
                    assert_eq!(
                        *g,
                        reference(&key, &b.0, &b.1, &b.2),
                        "pt {} aad {aad_len}",
                        b.2.len()
                    );
                }
            }
        }
    }

    /// Decrypts with the lanes: (authentic, plaintext) per stored block.
    fn open(key: &[u8], blocks: &[(Vec<u8>, Vec<u8>)]) -> Vec<(bool, Vec<u8>)> {
        let k = SivKey::new(key);
        let mut outs: Vec<Vec<u8>> = blocks
            .iter()
            .map(|b| vec![0xAAu8; b.1.len() - 32])
            .collect();
        let mut jobs: Vec<Open<'_>> = blocks
            .iter()
            .zip(outs.iter_mut())
            .map(|(b, out)| Open {
                aad: &b.0,
                block: &b.1,
                out,
            })
            .collect();
        let ok = k.decrypt(&mut jobs);
        drop(jobs);
        ok.iter().copied().zip(outs).collect()
    }

    /// What `aes-siv` decrypts and authenticates, the lanes do: every length class, and
    /// a flipped bit anywhere (nonce, tag, ciphertext) in one lane fails that lane only,
    /// with its plaintext zeroed.
    #[test]
    fn opens_what_the_aes_siv_crate_sealed_and_nothing_tampered() {
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(91)).collect();
        let lens = [1usize, 15, 16, 17, 31, 32, 33, 100, 4095, 4096];
        for aad_len in [8usize, 24] {
            for chunk in lens.chunks(LANES) {
                let plain: Vec<(Vec<u8>, [u8; 16], Vec<u8>)> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| {
                        let aad: Vec<u8> = (0..aad_len).map(|k| (k * 5 + i) as u8).collect();
                        let pt: Vec<u8> = (0..len).map(|k| (k * 3 + len) as u8).collect();
                        (aad, [i as u8 + 9; 16], pt)
                    })
                    .collect();
                let sealed: Vec<(Vec<u8>, Vec<u8>)> = plain
                    .iter()
                    .map(|(a, n, p)| (a.clone(), reference(&key, a, n, p)))
                    .collect();
                for (got, want) in open(&key, &sealed).iter().zip(&plain) {
                    assert_eq!(got, &(true, want.2.clone()), "pt {}", want.2.len());
                }
                for victim in 0..sealed.len() {
                    for at in [0, 16, 31, sealed[victim].1.len() - 1] {
                        let mut bad = sealed.clone();
                        bad[victim].1[at] ^= 1;
                        for (l, (ok, pt)) in open(&key, &bad).iter().enumerate() {
                            if l == victim {
                                assert!(!ok, "flipped byte {at} of lane {l} passed");
                                assert!(pt.iter().all(|b| *b == 0), "unauthentic plaintext kept");
                            } else {
                                assert_eq!((*ok, pt), (true, &plain[l].2));
                            }
                        }
                    }
                }
            }
        }
    }

    /// 1 to [`LANES`] blocks: (24-byte AAD, nonce, 1 to 599 bytes of plaintext).
    fn random_blocks() -> impl Strategy<Value = Vec<(Vec<u8>, [u8; 16], Vec<u8>)>> {
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 24..=24),
                any::<[u8; 16]>(),
                proptest::collection::vec(any::<u8>(), 1..600),
            ),
            1..=LANES,
        )
    }

    proptest! {
        #[test]
        fn any_blocks_open_as_the_aes_siv_crate_sealed_them(
            key in proptest::collection::vec(any::<u8>(), 64),
            blocks in random_blocks(),
        ) {
            let sealed: Vec<(Vec<u8>, Vec<u8>)> = blocks
                .iter()
                .map(|(a, n, p)| (a.clone(), reference(&key, a, n, p)))
                .collect();
            for (got, b) in open(&key, &sealed).iter().zip(&blocks) {
                prop_assert_eq!(got, &(true, b.2.clone()));
            }
        }

        #[test]
        fn any_blocks_equal_the_aes_siv_crate(
            key in proptest::collection::vec(any::<u8>(), 64),
            blocks in random_blocks(),
        ) {
            let got = lanes(&key, &blocks);
            for (b, g) in blocks.iter().zip(&got) {
                prop_assert_eq!(g.clone(), reference(&key, &b.0, &b.1, &b.2));
            }
        }
    }
}
