//! Grain directory (GD) and grain tables (GTs).
//!
//! The GD holds one little-endian u32 per grain table: the table's sector, 0 when the table
//! (and so all its grains) is absent. A GT holds `numGTEsPerGT` u32 grain sectors: 0 for an
//! unallocated grain, 1 for a zero grain when the header's zero-grain flag is set, otherwise
//! the sector of the grain (or of its marker in a stream).

use std::sync::{Arc, Mutex};

use super::header::SECTOR;
use crate::error::{Error, Result};
use crate::io::{read_vec, ReadAt};
use crate::limits::{Budget, Limits};
use crate::table::{check_table, TableSpec};

/// Grain tables kept parsed by one image; qemu keeps 16.
const CACHE_TABLES: usize = 64;

/// Decodes little-endian u32 entries.
pub fn entries(buf: &[u8]) -> Vec<u32> {
    buf.chunks_exact(4)
        .map(|c| c.try_into().map(u32::from_le_bytes).unwrap_or(0))
        .collect()
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
/// The errors of [`check_table`] and [`read_vec`].
pub fn read_directory(
    src: &dyn ReadAt,
    name: &str,
    sector: u64,
    count: u64,
    file_size: u64,
    limits: &Limits,
    budget: &Budget,
) -> Result<Vec<u32>> {
    let offset = sector_offset(sector, name)?;
    let len = check_table(
        TableSpec {
            name,
            offset,
            entries: count,
            entry_size: 4,
            align: SECTOR,
        },
        file_size,
        limits,
    )?;
    let buf = read_vec(src, offset, len, budget, name)?;
    let out = entries(&buf);
    budget.give_back(len);
    Ok(out)
}

/// A small cache of parsed grain tables, keyed by byte offset.
pub struct GtCache {
    per_gt: u32,
    file_size: u64,
    limits: Limits,
    tables: Mutex<Vec<(u64, Arc<Vec<u32>>)>>,
}

impl GtCache {
    /// A cache for tables of `per_gt` entries in a file of `file_size` bytes.
    pub fn new(per_gt: u32, file_size: u64, limits: Limits) -> Self {
        GtCache {
            per_gt,
            file_size,
            limits,
            tables: Mutex::new(Vec::new()),
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
        {
            let tables = self
                .tables
                .lock()
                .map_err(|_| Error::corrupt("grain table cache poisoned"))?;
            if let Some((_, t)) = tables.iter().find(|(o, _)| *o == offset) {
                return Ok(t.clone());
            }
        }
        // At most 512 entries (checked at open): 2 KiB, so no budget is needed.
        let len =
            usize::try_from(self.table_len()).map_err(|_| Error::limit("grain table too large"))?;
        let mut buf = vec![0u8; len];
        src.read_exact_at(&mut buf, offset).map_err(|e| {
            Error::from(e)
                .context("reading a VMDK grain table")
                .at(offset)
        })?;
        let t = Arc::new(entries(&buf));
        let mut tables = self
            .tables
            .lock()
            .map_err(|_| Error::corrupt("grain table cache poisoned"))?;
        if tables.len() >= CACHE_TABLES {
            tables.remove(0);
        }
        tables.push((offset, t.clone()));
        Ok(t)
    }
}
