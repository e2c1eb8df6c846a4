//! VHD images (Microsoft Virtual Hard Disk; QEMU's `vpc`).
//!
//! A fixed VHD is the guest disk followed by a 512-byte footer (511 bytes in some old
//! images). A dynamic or differencing VHD starts with a copy of the footer, then a dynamic
//! disk header, a Block Allocation Table (BAT) of big-endian sector numbers, and blocks made
//! of a sector bitmap followed by the block's data; the footer ends the file.
//!
//! QEMU probes only the head, so `qemu-img info` calls a fixed VHD `raw` (and so does
//! OpenStack's format inspector). glimpse also looks for the footer in the last sector, so a
//! fixed VHD declared `raw` is caught as a format mismatch.
//!
//! The virtual size follows QEMU (`-f vpc`): the CHS geometry for creators QEMU distrusts
//! ("vpc ", "qemu"), the footer's current size otherwise; see [`Footer::qemu_uses_chs`]. For a
//! fixed disk it is the footer's current size, the size of the data area.

pub mod footer;

use crate::error::{Error, Result};
use crate::finding::{Finding, Findings};
use crate::format::Format;
use crate::image::{Extent, ExtentKind, Image, ImageCore, ImageInfo, RefKind, Reference};
use crate::io::{read_up_to, ReadAt, Source};
use crate::limits::{Budget, Charge, Limits};
use crate::probe::Probe;
use crate::ranges::{overlap_finding, Region, RegionIndex};
use crate::table::{read_entries, read_held, Table, TableSpec};

use footer::{
    bitmap_len, checksum, BAT_UNUSED, COOKIE, DYN_CHECKSUM_AT, DYN_COOKIE, DYN_HEADER_LEN,
    FOOTER_CHECKSUM_AT, FOOTER_LEN, MAX_SECTORS, MAX_TABLE_ENTRIES, SECTOR, TYPE_DIFFERENCING,
    TYPE_DYNAMIC, TYPE_FIXED,
};
pub use footer::{DynHeader, Footer};

/// Smallest block size accepted. QEMU sizes the sector bitmap as
/// `(block_size / 4096 + 511) & ~511`, which is 0 below 4 KiB where the spec says 512: the two
/// would read different bytes, so such images are refused.
const MIN_BLOCK: u64 = 4096;
/// Largest block size accepted: far above Hyper-V's 2 MiB, and VHDX's own maximum.
const MAX_BLOCK: u64 = 256 << 20;
/// BAT entries one `mapping` call may walk over while coalescing unallocated blocks.
const MAX_SCAN: u64 = 1 << 16;
/// Bytes of a clear bitmap run read at once when `check` looks for data under it.
const PROBE: u64 = 1 << 20;
/// Largest parent locator decoded: a Windows path of 32767 UTF-16 units.
const MAX_LOCATOR: u32 = 65536;

/// Where the dynamic-disk structures are.
#[derive(Debug)]
struct Dynamic {
    /// BAT entries: the sector of each block's bitmap, or `BAT_UNUSED`.
    bat: Table<u32>,
    /// Guest bytes per block.
    block_size: u64,
    /// Bytes of the sector bitmap before each block's data.
    bitmap_len: u64,
    /// Byte offset of the BAT.
    bat_offset: u64,
    /// Byte offset of the dynamic disk header.
    header_offset: u64,
    /// Byte offset of the footer at the end, when there is one.
    tail_footer: Option<u64>,
    /// The source's size.
    file_size: u64,
    /// Where a differencing disk's parent locators keep their data: (offset, bytes).
    locators: Vec<(u64, u64)>,
}

impl Dynamic {
    fn entry(&self, index: u64) -> Option<u32> {
        let i = usize::try_from(index).ok()?;
        self.bat.get(i).copied().filter(|&e| e != BAT_UNUSED)
    }

    /// Host bytes one allocated block takes: bitmap plus data.
    fn block_span(&self) -> u64 {
        self.bitmap_len.saturating_add(self.block_size)
    }

    /// Byte offset of BAT entry `i`.
    fn entry_at(&self, i: usize) -> u64 {
        self.bat_offset.saturating_add((i as u64).saturating_mul(4))
    }
}

