//! Structural checks of a sparse extent: every grain table and every grain pointer.
//!
//! Reads all metadata (each grain table once, each compressed grain's marker) but no guest
//! data. Work is bounded by a counter proportional to the file size ([`Work`]); memory by the
//! metadata budget, every charge of which is given back when the check returns.

use super::header::SECTOR;
use super::{grain_marker, Sparse};
use crate::error::{ErrorKind, Result};
use crate::finding::{Finding, Findings};
use crate::io::ReadAt;
use crate::limits::{Budget, Charge, Limits};
use crate::ranges::{overlap_finding, Region, RegionIndex};

/// Metadata spans in sectors: `(start, end, what)`.
type Spans = Vec<(u64, u64, &'static str)>;

/// Budget bytes one entry of the grain table list holds.
const TABLE_BYTES: u64 = std::mem::size_of::<(u64, usize)>() as u64;
/// Budget bytes one metadata span holds: in the list, then in its index.
const SPAN_BYTES: u64 = (std::mem::size_of::<(u64, u64, &str)>()
    + std::mem::size_of::<Region<'static>>()
    + std::mem::size_of::<u64>()) as u64;

/// Grain-table bytes a check may read: each stored table is walked once and compared with its
/// redundant copy once, so a valid image needs at most three times its file size. Alternating
/// directory entries that defeat the table cache stop here instead of running for minutes.
///
/// It also holds the budget charged for what the check builds (table list, metadata spans and
/// their index, grain list): charged before each grows, given back when the check returns.
struct Work {
    left: u64,
    held: Charge,
}

impl Work {
    fn new(file_size: u64, budget: &Budget) -> Result<Self> {
        Ok(Work {
            left: file_size.saturating_mul(4).saturating_add(1 << 20),
            held: budget.charge(0, "VMDK check lists")?,
        })
    }
    fn hold(&mut self, bytes: u64, what: &str) -> Result<()> {
        self.held.grow(bytes, what)
    }
    fn spend(&mut self, bytes: u64) -> Result<()> {
        self.left = self.left.checked_sub(bytes).ok_or_else(|| {
            crate::error::Error::limit(
                "VMDK grain tables: more reads than four times the file size",
            )
        })?;
        Ok(())
    }
}

/// An index of metadata spans given in sectors (the index compares them in sectors too).
fn index(spans: &[(u64, u64, &'static str)]) -> RegionIndex<'static> {
    RegionIndex::new(
        spans
            .iter()
            .map(|&(start, end, name)| Region::new(name, start, end.saturating_sub(start)))
            .collect(),
    )
}

/// The redundant directory and its tables: inside the file, counted as metadata, and saying
/// what the primary ones say. qemu writes both and reads only the primary; a reader that
/// recovers from the redundant copy would see another disk.
fn redundant(
    s: &Sparse,
    src: &dyn ReadAt,
    limits: &Limits,
    budget: &Budget,
    work: &mut Work,
    meta: &mut Spans,
    sink: &mut Findings,
) -> Result<()> {
    let hdr = &s.hdr;
    if hdr.flags & super::header::FLAG_REDUNDANT == 0 || hdr.rgd_offset == 0 {
        return Ok(());
    }
    let gt_sectors = s.cache.table_len().div_ceil(SECTOR);
    let at = hdr.rgd_offset.saturating_mul(SECTOR);
    let rgd = match super::table::read_directory(
        src,
        "redundant grain directory",
        hdr.rgd_offset,
        s.gd.len() as u64,
        s.file_size,
        limits,
        budget,
    ) {
        Ok(t) => t,
        Err(e) if matches!(e.kind(), ErrorKind::Io | ErrorKind::LimitExceeded) => return Err(e),
        Err(e) => {
            sink.error(&e);
            return Ok(());
        }
    };
    let mismatch = |sink: &mut Findings, i: usize| {
        sink.push(
            Finding::warn(
                "vmdk.redundant-mismatch",
                format!("grain table {i} differs from its redundant copy"),
            )
            .at(at.saturating_add((i as u64).saturating_mul(4))),
        );
    };
    for (i, (&p, &r)) in s.gd.iter().zip(rgd.iter()).enumerate() {
        if r == 0 {
            if p != 0 {
                mismatch(sink, i);
            }
            continue;
        }
        let r = u64::from(r);
        if let Err(e) = s.cache.check(r) {
            sink.error(&e.context(format!("redundant grain directory entry {i}")));
            continue;
        }
        work.hold(SPAN_BYTES, "VMDK metadata spans")?;
        meta.push((r, r.saturating_add(gt_sectors), "a redundant grain table"));
        if p == 0 {
            mismatch(sink, i);
            continue;
        }
        work.spend(s.cache.table_len().saturating_mul(2))?;
        match (s.cache.get(src, u64::from(p)), s.cache.get(src, r)) {
            (Ok(a), Ok(b)) => {
                if a != b {
                    mismatch(sink, i);
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                if e.kind() == ErrorKind::Io {
                    return Err(e);
                }
                // The primary's problems are reported below; report the copy's here.
                if s.cache.check(u64::from(p)).is_ok() {
                    sink.error(&e);
                }
            }
        }
    }
    Ok(())
}

/// The fixed structures (header, descriptor, directories, footer) must not share a sector: a
/// directory placed over the descriptor passes every entry check, and the first grain table
/// qemu allocates through it rewrites the descriptor.
fn fixed_overlap(meta: &[(u64, u64, &'static str)], sink: &mut Findings) {
    let mut regions: Vec<Region<'_>> = meta
        .iter()
        .map(|&(start, end, name)| {
            Region::new(
                name,
                start.saturating_mul(SECTOR),
                end.saturating_sub(start).saturating_mul(SECTOR),
            )
        })
        .collect();
    if let Some(f) = overlap_finding(
        "vmdk.metadata-overlap",
        &mut regions,
        "a grain table qemu allocates there would overwrite it",
    ) {
        sink.push(f);
    }
}

/// The fixed structures: header, descriptor, directories and footer, in sectors.
fn fixed_spans(s: &Sparse) -> Spans {
    let hdr = &s.hdr;
    let gd_sectors = (s.gd.len() as u64).saturating_mul(4).div_ceil(SECTOR);
    let mut meta = vec![
        (0, 1, "header"),
        (
            hdr.descriptor_offset,
            hdr.descriptor_offset.saturating_add(hdr.descriptor_size),
            "descriptor",
        ),
        (
            hdr.gd_offset,
            hdr.gd_offset.saturating_add(gd_sectors),
            "grain directory",
        ),
    ];
    if s.footer_form {
        meta.push((
            (s.hdr_at / SECTOR).saturating_sub(1),
            s.file_size.div_ceil(SECTOR),
            "footer",
        ));
    }
    if hdr.flags & super::header::FLAG_REDUNDANT != 0 && hdr.rgd_offset != 0 {
        meta.push((
            hdr.rgd_offset,
            hdr.rgd_offset.saturating_add(gd_sectors),
            "redundant grain directory",
        ));
    }
    meta
}

/// The grain tables the directory names, sorted by sector with their directory index: each
/// inside the file, apart from the others and from the fixed structures in `meta`.
fn grain_tables(
    s: &Sparse,
    meta: &[(u64, u64, &'static str)],
    work: &mut Work,
    sink: &mut Findings,
) -> Result<Vec<(u64, usize)>> {
    let gt_sectors = s.cache.table_len().div_ceil(SECTOR);
    let mut tables: Vec<(u64, usize)> = Vec::new();
    for (i, &gt) in s.gd.iter().enumerate() {
        if gt == 0 {
            continue;
        }
        match s.cache.check(u64::from(gt)) {
            Ok(_) => {
                work.hold(TABLE_BYTES, "VMDK grain table list")?;
                tables.push((u64::from(gt), i));
            }
            Err(e) => sink.error(&e.context(format!("grain directory entry {i}"))),
        }
    }
    tables.sort_unstable();
    for w in tables.windows(2) {
        if let [(a, ia), (b, ib)] = w {
            if *b < a.saturating_add(gt_sectors) {
                sink.push(
                    Finding::reject(
                        "vmdk.duplicate-grain",
                        format!("grain directory entries {ia} and {ib} share grain table sectors"),
                    )
                    .at(b.saturating_mul(SECTOR)),
                );
            }
        }
    }
    let fixed = index(meta);
    for &(gt, i) in &tables {
        if let Some(what) = fixed.hit(gt, gt.saturating_add(gt_sectors)) {
            sink.push(
                Finding::reject(
                    "vmdk.entry-into-metadata",
                    format!("grain table {i} overlaps the {}", what.name),
                )
                .at(gt.saturating_mul(SECTOR)),
            );
        }
    }
    Ok(tables)
}

/// Every grain pointer of every stored grain table: inside the file, off the metadata in
/// `meta`. Returns the grains as `(start, end, grain)` in sectors, charged to `work`.
fn grain_pointers(
    s: &Sparse,
    src: &dyn ReadAt,
    tables: &[(u64, usize)],
    meta: &RegionIndex<'_>,
    work: &mut Work,
    sink: &mut Findings,
) -> Result<Vec<(u64, u64, u64)>> {
    let hdr = &s.hdr;
    let gt_bytes = s.cache.table_len();
    let gt_sectors = gt_bytes.div_ceil(SECTOR);
    let per = u64::from(hdr.gtes_per_gt);
    let mut grains: Vec<(u64, u64, u64)> = Vec::new();
    // A table that shares sectors with the previous one is already a finding; walking its
    // entries again would only repeat the same grains (30,000 GD entries naming one GT would
    // list 15 million grains from a 200 KiB file), so each stored table is walked once.
    let mut walked_to = 0u64;
    for &(gt_sector, i) in tables {
        if gt_sector < walked_to {
            continue;
        }
        walked_to = gt_sector.saturating_add(gt_sectors);
        work.spend(gt_bytes)?;
        let gt = match s.cache.get(src, gt_sector) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::Io => return Err(e),
            Err(e) => {
                sink.error(&e);
                continue;
            }
        };
        for (j, &e) in gt.iter().enumerate() {
            let g = (i as u64).saturating_mul(per).saturating_add(j as u64);
            let at = gt_sector
                .saturating_mul(SECTOR)
                .saturating_add((j as u64).saturating_mul(4));
            let Some((start, end)) = grain_span(s, src, g, e, at, sink)? else {
                continue;
            };
            if let Some(what) = meta.hit(start, end) {
                sink.push(
                    Finding::reject(
                        "vmdk.entry-into-metadata",
                        format!("grain {g} at sector {start} overlaps {}", what.name),
                    )
                    .at(at),
                );
            }
            work.hold(24, "VMDK grain list")?;
            grains.push((start, end, g));
        }
    }
    Ok(grains)
}

/// The sectors `[start, end)` grain `g` (entry `e`, stored at byte `at`) occupies, or `None`
/// when it occupies none or is a finding.
fn grain_span(
    s: &Sparse,
    src: &dyn ReadAt,
    g: u64,
    e: u32,
    at: u64,
    sink: &mut Findings,
) -> Result<Option<(u64, u64)>> {
    let hdr = &s.hdr;
    let vsize = hdr.capacity.saturating_mul(SECTOR);
    let gb = hdr.grain_bytes();
    let guest = g.saturating_mul(gb);
    if e == 0 || (e == 1 && hdr.zero_grain()) || guest >= vsize {
        return Ok(None);
    }
    let start = u64::from(e);
    if hdr.compressed() {
        return match grain_marker(src, hdr, s.file_size, g, start) {
            Ok((stored, host)) => Ok(Some((start, host.saturating_add(stored).div_ceil(SECTOR)))),
            Err(err) if err.kind() == ErrorKind::Io => Err(err),
            Err(err) => {
                sink.error(&err.at(at));
                Ok(None)
            }
        };
    }
    let need = gb.min(vsize.saturating_sub(guest)).div_ceil(SECTOR);
    let end = start.saturating_add(need);
    if end.saturating_mul(SECTOR) > s.file_size {
        sink.push(
            Finding::reject(
                "vmdk.gt-entry-out-of-bounds",
                format!("grain {g} at sector {start} passes the end of the file"),
            )
            .at(at),
        );
        return Ok(None);
    }
    Ok(Some((start, end)))
}

/// Runs the structural checks.
///
/// # Errors
/// `Io`; `LimitExceeded` when the metadata budget or the work bound runs out.
pub(crate) fn check(s: &Sparse, src: &dyn ReadAt, limits: &Limits) -> Result<Vec<Finding>> {
    let budget = limits.budget();
    let mut sink = Findings::new();
    let gt_sectors = s.cache.table_len().div_ceil(SECTOR);

    let mut work = Work::new(s.file_size, &budget)?;
    let mut meta = fixed_spans(s);
    fixed_overlap(&meta, &mut sink);
    let tables = grain_tables(s, &meta, &mut work, &mut sink)?;
    // One span per stored table: directory entries naming the same table are already
    // `vmdk.duplicate-grain`, and repeating their span would only grow the index.
    let mut last = None;
    for &(gt, _) in &tables {
        if last == Some(gt) {
            continue;
        }
        last = Some(gt);
        work.hold(SPAN_BYTES, "VMDK metadata spans")?;
        meta.push((gt, gt.saturating_add(gt_sectors), "a grain table"));
    }
    redundant(s, src, limits, &budget, &mut work, &mut meta, &mut sink)?;
    let meta = index(&meta);

    let mut grains = grain_pointers(s, src, &tables, &meta, &mut work, &mut sink)?;
    grains.sort_unstable();
    for w in grains.windows(2) {
        if let [(_, a_end, ga), (b, _, gb_)] = w {
            if b < a_end {
                sink.push(
                    Finding::reject(
                        "vmdk.duplicate-grain",
                        format!("grains {ga} and {gb_} share host sector {b}"),
                    )
                    .at(b.saturating_mul(SECTOR)),
                );
            }
        }
    }
    Ok(sink.finish())
}
