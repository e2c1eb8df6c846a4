//! VHDX writer round trips, judged by qemu-img (compare, check, info) and by our own reader.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{Target, WriteOptions};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{Format, Image, Limits, Source};
use support::{noise, qemu_img, qemu_info};

/// A raw source of `size` bytes: data runs at the given offsets, zeros (holes) elsewhere.
fn raw_source(path: &Path, size: u64, runs: &[(u64, usize)]) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut all = vec![0u8; usize::try_from(size).unwrap()];
    for (i, &(off, len)) in runs.iter().enumerate() {
        let d = noise(off ^ (i as u64 + 7), len);
        f.write_all_at(&d, off).unwrap();
        let o = usize::try_from(off).unwrap();
        all[o..o + len].copy_from_slice(&d);
    }
    all
}

fn round_trip(opts: &str, size: u64, runs: &[(u64, usize)]) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    let out = dir.path().join("out.vhdx");
    let content = raw_source(&raw, size, runs);
    let limits = Limits::default();

    let src: Source = Arc::new(File::open(&raw).unwrap());
    let image: Arc<dyn Image> =
        Arc::from(glimpse_formats::open(src, Format::Raw, &limits).unwrap());
    let wopts = WriteOptions::parse(opts, false).unwrap();
    let writer = glimpse_convert::create(
        Format::Vhdx,
        &wopts,
        Target::File(File::create(&out).unwrap()),
        size,
    )
    .unwrap();
    let reader = GuestReader::new(image.clone(), &limits);
    convert(image, writer, &reader, &ConvertOptions::default()).unwrap();

    let (r, o) = (raw.to_str().unwrap(), out.to_str().unwrap());
    let cmp = qemu_img(&["compare", "-f", "raw", "-F", "vhdx", r, o]);
    assert!(
        cmp.status.success(),
        "{opts} {size}: compare: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    let chk = qemu_img(&["check", "-f", "vhdx", o]);
    let chk_out = String::from_utf8_lossy(&chk.stdout);
    assert!(
        chk.status.success() && chk_out.contains("No errors"),
        "{opts} {size}: check: {chk_out}{}",
        String::from_utf8_lossy(&chk.stderr)
    );
    let info = qemu_info(&out, Format::Vhdx);
    let padded = size.next_multiple_of(512);
    assert_eq!(info["virtual-size"].as_u64(), Some(padded), "{opts} {size}");

    // Our own reader sees the same bytes (zeros in the sector padding).
    let src: Source = Arc::new(File::open(&out).unwrap());
    let img: Arc<dyn Image> = Arc::from(glimpse_formats::open(src, Format::Vhdx, &limits).unwrap());
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    assert_eq!(img.info().virtual_size, padded);
    assert_eq!(img.info().cluster_size, info["cluster-size"].as_u64());
    let want_block = wopts.size("block_size").unwrap().unwrap_or(8 * MIB);
    assert_eq!(img.info().cluster_size, Some(want_block), "{opts}");

    // measure() predicts the output's length from the data blocks.
    let data_bytes: u64 = content
        .chunks(usize::try_from(want_block).unwrap())
        .filter(|c| c.iter().any(|&b| b != 0))
        .map(|c| c.len() as u64)
        .sum();
    let m = glimpse_convert::measure(Format::Vhdx, &wopts, size, data_bytes).unwrap();
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        m.required,
        "{opts} {size}"
    );
    let fixed = opts.contains("fixed");
    assert_eq!(img.info().details["leave-blocks-allocated"], fixed);
    let mut back = vec![0u8; usize::try_from(padded).unwrap()];
    if padded > 0 {
        GuestReader::new(img, &limits)
            .read_at(&mut back, 0)
            .unwrap();
    }
    assert_eq!(&back[..content.len()], &content[..], "{opts} {size}");
    assert!(back[content.len()..].iter().all(|&b| b == 0));
}

const MIB: u64 = 1 << 20;

fn runs(size: u64) -> Vec<(u64, usize)> {
    let mut v = vec![(0, 4096), (MIB + 100, 70_000), (3 * MIB - 10, 20)];
    // The very end of an odd-sized disk.
    v.push((size - 333, 333));
    v
}

#[test]
fn dynamic_1m_odd_size() {
    let size = 5 * MIB + 12_345;
    round_trip("block_size=1M", size, &runs(size));
}

#[test]
fn fixed_1m_odd_size() {
    let size = 5 * MIB + 12_345;
    round_trip("subformat=fixed,block_size=1M", size, &runs(size));
}

#[test]
fn dynamic_32m() {
    let size = 40 * MIB + 512;
    round_trip("block_size=32M", size, &runs(size));
}

#[test]
fn fixed_32m() {
    let size = 33 * MIB + 7;
    round_trip("subformat=fixed,block_size=32M", size, &runs(size));
}

#[test]
fn dynamic_default_options_all_zero_and_log_size() {
    round_trip("", 9 * MIB, &[]);
    round_trip("log_size=2M,block_state_zero=off", 3 * MIB, &[(MIB, 10)]);
}

#[test]
fn empty_disk() {
    round_trip("", 0, &[]);
    round_trip("subformat=fixed,block_size=1M", 0, &[]);
}

#[test]
fn measure_required_and_full() {
    let o = WriteOptions::parse("block_size=1M", false).unwrap();
    let m = glimpse_convert::measure(Format::Vhdx, &o, 10 * MIB, 2 * MIB).unwrap();
    assert!(m.required < m.fully_allocated);
    let o = WriteOptions::parse("block_size=1M,subformat=fixed", false).unwrap();
    let m = glimpse_convert::measure(Format::Vhdx, &o, 10 * MIB, 0).unwrap();
    assert_eq!(m.required, m.fully_allocated);
}

#[test]
fn stream_target_is_refused() {
    let o = WriteOptions::default();
    assert!(glimpse_convert::create(
        Format::Vhdx,
        &o,
        Target::Stream(Box::new(std::io::sink())),
        MIB
    )
    .is_err());
}