/// An opened VHD image.
pub struct VhdImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    footer: Footer,
    dynamic: Option<Dynamic>,
}

impl VhdImage {
    /// The footer that describes the disk (the copy at offset 0 for dynamic disks, as QEMU
    /// reads it).
    pub fn footer(&self) -> &Footer {
        &self.footer
    }
}

/// True when the probe windows look like a VHD: the footer cookie at offset 0 (dynamic and
/// differencing disks) or in the last 512 bytes (every VHD; the only place for a fixed one),
/// including the old 511-byte footer.
pub fn probe(p: &Probe<'_>) -> bool {
    if p.starts_with(COOKIE) {
        return true;
    }
    match p.tail.len() {
        512 => p.tail.starts_with(COOKIE) || p.tail.get(1..).is_some_and(|t| t.starts_with(COOKIE)),
        511 => p.tail.starts_with(COOKIE),
        _ => false,
    }
}

/// Reads the footer at the end of the file: 512 bytes, or the old 511-byte variant (then
/// padded with the reserved zero byte so that the checksum still adds up).
fn tail_footer(src: &dyn ReadAt, size: u64) -> Result<Option<(u64, Vec<u8>)>> {
    if size >= FOOTER_LEN as u64 {
        let at = size.saturating_sub(FOOTER_LEN as u64);
        let buf = read_up_to(src, at, FOOTER_LEN)?;
        if buf.starts_with(COOKIE) {
            return Ok(Some((at, buf)));
        }
    }
    let old_len = FOOTER_LEN.saturating_sub(1);
    if size >= old_len as u64 {
        let at = size.saturating_sub(old_len as u64);
        let mut buf = read_up_to(src, at, old_len)?;
        if buf.starts_with(COOKIE) {
            buf.push(0);
            return Ok(Some((at, buf)));
        }
    }
    Ok(None)
}

/// The big-endian u32 at `off`, if `buf` has it.
fn be32_at(buf: &[u8], off: usize) -> Option<u32> {
    buf.get(off..off.checked_add(4)?)?
        .try_into()
        .ok()
        .map(u32::from_be_bytes)
}

fn disk_type_name(t: u32) -> &'static str {
    match t {
        TYPE_FIXED => "fixed",
        TYPE_DYNAMIC => "dynamic",
        TYPE_DIFFERENCING => "differencing",
        _ => "unknown",
    }
}

/// Opens a VHD image.
///
/// # Errors
/// `Invalid` when there is no footer; `Corrupt` for a bad footer checksum
/// (`vhd.checksum`), a dynamic disk without its footer copy (`vhd.footer-mismatch`) or a
/// block past the end of the file (`vhd.bat-entry-out-of-bounds`); `Unsupported` for an
/// unknown disk type (`vhd.disk-type`), a block size QEMU and the spec read differently
/// (`vhd.block-size`) or a disk above QEMU's 2040 GiB (`vhd.too-large`); `Truncated`,
/// `LimitExceeded` and table codes for the header and BAT.
///
/// # Security
/// Reads only from `src`, within `limits`. Parent locators are decoded (bounded) and reported,
/// never opened.
pub fn open(src: Source, limits: &Limits) -> Result<VhdImage> {
    let size = src.size()?;
    let budget = limits.budget();
    let mut findings = Vec::new();

    let head = read_up_to(src.as_ref(), 0, FOOTER_LEN)?;
    let tail = tail_footer(src.as_ref(), size)?;
    let chosen = choose_footer(head, tail.as_ref(), size, &mut findings)?;
    let footer = parse_footer(&chosen)?;
    let footer_at = chosen.at;
    let fixed = footer.disk_type == TYPE_FIXED;
    let (virtual_size, uses_chs) = disk_size(&footer, footer_at, &mut findings)?;
    let mut info = describe(&footer, virtual_size, uses_chs, &src);

    let dynamic = if fixed {
        if virtual_size > footer_at {
            return Err(Error::truncated(format!(
                "the fixed VHD's data ({virtual_size} bytes) runs into its footer at {footer_at:#x}"
            ))
            .at(footer_at)
            .code("vhd.truncated"));
        }
        fixed_data_matches(&footer, footer_at, size, &mut findings);
        None
    } else {
        let d = open_dynamic(
            src.as_ref(),
            &footer,
            virtual_size,
            size,
            tail.as_ref().map(|(at, _)| *at),
            limits,
            &budget,
            &mut info,
            &mut findings,
        )?;
        Some(d)
    };

    Ok(VhdImage {
        src,
        info,
        findings,
        footer,
        dynamic,
    })
}

