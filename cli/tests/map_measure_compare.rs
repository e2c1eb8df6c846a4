//! `map`, `measure` and `compare` against their referee, qemu-img (the mmc-diff campaign):
//!
//! - measure: stored ranges whose bytes lie in holes of the source file (preallocated qcow2,
//!   static VDI, fixed VHD) need no space, as in `qemu-img measure`, and `required` still
//!   holds what `convert` writes;
//! - map: the JSON fields (`present`, `offset`, `data`/`zero` over file holes) are qemu's;
//! - compare: `-s` compares block status as qemu-img does; the offset named is the exact
//!   byte, qemu's the start of its sector (documented).
//!
//! qemu-img must be installed: the tests fail without it.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;
use support::qemu::{img as qemu_img, json as qemu_json, run as qemu_run};
use support::{glimpse, json_of, s};

/// A 4 MiB raw file with one byte at 0 and one at 3 MiB, holes elsewhere.
fn sparse_raw(dir: &Path) -> PathBuf {
    let p = dir.join("r.raw");
    let mut f = std::fs::File::create(&p).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all(&[0x5a]).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a], 3 << 20).unwrap();
    p
}

/// Empty images whose every cluster or block is stored, in holes of the file: qcow2 with
/// preallocated metadata, a static VDI, a fixed VHD. With their qemu format names.
fn preallocated(dir: &Path, size: &str) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    for (name, fmt, opt) in [
        ("p.qcow2", "qcow2", "preallocation=metadata"),
        ("s.vdi", "vdi", "static=on"),
        ("f.vhd", "vpc", "subformat=fixed"),
    ] {
        let p = dir.join(name);
        qemu_img(&["create", "-q", "-f", fmt, "-o", opt, s(&p), size]);
        out.push((p, fmt));
    }
    out
}

fn measure(args: &[&str]) -> Value {
    let mut a = vec!["measure", "--output", "json"];
    a.extend_from_slice(args);
    let out = glimpse(&a);
    assert!(out.status.success(), "measure {args:?}: {out:?}");
    json_of(&out)
}

fn glimpse_map(p: &Path) -> Vec<Value> {
    let out = glimpse(&["map", "--output", "json", s(p)]);
    assert!(out.status.success(), "map {p:?}: {out:?}");
    json_of(&out).as_array().unwrap().clone()
}

fn qemu_map(p: &Path, fmt: &str) -> Vec<Value> {
    qemu_json(&["map", "--output=json", "-f", fmt, s(p)])
        .as_array()
        .unwrap()
        .clone()
}

/// The JSON fields both tools print, one object per extent (a missing `offset` as null).
fn fields(map: &[Value]) -> Vec<Vec<Value>> {
    let keys = [
        "start",
        "length",
        "depth",
        "present",
        "zero",
        "data",
        "compressed",
        "offset",
    ];
    map.iter()
        .map(|e| keys.iter().map(|k| e[*k].clone()).collect())
        .collect()
}

/// F1: allocated but in a hole of the file reads as zeros and needs no space. `required`
/// equals qemu-img measure's, for sources with and without data, and what convert then
/// writes fits in it.
#[test]
fn measure_counts_no_space_for_stored_ranges_in_file_holes() {
    let d = tempfile::tempdir().unwrap();
    let mut sources = preallocated(d.path(), "64M");
    // The same three with two data bytes: the clusters holding them count, the rest not.
    let raw = sparse_raw(d.path());
    for (name, fmt, opt) in [
        ("pd.qcow2", "qcow2", "preallocation=metadata"),
        ("sd.vdi", "vdi", "static=on"),
        ("fd.vhd", "vpc", "subformat=fixed"),
    ] {
        let p = d.path().join(name);
        qemu_img(&["convert", "-f", "raw", "-O", fmt, "-o", opt, s(&raw), s(&p)]);
        sources.push((p, fmt));
    }
    for (src, fmt) in &sources {
        for (out_fmt, opts) in [("qcow2", ""), ("qcow2", "cluster_size=4096"), ("raw", "")] {
            let mut g = vec!["-O", out_fmt];
            let mut q = vec!["measure", "--output=json", "-f", fmt, "-O", out_fmt];
            if !opts.is_empty() {
                g.extend(["-o", opts]);
                q.extend(["-o", opts]);
            }
            g.push(s(src));
            q.push(s(src));
            let mine = measure(&g);
            let theirs = qemu_json(&q);
            assert_eq!(
                mine["required"], theirs["required"],
                "{src:?} -O {out_fmt} {opts}: {mine} vs qemu {theirs}"
            );
            assert_eq!(mine["fully-allocated"], theirs["fully-allocated"]);
            if out_fmt == "qcow2" {
                let dst = d.path().join("out.qcow2");
                let _ = std::fs::remove_file(&dst);
                let mut c = vec!["convert", "-O", "qcow2"];
                if !opts.is_empty() {
                    c.extend(["-o", opts]);
                }
                c.extend([s(src), s(&dst)]);
                let out = glimpse(&c);
                assert!(out.status.success(), "{out:?}");
                let len = std::fs::metadata(&dst).unwrap().len();
                assert!(
                    len <= mine["required"].as_u64().unwrap(),
                    "{src:?}: convert wrote {len} bytes, measure said {mine}"
                );
            }
        }
    }
    // 64 MiB stored in holes: a few hundred KiB, not the 64 MiB the stored clusters add up to.
    let m = measure(&["-O", "qcow2", s(&sources[0].0)]);
    assert!(m["required"].as_u64().unwrap() < 1 << 20, "{m}");
}

