//! VDI images (VirtualBox Disk Image, version 1.1).
//!
//! A 512-byte little-endian header (a 64-byte text line, the signature 0xBEDA107F, the
//! version, then the 1.1 header), a block map of u32 entries (the index of the block in the
//! data area, 0xFFFFFFFF for never allocated, 0xFFFFFFFE for zero), and the data area of 1 MiB
//! blocks. Facts from VirtualBox's `src/VBox/Storage/VDICore.h` and QEMU's `block/vdi.c`;
//! glimpse refuses what QEMU refuses (other versions, block sizes, sector sizes, unaligned
//! offsets) so that the two never read one image differently.

use nom::bytes::complete::take;
use nom::number::complete::{le_u32, le_u64};
use nom::IResult;

use crate::error::{Error, Result};
use crate::finding::{Finding, Findings};
use crate::format::Format;
use crate::image::{Extent, ExtentKind, Image, ImageCore, ImageInfo, RefKind, Reference};
use crate::io::{ReadAt, Source};
use crate::limits::{Budget, Limits};
use crate::probe::Probe;
use crate::ranges::{Region, RegionIndex};
use crate::table::{check_table, read_entries, read_held, Table, TableSpec};

/// The signature at offset 64.
pub const SIGNATURE: u32 = 0xBEDA_107F;
/// Version 1.1, the only one QEMU reads.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Header length on disk.
pub const HEADER_LEN: usize = 512;
/// The only block size QEMU reads (and VirtualBox writes): 1 MiB.
pub const BLOCK_SIZE: u32 = 1 << 20;
/// The only sector size.
pub const SECTOR_SIZE: u32 = 512;
/// Block map entry: the block was never allocated.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// Block map entry: the block reads as zeros.
pub const ZERO: u32 = 0xFFFF_FFFE;
/// Image type: dynamically growing.
pub const TYPE_DYNAMIC: u32 = 1;
/// Image type: static (preallocated).
pub const TYPE_STATIC: u32 = 2;
/// Image type: undo (a differencing image).
pub const TYPE_UNDO: u32 = 3;
/// Image type: differencing.
pub const TYPE_DIFF: u32 = 4;
/// QEMU's cap on blocks (`VDI_BLOCKS_IN_IMAGE_MAX`): the map must fit in `INT_MAX` bytes.
pub const MAX_BLOCKS: u32 = (0x8000_0000u32 - 512) / 4;
/// Map entries one `mapping` call may walk over while coalescing.
const MAX_SCAN: u64 = 1 << 16;

/// The VDI 1.1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// "Image signature": 0xBEDA107F.
    pub signature: u32,
    /// "Image version": major in the high 16 bits (1.1 = 0x00010001).
    pub version: u32,
    /// "Size of this structure in bytes" (the header after the pre-header).
    pub header_size: u32,
    /// "The image type": 1 normal (dynamic), 2 fixed (static), 3 undo, 4 differencing.
    pub image_type: u32,
    /// "Image flags".
    pub flags: u32,
    /// "Image comment" (256 bytes, NUL terminated).
    pub comment: String,
    /// "Offset of blocks array from the beginning of image file", bytes.
    pub offset_bmap: u32,
    /// "Offset of image data from the beginning of image file", bytes.
    pub offset_data: u32,
    /// "Sector size", bytes (legacy geometry).
    pub sector_size: u32,
    /// "Size of disk (in bytes)".
    pub disk_size: u64,
    /// "Block size", bytes; must be 1 MiB.
    pub block_size: u32,
    /// "Size of additional service information of every data block", bytes, prepended to
    /// each block.
    pub block_extra: u32,
    /// "Number of blocks" in the disk.
    pub blocks: u32,
    /// "Number of allocated blocks".
    pub blocks_allocated: u32,
    /// "UUID of image".
    pub uuid_image: [u8; 16],
    /// "UUID of image's last modification".
    pub uuid_modify: [u8; 16],
    /// "Only for secondary images - UUID of previous image" (the parent).
    pub uuid_link: [u8; 16],
    /// "Only for secondary images - UUID of previous image's last modification".
    pub uuid_parent_modify: [u8; 16],
}

fn arr16(i: &[u8]) -> IResult<&[u8], [u8; 16]> {
    let (i, b) = take(16usize)(i)?;
    let mut a = [0u8; 16];
    a.copy_from_slice(b);
    Ok((i, a))
}