/// The footer that describes the disk: its bytes, where they were read, and whether they are
/// the copy at offset 0.
struct Chosen {
    at: u64,
    buf: Vec<u8>,
    from_head: bool,
}

/// Which footer describes the disk. QEMU reads the copy at offset 0 whenever it is there,
/// and the last sector only for fixed disks; glimpse reads the same one but checks the other.
fn choose_footer(
    head: Vec<u8>,
    tail: Option<&(u64, Vec<u8>)>,
    size: u64,
    findings: &mut Vec<Finding>,
) -> Result<Chosen> {
    // A zero-size fixed disk is one sector: the same footer is head and tail.
    let head_ok =
        head.len() == FOOTER_LEN && head.starts_with(COOKIE) && tail.is_none_or(|(at, _)| *at != 0);
    let tail_type = tail.and_then(|(_, b)| be32_at(b, 60));
    let from_head = |buf: Vec<u8>| Chosen {
        at: 0,
        buf,
        from_head: true,
    };
    match (tail, head_ok) {
        (Some((at, buf)), _) if tail_type == Some(TYPE_FIXED) => {
            if head_ok {
                findings.push(
                    Finding::reject(
                        "vhd.footer-mismatch",
                        "a fixed VHD whose first sector is also a VHD footer: qemu-img reads the file as a dynamic disk, glimpse as fixed",
                    )
                    .at(0),
                );
            }
            Ok(Chosen {
                at: *at,
                buf: buf.clone(),
                from_head: false,
            })
        }
        (Some((at, buf)), true) => {
            if buf.as_slice() != head.as_slice() {
                findings.push(
                    Finding::reject(
                        "vhd.footer-mismatch",
                        format!("the footer copy at offset 0 differs from the footer at {at:#x}; qemu-img reads the copy"),
                    )
                    .at(*at),
                );
            }
            Ok(from_head(head))
        }
        (Some((at, _)), false) => Err(Error::corrupt(format!(
            "a {} VHD without the footer copy at offset 0",
            disk_type_name(tail_type.unwrap_or(0))
        ))
        .at(*at)
        .code("vhd.footer-mismatch")),
        (None, true) => {
            findings.push(
                Finding::reject(
                    "vhd.footer-mismatch",
                    "no footer at the end of the file: the image is truncated or unfinished",
                )
                .at(size),
            );
            Ok(from_head(head))
        }
        (None, false) => {
            if size < FOOTER_LEN.saturating_sub(1) as u64 {
                return Err(Error::truncated(format!(
                    "a VHD needs at least one 512-byte footer; the file has {size} bytes"
                )));
            }
            Err(Error::invalid(
                "no VHD footer (\"conectix\") at offset 0 or in the last sector",
            ))
        }
    }
}

/// A fixed disk is its data followed by the footer, so the bytes before the footer are the
/// current size (rounded up to a whole sector when the size is odd). Anything else is a file
/// two readers see differently: a raw disk whose last sector happens to be a footer is, to
/// qemu-img (which looks for "conectix" at offset 0 only), a raw disk of the whole file, and to
/// a VHD reader a smaller (or larger) disk.
fn fixed_data_matches(footer: &Footer, footer_at: u64, size: u64, findings: &mut Vec<Finding>) {
    let data = footer.current_size.div_ceil(SECTOR).saturating_mul(SECTOR);
    if data != footer_at {
        findings.push(
            Finding::reject(
                "vhd.fixed-size",
                format!(
                    "the fixed-VHD footer declares a {} byte disk but {footer_at} bytes precede it; qemu-img probes this file as a {size} byte raw disk, a VHD reader as a {} byte one",
                    footer.current_size, footer.current_size
                ),
            )
            .at(footer_at.saturating_add(48)),
        );
    }
}

