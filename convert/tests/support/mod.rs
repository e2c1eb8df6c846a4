//! Helpers the writer tests share: qemu-img as the referee (from the shared test kit), and
//! deterministic data. Each test file uses a part of them.
#![allow(dead_code)]

use std::path::Path;

use glimpse_formats::Format;

// qemu-img as the referee is the shared test kit's (glimpse-testkit).
#[allow(unused_imports)]
pub use glimpse_testkit::qemu::{json as qemu_json, run as qemu_img};

/// `qemu-img info --output=json -f <format>`.
pub fn qemu_info(path: &Path, format: Format) -> serde_json::Value {
    glimpse_testkit::qemu::info(path, Some(format.qemu_name()))
}

/// The virtual size qemu-img reports for `path` opened as `format`.
pub fn qemu_virtual_size(path: &Path, format: Format) -> u64 {
    glimpse_testkit::qemu::virtual_size(path, format.qemu_name())
}

/// `n` deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
