//! qcow2 images (QEMU copy-on-write, versions 2 and 3).
//!
//! `open` parses the header and its extensions inside the first cluster, range-checks the
//! L1, refcount and snapshot tables and reads the L1 table. `mapping` walks L1 → L2 with a
//! small cache of parsed L2 tables. `check` (in [`check`]) recounts every host cluster's
//! references and compares them with the stored refcounts, as `qemu-img check` does.
//!
//! # Security
//! Backing and data files are reported as [`Reference`]s and findings, never opened. Every
//! table goes through [`check_table`] against the file size and QEMU's own caps.

pub mod bitmap;
pub mod check;
pub mod counts;
mod crypto;
pub mod header;
pub mod header_only;
pub mod qcow1;
pub mod qed;
pub mod refcount;
pub mod table;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::format::Format;
use crate::image::{Codec, Extent, ExtentKind, Image, ImageCore, ImageInfo, RefKind, Reference};
use crate::io::{read_up_to, read_vec, Source};
use crate::limits::{Budget, Charge, Limits};
use crate::lru::Lru;
use crate::probe::Probe;
use crate::table::{check_table, read_entries, Table, TableSpec};

use header::{Extensions, Header};
use table::{ClusterMap, Geometry, L2Map, Piece, Uniform, L1E_OFFSET_MASK};

/// L1 entries scanned per `mapping` call when skipping unallocated L2 ranges.
const MAX_L1_SCAN: usize = 1 << 16;
/// Parsed L2 tables the cache holds at most (it is also bounded in bytes).
const MAX_CACHED_L2: usize = 64;
/// L2 tables remembered as uniform (all unallocated or all zero) at most. Past it, a table
/// evicted from the cache is read again: distinct tables then fill at least 64 Ki clusters of
/// the file, and a 4 Mi-entry L1 table can name each at most 64 times on average.
const MAX_UNIFORM_L2: usize = 1 << 16;
/// Budget bytes one remembered uniform table holds (its offset and kind, in a hash table).
const UNIFORM_BYTES: u64 = 2 * std::mem::size_of::<(u64, Uniform)>() as u64;

/// An opened qcow2 image.
pub struct Qcow2Image {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    header: Header,
    ext: Extensions,
    geo: Geometry,
    l1: Table<u64>,
    file_size: u64,
    cache: Lru<u64, Arc<L2Map>>,
    uniform: Mutex<UniformTables>,
    budget: Budget,
}

/// L2 tables known to map all their clusters alike ([`Uniform`]), by offset, kept apart from
/// the table cache and far smaller. Shared L2 tables are legal (snapshots leave them), so an
/// L1 table may name one all-unallocated table from each of its entries, or a few of them in
/// turn, which the cache cannot hold: the mapping then crosses every such entry in one step,
/// as it crosses entries that name no table, without reading the table again.
struct UniformTables {
    kinds: HashMap<u64, Uniform>,
    held: Charge,
}

/// True when the head starts with the qcow2 magic (any version: `open` rejects bad ones).
pub fn probe(p: &Probe<'_>) -> bool {
    p.starts_with(&header::MAGIC)
}