/// Checks the chosen footer's checksum, parses it and accepts only the three disk types.
fn parse_footer(chosen: &Chosen) -> Result<Footer> {
    let footer_at = chosen.at;
    let stored = be32_at(&chosen.buf, FOOTER_CHECKSUM_AT);
    let computed = checksum(&chosen.buf, FOOTER_CHECKSUM_AT);
    if stored != Some(computed) {
        // QEMU 10 refuses the image too ("Incorrect header checksum").
        return Err(Error::corrupt(format!(
            "footer checksum is {:#010x}, the footer sums to {computed:#010x}",
            stored.unwrap_or(0)
        ))
        .at(footer_at.saturating_add(FOOTER_CHECKSUM_AT as u64))
        .code("vhd.checksum"));
    }
    let footer = Footer::parse(&chosen.buf, footer_at)?;
    match footer.disk_type {
        TYPE_FIXED if chosen.from_head => Err(Error::corrupt(
            "a fixed-disk footer at offset 0 with no footer at the end of the file",
        )
        .at(0)
        .code("vhd.footer-mismatch")),
        TYPE_FIXED | TYPE_DYNAMIC | TYPE_DIFFERENCING => Ok(footer),
        t => Err(Error::unsupported(format!(
            "VHD disk type {t} (only 2 fixed, 3 dynamic, 4 differencing exist)"
        ))
        .at(footer_at.saturating_add(60))
        .code("vhd.disk-type")),
    }
}

/// The virtual size as QEMU computes it, and whether it comes from the CHS geometry.
fn disk_size(footer: &Footer, footer_at: u64, findings: &mut Vec<Finding>) -> Result<(u64, bool)> {
    let chs_bytes = footer.chs_sectors().saturating_mul(SECTOR);
    let current = footer
        .current_size
        .checked_div(SECTOR)
        .unwrap_or(0)
        .saturating_mul(SECTOR);
    let uses_chs = footer.qemu_uses_chs();
    // QEMU keeps whole sectors (total_sectors = current_size / 512), and applies the creator
    // rule to fixed disks as to dynamic ones (`vpc_open`, before it looks at the type): a
    // Virtual PC fixed disk is as large as its geometry, which rounds down, and that is the
    // disk a guest of qemu (and of Virtual PC) sees. A geometry larger than the data area
    // is refused by the caller: qemu would serve the footer and past it as disk data.
    let virtual_size = if uses_chs { chs_bytes } else { current };
    // Only where readers disagree: QEMU sizes such a disk by its geometry while Hyper-V,
    // Azure and the spec's "current size" say otherwise.
    if uses_chs && chs_bytes != current {
        findings.push(
            Finding::info(
                "vhd.size-mismatch",
                format!(
                    "footer current size is {} bytes but the CHS geometry {}/{}/{} gives {chs_bytes}; for creator {:?} qemu-img -f vpc and glimpse use the geometry, Hyper-V and Azure the current size",
                    footer.current_size,
                    footer.cylinders,
                    footer.heads,
                    footer.sectors,
                    footer.creator_name(),
                ),
            )
            .at(footer_at.saturating_add(48)),
        );
    }
    if virtual_size.div_ceil(SECTOR) > MAX_SECTORS {
        return Err(Error::unsupported(format!(
            "a VHD of {virtual_size} bytes exceeds the 2040 GiB QEMU accepts"
        ))
        .at(footer_at.saturating_add(48))
        .code("vhd.too-large"));
    }
    Ok((virtual_size, uses_chs))
}

/// The image's info from its footer.
fn describe(footer: &Footer, virtual_size: u64, uses_chs: bool, src: &Source) -> ImageInfo {
    let fixed = footer.disk_type == TYPE_FIXED;
    let mut info = ImageInfo::new(Format::Vhd, virtual_size);
    info.actual_size = src.allocated_size();
    info.detail("disk-type", disk_type_name(footer.disk_type));
    info.detail(
        "creator",
        format!(
            "{} {}.{}",
            footer.creator_name(),
            footer.creator_version.0,
            footer.creator_version.1
        ),
    );
    info.detail(
        "size-source",
        if fixed || !uses_chs {
            "current-size"
        } else {
            "chs"
        },
    );
    info
}