fn header_fields(i: &[u8]) -> IResult<&[u8], Header> {
    let (i, _text) = take(64usize)(i)?;
    let (i, signature) = le_u32(i)?;
    let (i, version) = le_u32(i)?;
    let (i, header_size) = le_u32(i)?;
    let (i, image_type) = le_u32(i)?;
    let (i, flags) = le_u32(i)?;
    let (i, comment) = take(256usize)(i)?;
    let (i, offset_bmap) = le_u32(i)?;
    let (i, offset_data) = le_u32(i)?;
    let (i, _cylinders) = le_u32(i)?;
    let (i, _heads) = le_u32(i)?;
    let (i, _sectors) = le_u32(i)?;
    let (i, sector_size) = le_u32(i)?;
    let (i, _unused) = le_u32(i)?;
    let (i, disk_size) = le_u64(i)?;
    let (i, block_size) = le_u32(i)?;
    let (i, block_extra) = le_u32(i)?;
    let (i, blocks) = le_u32(i)?;
    let (i, blocks_allocated) = le_u32(i)?;
    let (i, uuid_image) = arr16(i)?;
    let (i, uuid_modify) = arr16(i)?;
    let (i, uuid_link) = arr16(i)?;
    let (i, uuid_parent_modify) = arr16(i)?;
    let end = comment
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(comment.len());
    let comment = String::from_utf8_lossy(comment.get(..end).unwrap_or_default()).into_owned();
    Ok((
        i,
        Header {
            signature,
            version,
            header_size,
            image_type,
            flags,
            comment,
            offset_bmap,
            offset_data,
            sector_size,
            disk_size,
            block_size,
            block_extra,
            blocks,
            blocks_allocated,
            uuid_image,
            uuid_modify,
            uuid_link,
            uuid_parent_modify,
        },
    ))
}

impl Header {
    /// Parses the 512-byte header.
    ///
    /// # Errors
    /// `Truncated` when `buf` is short.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        header_fields(buf)
            .map(|(_, h)| h)
            .map_err(|_| Error::truncated("VDI header is too short").at(0))
    }
}

