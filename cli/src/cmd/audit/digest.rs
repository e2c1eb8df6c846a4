//! `--verify-digests`: the stored data streamed once, through md5 (Glance's `checksum`) and
//! the `os_hash_algo` digest (`os_hash_value`), in fixed-size blocks.

use std::io::{ErrorKind, Read};

use md5::{Digest as _, Md5};
use sha2::{Sha256, Sha384, Sha512};

use crate::cmd::upload::glance::hex;

/// Bytes read per call: one buffer per worker.
const BLOCK: usize = 256 << 10;

/// The multihash algorithms glimpse verifies (Glance's `hashing_algorithm` choices that
/// deployments use).
enum Multi {
    Sha256(Sha256),
    Sha384(Sha384),
    Sha512(Sha512),
    None,
}

/// What the stream gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    /// md5, hex.
    pub md5: String,
    /// The `os_hash_algo` digest, hex, when the algorithm is one glimpse computes.
    pub multihash: Option<String>,
    /// Bytes read.
    pub bytes: u64,
    /// True when the stream held more than `limit` bytes (reading stopped there).
    pub longer: bool,
}

/// Reads `r` to its end, or to `limit + 1` bytes (the stored size plus one, to notice a longer
/// object without reading an unbounded stream), digesting every byte.
///
/// # Errors
/// Read errors.
pub fn stream(r: &mut dyn Read, algo: Option<&str>, limit: u64) -> std::io::Result<Streamed> {
    let mut md5 = Md5::new();
    let mut multi = match algo {
        Some("sha256") => Multi::Sha256(Sha256::new()),
        Some("sha384") => Multi::Sha384(Sha384::new()),
        Some("sha512") => Multi::Sha512(Sha512::new()),
        _ => Multi::None,
    };
    let mut buf = vec![0u8; BLOCK];
    let mut bytes: u64 = 0;
    let cap = limit.saturating_add(1);
    loop {
        let room = usize::try_from(cap.saturating_sub(bytes))
            .unwrap_or(BLOCK)
            .min(BLOCK);
        if room == 0 {
            break;
        }
        let Some(window) = buf.get_mut(..room) else {
            break;
        };
        let n = match r.read(window) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let Some(data) = window.get(..n) else { break };
        md5.update(data);
        match &mut multi {
            Multi::Sha256(h) => h.update(data),
            Multi::Sha384(h) => h.update(data),
            Multi::Sha512(h) => h.update(data),
            Multi::None => {}
        }
        bytes = bytes.saturating_add(n as u64);
    }
    let multihash = match multi {
        Multi::Sha256(h) => Some(hex(&h.finalize())),
        Multi::Sha384(h) => Some(hex(&h.finalize())),
        Multi::Sha512(h) => Some(hex(&h.finalize())),
        Multi::None => None,
    };
    Ok(Streamed {
        md5: hex(&md5.finalize()),
        multihash,
        bytes,
        longer: bytes > limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_every_byte_and_stops_past_the_limit() {
        let data: Vec<u8> = (0..(3 * BLOCK + 7)).map(|i| (i % 253) as u8).collect();
        let s = stream(&mut &data[..], Some("sha512"), data.len() as u64).unwrap();
        assert_eq!(s.md5, hex(&Md5::digest(&data)));
        assert_eq!(s.multihash, Some(hex(&Sha512::digest(&data))));
        assert_eq!(s.bytes, data.len() as u64);
        assert!(!s.longer);
        let s = stream(&mut &data[..], Some("sha256"), 100).unwrap();
        assert_eq!(s.bytes, 101);
        assert!(s.longer);
        assert_eq!(s.multihash.as_deref().map(str::len), Some(64));
        assert_eq!(
            stream(&mut &data[..], Some("md4"), 10).unwrap().multihash,
            None
        );
    }
}