#[allow(clippy::too_many_arguments)]
fn open_dynamic(
    src: &dyn ReadAt,
    footer: &Footer,
    virtual_size: u64,
    size: u64,
    tail_footer: Option<u64>,
    limits: &Limits,
    budget: &Budget,
    info: &mut ImageInfo,
    findings: &mut Vec<Finding>,
) -> Result<Dynamic> {
    let hoff = footer.data_offset;
    let (header, _held) = read_dyn_header(src, hoff, size, budget, findings)?;
    let block_size = check_block_size(&header, hoff, virtual_size)?;
    let bat_offset = header.table_offset;
    let spec = TableSpec {
        name: "VHD BAT",
        offset: bat_offset,
        entries: u64::from(header.max_table_entries),
        entry_size: 4,
        align: 1,
    };
    let bat = read_entries(src, spec, size, limits, budget, |c| {
        be32_at(c, 0).unwrap_or(BAT_UNUSED)
    })?;
    let d = Dynamic {
        bat,
        block_size,
        bitmap_len: bitmap_len(block_size),
        bat_offset,
        header_offset: hoff,
        tail_footer,
        file_size: size,
        locators: locator_data(footer, &header),
    };
    blocks_in_file(&d)?;
    if let Some(f) = metadata_overlap(&d) {
        findings.push(f);
    }
    info.cluster_size = Some(block_size);
    info.detail("block-size", block_size);
    if footer.disk_type == TYPE_DIFFERENCING {
        report_parent(src, &header, hoff, size, budget, info, findings);
    }
    Ok(d)
}

/// Reads and parses the dynamic disk header at `hoff` (charged until the `Charge` drops), and
/// reports a checksum that does not add up.
fn read_dyn_header(
    src: &dyn ReadAt,
    hoff: u64,
    size: u64,
    budget: &Budget,
    findings: &mut Vec<Finding>,
) -> Result<(DynHeader, Charge)> {
    if hoff
        .checked_add(DYN_HEADER_LEN as u64)
        .is_none_or(|e| e > size)
    {
        return Err(Error::truncated(format!(
            "dynamic disk header at {hoff:#x} lies outside the file ({size} bytes)"
        ))
        .at(hoff)
        .code("vhd.dynamic-header"));
    }
    let (hbuf, held) = read_held(
        src,
        hoff,
        DYN_HEADER_LEN as u64,
        budget,
        "VHD dynamic disk header",
    )?;
    if !hbuf.starts_with(DYN_COOKIE) {
        return Err(
            Error::invalid("dynamic disk header has no \"cxsparse\" cookie")
                .at(hoff)
                .code("vhd.dynamic-header"),
        );
    }
    let header = DynHeader::parse(&hbuf, hoff)?;
    let computed = checksum(&hbuf, DYN_CHECKSUM_AT);
    if header.checksum != computed {
        // QEMU does not check this one; a mismatch still means the header was altered.
        findings.push(
            Finding::reject(
                "vhd.checksum",
                format!(
                    "dynamic disk header checksum is {:#010x}, the header sums to {computed:#010x}",
                    header.checksum
                ),
            )
            .at(hoff.saturating_add(DYN_CHECKSUM_AT as u64)),
        );
    }
    Ok((header, held))
}

/// The block size, when QEMU and the spec read it alike and the BAT covers the disk.
fn check_block_size(header: &DynHeader, hoff: u64, virtual_size: u64) -> Result<u64> {
    let block_size = u64::from(header.block_size);
    if !block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block_size) {
        return Err(Error::unsupported(format!(
            "block size {block_size} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
        ))
        .at(hoff.saturating_add(28))
        .code("vhd.block-size"));
    }
    let entries = u64::from(header.max_table_entries);
    if entries.saturating_mul(block_size) < virtual_size {
        return Err(Error::corrupt(format!(
            "the BAT's {entries} blocks of {block_size} bytes do not cover the {virtual_size}-byte disk"
        ))
        .at(hoff.saturating_add(28))
        .code("vhd.dynamic-header"));
    }
    if header.max_table_entries > MAX_TABLE_ENTRIES {
        return Err(Error::limit(format!(
            "a BAT of {entries} entries exceeds qemu's {MAX_TABLE_ENTRIES}"
        ))
        .at(hoff.saturating_add(28))
        .code("table.too-large"));
    }
    Ok(block_size)
}