/// Formats a VirtualBox UUID (RTUUID: the first three fields little-endian).
pub fn uuid_string(u: &[u8; 16]) -> String {
    let [a0, a1, a2, a3, b0, b1, c0, c1, rest @ ..] = *u;
    let mut s = format!("{a3:02x}{a2:02x}{a1:02x}{a0:02x}-{b1:02x}{b0:02x}-{c1:02x}{c0:02x}-");
    for (n, b) in rest.iter().enumerate() {
        if n == 2 {
            s.push('-');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// An opened VDI image.
pub struct VdiImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    header: Header,
    bmap: Table<u32>,
    /// The file's length when it was opened: blocks that end past it are bad entries.
    file_size: u64,
}

impl VdiImage {
    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }
}

/// True when the probe windows look like a VDI: the signature at offset 64.
pub fn probe(p: &Probe<'_>) -> bool {
    p.head_at(64, 4)
        .is_some_and(|s| s == SIGNATURE.to_le_bytes())
}

fn hdr_err(msg: String, at: u64) -> Error {
    Error::unsupported(msg).at(at).code("vdi.header")
}

/// Opens a VDI image.
///
/// # Errors
/// `Invalid` for a bad signature; `Unsupported` (`vdi.header`) for what QEMU refuses too
/// (versions other than 1.1, block sizes other than 1 MiB, sector sizes other than 512,
/// unaligned offsets, block extra data, too many blocks, a disk larger than its blocks);
/// table codes for the block map. A block past the end of the file is a `check` finding
/// (`vdi.block-out-of-range`), and `mapping` of that block fails `Corrupt` with that code.
///
/// # Security
/// Reads only from `src`, within `limits`. A parent is reported by UUID, never looked for.
pub fn open(src: Source, limits: &Limits) -> Result<VdiImage> {
    let size = src.size()?;
    let budget = limits.budget();
    let h = read_header(src.as_ref(), size, &budget)?;
    check_header(&h)?;
    let mut findings = Vec::new();
    let info_refs = parent(&h, &mut findings);
    if h.blocks_allocated > h.blocks {
        findings.push(
            Finding::reject(
                "vdi.header",
                format!(
                    "{} blocks allocated of {} in the disk",
                    h.blocks_allocated, h.blocks
                ),
            )
            .at(388),
        );
    }
    let spec = TableSpec {
        name: "VDI block map",
        offset: u64::from(h.offset_bmap),
        entries: u64::from(h.blocks),
        entry_size: 4,
        align: 512,
    };
    let bmap_len = check_table(spec, size, limits)?;
    layout(&h, bmap_len, &mut findings);
    let bmap = read_entries(src.as_ref(), spec, size, limits, &budget, |c| {
        c.try_into().map(u32::from_le_bytes).unwrap_or(UNALLOCATED)
    })?;
    let mut info = describe(&h, &src);
    info.references = info_refs;
    Ok(VdiImage {
        src,
        info,
        findings,
        header: h,
        bmap,
        file_size: size,
    })
}

/// Reads and parses the header; its bytes are given back once parsed.
fn read_header(src: &dyn ReadAt, size: u64, budget: &Budget) -> Result<Header> {
    if size < HEADER_LEN as u64 {
        return Err(Error::truncated(format!(
            "a VDI header needs 512 bytes; the file has {size}"
        )));
    }
    let (buf, _held) = read_held(src, 0, HEADER_LEN as u64, budget, "VDI header")?;
    Header::parse(&buf)
}

/// Refuses what QEMU refuses: another signature, version, sector or block size, unaligned
/// offsets, extra data per block, too many blocks, a disk larger than its blocks, an unknown
/// image type.
fn check_header(h: &Header) -> Result<()> {
    if h.signature != SIGNATURE {
        return Err(Error::invalid(format!("bad VDI signature {:#010x}", h.signature)).at(64));
    }
    if h.version != VERSION_1_1 {
        return Err(hdr_err(
            format!(
                "VDI version {}.{} (only 1.1 is read)",
                h.version >> 16,
                h.version & 0xffff
            ),
            68,
        ));
    }
    if h.offset_bmap % SECTOR_SIZE != 0 || h.offset_data % SECTOR_SIZE != 0 {
        return Err(hdr_err(
            format!(
                "block map offset {:#x} or data offset {:#x} is not sector aligned",
                h.offset_bmap, h.offset_data
            ),
            340,
        ));
    }
    if h.sector_size != SECTOR_SIZE {
        return Err(hdr_err(
            format!("sector size {} is not 512", h.sector_size),
            360,
        ));
    }
    if h.block_size != BLOCK_SIZE {
        return Err(hdr_err(
            format!("block size {} is not 1 MiB", h.block_size),
            376,
        ));
    }
    // QEMU ignores block_extra and VirtualBox skips it before each block: they would read
    // different bytes.
    if h.block_extra != 0 {
        return Err(hdr_err(
            format!("{} bytes of extra data per block", h.block_extra),
            380,
        ));
    }
    if h.blocks > MAX_BLOCKS {
        return Err(hdr_err(
            format!("{} blocks exceed QEMU's {MAX_BLOCKS}", h.blocks),
            384,
        ));
    }
    let capacity = u64::from(h.blocks).saturating_mul(u64::from(BLOCK_SIZE));
    if h.disk_size > capacity {
        return Err(hdr_err(
            format!("disk size {} exceeds its {} blocks", h.disk_size, h.blocks),
            368,
        ));
    }
    if !matches!(
        h.image_type,
        TYPE_DYNAMIC | TYPE_STATIC | TYPE_UNDO | TYPE_DIFF
    ) {
        return Err(hdr_err(
            format!(
                "image type {} (1 dynamic, 2 static, 3 undo, 4 differencing)",
                h.image_type
            ),
            76,
        ));
    }
    Ok(())
}

/// A differencing image: one finding, and the parent's UUID as a reference.
fn parent(h: &Header, findings: &mut Vec<Finding>) -> Vec<Reference> {
    let differencing = matches!(h.image_type, TYPE_UNDO | TYPE_DIFF)
        || h.uuid_link != [0; 16]
        || h.uuid_parent_modify != [0; 16];
    if !differencing {
        return Vec::new();
    }
    // The link UUID (byte 424) names the parent image; the parent UUID (byte 440, its last
    // modification) is the other half. Name whichever is set, never a nil UUID as the parent.
    let link = uuid_string(&h.uuid_link);
    let modify = uuid_string(&h.uuid_parent_modify);
    let (parent, at, named) = match (h.uuid_link != [0; 16], h.uuid_parent_modify != [0; 16]) {
        (true, true) => (
            link.clone(),
            424,
            format!("parent image {link} (parent modification UUID {modify})"),
        ),
        (true, false) => (link.clone(), 424, format!("parent image {link}")),
        (false, true) => (
            modify.clone(),
            440,
            format!("a parent with parent UUID {modify} (the link UUID is nil)"),
        ),
        (false, false) => (
            link.clone(),
            424,
            "an unnamed parent (the link and parent UUIDs are nil)".to_string(),
        ),
    };
    findings.push(
        Finding::reject(
            "vdi.differencing",
            format!("a differencing VDI (type {}) over {named}: its unallocated blocks live in another file, which glimpse never opens", h.image_type),
        )
        .at(at),
    );
    vec![Reference {
        kind: RefKind::ParentLocator,
        target: format!("uuid:{parent}"),
        format: Some("vdi".into()),
        offset: Some(at),
    }]
}

/// The block map must not overlap the header, nor the data area (at least one block) the
/// header or the block map.
fn layout(h: &Header, bmap_len: u64, findings: &mut Vec<Finding>) {
    let bmap_off = u64::from(h.offset_bmap);
    if bmap_off < HEADER_LEN as u64 {
        findings.push(
            Finding::reject(
                "vdi.header",
                format!("block map at {bmap_off:#x} overlaps the header"),
            )
            .at(340),
        );
    }
    let data_off = u64::from(h.offset_data);
    let data_len = u64::from(h.blocks_allocated.max(1)).saturating_mul(u64::from(BLOCK_SIZE));
    let metadata = RegionIndex::new(vec![
        Region::new("the header", 0, HEADER_LEN as u64),
        Region::new("the block map", bmap_off, bmap_len),
    ]);
    if metadata
        .hit(data_off, data_off.saturating_add(data_len))
        .is_some()
    {
        findings.push(
            Finding::reject(
                "vdi.header",
                format!("data area at {data_off:#x} overlaps the header or the block map"),
            )
            .at(344),
        );
    }
}

/// Where data block `e` ends in the file, when it passes `size` (qemu reads zeros there and
/// `qemu-img check` says nothing; glimpse refuses the entry, as the open/check rule says).
fn block_past_end(h: &Header, e: u32, size: u64) -> Option<u64> {
    let end = u64::from(e)
        .saturating_add(1)
        .saturating_mul(u64::from(BLOCK_SIZE))
        .saturating_add(u64::from(h.offset_data));
    (end > size).then_some(end)
}

/// The error for block map entry `i` whose data block `e` ends at `end`, past the file.
fn past_end_error(h: &Header, i: u64, e: u32, end: u64, size: u64) -> Error {
    Error::corrupt(format!(
        "block map entry {i} points at data block {e}, which ends at {end:#x}, past the end of the file ({size} bytes)"
    ))
    .at(u64::from(h.offset_bmap).saturating_add(i.saturating_mul(4)))
    .code("vdi.block-out-of-range")
}

/// Byte offset of block map entry `i`.
fn entry_at(h: &Header, i: usize) -> u64 {
    u64::from(h.offset_bmap).saturating_add((i as u64).saturating_mul(4))
}

/// The image's info from its header.
fn describe(h: &Header, src: &Source) -> ImageInfo {
    // QEMU rounds an odd disk size up to whole sectors ('VBoxManage convertfromraw' writes
    // such sizes); glimpse reports the same size.
    let virtual_size = h.disk_size.div_ceil(512).saturating_mul(512);
    let mut info = ImageInfo::new(Format::Vdi, virtual_size);
    info.actual_size = src.allocated_size();
    info.cluster_size = Some(u64::from(BLOCK_SIZE));
    info.detail(
        "image-type",
        match h.image_type {
            TYPE_DYNAMIC => "dynamic",
            TYPE_STATIC => "static",
            TYPE_UNDO => "undo",
            _ => "differencing",
        },
    );
    info.detail("block-size", BLOCK_SIZE);
    info.detail("uuid", uuid_string(&h.uuid_image));
    info
}

/// What one block map entry means, for coalescing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Unallocated,
    Zero,
    Data(u32),
}

