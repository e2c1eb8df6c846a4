//! `convert --copy auto|kernel|readwrite|off` (issue 15): with header timestamps and
//! identifiers made reproducible (SOURCE_DATE_EPOCH), the kernel copy, the paired copy (the
//! default into ext4) and the read/write fallback write the same file byte for byte for every
//! uncompressed output format, and the path that reads
//! every chunk into memory writes the same guest bytes (qemu-img compare). The progress
//! stream's last event says how the bytes moved.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use support::qemu::run as qemu_img;
use support::s;

fn convert(mode: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["convert", "--progress", "json", "--copy", mode])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "convert --copy {mode} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `done` event of `--progress json`.
fn done(out: &Output) -> Value {
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("\"event\":\"done\""))
        .unwrap_or_else(|| panic!("no done event in {err}"));
    serde_json::from_str(line).unwrap()
}

/// 24 MiB: runs of pseudo-random data, written zeros and holes.
fn make_source(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    for i in 0..384u64 {
        let mut c = vec![0u8; 65536];
        match i % 7 {
            0 | 3 => {} // written zeros
            5 => c[65535] = 1,
            _ => c.iter_mut().for_each(|b| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }),
        }
        if i % 50 < 10 {
            continue; // a hole
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &c, i * 65536).unwrap();
    }
    f.set_len(384 * 65536).unwrap();
    f.flush().unwrap();
}

#[test]
fn kernel_copy_and_fallback_write_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_source(&src);
    let qsrc = dir.path().join("src.qcow2");
    let q = qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&src), s(&qsrc)]);
    assert!(q.status.success());
    let outputs: &[(&str, &str, &str)] = &[
        ("raw", "", "raw"),
        ("qcow2", "", "qcow2"),
        ("vhd", "subformat=dynamic", "vpc"),
        ("vhd", "subformat=fixed", "vpc"),
        ("vhdx", "", "vhdx"),
        ("vdi", "", "vdi"),
        ("vdi", "static=on", "vdi"),
        ("ploop", "", "parallels"),
    ];
    for source in [&src, &qsrc] {
        for &(fmt, opts, qemu_fmt) in outputs {
            let what = format!("{} -> {fmt} {opts}", s(source));
            let mut files = Vec::new();
            for mode in ["kernel", "readwrite", "off", "auto"] {
                let out = dir.path().join(format!("out-{mode}"));
                let mut args = vec!["-O", fmt];
                if !opts.is_empty() {
                    args.extend(["-o", opts]);
                }
                args.extend([s(source), s(&out)]);
                let ev = done(&convert(mode, &args));
                let (kernel, buffer) = (ev["kernel_copied"].as_u64(), ev["buffer_copied"].as_u64());
                let paired = ev["paired_copied"].as_u64();
                match mode {
                    "kernel" => assert!(
                        kernel > Some(0) && buffer == Some(0) && paired == Some(0),
                        "{what}: {ev}"
                    ),
                    "readwrite" => assert!(
                        kernel == Some(0) && buffer > Some(0) && paired == Some(0),
                        "{what}: {ev}"
                    ),
                    // Paired into ext4, the kernel's elsewhere: one of them.
                    "auto" => assert!(
                        (kernel > Some(0)) != (paired > Some(0)) && buffer == Some(0),
                        "{what}: {ev}"
                    ),
                    _ => assert!(
                        kernel == Some(0) && buffer == Some(0) && paired == Some(0),
                        "{what}: {ev}"
                    ),
                }
                let c = qemu_img(&["compare", "-f", "raw", "-F", qemu_fmt, s(&src), s(&out)]);
                assert!(
                    c.status.success(),
                    "{what} --copy {mode}: {}",
                    String::from_utf8_lossy(&c.stdout)
                );
                files.push(std::fs::read(&out).unwrap());
            }
            assert!(
                files[0] == files[1],
                "{what}: kernel and readwrite files differ"
            );
            assert!(files[0] == files[3], "{what}: kernel and auto files differ");
            assert_eq!(files[0].len(), files[2].len(), "{what}");
        }
    }
}

#[test]
fn compressed_outputs_never_copy_and_mixed_sources_copy_only_stored_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_source(&src);
    let out = dir.path().join("o");
    for args in [
        vec!["-c", "-O", "qcow2", s(&src), s(&out)],
        vec![
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&src),
            s(&out),
        ],
    ] {
        let ev = done(&convert("auto", &args));
        assert_eq!(ev["kernel_copied"], 0, "{args:?}");
        assert_eq!(ev["buffer_copied"], 0, "{args:?}");
        assert_eq!(ev["paired_copied"], 0, "{args:?}");
    }
    // qemu-img -c stores the clusters of random bytes uncompressed (they do not shrink) and
    // compresses the one-byte clusters: a conversion copies the first and decompresses the
    // second, in the same batches.
    let zsrc = dir.path().join("z.qcow2");
    let q = qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&src),
        s(&zsrc),
    ]);
    assert!(q.status.success());
    let ev = done(&convert("kernel", &["-O", "qcow2", s(&zsrc), s(&out)]));
    let copied = ev["kernel_copied"].as_u64().unwrap();
    let read = ev["read"].as_u64().unwrap();
    assert!(copied > 0 && copied < read, "{ev}");
    let c = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&src), s(&out)]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
}