/// QEMU refuses the image when any block passes the end of the file (its
/// free_data_block_offset check); so does glimpse, naming the entry.
fn blocks_in_file(d: &Dynamic) -> Result<()> {
    for (i, &e) in d.bat.iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        let end = u64::from(e)
            .saturating_mul(SECTOR)
            .saturating_add(d.block_span());
        if end > d.file_size {
            return Err(Error::corrupt(format!(
                "BAT entry {i} puts block at sector {e}, ending at {end:#x}, past the end of the file ({} bytes)",
                d.file_size
            ))
            .at(d.entry_at(i))
            .code("vhd.bat-entry-out-of-bounds"));
        }
    }
    Ok(())
}

/// A differencing disk: one finding, and the parent's name and locators as references.
fn report_parent(
    src: &dyn ReadAt,
    header: &DynHeader,
    hoff: u64,
    size: u64,
    budget: &Budget,
    info: &mut ImageInfo,
    findings: &mut Vec<Finding>,
) {
    let name = header.parent_name();
    findings.push(
        Finding::reject(
            "vhd.differencing",
            format!("a differencing VHD over parent {name:?}: its unallocated sectors live in another file, which glimpse never opens"),
        )
        .at(hoff.saturating_add(64)),
    );
    if !name.is_empty() {
        info.references.push(Reference {
            kind: RefKind::ParentLocator,
            target: name,
            format: Some("vhd".into()),
            offset: Some(hoff.saturating_add(64)),
        });
    }
    for (n, loc) in header.locators.iter().enumerate() {
        if loc.platform == [0; 4] || loc.data_length == 0 {
            continue;
        }
        let at = hoff
            .saturating_add(576)
            .saturating_add((n as u64).saturating_mul(24));
        match read_locator(src, loc, size, budget) {
            Ok(target) => info.references.push(Reference {
                kind: RefKind::ParentLocator,
                target,
                format: Some("vhd".into()),
                offset: Some(loc.data_offset),
            }),
            Err(e) => findings.push(
                Finding::reject("vhd.differencing", format!("parent locator {n}: {e}")).at(at),
            ),
        }
    }
}

/// The metadata of a dynamic disk: the footer copy, the dynamic header, the BAT and the
/// footer at the end.
fn metadata_regions(d: &Dynamic) -> Vec<Region<'static>> {
    let mut regions = vec![
        Region::new("the footer copy", 0, FOOTER_LEN as u64),
        Region::new(
            "the dynamic disk header",
            d.header_offset,
            DYN_HEADER_LEN as u64,
        ),
        Region::new(
            "the BAT",
            d.bat_offset,
            (d.bat.len() as u64).saturating_mul(4),
        ),
    ];
    if let Some(t) = d.tail_footer {
        regions.push(Region::new("the footer", t, d.file_size.saturating_sub(t)));
    }
    regions
}

/// Where a differencing disk's parent locators keep their data (at most eight, each at most
/// `MAX_LOCATOR` bytes long); none for other disks, whose locators nobody reads.
fn locator_data(footer: &Footer, header: &DynHeader) -> Vec<(u64, u64)> {
    if footer.disk_type != TYPE_DIFFERENCING {
        return Vec::new();
    }
    header
        .locators
        .iter()
        .filter(|l| l.platform != [0; 4] && l.data_length <= MAX_LOCATOR)
        .map(|l| (l.data_offset, u64::from(l.data_length)))
        .collect()
}

/// The placement of the tables themselves: the footer copy, the dynamic header, the BAT and
/// the footer must not share a byte. A BAT inside the header passes every entry check, and
/// qemu's first allocating write then rewrites the header with a BAT entry.
fn metadata_overlap(d: &Dynamic) -> Option<Finding> {
    overlap_finding(
        "vhd.metadata-overlap",
        &mut metadata_regions(d),
        "a write through the BAT would destroy metadata",
    )
}