impl VdiImage {
    fn slot(&self, index: u64) -> Slot {
        match usize::try_from(index)
            .ok()
            .and_then(|i| self.bmap.get(i))
            .copied()
        {
            None | Some(UNALLOCATED) => Slot::Unallocated,
            Some(ZERO) => Slot::Zero,
            Some(e) => Slot::Data(e),
        }
    }

    /// The block map's entries past the end of the file or the allocated blocks, a count that disagrees with the
    /// header, and data blocks used twice.
    fn check_map(&self, limits: &Limits) -> Result<Vec<Finding>> {
        let mut out = Findings::new();
        // The (data block, entry) list below, held for the length of the check: one pair per
        // entry that names a block, so that a large, mostly empty disk costs little.
        let named = self.bmap.iter().filter(|&&e| e < ZERO).count();
        let _held = limits
            .budget()
            .charge((named as u64).saturating_mul(8), "VDI block map check")?;
        let mut seen: Vec<(u32, u32)> = Vec::new();
        seen.try_reserve_exact(named)
            .map_err(|_| Error::limit("VDI check: cannot allocate"))?;
        let allocated = self.header.blocks_allocated;
        for (i, &e) in self.bmap.iter().enumerate() {
            if e >= ZERO {
                continue;
            }
            // Entries number at most MAX_BLOCKS, which fits a u32.
            seen.push((e, u32::try_from(i).unwrap_or(u32::MAX)));
            if let Some(end) = block_past_end(&self.header, e, self.file_size) {
                out.error(&past_end_error(
                    &self.header,
                    i as u64,
                    e,
                    end,
                    self.file_size,
                ));
            } else if e >= allocated {
                out.push(
                    Finding::reject(
                        "vdi.block-out-of-range",
                        format!("block map entry {i} points at data block {e}, but only {allocated} are allocated"),
                    )
                    .at(entry_at(&self.header, i)),
                );
            }
        }
        if seen.len() as u64 != u64::from(allocated) {
            // qemu-img check counts this as a corruption too: the next allocation would reuse
            // a block that is in use.
            out.push(
                Finding::reject(
                    "vdi.header",
                    format!(
                        "header says {allocated} blocks are allocated; the block map uses {}",
                        seen.len()
                    ),
                )
                .at(388),
            );
        }
        seen.sort_unstable();
        for w in seen.windows(2) {
            if let [(a, ia), (b, ib)] = w {
                if a == b {
                    let at = usize::try_from(*ib).unwrap_or(usize::MAX);
                    out.push(
                        Finding::reject(
                            "vdi.duplicate-block",
                            format!("block map entries {ia} and {ib} both use data block {a}"),
                        )
                        .at(entry_at(&self.header, at)),
                    );
                }
            }
        }
        Ok(out.finish())
    }
}