/// Opens a qcow2 image.
///
/// # Errors
/// `Truncated` for a short header or table; `Invalid`/`Unsupported`/`Corrupt`/`LimitExceeded`
/// with a `qcow2.*` or `table.*` code for metadata that cannot be used safely.
///
/// # Security
/// Reads the first cluster and the L1 table, bounded by `limits`. Never opens another file.
pub fn open(src: Source, limits: &Limits) -> Result<Qcow2Image> {
    let file_size = src.size()?;
    let head = read_up_to(src.as_ref(), 0, header::V3_HEADER_LEN as usize)?;
    let h = header::parse(&head)?;
    let cs = h.cluster_size();
    let budget = limits.budget();
    let first_len = cs.min(file_size);
    let first = read_vec(src.as_ref(), 0, first_len, &budget, "first cluster")?;
    let parsed = first_cluster(&h, &first);
    drop(first);
    budget.give_back(first_len);
    let (backing, ext) = parsed?;

    let mut findings = Vec::new();
    // qemu keeps whole sectors (total_sectors = size / 512) and so does glimpse: a size
    // that is not a multiple of 512 loses its partial sector.
    let mut info = ImageInfo::new(Format::Qcow2, h.size & !511);
    info.actual_size = src.allocated_size();
    info.cluster_size = Some(cs);
    references(&h, &ext, backing, &mut info, &mut findings);
    features(&h, &mut info, &mut findings);
    crypto::findings(&src, &h, &ext, limits, &mut findings);
    let geo = Geometry {
        cluster_bits: h.cluster_bits,
        extended: h.extended_l2(),
    };
    let l1 = read_l1(&src, &h, &geo, file_size, limits, &budget)?;
    check_refcount_table(&h, file_size, limits)?;
    check_snapshot_table(&h, file_size, limits, &mut findings)?;
    details(&h, &mut info);

    let table_bytes = geo.l2_entries().saturating_mul(16);
    let cache = Lru::new((limits.max_cache_bytes / 4).max(table_bytes), MAX_CACHED_L2);
    let uniform = Mutex::new(UniformTables {
        kinds: HashMap::new(),
        held: budget.charge(0, "uniform L2 tables")?,
    });
    Ok(Qcow2Image {
        src,
        info,
        findings,
        header: h,
        ext,
        geo,
        l1,
        file_size,
        cache,
        uniform,
        budget,
    })
}

/// The backing file name and the header extensions, from the first cluster.
fn first_cluster(h: &Header, first: &[u8]) -> Result<(Option<String>, Extensions)> {
    let cs = h.cluster_size();
    // Backing file name: must lie inside the first cluster and be at most 1023 bytes
    // (qemu: "Backing file name too long").
    let mut ext_end = cs;
    let mut backing = None;
    if h.backing_file_offset != 0 {
        let end = h
            .backing_file_offset
            .checked_add(u64::from(h.backing_file_size));
        if h.backing_file_size > header::MAX_BACKING_NAME || end.is_none_or(|e| e > cs) {
            return Err(Error::invalid(format!(
                "backing file name ({} bytes at {:#x}) is too long or leaves the first cluster",
                h.backing_file_size, h.backing_file_offset
            ))
            .at(8)
            .code("qcow2.backing-file"));
        }
        let name = header::slice(first, h.backing_file_offset, u64::from(h.backing_file_size))?;
        backing = Some(String::from_utf8_lossy(name).into_owned());
        // qemu stops reading extensions where the backing file name starts.
        ext_end = ext_end.min(h.backing_file_offset);
    }
    let mut ext = header::parse_extensions(first, u64::from(h.header_length), ext_end)?;
    // Without the autoclear bit qemu ignores the bitmaps extension, limits and all: its
    // tables are then no metadata, and `qemu-img check` counts their clusters as leaks.
    if h.autoclear_features & header::AUTOCLEAR_BITMAPS == 0 {
        ext.bitmaps = None;
    }
    if let Some(b) = ext.bitmaps {
        let (nb, dir_size, dir_off) = (b.nb_bitmaps, b.directory_size, b.directory_offset);
        // qemu refuses to open such an image (qcow2_read_extensions).
        if nb > header::MAX_BITMAPS || dir_size > header::MAX_BITMAP_DIRECTORY_BYTES {
            return Err(Error::limit(format!(
                "bitmap directory of {nb} bitmaps and {dir_size} bytes exceeds qemu's limits ({} bitmaps, {} bytes)",
                header::MAX_BITMAPS,
                header::MAX_BITMAP_DIRECTORY_BYTES
            ))
            .at(dir_off)
            .code("table.too-large"));
        }
    }
    Ok((backing, ext))
}

