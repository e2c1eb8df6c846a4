//! Helpers the reader tests share: qemu-img as the referee, and mapping walks (both from the
//! shared test kit), and sparse sources. Each test file uses a part of them.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

// qemu-img as the referee and the mapping walk are the shared test kit's (glimpse-testkit),
// under the names these tests have always used.
#[allow(unused_imports)]
pub use glimpse_testkit::qemu::{
    data_ranges as qemu_data_ranges, img as qemu_img, json as qemu_json,
};
#[allow(unused_imports)]
pub use glimpse_testkit::walk::data_ranges;

/// A sparse raw file `src-<seed>.raw` of `size` bytes in `dir`: runs of 70,000 pseudo-random
/// bytes (fewer at the end) at the start, across the 3 MiB mark, at 4 MiB, in the middle and
/// at the end, where they fall inside the file; holes elsewhere.
pub fn raw_source(dir: &Path, size: u64, seed: u64) -> PathBuf {
    let p = dir.join(format!("src-{seed}.raw"));
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let spots = [
        0,
        3 * 1024 * 1024 + 100,
        4 << 20,
        size / 2,
        size.saturating_sub(5000),
    ];
    for at in spots.into_iter().filter(|&at| at < size) {
        let n = (size - at).min(70_000) as usize;
        let data: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all_at(&data, at).unwrap();
    }
    p
}
