//! Throughput of the content transform alone (no FUSE, no I/O), single core and all
//! cores, block by block (the `aes-siv` crate) and eight blocks at a time (what the view
//! uses): the ceiling the view's read path can reach; then decryption on one core (what
//! `decrypt` and `restore` do), block by block and eight at a time.
//! `cargo bench --bench crypto`. Last, each AES engine this CPU runs, on one core, for
//! whole reads and for small files.

use rayon::prelude::*;
use snapveil::crypto::content::{
    decrypt_block, decrypt_blocks, encrypt_block, encrypt_blocks, FileIvs, LANES,
};
use snapveil::crypto::{Engine, Flags, Keys, MasterKey, NameMode};
use std::time::Instant;

const FLAGS: Flags = Flags {
    names: NameMode::DirIv,
    hkdf: true,
    long_names: true,
    long_name_max: 255,
};

fn main() {
    let master = MasterKey::random();
    let keys = Keys::new(&master, FLAGS);
    println!("engine: {:?} (of {:?})", keys.engine(), Engine::available());
    let ivs = FileIvs::for_cpath(b"bench/file");
    let total: usize = 512 << 20;
    let pt = vec![0x5au8; 1 << 20];
    let mut ct = vec![0u8; (1 << 20) + 32 * 256];
    let group = 4096 * LANES;
    let cgroup = 4128 * LANES;
    for (label, parallel, laned) in [
        ("block by block, 1 core", false, false),
        ("block by block, all cores", true, false),
        ("eight blocks at a time, 1 core", false, true),
        ("eight blocks at a time, all cores", true, true),
    ] {
        let start = Instant::now();
        for round in 0..(total >> 20) {
            let base = round as u64 * 256;
            let one = |(i, (c, p)): (usize, (&mut [u8], &[u8]))| {
                let n = base + i as u64;
                encrypt_block(&keys, n, Some(&ivs.file_id), &ivs.nonce(n), p, c);
            };
            let eight = |(i, (c, p)): (usize, (&mut [u8], &[u8]))| {
                encrypt_blocks(&keys, base + (i * LANES) as u64, &ivs, p, c);
            };
            match (parallel, laned) {
                (false, false) => ct
                    .chunks_mut(4128)
                    .zip(pt.chunks(4096))
                    .enumerate()
                    .for_each(one),
                (true, false) => ct
                    .par_chunks_mut(4128)
                    .zip(pt.par_chunks(4096))
                    .enumerate()
                    .for_each(one),
                (false, true) => ct
                    .chunks_mut(cgroup)
                    .zip(pt.chunks(group))
                    .enumerate()
                    .for_each(eight),
                (true, true) => ct
                    .par_chunks_mut(cgroup)
                    .zip(pt.par_chunks(group))
                    .enumerate()
                    .for_each(eight),
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "AES-SIV-512 content encryption, {label}: {:.0} MB/s",
            total as f64 / secs / 1e6
        );
    }
    // The last round's ciphertext: blocks 256 * (rounds - 1).. .
    let base = ((total >> 20) as u64 - 1) * 256;
    let mut out = Vec::with_capacity(pt.len());
    for (label, laned) in [("block by block", false), ("eight blocks at a time", true)] {
        let start = Instant::now();
        for _ in 0..(total >> 20) {
            out.clear();
            if laned {
                decrypt_blocks(&keys, base, Some(&ivs.file_id), &ct, &mut out).expect("authentic");
            } else {
                for (i, c) in ct.chunks(4128).enumerate() {
                    let p = decrypt_block(&keys, base + i as u64, Some(&ivs.file_id), c)
                        .expect("authentic");
                    out.extend_from_slice(&p);
                }
            }
            assert_eq!(out, pt);
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "AES-SIV-512 content decryption, {label}, 1 core: {:.0} MB/s",
            total as f64 / secs / 1e6
        );
    }
    // Each engine on one core: whole 1 MiB reads, and files of 15 KiB (four blocks, the
    // bench tree's mean), each file on its own as the view encrypts it.
    let mut small = vec![0u8; 2 * pt.len()];
    for engine in Engine::available() {
        let keys = Keys::with_engine(&master, FLAGS, engine).expect("available");
        for (label, file) in [("1 MiB reads", 1usize << 20), ("15 KiB files", 15 << 10)] {
            let start = Instant::now();
            for _ in 0..(total >> 20) {
                let mut at = 0;
                for p in pt.chunks(file) {
                    let clen = p.len() + 32 * p.len().div_ceil(4096);
                    encrypt_blocks(&keys, 0, &ivs, p, &mut small[at..at + clen]);
                    at += clen;
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "AES-SIV-512 content encryption, {engine:?} engine, {label}, 1 core: {:.0} MB/s",
                total as f64 / secs / 1e6
            );
        }
    }
}
