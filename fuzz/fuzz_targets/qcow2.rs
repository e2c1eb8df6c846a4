//! Fuzz target `qcow2`: the qcow2 parser (`open` as qcow2 under `Limits::tight()`, a bounded walk of the mapping, guest reads, `check`).
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/qcow2/`: small images from `qemu-img create -f qcow2` (v2 and v3, cluster sizes 512 B to 2 MiB, lazy refcounts, extended L2, zstd, a backing file and a data file reference), each converted from a patterned raw disk with and without `-c`, plus cut-down copies holding only their first 64 KiB and 256 KiB (header, L1, refcount and first L2 clusters).

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{fuzz_format, has_at};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // qcow2 magic "QFI\xfb" at offset 0.
    fuzz_format(data, Format::Qcow2, has_at(data, 0, b"QFI\xfb"))
});
