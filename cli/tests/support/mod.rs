//! Helpers the CLI tests share: running the built binary and reading its JSON. Each test file
//! uses a part of them (the upload tests' Glance harness is `upload_support`).
#![allow(dead_code)]

pub mod rss;
pub mod schema;

/// qemu-img as the referee: the shared test kit's helpers.
#[allow(unused_imports)]
pub use glimpse_testkit::qemu;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// Runs the `glimpse` binary this package built.
pub fn glimpse(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(args)
        .output()
        .expect("run glimpse")
}

/// A temp path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The JSON a command printed, or a panic showing what it printed instead.
pub fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The finding codes of a check report, in order.
pub fn codes(v: &Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

/// The content digest `glimpse checksum --content` prints for one file (it must succeed).
pub fn content_digest(path: &Path) -> String {
    let o = glimpse(&["checksum", "--content", "--output", "json", s(path)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json_of(&o);
    let d = v.get(0).unwrap_or(&v);
    d["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content digest in {v}"))
        .to_string()
}

/// The descriptors process `pid` holds open on files in `dir` that have no name: `O_TMPFILE` files, which
/// /proc shows as `DIR/#INODE (deleted)`. Proves that an output being written is one.
pub fn unnamed_files_in(pid: u32, dir: &Path) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    fds.flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| {
            let t = t.to_string_lossy();
            t.strip_prefix(&*dir.to_string_lossy())
                .and_then(|r| r.strip_prefix("/#"))
                .is_some_and(|r| r.ends_with(" (deleted)"))
        })
        .count()
}

/// Waits up to two minutes until `pid` holds an unnamed file in `dir`; panics otherwise.
pub fn wait_for_unnamed_file(pid: u32, dir: &Path) {
    let start = std::time::Instant::now();
    while unnamed_files_in(pid, dir) == 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(120),
            "no unnamed temporary file appeared in {}",
            dir.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A qcow2 v3 file of five 64 KiB clusters whose one L2 table alternates unallocated and
/// zero entries, named by all `n` L1 entries (its refcount is `n`, the entries have no COPIED
/// flag, as snapshots leave them): it passes `check`, and every guest cluster is a run of its
/// own, `n` × 8192 runs from 320 KiB (docs/memory.md; the mem-amp review's `shared`
/// construction). `n` is at most 8192 (one L1 cluster).
pub fn shared_l2_qcow2(path: &Path, n: u32) {
    const CS: u64 = 1 << 16;
    const EPT: u64 = CS / 8;
    assert!(n >= 1 && u64::from(n) <= EPT);
    let mut f = vec![0u8; 5 * CS as usize];
    let mut h = Vec::new();
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes()); // no backing file
    h.extend_from_slice(&0u32.to_be_bytes());
    h.extend_from_slice(&16u32.to_be_bytes()); // cluster bits
    h.extend_from_slice(&(u64::from(n) * EPT * CS).to_be_bytes()); // virtual size
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&n.to_be_bytes()); // L1 entries
    h.extend_from_slice(&CS.to_be_bytes()); // L1 at cluster 1
    h.extend_from_slice(&(2 * CS).to_be_bytes()); // refcount table at cluster 2
    h.extend_from_slice(&1u32.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no snapshots
    h.extend_from_slice(&0u64.to_be_bytes());
    h.extend_from_slice(&[0u8; 24]); // incompatible, compatible, autoclear features
    h.extend_from_slice(&4u32.to_be_bytes()); // 16-bit refcounts
    h.extend_from_slice(&104u32.to_be_bytes()); // header length
    f[..h.len()].copy_from_slice(&h); // then zeros: the end of the extensions
    for i in 0..n as usize {
        let at = CS as usize + 8 * i;
        f[at..at + 8].copy_from_slice(&(4 * CS).to_be_bytes());
    }
    let rt = 2 * CS as usize;
    f[rt..rt + 8].copy_from_slice(&(3 * CS).to_be_bytes());
    let rb = 3 * CS as usize;
    for (i, r) in [1u16, 1, 1, 1, n as u16].iter().enumerate() {
        f[rb + 2 * i..rb + 2 * i + 2].copy_from_slice(&r.to_be_bytes());
    }
    let l2 = 4 * CS as usize;
    for i in (1..EPT as usize).step_by(2) {
        f[l2 + 8 * i..l2 + 8 * i + 8].copy_from_slice(&1u64.to_be_bytes());
    }
    std::fs::write(path, f).unwrap();
}
