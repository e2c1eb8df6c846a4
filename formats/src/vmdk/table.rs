//! Grain directory (GD) and grain tables (GTs).
//!
//! The GD holds one little-endian u32 per grain table: the table's sector, 0 when the table
//! (and so all its grains) is absent. A GT holds `numGTEsPerGT` u32 grain sectors: 0 for an
//! unallocated grain, 1 for a zero grain when the header's zero-grain flag is set, otherwise
//! the sector of the grain (or of its marker in a stream).

use std::sync::Arc;

use super::header::SECTOR;
use crate::error::{Error, Result};
use crate::io::ReadAt;
use crate::limits::{Budget, Limits};
use crate::lru::Lru;
use crate::table::{check_table, read_entries, Table, TableSpec};

/// Grain tables kept parsed by one image; qemu keeps 16.
const CACHE_TABLES: usize = 64;

/// Decodes one little-endian u32 entry.
fn entry(c: &[u8]) -> u32 {
    c.try_into().map(u32::from_le_bytes).unwrap_or(0)
}

/// Decodes little-endian u32 entries.
pub fn entries(buf: &[u8]) -> Vec<u32> {
    buf.chunks_exact(4).map(entry).collect()
}

/// The byte offset of a table stored at `sector`.
///
/// # Errors
/// `Corrupt` (`table.out-of-bounds`) when it overflows.
pub fn sector_offset(sector: u64, what: &str) -> Result<u64> {
    sector.checked_mul(SECTOR).ok_or_else(|| {
        Error::corrupt(format!("{what} at sector {sector} lies outside any file"))
            .code("table.out-of-bounds")
    })
}

/// Checks and reads a directory (GD or redundant GD) of `count` entries at `sector`.
///
/// # Errors
/// The errors of [`read_entries`]. The directory stays charged to `budget` until dropped.
pub fn read_directory(
    src: &dyn ReadAt,
    name: &str,
    sector: u64,
    count: u64,
    file_size: u64,
    limits: &Limits,
    budget: &Budget,
) -> Result<Table<u32>> {
    let offset = sector_offset(sector, name)?;
    let spec = TableSpec {
        name,
        offset,
        entries: count,
        entry_size: 4,
        align: SECTOR,
    };
    read_entries(src, spec, file_size, limits, budget, entry)
}

/// A small cache of parsed grain tables, keyed by byte offset.
pub struct GtCache {
    per_gt: u32,
    file_size: u64,
    limits: Limits,
    tables: Lru<u64, Arc<Vec<u32>>>,
}

impl GtCache {
    /// A cache for tables of `per_gt` entries in a file of `file_size` bytes.
    pub fn new(per_gt: u32, file_size: u64, limits: Limits) -> Self {
        GtCache {
            per_gt,
            file_size,
            limits,
            tables: Lru::new(u64::MAX, CACHE_TABLES),
        }
    }

    /// Bytes one grain table occupies.
    pub fn table_len(&self) -> u64 {
        u64::from(self.per_gt).saturating_mul(4)
    }

    /// Checks a grain table at `sector` against the file without reading it.
    ///
    /// # Errors
    /// As [`check_table`].
    pub fn check(&self, sector: u64) -> Result<u64> {
        let offset = sector_offset(sector, "grain table")?;
        check_table(
            TableSpec {
                name: "grain table",
                offset,
                entries: u64::from(self.per_gt),
                entry_size: 4,
                align: SECTOR,
            },
            self.file_size,
            &self.limits,
        )?;
        Ok(offset)
    }

    /// The grain table at `sector`, read through the cache.
    ///
    /// # Errors
    /// As [`check_table`]; `Io` on read errors.
    pub fn get(&self, src: &dyn ReadAt, sector: u64) -> Result<Arc<Vec<u32>>> {
        let offset = self.check(sector)?;
        self.tables.get_or_load(
            offset,
            |_| self.table_len(),
            || {
                // At most 512 entries (checked at open): 2 KiB, so no budget is needed.
                let len = usize::try_from(self.table_len())
                    .map_err(|_| Error::limit("grain table too large"))?;
                let mut buf = vec![0u8; len];
                src.read_exact_at(&mut buf, offset).map_err(|e| {
                    Error::from(e)
                        .context("reading a VMDK grain table")
                        .at(offset)
                })?;
                Ok(Arc::new(entries(&buf)))
            },
        )
    }
}