impl Image for VdiImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }

    fn check(&self, limits: &Limits) -> Result<Vec<Finding>> {
        self.check_map(limits)
    }

    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        let end = guest.saturating_add(span);
        let bs = u64::from(BLOCK_SIZE);
        // BLOCK_SIZE is a nonzero constant, so the division and remainder never fail.
        let idx = guest.checked_div(bs).unwrap_or(0);
        let first = self.slot(idx);
        let mut next = idx.saturating_add(1);
        let mut n = 0;
        while next.saturating_mul(bs) < end && n < MAX_SCAN {
            let s = self.slot(next);
            let contiguous = match (first, s) {
                (Slot::Data(a), Slot::Data(b)) => {
                    u64::from(b) == u64::from(a).saturating_add(next.saturating_sub(idx))
                        && block_past_end(&self.header, b, self.file_size).is_none()
                }
                (a, b) => a == b,
            };
            if !contiguous {
                break;
            }
            next = next.saturating_add(1);
            n = n.saturating_add(1);
        }
        let len = next.saturating_mul(bs).min(end).saturating_sub(guest);
        let kind = match first {
            Slot::Unallocated => ExtentKind::Unallocated,
            Slot::Zero => ExtentKind::Zero,
            Slot::Data(e) => {
                if let Some(block_end) = block_past_end(&self.header, e, self.file_size) {
                    return Err(past_end_error(
                        &self.header,
                        idx,
                        e,
                        block_end,
                        self.file_size,
                    ));
                }
                ExtentKind::Data {
                    host: u64::from(self.header.offset_data)
                        .saturating_add(u64::from(e).saturating_mul(bs))
                        .saturating_add(guest.checked_rem(bs).unwrap_or(0)),
                }
            }
        };
        Ok(Extent {
            start: guest,
            len,
            kind,
        })
    }
}

#[cfg(test)]
mod tests;
