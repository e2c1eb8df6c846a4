//! Structural checks of a sparse extent: every grain table and every grain pointer.
//!
//! Reads all metadata (each grain table once, each compressed grain's marker) but no guest
//! data. Work is bounded by a counter proportional to the file size ([`Work`]); memory by the
//! metadata budget, every charge of which is given back when the check returns.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};

use super::header::SECTOR;
use super::stream::Marker;
use super::{marker_offset, marker_span, read_marker, MarkerFault, Sparse};
use crate::error::{Error, ErrorKind, Result};
use crate::finding::{Finding, Findings, PER_CODE};
use crate::io::ReadAt;
use crate::limits::{Budget, Charge, Limits};
use crate::ranges::{overlap_finding, Region, RegionIndex};

/// A grain as `check` lists it: its first sector (a grain table entry is 32 bits), its length
/// in sectors, and its grain number.
type Grain = (u32, u32, u64);

/// Entries in the largest piece of a [`Grains`] list (1 MiB).
const GRAIN_PIECE: usize = 1 << 16;

/// The grain list, in pieces each allocated once at its full size and charged before it is:
/// a list grown by doubling one `Vec` was charged for its length while its capacity ran ahead,
/// and each move left the old buffer resident in the heap (278 MB, then 265 MB once charged
/// for capacity, where the budget is 224 MiB). Pieces double from 1 Ki entries to
/// [`GRAIN_PIECE`], so a small image holds little; they are sorted one by one and merged.
#[derive(Default)]
struct Grains {
    pieces: Vec<Vec<Grain>>,
    len: usize,
}

impl Grains {
    fn push(&mut self, g: Grain, work: &mut Work) -> Result<()> {
        if self.pieces.last().is_none_or(|p| p.len() >= p.capacity()) {
            let n = self.len.clamp(1 << 10, GRAIN_PIECE);
            work.room(&mut self.pieces, "VMDK grain list")?;
            let bytes = n.saturating_mul(std::mem::size_of::<Grain>()) as u64;
            work.hold(bytes, "VMDK grain list")?;
            let mut piece = Vec::new();
            piece
                .try_reserve_exact(n)
                .map_err(|_| Error::limit("VMDK grain list: cannot allocate a piece"))?;
            self.pieces.push(piece);
        }
        if let Some(p) = self.pieces.last_mut() {
            p.push(g);
            self.len = self.len.saturating_add(1);
        }
        Ok(())
    }

    /// Every grain in order, the pieces merged (a heap of one entry per piece, charged).
    fn sorted(mut self, work: &mut Work) -> Result<impl Iterator<Item = Grain>> {
        use std::cmp::Reverse;
        let mut heads: Vec<Reverse<(Grain, usize, usize)>> = Vec::new();
        work.held
            .reserve(&mut heads, self.pieces.len(), "VMDK grain list")?;
        let mut heap = std::collections::BinaryHeap::from(heads);
        for (i, p) in self.pieces.iter_mut().enumerate() {
            p.sort_unstable();
            if let Some(&first) = p.first() {
                heap.push(Reverse((first, i, 0usize)));
            }
        }
        let pieces = self.pieces;
        Ok(std::iter::from_fn(move || {
            let Reverse((g, i, at)) = heap.pop()?;
            let next = at.saturating_add(1);
            if let Some(&n) = pieces.get(i).and_then(|p| p.get(next)) {
                heap.push(Reverse((n, i, next)));
            }
            Some(g)
        }))
    }
}