/// Decodes one parent locator's data, bounded: UTF-16LE for "W2ku"/"W2ru", UTF-8 for the
/// Mac codes, bytes as Latin-ish text for the deprecated "Wi2r"/"Wi2k".
fn read_locator(
    src: &dyn ReadAt,
    loc: &footer::ParentLocator,
    size: u64,
    budget: &Budget,
) -> Result<String> {
    if loc.data_length > MAX_LOCATOR {
        return Err(Error::limit(format!(
            "{} bytes of locator data exceed {MAX_LOCATOR}",
            loc.data_length
        )));
    }
    let len = u64::from(loc.data_length);
    if loc.data_offset.checked_add(len).is_none_or(|e| e > size) {
        return Err(Error::truncated(format!(
            "locator data at {:#x} lies outside the file",
            loc.data_offset
        )));
    }
    let (raw, _held) = read_held(src, loc.data_offset, len, budget, "VHD parent locator")?;
    let text = match &loc.platform {
        b"W2ku" | b"W2ru" => {
            let units: Vec<u16> = raw
                .chunks_exact(2)
                .filter_map(|c| c.try_into().ok())
                .map(u16::from_le_bytes)
                .collect();
            String::from_utf16_lossy(&units)
        }
        _ => String::from_utf8_lossy(&raw).into_owned(),
    };
    let platform = String::from_utf8_lossy(&loc.platform).into_owned();
    Ok(format!("{platform}:{}", text.trim_end_matches('\0')))
}

impl VhdImage {
    fn map_dynamic(&self, d: &Dynamic, guest: u64, span: u64) -> Result<Extent> {
        let end = guest.saturating_add(span);
        let bs = d.block_size;
        let idx = guest.checked_div(bs).unwrap_or(0);
        let block_guest = idx.saturating_mul(bs);
        let Some(sector) = d.entry(idx) else {
            let mut next = block_guest.saturating_add(bs);
            let mut n = 0;
            while next < end && n < MAX_SCAN && d.entry(next.checked_div(bs).unwrap_or(0)).is_none()
            {
                next = next.saturating_add(bs);
                n = n.saturating_add(1);
            }
            return Ok(Extent {
                start: guest,
                len: next.min(end).saturating_sub(guest),
                kind: ExtentKind::Unallocated,
            });
        };
        // The whole block is data, whatever its sector bitmap says: QEMU (the referee for
        // guest content) reads it that way. A bitmap that hides data from a reader that obeys
        // it (the spec, Hyper-V) is a finding of `check` (`vhd.bitmap-hides-data`).
        let block_host = u64::from(sector).saturating_mul(SECTOR);
        let in_block = guest.saturating_sub(block_guest);
        let stop = block_guest.saturating_add(bs).min(end);
        Ok(Extent {
            start: guest,
            len: stop.saturating_sub(guest),
            kind: ExtentKind::Data {
                host: block_host
                    .saturating_add(d.bitmap_len)
                    .saturating_add(in_block),
            },
        })
    }

    /// The first allocated block whose sector bitmap marks sectors absent that hold bytes
    /// other than zero: QEMU reads those bytes and a reader that obeys the bitmap (the spec,
    /// Hyper-V) reads zeros, so the one file is two disks. Reads each allocated block's bitmap
    /// and the data of its clear runs only: QEMU sets every bit, and Hyper-V zeroes the
    /// sectors it leaves clear. Work is bounded by the file's size.
    fn bitmap_hides_data(&self, d: &Dynamic, limits: &Limits) -> Result<Option<Finding>> {
        let n = usize::try_from(d.bitmap_len).map_err(|_| Error::limit("bitmap too large"))?;
        let _held = limits.budget().charge(
            d.bitmap_len.saturating_add(PROBE),
            "VHD sector bitmap check",
        )?;
        let mut bits = vec![0u8; n];
        let mut data = vec![0u8; PROBE as usize];
        let vsize = self.info.virtual_size;
        for (i, &e) in d.bat.iter().enumerate() {
            if e == BAT_UNUSED {
                continue;
            }
            let host = u64::from(e).saturating_mul(SECTOR);
            let guest0 = (i as u64).saturating_mul(d.block_size);
            let sectors = d.block_size.min(vsize.saturating_sub(guest0)) / SECTOR;
            // Blocks past the file's end are `check`'s other findings.
            if self.src.read_exact_at(&mut bits, host).is_err() {
                continue;
            }
            let clear = |s: u64| {
                let byte = usize::try_from(s / 8).ok().and_then(|x| bits.get(x));
                byte.is_some_and(|b| b & (0x80 >> (s % 8)) == 0)
            };
            let mut s = 0;
            while s < sectors {
                if !clear(s) {
                    s = s.saturating_add(1);
                    continue;
                }
                let run = s;
                while s < sectors && clear(s) {
                    s = s.saturating_add(1);
                }
                let mut at = host
                    .saturating_add(d.bitmap_len)
                    .saturating_add(run.saturating_mul(SECTOR));
                let stop = host
                    .saturating_add(d.bitmap_len)
                    .saturating_add(s.saturating_mul(SECTOR))
                    .min(d.file_size);
                while at < stop {
                    let len = stop.saturating_sub(at).min(PROBE);
                    let buf = data.get_mut(..len as usize).unwrap_or_default();
                    self.src.read_exact_at(buf, at)?;
                    if buf.iter().any(|b| *b != 0) {
                        let off = guest0
                            .saturating_add(at.saturating_sub(host.saturating_add(d.bitmap_len)));
                        return Ok(Some(
                            Finding::reject(
                                "vhd.bitmap-hides-data",
                                format!(
                                    "block {i}'s sector bitmap marks guest bytes at {off:#x} absent, but the block holds data there: QEMU reads the data, a reader that follows the bitmap reads zeros"
                                ),
                            )
                            .at(at),
                        ));
                    }
                    at = at.saturating_add(len);
                }
            }
        }
        Ok(None)
    }

