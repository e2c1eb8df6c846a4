//! VHDX images (Microsoft's Hyper-V format), read the way qemu reads them.
//!
//! Layout: a 1 MiB header section (file identifier, two headers, two region tables), then
//! regions named by the region table (the BAT and the metadata region) and the log named by
//! the current header, then payload blocks anywhere after 1 MiB.
//!
//! `open` checks every structure before any guest byte is mapped: both header checksums, the
//! region table checksum, every region through [`check_table`], every metadata item and its
//! placement (`vhdx.metadata-overlap`), and the BAT table itself. Bad BAT *entries* (state,
//! bounds, overlap with metadata, sharing) do not fail `open`: they are recorded, reported by
//! `check`, and refused by `mapping` when a read reaches them. A non-empty log is reported and makes `mapping` fail, because glimpse
//! does not replay it. A parent (differencing file) is reported as a reference and never
//! opened.

// Hostile input: besides the crate-wide no-panic lints (lib.rs), no silent truncation.
#![warn(clippy::cast_possible_truncation)]

pub mod bat;
pub mod header;
pub mod log;
pub mod metadata;
pub mod region;

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::format::Format;
use crate::image::{Extent, ExtentKind, Image, ImageCore, ImageInfo, RefKind, Reference};
use crate::io::Source;
use crate::limits::{Budget, Limits};
use crate::probe::Probe;
use crate::table::{check_table, read_entries, read_held, Table, TableSpec};

use bat::{Geometry, Reserved};
use header::{HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SECTION_END, HEADER_SIZE};
use region::{REGION1_OFFSET, REGION2_OFFSET, REGION_TABLE_SIZE};

/// Regions are placed on 1 MiB boundaries ("Must be multiple of 1MB").
const REGION_ALIGN: u64 = 1 << 20;
/// Payload blocks looked at per `mapping` call, to bound the work of one call.
const MAX_BLOCKS_PER_CALL: u64 = 1 << 16;

/// An opened VHDX image.
pub struct VhdxImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    geo: Geometry,
    bat: Arc<Table<u64>>,
    /// Bad BAT entries and their findings, found at `open`.
    bad: Arc<bat::Validation>,
    /// A log with entries: the BAT may be stale, so nothing is mapped.
    log_non_empty: bool,
}

/// True when the file starts with the "vhdxfile" identifier.
pub fn probe(p: &Probe<'_>) -> bool {
    p.starts_with(header::FILE_SIGNATURE)
}

/// Opens a VHDX image.
///
/// # Errors
/// `Truncated` when a structure passes the end of the file; `Corrupt` for checksums
/// (`vhdx.header-checksum`, `vhdx.region-checksum`), overlapping regions
/// (`vhdx.region-table`); `Invalid` for impossible values (`vhdx.metadata`,
/// `vhdx.block-size`); `Unsupported` for required
/// regions or items glimpse does not know (`vhdx.unknown-region`, `vhdx.metadata`);
/// `LimitExceeded` (`table.too-large`) when the BAT passes `limits`. Bad BAT entries are
/// not errors: `check` reports them and `mapping` refuses them.
///
/// # Security
/// Reads only from `src`, within `limits`. A parent locator is decoded and reported, never
/// opened.
pub fn open(src: Source, limits: &Limits) -> Result<VhdxImage> {
    let file_size = src.size()?;
    let budget = limits.budget();
    let r = src.as_ref();
    let mut findings = Vec::new();

    let (hdr, creator) = read_headers(r, &budget, &mut findings)?;
    let (regions, table_at) = read_region_table(r, &budget, &mut findings)?;
    let placed = place_regions(&hdr, &regions, table_at, file_size, limits)?;
    let md = read_metadata(r, &regions.metadata, table_at, &budget, &mut findings)?;
    // qemu counts the disk in 512-byte sectors: `total_sectors = virtual_disk_size >> 9`.
    let virtual_size = md.virtual_disk_size & !511;
    let has_parent = md.file_flags & metadata::HAS_PARENT != 0;
    let geo = Geometry::new(
        u64::from(md.block_size),
        u64::from(md.logical_sector_size),
        md.virtual_disk_size,
        has_parent,
    );
    let bat = read_bat(r, &regions.bat, &geo, table_at, file_size, limits, &budget)?;
    let bad = bat::validate(
        &bat,
        &geo,
        regions.bat.offset,
        virtual_size,
        file_size,
        &placed,
        &budget,
    )?;

    // Log.
    let log_non_empty = log::non_empty(r, &hdr, &budget)?;
    if log_non_empty {
        findings.push(
            Finding::reject(
                "vhdx.log-not-empty",
                "the log holds entries: the metadata on disk may be stale until the log is replayed, which glimpse does not do",
            )
            .at(hdr.log_offset),
        );
    }
    let mut info = ImageInfo::new(Format::Vhdx, virtual_size);
    info.actual_size = src.allocated_size();
    describe(&mut info, &md, &creator, log_non_empty, &mut findings);
    Ok(VhdxImage {
        src,
        info,
        findings,
        geo,
        bat: Arc::new(bat),
        bad: Arc::new(bad),
        log_non_empty,
    })
}

