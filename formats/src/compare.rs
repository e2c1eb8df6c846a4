//! Comparing the guest-visible content of two images, in any formats, as `qemu-img compare`
//! does: the two mappings are walked together, ranges that read as zero on both sides are
//! skipped without reading, and the rest is read and compared in parallel.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::extents::Extents;
use crate::reader::GuestReader;

/// Bytes compared by one worker at a time.
pub const PIECE: u64 = 1 << 20;
/// Bytes of pieces handed to the workers per batch: the memory a comparison holds at most is
/// two buffers of [`PIECE`] bytes per worker, whatever the batch.
pub const BATCH: u64 = 64 << 20;

/// One range to read and compare, and which sides the mapping says read as zero.
#[derive(Debug, Clone, Copy)]
struct Piece {
    start: u64,
    len: u64,
    a_zero: bool,
    b_zero: bool,
}

/// The end of the next extent of `it` and whether it reads as zero.
fn next_extent(it: &mut Extents<'_>) -> Result<(u64, bool)> {
    match it.next() {
        Some(r) => r.map(|e| (e.end(), e.reads_as_zero())),
        None => Err(Error::corrupt(format!(
            "the mapping ended early, at guest offset {:#x}",
            it.next_start()
        ))),
    }
}

/// The first guest offset below `size` where `a` and `b` differ, if any.
///
/// Walks both mappings together. Ranges that are zero on both sides are skipped without
/// reading; the rest is read and compared in parallel, in batches of [`BATCH`] bytes, in
/// order, so that the first difference is found without reading the whole disk.
///
/// # Errors
/// What [`GuestReader::read_at`] and the mapping report for either image.
pub fn first_difference(a: &GuestReader, b: &GuestReader, size: u64) -> Result<Option<u64>> {
    let mut ita = Extents::content(a.image().as_ref(), 0, size);
    let mut itb = Extents::content(b.image().as_ref(), 0, size);
    let mut pos = 0;
    let (mut ea, mut eb) = ((0u64, true), (0u64, true));
    let mut pending: Vec<Piece> = Vec::new();
    let mut pending_bytes = 0u64;
    while pos < size {
        if ea.0 <= pos {
            ea = next_extent(&mut ita)?;
        }
        if eb.0 <= pos {
            eb = next_extent(&mut itb)?;
        }
        let end = ea.0.min(eb.0);
        if !(ea.1 && eb.1) {
            let mut p = pos;
            while p < end {
                let len = end.saturating_sub(p).min(PIECE);
                pending.push(Piece {
                    start: p,
                    len,
                    a_zero: ea.1,
                    b_zero: eb.1,
                });
                pending_bytes = pending_bytes.saturating_add(len);
                p = p.saturating_add(len);
            }
        }
        pos = end;
        if pending_bytes >= BATCH || (pos >= size && !pending.is_empty()) {
            if let Some(off) = compare_batch(a, b, &pending)? {
                return Ok(Some(off));
            }
            pending.clear();
            pending_bytes = 0;
        }
    }
    Ok(None)
}

