//! Fuzz target `vhd`: the VHD parser (footer, dynamic header, BAT, parent locators).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/vhd/`: `qemu-img convert -O vpc` of
//! a patterned 4 MiB raw disk (`subformat=dynamic` and `fixed`, `force_size` on and off), an
//! empty 64 GiB dynamic disk, plus cut-down copies of the dynamic ones: the first 64 KiB (footer
//! copy, header, BAT) with the 512-byte footer appended again.

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // The footer cookie "conectix" at the end (512- or 511-byte footer) or its copy at offset 0.
    fuzz_format(
        data,
        Format::Vhd,
        has_at(data, 0, b"conectix")
            || has_at(data, data.len().saturating_sub(512), b"conectix")
            || has_at(data, data.len().saturating_sub(511), b"conectix"),
    )
});
