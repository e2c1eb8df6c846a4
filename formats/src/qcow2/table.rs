//! L1 and L2 tables: entry layouts and the parsed L2 tables the cache holds.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::ReadAt;
use crate::limits::{Budget, Charge, Limits};
use crate::table::{read_entries, Table, TableSpec};

/// L1 entry bits 9-55: offset of the L2 table (cluster aligned).
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero (qemu's `L1E_RESERVED_MASK`: bits 0-8 and 56-62).
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 descriptor bits that must be zero (qemu's `L2E_STD_RESERVED_MASK`: bits 1-8
/// and 56-61).
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// L2 standard descriptor bits 9-55: host cluster offset.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one (L1 and standard L2 entries).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard descriptor: the cluster reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Compressed data is counted in 512-byte sectors.
pub const SECTOR: u64 = 512;

/// What one guest cluster (or subcluster) is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Not allocated: reads as zeros (the backing file is never consulted).
    Unallocated,
    /// Explicitly zero.
    Zero,
    /// Host offset of the cluster's data.
    Data(u64),
    /// Compressed cluster: host offset of the stream and its byte length bound.
    Compressed {
        /// Offset of the compressed stream (not aligned).
        host: u64,
        /// Bytes from `host` to the end of its last sector (what qemu reads).
        stored_len: u64,
    },
}

/// How one L2 entry maps its guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMap {
    /// The whole cluster is one kind.
    Whole(Piece),
    /// Extended L2 with subclusters of different kinds: host cluster offset (0 if none) and
    /// the allocation and zero bitmaps (bit x for subcluster x).
    Sub {
        /// Host offset of the cluster (0 when none is set).
        host: u64,
        /// Allocation bitmap.
        alloc: u32,
        /// Reads-as-zero bitmap.
        zero: u32,
    },
}

/// The geometry needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit L2 entries.
    pub extended: bool,
}

impl Geometry {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() >> self.l2_entry_size().trailing_zeros()
    }
    /// The offset of byte `off` inside its cluster (0 when `off` is cluster aligned).
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & !(u64::MAX << self.cluster_bits)
    }
    /// `x` of the spec's compressed descriptor: bits below it hold the host offset, bits
    /// from it the number of additional 512-byte sectors.
    pub fn csize_shift(&self) -> u32 {
        62u32.saturating_sub(self.cluster_bits.saturating_sub(8))
    }
    /// Decodes a compressed descriptor to (host offset, bytes to its last sector's end), as
    /// qemu's `qcow2_parse_compressed_l2_entry` computes them.
    pub fn compressed(&self, entry: u64) -> (u64, u64) {
        let shift = self.csize_shift();
        let host = entry & !(u64::MAX << shift);
        let mask = !(u64::MAX << self.cluster_bits.saturating_sub(8));
        let sectors = ((entry >> shift) & mask).saturating_add(1);
        (
            host,
            sectors.saturating_mul(SECTOR).saturating_sub(host % SECTOR),
        )
    }
}

/// Decodes an L2 entry (and its bitmap for extended L2) following qemu's
/// `qcow2_get_subcluster_type`.
///
/// # Errors
/// `Corrupt` for combinations qemu calls invalid (allocated subclusters without a host
/// offset, a subcluster both allocated and zero).
pub fn decode(g: &Geometry, entry: u64, bitmap: u64) -> Result<ClusterMap> {
    if entry & OFLAG_COMPRESSED != 0 {
        let (host, stored_len) = g.compressed(entry);
        return Ok(ClusterMap::Whole(Piece::Compressed { host, stored_len }));
    }
    let host = entry & L2E_OFFSET_MASK;
    if !g.extended {
        // qemu applies the zero flag whatever the version (qcow2_get_cluster_type).
        if entry & OFLAG_ZERO != 0 {
            return Ok(ClusterMap::Whole(Piece::Zero));
        }
        return Ok(ClusterMap::Whole(if host == 0 {
            Piece::Unallocated
        } else {
            Piece::Data(host)
        }));
    }
    let alloc = u32::try_from(bitmap & 0xffff_ffff).unwrap_or(0);
    let zero = u32::try_from(bitmap >> 32).unwrap_or(0);
    if alloc & zero != 0 {
        return Err(
            Error::corrupt("extended L2 entry marks a subcluster both allocated and zero")
                .code("qcow2.l2-entry-out-of-bounds"),
        );
    }
    if host == 0 && alloc != 0 {
        return Err(Error::corrupt(
            "extended L2 entry allocates subclusters without a host cluster",
        )
        .code("qcow2.l2-entry-out-of-bounds"));
    }
    Ok(match (alloc, zero) {
        (u32::MAX, _) => ClusterMap::Whole(Piece::Data(host)),
        (0, u32::MAX) => ClusterMap::Whole(Piece::Zero),
        (0, 0) => ClusterMap::Whole(Piece::Unallocated),
        _ => ClusterMap::Sub { host, alloc, zero },
    })
}

