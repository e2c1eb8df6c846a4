//! Formats that qemu-img opens and glimpse does not read: detected by the signatures qemu's
//! drivers probe, so that none of them is ever passed as raw, and rejected by name
//! (`format.unsupported`).
//!
//! Each probe is a superset of qemu's: where qemu also checks a version or a sub-type, any
//! value is accepted here, because a file with the magic is at best a broken image of that
//! format, never a raw disk. DMG is the exception: qemu never probes its content (only the
//! `.dmg` file name), and its 4-byte magic near the end of a file is common enough in guest
//! data that glimpse asks for the trailer's fixed version and size fields too.
//!
//! Sources: qemu `block/qcow.c` (`qcow_probe`), `block/bochs.c` (`bochs_probe`), `block/cloop.c` (`cloop_probe`) and `block/dmg.c`
//! (`dmg_find_koly_offset`).

use crate::error::{Error, Result};
use crate::format::Format;
use crate::probe::Probe;

/// qcow (version 1) and qcow2 share the magic `QFI\xfb`; the big-endian version at byte 4
/// tells them apart (qemu's qcow driver claims version 1, the qcow2 driver 2 and 3).
const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";
/// The only version qemu's qcow driver opens.
const QCOW1_VERSION: [u8; 4] = [0, 0, 0, 1];

/// Bochs header magic at byte 0 (a NUL-terminated string in a 32-byte field).
const BOCHS_MAGIC: &[u8] = b"Bochs Virtual HD Image";

/// The start of the shell preamble of a cloop V2.0 image. qemu compares the whole first
/// three lines; the first two are enough to call a file cloop.
const CLOOP_MAGIC: &[u8] = b"#!/bin/sh\n#V2.0 Format\n";

/// The start of a UDIF trailer (Apple's `UDIFResourceFile`, all fields big-endian): the
/// magic `koly`, the version (4, the only one Apple writes) and the header size (512 bytes,
/// the trailer's own length). qemu reads only the magic, but every DMG writer puts the two
/// fields after it; requiring them keeps text that happens to contain `koly` ("školy") raw.
const KOLY: &[u8; 12] = b"koly\0\0\0\x04\0\0\x02\0";
/// How far from the end a `koly` trailer is searched. qemu rounds the file size up to a
/// sector and searches the 515 bytes that start 1023 bytes before that rounded end, so on
/// the real size the trailer starts within the last 1023 bytes.
pub const DMG_SEARCH: usize = 1023;

/// True for a qcow version 1 image.
pub fn probe_qcow1(p: &Probe<'_>) -> bool {
    p.starts_with(QCOW_MAGIC) && p.head_at(4, 4) == Some(&QCOW1_VERSION[..])
}

/// True for a Bochs image (the magic string; any type, sub-type and version).
pub fn probe_bochs(p: &Probe<'_>) -> bool {
    p.starts_with(BOCHS_MAGIC)
}

/// True for a cloop V2.0 image.
pub fn probe_cloop(p: &Probe<'_>) -> bool {
    p.starts_with(CLOOP_MAGIC)
}

/// True when a UDIF trailer (magic `koly`, version 4, header size 512) starts within the
/// last [`DMG_SEARCH`] bytes. qemu itself probes DMG by the `.dmg` file name; the trailer is
/// what it then reads, so glimpse looks for the trailer whatever the file is called, where
/// qemu's `dmg_find_koly_offset` looks for it.
pub fn probe_dmg(p: &Probe<'_>) -> bool {
    let t = &p.trailer;
    let from = t.len().saturating_sub(DMG_SEARCH);
    t.get(from..)
        .is_some_and(|w| w.windows(KOLY.len()).any(|x| x == KOLY))
}

/// True for the formats this module detects.
pub fn is_unsupported(format: Format) -> bool {
    matches!(
        format,
        Format::Qcow1 | Format::Bochs | Format::Cloop | Format::Dmg
    )
}

/// The message of the `format.unsupported` rejection for `format`.
pub fn message(format: Format) -> String {
    format!("{format} image: glimpse does not read this format")
}

