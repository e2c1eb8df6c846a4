//! The hosted sparse extent header (`SparseExtentHeader`, 512 bytes at sector 0, and again in
//! a streamOptimized footer).
//!
//! Layout from VMware's `vmdk/vmware_vmdk.h` (open-vmdk); field checks follow what VMware's
//! own reader (`vmdk/sparse.c`) and qemu (`block/vmdk.c`) refuse.

use nom::number::complete::{le_u16, le_u32, le_u64, le_u8};
use nom::Parser;

use crate::error::{Error, Result};

/// Bytes per sector: every VMDK offset and size is counted in these.
pub const SECTOR: u64 = 512;
/// Size of the on-disk header.
pub const HEADER_LEN: usize = 512;
/// `magicNumber`: "KDMV" read as a little-endian u32 ("VMDK" in memory order reversed).
pub const MAGIC: u32 = 0x564d_444b;
/// The magic as the first four bytes of the file.
pub const MAGIC_BYTES: &[u8; 4] = b"KDMV";
/// Highest `version` VMware's reader and qemu accept (`SPARSE_VERSION_INCOMPAT_FLAGS`).
pub const MAX_VERSION: u32 = 3;
/// `gdOffset` value meaning "the grain directory is found through the footer".
pub const GD_AT_END: u64 = u64::MAX;

/// Flag: the four newline-detection characters are valid.
pub const FLAG_NEWLINE_DETECT: u32 = 1 << 0;
/// Flag: a redundant grain directory (and tables) is kept at `rgdOffset`.
pub const FLAG_REDUNDANT: u32 = 1 << 1;
/// Flag: a grain table entry of 1 means "this grain reads as zeros" (`SPARSEFLAG_MAGIC_GTE`).
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: grains and metadata are preceded by markers (`SPARSEFLAG_EMBEDDED_LBA`).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// Incompatible flags this reader understands; any other bit in the upper half refuses the
/// image, as VMware's reader does.
pub const KNOWN_INCOMPAT: u32 = FLAG_COMPRESSED | FLAG_MARKERS;

/// `compressAlgorithm`: none.
pub const COMPRESS_NONE: u16 = 0;
/// `compressAlgorithm`: deflate, stored as zlib streams (RFC 1950).
pub const COMPRESS_DEFLATE: u16 = 1;

/// Largest grain accepted, in sectors. VMware's writer and qemu-img always write 128
/// (64 KiB); VMware's reader refuses more than 128, qemu more than 0x200000 (1 GiB). 2048
/// sectors (1 MiB) leaves room for odd writers while keeping a compressed grain's inflated
/// size small.
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest `numGTEsPerGT`: qemu refuses more than 512 ("L2 table size too big").
pub const MAX_GTES_PER_GT: u32 = 512;
/// Largest grain directory: qemu refuses more than 32 Mi entries (`vmdk_add_extent`, "L1 size
/// too big"), 128 MiB of directory.
pub const MAX_GD_ENTRIES: u64 = 32 << 20;

/// The parsed sparse extent header. Offsets and sizes are in sectors, as on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    /// `version`: 1, 2 (zeroed-grain GTEs) or 3 (changed block tracking / streams).
    pub version: u32,
    /// `flags`: feature bits (`FLAG_*`).
    pub flags: u32,
    /// `capacity`: size of the extent's guest data, in sectors.
    pub capacity: u64,
    /// `grainSize`: size of one grain, in sectors.
    pub grain_size: u64,
    /// `descriptorOffset`: sector of the embedded descriptor (0 = none).
    pub descriptor_offset: u64,
    /// `descriptorSize`: length of the embedded descriptor area, in sectors.
    pub descriptor_size: u64,
    /// `numGTEsPerGT`: entries in one grain table.
    pub gtes_per_gt: u32,
    /// `rgdOffset`: sector of the redundant grain directory.
    pub rgd_offset: u64,
    /// `gdOffset`: sector of the grain directory, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// `overHead`: sectors of metadata before the first grain.
    pub overhead: u64,
    /// `uncleanShutdown`: nonzero when the extent was not closed cleanly.
    pub unclean_shutdown: u8,
    /// The newline-detection characters `\n`, ` `, `\r`, `\n`.
    pub newline_chars: [u8; 4],
    /// `compressAlgorithm`: [`COMPRESS_NONE`] or [`COMPRESS_DEFLATE`].
    pub compress_algorithm: u16,
}