/// A parsed L2 table: (entry, bitmap) pairs, charged to the budget until the last clone
/// is dropped.
pub type L2Table = Arc<Table<(u64, u64)>>;

/// Reads and parses the L2 table at `offset` (one cluster).
///
/// # Errors
/// `Truncated` (`table.out-of-bounds`) past the file end; `LimitExceeded` when the budget is
/// spent; `Io`.
pub fn read_l2(src: &dyn ReadAt, g: &Geometry, offset: u64, budget: &Budget) -> Result<L2Table> {
    let spec = TableSpec {
        name: "L2 table",
        offset,
        entries: g.l2_entries(),
        entry_size: g.l2_entry_size(),
        align: 1,
    };
    // The range against the file is the bounded read's check (`Truncated`, as it always was):
    // `check_table` only checks the entry count and overflow here.
    let limits = Limits::default();
    let extended = g.extended;
    let t = read_entries(src, spec, u64::MAX, &limits, budget, |e| {
        (be64(e, 0), if extended { be64(e, 8) } else { 0 })
    })?;
    Ok(Arc::new(t))
}

/// How an L2 table maps every one of its clusters when it maps them all alike and stores no
/// data: the mapping then reads it as one run, and need not read it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uniform {
    /// Every entry is unallocated.
    Unallocated,
    /// Every entry reads as zeros.
    Zero,
    /// Every entry reads as zeros, some marked zero and some unallocated: one run only for a
    /// content walk ([`Image::content_extent_at`](crate::image::Image::content_extent_at)).
    Mixed,
}

/// A parsed L2 table and where its runs start, as the mapping caches it. A run is entries that
/// each map their whole cluster alike: unallocated, zero, or data stored right after the
/// previous entry's. The mapping crosses a run in one step instead of decoding it entry by
/// entry: an all-unallocated 2 MiB-cluster table is 262144 entries, and an L1 table may name
/// the same one from all its entries.
#[derive(Debug)]
pub struct L2Map {
    /// The (entry, bitmap) pairs.
    pub table: L2Table,
    /// The indices, ascending, whose entry does not continue the previous one's run.
    starts: Vec<u32>,
    /// The same for a content walk, where zero and unallocated entries (and clusters whose
    /// subclusters are all one or the other) continue each other: a subset of `starts`.
    zstarts: Vec<u32>,
    /// Set when the whole table is one unallocated or zero run.
    uniform: Option<Uniform>,
    /// Set when the whole table reads as zeros.
    reads_zero: bool,
    _charge: Charge,
}

impl L2Map {
    /// Finds the runs of `table`, and the runs a content walk sees: two passes of one decode
    /// per entry, the first to size (and charge) the lists of run starts, the second to fill
    /// them.
    ///
    /// # Errors
    /// `LimitExceeded` when the budget or the allocator says no.
    pub fn new(g: &Geometry, table: L2Table, budget: &Budget) -> Result<Self> {
        // Each entry's index and whether it starts a run, and a content walk's run.
        let starts_at = || {
            let (mut prev, mut zprev) = (None, None);
            table.iter().enumerate().map(move |(i, &(e, bm))| {
                let m = decode(g, e, bm).ok();
                let (kind, zkind) = (whole(m), zero_whole(m));
                let starts = i > 0 && !continues(g, prev, kind);
                let zstarts = i > 0 && !continues(g, zprev, zkind);
                (prev, zprev) = (kind, zkind);
                (i, starts, zstarts)
            })
        };
        let (n, zn) = starts_at().fold((0usize, 0usize), |(n, zn), (_, s, z)| {
            (
                n.saturating_add(usize::from(s)),
                zn.saturating_add(usize::from(z)),
            )
        });
        let charge = budget.charge(
            (n.saturating_add(zn) as u64).saturating_mul(std::mem::size_of::<u32>() as u64),
            "L2 table runs",
        )?;
        let (mut starts, mut zstarts) = (Vec::new(), Vec::new());
        for (v, n) in [(&mut starts, n), (&mut zstarts, zn)] {
            v.try_reserve_exact(n)
                .map_err(|_| Error::limit("L2 table runs: cannot allocate"))?;
        }
        for (i, s, z) in starts_at() {
            // Entry indices are below 2^18 (one cluster of at most 2 MiB, 8 bytes each).
            let Ok(i) = u32::try_from(i) else { continue };
            if s {
                starts.push(i);
            }
            if z {
                zstarts.push(i);
            }
        }
        let first_map = table.first().and_then(|&(e, bm)| decode(g, e, bm).ok());
        let first = whole(first_map);
        let uniform = match first {
            Some(Piece::Unallocated) if starts.is_empty() => Some(Uniform::Unallocated),
            Some(Piece::Zero) if starts.is_empty() => Some(Uniform::Zero),
            _ => None,
        };
        let reads_zero = zero_whole(first_map) == Some(Piece::Zero) && zstarts.is_empty();
        Ok(L2Map {
            table,
            starts,
            zstarts,
            uniform,
            reads_zero,
            _charge: charge,
        })
    }

