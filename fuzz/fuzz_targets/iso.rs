//! Fuzz target `iso`: the ISO 9660 parser (volume descriptors from sector 16).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/iso/`: `genisoimage` (plain, and
//! Joliet + Rock Ridge) and `xorriso -as mkisofs` images of a tiny tree, plus cut-down copies
//! holding the system area and the volume descriptors only (first 64 KiB).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // Standard identifier "CD001" of the first volume descriptor (sector 16, offset 0x8001).
    fuzz_format(data, Format::Iso, has_at(data, 0x8001, b"CD001"))
});