/// Reports the backing file and the external data file as references and findings.
fn references(
    h: &Header,
    ext: &Extensions,
    backing: Option<String>,
    info: &mut ImageInfo,
    findings: &mut Vec<Finding>,
) {
    if let Some(name) = backing {
        let format = ext.backing_format.as_ref().map(|(f, _)| f.clone());
        findings.push(
            Finding::reject(
                "qcow2.backing-file",
                format!("the image names a backing file: {name:?}"),
            )
            .at(h.backing_file_offset),
        );
        info.references.push(Reference {
            kind: RefKind::BackingFile,
            target: name,
            format,
            offset: Some(h.backing_file_offset),
        });
    }
    let data_file_bit = h.incompatible_features & header::INCOMPAT_DATA_FILE != 0;
    if h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0 && !data_file_bit {
        // qcow2_do_open: "data-file-raw requires a data file" (only `qemu-img info`, which
        // opens without I/O, shows it).
        findings.push(
            Finding::reject(
                "qcow2.data-file",
                "autoclear bit 1 (data-file-raw) is set without an external data file \
                 (incompatible bit 2): qemu refuses to read the image",
            )
            .at(88),
        );
    }
    if data_file_bit || ext.data_file.is_some() {
        let (target, offset) = match &ext.data_file {
            Some((n, o)) => (n.clone(), Some(*o)),
            None => (String::new(), None),
        };
        let mut f = Finding::reject(
            "qcow2.data-file",
            format!("guest data lives in an external data file {target:?}"),
        );
        f.offset = offset.or(Some(72));
        findings.push(f);
        info.references.push(Reference {
            kind: RefKind::DataFile,
            target: target.clone(),
            format: None,
            offset,
        });
        info.detail("data-file", target);
        info.detail(
            "data-file-raw",
            h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0,
        );
    }
}

/// True when the dirty (lazy refcounts) bit is set.
fn dirty(h: &Header) -> bool {
    h.incompatible_features & header::INCOMPAT_DIRTY != 0
}

/// Reports the corrupt and dirty bits and the encryption.
fn features(h: &Header, info: &mut ImageInfo, findings: &mut Vec<Finding>) {
    if h.misaligned_length() {
        findings.push(
            Finding::reject(
                "qcow2.header-length",
                format!(
                    "header_length {} is not a multiple of 8, as the specification requires \
                     (qemu opens it)",
                    h.header_length
                ),
            )
            .at(100),
        );
    }
    if h.incompatible_features & header::INCOMPAT_CORRUPT != 0 {
        findings.push(
            Finding::reject(
                "qcow2.corrupt-bit",
                "the image is marked corrupt (incompatible bit 1)",
            )
            .at(72),
        );
    }
    if h.extended_l2() {
        // Legal for qemu (and read here), but OpenStack Glance's format inspector knows
        // incompatible bits 0-3 only and refuses the upload: a warning that the image-service
        // gate turns into a rejection (`Policy::image_service`), so that a converter is not
        // bothered with it.
        findings.push(
            Finding::warn(
                "qcow2.extended-l2",
                "extended L2 entries (incompatible bit 4): OpenStack Glance's format inspector \
                 does not know this feature and refuses the image (convert it without \
                 extended_l2 to upload it)",
            )
            .at(72),
        );
    }
    if dirty(h) {
        findings.push(
            Finding::warn(
                "qcow2.lazy-refcounts-dirty",
                "the image is dirty: refcounts may be stale (lazy refcounts)",
            )
            .at(72),
        );
    }
    if h.crypt_method != 0 {
        info.encrypted = true;
        let fmt = if h.crypt_method == 1 { "aes" } else { "luks" };
        findings.push(
            Finding::warn(
                "qcow2.encrypted",
                format!("guest data is encrypted ({fmt}): it cannot be inspected"),
            )
            .at(32),
        );
        let mut m = serde_json::Map::new();
        m.insert("format".into(), fmt.into());
        info.detail("encrypt", serde_json::Value::Object(m));
    }
}