/// The error of opening a format glimpse does not read.
///
/// # Errors
/// Always `Unsupported`, code `format.unsupported`.
pub fn open(format: Format) -> Result<Box<dyn crate::image::Image>> {
    Err(Error::unsupported(message(format)).code("format.unsupported"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::detect;

    fn with(head: &[u8], len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        v[..head.len()].copy_from_slice(head);
        v
    }

    #[test]
    fn each_signature_is_its_format() {
        let cases: [(Vec<u8>, Format); 4] = [
            (with(b"QFI\xfb\0\0\0\x01", 4096), Format::Qcow1),
            (with(b"Bochs Virtual HD Image\0", 4096), Format::Bochs),
            (
                with(b"#!/bin/sh\n#V2.0 Format\nmodprobe", 4096),
                Format::Cloop,
            ),
            (
                {
                    let mut v = vec![0u8; 5000];
                    v[5000 - 512..5000 - 500].copy_from_slice(KOLY);
                    v
                },
                Format::Dmg,
            ),
        ];
        for (bytes, want) in cases {
            let d = detect(&bytes).unwrap();
            assert_eq!(d.matches, vec![want], "{want}");
            assert!(is_unsupported(want));
            let e = open(want).err().unwrap();
            assert_eq!(e.finding_code(), "format.unsupported");
            assert!(e.message().contains(want.name()), "{}", e.message());
        }
    }

    #[test]
    fn qcow2_versions_stay_qcow2_and_near_misses_are_raw() {
        let d = detect(&with(b"QFI\xfb\0\0\0\x03", 4096)).unwrap();
        assert_eq!(d.matches, vec![Format::Qcow2]);
        for bytes in [
            with(b"WithoutFreeSpac", 4096),
            with(b"Bochs Virtual HD", 4096),
            with(b"#!/bin/sh\n#V1.0 Format\n", 4096),
        ] {
            assert_eq!(detect(&bytes).unwrap().matches, vec![]);
        }
        // A koly trailer at the end of a qcow2 is guest data to qemu (its qcow2 probe wins);
        // at the end of an ISO (which qemu opens as raw) it stays an ambiguity.
        let mut v = with(b"QFI\xfb\0\0\0\x03", 8192);
        v[8192 - 512..8192 - 500].copy_from_slice(KOLY);
        assert_eq!(detect(&v).unwrap().matches, vec![Format::Qcow2]);
        let mut v = vec![0u8; 40960];
        v[32769..32774].copy_from_slice(b"CD001");
        v[40960 - 512..40960 - 500].copy_from_slice(KOLY);
        assert_eq!(detect(&v).unwrap().matches, vec![Format::Iso, Format::Dmg]);
        // A koly more than 1023 bytes before the end is not a trailer.
        let mut v = vec![0u8; 5000];
        v[5000 - 1030..5000 - 1018].copy_from_slice(KOLY);
        assert_eq!(detect(&v).unwrap().matches, vec![]);
    }

    /// A raw disk whose last KiB holds text with `koly` in it ("školy", report F6) is raw;
    /// the magic followed by the trailer's version 4 and header size 512 is a DMG, wherever
    /// qemu would look for it, and with either field changed it is raw again.
    #[test]
    fn only_a_udif_trailer_is_dmg_not_the_word_koly() {
        let size = 4 << 20;
        let mut v = vec![0u8; size];
        let text = "Seznam základní školy v Praze\n".as_bytes();
        v[size - 300..size - 300 + text.len()].copy_from_slice(text);
        assert_eq!(detect(&v).unwrap().matches, vec![]);
        // "koly" followed by bytes that are neither version 4 nor size 512.
        let mut v = vec![0u8; size];
        v[size - 512..size - 508].copy_from_slice(b"koly");
        assert_eq!(detect(&v).unwrap().matches, vec![]);
        for (field, value) in [(4usize, [0, 0, 0, 3]), (8, [0, 0, 1, 0])] {
            let mut v = vec![0u8; size];
            v[size - 512..size - 500].copy_from_slice(KOLY);
            v[size - 512 + field..size - 508 + field].copy_from_slice(&value);
            assert_eq!(detect(&v).unwrap().matches, vec![], "field at {field}");
        }
        // A minimal trailer: the last 512 bytes, or (odd file sizes, as qemu allows) ending
        // up to 511 bytes before the end.
        for (len, at) in [
            (size, size - 512),
            (size + 7, size - 505),
            (5000, 5000 - 1023),
        ] {
            let mut v = vec![0u8; len];
            v[at..at + 12].copy_from_slice(KOLY);
            assert_eq!(detect(&v).unwrap().matches, vec![Format::Dmg], "{len} {at}");
        }
    }
}