/// The file identifier and the current header (the valid one with the higher sequence
/// number), with the creator string the identifier holds.
fn read_headers(
    r: &dyn crate::io::ReadAt,
    budget: &Budget,
    findings: &mut Vec<Finding>,
) -> Result<(header::Header, String)> {
    let (id, _id_held) = read_held(r, 0, 8 + 512, budget, "file identifier")?;
    if id.get(..8) != Some(&header::FILE_SIGNATURE[..]) {
        return Err(Error::invalid("no \"vhdxfile\" identifier at offset 0").at(0));
    }
    let creator = header::creator(&id);

    // Headers: the valid one with the higher sequence number is current.
    let (b1, _b1_held) = read_held(r, HEADER1_OFFSET, HEADER_SIZE as u64, budget, "header 1")?;
    let (b2, _b2_held) = read_held(r, HEADER2_OFFSET, HEADER_SIZE as u64, budget, "header 2")?;
    let h1 = header::parse_header(&b1, HEADER1_OFFSET, 0);
    let h2 = header::parse_header(&b2, HEADER2_OFFSET, 1);
    for (h, off, n) in [(&h1, HEADER1_OFFSET, 1), (&h2, HEADER2_OFFSET, 2)] {
        if let Err(f) = h {
            if h1.is_ok() || h2.is_ok() {
                findings.push(
                    Finding::warn(
                        "vhdx.header-checksum",
                        format!(
                            "header {n} is unusable ({}); the other copy is used",
                            header::fault_name(*f)
                        ),
                    )
                    .at(off),
                );
            }
        }
    }
    let hdr = header::select(h1, h2)?;
    Ok((hdr, creator))
}

/// The region table in use: table 1 as qemu reads it, or table 2 (rejected) when only it is
/// valid. Returns the parsed table and its offset.
fn read_region_table(
    r: &dyn crate::io::ReadAt,
    budget: &Budget,
    findings: &mut Vec<Finding>,
) -> Result<(region::RegionTable, u64)> {
    // Region tables. qemu reads only the first; the spec allows either. A bad first table with
    // a good second one is usable, but qemu would refuse the file, so it is rejected.
    let (t1, _t1_held) = read_held(
        r,
        REGION1_OFFSET,
        REGION_TABLE_SIZE as u64,
        budget,
        "region table 1",
    )?;
    let (t2, _t2_held) = read_held(
        r,
        REGION2_OFFSET,
        REGION_TABLE_SIZE as u64,
        budget,
        "region table 2",
    )?;
    let (table, table_at) = match (region::table_valid(&t1), region::table_valid(&t2)) {
        (true, ok2) => {
            if ok2 && t1 != t2 {
                // Readers that prefer the second copy would see other regions.
                findings.push(
                    Finding::warn(
                        "vhdx.region-table",
                        "the two region tables are valid but differ; table 1 is used, as qemu does",
                    )
                    .at(REGION2_OFFSET),
                );
            }
            if !ok2 {
                findings.push(
                    Finding::warn(
                        "vhdx.region-checksum",
                        "region table 2 has a bad signature or checksum",
                    )
                    .at(REGION2_OFFSET),
                );
            }
            (&t1, REGION1_OFFSET)
        }
        (false, true) => {
            findings.push(
                Finding::reject(
                    "vhdx.region-checksum",
                    "region table 1 has a bad signature or checksum (qemu refuses such a file); table 2 is used",
                )
                .at(REGION1_OFFSET),
            );
            (&t2, REGION2_OFFSET)
        }
        (false, false) => {
            return Err(
                Error::corrupt("both region tables have a bad signature or checksum")
                    .at(REGION1_OFFSET)
                    .code("vhdx.region-checksum"),
            )
        }
    };
    Ok((region::parse(table, table_at)?, table_at))
}

