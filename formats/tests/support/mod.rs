//! Helpers the reader tests share: qemu-img as the referee, and mapping walks. Each test file
//! uses a part of them.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use glimpse_formats::Image;

/// Runs qemu-img, asserts it succeeded and returns its stdout. A missing qemu-img fails the
/// test (it is on every machine of this kind).
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed for these tests");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a qemu-img command that prints JSON (`--output=json`).
pub fn qemu_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&qemu_img(args)).expect("qemu-img printed JSON")
}

/// The guest ranges `img` maps as not reading as zero, as merged `(start, end)` pairs,
/// asserting the mapping contract on every extent on the way.
pub fn data_ranges(img: &dyn Image) -> Vec<(u64, u64)> {
    let size = img.info().virtual_size;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = img.mapping(pos, u64::MAX).unwrap();
        glimpse_formats::validate_extent(&e, pos, u64::MAX, size).unwrap();
        if !e.reads_as_zero() {
            match out.last_mut() {
                Some(last) if last.1 == e.start => last.1 = e.end(),
                _ => out.push((e.start, e.end())),
            }
        }
        pos = e.end();
    }
    assert_eq!(pos, size);
    out
}

/// The ranges `qemu-img map -f <qemu_format>` calls data, as merged `(start, end)` pairs.
pub fn qemu_data_ranges(path: &Path, qemu_format: &str) -> Vec<(u64, u64)> {
    let p = path.to_str().expect("UTF-8 temp path");
    let map = qemu_json(&["map", "--output=json", "-f", qemu_format, p]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().expect("a map is an array") {
        if e["data"] == true {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = s + l,
                _ => out.push((s, s + l)),
            }
        }
    }
    out
}

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
