//! The metadata region: a table of items (file parameters, sizes, parent locator) and the
//! items themselves.

use nom::number::complete::{le_u16, le_u32, le_u64};
use nom::Parser;

use super::header::{guid, nom_err, utf16, Guid};
use super::region::{guid_string, Region};
use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::io::{read_vec, ReadAt};
use crate::limits::Budget;
use crate::ranges::{overlap_finding, Region as Span};

/// "metadata": metadata table signature.
pub const METADATA_SIGNATURE: u64 = u64::from_le_bytes(*b"metadata");
/// The table (header plus entries) fills the first 64 KiB of the region.
pub const TABLE_SIZE: u64 = 64 * 1024;
/// "number table entries. <= 2047".
pub const MAX_ENTRIES: u16 = 2047;
/// Entry flag: "parser must understand this entry to open the file".
pub const FLAG_REQUIRED: u32 = 4;
/// "length of metadata. <= 1MB."
pub const MAX_ITEM_LEN: u32 = 1 << 20;

/// File Parameters item CAA16737-FA36-4D43-B3B6-33F0AA44E76B.
pub const FILE_PARAMETERS: Guid = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
/// Virtual Disk Size item 2FA54224-CD1B-4876-B211-5DBED83BF4B8.
pub const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
/// Page 83 Data item BECA12AB-B2E6-4523-93EF-C309E000C746.
pub const PAGE83_DATA: Guid = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
/// Logical Sector Size item 8141BF1D-A96F-4709-BA47-F233A8FAAB5F.
pub const LOGICAL_SECTOR_SIZE: Guid = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
/// Physical Sector Size item CDA348C7-445D-4471-9CC9-E9885251C556.
pub const PHYSICAL_SECTOR_SIZE: Guid = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
/// Parent Locator item A8D35F2D-B30B-454D-ABF7-D3D84834AB0C.
pub const PARENT_LOCATOR: Guid = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);

/// File parameters flag: "Do not change any blocks to be BLOCK_NOT_PRESENT" (a fixed file).
pub const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters flag: "has parent / backing file".
pub const HAS_PARENT: u32 = 2;

/// Parent locator key/value pairs glimpse decodes at most.
const MAX_LOCATOR_PAIRS: usize = 256;

/// One metadata table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Which item.
    pub id: Guid,
    /// "byte offset of the metadata. At least 64kB. Relative to start of metadata region".
    pub offset: u32,
    /// "length of metadata. <= 1MB."
    pub length: u32,
    /// Flags (user, virtual disk, required).
    pub flags: u32,
    /// Where the entry itself lies in the source.
    pub at: u64,
}

/// The metadata items glimpse understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// "size of each payload block, always power of 2, <= 256MB and >= 1MB", in bytes.
    pub block_size: u32,
    /// File parameter flags (leave blocks allocated, has parent).
    pub file_flags: u32,
    /// "Size of the virtual disk, in bytes. Must be multiple of the sector size".
    pub virtual_disk_size: u64,
    /// "virtual disk sector size (in bytes). Can only be 512 or 4096 bytes".
    pub logical_sector_size: u32,
    /// "physical sector size (in bytes). Can only be 512 or 4096 bytes".
    pub physical_sector_size: u32,
    /// The parent locator, when the file has one.
    pub parent: Option<ParentLocator>,
    /// Source offset of the file parameters item (for findings).
    pub file_parameters_at: u64,
}

/// A decoded parent locator: its type and key/value pairs (never followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// The locator type GUID (VHDX parents use B04AEFB7-D19E-4A81-B789-25B8E9445913).
    pub locator_type: String,
    /// Key/value pairs as stored (paths, parent linkage GUIDs).
    pub pairs: Vec<(String, String)>,
    /// Source offset of the item.
    pub at: u64,
}

fn meta_err(msg: impl Into<String>, at: u64) -> Error {
    Error::invalid(msg).at(at).code("vhdx.metadata")
}