/// Metadata spans in sectors: `(start, end, what)`.
type Spans = Vec<(u64, u64, &'static str)>;

/// Budget bytes one metadata span holds: in the list, then in its index (a region and at most
/// two points where the region a point lies in changes).
const SPAN_BYTES: u64 = (std::mem::size_of::<(u64, u64, &str)>()
    + std::mem::size_of::<Region<'static>>()
    + 2 * std::mem::size_of::<(u64, usize)>()) as u64;

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
    /// Room for one more entry in `list`, its capacity charged before it is allocated.
    fn room<T>(&mut self, list: &mut Vec<T>, what: &str) -> Result<()> {
        self.held.reserve(list, 1, what)
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

/// Budget bytes one remembered grain marker holds (its sector and marker, in a hash table).
const MARKER_BYTES: u64 = 2 * std::mem::size_of::<(u64, Marker)>() as u64;

/// Findings built only when they are kept. [`Findings`] keeps [`PER_CODE`] of a code and
/// counts the rest, and entry after entry can make the same finding millions of times (16 Mi
/// grain-table entries naming one bad marker in 64 MiB): formatting each message cost more than
/// the rest of the check. Once a code has all its kept findings, later ones are counted with
/// no message, which nobody sees.
struct Sink {
    findings: Findings,
    /// Codes with [`PER_CODE`] findings kept.
    full: Vec<&'static str>,
}

impl Sink {
    fn new() -> Self {
        Sink {
            findings: Findings::new(),
            full: Vec::new(),
        }
    }

    /// True when a finding of `code` would only be counted.
    fn is_full(&self, code: &str) -> bool {
        // The same literal is usually the same pointer: no string compare per entry.
        self.full
            .iter()
            .any(|&c| std::ptr::eq(c, code) || c == code)
    }

    /// Counts a finding of `code`, which [`Sink::is_full`] said would only be counted.
    fn count(&mut self, code: &'static str) {
        self.findings.push(Finding::reject(code, String::new()));
    }

    /// Adds the finding `make` builds, whose code is `code`, building it only if it is kept.
    fn push_with(&mut self, code: &'static str, make: impl FnOnce() -> Finding) {
        if self.is_full(code) {
            self.count(code);
            return;
        }
        self.findings.push(make());
        // At most PER_CODE scans per code: after them the code is full.
        if self
            .findings
            .kept()
            .iter()
            .filter(|f| f.code == code)
            .count()
            >= PER_CODE
        {
            self.full.push(code);
        }
    }

    /// [`Findings::error`] for the error `make` builds, whose code is `code`.
    fn error_with(&mut self, code: &'static str, make: impl FnOnce() -> Error) {
        self.push_with(code, || Finding::from_error(&make()));
    }
}

impl Deref for Sink {
    type Target = Findings;
    fn deref(&self) -> &Findings {
        &self.findings
    }
}

impl DerefMut for Sink {
    fn deref_mut(&mut self) -> &mut Findings {
        &mut self.findings
    }
}

/// Markers of compressed grains already read and found not to fit the grain that named them,
/// by sector. A marker belongs to one grain, so a sound image reads each once and remembers
/// none; but every entry of every grain table may name the same marker, and reading it again
/// for each (one `pread` per 4 bytes of table) cost seconds. Here a marker is read at most
/// twice: for the grain it belongs to, and again when another entry names it, which fails and
/// is remembered. Memory is charged per remembered marker; when the budget says no, the marker
/// is read again instead.
struct Markers {
    bad: HashMap<u64, Marker>,
    /// The marker of `bad` last asked for: entries naming one marker come in runs, and a
    /// comparison is cheaper than a hash.
    last: Option<(u64, Marker)>,
    held: Charge,
}

impl Markers {
    fn new(budget: &Budget) -> Result<Self> {
        Ok(Markers {
            bad: HashMap::new(),
            last: None,
            held: budget.charge(0, "VMDK grain markers")?,
        })
    }

    /// What the marker at `sector` says of compressed grain `g`: the compressed length and the
    /// offset of the compressed bytes, or why it does not fit.
    ///
    /// # Errors
    /// `Io` from the read.
    fn span(
        &mut self,
        s: &Sparse,
        src: &dyn ReadAt,
        g: u64,
        sector: u64,
    ) -> Result<std::result::Result<(u64, u64), MarkerFault>> {
        let Some(at) = marker_offset(s.file_size, sector) else {
            return Ok(Err(MarkerFault::Outside));
        };
        let known = match self.last {
            Some((last, m)) if last == sector => Some(m),
            _ => self.bad.get(&sector).copied(),
        };
        let m = match known {
            Some(m) => m,
            None => read_marker(src, s.file_size, at)?,
        };
        let span = marker_span(&s.hdr, s.file_size, g, at, m);
        let remember = known.is_none()
            && span.is_err()
            && self.held.grow(MARKER_BYTES, "VMDK grain markers").is_ok();
        if remember {
            self.bad.insert(sector, m);
        }
        if known.is_some() || remember {
            self.last = Some((sector, m));
        }
        Ok(span)
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
    sink: &mut Sink,
) -> Result<Vec<(u64, usize)>> {
    let gt_sectors = s.cache.table_len().div_ceil(SECTOR);
    let mut tables: Vec<(u64, usize)> = Vec::new();
    // The code of a table that passes the end of the file: every other such table is the
    // same finding, counted without building it once that code is full (a directory as long
    // as the file may name the last sector from every entry).
    let mut past_end: Option<&'static str> = None;
    for (i, &gt) in s.gd.iter().enumerate() {
        if gt == 0 {
            continue;
        }
        let gt = u64::from(gt);
        let passes = gt
            .saturating_mul(SECTOR)
            .saturating_add(s.cache.table_len())
            > s.file_size;
        if let Some(code) = past_end.filter(|c| passes && sink.is_full(c)) {
            sink.count(code);
            continue;
        }
        match s.cache.check(gt) {
            Ok(_) => {
                work.room(&mut tables, "VMDK grain table list")?;
                tables.push((gt, i));
            }
            Err(e) => {
                if passes {
                    past_end = Some(e.finding_code());
                }
                sink.error_with(e.finding_code(), || {
                    e.context(format!("grain directory entry {i}"))
                });
            }
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
            sink.push_with("vmdk.entry-into-metadata", || {
                Finding::reject(
                    "vmdk.entry-into-metadata",
                    format!("grain table {i} overlaps the {}", what.name),
                )
                .at(gt.saturating_mul(SECTOR))
            });
        }
    }
    Ok(tables)
}

/// Every grain pointer of every stored grain table: inside the file, off the metadata in
/// `meta`. Returns the grains, charged to `work` ([`Grains`]).
fn grain_pointers(
    s: &Sparse,
    src: &dyn ReadAt,
    tables: &[(u64, usize)],
    meta: &RegionIndex<'_>,
    work: &mut Work,
    markers: &mut Markers,
    sink: &mut Sink,
) -> Result<Grains> {
    let hdr = &s.hdr;
    let gt_bytes = s.cache.table_len();
    let gt_sectors = gt_bytes.div_ceil(SECTOR);
    let per = u64::from(hdr.gtes_per_gt);
    let mut grains = Grains::default();
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
            let Some((start, end)) = grain_span(s, src, g, e, at, markers, sink)? else {
                continue;
            };
            if let Some(what) = meta.hit(start, end) {
                sink.push_with("vmdk.entry-into-metadata", || {
                    Finding::reject(
                        "vmdk.entry-into-metadata",
                        format!("grain {g} at sector {start} overlaps {}", what.name),
                    )
                    .at(at)
                });
            }
            grains.push(
                (
                    u32::try_from(start).unwrap_or(u32::MAX),
                    u32::try_from(end.saturating_sub(start)).unwrap_or(u32::MAX),
                    g,
                ),
                work,
            )?;
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
    markers: &mut Markers,
    sink: &mut Sink,
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
        let span = match markers.span(s, src, g, start) {
            Ok(span) => span,
            Err(err) if err.kind() == ErrorKind::Io => return Err(err),
            Err(err) => {
                sink.error(&err.at(at));
                return Ok(None);
            }
        };
        return Ok(match span {
            Ok((stored, host)) => Some((start, host.saturating_add(stored).div_ceil(SECTOR))),
            Err(fault) => {
                sink.error_with(fault.code(), || fault.error(g, start).at(at));
                None
            }
        });
    }
    let need = gb.min(vsize.saturating_sub(guest)).div_ceil(SECTOR);
    let end = start.saturating_add(need);
    if end.saturating_mul(SECTOR) > s.file_size {
        sink.push_with("vmdk.gt-entry-out-of-bounds", || {
            Finding::reject(
                "vmdk.gt-entry-out-of-bounds",
                format!("grain {g} at sector {start} passes the end of the file"),
            )
            .at(at)
        });
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
    let mut sink = Sink::new();
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

    let mut markers = Markers::new(&budget)?;
    let grains = grain_pointers(s, src, &tables, &meta, &mut work, &mut markers, &mut sink)?;
    // Its budget back before the grain list is sorted.
    drop(markers);
    let mut prev: Option<Grain> = None;
    for next in grains.sorted(&mut work)? {
        let last = prev.replace(next);
        if let (Some((a, a_len, ga)), (b, _, gb_)) = (last, next) {
            if u64::from(b) < u64::from(a).saturating_add(u64::from(a_len)) {
                sink.push_with("vmdk.duplicate-grain", || {
                    Finding::reject(
                        "vmdk.duplicate-grain",
                        format!("grains {ga} and {gb_} share host sector {b}"),
                    )
                    .at(u64::from(b).saturating_mul(SECTOR))
                });
            }
        }
    }
    Ok(sink.findings.finish())
}
