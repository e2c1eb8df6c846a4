//! Format detection over bounded windows of a source.
//!
//! Detection reads three windows: the head (64 KiB), the ISO 9660 volume descriptor area
//! (32 KiB to 64 KiB, which the head already covers), and the last 1 KiB (the VHD footer in
//! its last 512 bytes, a DMG `koly` trailer). It returns every format that matches: more than
//! one match is itself a finding, because a file that is both qcow2 and ISO is an attack.
//!
//! Detection is a superset of qemu's probes (each driver's `*_probe`, which see the first
//! 2 KiB, plus the DMG trailer): whatever qemu would open as a format is never called raw.
//! Magic numbers are compared within the first bytes zero-padded past the end of a short file,
//! as qemu reads them ([`crate::probe::QEMU_PROBE_LEN`]); the VHD footer, the DMG trailer and
//! the ISO descriptors are looked for in the file's real bytes.
//! Formats glimpse does not read are detected too ([`crate::unsupported`]) and rejected by
//! name.

use crate::error::Result;
use crate::format::Format;
use crate::io::ReadAt;
// The windows live in `probe`, which every format imports; re-exported for existing callers.
pub use crate::probe::{Probe, HEAD_LEN, TAIL_LEN, TRAILER_LEN};

/// The outcome of detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// Every non-raw format that matched, in `Format::ALL` order. Empty means raw.
    pub matches: Vec<Format>,
    /// The first sector ends in the MBR signature (0x55AA) and is not a FAT boot sector to
    /// every reader ([`crate::partition::table_signature`]): a partition table to something
    /// that reads the file as a raw disk. Glance's format inspector reports such a file as
    /// `gpt`, and the kernel reads its entries, so a qcow2 (or any container) carrying it is
    /// two formats and is refused.
    pub partition_table: bool,
}

impl Detection {
    /// The single detected format: the only match, `Raw` when nothing matched, or the first
    /// match when several did (the caller must treat that as ambiguous).
    pub fn format(&self) -> Format {
        self.matches.first().copied().unwrap_or(Format::Raw)
    }
    /// True when more than one format matched, or a container format (anything but raw, ISO
    /// and OVA, which hold partition tables as content or not at all) also carries a
    /// partition-table signature in its first sector.
    pub fn is_ambiguous(&self) -> bool {
        self.matches.len() > 1 || self.container_with_partition_table()
    }

    fn container_with_partition_table(&self) -> bool {
        self.partition_table && !matches!(self.format(), Format::Raw | Format::Iso | Format::Ova)
    }

    /// The names of what matched, for messages: the formats, then `mbr/gpt` when a container
    /// also carries a partition-table signature.
    pub fn names(&self) -> Vec<&'static str> {
        let mut n: Vec<&'static str> = self.matches.iter().map(|f| f.name()).collect();
        if self.container_with_partition_table() {
            n.push("mbr/gpt");
        }
        n
    }
}

/// Detects every format the source matches.
///
/// # Errors
/// `Io` when the source cannot be read.
///
/// # Security
/// Reads at most `HEAD_LEN + TRAILER_LEN` bytes plus a bounded walk of tar headers.
pub fn detect(src: &dyn ReadAt) -> Result<Detection> {
    let probe = Probe::new(src)?;
    Ok(detect_probe(&probe))
}

/// Detection on already-read windows.
pub fn detect_probe(p: &Probe<'_>) -> Detection {
    let mut matches = Vec::new();
    for f in Format::ALL {
        let hit = match f {
            Format::Qcow2 => crate::qcow2::probe(p),
            Format::Qed => crate::qcow2::qed::probe(p),
            Format::Vmdk => crate::vmdk::probe(p),
            Format::Vhd => crate::vhd::probe(p),
            Format::Vhdx => crate::vhdx::probe(p),
            Format::Vdi => crate::vdi::probe(p),
            Format::Luks => crate::luks::probe(p),
            Format::Iso => crate::iso::probe(p),
            // A tar holds at least one 512-byte header: a shorter file, zero-padded for the
            // magic probes, is no archive.
            Format::Ova => p.size >= 512 && crate::ova::probe(p),
            Format::Qcow1 => crate::unsupported::probe_qcow1(p),
            Format::Parallels => crate::parallels::probe(p),
            Format::Bochs => crate::unsupported::probe_bochs(p),
            Format::Cloop => crate::unsupported::probe_cloop(p),
            Format::Dmg => crate::unsupported::probe_dmg(p),
            Format::Raw => false,
        };
        if hit {
            matches.push(f);
        }
    }
    // A fixed VHD is the guest disk followed by a footer, so an ISO written into one is its
    // content, not a second reading of the file: qemu (which has no ISO driver) and Glance
    // both see a VHD. Any other overlap stays ambiguous.
    let fixed_vhd = matches.contains(&Format::Vhd) && !p.starts_with(b"conectix");
    if fixed_vhd && matches.len() == 2 && matches.contains(&Format::Iso) {
        matches.retain(|f| *f != Format::Iso);
    }
    // qcow version 1 carries the qcow2 magic; the version says which driver qemu uses.
    if matches.contains(&Format::Qcow1) {
        matches.retain(|f| *f != Format::Qcow2);
    }
    // qemu scores cloop and DMG (2) below every format it knows by a magic number at byte 0
    // (100), so a qcow2 whose last guest sector holds `koly` is a qcow2 to qemu, not an
    // ambiguity. ISO, OVA and a footer-only VHD are raw to qemu: those overlaps stay.
    let by_magic = |f: &Format| match f {
        Format::Iso | Format::Ova | Format::Dmg | Format::Cloop | Format::Raw => false,
        Format::Vhd => p.starts_with(b"conectix"),
        _ => true,
    };
    if matches.iter().any(by_magic) {
        matches.retain(|f| !matches!(f, Format::Dmg | Format::Cloop));
    }
    // A fixed (footer-only) VHD's first sector is guest data: its partition table is content,
    // as a raw disk's is.
    let partition_table = !fixed_vhd && crate::partition::table_signature(&p.head);
    Detection {
        matches,
        partition_table,
    }
}
