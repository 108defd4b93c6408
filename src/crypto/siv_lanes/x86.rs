//! The x86-64 engines: AES-NI with every chain and counter in a register, and VAES for
//! CTR. The rounds are written out with `core::arch` intrinsics, so a step of eight
//! CMAC chains is eight loads, sixteen xors and 112 AES instructions, with nothing
//! between the rounds.
//!
//! CTR counts in the counter block's last 32-bit word alone: SIV clears that word's top
//! bit in the IV ([`super::ctr_iv`]), so it cannot carry into the words before it
//! within 2^31 blocks, and a content block is 256 of them. `ctr` refuses more.

use super::{Cmac, Engine, Tails, LANES};
use std::arch::x86_64::*;
use zeroize::Zeroize;

/// The x86 engines this CPU runs, slowest first.
pub(super) fn available() -> Vec<Engine> {
    let mut all = Vec::new();
    if is_x86_feature_detected!("aes") && is_x86_feature_detected!("ssse3") {
        all.push(Engine::AesNi);
        if is_x86_feature_detected!("vaes")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
        {
            all.push(Engine::Vaes);
        }
    }
    all
}

/// AES-256 round keys of both halves of the SIV key, as bytes (so that they zeroize).
pub(super) struct NiKey {
    mac: [[u8; 16]; 15],
    ctr: [[u8; 16]; 15],
    vaes: bool,
}

impl Drop for NiKey {
    fn drop(&mut self) {
        self.mac.zeroize();
        self.ctr.zeroize();
    }
}

impl NiKey {
    /// `None` for the portable engine. The caller has checked that `engine` is
    /// [`available`].
    pub(super) fn new(key: &[u8], engine: Engine) -> Option<Self> {
        if engine == Engine::Portable {
            return None;
        }
        assert_eq!(key.len(), 64, "a 64-byte AES-SIV key");
        // SAFETY: AES-NI is available (`engine` is one of `available()`).
        let (mac, ctr) = unsafe { (expand(&key[..32]), expand(&key[32..])) };
        Some(NiKey {
            mac,
            ctr,
            vaes: engine == Engine::Vaes,
        })
    }

    pub(super) fn engine(&self) -> Engine {
        if self.vaes {
            Engine::Vaes
        } else {
            Engine::AesNi
        }
    }

    pub(super) fn cmac_engine(&self) -> NiCmac<'_> {
        NiCmac(self)
    }

    /// `output = input ^ keystream`, the keystream counting up from `iv`.
    ///
    /// # Panics
    /// Lengths that differ, or 2^31 blocks or more.
    pub(super) fn ctr(&self, input: &[u8], output: &mut [u8], iv: u128) {
        assert_eq!(input.len(), output.len());
        assert!(input.len() < 1 << 35, "CTR of 2^31 blocks or more");
        // SAFETY: the features each function enables are available (see `new`).
        unsafe {
            if self.vaes {
                ctr_vaes(&self.ctr, input, output, iv)
            } else {
                ctr_ni(&self.ctr, input, output, iv)
            }
        }
    }
}

/// S2V's CMAC on AES-NI.
pub(super) struct NiCmac<'k>(&'k NiKey);

impl Cmac for NiCmac<'_> {
    fn cmac(&mut self, tails: &Tails<'_>) -> [u128; LANES] {
        // SAFETY: AES-NI is available (see `NiKey::new`).
        unsafe { cmac_ni(&self.0.mac, tails) }
    }

    fn encrypt_one(&mut self, block: u128) -> u128 {
        // SAFETY: as above.
        unsafe {
            let rk = round_keys(&self.0.mac);
            let mut s = [load(&block.to_be_bytes())];
            rounds(&rk, &mut s);
            let mut out = [0u8; 16];
            _mm_storeu_si128(out.as_mut_ptr().cast(), s[0]);
            let v = u128::from_be_bytes(out);
            out.zeroize();
            v
        }
    }
}

/// 16 bytes into a register.
#[inline]
#[target_feature(enable = "sse2")]
unsafe fn load(b: &[u8]) -> __m128i {
    debug_assert!(b.len() >= 16);
    _mm_loadu_si128(b.as_ptr().cast())
}

#[inline]
#[target_feature(enable = "sse2")]
unsafe fn round_keys(k: &[[u8; 16]; 15]) -> [__m128i; 15] {
    let mut rk = [_mm_setzero_si128(); 15];
    for (r, k) in rk.iter_mut().zip(k) {
        *r = load(k);
    }
    rk
}

