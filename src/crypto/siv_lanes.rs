//! AES-SIV (RFC 5297) of content blocks, eight at a time, with the output of the
//! `aes-siv` crate ([`super::content::encrypt_block`] stays the reference, and the tests
//! hold the two equal).
//!
//! Why: AES-SIV's tag is a CMAC, a chain in which every AES call needs the result of
//! the one before. One block's chain keeps the AES unit mostly idle: a round takes
//! several cycles to finish, but a new one can start every cycle. The view always has
//! several blocks to encrypt at once (the blocks of a read, the blocks of a file read
//! ahead), so their chains step together here: eight blocks per round. CTR is parallel
//! already; it runs eight counters per round, or sixteen with VAES.
//!
//! Which code runs the rounds is an [`Engine`], picked once per key from what the CPU
//! has. On x86-64 with AES-NI the chains and counters stay in registers ([`x86`]): the
//! `aes` crate's back end, which the portable engine uses, takes its blocks through
//! memory, and in a profile of the view the code around its rounds cost more than the
//! rounds.

use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::typenum::Unsigned;
use aes::cipher::{BlockBackend, BlockClosure, BlockEncrypt, BlockSizeUser, KeyInit};
use aes::{Aes256, Block};
use zeroize::Zeroize;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Blocks encrypted together: as many as `aes`'s AES-NI back end interleaves.
pub const LANES: usize = 8;

/// Which code runs the AES rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The `aes` crate's back end (AES-NI where the CPU has it, else constant-time
    /// software), driven through its `BlockBackend`.
    Portable,
    /// x86-64 AES-NI in registers: CMAC and CTR eight blocks per round.
    AesNi,
    /// As `AesNi`, with CTR sixteen blocks per round in 512-bit registers (VAES,
    /// AVX-512).
    Vaes,
}

impl Engine {
    /// The fastest engine this CPU runs.
    pub fn best() -> Engine {
        *Engine::available().last().expect("the portable engine")
    }

    /// Every engine this CPU runs, slowest first.
    pub fn available() -> Vec<Engine> {
        #[cfg(target_arch = "x86_64")]
        return [vec![Engine::Portable], x86::available()].concat();
        #[cfg(not(target_arch = "x86_64"))]
        vec![Engine::Portable]
    }
}

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
/// `aes`'s `zeroize` feature, the x86 round keys by their own `Drop`).
pub struct SivKey {
    mac: Aes256,
    ctr: Aes256,
    k1: u128,
    k2: u128,
    d0: u128,
    #[cfg(target_arch = "x86_64")]
    ni: Option<x86::NiKey>,
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

/// Each lane's CMAC message (at least 16 bytes) as its engine walks it: the blocks
/// before its last one or two come from the message itself; those last ones are copied
/// out with S2V's "xorend", the padding and the subkey applied.
struct Tails<'m> {
    msgs: [&'m [u8]; LANES],
    /// CMAC blocks per lane.
    n: [usize; LANES],
    /// Where each lane's copied tail starts in its message.
    at: [usize; LANES],
    tail: [[u8; 32]; LANES],
}

impl Drop for Tails<'_> {
    fn drop(&mut self) {
        self.tail.zeroize();
    }
}