/// Reads the active L1 table, which must cover the virtual size (qemu: "L1 table is too
/// small").
fn read_l1(
    src: &Source,
    h: &Header,
    geo: &Geometry,
    file_size: u64,
    limits: &Limits,
    budget: &Budget,
) -> Result<Table<u64>> {
    let clusters = h.size.div_ceil(h.cluster_size());
    let need_l1 = clusters.div_ceil(geo.l2_entries());
    if u64::from(h.l1_size).saturating_mul(8) > header::MAX_L1_BYTES {
        return Err(Error::limit(format!(
            "L1 table of {} entries exceeds qemu's 32 MiB",
            h.l1_size
        ))
        .at(36)
        .code("table.too-large"));
    }
    let spec = TableSpec {
        name: "L1 table",
        offset: h.l1_table_offset,
        entries: u64::from(h.l1_size),
        entry_size: 8,
        align: h.cluster_size(),
    };
    check_table(spec, file_size, limits)?;
    if u64::from(h.l1_size) < need_l1 {
        return Err(Error::invalid(format!(
            "L1 table has {} entries but {need_l1} are needed for {} bytes",
            h.l1_size, h.size
        ))
        .at(36)
        .code("qcow2.l1-size"));
    }
    read_entries(src.as_ref(), spec, file_size, limits, budget, |c| {
        table::be64(c, 0)
    })
}

/// Range-checks the refcount table (`check` reads it).
fn check_refcount_table(h: &Header, file_size: u64, limits: &Limits) -> Result<()> {
    let cs = h.cluster_size();
    let rt_bytes = u64::from(h.refcount_table_clusters).saturating_mul(cs);
    if rt_bytes > header::MAX_REFTABLE_BYTES {
        return Err(Error::limit(format!(
            "refcount table of {rt_bytes} bytes exceeds qemu's 8 MiB"
        ))
        .at(56)
        .code("table.too-large"));
    }
    if h.refcount_table_clusters == 0 {
        return Err(Error::invalid("the image has no refcount table")
            .at(56)
            .code("qcow2.refcount-table"));
    }
    check_table(
        TableSpec {
            name: "refcount table",
            offset: h.refcount_table_offset,
            entries: rt_bytes / 8,
            entry_size: 8,
            align: cs,
        },
        file_size,
        limits,
    )?;
    Ok(())
}

/// Range-checks the snapshot table (`check` walks it) and reports the snapshots.
fn check_snapshot_table(
    h: &Header,
    file_size: u64,
    limits: &Limits,
    findings: &mut Vec<Finding>,
) -> Result<()> {
    if h.nb_snapshots > header::MAX_SNAPSHOTS {
        return Err(
            Error::invalid(format!("{} snapshots exceed qemu's 65536", h.nb_snapshots))
                .at(60)
                .code("qcow2.snapshot-table"),
        );
    }
    if h.nb_snapshots == 0 {
        // qemu validates the offset even when there are no snapshots (qcow2_validate_table
        // at open): it must be cluster aligned and below 2^63, or the image does not open.
        let cs = h.cluster_size();
        if h.snapshots_offset.checked_rem(cs) != Some(0) || h.snapshots_offset >> 63 != 0 {
            return Err(Error::invalid(format!(
                "snapshot table offset {:#x} is invalid (not aligned to the {cs}-byte cluster, or past 2^63) although there are no snapshots; qemu refuses to open the image",
                h.snapshots_offset
            ))
            .at(64)
            .code("qcow2.snapshot-table"));
        }
    } else {
        // Entries are at least 40 bytes; `check` walks them.
        check_table(
            TableSpec {
                name: "snapshot table",
                offset: h.snapshots_offset,
                entries: u64::from(h.nb_snapshots),
                entry_size: 40,
                align: h.cluster_size(),
            },
            file_size,
            limits,
        )?;
        findings.push(
            Finding::info(
                "qcow2.snapshots",
                format!("the image holds {} internal snapshots", h.nb_snapshots),
            )
            .at(h.snapshots_offset),
        );
    }
    Ok(())
}

/// The header fields `qemu-img info` shows as format-specific details.
fn details(h: &Header, info: &mut ImageInfo) {
    info.dirty = Some(dirty(h));
    if h.version == 2 {
        info.detail("compat", "0.10");
    } else {
        info.detail("compat", "1.1");
    }
    info.detail(
        "compression-type",
        if h.compression_type == 1 {
            "zstd"
        } else {
            "zlib"
        },
    );
    if h.version == 3 {
        info.detail(
            "lazy-refcounts",
            h.compatible_features & header::COMPAT_LAZY_REFCOUNTS != 0,
        );
    }
    info.detail("refcount-bits", h.refcount_bits());
    if h.version == 3 {
        info.detail(
            "corrupt",
            h.incompatible_features & header::INCOMPAT_CORRUPT != 0,
        );
        info.detail("extended-l2", h.extended_l2());
    }
}