/// F1 and F4: `map --output json` prints what `qemu-img map --output=json` prints, field by
/// field: stored ranges in file holes of raw, preallocated qcow2, static VDI and fixed VHD are
/// `data` and `zero` with their offset; raw holes keep their offset; unallocated VDI and VHD
/// blocks are present; unallocated qcow2, VMDK and parallels clusters are not.
#[test]
fn map_fields_agree_with_qemu_img_map() {
    let d = tempfile::tempdir().unwrap();
    let raw = sparse_raw(d.path());
    let mut images = vec![(raw.clone(), "raw")];
    images.extend(preallocated(d.path(), "4M"));
    for (name, fmt, opt) in [
        ("r.qcow2", "qcow2", ""),
        ("r.vdi", "vdi", ""),
        ("rs.vdi", "vdi", "static=on"),
        ("r.vhd", "vpc", ""),
        ("rf.vhd", "vpc", "subformat=fixed"),
        ("r.vmdk", "vmdk", ""),
        ("r.ploop", "parallels", ""),
        ("rm.qcow2", "qcow2", "preallocation=metadata"),
    ] {
        let p = d.path().join(name);
        let mut a = vec!["convert", "-f", "raw", "-O", fmt];
        if !opt.is_empty() {
            a.extend(["-o", opt]);
        }
        a.extend([s(&raw), s(&p)]);
        qemu_img(&a);
        images.push((p, fmt));
    }
    for (p, fmt) in &images {
        let mine = glimpse_map(p);
        let theirs = qemu_map(p, fmt);
        assert_eq!(
            fields(&mine),
            fields(&theirs),
            "{p:?} ({fmt}):\nglimpse {mine:?}\nqemu    {theirs:?}"
        );
    }
    // The class itself: a preallocated qcow2 of 4 MiB is one stored run that reads as zeros.
    let m = glimpse_map(&images[1].0);
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(
        (&m[0]["data"], &m[0]["zero"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
}

/// The human map names a stored range in a hole `hole`, with its offset in the file.
#[test]
fn human_map_names_stored_holes() {
    let d = tempfile::tempdir().unwrap();
    let (p, _) = preallocated(d.path(), "4M").remove(0);
    let out = glimpse(&["map", s(&p)]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().nth(1).unwrap();
    assert!(line.ends_with(" hole"), "{text}");
    assert!(line.contains("0x50000"), "{text}");
}

/// F2: `compare -s` compares what `qemu-img compare -s` compares: sizes, then block status
/// (allocated, zero, data, offset known, end of disk reached) and content offset by offset.
/// Each pair here prints what qemu-img prints, with its exit code.
#[test]
fn strict_compare_agrees_with_qemu_img() {
    let d = tempfile::tempdir().unwrap();
    let p = |n: &str| d.path().join(n);
    let mut data = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(p("d.raw"), &data).unwrap();
    // Zeros written as data, and an empty qcow2 (the campaign's reproducer).
    std::fs::write(p("z.raw"), vec![0u8; 1 << 20]).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p("e.qcow2")), "1M"]);
    qemu_img(&["create", "-q", "-f", "raw", s(&p("h.raw")), "1M"]);
    // Same content, other formats.
    for (n, fmt, opt) in [
        ("d.qcow2", "qcow2", "cluster_size=4096"),
        ("d.vdi", "vdi", "static=off"),
        ("d.vhdx", "vhdx", "block_size=1M"),
        ("d.ploop", "parallels", "cluster_size=1M"),
    ] {
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            fmt,
            "-o",
            opt,
            s(&p("d.raw")),
            s(&p(n)),
        ]);
    }
    // The same data stored back to front: two runs, so the first does not reach the end.
    std::fs::write(p("lo.bin"), &data[..1 << 19]).unwrap();
    std::fs::write(p("hi.bin"), &data[1 << 19..]).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p("rev.qcow2")), "1M"]);
    let io = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -s {} 512k 512k", s(&p("hi.bin"))))
        .arg("-c")
        .arg(format!("write -s {} 0 512k", s(&p("lo.bin"))))
        .arg(p("rev.qcow2"))
        .output()
        .expect("qemu-io must be installed (apt-get install qemu-utils)");
    assert!(io.status.success(), "{io:?}");
    // Empty images whose qemu answers end at different places (a 4 KiB-cluster qcow2 answers
    // per 2 MiB L2 slice, parallels for the whole disk).
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&p("e4k.qcow2")),
        "4M",
    ]);
    qemu_img(&["create", "-q", "-f", "parallels", s(&p("e.ploop")), "4M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p("e64k.qcow2")), "4M"]);
    // Content that differs before the status does: a byte at 0 of a 4 KiB-cluster copy.
    let mut m = data.clone();
    m[0] ^= 0xff;
    std::fs::write(p("m.raw"), &m).unwrap();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&p("m.raw")),
        s(&p("m.qcow2")),
    ]);
    let pairs = [
        ("z.raw", "e.qcow2"),
        ("h.raw", "e.qcow2"),
        ("d.raw", "d.qcow2"),
        ("d.raw", "d.vdi"),
        ("d.raw", "d.vhdx"),
        ("d.qcow2", "d.vhdx"),
        ("d.raw", "d.ploop"),
        ("d.raw", "rev.qcow2"),
        ("e4k.qcow2", "e.ploop"),
        ("e64k.qcow2", "e.ploop"),
        ("d.qcow2", "m.qcow2"),
        ("z.raw", "h.raw"),
    ];
    let mut mismatches = 0;
    for (a, b) in pairs {
        let out = glimpse(&["compare", "-s", s(&p(a)), s(&p(b))]);
        let q = qemu_run(&["compare", "-s", s(&p(a)), s(&p(b))]);
        assert_eq!(
            (out.status.code(), String::from_utf8_lossy(&out.stdout)),
            (q.status.code(), String::from_utf8_lossy(&q.stdout)),
            "compare -s {a} {b}"
        );
        mismatches += usize::from(String::from_utf8_lossy(&q.stdout).contains("block status"));
    }
    // The pairs exercise both verdicts.
    assert!((3..pairs.len()).contains(&mismatches), "{mismatches}");
    // Without -s, allocation does not matter.
    let out = glimpse(&["compare", s(&p("z.raw")), s(&p("e.qcow2"))]);
    assert_eq!(out.status.code(), Some(0));
}

/// F3: the offset named is the first differing byte; qemu-img names the start of the
/// 512-byte sector that holds it, in the same words.
#[test]
fn compare_names_the_byte_qemu_the_sector() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.raw");
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    for at in [0u64, 511, 512, 65535, (1 << 20) - 1] {
        let b = d.path().join("b.raw");
        let mut v = vec![0u8; 1 << 20];
        v[at as usize] = 1;
        std::fs::write(&b, v).unwrap();
        let bq = d.path().join("b.qcow2");
        let _ = std::fs::remove_file(&bq);
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&b), s(&bq)]);
        let out = glimpse(&["compare", s(&a), s(&bq)]);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("Content mismatch at offset {at}!\n")
        );
        let q = qemu_run(&["compare", s(&a), s(&bq)]);
        assert_eq!(q.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&q.stdout),
            format!("Content mismatch at offset {}!\n", at / 512 * 512)
        );
    }
    let help = String::from_utf8_lossy(&glimpse(&["compare", "--help"]).stdout).into_owned();
    assert!(help.contains("512-byte sector"), "{help}");
    assert!(help.contains("block status mismatch"), "{help}");
}
