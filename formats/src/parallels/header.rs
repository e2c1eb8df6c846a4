//! The 64-byte Parallels header and the format extension cluster, as raw on-disk structures.
//!
//! Facts from qemu's `docs/interop/parallels.txt`, `block/parallels.c` and
//! `block/parallels-ext.c`. Every number is little-endian.

use nom::bytes::complete::take;
use nom::number::complete::{le_u32, le_u64};
use nom::IResult;

use crate::error::{Error, Result};

/// The magic of images whose BAT counts in sectors (and whose `nb_sectors` uses only its low
/// 32 bits).
pub const MAGIC_V1: &[u8; 16] = b"WithoutFreeSpace";
/// The magic of images whose BAT counts in clusters (`WithouFreSpacExt`, what qemu-img writes).
pub const MAGIC_EXT: &[u8; 16] = b"WithouFreSpacExt";
/// The only header version qemu opens (both magics).
pub const VERSION: u32 = 2;
/// Header length; the BAT follows at once.
pub const HEADER_LEN: u64 = 64;
/// Sector size: `tracks`, `data_off`, `ext_off` and (old magic) BAT entries count these.
pub const SECTOR: u64 = 512;
/// `inuse` while software has the image open read-write: the image was not closed cleanly.
pub const INUSE_OPEN: u32 = 0x746F_6E59;
/// `inuse` after a clean close.
pub const INUSE_CLOSED: u32 = 0x312E_3276;
/// qemu's cap on `tracks` (sectors per cluster): `INT32_MAX / 513`.
pub const MAX_TRACKS: u32 = 0x7FFF_FFFF / 513;
/// qemu's cap on BAT entries: the BAT must fit in `INT_MAX` bytes.
pub const MAX_BAT_ENTRIES: u32 = 0x7FFF_FFFF / 4;
/// "Format Extension" cluster magic.
pub const EXT_MAGIC: u64 = 0xAB23_4CEF_23DC_EA87;
/// Feature magic: end of features.
pub const FEATURE_END: u64 = 0;
/// Feature magic: dirty bitmap.
pub const FEATURE_DIRTY_BITMAP: u64 = 0x2038_5FAE_252C_B34A;
/// Bytes before the first feature: magic (8) and MD5 checksum (16).
pub const EXT_HEADER_LEN: usize = 24;
/// Bytes of a feature header: magic, flags, data size, padding.
pub const FEATURE_HEADER_LEN: usize = 24;
/// Bytes of a dirty bitmap feature before its L1 table.
pub const BITMAP_HEADER_LEN: usize = 32;

/// The Parallels header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// "magic": `WithoutFreeSpace` or `WithouFreSpacExt`.
    pub magic: [u8; 16],
    /// "version": must be 2.
    pub version: u32,
    /// "heads": guest geometry, unused.
    pub heads: u32,
    /// "cylinders": guest geometry, unused.
    pub cylinders: u32,
    /// "tracks": cluster size, in sectors.
    pub tracks: u32,
    /// "nb_bat_entries": disk size in clusters (the BAT length).
    pub bat_entries: u32,
    /// "nb_sectors": disk size in sectors (low 32 bits only for the old magic).
    pub nb_sectors: u64,
    /// "in_use": 0x746F6E59 while open read-write, 0x312e3276 when closed, or 0.
    pub inuse: u32,
    /// "data_off": start of the data area, in sectors (0 = right after the BAT, old magic).
    pub data_off: u32,
    /// "flags": bit 0 = empty image.
    pub flags: u32,
    /// "ext_off": the format extension cluster, in sectors (0 = none).
    pub ext_off: u64,
}

fn fields(i: &[u8]) -> IResult<&[u8], Header> {
    let (i, m) = take(16usize)(i)?;
    let mut magic = [0u8; 16];
    magic.copy_from_slice(m);
    let (i, version) = le_u32(i)?;
    let (i, heads) = le_u32(i)?;
    let (i, cylinders) = le_u32(i)?;
    let (i, tracks) = le_u32(i)?;
    let (i, bat_entries) = le_u32(i)?;
    let (i, nb_sectors) = le_u64(i)?;
    let (i, inuse) = le_u32(i)?;
    let (i, data_off) = le_u32(i)?;
    let (i, flags) = le_u32(i)?;
    let (i, ext_off) = le_u64(i)?;
    Ok((
        i,
        Header {
            magic,
            version,
            heads,
            cylinders,
            tracks,
            bat_entries,
            nb_sectors,
            inuse,
            data_off,
            flags,
            ext_off,
        },
    ))
}

