//! The VDI writer against qemu-img: random sources go through `pipeline::convert`; qemu-img
//! must find no errors or leaks, call the output identical to the source and see the same
//! virtual size; glimpse must read back the same bytes and pass its own checks. These tests
//! fail, never skip, without qemu-img.

mod support;

use std::fs::File;
use std::path::Path;

use glimpse_convert::{create, Target, WriteOptions};
use glimpse_formats::Format;
use support::{assert_measured, assert_round_trip, convert_raw, qemu_img, sparse_source};

const MIB: u64 = 1 << 20;

fn round_trip(dir: &Path, size: u64, opts: &str, seed: u64) {
    let (input, data) = sparse_source(dir, &format!("src-{seed}.raw"), size, seed);
    let out = dir.join(format!("out-{seed}.vdi"));
    let target = Target::File(File::create(&out).unwrap());
    let stats = convert_raw(&input, Format::Vdi, opts, target);

    let what = format!("{opts} size {size}");
    let check = qemu_img(&["check", "-f", "vdi", out.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let want = size.div_ceil(512) * 512;
    let img = assert_round_trip(&input, &data, &out, Format::Vdi, want, &what);
    let kind = if opts.contains("static=on") {
        "static"
    } else {
        "dynamic"
    };
    assert_eq!(img.info().details["image-type"], kind);

    assert_measured(&out, Format::Vdi, opts, size, stats.data_chunks * MIB);
}

#[test]
fn dynamic_vdis_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (n, size) in [0, 1, 511, 3 * MIB + 7 * 512, 9 * MIB]
        .into_iter()
        .enumerate()
    {
        round_trip(dir.path(), size, "", n as u64);
    }
}

#[test]
fn static_vdis_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (n, size) in [0, 2 * MIB + 100, 5 * MIB].into_iter().enumerate() {
        round_trip(dir.path(), size, "static=on", 10 + n as u64);
    }
}

#[test]
fn a_pipe_is_refused() {
    let e = create(
        Format::Vdi,
        &WriteOptions::default(),
        Target::Stream(Box::new(std::io::sink())),
        MIB,
    );
    assert!(e.is_err());
}
