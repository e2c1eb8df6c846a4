//! Fuzz target `reader`: detect, open every detected format (raw when none matched) under
//! `Limits::tight()`, walk the whole mapping asserting the contract on every extent
//! (`glimpse_formats::validate_extent`, compressed extents inside their unit, a one-byte request
//! backed like a long one), and read every non-zero extent through `GuestReader`. The source
//! returns short reads, so any parser that assumes a full `read_at` shows up here.
//!
//! Bounded per input: at most 100,000 `mapping` calls (a parser must coalesce long
//! unallocated runs into one extent, so a 1 TiB empty image walks in a few calls), and at most
//! 16 MiB of guest bytes read (1 MiB per read, plus the last byte of every longer extent).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/reader/`: the union of the seed
//! corpora of every per-format target, so that every format's mapping is reached.

#![no_main]

use std::sync::Arc;

use glimpse_formats::{open, Limits, Source};
use glimpse_fuzz::{detected_or_raw, exercise, ShortReads, READER};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    let limits = Limits::tight();
    let src: Source = Arc::new(ShortReads(data.to_vec()));
    for format in detected_or_raw(data) {
        if let Ok(img) = open(src.clone(), format, &limits) {
            exercise(Arc::from(img), &limits, &READER);
        }
    }
    Corpus::Keep
});
