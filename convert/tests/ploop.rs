//! The ploop (Parallels) writer against qemu-img: random sources go through `pipeline::convert`; qemu-img
//! must find no errors or leaks, call the output identical to the source and see the same
//! virtual size; glimpse must read back the same bytes and pass its own checks. These tests
//! fail, never skip, without qemu-img.

mod support;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{create, measure, Target, WriteOptions};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{open, Format, Image, Limits, Source};
use support::qemu_img;

const MIB: u64 = 1 << 20;

/// Pseudo-random 64 KiB runs with zero runs long enough to leave whole blocks empty.
fn source_bytes(size: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        if (i / 20) % 3 == 1 || next() % 4 == 0 {
            continue;
        }
        for b in chunk.iter_mut() {
            *b = next() as u8;
        }
    }
    data
}

fn round_trip(dir: &Path, size: u64, opts: &str, seed: u64) {
    let data = source_bytes(size, seed);
    let input = dir.join(format!("src-{seed}.raw"));
    File::create(&input).unwrap().write_all(&data).unwrap();
    let out = dir.join(format!("out-{seed}.hds"));

    let limits = Limits::default();
    let img: Arc<dyn Image> =
        Arc::from(open(Arc::new(File::open(&input).unwrap()), Format::Raw, &limits).unwrap());
    let reader = GuestReader::new(img.clone(), &limits);
    let wopts = WriteOptions::parse(opts, false).unwrap();
    let w = create(
        Format::Parallels,
        &wopts,
        Target::File(File::create(&out).unwrap()),
        size,
    )
    .unwrap();
    let stats = convert(img, w, &reader, &ConvertOptions::default()).unwrap();

    let want = size.div_ceil(512) * 512;
    let check = qemu_img(&["check", "-f", "parallels", out.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{opts} size {size}: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "parallels",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(
        cmp.status.success(),
        "{opts} size {size}: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    let info = qemu_img(&["info", "-f", "parallels", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&info.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("virtual size:"))
        .expect("a virtual size line");
    assert!(
        line.ends_with(&format!("({want} bytes)")),
        "{opts} size {size}: {line}"
    );

    let s: Source = Arc::new(File::open(&out).unwrap());
    assert_eq!(
        glimpse_formats::detect(s.as_ref()).unwrap().matches,
        [Format::Parallels]
    );
    let back_img: Arc<dyn Image> = Arc::from(open(s, Format::Parallels, &limits).unwrap());
    assert_eq!(back_img.info().virtual_size, want);
    assert!(back_img.findings().is_empty(), "{:?}", back_img.findings());
    assert!(back_img.check(&limits).unwrap().is_empty());
    assert_eq!(back_img.info().details["subformat"], "WithouFreSpacExt");
    let mut back = vec![0xAAu8; want as usize];
    GuestReader::new(back_img, &limits)
        .read_at(&mut back, 0)
        .unwrap();
    assert!(
        back[..data.len()] == data[..],
        "{opts} size {size}: guest bytes differ"
    );
    assert!(back[data.len()..].iter().all(|&b| b == 0));

    let cluster = glimpse_convert::ploop::cluster_size(&wopts).unwrap();
    let m = measure(Format::Parallels, &wopts, size, stats.data_chunks * cluster).unwrap();
    assert_eq!(
        m.required,
        std::fs::metadata(&out).unwrap().len(),
        "{opts} size {size}"
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
