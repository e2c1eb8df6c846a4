//! Helpers the reader tests share: qemu-img as the referee, and mapping walks (both from the
//! shared test kit), and sparse sources. Each test file uses a part of them.
#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Report};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{open, Format, Image, Limits, Result, Source};

// qemu-img as the referee and the mapping walk are the shared test kit's (glimpse-testkit),
// under the names these tests have always used.
#[allow(unused_imports)]
pub use glimpse_testkit::qemu::{
    data_ranges as qemu_data_ranges, img as qemu_img, json as qemu_json,
};
#[allow(unused_imports)]
pub use glimpse_testkit::walk::data_ranges;

/// A sparse raw file `src-<seed>.raw` of `size` bytes in `dir`: runs of 70,000 pseudo-random
/// bytes (fewer at the end) at the start, across the 3 MiB mark, at 4 MiB, in the middle and
/// at the end, where they fall inside the file; holes elsewhere.
pub fn raw_source(dir: &Path, size: u64, seed: u64) -> PathBuf {
    let p = dir.join(format!("src-{seed}.raw"));
    let f = File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let spots = [
        0,
        3 * 1024 * 1024 + 100,
        4 << 20,
        size / 2,
        size.saturating_sub(5000),
    ];
    for at in spots.into_iter().filter(|&at| at < size) {
        let n = (size - at).min(70_000) as usize;
        let data: Vec<u8> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all_at(&data, at).unwrap();
    }
    p
}

/// The file at `path` as a source.
pub fn src(path: &Path) -> Source {
    Arc::new(File::open(path).unwrap())
}

/// `inspect` of `s` with a policy that expects `format`.
pub fn inspect_as(s: Source, format: Format, limits: &Limits) -> Report {
    inspect(
        s,
        &Policy {
            expect_format: Some(format),
            ..Policy::default()
        },
        limits,
    )
    .unwrap()
}

/// `qemu-img convert -f <qemu_format> -O raw image raw`: the guest bytes as qemu-img reads them.
pub fn qemu_to_raw(image: &Path, qemu_format: &str, raw: &Path) {
    qemu_img(&[
        "convert",
        "-f",
        qemu_format,
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
}

/// Guest bytes through glimpse equal the raw file `raw`, compared 1 MiB at a time.
pub fn assert_same_guest(img: Arc<dyn Image>, raw: &Path) {
    let size = img.info().virtual_size;
    let r = GuestReader::new(img, &Limits::default());
    let mut f = File::open(raw).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    let mut pos = 0;
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    while pos < size {
        let n = (size - pos).min(1 << 20) as usize;
        r.read_at(&mut a[..n], pos).unwrap();
        f.read_exact(&mut b[..n]).unwrap();
        assert!(
            a[..n] == b[..n],
            "guest bytes differ in the MiB at {pos:#x}"
        );
        pos += n as u64;
    }
}

/// Reads the whole guest of `img` in one call.
pub fn read_guest(img: &Arc<dyn Image>) -> Result<()> {
    let r = GuestReader::new(img.clone(), &Limits::default());
    let mut buf = vec![0u8; img.info().virtual_size as usize];
    r.read_at(&mut buf, 0)
}

/// Opens prefixes of `bytes` as `format`: every length within `edge` bytes of either end,
/// every `step` bytes between. Each prefix that opens is checked, then handed to `each`.
pub fn for_each_prefix(
    bytes: &[u8],
    format: Format,
    edge: usize,
    step: usize,
    mut each: impl FnMut(Arc<dyn Image>),
) {
    let len = bytes.len();
    let mut n = 0;
    while n < len {
        let s: Source = Arc::new(bytes[..n].to_vec());
        if let Ok(img) = open(s, format, &Limits::default()) {
            let _ = img.check(&Limits::default());
            each(Arc::from(img));
        }
        n += if n < edge || n + edge > len { 1 } else { step };
    }
}

/// A source that counts the reads touching `[lo, hi)`: proves that a walk reads a region once,
/// not once per entry that names it.
pub struct CountingSource {
    pub data: Vec<u8>,
    pub lo: u64,
    pub hi: u64,
    pub hits: std::sync::atomic::AtomicUsize,
}

impl glimpse_formats::io::ReadAt for CountingSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if offset < self.hi && offset + buf.len() as u64 > self.lo {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.data.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.data.len() as u64)
    }
}