impl<'m> Tails<'m> {
    /// `end[l]` is xored into the last 16 bytes of lane `l` (zero for a plain CMAC).
    fn new(key: &SivKey, msgs: &[&'m [u8]; LANES], end: &[u128; LANES]) -> Self {
        let mut t = Tails {
            msgs: *msgs,
            n: [0; LANES],
            at: [0; LANES],
            tail: [[0u8; 32]; LANES],
        };
        for l in 0..LANES {
            let m = msgs[l];
            debug_assert!(m.len() >= 16);
            t.n[l] = m.len().div_ceil(16);
            t.at[l] = (t.n[l] - if m.len().is_multiple_of(16) { 1 } else { 2 }) * 16;
            let tail = &mut t.tail[l];
            let len = m.len() - t.at[l];
            tail[..len].copy_from_slice(&m[t.at[l]..]);
            for (x, y) in tail[len - 16..len].iter_mut().zip(end[l].to_be_bytes()) {
                *x ^= y;
            }
            let last = (t.n[l] - 1) * 16 - t.at[l];
            let sub = if len.is_multiple_of(16) {
                key.k1
            } else {
                tail[len] = 0x80;
                key.k2
            };
            for (x, y) in tail[last..last + 16].iter_mut().zip(sub.to_be_bytes()) {
                *x ^= y;
            }
        }
        t
    }

    /// Blocks every lane takes straight from its message: they step in lockstep.
    fn common(&self) -> usize {
        self.at.iter().min().expect("lanes") / 16
    }

    /// Blocks of the longest lane.
    fn steps(&self) -> usize {
        *self.n.iter().max().expect("lanes")
    }

    /// Block `j` of lane `l` (`j < n[l]`), as CMAC takes it.
    #[inline(always)]
    fn block(&self, l: usize, j: usize) -> &[u8] {
        let at = j * 16;
        if at < self.at[l] {
            &self.msgs[l][at..at + 16]
        } else {
            let t = at - self.at[l];
            &self.tail[l][t..t + 16]
        }
    }
}

/// What S2V needs of an engine: CMAC of eight messages at once, and one block
/// encrypted on CMAC's cipher.
trait Cmac {
    fn cmac(&mut self, tails: &Tails<'_>) -> [u128; LANES];
    fn encrypt_one(&mut self, block: u128) -> u128;
}

/// The portable engine: the `aes` crate's back end.
struct Portable<'b, B>(&'b mut B);

impl<B: BlockBackend<BlockSize = U16>> Cmac for Portable<'_, B> {
    fn cmac(&mut self, t: &Tails<'_>) -> [u128; LANES] {
        let backend = &mut *self.0;
        let mut s = [Block::default(); LANES];
        for j in 0..t.common() {
            let at = j * 16;
            for (b, m) in s.iter_mut().zip(t.msgs.iter()) {
                xor16(b, &m[at..at + 16]);
            }
            step(backend, &mut s);
        }
        let mut out = [0u128; LANES];
        for j in t.common()..t.steps() {
            for (l, b) in s.iter_mut().enumerate() {
                if j < t.n[l] {
                    xor16(b, t.block(l, j));
                }
            }
            step(backend, &mut s);
            for l in 0..LANES {
                if j + 1 == t.n[l] {
                    out[l] = be(&s[l]);
                }
            }
        }
        for b in s.iter_mut() {
            b.as_mut_slice().zeroize();
        }
        out
    }

    fn encrypt_one(&mut self, block: u128) -> u128 {
        let mut one = [Block::default(); LANES];
        one[0] = Block::from(block.to_be_bytes());
        step(self.0, &mut one);
        let out = be(&one[0]);
        one[0].as_mut_slice().zeroize();
        out
    }
}

/// S2V of [`LANES`] blocks (associated data, nonce, plaintext): their tags.
fn s2v_lanes(
    key: &SivKey,
    engine: &mut impl Cmac,
    aads: &[&[u8]; LANES],
    nonces: &[&[u8]; LANES],
    pts: &[&[u8]; LANES],
) -> [u128; LANES] {
    // D = CMAC(0); D = dbl(D) ^ CMAC(header), for the AAD and the nonce. An AAD
    // shorter than a block (no file ID) is one padded block.
    let zero = [0u128; LANES];
    let mut long = *aads;
    for a in long.iter_mut().filter(|a| a.len() < 16) {
        *a = EMPTY;
    }
    let mut c_aad = engine.cmac(&Tails::new(key, &long, &zero));
    for l in 0..LANES {
        if aads[l].len() < 16 {
            c_aad[l] = engine.encrypt_one(padded(aads[l]) ^ key.k2);
        }
    }
    let c_nonce = engine.cmac(&Tails::new(key, nonces, &zero));
    // Then the plaintext: "xorend" D when it is a block or longer, else
    // CMAC(dbl(D) ^ pad(P)).
    let mut short = [[0u8; 16]; LANES];
    let mut end = [0u128; LANES];
    for l in 0..LANES {
        let d = dbl(dbl(key.d0) ^ c_aad[l]) ^ c_nonce[l];
        if pts[l].len() >= 16 {
            end[l] = d;
        } else {
            short[l] = (dbl(d) ^ padded(pts[l])).to_be_bytes();
        }
    }
    let mut msgs = [EMPTY; LANES];
    for l in 0..LANES {
        msgs[l] = if pts[l].len() >= 16 {
            pts[l]
        } else {
            &short[l]
        };
    }
    let tags = engine.cmac(&Tails::new(key, &msgs, &end));
    short.zeroize();
    end.zeroize();
    tags
}

