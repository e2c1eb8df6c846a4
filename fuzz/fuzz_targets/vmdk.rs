//! Fuzz target `vmdk`: the VMDK parser on binary sparse extents (hosted sparse header `KDMV`, and ESX `COWD`).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/vmdk/`: `qemu-img convert -O vmdk`
//! of a patterned 4 MiB raw disk (monolithicSparse, streamOptimized, `compat6=on`,
//! `zeroed_grain=on`), an empty 64 GiB sparse disk and a child with a parent, plus cut-down
//! copies holding the header, embedded descriptor, grain directory and first grain tables only
//! (first 64 KiB and 256 KiB).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // Sparse extent magic "KDMV" (VMDK4) or "COWD" (ESX) at offset 0.
    fuzz_format(
        data,
        Format::Vmdk,
        has_at(data, 0, b"KDMV") || has_at(data, 0, b"COWD"),
    )
});