impl Header {
    /// Parses the 64-byte header.
    ///
    /// # Errors
    /// `Truncated` when `buf` is short.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        fields(buf)
            .map(|(_, h)| h)
            .map_err(|_| Error::truncated("Parallels header is too short").at(0))
    }

    /// True for the old `WithoutFreeSpace` magic.
    pub fn old_magic(&self) -> bool {
        &self.magic == MAGIC_V1
    }

    /// Disk size in sectors as qemu reads it: the old magic uses only the low 32 bits.
    pub fn sectors(&self) -> u64 {
        if self.old_magic() {
            self.nb_sectors & 0xFFFF_FFFF
        } else {
            self.nb_sectors
        }
    }

    /// Sectors per BAT unit: 1 for the old magic, `tracks` for the new one.
    pub fn off_multiplier(&self) -> u64 {
        if self.old_magic() {
            1
        } else {
            u64::from(self.tracks)
        }
    }

    /// The lowest legal data offset in sectors: the end of the BAT rounded up to a sector,
    /// and for the new magic to a cluster (qemu's `parallels_test_data_off`).
    pub fn min_data_off(&self) -> u64 {
        let bat_end = HEADER_LEN.saturating_add(u64::from(self.bat_entries).saturating_mul(4));
        let sectors = bat_end.div_ceil(SECTOR);
        let tracks = u64::from(self.tracks).max(1);
        if self.old_magic() {
            sectors
        } else {
            sectors.div_ceil(tracks).saturating_mul(tracks)
        }
    }
}

/// One feature of the format extension cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    /// The feature magic.
    pub magic: u64,
    /// External flags (bit 0 necessary, bit 1 transit).
    pub flags: u64,
    /// Offset of the feature's data inside the extension cluster.
    pub data_at: usize,
    /// Bytes of feature data.
    pub data_size: u32,
}

/// A dirty bitmap feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Bitmap size in sectors (should equal the disk size).
    pub size: u64,
    /// The bitmap's identifier (a UUID).
    pub id: [u8; 16],
    /// Sectors per bit.
    pub granularity: u32,
    /// L1 entries: 0 all clear, 1 all set, else a cluster offset in sectors.
    pub l1: Vec<u64>,
}

fn bitmap_fields(i: &[u8]) -> IResult<&[u8], (u64, [u8; 16], u32, u32)> {
    let (i, size) = le_u64(i)?;
    let (i, idb) = take(16usize)(i)?;
    let mut id = [0u8; 16];
    id.copy_from_slice(idb);
    let (i, granularity) = le_u32(i)?;
    let (i, l1_size) = le_u32(i)?;
    Ok((i, (size, id, granularity, l1_size)))
}

impl DirtyBitmap {
    /// Parses a dirty bitmap feature's data (`data` is exactly the feature's data bytes).
    ///
    /// # Errors
    /// `Corrupt` when the data is shorter than its header or its L1 table.
    pub fn parse(data: &[u8]) -> Result<DirtyBitmap> {
        let short = || Error::corrupt("dirty bitmap feature is shorter than its header");
        let (rest, (size, id, granularity, l1_size)) = bitmap_fields(data).map_err(|_| short())?;
        let l1_len = usize::try_from(l1_size)
            .ok()
            .and_then(|n| n.checked_mul(8))
            .filter(|&n| n <= rest.len())
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "dirty bitmap L1 table of {l1_size} entries exceeds the feature's {} bytes",
                    data.len()
                ))
            })?;
        let l1 = rest
            .get(..l1_len)
            .unwrap_or_default()
            .chunks_exact(8)
            .filter_map(|c| c.try_into().ok())
            .map(u64::from_le_bytes)
            .collect();
        Ok(DirtyBitmap {
            size,
            id,
            granularity,
            l1,
        })
    }
}

fn feature_fields(i: &[u8]) -> IResult<&[u8], (u64, u64, u32)> {
    let (i, magic) = le_u64(i)?;
    let (i, flags) = le_u64(i)?;
    let (i, data_size) = le_u32(i)?;
    let (i, _unused) = le_u32(i)?;
    Ok((i, (magic, flags, data_size)))
}

/// Walks the features of an extension cluster (after its 24-byte header) up to the end
/// marker. At most `cluster.len() / 24` steps, since each feature takes at least 24 bytes.
///
/// # Errors
/// `Corrupt` (`parallels.extension`) when a feature header or its data passes the cluster, or
/// no end marker is found.
pub fn features(cluster: &[u8]) -> Result<Vec<Feature>> {
    let mut out = Vec::new();
    let mut pos = EXT_HEADER_LEN;
    loop {
        let at = pos;
        let rest = cluster.get(pos..).unwrap_or_default();
        let (_, (magic, flags, data_size)) = feature_fields(rest).map_err(|_| {
            Error::corrupt(format!(
                "format extension: no end-of-features marker before the end of the cluster (feature header at byte {at})"
            ))
            .code("parallels.extension")
        })?;
        if magic == FEATURE_END {
            return Ok(out);
        }
        let data_at = pos.saturating_add(FEATURE_HEADER_LEN);
        let padded = usize::try_from(u64::from(data_size).div_ceil(8).saturating_mul(8))
            .unwrap_or(usize::MAX);
        let next = data_at.checked_add(padded).filter(|&n| n <= cluster.len());
        let Some(next) = next else {
            return Err(Error::corrupt(format!(
                "format extension: feature {magic:#018x} at byte {at} has {data_size} bytes of data, past the end of the cluster"
            ))
            .code("parallels.extension"));
        };
        out.push(Feature {
            magic,
            flags,
            data_at,
            data_size,
        });
        pos = next;
    }
}
