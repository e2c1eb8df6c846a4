//! qemu-img as the referee. Every helper fails the test when qemu-img is missing (it is on
//! every machine that runs these suites: `apt-get install qemu-utils`); none skips.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// The message a missing qemu-img fails with.
const MISSING: &str = "qemu-img must be installed for these tests (apt-get install qemu-utils)";

/// A path as a qemu-img argument.
fn arg(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Runs `qemu-img args` and returns what it did, whatever its exit status.
pub fn run(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().expect(MISSING)
}

/// Runs `qemu-img args`, asserts that it succeeded and returns its stdout.
pub fn img(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "qemu-img {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a qemu-img command that prints JSON (`--output=json`), asserting it succeeded.
pub fn json(args: &[&str]) -> Value {
    let text = img(args);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("qemu-img {} printed no JSON ({e}): {text}", args.join(" ")))
}

/// `qemu-img info --output=json`, with `-f qemu_format` when given (qemu's names: `vpc`).
pub fn info(path: &Path, qemu_format: Option<&str>) -> Value {
    let mut args = vec!["info", "--output=json"];
    if let Some(f) = qemu_format {
        args.extend(["-f", f]);
    }
    args.push(arg(path));
    json(&args)
}

/// The virtual size qemu-img reports for `path` opened as `qemu_format`.
pub fn virtual_size(path: &Path, qemu_format: &str) -> u64 {
    info(path, Some(qemu_format))["virtual-size"]
        .as_u64()
        .expect("qemu-img info has a virtual-size")
}

/// `qemu-img convert -f from -O to src dst`, asserting it succeeded. `extra` goes before the
/// paths (`-o cluster_size=4k`, `-c`).
pub fn convert(src: &Path, from: &str, dst: &Path, to: &str, extra: &[&str]) {
    let mut args = vec!["convert", "-f", from, "-O", to];
    args.extend_from_slice(extra);
    args.extend([arg(src), arg(dst)]);
    img(&args);
}

/// `qemu-img compare -f fa -F fb a b`: its exit code (0 identical, 1 different; 2 and up are
/// errors). A missing qemu-img or a death by signal fails the test.
pub fn compare(a: &Path, fa: &str, b: &Path, fb: &str) -> i32 {
    let out = run(&["compare", "-f", fa, "-F", fb, arg(a), arg(b)]);
    out.status
        .code()
        .unwrap_or_else(|| panic!("qemu-img compare died: {out:?}"))
}

/// Asserts that qemu-img calls the guest data of `a` and `b` identical.
pub fn assert_identical(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = run(&["compare", "-f", fa, "-F", fb, arg(a), arg(b)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check -f qemu_format path`: its exit code (0 clean, 1 check failed to run,
/// 2 corruption, 3 leaks only, 63 the format has no check).
pub fn check(path: &Path, qemu_format: &str) -> i32 {
    let out = run(&["check", "-f", qemu_format, arg(path)]);
    out.status
        .code()
        .unwrap_or_else(|| panic!("qemu-img check died: {out:?}"))
}

/// Asserts that `qemu-img check` finds no corruption and no leaks in `path`.
pub fn assert_clean(path: &Path, qemu_format: &str) {
    let out = run(&["check", "-f", qemu_format, arg(path)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ranges `qemu-img map -f qemu_format` calls data, as merged `(start, end)` pairs.
pub fn data_ranges(path: &Path, qemu_format: &str) -> Vec<(u64, u64)> {
    let map = json(&["map", "--output=json", "-f", qemu_format, arg(path)]);
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().expect("a map is an array") {
        if e["data"] == true {
            let s = e["start"].as_u64().expect("a start");
            let l = e["length"].as_u64().expect("a length");
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = s + l,
                _ => out.push((s, s + l)),
            }
        }
    }
    out
}
