//! The one validator every metadata table goes through.

use crate::error::{Error, Result};
use crate::limits::Limits;

/// A table's placement, as declared by an image.
#[derive(Debug, Clone, Copy)]
pub struct TableSpec<'a> {
    /// Name used in messages ("L1 table", "grain directory", "BAT").
    pub name: &'a str,
    /// Byte offset of the table in the source.
    pub offset: u64,
    /// Declared number of entries.
    pub entries: u64,
    /// Bytes per entry.
    pub entry_size: u64,
    /// Required alignment of `offset` in bytes (1 for none).
    pub align: u64,
}

/// Checks a table against the source size and the limits, and returns its length in bytes.
///
/// It checks, in this order: the entry count against `limits.max_table_entries`, that
/// `entries * entry_size` does not overflow, the alignment of `offset`, and that the whole table
/// lies inside `file_size`.
///
/// # Errors
/// `LimitExceeded` (`table.too-large`), `Invalid` (`table.misaligned`) or `Corrupt`
/// (`table.out-of-bounds`), each at the table's offset.
pub fn check_table(spec: TableSpec<'_>, file_size: u64, limits: &Limits) -> Result<u64> {
    let TableSpec {
        name,
        offset,
        entries,
        entry_size,
        align,
    } = spec;
    limits
        .check_entries(name, entries)
        .map_err(|e| e.at(offset))?;
    let len = entries.checked_mul(entry_size).ok_or_else(|| {
        Error::limit(format!("{name}: size overflows"))
            .at(offset)
            .code("table.too-large")
    })?;
    if align > 1 && offset % align != 0 {
        return Err(Error::invalid(format!(
            "{name} at {offset:#x} is not aligned to {align} bytes"
        ))
        .at(offset)
        .code("table.misaligned"));
    }
    let end = offset.checked_add(len);
    match end {
        Some(end) if end <= file_size => Ok(len),
        _ => Err(Error::corrupt(format!(
            "{name} ({entries} entries at {offset:#x}) lies outside the file ({file_size} bytes)"
        ))
        .at(offset)
        .code("table.out-of-bounds")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn spec(offset: u64, entries: u64) -> TableSpec<'static> {
        TableSpec {
            name: "T",
            offset,
            entries,
            entry_size: 8,
            align: 512,
        }
    }

    #[test]
    fn accepts_a_table_inside_the_file() {
        assert_eq!(
            check_table(spec(512, 64), 1024, &Limits::default()).unwrap(),
            512
        );
    }

    #[test]
    fn rejects_out_of_bounds_misaligned_and_huge() {
        let l = Limits::default();
        let e = check_table(spec(512, 65), 1024, &l).unwrap_err();
        assert_eq!(
            (e.kind(), e.finding_code()),
            (ErrorKind::Corrupt, "table.out-of-bounds")
        );
        let e = check_table(spec(100, 1), 1024, &l).unwrap_err();
        assert_eq!(e.finding_code(), "table.misaligned");
        let e = check_table(spec(0, 1 << 31), u64::MAX, &l).unwrap_err();
        assert_eq!(
            (e.kind(), e.finding_code()),
            (ErrorKind::LimitExceeded, "table.too-large")
        );
        let e = check_table(spec(u64::MAX - 511, 100), u64::MAX, &l).unwrap_err();
        assert_eq!(e.finding_code(), "table.out-of-bounds");
    }
}
