//! Harness code shared by the fuzz targets: sources, magic checks, and a bounded walk of an
//! opened image that asserts the `mapping` contract.
//!
//! Everything here uses only glimpse's public API, so the targets keep working unchanged as
//! parsers land. A broken contract is a `panic!`: that is how libFuzzer learns about it.

use std::io;
use std::sync::Arc;

use glimpse_formats::reader::GuestReader;
use glimpse_formats::{detect, open, validate_extent, Format, Image, Limits, ReadAt, Source};
use libfuzzer_sys::Corpus;

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

/// For the `reader` target: the whole mapping (up to 100k coalesced extents) and up to 16 MiB
/// of guest data.
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

/// `magic` at byte `offset` of `data`.
pub fn has_at(data: &[u8], offset: usize, magic: &[u8]) -> bool {
    offset
        .checked_add(magic.len())
        .and_then(|end| data.get(offset..end))
        .is_some_and(|s| s == magic)
}

/// `needle` somewhere in the first `within` bytes of `data`.
pub fn contains(data: &[u8], within: usize, needle: &[u8]) -> bool {
    let head = &data[..data.len().min(within)];
    !needle.is_empty() && head.windows(needle.len()).any(|w| w == needle)
}

/// True when `glimpse_formats::detect` reports `format` for `data`.
pub fn detected(data: &[u8], format: Format) -> bool {
    detect(&Mem(data)).is_ok_and(|d| d.matches.contains(&format))
}

/// The body of every per-format target: reject input that is neither detected as `format` nor
/// carries its magic (`magic_ok`), else open it under tight limits, walk a bounded part of its
/// mapping, read what it maps, and run `check`.
///
/// Accepting on magic as well as on `detect` keeps the target useful even where detection is
/// stricter than the parser (or, today, still a stub).
pub fn fuzz_format(data: &[u8], format: Format, magic_ok: bool) -> Corpus {
    if !magic_ok && !detected(data, format) {
        return Corpus::Reject;
    }
    let limits = Limits::tight();
    if let Ok(img) = open(source(data), format, &limits) {
        exercise(Arc::from(img), &limits, &PER_FORMAT);
    }
    Corpus::Keep
}

/// What a walk did, for targets that want to assert more.
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
/// virtual size; a compressed extent lies inside its unit). `mapping` checks it itself, so
/// this only guards against a broken entry point.
pub fn check_extent(e: &glimpse_formats::Extent, guest: u64, max_len: u64, vsize: u64) {
    if let Err(err) = validate_extent(e, guest, max_len, vsize) {
        panic!("mapping contract broken: {err} ({e:?})");
    }
}

/// Asserts that `short` (a shorter request at the same offset) is backed like `long`.
fn same_backing(long: &glimpse_formats::Extent, short: &glimpse_formats::Extent) {
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

/// Every format the per-format and reader targets open (OVA opens its first disk).
pub fn detected_or_raw(data: &[u8]) -> Vec<Format> {
    match detect(&Mem(data)) {
        Ok(d) if !d.matches.is_empty() => d.matches,
        _ => vec![Format::Raw],
    }
}
