//! Fuzz target `ova`: the OVA/OVF parser (`open` as ova opens the first disk member named by the OVF).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/ova/`: `tar` archives (ustar and
//! GNU) of a hand-written OVF descriptor, a manifest and a small streamOptimized VMDK made by
//! qemu-img (OVF first, as OVA requires; also one with the OVF last, and one whose href escapes
//! the archive), plus cut-down copies (first 64 KiB).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // A ustar header magic at offset 257 (the first tar header).
    fuzz_format(data, Format::Ova, has_at(data, 257, b"ustar"))
});
