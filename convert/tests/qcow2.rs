//! qcow2 writer tests: raw sources → our writer → qemu-img compare/check and our own reader.
//! These tests need qemu-img and fail loudly without it.

mod support;

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{Target, WriteOptions};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{Format, Image, Limits, Source};
use support::{noise, qemu_img, qemu_json};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn text(len: usize) -> Vec<u8> {
    let words = [
        "disk ",
        "image ",
        "cluster ",
        "qcow2 ",
        "refcount ",
        "table\n",
        "of ",
        "zeros ",
    ];
    let mut v = Vec::with_capacity(len);
    let mut i = 0usize;
    while v.len() < len {
        v.extend_from_slice(words[(i * 7 + i / 3) % words.len()].as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

/// A sparse raw file: `(offset, bytes)` pieces written over holes, `size` bytes long.
fn sparse_raw(dir: &Path, name: &str, size: u64, pieces: &[(u64, Vec<u8>)]) -> PathBuf {
    let p = dir.join(name);
    let mut f = File::create(&p).unwrap();
    for (off, bytes) in pieces {
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(bytes).unwrap();
    }
    f.set_len(size).unwrap();
    p
}

/// Mixed content: random, zeros (written, not holes), text, and an odd tail.
fn mixed(dir: &Path, size: usize) -> PathBuf {
    let mut v = vec![0u8; size];
    let mut pos = 0;
    let mut i = 0u64;
    while pos < size {
        let len = (50_000 + (i as usize * 7919) % 200_000).min(size - pos);
        match i % 3 {
            0 => v[pos..pos + len].copy_from_slice(&noise(i, len)),
            1 => {}
            _ => v[pos..pos + len].copy_from_slice(&text(len)),
        }
        pos += len;
        i += 1;
    }
    let p = dir.join(format!("mixed-{size}.raw"));
    std::fs::write(&p, v).unwrap();
    p
}

fn write_qcow2(src: &Path, out: &Path, opts: &str, compress: bool) {
    let f: Source = Arc::new(File::open(src).unwrap());
    let img: Arc<dyn Image> =
        Arc::from(glimpse_formats::open(f, Format::Raw, &Limits::default()).unwrap());
    let reader = GuestReader::new(img.clone(), &Limits::default());
    let o = WriteOptions::parse(opts, compress).unwrap();
    let size = img.info().virtual_size;
    let w = glimpse_convert::create(
        Format::Qcow2,
        &o,
        Target::File(File::create(out).unwrap()),
        size,
    )
    .unwrap();
    convert(img, w, &reader, &ConvertOptions::default()).unwrap();
}

fn verify(src: &Path, out: &Path, what: &str) {
    let c = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(src), s(out)]);
    assert!(
        c.status.code() == Some(0),
        "{what}: compare: {}",
        String::from_utf8_lossy(&c.stdout)
    );
    let c = qemu_img(&["check", s(out)]);
    assert!(
        c.status.code() == Some(0),
        "{what}: check: {}{}",
        String::from_utf8_lossy(&c.stdout),
        String::from_utf8_lossy(&c.stderr)
    );
    let f: Source = Arc::new(File::open(out).unwrap());
    let img: Arc<dyn Image> =
        Arc::from(glimpse_formats::open(f, Format::Qcow2, &Limits::default()).unwrap());
    assert!(
        img.check(&Limits::default()).unwrap().is_empty(),
        "{what}: our check"
    );
    let mut want = std::fs::read(src).unwrap();
    // Like qemu-img, the writer rounds the virtual size up to whole sectors.
    want.resize(want.len().div_ceil(512) * 512, 0);
    assert_eq!(img.info().virtual_size, want.len() as u64, "{what}");
    let mut got = vec![0u8; want.len()];
    GuestReader::new(img, &Limits::default())
        .read_at(&mut got, 0)
        .unwrap();
    assert!(got == want, "{what}: our reader sees different bytes");
}

#[test]
fn round_trips_through_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let odd = mixed(d, 3 * 1024 * 1024 + 12345);
    let empty = sparse_raw(d, "empty.raw", 0, &[]);
    // 4 KiB clusters: one L2 table reaches 2 MiB; data on both sides of that edge.
    let edge = sparse_raw(
        d,
        "edge.raw",
        (2 << 20) + 4096 + 7,
        &[(4096, noise(3, 5000)), ((2 << 20) - 100, noise(4, 4203))],
    );
    for compat in ["0.10", "1.1"] {
        for cluster in ["4k", "64k", "2M"] {
            for comp in ["none", "zlib", "zstd"] {
                if compat == "0.10" && comp == "zstd" {
                    continue;
                }
                let mut opts = format!("compat={compat},cluster_size={cluster}");
                if comp != "none" {
                    opts.push_str(&format!(",compression_type={comp}"));
                }
                let mut sources = vec![&odd];
                if cluster == "4k" {
                    sources.push(&edge);
                    sources.push(&empty);
                }
                for src in sources {
                    let out = d.join("out.qcow2");
                    let what = format!("{opts} -c={} {src:?}", comp != "none");
                    write_qcow2(src, &out, &opts, comp != "none");
                    verify(src, &out, &what);
                }
            }
        }
    }
}