/// Parses the 64 KiB metadata table read at `base`.
///
/// # Errors
/// `Invalid` (`vhdx.metadata`) for a bad signature, too many entries or a duplicated known
/// item; `Unsupported` (`vhdx.metadata`) for a required item glimpse does not know.
pub fn parse_table(buf: &[u8], base: u64) -> Result<Vec<Entry>> {
    let (mut rest, (sig, _reserved, count)) = (le_u64, le_u16, le_u16)
        .parse(buf)
        .map_err(|e| nom_err("metadata table", base, buf.len(), e))?;
    if sig != METADATA_SIGNATURE {
        return Err(meta_err(
            "metadata table has no \"metadata\" signature",
            base,
        ));
    }
    if count > MAX_ENTRIES {
        return Err(meta_err(
            format!("metadata table has {count} entries (at most {MAX_ENTRIES})"),
            base,
        ));
    }
    rest = rest.get(20..).unwrap_or_default();
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE83_DATA,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    let mut entries: Vec<Entry> = Vec::new();
    for i in 0..count {
        let at = base
            .saturating_add(32)
            .saturating_add(u64::from(i).saturating_mul(32));
        let (r, (g, offset, length, flags, _reserved)) = (
            nom::bytes::complete::take(16usize),
            le_u32,
            le_u32,
            le_u32,
            le_u32,
        )
            .parse(rest)
            .map_err(|e| nom_err("metadata entry", base, buf.len(), e))?;
        rest = r;
        let id = <[u8; 16]>::try_from(g).map_err(|_| meta_err("metadata GUID", at))?;
        if !known.contains(&id) {
            if flags & FLAG_REQUIRED != 0 {
                return Err(Error::unsupported(format!(
                    "metadata item {} is required but unknown",
                    guid_string(&id)
                ))
                .at(at)
                .code("vhdx.metadata"));
            }
            continue;
        }
        if entries.iter().any(|e| e.id == id) {
            return Err(meta_err(
                format!("metadata item {} appears twice", guid_string(&id)),
                at,
            ));
        }
        entries.push(Entry {
            id,
            offset,
            length,
            flags,
            at,
        });
    }
    Ok(entries)
}

/// Reads one item's bytes after checking it lies inside the metadata region.
fn read_item(
    src: &dyn ReadAt,
    region: &Region,
    e: &Entry,
    min_len: u32,
    budget: &Budget,
    what: &str,
) -> Result<Vec<u8>> {
    if e.length < min_len || e.length > MAX_ITEM_LEN {
        return Err(meta_err(
            format!(
                "{what}: length {} (expected {min_len}..={MAX_ITEM_LEN})",
                e.length
            ),
            e.at,
        ));
    }
    let end = u64::from(e.offset).saturating_add(u64::from(e.length));
    if u64::from(e.offset) < TABLE_SIZE || end > u64::from(region.length) {
        return Err(meta_err(
            format!(
                "{what}: {} bytes at {:#x} lie outside the metadata region's items area",
                e.length, e.offset
            ),
            e.at,
        ));
    }
    let abs = region
        .offset
        .checked_add(u64::from(e.offset))
        .ok_or_else(|| meta_err(format!("{what}: offset overflows"), e.at))?;
    let v = read_vec(src, abs, u64::from(e.length), budget, what)?;
    budget.give_back(u64::from(e.length));
    Ok(v)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at.saturating_add(4)) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at.saturating_add(8)) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Reads and checks the items named by `entries`.
///
/// # Errors
/// `Invalid` (`vhdx.metadata`) when a required item is missing, lies outside the region or
/// holds an impossible value; `vhdx.block-size` for a block size outside 1 MiB..=256 MiB or
/// not a power of two.
pub fn read_items(
    src: &dyn ReadAt,
    region: &Region,
    entries: &[Entry],
    budget: &Budget,
) -> Result<Metadata> {
    let find = |id: Guid, name: &str| {
        entries.iter().find(|e| e.id == id).copied().ok_or_else(|| {
            meta_err(
                format!("required metadata item {name} is missing"),
                region.offset,
            )
        })
    };
    let fp = find(FILE_PARAMETERS, "File Parameters")?;
    let vs = find(VIRTUAL_DISK_SIZE, "Virtual Disk Size")?;
    let p83 = find(PAGE83_DATA, "Page 83 Data")?;
    let lss = find(LOGICAL_SECTOR_SIZE, "Logical Sector Size")?;
    let pss = find(PHYSICAL_SECTOR_SIZE, "Physical Sector Size")?;

    let b = read_item(src, region, &fp, 8, budget, "File Parameters")?;
    let block_size = le32(&b, 0);
    let file_flags = le32(&b, 4);
    let fp_at = region.offset.saturating_add(u64::from(fp.offset));
    if !(1 << 20..=256 << 20).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(Error::invalid(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        ))
        .at(fp_at)
        .code("vhdx.block-size"));
    }
    let virtual_disk_size = le64(
        &read_item(src, region, &vs, 8, budget, "Virtual Disk Size")?,
        0,
    );
    read_item(src, region, &p83, 16, budget, "Page 83 Data")?;
    let logical_sector_size = le32(
        &read_item(src, region, &lss, 4, budget, "Logical Sector Size")?,
        0,
    );
    if logical_sector_size != 512 && logical_sector_size != 4096 {
        return Err(meta_err(
            format!("logical sector size {logical_sector_size} (only 512 and 4096 exist)"),
            region.offset.saturating_add(u64::from(lss.offset)),
        ));
    }
    // The spec allows 4096-byte logical sectors (Hyper-V writes them), but qemu opens only
    // 512-byte ones ("Operation not supported"): a disk a KVM host cannot boot.
    if logical_sector_size == 4096 {
        return Err(Error::unsupported(
            "logical sector size 4096: qemu reads only VHDX disks with 512-byte logical sectors",
        )
        .at(region.offset.saturating_add(u64::from(lss.offset)))
        .code("vhdx.metadata"));
    }
    let physical_sector_size = le32(
        &read_item(src, region, &pss, 4, budget, "Physical Sector Size")?,
        0,
    );

    let parent = match entries.iter().find(|e| e.id == PARENT_LOCATOR) {
        Some(pl) => Some(parse_locator(
            &read_item(src, region, pl, 20, budget, "Parent Locator")?,
            region.offset.saturating_add(u64::from(pl.offset)),
        )?),
        None => None,
    };
    if file_flags & HAS_PARENT != 0 && parent.is_none() {
        // qemu: "if has_parent is set, but there is not parent locator present, then that is
        // an invalid combination".
        return Err(meta_err(
            "the file has a parent but no parent locator",
            fp_at,
        ));
    }
    Ok(Metadata {
        block_size,
        file_flags,
        virtual_disk_size,
        logical_sector_size,
        physical_sector_size,
        parent,
        file_parameters_at: fp_at,
    })
}

