//! Fuzz target `parallels`: the Parallels / ploop parser (header, BAT, format extension with
//! dirty bitmaps, the `DiskDescriptor.xml` refusal) and its reader.
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/parallels/`: `qemu-img convert -O
//! parallels` of a patterned 4 MiB raw disk (4 KiB and 1 MiB clusters), an empty 64 GiB disk,
//! cut-down copies holding the header and BAT only (first 64 KiB), and the committed samples
//! (`fixtures/parallels/`: the old `WithoutFreeSpace` magic, a dirty bitmap extension) and
//! hostile files (`fixtures/hostile/parallels/`).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::fuzz_format;
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // Either header magic at offset 0 (the descriptor is reached through detection).
    let magic = data.starts_with(b"WithoutFreeSpace") || data.starts_with(b"WithouFreSpacExt");
    fuzz_format(data, Format::Parallels, magic)
});
