//! Throughput of raw ZFS mode's age encryption alone (no `zfs send`, no I/O), on one
//! core, through the same encryptor and 1 MiB copy buffer a run uses: issue 15 asks that
//! it never be the bottleneck of a send (at least 1 GB/s). `cargo bench --bench age`.

use snapveil::config::RawOptions;
use snapveil::zfs_send::age_io;
use std::io::Write;
use std::time::Instant;

/// Counts what age writes and drops it: the sink of the measurement.
struct Sink(u64);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() {
    let id = age::x25519::Identity::generate();
    let opts = RawOptions {
        age_recipients: vec![id.to_public().to_string()],
        ..Default::default()
    };
    let total: u64 = 2 << 30;
    // Not zeros: a stream of ZFS records is incompressible enough that it does not matter
    // to ChaCha20-Poly1305, but keep the input honest anyway.
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut best = 0f64;
    for _ in 0..3 {
        let mut sink = Sink(0);
        let start = Instant::now();
        let mut w = age_io::encryptor(&opts)
            .expect("encryptor")
            .wrap_output(&mut sink)
            .expect("age header");
        for _ in 0..(total >> 20) {
            w.write_all(&chunk).expect("write");
        }
        w.finish().expect("finish");
        let secs = start.elapsed().as_secs_f64();
        assert!(sink.0 > total, "age wrote less than its input");
        best = best.max(total as f64 / secs / 1e6);
    }
    println!("age (X25519 recipient, ChaCha20-Poly1305 STREAM), 1 core: {best:.0} MB/s (best of 3, 2 GiB each)");
}
