//! The one validator every metadata table goes through.

use std::ops::Deref;

use crate::error::{Error, Result};
use crate::io::{read_vec, ReadAt};
use crate::limits::{Budget, Charge, Limits};

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
/// It checks, in this order: the table's bytes (`entries * entry_size`, without overflow)
/// against `limits.max_table_bytes`, the alignment of `offset`, and that the whole table lies
/// inside `file_size`. A format's own qemu caps on a table are the format's to check, before
/// this.
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
    let len = limits.table_bytes(entries, entry_size).ok_or_else(|| {
        Error::limit(format!(
            "{name}: {entries} entries of {entry_size} bytes exceed the limit of {} bytes",
            limits.max_table_bytes
        ))
        .at(offset)
        .code("table.too-large")
    })?;
    if align > 1 && offset.checked_rem(align) != Some(0) {
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

/// Bytes of a table read at once by [`read_entries`].
const READ_PIECE: u64 = 1 << 20;

/// A decoded table and the budget it holds: the bytes come back when the table is dropped.
#[derive(Debug)]
pub struct Table<T> {
    entries: Vec<T>,
    _charge: Option<Charge>,
}

impl<T> Table<T> {
    /// A table of `entries` holding no budget (tests, tables built in code).
    pub fn unbudgeted(entries: Vec<T>) -> Self {
        Table {
            entries,
            _charge: None,
        }
    }
}

impl<T> Deref for Table<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.entries
    }
}

/// Reads a table: [`check_table`], then a bounded read charged to `budget`, then decodes each
/// `spec.entry_size`-byte entry with `decode`. The raw bytes are given back once decoded; the
/// decoded entries stay charged (`size_of::<T>()` each) until the [`Table`] is dropped.
///
/// # Errors
/// As [`check_table`]; `LimitExceeded` when the budget or the allocator says no; `Io` and
/// `Truncated` from the read.
pub fn read_entries<T>(
    src: &dyn ReadAt,
    spec: TableSpec<'_>,
    file_size: u64,
    limits: &Limits,
    budget: &Budget,
    decode: impl Fn(&[u8]) -> T,
) -> Result<Table<T>> {
    let len = check_table(spec, file_size, limits)?;
    let n = usize::try_from(spec.entries)
        .map_err(|_| Error::limit(format!("{}: too many entries", spec.name)))?;
    let held = (std::mem::size_of::<T>() as u64).saturating_mul(spec.entries);
    let charge = budget.charge(held, spec.name)?;
    let mut entries = Vec::new();
    entries
        .try_reserve_exact(n)
        .map_err(|_| Error::limit(format!("{}: cannot allocate {n} entries", spec.name)))?;
    // Read in pieces of at most READ_PIECE whole entries, so that the raw bytes and the decoded
    // table are never both held in full (a 32 MiB L1 table costs 32 MiB, not 64).
    let size = spec.entry_size.max(1);
    let per_piece = READ_PIECE.checked_div(size).unwrap_or(1).max(1);
    let (piece, _piece_charge) = read_held(
        src,
        spec.offset,
        len.min(per_piece.saturating_mul(size)),
        budget,
        spec.name,
    )?;
    let mut buf = piece;
    let step = usize::try_from(size).unwrap_or(usize::MAX);
    let mut at = 0u64;
    while at < len {
        let n = usize::try_from(len.saturating_sub(at).min(per_piece.saturating_mul(size)))
            .map_err(|_| Error::limit(format!("{}: too large", spec.name)))?;
        let chunk = buf
            .get_mut(..n)
            .ok_or_else(|| Error::invalid(format!("{}: read piece", spec.name)))?;
        if at > 0 {
            src.read_exact_at(chunk, spec.offset.saturating_add(at))
                .map_err(|e| Error::from(e).context(spec.name).at(spec.offset))?;
        }
        entries.extend(chunk.chunks_exact(step).map(&decode));
        at = at.saturating_add(n as u64);
    }
    buf.clear();
    Ok(Table {
        entries,
        _charge: Some(charge),
    })
}

/// Reads `len` bytes at `offset` (a header, a name) charged to `budget` for as long as the
/// returned [`Charge`] lives: drop both and every byte is back.
///
/// # Errors
/// `LimitExceeded` when the budget says no; as [`read_vec`] otherwise.
pub fn read_held(
    src: &dyn ReadAt,
    offset: u64,
    len: u64,
    budget: &Budget,
    what: &str,
) -> Result<(Vec<u8>, Charge)> {
    let charge = budget.charge(len, what)?;
    // The real charge is held above; read_vec's own accounting goes to a throwaway budget.
    let bytes = read_vec(src, offset, len, &Budget::new(len), what)?;
    Ok((bytes, charge))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::limits::DEFAULT_TABLE_BYTES;

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
    fn read_entries_decodes_and_gives_its_budget_back_when_dropped() {
        let mut file = vec![0u8; 1024];
        file[512..520].copy_from_slice(&7u64.to_be_bytes());
        let l = Limits::default().per_command();
        let before = l.budget().left();
        let t = read_entries(&file, spec(512, 64), 1024, &l, &l.budget(), |b| {
            u64::from_be_bytes(b.try_into().unwrap())
        })
        .unwrap();
        assert_eq!((t.len(), t[0], t[1]), (64, 7, 0));
        assert_eq!(l.budget().left(), before - 64 * 8);
        drop(t);
        assert_eq!(l.budget().left(), before);
        let e = read_entries(&file, spec(512, 65), 1024, &l, &l.budget(), |_| 0u8);
        assert_eq!(e.unwrap_err().finding_code(), "table.out-of-bounds");
        assert_eq!(l.budget().left(), before);
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
        let e = check_table(spec(0, u64::MAX / 4), u64::MAX, &l).unwrap_err();
        assert_eq!(e.finding_code(), "table.too-large");
        let e = check_table(spec(u64::MAX - 511, 100), u64::MAX, &l).unwrap_err();
        assert_eq!(e.finding_code(), "table.out-of-bounds");
    }

    #[test]
    fn the_cap_is_on_bytes_not_entries() {
        let l = Limits::default();
        // A 5 TiB VDI's block map: 5 Mi entries of 4 bytes, above the old 4 Mi entry cap.
        let map = TableSpec {
            entry_size: 4,
            ..spec(512, 5 << 20)
        };
        assert_eq!(check_table(map, u64::MAX, &l).unwrap(), 20 << 20);
        // Exactly the cap passes; one entry more is refused before anything is read, even
        // where the file is large enough to hold it.
        let at_cap = spec(512, DEFAULT_TABLE_BYTES / 8);
        assert_eq!(
            check_table(at_cap, u64::MAX, &l).unwrap(),
            DEFAULT_TABLE_BYTES
        );
        let over = spec(512, DEFAULT_TABLE_BYTES / 8 + 1);
        let e = check_table(over, u64::MAX, &l).unwrap_err();
        assert_eq!(
            (e.kind(), e.finding_code(), e.offset()),
            (ErrorKind::LimitExceeded, "table.too-large", Some(512))
        );
        let budget = Budget::new(u64::MAX);
        let e = read_entries(&vec![0u8; 1024], over, u64::MAX, &l, &budget, |_| 0u8);
        assert_eq!(e.unwrap_err().finding_code(), "table.too-large");
        assert_eq!(budget.left(), u64::MAX);
    }
}