/// AES-256's key expansion (FIPS-197 §5.2) with `AESKEYGENASSIST`.
#[target_feature(enable = "aes")]
unsafe fn expand(key: &[u8]) -> [[u8; 16]; 15] {
    /// The round key four words after `prev`: each word of `prev` xored with the ones
    /// before it, then with `sub`'s word `W` (the assist's SubWord, rotated and with
    /// Rcon for even keys, plain for odd ones).
    #[inline]
    #[target_feature(enable = "aes")]
    unsafe fn next<const W: i32>(prev: __m128i, sub: __m128i) -> __m128i {
        let mut p = prev;
        p = _mm_xor_si128(p, _mm_slli_si128::<4>(p));
        p = _mm_xor_si128(p, _mm_slli_si128::<4>(p));
        p = _mm_xor_si128(p, _mm_slli_si128::<4>(p));
        _mm_xor_si128(p, _mm_shuffle_epi32::<W>(sub))
    }
    let mut rk = [_mm_setzero_si128(); 15];
    rk[0] = load(&key[..16]);
    rk[1] = load(&key[16..32]);
    // The round constant is an immediate: one line per constant.
    macro_rules! pair {
        ($i:literal, $rcon:literal) => {
            rk[$i] = next::<0xff>(rk[$i - 2], _mm_aeskeygenassist_si128::<$rcon>(rk[$i - 1]));
            rk[$i + 1] = next::<0xaa>(rk[$i - 1], _mm_aeskeygenassist_si128::<0>(rk[$i]));
        };
    }
    pair!(2, 0x01);
    pair!(4, 0x02);
    pair!(6, 0x04);
    pair!(8, 0x08);
    pair!(10, 0x10);
    pair!(12, 0x20);
    rk[14] = next::<0xff>(rk[12], _mm_aeskeygenassist_si128::<0x40>(rk[13]));
    let mut out = [[0u8; 16]; 15];
    for (o, r) in out.iter_mut().zip(rk.iter_mut()) {
        _mm_storeu_si128(o.as_mut_ptr().cast(), *r);
        *r = _mm_setzero_si128();
    }
    out
}

/// The 14 rounds of AES-256 on every block of `s`, interleaved.
#[inline]
#[target_feature(enable = "aes")]
unsafe fn rounds<const N: usize>(rk: &[__m128i; 15], s: &mut [__m128i; N]) {
    for b in s.iter_mut() {
        *b = _mm_xor_si128(*b, rk[0]);
    }
    for k in &rk[1..14] {
        for b in s.iter_mut() {
            *b = _mm_aesenc_si128(*b, *k);
        }
    }
    for b in s.iter_mut() {
        *b = _mm_aesenclast_si128(*b, rk[14]);
    }
}

/// CMAC of the eight lanes of `t`.
#[target_feature(enable = "aes")]
unsafe fn cmac_ni(key: &[[u8; 16]; 15], t: &Tails<'_>) -> [u128; LANES] {
    let rk = round_keys(key);
    let mut s = [_mm_setzero_si128(); LANES];
    let common = t.common();
    for j in 0..common {
        let at = j * 16;
        for (b, m) in s.iter_mut().zip(t.msgs.iter()) {
            // SAFETY: `j < common`, so `at + 16 <= t.at[l] <= m.len()`.
            *b = _mm_xor_si128(*b, _mm_loadu_si128(m.as_ptr().add(at).cast()));
        }
        rounds(&rk, &mut s);
    }
    let mut out = [0u128; LANES];
    let mut bytes = [0u8; 16];
    for j in common..t.steps() {
        for (l, b) in s.iter_mut().enumerate() {
            if j < t.n[l] {
                *b = _mm_xor_si128(*b, load(t.block(l, j)));
            }
        }
        rounds(&rk, &mut s);
        for (l, b) in s.iter().enumerate() {
            if j + 1 == t.n[l] {
                _mm_storeu_si128(bytes.as_mut_ptr().cast(), *b);
                out[l] = u128::from_be_bytes(bytes);
            }
        }
    }
    bytes.zeroize();
    out
}

/// Shuffles the last 32-bit word of a counter block between big-endian (as CTR uses it)
/// and little-endian (as `_mm_add_epi32` counts).
#[inline]
#[target_feature(enable = "sse2")]
unsafe fn last_word_swap() -> __m128i {
    _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 14, 13, 12)
}