impl SparseHeader {
    /// Parses the 512-byte header in `buf` (which must start with the magic). `at` is the
    /// header's offset in the file, for messages.
    ///
    /// # Errors
    /// `Truncated` when `buf` is short; `Invalid` (`format.invalid`) when the magic is wrong.
    pub fn parse(buf: &[u8], at: u64) -> Result<Self> {
        let mut fields = (
            le_u32::<&[u8], nom::error::Error<&[u8]>>,
            le_u32,
            le_u32,
            le_u64,
            le_u64,
            le_u64,
            le_u64,
            le_u32,
            le_u64,
            le_u64,
            le_u64,
            le_u8,
            (le_u8, le_u8, le_u8, le_u8),
            le_u16,
        );
        let (_, parsed) = fields.parse(buf).map_err(|_| {
            Error::truncated(format!(
                "VMDK sparse header needs 79 bytes, {} present",
                buf.len()
            ))
            .at(at)
        })?;
        let (
            magic,
            version,
            flags,
            capacity,
            grain_size,
            descriptor_offset,
            descriptor_size,
            gtes_per_gt,
            rgd_offset,
            gd_offset,
            overhead,
            unclean_shutdown,
            nl,
            compress_algorithm,
        ) = parsed;
        if magic != MAGIC {
            return Err(Error::invalid(format!("bad VMDK sparse magic {magic:#010x}")).at(at));
        }
        Ok(SparseHeader {
            version,
            flags,
            capacity,
            grain_size,
            descriptor_offset,
            descriptor_size,
            gtes_per_gt,
            rgd_offset,
            gd_offset,
            overhead,
            unclean_shutdown,
            newline_chars: [nl.0, nl.1, nl.2, nl.3],
            compress_algorithm,
        })
    }

