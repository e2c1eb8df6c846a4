//! Fuzz target `luks`: LUKS detection and description (header, keyslots; LUKS2 JSON area).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/luks/`: `qemu-img create -f luks`
//! images (LUKS1, AES-256 and AES-128/SHA-1, with a low `iter-time`), plus cut-down copies
//! holding the header and key material area (first 64 KiB and 1 MiB).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // LUKS magic "LUKS\xba\xbe" at offset 0.
    fuzz_format(data, Format::Luks, has_at(data, 0, b"LUKS\xba\xbe"))
});
