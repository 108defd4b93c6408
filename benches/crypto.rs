//! Throughput of the content transform alone (no FUSE, no I/O), single core and all
//! cores: the ceiling the view's read path can reach. `cargo bench --bench crypto`.

use rayon::prelude::*;
use snapveil::crypto::content::{encrypt_block, FileIvs};
use snapveil::crypto::{Flags, Keys, MasterKey, NameMode};
use std::time::Instant;

fn main() {
    let keys = Keys::new(
        &MasterKey::random(),
        Flags {
            names: NameMode::DirIv,
            hkdf: true,
            long_names: true,
            long_name_max: 255,
        },
    );
    let ivs = FileIvs::for_cpath(b"bench/file");
    let total: usize = 512 << 20;
    let pt = vec![0x5au8; 1 << 20];
    let mut ct = vec![0u8; (1 << 20) + 32 * 256];
    for (label, parallel) in [("1 core", false), ("all cores", true)] {
        let start = Instant::now();
        for round in 0..(total >> 20) {
            let base = round as u64 * 256;
            let work = |(i, (c, p)): (usize, (&mut [u8], &[u8]))| {
                let n = base + i as u64;
                encrypt_block(&keys, n, Some(&ivs.file_id), &ivs.nonce(n), p, c);
            };
            if parallel {
                ct.par_chunks_mut(4128)
                    .zip(pt.par_chunks(4096))
                    .enumerate()
                    .for_each(work);
            } else {
                ct.chunks_mut(4128)
                    .zip(pt.chunks(4096))
                    .enumerate()
                    .for_each(work);
            }
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "AES-SIV-512 content encryption, {label}: {:.0} MB/s",
            total as f64 / secs / 1e6
        );
    }
}