impl Qcow2Image {
    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The parsed header extensions.
    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    fn codec(&self) -> Codec {
        if self.header.compression_type == 1 {
            Codec::Zstd
        } else {
            Codec::Deflate
        }
    }

    /// The L2 table at `offset` and its runs (cached), after checking alignment and range.
    fn l2(&self, offset: u64) -> Result<Arc<L2Map>> {
        if self.geo.in_cluster(offset) != 0 {
            return Err(Error::corrupt(format!(
                "L2 table offset {offset:#x} is not cluster aligned"
            ))
            .at(offset)
            .code("table.misaligned"));
        }
        self.cache.get_or_load(
            offset,
            |m| m.bytes(),
            || {
                let t = table::read_l2(self.src.as_ref(), &self.geo, offset, &self.budget)?;
                Ok(Arc::new(L2Map::new(&self.geo, t, &self.budget)?))
            },
        )
    }

    /// Guest bytes one L2 table maps; `cluster_bits <= 21`, so no overflow, and never zero.
    fn l2_reach(&self) -> u64 {
        self.geo.l2_entries() << self.geo.cluster_bits
    }

    fn uniform_tables(&self) -> Result<std::sync::MutexGuard<'_, UniformTables>> {
        self.uniform
            .lock()
            .map_err(|_| Error::corrupt("uniform L2 table list poisoned"))
    }

    /// How the L2 table at `offset` maps all its clusters, when it is known to map them alike.
    fn known_uniform(&self, offset: u64) -> Result<Option<Uniform>> {
        Ok(self.uniform_tables()?.kinds.get(&offset).copied())
    }

    /// Remembers that the L2 table at `offset` maps all its clusters as `kind`, while there is
    /// room (a table not remembered is only read again).
    fn remember_uniform(&self, offset: u64, kind: Uniform) -> Result<()> {
        let mut u = self.uniform_tables()?;
        if u.kinds.len() < MAX_UNIFORM_L2
            && !u.kinds.contains_key(&offset)
            && u.held.grow(UNIFORM_BYTES, "uniform L2 tables").is_ok()
        {
            u.kinds.insert(offset, kind);
        }
        Ok(())
    }

    /// The piece backing guest offset `pos` inside its cluster and where that piece's run
    /// ends inside the cluster.
    fn piece_at(&self, cm: ClusterMap, pos: u64, cluster_start: u64) -> (Piece, u64) {
        let cs = self.geo.cluster_size();
        let within = pos.saturating_sub(cluster_start);
        match cm {
            ClusterMap::Whole(Piece::Data(h)) => (
                Piece::Data(h.saturating_add(within)),
                cluster_start.saturating_add(cs),
            ),
            ClusterMap::Whole(p) => (p, cluster_start.saturating_add(cs)),
            ClusterMap::Sub { host, alloc, zero } => {
                // 32 subclusters of `1 << sub_bits` bytes.
                let sub_bits = self.geo.cluster_bits.saturating_sub(5);
                let si = within >> sub_bits;
                let kind = |i: u64| -> u8 {
                    if (alloc >> i) & 1 == 1 {
                        2
                    } else if (zero >> i) & 1 == 1 {
                        1
                    } else {
                        0
                    }
                };
                let k = kind(si);
                let mut sj = si.saturating_add(1);
                while sj < 32 && kind(sj) == k {
                    sj = sj.saturating_add(1);
                }
                let piece = match k {
                    2 => Piece::Data(host.saturating_add(within)),
                    1 => Piece::Zero,
                    _ => Piece::Unallocated,
                };
                (piece, cluster_start.saturating_add(sj << sub_bits))
            }
        }
    }

    /// Phase 1 of `extent_at` when L1 entry `l1i` maps its whole range as `kind` (unallocated:
    /// it names no L2 table, or one known to be all unallocated; zero: one known to be all
    /// zero): the run over it and the following L1 entries that do the same (at most
    /// [`MAX_L1_SCAN`] of them).
    /// With `join` (a content walk), every L1 entry that reads as zeros continues the run,
    /// whatever its kind.
    fn uniform_l1_run(
        &self,
        guest: u64,
        end: u64,
        l1i: usize,
        kind: Uniform,
        join: bool,
    ) -> Result<Extent> {
        let known = self.uniform_tables()?;
        let alike = |j: usize| match self.l1.get(j).copied().unwrap_or(0) & L1E_OFFSET_MASK {
            0 => join || kind == Uniform::Unallocated,
            off => known.kinds.get(&off).is_some_and(|&k| k == kind || join),
        };
        let mut j = l1i.saturating_add(1);
        let stop = l1i.saturating_add(MAX_L1_SCAN).min(self.l1.len());
        while j < stop && alike(j) {
            j = j.saturating_add(1);
        }
        // Past the L1 table nothing is allocated; the virtual size ends before it anyway.
        let run_end = if j >= self.l1.len() && (join || kind == Uniform::Unallocated) {
            u64::MAX
        } else {
            (j as u64).saturating_mul(self.l2_reach())
        };
        Ok(Extent {
            start: guest,
            len: run_end.min(end).saturating_sub(guest),
            kind: match kind {
                Uniform::Unallocated => ExtentKind::Unallocated,
                Uniform::Zero | Uniform::Mixed => ExtentKind::Zero,
            },
        })
    }

    /// Phase 2 of `extent_at`: walks the L2 table at `l2_off` (for L1 entry `l1i`) from
    /// `guest` while the pieces continue the first one, stopping at the table's end or
    /// `end`. A compressed first piece is an extent of its own. A run of entries that map
    /// whole clusters alike is crossed in one step, and a table that is one unallocated or
    /// zero run is remembered and continued into the next L1 entries (phase 1).
    ///
    /// With `join` (a content walk), zero and unallocated pieces continue each other, and a
    /// table that reads as zeros throughout is remembered and crossed the same way.
    fn l2_run(&self, guest: u64, end: u64, l1i: usize, l2_off: u64, join: bool) -> Result<Extent> {
        let cb = self.geo.cluster_bits;
        let l2e = self.geo.l2_entries();
        let l2 = self.l2(l2_off)?;
        if let Some(kind) = l2.uniform() {
            self.remember_uniform(l2_off, kind)?;
            return self.uniform_l1_run(guest, end, l1i, kind, join);
        }
        if l2.reads_zero() {
            self.remember_uniform(l2_off, Uniform::Mixed)?;
            if join {
                return self.uniform_l1_run(guest, end, l1i, Uniform::Mixed, join);
            }
        }
        let table_end = (l1i as u64).saturating_add(1).saturating_mul(l2e << cb);
        let limit = end.min(table_end);
        let base = (l1i as u64).saturating_mul(l2e);
        let aligned = |h: u64, pos: u64| self.geo.in_cluster(h) == self.geo.in_cluster(pos);
        let mut pos = guest;
        let mut first: Option<Piece> = None;
        while pos < limit {
            let (ci, (entry, bm)) = (pos >> cb)
                .checked_sub(base)
                .and_then(|ci| usize::try_from(ci).ok())
                .and_then(|ci| Some((ci, *l2.table.get(ci)?)))
                .ok_or_else(|| Error::corrupt("L2 index outside its table"))?;
            let cm = table::decode(&self.geo, entry, bm)
                .map_err(|e| e.context(format!("guest offset {pos:#x}")).at(l2_off))?;
            let cstart = pos & (u64::MAX << cb);
            let (piece, run_end) = self.piece_at(cm, pos, cstart);
            match (first, piece) {
                (None, Piece::Compressed { host, stored_len }) => {
                    return self.compressed_extent(guest, end, cstart, host, stored_len);
                }
                (None, p) => {
                    if let Piece::Data(h) = p {
                        if !aligned(h, pos) {
                            return Err(Error::corrupt(format!(
                                "data cluster for guest offset {pos:#x} is not cluster aligned"
                            ))
                            .at(l2_off)
                            .code("qcow2.l2-entry-out-of-bounds"));
                        }
                    }
                    first = Some(p);
                }
                (Some(Piece::Data(h0)), Piece::Data(h))
                    if h0.checked_add(pos.saturating_sub(guest)) == Some(h) && aligned(h, pos) => {}
                (Some(Piece::Zero), Piece::Zero)
                | (Some(Piece::Unallocated), Piece::Unallocated) => {}
                (Some(Piece::Zero | Piece::Unallocated), Piece::Zero | Piece::Unallocated)
                    if join => {}
                _ => break,
            }
            // The entry maps its whole cluster and the run took it: the entries after it, to
            // the end of its run in the table, continue the run the same way.
            let next = match cm {
                ClusterMap::Whole(Piece::Unallocated | Piece::Zero | Piece::Data(_)) => {
                    base.saturating_add(l2.run_end(ci, join) as u64) << cb
                }
                ClusterMap::Sub { alloc: 0, .. } if join => {
                    base.saturating_add(l2.run_end(ci, join) as u64) << cb
                }
                _ => run_end,
            };
            pos = next.max(run_end).min(limit);
        }
        self.run_extent(guest, pos.saturating_sub(guest), first)
    }

    /// The extent for a compressed cluster starting at `cstart` that backs `guest`: the
    /// rest of that cluster, up to `end`.
    fn compressed_extent(
        &self,
        guest: u64,
        end: u64,
        cstart: u64,
        host: u64,
        stored_len: u64,
    ) -> Result<Extent> {
        if host >= self.file_size {
            return Err(Error::corrupt(format!(
                "compressed cluster for guest offset {guest:#x} lies past the end of the file"
            ))
            .at(host)
            .code("qcow2.l2-entry-out-of-bounds"));
        }
        let cs = self.geo.cluster_size();
        let kind = ExtentKind::Compressed {
            codec: self.codec(),
            host,
            stored_len,
            unit_size: cs,
            skip: guest.saturating_sub(cstart),
        };
        Ok(Extent {
            start: guest,
            len: cstart.saturating_add(cs).min(end).saturating_sub(guest),
            kind,
        })
    }

    /// Phase 3 of `extent_at`: the extent for a run of `len` bytes at `guest` backed like
    /// `first`, after checking that a data run ends inside the file.
    fn run_extent(&self, guest: u64, len: u64, first: Option<Piece>) -> Result<Extent> {
        let kind = match first {
            Some(Piece::Data(host)) => {
                if host.checked_add(len).is_none_or(|e| e > self.file_size) {
                    return Err(Error::corrupt(format!(
                        "guest offset {guest:#x} maps to host {host:#x}+{len}, past the end of the file ({} bytes)",
                        self.file_size
                    ))
                    .at(host)
                    .code("qcow2.l2-entry-out-of-bounds"));
                }
                ExtentKind::Data { host }
            }
            Some(Piece::Zero) => ExtentKind::Zero,
            _ => ExtentKind::Unallocated,
        };
        Ok(Extent {
            start: guest,
            len,
            kind,
        })
    }
}