    /// True when grains are zlib-compressed. qemu decides this from `compressAlgorithm`
    /// alone; [`SparseHeader::validate`] refuses headers whose flag disagrees.
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESS_DEFLATE
    }

    /// True when grains carry markers.
    pub fn markers(&self) -> bool {
        self.flags & FLAG_MARKERS != 0
    }

    /// True when a grain table entry of 1 means a zero grain.
    pub fn zero_grain(&self) -> bool {
        self.flags & FLAG_ZERO_GRAIN != 0
    }

    /// Grain size in bytes (valid after [`SparseHeader::validate`]).
    pub fn grain_bytes(&self) -> u64 {
        self.grain_size.saturating_mul(SECTOR)
    }

    /// Checks the fields every reader relies on. `at` is the header's file offset.
    ///
    /// # Errors
    /// `Unsupported` (`vmdk.header`) for an unknown version, unknown incompatible flags or
    /// an unknown compression algorithm; `Invalid` (`vmdk.header`) for inconsistent fields;
    /// `Invalid` (`vmdk.grain-size`) for a grain size that is zero, not a power of two, or
    /// larger than [`MAX_GRAIN_SECTORS`]; `LimitExceeded` (`table.too-large`) for a grain
    /// directory of more than [`MAX_GD_ENTRIES`].
    pub fn validate(&self, at: u64) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m).at(at).code("vmdk.header"));
        if self.version == 0 || self.version > MAX_VERSION {
            return Err(Error::unsupported(format!(
                "VMDK sparse version {} (1 to 3 are known)",
                self.version
            ))
            .at(at)
            .code("vmdk.header"));
        }
        let unknown = self.flags & 0xFFFF_0000 & !KNOWN_INCOMPAT;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "unknown incompatible VMDK flags {unknown:#x}"
            ))
            .at(at)
            .code("vmdk.header"));
        }
        // A file that went through an ASCII-mode transfer has these rewritten; VMware's reader
        // refuses it, qemu does not look. Stricter is safer: the rest of the file is mangled too.
        if self.flags & FLAG_NEWLINE_DETECT != 0 && self.newline_chars != *b"\n \r\n" {
            return bad(
                "VMDK newline-detection characters are damaged (ASCII-mode transfer?)".into(),
            );
        }
        match self.compress_algorithm {
            COMPRESS_NONE => {
                if self.flags & (FLAG_COMPRESSED | FLAG_MARKERS) != 0 {
                    return bad("VMDK flags say compressed or marked grains but no compression algorithm is set".into());
                }
            }
            COMPRESS_DEFLATE => {
                // qemu reads markerless compressed grains as a whole grain of zlib data;
                // VMware's reader expects a 4-byte length. Nobody writes them: refuse.
                if !self.markers() {
                    return Err(Error::unsupported("compressed VMDK grains without markers")
                        .at(at)
                        .code("vmdk.header"));
                }
            }
            other => {
                return Err(
                    Error::unsupported(format!("VMDK compression algorithm {other}"))
                        .at(at)
                        .code("vmdk.header"),
                )
            }
        }
        if self.grain_size == 0
            || !self.grain_size.is_power_of_two()
            || self.grain_size > MAX_GRAIN_SECTORS
        {
            return Err(Error::invalid(format!(
                "VMDK grain size of {} sectors (must be a power of two up to {MAX_GRAIN_SECTORS})",
                self.grain_size
            ))
            .at(at.saturating_add(20))
            .code("vmdk.grain-size"));
        }
        if self.gtes_per_gt == 0 || self.gtes_per_gt > MAX_GTES_PER_GT {
            return Err(Error::invalid(format!(
                "VMDK grain tables of {} entries (1 to {MAX_GTES_PER_GT} allowed)",
                self.gtes_per_gt
            ))
            .at(at.saturating_add(44))
            .code("vmdk.header"));
        }
        if self.capacity.checked_mul(SECTOR).is_none() {
            return bad(format!(
                "VMDK capacity of {} sectors overflows",
                self.capacity
            ));
        }
        if self.gd_entries() > MAX_GD_ENTRIES {
            return Err(Error::limit(format!(
                "VMDK grain directory of {} entries exceeds qemu's {MAX_GD_ENTRIES}",
                self.gd_entries()
            ))
            .at(at.saturating_add(12))
            .code("table.too-large"));
        }
        Ok(())
    }

    /// Bytes of guest data one grain table covers.
    pub fn gt_coverage(&self) -> u64 {
        self.grain_bytes()
            .saturating_mul(u64::from(self.gtes_per_gt))
    }

    /// Number of grain directory entries: one per grain table needed to cover `capacity`.
    pub fn gd_entries(&self) -> u64 {
        let per = self
            .grain_size
            .saturating_mul(u64::from(self.gtes_per_gt))
            .max(1);
        self.capacity.div_ceil(per)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A qemu-img style monolithicSparse header.
    pub(crate) fn sample() -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(MAGIC_BYTES);
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&3u32.to_le_bytes());
        h[12..20].copy_from_slice(&10240u64.to_le_bytes());
        h[20..28].copy_from_slice(&128u64.to_le_bytes());
        h[28..36].copy_from_slice(&1u64.to_le_bytes());
        h[36..44].copy_from_slice(&20u64.to_le_bytes());
        h[44..48].copy_from_slice(&512u32.to_le_bytes());
        h[48..56].copy_from_slice(&21u64.to_le_bytes());
        h[56..64].copy_from_slice(&26u64.to_le_bytes());
        h[64..72].copy_from_slice(&128u64.to_le_bytes());
        h[73..77].copy_from_slice(b"\n \r\n");
        h
    }

    #[test]
    fn parses_and_validates_a_qemu_header() {
        let h = SparseHeader::parse(&sample(), 0).unwrap();
        h.validate(0).unwrap();
        assert_eq!(
            (h.capacity, h.grain_bytes(), h.gd_entries()),
            (10240, 65536, 1)
        );
        assert!(!h.compressed());
    }

    #[test]
    fn the_grain_directory_is_capped_where_qemu_caps_it() {
        // Grains of 128 sectors, 512 per table: one directory entry per 65536 sectors.
        let with_capacity = |sectors: u64| {
            let mut b = sample();
            b[12..20].copy_from_slice(&sectors.to_le_bytes());
            SparseHeader::parse(&b, 0).and_then(|h| h.validate(0))
        };
        with_capacity(MAX_GD_ENTRIES * 65536).unwrap();
        let e = with_capacity(MAX_GD_ENTRIES * 65536 + 1).unwrap_err();
        assert_eq!(
            (e.kind(), e.finding_code(), e.offset()),
            (
                crate::error::ErrorKind::LimitExceeded,
                "table.too-large",
                Some(12)
            )
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let mutate = |off: usize, bytes: &[u8]| {
            let mut b = sample();
            b[off..off + bytes.len()].copy_from_slice(bytes);
            SparseHeader::parse(&b, 0)
                .and_then(|h| h.validate(0))
                .unwrap_err()
        };
        assert_eq!(
            mutate(20, &100u64.to_le_bytes()).finding_code(),
            "vmdk.grain-size"
        );
        assert_eq!(
            mutate(20, &0u64.to_le_bytes()).finding_code(),
            "vmdk.grain-size"
        );
        assert_eq!(
            mutate(20, &(1u64 << 40).to_le_bytes()).finding_code(),
            "vmdk.grain-size"
        );
        assert_eq!(mutate(4, &4u32.to_le_bytes()).finding_code(), "vmdk.header");
        assert_eq!(
            mutate(8, &(3u32 | 1 << 20).to_le_bytes()).finding_code(),
            "vmdk.header"
        );
        assert_eq!(
            mutate(44, &1024u32.to_le_bytes()).finding_code(),
            "vmdk.header"
        );
        assert_eq!(mutate(75, b"\n").finding_code(), "vmdk.header");
        assert_eq!(
            mutate(77, &7u16.to_le_bytes()).finding_code(),
            "vmdk.header"
        );
        assert!(SparseHeader::parse(&sample()[..40], 0).is_err());
    }
}