/// Every region and the log lie inside the file, past the header section, and apart from
/// the others. Returns what the payload must not touch.
fn place_regions(
    hdr: &header::Header,
    regions: &region::RegionTable,
    table_at: u64,
    file_size: u64,
    limits: &Limits,
) -> Result<Vec<Reserved<'static>>> {
    // Region lengths are 32-bit, so a region is at most 4 GiB, and a region is placed here,
    // not read: the table cap that matters is applied to the BAT entries actually read
    // (`read_bat`).
    let region_limits = Limits {
        max_table_bytes: u64::from(u32::MAX),
        ..limits.clone()
    };
    let mut placed: Vec<Reserved<'_>> = vec![Reserved {
        start: 0,
        len: HEADER_SECTION_END,
        name: "header section",
    }];
    let log_len = u64::from(hdr.log_length);
    let named = std::iter::once((hdr.log_offset, log_len, "log", hdr.offset)).chain(
        regions.all.iter().map(|g| {
            let name = if g.guid == region::BAT_GUID {
                "BAT"
            } else if g.guid == region::METADATA_GUID {
                "metadata region"
            } else {
                "unknown region"
            };
            (g.offset, u64::from(g.length), name, table_at)
        }),
    );
    for (offset, len, name, at) in named {
        if len == 0 && name == "log" {
            continue;
        }
        check_table(
            TableSpec {
                name,
                offset,
                entries: len,
                entry_size: 1,
                align: REGION_ALIGN,
            },
            file_size,
            &region_limits,
        )?;
        if let Some(other) = placed.iter().find(|p| {
            offset < p.start.saturating_add(p.len) && p.start < offset.saturating_add(len)
        }) {
            return Err(Error::corrupt(format!(
                "the {name} at {offset:#x} overlaps the {} at {:#x}",
                other.name, other.start
            ))
            .at(at)
            .code("vhdx.region-table"));
        }
        placed.push(Reserved {
            start: offset,
            len,
            name,
        });
    }
    Ok(placed)
}

/// The metadata table and items, with findings for sizes qemu accepts but the spec does not.
fn read_metadata(
    r: &dyn crate::io::ReadAt,
    md_region: &region::Region,
    table_at: u64,
    budget: &Budget,
    findings: &mut Vec<Finding>,
) -> Result<metadata::Metadata> {
    if u64::from(md_region.length) < metadata::TABLE_SIZE {
        return Err(Error::invalid(format!(
            "metadata region of {} bytes cannot hold its table",
            md_region.length
        ))
        .at(table_at)
        .code("vhdx.metadata"));
    }
    let (md_table, md_held) = read_held(
        r,
        md_region.offset,
        metadata::TABLE_SIZE,
        budget,
        "metadata table",
    )?;
    let entries = metadata::parse_table(&md_table, md_region.offset)?;
    drop((md_table, md_held));
    let md = metadata::read_items(r, md_region, &entries, budget)?;
    findings.extend(metadata::item_overlap(md_region, &entries));
    let lss = u64::from(md.logical_sector_size);
    if md.virtual_disk_size.checked_rem(lss) != Some(0) {
        findings.push(
            Finding::warn(
                "vhdx.metadata",
                format!(
                    "virtual disk size {} is not a multiple of the logical sector size {lss}",
                    md.virtual_disk_size
                ),
            )
            .at(md.file_parameters_at),
        );
    }
    if md.physical_sector_size != 512 && md.physical_sector_size != 4096 {
        findings.push(Finding::warn(
            "vhdx.metadata",
            format!(
                "physical sector size {} (only 512 and 4096 exist)",
                md.physical_sector_size
            ),
        ));
    }
    Ok(md)
}

/// Reads the BAT: as many entries as the geometry needs, within the BAT region.
fn read_bat(
    r: &dyn crate::io::ReadAt,
    bat_region: &region::Region,
    geo: &Geometry,
    table_at: u64,
    file_size: u64,
    limits: &Limits,
    budget: &Budget,
) -> Result<Table<u64>> {
    let spec = TableSpec {
        name: "BAT",
        offset: bat_region.offset,
        entries: geo.entries,
        entry_size: 8,
        align: REGION_ALIGN,
    };
    let bat_bytes = check_table(spec, file_size, limits)?;
    if geo.data_blocks == 0 && !geo.has_parent {
        // qemu counts the entries of an empty disk as (0 - 1) >> log2(chunk ratio) in 32
        // bits and refuses to open the file ("Invalid argument") unless the BAT region holds
        // that many; `qemu-img create` writes such a region. glimpse needs none of them, but
        // a disk qemu cannot open must not pass.
        let qemu_wants = u64::from(u32::MAX >> geo.chunk_ratio.trailing_zeros().min(31));
        if qemu_wants > u64::from(bat_region.length) / 8 {
            return Err(Error::corrupt(format!(
                "an empty disk whose BAT region ({} bytes) is smaller than the {qemu_wants} \
                 entries qemu reads for it: qemu cannot open it",
                bat_region.length
            ))
            .at(table_at)
            .code("vhdx.region-table"));
        }
    }
    if bat_bytes > u64::from(bat_region.length) {
        return Err(Error::corrupt(format!(
            "the BAT region ({} bytes) is too small for {} entries",
            bat_region.length, geo.entries
        ))
        .at(table_at)
        .code("vhdx.region-table"));
    }
    read_entries(r, spec, file_size, limits, budget, |c| {
        u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))
    })
}

