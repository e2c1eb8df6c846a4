//! Remote sources within the memory ceiling and the request budget (docs/remote.md): commands
//! that read one or two images at URLs of a real nginx (`scripts/nginx-testenv.sh`) stay within
//! 256 MiB of peak RSS (GNU time, as `cli/tests/memory.rs` measures it), and a layout that makes
//! the reader jump about costs a bounded number of requests.

mod remote_support;
mod support;

use std::path::PathBuf;

use remote_support::{nginx, run, scattered_vmdk, text, transfer_line, www};
use support::rss::{within, CEILING_KIB};

const BIN: &str = "remote_memory";

/// 160 MiB of incompressible bytes with a zero MiB in every five, once per test binary.
fn raw160() -> PathBuf {
    let path = www(BIN).join("data160.raw");
    if path.exists() {
        return path;
    }
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut bytes = Vec::with_capacity(160 << 20);
    for mib in 0..160 {
        if mib % 5 == 4 {
            bytes.resize(bytes.len() + (1 << 20), 0);
            continue;
        }
        for _ in 0..(1 << 17) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bytes.extend_from_slice(&x.to_le_bytes());
        }
    }
    let tmp = www(BIN).join("data160.raw.making");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// `www/name`: [`raw160`] converted by qemu-img to `format` with `opts` (tests run in
/// parallel and share the images: one maker at a time).
fn image160(name: &str, format: &str, opts: &[&str]) -> String {
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let raw = raw160();
    let out = www(BIN).join(name);
    if !out.exists() {
        let tmp = www(BIN).join(format!("{name}.making"));
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", format])
            .args(opts)
            .arg(&raw)
            .arg(&tmp)
            .status()
            .expect("qemu-img is required (Debian: qemu-utils)");
        assert!(st.success(), "qemu-img convert to {format}");
        std::fs::rename(&tmp, &out).unwrap();
    }
    format!("{}/{name}", nginx(BIN))
}

/// Remote-hostile F5: `compare URL URL` of two 160 MiB streamOptimized VMDKs peaked at
/// 272-297 MB: each source's page cache, 4 KiB allocations made and freed on several threads,
/// held far more than the 32 MiB charged for it. Every command here reads through the page
/// caches of one or two sources and the guest reader's caches of decompressed grains.
#[test]
fn remote_sources_stay_within_256_mib() {
    let so = ["-o", "subformat=streamOptimized"];
    let a = image160("a.vmdk", "vmdk", &so);
    let b = image160("b.vmdk", "vmdk", &so);
    let q = image160("c.qcow2", "qcow2", &["-c"]);
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("out");
    let o = o.to_str().unwrap();
    let local = www(BIN).join("b.vmdk");
    for (args, codes) in [
        (vec!["compare", &a, &b], &[0][..]),
        (vec!["compare", &a, &q], &[0]),
        (vec!["compare", &a, local.to_str().unwrap()], &[0]),
        (vec!["convert", "-O", "qcow2", &a, o], &[0]),
        (vec!["checksum", "--content", &a], &[0]),
        (vec!["checksum", &a], &[0]),
        (vec!["check", &a, &b, &q], &[0]),
    ] {
        within(&args, codes, CEILING_KIB, false);
    }
}

/// The request budget: an object of `S` bytes costs at most `4096 + S / 4 KiB + (4 S +
/// 64 MiB) / 256 KiB` requests, and a few more for the threads reading at once. The scattered
/// VMDK took 63,728 requests of 4 KiB (an hour over a link with 50 ms of latency).
#[test]
fn a_layout_that_makes_the_reader_jump_about_costs_a_bounded_number_of_requests() {
    let bytes = scattered_vmdk(160 << 10, 8209);
    let size = bytes.len() as u64;
    let path = www(BIN).join("scattered.vmdk");
    std::fs::write(&path, &bytes).unwrap();
    let url = format!("{}/scattered.vmdk", nginx(BIN));
    let o = run(&["check", "-v", &url]);
    let err = text(&o).1;
    let (requests, sent) = transfer_line(&err);
    eprintln!(
        "scattered check: {requests} requests, {sent} bytes, {:?}",
        o.status.code()
    );
    let bound = 4096 + size / 4096 + (4 * size + (64 << 20)) / (256 << 10);
    assert!(
        requests <= bound + 16,
        "{requests} requests > {bound}: {err}"
    );
    assert!(sent <= 4 * size + (64 << 20), "{sent} bytes for {size}");
    match o.status.code() {
        Some(0) => {}
        Some(2) => assert!(err.contains("jump around"), "{err}"),
        other => panic!("{other:?}: {err}"),
    }
}

/// Readers that already make large requests pay nothing for the request budget: a
/// front-to-back conversion reads the file about once, in about size / 4 MiB requests.
#[test]
fn the_request_budget_leaves_front_to_back_reading_alone() {
    let so = ["-o", "subformat=streamOptimized"];
    let a = image160("a.vmdk", "vmdk", &so);
    let size = std::fs::metadata(www(BIN).join("a.vmdk")).unwrap().len();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().join("out.raw");
    let r = run(&["convert", "-v", "-O", "raw", &a, o.to_str().unwrap()]);
    let err = text(&r).1;
    assert_eq!(r.status.code(), Some(0), "{err}");
    let (requests, sent) = transfer_line(&err);
    eprintln!("convert: {requests} requests, {sent} bytes");
    assert!(sent <= size + size / 50, "{sent} bytes for {size}: {err}");
    assert!(requests <= 4096, "{requests} requests: {err}");
}