/// The name of a known item, for messages.
fn item_name(id: &Guid) -> &'static str {
    match *id {
        FILE_PARAMETERS => "File Parameters item",
        VIRTUAL_DISK_SIZE => "Virtual Disk Size item",
        PAGE83_DATA => "Page 83 Data item",
        LOGICAL_SECTOR_SIZE => "Logical Sector Size item",
        PHYSICAL_SECTOR_SIZE => "Physical Sector Size item",
        PARENT_LOCATOR => "Parent Locator item",
        _ => "metadata item",
    }
}

/// The placement of the known items themselves: no two may share a byte, nor any share the
/// 64 KiB metadata table. (An item inside the table or past the region's end is already an
/// error of [`read_items`]; the table is listed so that this check stands on its own.) Two
/// items over the same bytes each pass their value checks, but a writer updating one (the
/// parent locator after a rename, the disk size after a resize) silently changes the other.
/// Unknown optional items are skipped, as qemu skips them. O(n log n) in the ≤ 6 items.
pub fn item_overlap(region: &Region, entries: &[Entry]) -> Option<Finding> {
    let mut spans: Vec<Span<'_>> = vec![Span::new("metadata table", region.offset, TABLE_SIZE)];
    spans.extend(entries.iter().map(|e| {
        Span::new(
            item_name(&e.id),
            region.offset.saturating_add(u64::from(e.offset)),
            u64::from(e.length),
        )
    }));
    overlap_finding(
        "vhdx.metadata-overlap",
        &mut spans,
        "writing one would change the other",
    )
}

/// Decodes a parent locator item, bounded by the item's own length.
///
/// # Errors
/// `Invalid` (`vhdx.metadata`) when a key or value lies outside the item.
pub fn parse_locator(item: &[u8], at: u64) -> Result<ParentLocator> {
    let (mut rest, (ty, _reserved, count)) = (nom::bytes::complete::take(16usize), le_u16, le_u16)
        .parse(item)
        .map_err(|e| nom_err("parent locator", at, item.len(), e))?;
    let ty = <[u8; 16]>::try_from(ty).map_err(|_| meta_err("parent locator type", at))?;
    let mut pairs = Vec::new();
    for _ in 0..usize::from(count).min(MAX_LOCATOR_PAIRS) {
        let (r, (ko, vo, kl, vl)) = (le_u32, le_u32, le_u16, le_u16)
            .parse(rest)
            .map_err(|e| nom_err("parent locator entry", at, item.len(), e))?;
        rest = r;
        let slice = |o: u32, l: u16| {
            let o = usize::try_from(o).ok()?;
            item.get(o..o.checked_add(usize::from(l))?)
        };
        let (Some(k), Some(v)) = (slice(ko, kl), slice(vo, vl)) else {
            return Err(meta_err(
                "parent locator key or value lies outside the item",
                at,
            ));
        };
        pairs.push((utf16(k), utf16(v)));
    }
    Ok(ParentLocator {
        locator_type: guid_string(&ty),
        pairs,
        at,
    })
}
