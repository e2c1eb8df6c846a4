//! The ploop (Parallels) writer against qemu-img: random sources go through `pipeline::convert`; qemu-img
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
    let out = dir.join(format!("out-{seed}.hds"));
    let target = Target::File(File::create(&out).unwrap());
    let stats = convert_raw(&input, Format::Parallels, opts, target);

    let what = format!("{opts} size {size}");
    let check = qemu_img(&["check", "-f", "parallels", out.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let want = size.div_ceil(512) * 512;
    let img = assert_round_trip(&input, &data, &out, Format::Parallels, want, &what);
    assert_eq!(img.info().details["subformat"], "WithouFreSpacExt");

    let wopts = WriteOptions::parse(opts, false).unwrap();
    let cluster = glimpse_convert::ploop::cluster_size(&wopts).unwrap();
    assert_measured(
        &out,
        Format::Parallels,
        opts,
        size,
        stats.data_chunks * cluster,
    );
}

#[test]
fn ploop_images_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (n, (size, opts)) in [
        (0, ""),
        (1, ""),
        (511, "cluster_size=4k"),
        (3 * MIB + 7 * 512, ""),
        (9 * MIB, "cluster_size=64k"),
        (5 * MIB + 1000, "cluster_size=3k"),
    ]
    .into_iter()
    .enumerate()
    {
        round_trip(dir.path(), size, opts, n as u64);
    }
}

#[test]
fn a_pipe_is_refused() {
    let e = create(
        Format::Parallels,
        &WriteOptions::default(),
        Target::Stream(Box::new(std::io::sink())),
        MIB,
    );
    assert!(e.is_err());
    // -O parallels and -O ploop name the same writer.
    assert_eq!("ploop".parse::<Format>().unwrap(), Format::Parallels);
    assert_eq!("parallels".parse::<Format>().unwrap(), Format::Parallels);
}
