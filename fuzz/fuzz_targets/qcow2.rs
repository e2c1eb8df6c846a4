//! Fuzz target `qcow2`: the qcow2 parser (`open` as qcow2 under `Limits::tight()`, a bounded walk of the mapping, guest reads, `check`).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/qcow2/`: `qemu-img convert -O qcow2`
//! of a patterned 4 MiB raw disk (v2 and v3; cluster sizes 512 B and 2 MiB; lazy refcounts;
//! extended L2; refcount widths 1 and 64; `preallocation=metadata`; `-c` with zlib and zstd),
//! `qemu-img create` images (an empty 1 TiB disk, a backing file reference, an external data
//! file, LUKS encryption), plus cut-down copies holding only their first 64 KiB and 256 KiB
//! (header, L1, refcount table and blocks, first L2 tables).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // qcow2 magic "QFI\xfb" at offset 0.
    fuzz_format(data, Format::Qcow2, has_at(data, 0, b"QFI\xfb"))
});
