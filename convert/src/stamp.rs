//! Timestamps and identifiers written into image headers.
//!
//! When `SOURCE_DATE_EPOCH` is set (the reproducible-builds convention), timestamps are that
//! value and identifiers are derived from it, so the same conversion gives the same bytes
//! every time: a file output and a stdout output then compare equal byte for byte.

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// `SOURCE_DATE_EPOCH`, when set to a number.
pub fn source_date_epoch() -> Option<u64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

/// Seconds since the Unix epoch: `SOURCE_DATE_EPOCH`, or the clock.
pub fn now_secs() -> u64 {
    source_date_epoch().unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// Sixteen bytes for a UUID/GUID: random, or with `SOURCE_DATE_EPOCH` set, derived from it and
/// a per-process counter (so successive calls still differ).
pub fn id_bytes() -> [u8; 16] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut u = [0u8; 16];
    match source_date_epoch() {
        Some(epoch) => {
            for (i, half) in u.chunks_exact_mut(8).enumerate() {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                (epoch, n, i).hash(&mut h);
                half.copy_from_slice(&h.finish().to_le_bytes());
            }
        }
        None => {
            let ok = std::fs::File::open("/dev/urandom")
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut u))
                .is_ok();
            if !ok {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                u = (t ^ (u128::from(std::process::id()) << 64) ^ u128::from(n)).to_le_bytes();
            }
        }
    }
    u
}