#[test]
fn size_just_over_an_l2_table_at_64k() {
    let dir = tempfile::tempdir().unwrap();
    let reach = 8192u64 * 65536;
    let src = sparse_raw(
        dir.path(),
        "big.raw",
        reach + 70_000,
        &[(0, noise(1, 65536)), (reach - 10, noise(2, 30_000))],
    );
    let out = dir.path().join("big.qcow2");
    write_qcow2(&src, &out, "", false);
    verify(&src, &out, "64k just over one L2");
}

#[test]
fn compressed_size_is_close_to_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut v = Vec::new();
    for i in 0..4u64 {
        v.extend(noise(i, 1 << 20));
        v.extend(text(1 << 20));
        v.extend(vec![0u8; 1 << 20]);
    }
    let src = d.join("mix.raw");
    std::fs::write(&src, v).unwrap();
    for ct in ["zlib", "zstd"] {
        let ours = d.join(format!("ours-{ct}.qcow2"));
        let theirs = d.join(format!("theirs-{ct}.qcow2"));
        write_qcow2(&src, &ours, &format!("compression_type={ct}"), true);
        verify(&src, &ours, ct);
        let o = qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct}"),
            s(&src),
            s(&theirs),
        ]);
        assert!(o.status.success());
        let (a, b) = (
            std::fs::metadata(&ours).unwrap().len() as f64,
            std::fs::metadata(&theirs).unwrap().len() as f64,
        );
        assert!((a - b).abs() / b < 0.02, "{ct}: ours {a} vs qemu-img {b}");
    }
}

fn qemu_measure(args: &[&str]) -> (u64, u64) {
    let mut a = vec!["measure", "--output=json", "-O", "qcow2"];
    a.extend_from_slice(args);
    let v = qemu_json(&a);
    (
        v["required"].as_u64().expect("required"),
        v["fully-allocated"].as_u64().expect("fully-allocated"),
    )
}

#[test]
fn measure_matches_qemu_img_measure() {
    let dir = tempfile::tempdir().unwrap();
    for (size, cluster) in [
        (1u64 << 30, "64k"),
        (10 << 30, "64k"),
        (3_000_000_000, "4k"),
        (1 << 40, "2M"),
        (12345, "64k"),
    ] {
        let o = WriteOptions::parse(&format!("cluster_size={cluster}"), false).unwrap();
        let m = glimpse_convert::measure(Format::Qcow2, &o, size, 0).unwrap();
        let (req, full) = qemu_measure(&[
            "-o",
            &format!("cluster_size={cluster}"),
            "--size",
            &size.to_string(),
        ]);
        assert_eq!(
            (m.required, m.fully_allocated),
            (req, full),
            "size {size} cluster {cluster}"
        );
    }
    // With data: a sparse raw with a few data runs (cluster aligned, so the count is exact).
    let src = sparse_raw(
        dir.path(),
        "m.raw",
        64 << 20,
        &[(0, noise(1, 1 << 20)), (10 << 20, noise(2, 3 << 16))],
    );
    let o = WriteOptions::default();
    let m = glimpse_convert::measure(Format::Qcow2, &o, 64 << 20, (1 << 20) + (3 << 16)).unwrap();
    let (req, full) = qemu_measure(&["-f", "raw", s(&src)]);
    assert_eq!(m.fully_allocated, full);
    // qemu-img counts allocated ranges of the file; within a cluster or two of ours.
    assert!(
        m.required.abs_diff(req) <= 2 * 65536,
        "ours {} vs {req}",
        m.required
    );
}

#[test]
fn options_outside_the_list_are_rejected() {
    let o = WriteOptions::parse("preallocation=metadata", false).unwrap();
    let t = Target::File(tempfile::tempfile().unwrap());
    assert!(glimpse_convert::create(Format::Qcow2, &o, t, 1 << 20).is_err());
    let o = WriteOptions::parse("compat=0.10,compression_type=zstd", true).unwrap();
    let t = Target::File(tempfile::tempfile().unwrap());
    assert!(glimpse_convert::create(Format::Qcow2, &o, t, 1 << 20).is_err());
}
