//! LEB128 numbers (7 bits a byte, low first, the high bit set on all but the last), and
//! the front-coded paths made of them, in a run's walk ([`crate::verify::ViewWalk`]) and
//! in its index ([`crate::changes`]).

/// Appends `v`.
pub fn push(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Appends `path` front-coded against `prev` (the path written before it): the length
/// of what the two share, the length of the rest, and the rest. `prev` becomes `path`.
pub fn push_path(out: &mut Vec<u8>, prev: &mut Vec<u8>, path: &[u8]) {
    let shared = prev.iter().zip(path).take_while(|(a, b)| a == b).count();
    push(out, shared as u64);
    push(out, (path.len() - shared) as u64);
    out.extend_from_slice(&path[shared..]);
    prev.truncate(shared);
    prev.extend_from_slice(&path[shared..]);
}

/// Reads one number from `r`, handing each byte to `seen` too (a reader that sums
/// what it reads).
///
/// # Errors
/// Reading fails or ends inside the number (`UnexpectedEof`), or the number has more
/// than 64 bits (`InvalidData`).
pub fn read(r: &mut impl std::io::Read, mut seen: impl FnMut(u8)) -> std::io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let mut b = [0u8; 1];
        r.read_exact(&mut b)?;
        seen(b[0]);
        v |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "a number longer than 64 bits",
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trips_at_its_byte_edges() {
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u64::MAX] {
            let mut b = Vec::new();
            super::push(&mut b, v);
            for (i, x) in b.iter().enumerate() {
                assert_eq!(x & 0x80 != 0, i + 1 < b.len());
            }
            let mut seen = Vec::new();
            let got = super::read(&mut b.as_slice(), |x| seen.push(x)).unwrap();
            assert_eq!((got, &seen), (v, &b));
        }
        // Ten bytes with the high bit set: more than 64 bits.
        let e = super::read(&mut [0xffu8; 10].as_slice(), |_| {}).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        let e = super::read(&mut [0x80u8].as_slice(), |_| {}).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
