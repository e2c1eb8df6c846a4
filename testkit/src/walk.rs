//! The image walk harness: open, walk the whole mapping asserting the `mapping` contract on
//! every extent, and read what it maps. One copy, run by the fuzz targets (`fuzz/src/lib.rs`
//! re-exports it) and by the regression replay (`formats/tests/regression.rs`).
//!
//! Everything here uses only glimpse's public API. A broken contract is a `panic!`: that is how
//! a test, or libFuzzer, learns about it.

use std::io;
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{
    detect, open, validate_extent, Extent, ExtentKind, Format, Image, Limits, ReadAt, Severity,
    Source,
};

/// How much of an image one input may make the harness walk and read. These bound the
/// harness's own work so that a slow input means a slow parser, not a greedy harness.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// `mapping` calls in the sequential walk.
    pub max_calls: u64,
    /// Guest bytes read through the `GuestReader` in total.
    pub max_read: u64,
    /// Guest bytes read in one `read_at` call.
    pub max_read_per_call: u64,
}

/// For the per-format targets: a bounded part of the mapping, then `check`.
pub const PER_FORMAT: Bounds = Bounds {
    max_calls: 4096,
    max_read: 1 << 20,
    max_read_per_call: 256 << 10,
};

/// For the `reader` target and the regression replay: the whole mapping (up to 100k coalesced
/// extents) and up to 16 MiB of guest data.
pub const READER: Bounds = Bounds {
    max_calls: 100_000,
    max_read: 16 << 20,
    max_read_per_call: 1 << 20,
};

/// An in-memory source.
pub fn source(data: &[u8]) -> Source {
    Arc::new(data.to_vec())
}

/// A borrowed in-memory source, for detection without a copy.
pub struct Mem<'a>(pub &'a [u8]);

impl ReadAt for Mem<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

/// A source that returns short reads (between 1 and 4093 bytes, depending on the offset), to
/// prove that no parser assumes one `read_at` fills its buffer.
pub struct ShortReads(pub Vec<u8>);

