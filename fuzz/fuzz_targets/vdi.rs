//! Fuzz target `vdi`: the VDI parser (pre-header, header v1.1, block map).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/vdi/`: `qemu-img convert -O vdi` of
//! a patterned 4 MiB raw disk (dynamic and `static=on`), an empty 64 GiB disk, plus cut-down
//! copies holding the header and block map only (first 64 KiB).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // Image signature 0xbeda107f (little-endian) at offset 0x40.
    fuzz_format(
        data,
        Format::Vdi,
        has_at(data, 0x40, &[0x7f, 0x10, 0xda, 0xbe]),
    )
});
