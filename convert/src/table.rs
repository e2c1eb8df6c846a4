//! The tables a writer fills as chunks arrive (VDI block map, VHD/VHDX/ploop BAT, qcow2 L1):
//! held once, charged to the command's budget for as long as the writer lives, and written
//! out in pieces of [`PIECE`] bytes rather than through a second full-size copy
//! (docs/memory.md).

use glimpse_formats::limits::Charge;

use crate::{Error, Result, WriteOptions};

/// Bytes of one piece of a table as it is written out: the only buffer serialization needs.
pub(crate) const PIECE: usize = 1 << 20;

/// A writer's table of `T` entries, with its charge.
pub(crate) struct Table<T> {
    /// The entries, in memory order.
    pub(crate) entries: Vec<T>,
    /// What the entries hold of the command's budget (none without a budget).
    _charge: Option<Charge>,
}

impl<T: Copy> Table<T> {
    /// `n` entries of `fill`, charged to `opts.budget` before anything is allocated.
    ///
    /// # Errors
    /// `LimitExceeded` when the budget cannot hold the table or the allocator says no.
    pub(crate) fn new(opts: &WriteOptions, n: u64, fill: T, what: &str) -> Result<Self> {
        let bytes = n
            .checked_mul(std::mem::size_of::<T>() as u64)
            .ok_or_else(|| Error::limit(format!("{what}: too large")))?;
        let charge = match &opts.budget {
            Some(b) => Some(b.charge(bytes, what).map_err(|_| {
                Error::limit(format!(
                    "the output's {what} needs {bytes} bytes, more than the command's memory \
                     budget has left ({} bytes)",
                    b.left()
                ))
            })?),
            None => None,
        };
        let n = usize::try_from(n).map_err(|_| Error::limit(format!("{what}: too large")))?;
        let mut entries = Vec::new();
        entries
            .try_reserve_exact(n)
            .map_err(|_| Error::limit(format!("{what}: cannot allocate {bytes} bytes")))?;
        entries.resize(n, fill);
        Ok(Table {
            entries,
            _charge: charge,
        })
    }
}

/// Writes `entries`, each encoded in `N` bytes by `enc`, from byte `at` through `put(bytes,
/// offset)`, then `pad` bytes up to `len` bytes in all, one piece of at most [`PIECE`] bytes
/// at a time.
///
/// # Errors
/// What `put` returns.
pub(crate) fn write_pieces<T, const N: usize>(
    mut put: impl FnMut(&[u8], u64) -> std::io::Result<()>,
    at: u64,
    entries: impl IntoIterator<Item = T>,
    enc: impl Fn(T) -> [u8; N],
    len: u64,
    pad: u8,
) -> Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(PIECE);
    let mut off = at;
    let mut done = 0u64;
    let mut flush = |buf: &mut Vec<u8>, off: &mut u64| -> std::io::Result<()> {
        put(buf, *off)?;
        *off = off.saturating_add(buf.len() as u64);
        buf.clear();
        Ok(())
    };
    for e in entries {
        if buf.len().saturating_add(N) > PIECE {
            flush(&mut buf, &mut off)?;
        }
        buf.extend_from_slice(&enc(e));
        done = done.saturating_add(N as u64);
    }
    while done < len {
        if buf.len() >= PIECE {
            flush(&mut buf, &mut off)?;
        }
        let room = PIECE.saturating_sub(buf.len()) as u64;
        let n = room.min(len.saturating_sub(done));
        buf.resize(
            buf.len().saturating_add(usize::try_from(n).unwrap_or(0)),
            pad,
        );
        done = done.saturating_add(n);
    }
    if !buf.is_empty() {
        flush(&mut buf, &mut off)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_join_into_the_whole_table_and_its_padding() {
        let n = PIECE / 4 * 2 + 3;
        let entries: Vec<u32> = (0..n as u32).collect();
        let mut out = vec![0u8; 16];
        let len = (n * 4 + 4093) as u64;
        let mut writes = 0;
        write_pieces(
            |b: &[u8], off| {
                assert!(b.len() <= PIECE);
                let end = off as usize + b.len();
                if out.len() < end {
                    out.resize(end, 0);
                }
                out[off as usize..end].copy_from_slice(b);
                writes += 1;
                Ok(())
            },
            16,
            entries.iter().copied(),
            u32::to_be_bytes,
            len,
            0xAB,
        )
        .unwrap();
        assert_eq!(writes, 3);
        assert_eq!(out.len(), 16 + len as usize);
        let mut want = vec![0u8; 16];
        for e in &entries {
            want.extend_from_slice(&e.to_be_bytes());
        }
        want.resize(16 + len as usize, 0xAB);
        assert!(out == want);
    }

    #[test]
    fn a_table_is_charged_while_it_lives_and_refused_past_the_budget() {
        let budget = glimpse_formats::limits::Budget::new(1000);
        let opts = WriteOptions {
            budget: Some(budget.clone()),
            ..WriteOptions::default()
        };
        let t = Table::new(&opts, 200, 0u32, "BAT").unwrap();
        assert_eq!(budget.left(), 200);
        let e = Table::new(&opts, 51, 0u32, "BAT").err().unwrap();
        assert_eq!(e.kind(), crate::ErrorKind::LimitExceeded);
        drop(t);
        assert_eq!(budget.left(), 1000);
        assert!(Table::new(&WriteOptions::default(), 1 << 20, 0u64, "L1").is_ok());
    }
}
