//! On-disk structures of a VHD: the hard disk footer and the dynamic disk header.
//!
//! Every field is big-endian. Facts from Microsoft's "Virtual Hard Disk Image Format
//! Specification" and QEMU's `block/vpc.c`.

use nom::bytes::complete::take;
use nom::number::complete::{be_u16, be_u32, be_u64, u8 as nom_u8};
use nom::IResult;

use crate::error::{Error, Result};

/// The footer's cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// The dynamic disk header's cookie.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Size of the footer.
pub const FOOTER_LEN: usize = 512;
/// Size of the dynamic disk header.
pub const DYN_HEADER_LEN: usize = 1024;
/// Offset of the checksum inside the footer.
pub const FOOTER_CHECKSUM_AT: usize = 64;
/// Offset of the checksum inside the dynamic disk header.
pub const DYN_CHECKSUM_AT: usize = 36;
/// Offset of the creator application inside the footer.
pub const CREATOR_APP_AT: usize = 28;
/// A BAT entry that maps no block.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Sector size, fixed by the spec.
pub const SECTOR: u64 = 512;
/// Largest CHS geometry (65535 cylinders × 16 heads × 255 sectors). QEMU takes the size from
/// the footer's current size whenever the geometry is this one, whatever the creator.
pub const MAX_GEOMETRY_SECTORS: u64 = 65535 * 16 * 255;
/// QEMU refuses disks of more than 2040 GiB (`VHD_MAX_SECTORS`, 0xff000000 sectors).
pub const MAX_SECTORS: u64 = 0xff00_0000;
/// QEMU refuses a BAT of more than `INT_MAX / 4` entries (block/vpc.c, "Max Table Entries too
/// large"): the BAT must fit in `INT_MAX` bytes.
pub const MAX_TABLE_ENTRIES: u32 = 0x7FFF_FFFF / 4;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

/// Disk type: fixed (data, then the footer).
pub const TYPE_FIXED: u32 = 2;
/// Disk type: dynamic (sparse, with a BAT).
pub const TYPE_DYNAMIC: u32 = 3;
/// Disk type: differencing (a dynamic disk over a parent).
pub const TYPE_DIFFERENCING: u32 = 4;

/// The hard disk footer (512 bytes; 511 in some old images).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// "Features": bit 0 temporary, bit 1 reserved (always set).
    pub features: u32,
    /// "File Format Version": major in the high 16 bits (1.0 = 0x00010000).
    pub version: u32,
    /// "Data Offset": absolute byte offset of the dynamic disk header; all ones for fixed
    /// disks.
    pub data_offset: u64,
    /// "Time Stamp": seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: u32,
    /// "Creator Application": four bytes naming the tool that made the image ("vpc ",
    /// "win ", "qemu", "qem2", "d2v ", "tap\0", "CTXS", "wa\0\0", ...).
    pub creator_app: [u8; 4],
    /// "Creator Version": major.minor of that tool.
    pub creator_version: (u16, u16),
    /// "Creator Host OS": "Wi2k" or "Mac ".
    pub creator_os: [u8; 4],
    /// "Original Size": the disk's size in bytes when it was created.
    pub original_size: u64,
    /// "Current Size": the disk's size in bytes now.
    pub current_size: u64,
    /// "Disk Geometry": cylinders.
    pub cylinders: u16,
    /// "Disk Geometry": heads.
    pub heads: u8,
    /// "Disk Geometry": sectors per track (cylinder).
    pub sectors: u8,
    /// "Disk Type": 2 fixed, 3 dynamic, 4 differencing.
    pub disk_type: u32,
    /// "Checksum": ones' complement of the byte sum of the footer without this field.
    pub checksum: u32,
    /// "Unique Id": 16-byte UUID.
    pub uuid: [u8; 16],
    /// "Saved State": 1 when the disk is in a saved state.
    pub saved_state: u8,
}

/// One of the eight parent locator entries of a dynamic disk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// "Platform Code": "W2ku", "W2ru", "Wi2r", "Wi2k", "Mac ", "MacX" or zero.
    pub platform: [u8; 4],
    /// "Platform Data Space": space reserved for the locator (sectors in the spec, bytes in
    /// Hyper-V's images).
    pub data_space: u32,
    /// "Platform Data Length": bytes of locator data.
    pub data_length: u32,
    /// "Platform Data Offset": absolute byte offset of the locator data.
    pub data_offset: u64,
}