    fn check_dynamic(&self, d: &Dynamic, limits: &Limits) -> Result<Vec<Finding>> {
        let mut out = Findings::new();
        let mut regions = metadata_regions(d);
        regions.extend(
            d.locators
                .iter()
                .map(|&(at, len)| Region::new("a parent locator's data", at, len)),
        );
        let metadata = RegionIndex::new(regions);
        // The block list below, held for the length of the check: one per used entry, so that
        // a large, mostly empty disk costs little.
        let used = d.bat.iter().filter(|&&e| e != BAT_UNUSED).count();
        let _held = limits
            .budget()
            .charge((used as u64).saturating_mul(16), "VHD BAT check")?;
        let mut blocks: Vec<(u64, usize)> = Vec::new();
        blocks
            .try_reserve_exact(used)
            .map_err(|_| Error::limit("VHD BAT check: cannot allocate"))?;
        let span = d.block_span();
        for (i, &e) in d.bat.iter().enumerate() {
            if e == BAT_UNUSED {
                continue;
            }
            let start = u64::from(e).saturating_mul(SECTOR);
            blocks.push((start, i));
            if let Some(r) = metadata.hit(start, start.saturating_add(span)) {
                out.push(
                    Finding::reject(
                        "vhd.entry-into-metadata",
                        format!("BAT entry {i} puts a block at {start:#x} over {}", r.name),
                    )
                    .at(d.entry_at(i)),
                );
            }
        }
        duplicate_blocks(d, &mut blocks, &mut out);
        // Bitmaps are read only where the blocks are sound: a block over the metadata or over
        // another block is refused already, and its "bitmap" is something else.
        if out.is_empty() {
            if let Some(f) = self.bitmap_hides_data(d, limits)? {
                out.push(f);
            }
        }
        Ok(out.finish())
    }
}

/// Blocks that share host bytes: `blocks` (host offset, BAT index) is sorted here.
fn duplicate_blocks(d: &Dynamic, blocks: &mut [(u64, usize)], out: &mut Findings) {
    let span = d.block_span();
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if let [(a, ia), (b, ib)] = w {
            if *b < a.saturating_add(span) {
                out.push(
                    Finding::reject(
                        "vhd.duplicate-block",
                        format!("BAT entries {ia} and {ib} map blocks at {a:#x} and {b:#x}, which overlap"),
                    )
                    .at(d.entry_at(*ib)),
                );
            }
        }
    }
}

impl Image for VhdImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }
    fn check(&self, limits: &Limits) -> Result<Vec<Finding>> {
        match &self.dynamic {
            Some(d) => self.check_dynamic(d, limits),
            None => Ok(Vec::new()),
        }
    }
    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        match &self.dynamic {
            None => Ok(Extent {
                start: guest,
                len: span,
                kind: ExtentKind::Data { host: guest },
            }),
            Some(d) => self.map_dynamic(d, guest, span),
        }
    }
}

#[cfg(test)]
mod tests;