/// Fills `info` from the metadata and reports the parent of a differencing file.
fn describe(
    info: &mut ImageInfo,
    md: &metadata::Metadata,
    creator: &str,
    log_non_empty: bool,
    findings: &mut Vec<Finding>,
) {
    info.cluster_size = Some(u64::from(md.block_size));
    info.dirty = Some(log_non_empty);
    info.detail("block-size", md.block_size);
    info.detail(
        "log-state",
        if log_non_empty { "non-empty" } else { "empty" },
    );
    info.detail("logical-sector-size", md.logical_sector_size);
    info.detail("physical-sector-size", md.physical_sector_size);
    info.detail(
        "leave-blocks-allocated",
        md.file_flags & metadata::LEAVE_BLOCKS_ALLOCATED != 0,
    );
    if !creator.is_empty() {
        info.detail("creator", creator);
    }

    if let Some(pl) = &md.parent {
        let mut map = serde_json::Map::new();
        for (k, v) in &pl.pairs {
            map.insert(k.clone(), v.clone().into());
            if k.contains("path") {
                info.references.push(Reference {
                    kind: RefKind::ParentLocator,
                    target: v.clone(),
                    format: Some("vhdx".into()),
                    offset: Some(pl.at),
                });
            }
        }
        info.detail("parent-locator-type", pl.locator_type.clone());
        info.detail("parent-locator", map);
    }
    if md.file_flags & metadata::HAS_PARENT != 0 {
        let names: Vec<&str> = info.references.iter().map(|r| r.target.as_str()).collect();
        findings.push(
            Finding::reject(
                "vhdx.differencing",
                format!(
                    "differencing image: its content depends on a parent ({})",
                    names.join(", ")
                ),
            )
            .at(md.file_parameters_at),
        );
    }
}

impl VhdxImage {
    /// What payload block `block` is backed by: the extent kind for its first byte and, for
    /// data, the host offset of the block.
    fn block_kind(&self, block: u64) -> Result<(u64, Option<u64>)> {
        let idx = self.geo.payload_index(block);
        self.bad.refuse(idx, block)?;
        let entry = usize::try_from(idx)
            .ok()
            .and_then(|i| self.bat.get(i))
            .copied()
            .unwrap_or(0);
        let state = entry & bat::STATE_MASK;
        match state {
            bat::FULLY_PRESENT => Ok((state, Some(entry & bat::OFFSET_MASK))),
            bat::PARTIALLY_PRESENT => Err(Error::unsupported(format!(
                "payload block {block} is partially present: its sectors come from the parent"
            ))
            .code("vhdx.differencing")),
            // Not present, undefined, unmapped: qemu reads zeros. Zero: explicitly zeros.
            _ => Ok((state, None)),
        }
    }
}

impl Image for VhdxImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }
    /// The bad BAT entries `open` found, capped per code.
    fn check(&self, _limits: &Limits) -> Result<Vec<Finding>> {
        Ok(self.bad.findings.clone())
    }
    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        if self.log_non_empty {
            return Err(
                Error::unsupported("the VHDX log holds entries; the BAT may be stale")
                    .code("vhdx.log-not-empty"),
            );
        }
        let bs = self.geo.block_size;
        let end = guest.saturating_add(span);
        let first = guest.checked_div(bs).unwrap_or(0);
        let (state, host) = self.block_kind(first)?;
        let within = guest.checked_rem(bs).unwrap_or(0);
        let kind = match host {
            Some(h) => ExtentKind::Data {
                host: h.saturating_add(within),
            },
            None if state == bat::ZERO => ExtentKind::Zero,
            None => ExtentKind::Unallocated,
        };
        // Extend over following blocks of the same kind (contiguous on the host for data).
        let mut block = first;
        let mut run_end = first.saturating_add(1).saturating_mul(bs).min(end);
        while run_end < end && block.saturating_sub(first) < MAX_BLOCKS_PER_CALL {
            block = block.saturating_add(1);
            // A block that cannot be mapped ends the run; a call starting there reports it.
            let Ok((s, h)) = self.block_kind(block) else {
                break;
            };
            let same = match (kind, h) {
                (ExtentKind::Data { .. }, Some(h)) => {
                    host.and_then(|h0| {
                        h0.checked_add(block.saturating_sub(first).saturating_mul(bs))
                    }) == Some(h)
                }
                (ExtentKind::Zero, None) => s == bat::ZERO,
                (ExtentKind::Unallocated, None) => s != bat::ZERO,
                _ => false,
            };
            if !same {
                break;
            }
            run_end = block.saturating_add(1).saturating_mul(bs).min(end);
        }
        Ok(Extent {
            start: guest,
            len: run_end.saturating_sub(guest),
            kind,
        })
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;