/// The dynamic disk header (1024 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// "Data Offset": unused, all ones.
    pub data_offset: u64,
    /// "Table Offset": absolute byte offset of the Block Allocation Table.
    pub table_offset: u64,
    /// "Header Version": 0x00010000.
    pub version: u32,
    /// "Max Table Entries": BAT entries (4 bytes each).
    pub max_table_entries: u32,
    /// "Block Size": guest bytes per block, a power of two (2 MiB by default); the sector
    /// bitmap is not included.
    pub block_size: u32,
    /// "Checksum": ones' complement of the byte sum of the header without this field.
    pub checksum: u32,
    /// "Parent Unique ID": UUID of the parent (differencing disks).
    pub parent_uuid: [u8; 16],
    /// "Parent Time Stamp": seconds since 2000-01-01 of the parent's modification.
    pub parent_timestamp: u32,
    /// "Parent Unicode Name": UTF-16BE, 512 bytes, NUL padded.
    pub parent_name: [u8; 512],
    /// "Parent Locator Entries".
    pub locators: [ParentLocator; 8],
}

/// The VHD checksum: ones' complement of the byte sum of `buf` with the 4 bytes at
/// `skip_at` counted as zero.
pub fn checksum(buf: &[u8], skip_at: usize) -> u32 {
    let mut sum = 0u32;
    for (i, b) in buf.iter().enumerate() {
        if i < skip_at || i >= skip_at.saturating_add(4) {
            sum = sum.wrapping_add(u32::from(*b));
        }
    }
    !sum
}

fn arr4(i: &[u8]) -> IResult<&[u8], [u8; 4]> {
    let (i, b) = take(4usize)(i)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    Ok((i, a))
}

fn arr16(i: &[u8]) -> IResult<&[u8], [u8; 16]> {
    let (i, b) = take(16usize)(i)?;
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    Ok((i, a))
}

fn nom_err(what: &str, at: u64) -> Error {
    Error::truncated(format!("{what} is too short")).at(at)
}

fn footer_fields(i: &[u8]) -> IResult<&[u8], Footer> {
    let (i, _cookie) = take(8usize)(i)?;
    let (i, features) = be_u32(i)?;
    let (i, version) = be_u32(i)?;
    let (i, data_offset) = be_u64(i)?;
    let (i, timestamp) = be_u32(i)?;
    let (i, creator_app) = arr4(i)?;
    let (i, major) = be_u16(i)?;
    let (i, minor) = be_u16(i)?;
    let (i, creator_os) = arr4(i)?;
    let (i, original_size) = be_u64(i)?;
    let (i, current_size) = be_u64(i)?;
    let (i, cylinders) = be_u16(i)?;
    let (i, heads) = nom_u8(i)?;
    let (i, sectors) = nom_u8(i)?;
    let (i, disk_type) = be_u32(i)?;
    let (i, checksum) = be_u32(i)?;
    let (i, uuid) = arr16(i)?;
    let (i, saved_state) = nom_u8(i)?;
    Ok((
        i,
        Footer {
            features,
            version,
            data_offset,
            timestamp,
            creator_app,
            creator_version: (major, minor),
            creator_os,
            original_size,
            current_size,
            cylinders,
            heads,
            sectors,
            disk_type,
            checksum,
            uuid,
            saved_state,
        },
    ))
}

impl Footer {
    /// Parses a footer read at `at`. The cookie must already have been checked.
    ///
    /// # Errors
    /// `Truncated` when `buf` is shorter than the fields.
    pub fn parse(buf: &[u8], at: u64) -> Result<Footer> {
        footer_fields(buf)
            .map(|(_, f)| f)
            .map_err(|_| nom_err("VHD footer", at))
    }

    /// Sectors described by the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        // At most 65535 × 255 × 255: no overflow.
        u64::from(self.cylinders)
            .saturating_mul(u64::from(self.heads))
            .saturating_mul(u64::from(self.sectors))
    }

    /// True when QEMU sizes this disk by its CHS geometry rather than by the current size.
    ///
    /// QEMU 10 (`vpc_ignore_current_size`) distrusts the current size only for Virtual PC
    /// ("vpc ") and QEMU before 2.6 ("qemu"); every other creator's current size is used, and
    /// so is the current size of any disk whose geometry is the maximum 65535/16/255. Older
    /// QEMU releases trusted a list instead ("win ", "qem2", "d2v ", "CTXS", "tap\0"); the
    /// two agree for every creator either names. glimpse follows QEMU 10.
    pub fn qemu_uses_chs(&self) -> bool {
        (&self.creator_app == b"vpc " || &self.creator_app == b"qemu")
            && self.chs_sectors() != MAX_GEOMETRY_SECTORS
    }

    /// The creator application as text, trailing NULs and spaces trimmed.
    pub fn creator_name(&self) -> String {
        String::from_utf8_lossy(&self.creator_app)
            .trim_end_matches(['\0', ' '])
            .to_string()
    }
}

