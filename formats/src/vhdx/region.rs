//! The region table: where the BAT and the metadata region live.

use nom::number::complete::{le_u32, le_u64};
use nom::Parser;

use super::header::{checksum_ok, guid, nom_err, Guid, CHECKSUM_OFFSET};
use crate::error::{Error, Result};

/// Offset of region table 1 (192 KiB).
pub const REGION1_OFFSET: u64 = 192 * 1024;
/// Offset of region table 2 (256 KiB).
pub const REGION2_OFFSET: u64 = 256 * 1024;
/// Bytes of a region table covered by its checksum: the whole 64 KiB block.
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// "regi": region table signature.
pub const REGION_SIGNATURE: u32 = u32::from_le_bytes(*b"regi");
/// "Per spec, maximum region table entry count is 2047."
pub const MAX_REGION_ENTRIES: u32 = 2047;
/// Region entry flag: "parser must understand this entry in order to open file".
pub const REGION_REQUIRED: u32 = 1;

/// BAT region GUID 2DC27766-F623-4200-9D64-115E9BFD4A08.
pub const BAT_GUID: Guid = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// Metadata region GUID 8B7CA206-4790-4B9A-B8FE-575F050F886E.
pub const METADATA_GUID: Guid = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);

/// One region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// "128-bit unique identifier" of the object.
    pub guid: Guid,
    /// "Offset of the object in the file. Must be multiple of 1MB", in bytes.
    pub offset: u64,
    /// "Length, in bytes, of the object."
    pub length: u32,
    /// Flags; bit 0 = required.
    pub flags: u32,
}

/// What a region table holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    /// The BAT region.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
    /// Every entry, known or not (for overlap checks).
    pub all: Vec<Region>,
}

/// True when the 64 KiB block has the "regi" signature and a valid CRC-32C.
pub fn table_valid(buf: &[u8]) -> bool {
    buf.len() == REGION_TABLE_SIZE
        && buf.get(..4) == Some(&REGION_SIGNATURE.to_le_bytes()[..])
        && checksum_ok(buf, CHECKSUM_OFFSET)
}

/// Parses a region table whose checksum was already verified.
///
/// # Errors
/// `Invalid` (`vhdx.region-table`) for too many entries, or a missing or duplicated BAT or
/// metadata entry; `Unsupported` (`vhdx.unknown-region`) for a required region glimpse does
/// not know (the spec says a parser must then refuse the file).
pub fn parse(buf: &[u8], base: u64) -> Result<RegionTable> {
    let bad = |msg: String| Error::invalid(msg).at(base).code("vhdx.region-table");
    let (mut rest, (_sig, _crc, count, _reserved)) = (le_u32, le_u32, le_u32, le_u32)
        .parse(buf)
        .map_err(|e| nom_err("region table", base, buf.len(), e))?;
    if count > MAX_REGION_ENTRIES {
        return Err(bad(format!(
            "region table has {count} entries (at most {MAX_REGION_ENTRIES})"
        )));
    }
    let mut bat = None;
    let mut metadata = None;
    let mut all = Vec::new();
    for i in 0..count {
        let at = base
            .saturating_add(16)
            .saturating_add(u64::from(i).saturating_mul(32));
        let (r, (g, offset, length, flags)) =
            (nom::bytes::complete::take(16usize), le_u64, le_u32, le_u32)
                .parse(rest)
                .map_err(|e| nom_err("region table entry", base, buf.len(), e))?;
        rest = r;
        let guid = <[u8; 16]>::try_from(g).map_err(|_| bad("region GUID".into()))?;
        let region = Region {
            guid,
            offset,
            length,
            flags,
        };
        all.push(region);
        let slot = if guid == BAT_GUID {
            &mut bat
        } else if guid == METADATA_GUID {
            &mut metadata
        } else {
            if flags & REGION_REQUIRED != 0 {
                return Err(Error::unsupported(format!(
                    "region table entry {i} is a required region of unknown type {}",
                    guid_string(&guid)
                ))
                .at(at)
                .code("vhdx.unknown-region"));
            }
            continue;
        };
        if slot.is_some() {
            return Err(bad(format!("region {} appears twice", guid_string(&guid))).at(at));
        }
        *slot = Some(region);
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(RegionTable { bat, metadata, all }),
        (None, _) => Err(bad("region table has no BAT entry".into())),
        (_, None) => Err(bad("region table has no metadata entry".into())),
    }
}

/// Formats an on-disk GUID in the usual `XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX` form.
pub fn guid_string(g: &Guid) -> String {
    let b = |i: usize| g.get(i).copied().unwrap_or(0);
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        u32::from_le_bytes([b(0), b(1), b(2), b(3)]),
        u16::from_le_bytes([b(4), b(5)]),
        u16::from_le_bytes([b(6), b(7)]),
        b(8),
        b(9),
        b(10),
        b(11),
        b(12),
        b(13),
        b(14),
        b(15)
    )
}
