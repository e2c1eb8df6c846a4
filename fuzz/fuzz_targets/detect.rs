//! Fuzz target `detect`: format detection (`glimpse_formats::detect`) on any bytes.
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/detect/`: the first 64 KiB and the
//! last 512 bytes of one small image of every format (qcow2, QED, VMDK sparse and descriptor,
//! VHD dynamic and fixed, VHDX, VDI, ISO, OVA, LUKS, raw with MBR and GPT), joined, plus a few
//! polyglots (a qcow2 header with an ISO volume descriptor at 32 KiB, a raw disk ending in a
//! VHD footer).

#![no_main]

use glimpse_formats::{detect, Format};
use glimpse_fuzz::{Mem, ShortReads};
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    let Ok(d) = detect(&Mem(data)) else {
        panic!("detect on memory cannot fail")
    };
    assert!(
        !d.matches.contains(&Format::Raw),
        "raw is what nothing matched, never a match"
    );
    let mut sorted = d.matches.clone();
    sorted.dedup();
    assert_eq!(sorted, d.matches, "duplicate matches");
    let order = |f: &Format| Format::ALL.iter().position(|g| g == f);
    assert!(
        d.matches.windows(2).all(|w| order(&w[0]) < order(&w[1])),
        "matches out of Format::ALL order"
    );
    // Ambiguous: two formats, or a container whose first sector is also a partition table.
    let container = !matches!(d.format(), Format::Raw | Format::Iso | Format::Ova);
    assert_eq!(
        d.is_ambiguous(),
        d.matches.len() > 1 || (d.partition_table && container)
    );
    // Detection reads bounded windows; how the source splits its reads must not matter.
    let short = ShortReads(data.to_vec());
    let Ok(d2) = detect(&short) else {
        panic!("detect on memory cannot fail")
    };
    assert_eq!(d, d2, "detection depends on read sizes");
    Corpus::Keep
});
