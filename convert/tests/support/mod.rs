//! Helpers the writer tests share: qemu-img as the referee, and deterministic data. Each test
//! file uses a part of them.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use glimpse_formats::Format;

/// Runs qemu-img; a missing qemu-img fails the test (it is on every machine of this kind).
pub fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed for these tests")
}

/// Runs a qemu-img command that prints JSON (`--output=json`), asserting it succeeded.
pub fn qemu_json(args: &[&str]) -> serde_json::Value {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img printed JSON")
}

/// `qemu-img info --output=json -f <format>`.
pub fn qemu_info(path: &Path, format: Format) -> serde_json::Value {
    let p = path.to_str().expect("UTF-8 temp path");
    qemu_json(&["info", "--output=json", "-f", format.qemu_name(), p])
}

/// The virtual size qemu-img reports for `path` opened as `format`.
pub fn qemu_virtual_size(path: &Path, format: Format) -> u64 {
    qemu_info(path, format)["virtual-size"]
        .as_u64()
        .expect("virtual-size")
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