fn dyn_fields(i: &[u8]) -> IResult<&[u8], DynHeader> {
    let (i, _cookie) = take(8usize)(i)?;
    let (i, data_offset) = be_u64(i)?;
    let (i, table_offset) = be_u64(i)?;
    let (i, version) = be_u32(i)?;
    let (i, max_table_entries) = be_u32(i)?;
    let (i, block_size) = be_u32(i)?;
    let (i, checksum) = be_u32(i)?;
    let (i, parent_uuid) = arr16(i)?;
    let (i, parent_timestamp) = be_u32(i)?;
    let (i, _reserved) = be_u32(i)?;
    let (mut i, name) = take(512usize)(i)?;
    let mut parent_name = [0u8; 512];
    parent_name.copy_from_slice(name);
    let mut locators = [ParentLocator::default(); 8];
    for loc in &mut locators {
        let (r, platform) = arr4(i)?;
        let (r, data_space) = be_u32(r)?;
        let (r, data_length) = be_u32(r)?;
        let (r, _reserved) = be_u32(r)?;
        let (r, data_offset) = be_u64(r)?;
        *loc = ParentLocator {
            platform,
            data_space,
            data_length,
            data_offset,
        };
        i = r;
    }
    Ok((
        i,
        DynHeader {
            data_offset,
            table_offset,
            version,
            max_table_entries,
            block_size,
            checksum,
            parent_uuid,
            parent_timestamp,
            parent_name,
            locators,
        },
    ))
}

impl DynHeader {
    /// Parses a dynamic disk header read at `at`. The cookie must already have been checked.
    ///
    /// # Errors
    /// `Truncated` when `buf` is shorter than the fields.
    pub fn parse(buf: &[u8], at: u64) -> Result<DynHeader> {
        dyn_fields(buf)
            .map(|(_, h)| h)
            .map_err(|_| nom_err("VHD dynamic disk header", at))
    }

    /// The parent's name, decoded from UTF-16BE up to the first NUL.
    pub fn parent_name(&self) -> String {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(|c| {
                u16::from_be_bytes([
                    c.first().copied().unwrap_or(0),
                    c.get(1).copied().unwrap_or(0),
                ])
            })
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }
}

/// Bytes of the sector bitmap that precedes every block: one bit per 512-byte sector,
/// rounded up to a whole sector. (QEMU's formula yields 0 for blocks under 4 KiB, where the
/// spec says 512; glimpse refuses such block sizes, so the two never disagree.)
pub fn bitmap_len(block_size: u64) -> u64 {
    let bits = block_size.div_ceil(SECTOR);
    bits.div_ceil(8).div_ceil(SECTOR).saturating_mul(SECTOR)
}

/// The CHS geometry the VHD specification derives from a sector count (Appendix: "CHS
/// calculation"), as QEMU's `calculate_geometry` does it. It may describe fewer sectors than
/// asked: the geometry rounds down.
pub fn geometry(total_sectors: u64) -> (u16, u8, u8) {
    let total = total_sectors.min(MAX_GEOMETRY_SECTORS);
    let (spt, heads, cth): (u64, u64, u64) = if total >= 65535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let c = total / 17;
        let h = c.div_ceil(1024).max(4);
        if c < h.saturating_mul(1024) && h <= 16 {
            (17, h, c)
        } else if total / 31 < 16 * 1024 {
            (31, 16, total / 31)
        } else {
            (63, 16, total / 63)
        }
    };
    let cyls = cth.checked_div(heads).unwrap_or(0);
    (
        u16::try_from(cyls).unwrap_or(u16::MAX),
        u8::try_from(heads).unwrap_or(u8::MAX),
        u8::try_from(spt).unwrap_or(u8::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_qemu_examples() {
        // qemu-img create -f vpc 10M gives 302/4/17 (10514432 bytes after rounding up).
        assert_eq!(geometry(20536), (302, 4, 17));
        assert_eq!(geometry(u64::MAX), (65535, 16, 255));
        assert_eq!(bitmap_len(2 << 20), 512);
        assert_eq!(bitmap_len(4096), 512);
        assert_eq!(bitmap_len(256 << 20), 65536);
    }

    #[test]
    fn checksum_skips_its_field() {
        let mut b = [1u8; 512];
        b[64..68].copy_from_slice(&[9, 9, 9, 9]);
        assert_eq!(checksum(&b, 64), !508u32);
    }
}
