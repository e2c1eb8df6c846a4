//! Helpers the writer tests share: qemu-img as the referee (from the shared test kit), and
//! deterministic data. Each test file uses a part of them.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_convert::pipeline::{convert, ConvertOptions, Stats};
use glimpse_convert::{create, measure, Target, WriteOptions};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{open, Format, Image, Limits, Source};

// qemu-img as the referee is the shared test kit's (glimpse-testkit).
#[allow(unused_imports)]
pub use glimpse_testkit::qemu::{json as qemu_json, run as qemu_img};

/// `qemu-img info --output=json -f <format>`.
pub fn qemu_info(path: &Path, format: Format) -> serde_json::Value {
    glimpse_testkit::qemu::info(path, Some(format.qemu_name()))
}

/// The virtual size qemu-img reports for `path` opened as `format`.
pub fn qemu_virtual_size(path: &Path, format: Format) -> u64 {
    glimpse_testkit::qemu::virtual_size(path, format.qemu_name())
}

/// `n` deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `size` pseudo-random bytes in 64 KiB runs, with runs of zeros long enough to leave whole
/// 1 MiB and 2 MiB chunks empty, so the writers' sparse paths are exercised.
pub fn sparse_bytes(size: u64, seed: u64) -> Vec<u8> {
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

/// Writes [`sparse_bytes`] to `dir/name` and returns the path and the bytes.
pub fn sparse_source(dir: &Path, name: &str, size: u64, seed: u64) -> (PathBuf, Vec<u8>) {
    let data = sparse_bytes(size, seed);
    let p = dir.join(name);
    File::create(&p).unwrap().write_all(&data).unwrap();
    (p, data)
}

/// Converts the raw file `input` to `format` with the writer options `opts` into `target`.
pub fn convert_raw(input: &Path, format: Format, opts: &str, target: Target) -> Stats {
    let limits = Limits::default();
    let img: Arc<dyn Image> =
        Arc::from(open(Arc::new(File::open(input).unwrap()), Format::Raw, &limits).unwrap());
    let reader = GuestReader::new(img.clone(), &limits);
    let w = create(
        format,
        &WriteOptions::parse(opts, false).unwrap(),
        target,
        img.info().virtual_size,
    )
    .unwrap();
    convert(img, w, &reader, &ConvertOptions::default()).unwrap()
}

/// Checks the converted `out` against its raw `input` holding `data`: qemu-img must call them
/// identical and see `want` bytes; glimpse must detect `format`, see `want` bytes, find nothing,
/// pass its checks and read back `data` followed by zeros. Returns the image glimpse opened.
/// `what` names the case in failure messages.
pub fn assert_round_trip(
    input: &Path,
    data: &[u8],
    out: &Path,
    format: Format,
    want: u64,
    what: &str,
) -> Arc<dyn Image> {
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        format.qemu_name(),
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(
        cmp.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    assert_eq!(qemu_virtual_size(out, format), want, "{what}");

    let limits = Limits::default();
    let s: Source = Arc::new(File::open(out).unwrap());
    assert_eq!(
        glimpse_formats::detect(s.as_ref()).unwrap().matches,
        [format]
    );
    let img: Arc<dyn Image> = Arc::from(open(s, format, &limits).unwrap());
    assert_eq!(img.info().virtual_size, want, "{what}");
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    assert!(img.check(&limits).unwrap().is_empty());
    let mut back = vec![0xAAu8; want as usize];
    GuestReader::new(img.clone(), &limits)
        .read_at(&mut back, 0)
        .unwrap();
    assert!(back[..data.len()] == data[..], "{what}: guest bytes differ");
    assert!(back[data.len()..].iter().all(|&b| b == 0));
    img
}

/// `measure()` must predict the size of `out` exactly given the `data_bytes` the writer wrote.
pub fn assert_measured(out: &Path, format: Format, opts: &str, size: u64, data_bytes: u64) {
    let wopts = WriteOptions::parse(opts, false).unwrap();
    let m = measure(format, &wopts, size, data_bytes).unwrap();
    assert_eq!(
        m.required,
        std::fs::metadata(out).unwrap().len(),
        "{opts} size {size}"
    );
}
