//! Helpers the CLI tests share: running the built binary and reading its JSON. Each test file
//! uses a part of them (the upload tests' Glance harness is `upload_support`).
#![allow(dead_code)]

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
