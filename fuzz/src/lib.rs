//! Harness code shared by the fuzz targets: magic checks and the per-format target body.
//! The sources and the bounded walk that asserts the `mapping` contract are the test kit's
//! (`glimpse_testkit::walk`), re-exported here: the regression replay runs the same walk.
//!
//! Everything here uses only glimpse's public API, so the targets keep working unchanged as
//! parsers land. A broken contract is a `panic!`: that is how libFuzzer learns about it.

use std::sync::Arc;

use glimpse_formats::{detect, open, Format, Limits};
use libfuzzer_sys::Corpus;

pub use glimpse_testkit::walk::{
    check_extent, detected_or_raw, exercise, source, walk, Bounds, Mem, ShortReads, Walked,
    PER_FORMAT, READER,
};

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