/// CTR, eight counters per round, then what is left block by block.
#[target_feature(enable = "aes,ssse3")]
unsafe fn ctr_ni(key: &[[u8; 16]; 15], input: &[u8], output: &mut [u8], iv: u128) {
    let rk = round_keys(key);
    let swap = last_word_swap();
    let base = _mm_shuffle_epi8(load(&iv.to_be_bytes()), swap);
    let counter =
        |i: usize| _mm_shuffle_epi8(_mm_add_epi32(base, _mm_setr_epi32(0, 0, 0, i as i32)), swap);
    let full = input.len() / 16;
    let mut i = 0;
    while i + LANES <= full {
        let mut k = [_mm_setzero_si128(); LANES];
        for (b, k) in k.iter_mut().enumerate() {
            *k = counter(i + b);
        }
        rounds(&rk, &mut k);
        for (b, k) in k.iter().enumerate() {
            let at = (i + b) * 16;
            // SAFETY: block `i + b` is a full block of `input`, and `output` is as long.
            let p = _mm_loadu_si128(input.as_ptr().add(at).cast());
            _mm_storeu_si128(output.as_mut_ptr().add(at).cast(), _mm_xor_si128(*k, p));
        }
        i += LANES;
    }
    if i * 16 < input.len() {
        let mut k = [_mm_setzero_si128(); LANES];
        for (b, k) in k.iter_mut().enumerate() {
            *k = counter(i + b);
        }
        rounds(&rk, &mut k);
        let mut ks = [0u8; 16 * LANES];
        for (b, k) in k.iter().enumerate() {
            _mm_storeu_si128(ks.as_mut_ptr().add(b * 16).cast(), *k);
        }
        for ((o, p), k) in output[i * 16..].iter_mut().zip(&input[i * 16..]).zip(&ks) {
            *o = p ^ k;
        }
        ks.zeroize();
    }
}

/// CTR, sixteen counters per round in four 512-bit registers; the rest (under sixteen
/// blocks) as [`ctr_ni`].
#[target_feature(enable = "aes,ssse3,vaes,avx512f,avx512bw")]
unsafe fn ctr_vaes(key: &[[u8; 16]; 15], input: &[u8], output: &mut [u8], iv: u128) {
    const REGS: usize = 4;
    const PER: usize = 4 * REGS;
    let full = input.len() / 16;
    let mut i = 0;
    if full >= PER {
        let mut rk = [_mm512_setzero_si512(); 15];
        for (r, k) in rk.iter_mut().zip(key) {
            *r = _mm512_broadcast_i32x4(load(k));
        }
        let swap = _mm512_broadcast_i32x4(last_word_swap());
        // Four counters per register: +0 to +3 in the last word of each 128-bit lane.
        let mut c = _mm512_add_epi32(
            _mm512_broadcast_i32x4(_mm_shuffle_epi8(load(&iv.to_be_bytes()), last_word_swap())),
            _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3),
        );
        let four = _mm512_setr_epi32(0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4, 0, 0, 0, 4);
        while i + PER <= full {
            let mut k = [_mm512_setzero_si512(); REGS];
            for k in k.iter_mut() {
                *k = _mm512_shuffle_epi8(c, swap);
                c = _mm512_add_epi32(c, four);
            }
            for k in k.iter_mut() {
                *k = _mm512_xor_si512(*k, rk[0]);
            }
            for r in &rk[1..14] {
                for k in k.iter_mut() {
                    *k = _mm512_aesenc_epi128(*k, *r);
                }
            }
            for (z, k) in k.iter().enumerate() {
                let at = (i + 4 * z) * 16;
                let k = _mm512_aesenclast_epi128(*k, rk[14]);
                // SAFETY: blocks `i..i + PER` are full blocks of `input`; `output` is as
                // long.
                let p = _mm512_loadu_si512(input.as_ptr().add(at).cast());
                _mm512_storeu_si512(output.as_mut_ptr().add(at).cast(), _mm512_xor_si512(k, p));
            }
            i += PER;
        }
        for r in rk.iter_mut() {
            *r = _mm512_setzero_si512();
        }
    }
    ctr_ni(
        key,
        &input[i * 16..],
        &mut output[i * 16..],
        iv.wrapping_add(i as u128),
    );
}
