//! Fuzz target `vmdk_descriptor`: the VMDK text descriptor parser (a descriptor file on its
//! own: `createType`, extent lines naming other files, `ddb.*` keys, parent CID/hints). Extent
//! files are references: they must be reported, never opened.
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/vmdk_descriptor/`: the descriptor
//! files `qemu-img create -f vmdk` writes for `twoGbMaxExtentSparse`, `twoGbMaxExtentFlat` and
//! `monolithicFlat` (copied without their extent files), the descriptors embedded in a
//! streamOptimized extent and in a child with `parentFileNameHint` (padding removed), and
//! variants with CRLF line ends and odd spacing.

#![no_main]

use glimpse_formats::Format;
use glimpse_fuzz::{contains, fuzz_format};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    // A descriptor, not a sparse extent (those are the `vmdk` target's): its signature line or
    // its `createType` key within the first 4 KiB.
    if data.starts_with(b"KDMV") || data.starts_with(b"COWD") {
        return Corpus::Reject;
    }
    let text = data.starts_with(b"# Disk DescriptorFile") || contains(data, 4096, b"createType");
    fuzz_format(data, Format::Vmdk, text)
});