/// S2V on the portable engine, run inside the `aes` crate's `encrypt_with_backend`.
struct S2v<'a> {
    key: &'a SivKey,
    aads: [&'a [u8]; LANES],
    nonces: [&'a [u8]; LANES],
    pts: [&'a [u8]; LANES],
    tags: &'a mut [u128; LANES],
}

impl BlockSizeUser for S2v<'_> {
    type BlockSize = U16;
}

/// What an unused lane of the portable CTR reads.
const EMPTY: &[u8] = &[0u8; 16];

impl BlockClosure for S2v<'_> {
    fn call<B: BlockBackend<BlockSize = U16>>(self, backend: &mut B) {
        *self.tags = s2v_lanes(
            self.key,
            &mut Portable(backend),
            &self.aads,
            &self.nonces,
            &self.pts,
        );
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
            let iv = ctr_iv(*tag);
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

/// CTR's first counter block: the tag with bit 31 of its last two 32-bit words
/// cleared. (So the last word counts at most 2^31 blocks before it would carry: the x86
/// engines count in that word alone.)
fn ctr_iv(tag: u128) -> u128 {
    tag & !(1u128 << 63 | 1u128 << 31)
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
    /// (as the `aes-siv` crate and gocryptfs split it). `None` if this CPU does not run
    /// `engine`.
    pub fn with_engine(key: &[u8], engine: Engine) -> Option<Self> {
        if !Engine::available().contains(&engine) {
            return None;
        }
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
        Some(SivKey {
            mac,
            ctr,
            k1,
            k2,
            d0,
            #[cfg(target_arch = "x86_64")]
            ni: x86::NiKey::new(key, engine),
        })
    }

    /// The engine this key runs on.
    pub fn engine(&self) -> Engine {
        #[cfg(target_arch = "x86_64")]
        if let Some(ni) = &self.ni {
            return ni.engine();
        }
        Engine::Portable
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
        // Unused lanes repeat the first: their chains are as long as its chain, so every
        // lane steps in lockstep for as long as the shortest used one does. Their
        // results are not used.
        for l in n.max(1)..LANES {
            (aads[l], nonces[l], pts[l]) = (aads[0], nonces[0], pts[0]);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(ni) = &self.ni {
            return s2v_lanes(self, &mut ni.cmac_engine(), &aads, &nonces, &pts);
        }
        let mut tags = [0u128; LANES];
        self.mac.encrypt_with_backend(S2v {
            key: self,
            aads,
            nonces,
            pts,
            tags: &mut tags,
        });
        tags
    }

    /// CTR of each lane: (input, output of the same length, tag).
    fn ctr<'j>(&self, lanes: &mut [(&'j [u8], &'j mut [u8], u128)]) {
        #[cfg(target_arch = "x86_64")]
        if let Some(ni) = &self.ni {
            for (input, output, tag) in lanes.iter_mut() {
                ni.ctr(input, output, ctr_iv(*tag));
            }
            return;
        }
        self.ctr.encrypt_with_backend(Ctr { lanes });
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
        self.ctr(&mut lanes);
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
        self.ctr(&mut lanes);
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

    /// Encrypts with the lanes on every engine this CPU runs: the outputs, one set an
    /// engine, each tagged with it.
    fn lanes(key: &[u8], blocks: &[(Vec<u8>, [u8; 16], Vec<u8>)]) -> Vec<(Engine, Vec<Vec<u8>>)> {
        Engine::available()
            .into_iter()
            .map(|e| (e, lanes_on(e, key, blocks)))
            .collect()
    }

    fn lanes_on(
        engine: Engine,
        key: &[u8],
        blocks: &[(Vec<u8>, [u8; 16], Vec<u8>)],
    ) -> Vec<Vec<u8>> {
        let k = SivKey::with_engine(key, engine).expect("an available engine");
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
                for (engine, got) in lanes(&key, &blocks) {
                    for (b, g) in blocks.iter().zip(&got) {
                        assert_eq!(
                            *g,
                            reference(&key, &b.0, &b.1, &b.2),
                            "{engine:?}: pt {} aad {aad_len}",
                            b.2.len()
                        );
                    }
                }
            }
        }
    }

    /// Decrypts with the lanes: (authentic, plaintext) per stored block.
    /// Per stored block: whether it is authentic, and its plaintext.
    type Opened = Vec<(bool, Vec<u8>)>;

    fn open(key: &[u8], blocks: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Engine, Opened)> {
        Engine::available()
            .into_iter()
            .map(|e| (e, open_on(e, key, blocks)))
            .collect()
    }

    fn open_on(engine: Engine, key: &[u8], blocks: &[(Vec<u8>, Vec<u8>)]) -> Opened {
        let k = SivKey::with_engine(key, engine).expect("an available engine");
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
                for (engine, opened) in open(&key, &sealed) {
                    for (got, want) in opened.iter().zip(&plain) {
                        assert_eq!(
                            got,
                            &(true, want.2.clone()),
                            "{engine:?}: pt {}",
                            want.2.len()
                        );
                    }
                }
                for victim in 0..sealed.len() {
                    for at in [0, 16, 31, sealed[victim].1.len() - 1] {
                        let mut bad = sealed.clone();
                        bad[victim].1[at] ^= 1;
                        for (engine, opened) in open(&key, &bad) {
                            for (l, (ok, pt)) in opened.iter().enumerate() {
                                if l == victim {
                                    assert!(
                                        !ok,
                                        "{engine:?}: flipped byte {at} of lane {l} passed"
                                    );
                                    assert!(
                                        pt.iter().all(|b| *b == 0),
                                        "unauthentic plaintext kept"
                                    );
                                } else {
                                    assert_eq!((*ok, pt), (true, &plain[l].2), "{engine:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The tests above run every engine this CPU has; on an x86-64 CPU with AES-NI (and
    /// VAES) that must include the x86 engines, or they would test the portable one
    /// alone and pass.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_engine_the_cpu_has_is_tested() {
        let all = Engine::available();
        assert_eq!(all[0], Engine::Portable);
        assert_eq!(
            all.contains(&Engine::AesNi),
            is_x86_feature_detected!("aes") && is_x86_feature_detected!("ssse3")
        );
        assert_eq!(
            all.contains(&Engine::Vaes),
            all.contains(&Engine::AesNi)
                && is_x86_feature_detected!("vaes")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
        );
        assert_eq!(
            SivKey::with_engine(&[7u8; 64], Engine::best()).map(|k| k.engine()),
            Some(Engine::best())
        );
        eprintln!("engines on this CPU: {all:?}");
    }

    /// A content block and more, every length from one block under VAES's sixteen to
    /// past them, on the keystream's edges: each engine as the `aes-siv` crate.
    #[test]
    fn ctr_tails_equal_the_aes_siv_crate() {
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(13) ^ 0x5c).collect();
        for len in (15 * 16..18 * 16 + 1).chain([4095, 4096]) {
            let blocks: Vec<_> = (0..3u8)
                .map(|i| {
                    let pt: Vec<u8> = (0..len).map(|k| (k as u8).wrapping_mul(i + 3)).collect();
                    (vec![i; 24], [0xf0 | i; 16], pt)
                })
                .collect();
            for (engine, got) in lanes(&key, &blocks) {
                for (b, g) in blocks.iter().zip(&got) {
                    assert_eq!(
                        *g,
                        reference(&key, &b.0, &b.1, &b.2),
                        "{engine:?}: pt {len}"
                    );
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
            for (_, opened) in open(&key, &sealed) {
                for (got, b) in opened.iter().zip(&blocks) {
                    prop_assert_eq!(got, &(true, b.2.clone()));
                }
            }
        }

        #[test]
        fn any_blocks_equal_the_aes_siv_crate(
            key in proptest::collection::vec(any::<u8>(), 64),
            blocks in random_blocks(),
        ) {
            for (_, got) in lanes(&key, &blocks) {
                for (b, g) in blocks.iter().zip(&got) {
                    prop_assert_eq!(g.clone(), reference(&key, &b.0, &b.1, &b.2));
                }
            }
        }
    }
}