impl ReadAt for ShortReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let cap = usize::try_from(offset % 4093).unwrap_or(0) + 1;
        let n = buf.len().min(cap);
        self.0.as_slice().read_at(&mut buf[..n], offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

/// What a walk did, for callers that want to assert more.
#[derive(Debug, Clone, Copy, Default)]
pub struct Walked {
    /// `mapping` calls made in the sequential walk.
    pub calls: u64,
    /// Guest offset the walk reached.
    pub reached: u64,
    /// Guest bytes read.
    pub read: u64,
}

/// Serialises the image's info and findings, walks its mapping within `b`, and runs `check`.
pub fn exercise(image: Arc<dyn Image>, limits: &Limits, b: &Bounds) -> Walked {
    // What `glimpse info --output json` and `check --output json` would print.
    serde_json::to_string(image.info()).expect("ImageInfo serialises");
    serde_json::to_string(image.findings()).expect("findings serialise");
    let w = walk(&image, limits, b);
    if let Ok(more) = image.check(limits) {
        serde_json::to_string(&more).expect("findings serialise");
    }
    w
}

/// Walks the mapping from guest offset 0, asserting the contract on every extent, and reads
/// the extents that are not zero through a [`GuestReader`], all within `b`.
///
/// A `mapping` error ends the walk (corrupt tables are allowed to fail); a contract violation
/// panics.
pub fn walk(image: &Arc<dyn Image>, limits: &Limits, b: &Bounds) -> Walked {
    let vsize = image.info().virtual_size;
    let reader = GuestReader::new(image.clone(), limits);
    let mut w = Walked::default();

    // Out-of-range requests must fail, not return an extent.
    assert!(
        image.mapping(vsize, 1).is_err(),
        "mapping at the virtual size must fail"
    );
    if vsize > 0 {
        assert!(
            image.mapping(0, 0).is_err(),
            "mapping with max_len 0 must fail"
        );
    }

    let mut buf: Vec<u8> = Vec::new();
    let mut pos = 0u64;
    while pos < vsize && w.calls < b.max_calls {
        let want = vsize - pos;
        let Ok(e) = image.mapping(pos, want) else {
            break;
        };
        w.calls += 1;
        check_extent(&e, pos, want, vsize);

        // Every 16th extent: a one-byte request at the same offset must describe the same
        // bytes (the extent's kind depends on where it starts, not on how much was asked).
        if w.calls % 16 == 1 {
            if let Ok(s) = image.mapping(pos, 1) {
                check_extent(&s, pos, 1, vsize);
                same_backing(&e, &s);
            }
        }

        if !e.reads_as_zero() && w.read < b.max_read {
            let n = e.len.min(b.max_read_per_call).min(b.max_read - w.read);
            read(&reader, &mut buf, pos, n);
            w.read += n;
            // The extent's last byte, so that the far end of long runs is read too.
            if e.len > n {
                read(&reader, &mut buf, e.end() - 1, 1);
            }
        }
        pos = e.end();
    }
    w.reached = pos;

    // The last byte, wherever the walk stopped.
    if vsize > 0 {
        if let Ok(e) = image.mapping(vsize - 1, u64::MAX) {
            check_extent(&e, vsize - 1, u64::MAX, vsize);
            if !e.reads_as_zero() {
                read(&reader, &mut buf, vsize - 1, 1);
            }
        }
    }
    w
}

/// Reads `n` guest bytes at `guest`; errors (bad compressed data, data past the end of the
/// file) are fine, panics are not.
fn read(reader: &GuestReader, buf: &mut Vec<u8>, guest: u64, n: u64) {
    let Ok(n) = usize::try_from(n) else { return };
    buf.clear();
    buf.resize(n, 0);
    let _ = reader.read_at(buf, guest);
}

/// Asserts the `mapping` contract (starts at `guest`, 1 ≤ len ≤ max_len, ends within the
/// virtual size; a compressed extent does not pass its unit's end).
pub fn check_extent(e: &Extent, guest: u64, max_len: u64, vsize: u64) {
    if let Err(err) = validate_extent(e, guest, max_len, vsize) {
        panic!("mapping contract broken: {err} ({e:?})");
    }
    if let ExtentKind::Compressed {
        skip, unit_size, ..
    } = e.kind
    {
        let end = skip.checked_add(e.len);
        assert!(
            end.is_some_and(|end| end <= unit_size),
            "compressed extent passes its unit's end: {e:?}"
        );
    }
}

/// Asserts that `short` (a shorter request at the same offset) is backed like `long`.
fn same_backing(long: &Extent, short: &Extent) {
    match (long.kind, short.kind) {
        // Explicit zeros and unallocated runs may be merged differently; both read as zero.
        (a, b) if long.reads_as_zero() || short.reads_as_zero() => {
            assert_eq!(
                long.reads_as_zero(),
                short.reads_as_zero(),
                "{a:?} vs {b:?} at {}",
                long.start
            );
        }
        (a, b) => assert_eq!(a, b, "mapping at {} depends on max_len", long.start),
    }
}

/// Every format detection reports for `data`, or raw when none matched.
pub fn detected_or_raw(data: &[u8]) -> Vec<Format> {
    match detect(&Mem(data)) {
        Ok(d) if !d.matches.is_empty() => d.matches,
        _ => vec![Format::Raw],
    }
}

/// One input through every path the fuzz targets take: detection, `open` under
/// `Limits::tight()` for every detected format and for `also` (the format the input is filed
/// under), [`exercise`] within [`READER`], then `policy::inspect`, whose verdict must agree
/// with its findings. Errors are fine; a panic or a broken contract is not.
pub fn replay(also: Format, data: &[u8]) {
    let limits = Limits::tight();
    let src: Source = Arc::new(data.to_vec());
    let det = detect(src.as_ref()).expect("detection reads memory");
    let mut formats = det.matches.clone();
    if !formats.contains(&also) {
        formats.push(also);
    }
    for f in formats {
        if let Ok(img) = open(src.clone(), f, &limits) {
            exercise(Arc::from(img), &limits, &READER);
        }
    }
    let report = inspect(src, &Policy::default(), &limits).expect("inspect reads memory");
    let rejects = report
        .findings
        .iter()
        .any(|f| f.severity == Severity::Reject);
    assert_eq!(report.verdict() == Verdict::Reject, rejects);
    if report.image.is_none() {
        assert!(rejects, "open failed without a rejecting finding");
    }
}

/// The guest ranges `img` maps as not reading as zero, as merged `(start, end)` pairs. Walks
/// the whole mapping (every call must succeed) asserting the contract on every extent.
pub fn data_ranges(img: &dyn Image) -> Vec<(u64, u64)> {
    let size = img.info().virtual_size;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = img
            .mapping(pos, u64::MAX)
            .unwrap_or_else(|err| panic!("mapping at {pos}: {err}"));
        check_extent(&e, pos, u64::MAX, size);
        if !e.reads_as_zero() {
            match out.last_mut() {
                Some(last) if last.1 == e.start => last.1 = e.end(),
                _ => out.push((e.start, e.end())),
            }
        }
        pos = e.end();
    }
    assert_eq!(pos, size);
    out
}
