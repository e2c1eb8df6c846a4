//! Formats that qemu-img opens and glimpse does not read: detected by the signatures qemu's
//! drivers probe, so that none of them is ever passed as raw, and rejected by name
//! (`format.unsupported`).
//!
//! Each probe is a superset of qemu's: where qemu also checks a version or a sub-type, any
//! value is accepted here, because a file with the magic is at best a broken image of that
//! format, never a raw disk.
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

/// The UDIF trailer magic of a DMG.
const KOLY: &[u8; 4] = b"koly";
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

/// True when a `koly` UDIF trailer starts within the last [`DMG_SEARCH`] bytes. qemu itself
/// probes DMG by the `.dmg` file name; the trailer is what it then reads, so glimpse looks
/// for the trailer whatever the file is called.
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
                    v[5000 - 512..5000 - 508].copy_from_slice(b"koly");
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
        v[8192 - 512..8192 - 508].copy_from_slice(b"koly");
        assert_eq!(detect(&v).unwrap().matches, vec![Format::Qcow2]);
        let mut v = vec![0u8; 40960];
        v[32769..32774].copy_from_slice(b"CD001");
        v[40960 - 512..40960 - 508].copy_from_slice(b"koly");
        assert_eq!(detect(&v).unwrap().matches, vec![Format::Iso, Format::Dmg]);
        // A koly more than 1023 bytes before the end is not a trailer.
        let mut v = vec![0u8; 5000];
        v[5000 - 1030..5000 - 1026].copy_from_slice(b"koly");
        assert_eq!(detect(&v).unwrap().matches, vec![]);
    }
}