impl Image for Qcow2Image {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }
    fn check(&self, limits: &Limits) -> Result<Vec<Finding>> {
        check::check(self, limits)
    }
    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        self.walk(guest, span, false)
    }
    fn content_extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        self.walk(guest, span, true)
    }
}

impl Qcow2Image {
    /// [`Image::extent_at`], or with `join` [`Image::content_extent_at`].
    fn walk(&self, guest: u64, span: u64, join: bool) -> Result<Extent> {
        let end = guest.saturating_add(span);
        if self.header.incompatible_features & header::INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                "guest data lives in an external data file, which is never opened",
            )
            .code("qcow2.data-file"));
        }
        let l1i = guest
            .checked_div(self.l2_reach())
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| Error::corrupt("L1 index overflows"))?;
        let l2_off = self.l1.get(l1i).copied().unwrap_or(0) & L1E_OFFSET_MASK;
        if l2_off == 0 {
            return self.uniform_l1_run(guest, end, l1i, Uniform::Unallocated, join);
        }
        match self.known_uniform(l2_off)? {
            Some(Uniform::Mixed) if !join => {}
            Some(kind) => return self.uniform_l1_run(guest, end, l1i, kind, join),
            None => {}
        }
        self.l2_run(guest, end, l1i, l2_off, join)
    }
}
