//! Fuzz target `vhdx`: the VHDX parser (file identifier, headers, region table, metadata, BAT, log).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/vhdx/`: `qemu-img convert -O vhdx`
//! of a patterned 4 MiB raw disk (dynamic with the default and a 1 MiB block size, fixed), an
//! empty 64 GiB disk and one made with `block_state_zero=off`, plus cut-down copies holding
//! the first 1 MiB (headers, region tables) and 4 MiB (also the log, BAT and metadata region,
//! without payload blocks).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // File type identifier "vhdxfile" at offset 0.
    fuzz_format(data, Format::Vhdx, has_at(data, 0, b"vhdxfile"))
});