    /// One past the last index of the run entry `i` belongs to (the table's length when the run
    /// goes to its end). O(log runs).
    pub fn run_end(&self, i: usize, join: bool) -> usize {
        let starts = match join {
            true => &self.zstarts,
            false => &self.starts,
        };
        let k = starts.partition_point(|&s| usize::try_from(s).unwrap_or(usize::MAX) <= i);
        starts
            .get(k)
            .and_then(|&s| usize::try_from(s).ok())
            .unwrap_or(self.table.len())
    }

    /// How the table maps all its clusters, when one unallocated or zero run covers it.
    pub fn uniform(&self) -> Option<Uniform> {
        self.uniform
    }

    /// True when every cluster of the table reads as zeros (marked zero or unallocated).
    pub fn reads_zero(&self) -> bool {
        self.reads_zero
    }

    /// Bytes held: the entries and the run starts.
    pub fn bytes(&self) -> u64 {
        let entries = (self.table.len() as u64).saturating_mul(16);
        let starts = self.starts.len().saturating_add(self.zstarts.len()) as u64;
        entries.saturating_add(starts.saturating_mul(4))
    }
}

/// How an entry (decoded; `None` when invalid) maps its whole cluster: unallocated, zero or
/// data; `None` for anything a run cannot cross in one step (compressed, subclusters of
/// different kinds, an invalid entry, which the walk stops at and reports).
fn whole(m: Option<ClusterMap>) -> Option<Piece> {
    match m {
        Some(ClusterMap::Whole(p @ (Piece::Unallocated | Piece::Zero | Piece::Data(_)))) => Some(p),
        _ => None,
    }
}

/// How an entry maps its whole cluster for a content walk: as [`whole`], except that marked
/// zero, unallocated, and subclusters that are all one or the other are all `Zero`.
fn zero_whole(m: Option<ClusterMap>) -> Option<Piece> {
    match m {
        Some(ClusterMap::Whole(Piece::Unallocated | Piece::Zero)) => Some(Piece::Zero),
        Some(ClusterMap::Sub { alloc: 0, .. }) => Some(Piece::Zero),
        Some(ClusterMap::Whole(p @ Piece::Data(_))) => Some(p),
        _ => None,
    }
}

/// True when an entry mapping its cluster as `next` continues a run whose last entry maps its
/// cluster as `last`, as the mapping walk decides it: both unallocated, both zero, or data in
/// the next cluster-aligned host cluster.
fn continues(g: &Geometry, last: Option<Piece>, next: Option<Piece>) -> bool {
    match (last, next) {
        (Some(Piece::Unallocated), Some(Piece::Unallocated))
        | (Some(Piece::Zero), Some(Piece::Zero)) => true,
        (Some(Piece::Data(a)), Some(Piece::Data(b))) => {
            a.checked_add(g.cluster_size()) == Some(b) && g.in_cluster(b) == 0
        }
        _ => false,
    }
}

/// Big-endian u64 at `at` of `b`, 0 if short (callers pass exact chunks).
pub fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at.saturating_add(8))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

/// Big-endian u32 at `at` of `b`, 0 if short.
pub fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at.saturating_add(4))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}

/// Big-endian u16 at `at` of `b`, 0 if short.
pub fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at.saturating_add(2))
        .and_then(|s| <[u8; 2]>::try_from(s).ok())
        .map(u16::from_be_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_follows_the_spec() {
        let g = Geometry {
            cluster_bits: 16,
            extended: false,
        };
        // x = 62 - 8 = 54; 3 additional sectors; host 0x10123.
        let e = OFLAG_COMPRESSED | (3u64 << 54) | 0x10123;
        assert_eq!(g.compressed(e), (0x10123, 4 * 512 - 0x123));
        assert_eq!(
            decode(&g, e, 0).unwrap(),
            ClusterMap::Whole(Piece::Compressed {
                host: 0x10123,
                stored_len: 4 * 512 - 0x123
            })
        );
    }

    #[test]
    fn extended_entries_split_into_subclusters() {
        let g = Geometry {
            cluster_bits: 16,
            extended: true,
        };
        assert_eq!(
            decode(&g, 0x50000, 0xffff_ffff).unwrap(),
            ClusterMap::Whole(Piece::Data(0x50000))
        );
        assert_eq!(
            decode(&g, 0, 0xffff_ffff << 32).unwrap(),
            ClusterMap::Whole(Piece::Zero)
        );
        assert_eq!(
            decode(&g, 0x50000, 0x3 | (0x4 << 32)).unwrap(),
            ClusterMap::Sub {
                host: 0x50000,
                alloc: 3,
                zero: 4
            }
        );
        assert!(decode(&g, 0, 1).is_err());
        assert!(decode(&g, 0x50000, 1 | (1 << 32)).is_err());
    }
}
