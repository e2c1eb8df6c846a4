//! The VHD writer against qemu-img: random sources go through `pipeline::convert`; qemu-img
//! must call the output identical to the source and see the same virtual size as glimpse;
//! glimpse must read back the same bytes and pass its own checks; a fixed VHD streamed to a pipe
//! must equal the file. These tests fail, never skip, without qemu-img.

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_convert::{create, Target, WriteOptions};
use glimpse_formats::{open, Format, Limits};
use support::{assert_measured, assert_round_trip, convert_raw, sparse_source};

/// A raw source of `size` bytes: pseudo-random 64 KiB runs with zero runs between them.
fn source(dir: &Path, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    sparse_source(dir, &format!("src-{seed}-{size}.raw"), size, seed)
}

fn run(input: &Path, target: Target, opts: &str) -> glimpse_convert::pipeline::Stats {
    convert_raw(input, Format::Vhd, opts, target)
}

/// Converts, then checks the output with qemu-img and glimpse. Returns the output's path.
fn round_trip(dir: &Path, size: u64, opts: &str, want_size: u64, seed: u64) -> PathBuf {
    let (input, data) = source(dir, size, seed);
    let out = dir.join(format!("out-{seed}-{size}.vhd"));
    let stats = run(&input, Target::File(File::create(&out).unwrap()), opts);
    let what = format!("{opts} size {size}");
    let img = assert_round_trip(&input, &data, &out, Format::Vhd, want_size, &what);

    // measure() predicts the file exactly when data is counted in the writer's chunks.
    let fixed = img.info().details["disk-type"] == "fixed";
    let chunk = if fixed {
        1 << 20
    } else {
        img.info().cluster_size.unwrap()
    };
    assert_measured(&out, Format::Vhd, opts, size, stats.data_chunks * chunk);
    out
}

const MIB: u64 = 1 << 20;

#[test]
fn dynamic_vhds_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (n, size) in [0, 1, 511, 513, 3 * MIB + 7 * 512, 9 * MIB]
        .into_iter()
        .enumerate()
    {
        round_trip(dir.path(), size, "", size.div_ceil(512) * 512, n as u64);
    }
    round_trip(
        dir.path(),
        5 * MIB + 4096,
        "block_size=512k",
        5 * MIB + 4096,
        10,
    );
}

#[test]
fn fixed_vhds_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (n, size) in [1000, 3 * MIB + 7 * 512, 4 * MIB].into_iter().enumerate() {
        round_trip(
            dir.path(),
            size,
            "subformat=fixed",
            size.div_ceil(512) * 512,
            20 + n as u64,
        );
    }
}

#[test]
fn force_size_off_writes_a_chs_exact_disk_for_virtual_pc() {
    let dir = tempfile::tempdir().unwrap();
    // 10514432 bytes is 302/4/17: what qemu-img create -f vpc 10M rounds to.
    let out = round_trip(dir.path(), 10_514_432, "force_size=off", 10_514_432, 30);
    let bytes = std::fs::read(out).unwrap();
    assert_eq!(&bytes[28..32], b"qemu");
    // A size the geometry cannot hold is refused rather than changed.
    let e = create(
        Format::Vhd,
        &WriteOptions::parse("force_size=off", false).unwrap(),
        Target::File(tempfile::tempfile().unwrap()),
        10 * MIB,
    );
    assert!(e.is_err());
}

#[test]
fn azure_rounds_up_to_a_whole_mib_fixed_disk() {
    let dir = tempfile::tempdir().unwrap();
    let out = round_trip(dir.path(), 3 * MIB + 1000, "azure=on", 4 * MIB, 40);
    let img = open(
        Arc::new(File::open(&out).unwrap()),
        Format::Vhd,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(img.info().details["disk-type"], "fixed");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 4 * MIB + 512);
}

#[test]
fn fixed_stream_equals_fixed_file() {
    let dir = tempfile::tempdir().unwrap();
    let (input, _) = source(dir.path(), 3 * MIB + 3 * 512, 50);
    let file = dir.path().join("file.vhd");
    let piped = dir.path().join("piped.vhd");
    run(
        &input,
        Target::File(File::create(&file).unwrap()),
        "subformat=fixed",
    );
    run(
        &input,
        Target::Stream(Box::new(File::create(&piped).unwrap())),
        "subformat=fixed",
    );
    let (mut a, mut b) = (std::fs::read(file).unwrap(), std::fs::read(piped).unwrap());
    assert_eq!(a.len(), b.len());
    // The footers differ only in their timestamp, checksum and UUID.
    let footer = a.len() - 512;
    for v in [&mut a, &mut b] {
        v[footer + 24..footer + 28].fill(0);
        v[footer + 64..footer + 84].fill(0);
    }
    assert!(a == b);
    // A dynamic VHD cannot go to a pipe.
    let e = create(
        Format::Vhd,
        &WriteOptions::default(),
        Target::Stream(Box::new(std::io::sink())),
        MIB,
    );
    assert!(e.is_err());
}