thread_local! {
    /// Per-worker read buffers, reused so that each piece costs no allocation or zero-fill.
    static BUFS: RefCell<(Vec<u8>, Vec<u8>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The first non-zero byte's index.
fn nonzero(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b != 0)
}

/// `buf`'s first `n` bytes, growing it (never shrinking) to hold them.
fn prefix(buf: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if buf.len() < n {
        buf.resize(n, 0);
    }
    buf.get_mut(..n).unwrap_or_default()
}

/// The guest offset of byte `i` of a piece starting at `start`.
fn offset(start: u64, i: usize) -> Result<u64> {
    u64::try_from(i)
        .ok()
        .and_then(|i| start.checked_add(i))
        .ok_or_else(|| Error::limit("guest offset overflows"))
}

/// Compares one piece (both sides read into the calling worker's buffers).
fn compare_piece(a: &GuestReader, b: &GuestReader, p: &Piece) -> Result<Option<u64>> {
    let n = usize::try_from(p.len).map_err(|_| Error::limit("piece too large"))?;
    BUFS.with(|cell| -> Result<Option<u64>> {
        let (x, y) = &mut *cell.borrow_mut();
        let (x, y) = (prefix(x, n), prefix(y, n));
        // A side the mapping calls zero is not read: the other must be zero there.
        let at = match (p.a_zero, p.b_zero) {
            (true, true) => None,
            (true, false) => {
                b.read_at(y, p.start)?;
                nonzero(y)
            }
            (false, true) => {
                a.read_at(x, p.start)?;
                nonzero(x)
            }
            (false, false) => {
                a.read_at(x, p.start)?;
                b.read_at(y, p.start)?;
                if x == y {
                    None // memcmp: the common case
                } else {
                    x.iter().zip(y.iter()).position(|(p, q)| p != q)
                }
            }
        };
        at.map(|i| offset(p.start, i)).transpose()
    })
}

/// The first difference among `pieces`, compared in parallel.
fn compare_batch(a: &GuestReader, b: &GuestReader, pieces: &[Piece]) -> Result<Option<u64>> {
    let diffs: Vec<Option<u64>> = pieces
        .par_iter()
        .map(|p| compare_piece(a, b, p))
        .collect::<Result<_>>()?;
    Ok(diffs.into_iter().flatten().min())
}

/// The first non-zero guest byte of `r` at or after `from`, if any. Extents the mapping calls
/// zero are not read.
///
/// # Errors
/// What [`GuestReader::read_at`] and the mapping report.
pub fn first_nonzero(r: &GuestReader, from: u64) -> Result<Option<u64>> {
    for e in Extents::content(r.image().as_ref(), from, u64::MAX) {
        let e = e?;
        if e.reads_as_zero() {
            continue;
        }
        let mut p = e.start;
        while p < e.end() {
            let len = e.end().saturating_sub(p).min(PIECE);
            let n = usize::try_from(len).map_err(|_| Error::limit("piece too large"))?;
            let mut buf = vec![0u8; n];
            r.read_at(&mut buf, p)?;
            if let Some(i) = nonzero(&buf) {
                return offset(p, i).map(Some);
            }
            p = p.saturating_add(len);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;
    use crate::limits::Limits;
    use std::sync::Arc;

    fn reader(data: Vec<u8>) -> GuestReader {
        let img: Arc<dyn Image> =
            Arc::new(crate::raw::open(Arc::new(data), &Limits::default()).unwrap());
        GuestReader::new(img, &Limits::default())
    }

    #[test]
    fn the_first_difference_is_found_across_pieces_and_batches() {
        let size = 3 * PIECE as usize + 100;
        let mut x = vec![0u8; size];
        x[10] = 1;
        let mut y = x.clone();
        let (a, b) = (reader(x.clone()), reader(y.clone()));
        assert_eq!(first_difference(&a, &b, size as u64).unwrap(), None);
        y[2 * PIECE as usize + 7] = 9;
        y[3 * PIECE as usize + 50] = 9;
        let b = reader(y);
        assert_eq!(
            first_difference(&a, &b, size as u64).unwrap(),
            Some(2 * PIECE + 7)
        );
        // Only the first `size` bytes are compared.
        assert_eq!(first_difference(&a, &b, 2 * PIECE).unwrap(), None);
    }

    #[test]
    fn the_first_nonzero_byte_at_or_after_an_offset() {
        let mut x = vec![0u8; 2 * PIECE as usize + 10];
        x[5] = 1;
        x[PIECE as usize + 3] = 2;
        let r = reader(x);
        assert_eq!(first_nonzero(&r, 0).unwrap(), Some(5));
        assert_eq!(first_nonzero(&r, 6).unwrap(), Some(PIECE + 3));
        assert_eq!(first_nonzero(&r, PIECE + 4).unwrap(), None);
        assert_eq!(first_nonzero(&r, u64::MAX).unwrap(), None);
    }
}
