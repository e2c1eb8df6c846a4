//! Gzip-compressed disks (`ovf:compression="gzip"`): inflated in full, under a cap shared by
//! every disk of a command, into memory or a temporary file.

use std::io::Read;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{ReadAt, Source};
use crate::limits::{Budget, Limits};

/// A positional source read as a stream (for flate2).
struct Cursor<'a> {
    src: &'a dyn ReadAt,
    pos: u64,
}

impl Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.src.read_at(buf, self.pos)?;
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
}

/// Inflated bytes held in memory before a gzip disk is spooled to a temporary file.
pub const SPOOL_THRESHOLD: usize = 8 << 20;

/// Decompresses a gzip file: every member, as `gzip -d`, Python's `gzip` and flate2's
/// `MultiGzDecoder` do (a hidden disk must not hide behind an empty first member). Random
/// access needs the whole disk: up to [`SPOOL_THRESHOLD`] bytes stay in memory, a larger disk is
/// spooled to an anonymous temporary file (removed when the source is dropped). At most
/// `limits.max_inflated_bytes` are inflated.
///
/// # Errors
/// `Corrupt` for a bad gzip stream (including bytes after the last member that are not a gzip
/// member); `LimitExceeded` (`ova.gzip-limit`) past the cap; `Io` when the temporary file
/// cannot be written.
pub fn gunzip(src: &dyn ReadAt, limits: &Limits) -> Result<Source> {
    gunzip_with(src, limits, &inflate_budget(limits))
}

/// The one budget of inflated bytes that all gzip disks of a command share.
fn inflate_budget(limits: &Limits) -> Budget {
    Budget::new(limits.max_inflated_bytes)
}

/// Reads the next inflated bytes, mapping flate2's errors to glimpse's.
fn inflate_some(dec: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    loop {
        return match dec.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::InvalidInput
                    || e.kind() == std::io::ErrorKind::InvalidData =>
            {
                Err(Error::corrupt(format!("invalid gzip stream: {e}")).code("ova.gzip-corrupt"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Error::truncated(format!("gzip stream ends early: {e}"))
                    .code("ova.gzip-corrupt"))
            }
            Err(e) => Err(Error::from(e)),
        };
    }
}

/// Where inflated bytes go: memory first, then a temporary file, which is sparse: runs of
/// zeros (what a gzip bomb inflates to, and most of a real raw disk) are left as holes, so
/// they cost no disk space or writes, and every later reader skips them as holes.
enum Spool {
    Mem(Vec<u8>),
    /// The file and its length so far (the last hole is made by setting the length).
    File(std::fs::File, u64),
}

fn spill(e: std::io::Error) -> Error {
    Error::io(e, "spooling a gzip-compressed disk")
}

impl Spool {
    fn push(&mut self, chunk: &[u8]) -> Result<()> {
        if let Spool::Mem(v) = self {
            if v.len().saturating_add(chunk.len()) <= SPOOL_THRESHOLD {
                v.extend_from_slice(chunk);
                return Ok(());
            }
            let f = tempfile::tempfile().map_err(spill)?;
            let held = std::mem::take(v);
            *self = Spool::File(f, 0);
            self.push(&held)?;
        }
        if let Spool::File(f, len) = self {
            if !crate::io::is_zero(chunk) {
                std::os::unix::fs::FileExt::write_all_at(f, chunk, *len).map_err(spill)?;
            }
            *len = len.saturating_add(chunk.len() as u64);
        }
        Ok(())
    }

    fn finish(self) -> Result<Source> {
        Ok(match self {
            Spool::Mem(v) => Arc::new(v),
            Spool::File(f, len) => {
                f.set_len(len).map_err(spill)?;
                Arc::new(f)
            }
        })
    }
}

/// [`gunzip`] charging a caller's budget, so that several disks share one cap.
pub(super) fn gunzip_with(src: &dyn ReadAt, limits: &Limits, budget: &Budget) -> Result<Source> {
    let cap = limits.max_inflated_bytes;
    let mut dec = flate2::read::MultiGzDecoder::new(Cursor { src, pos: 0 });
    let mut spool = Spool::Mem(Vec::new());
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = inflate_some(&mut dec, &mut buf)?;
        if n == 0 {
            break;
        }
        total = total.saturating_add(n as u64);
        if total > cap {
            return Err(Error::limit(format!(
                "gzip-compressed disk decompresses to more than {cap} bytes"
            ))
            .code("ova.gzip-limit"));
        }
        budget
            .take(n as u64, "gzip-compressed disks")
            .map_err(|e| e.code("ova.gzip-limit"))?;
        spool.push(buf.get(..n).unwrap_or_default())?;
    }
    spool.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A disk past the spool threshold lands in a sparse file: its zeros are holes (what a gzip
    /// bomb inflates to costs no disk), its data reads back in place.
    #[test]
    fn a_spooled_disk_keeps_its_zeros_as_holes() {
        let len: usize = 64 << 20;
        let mark = b"data in the middle";
        let at = 40 << 20;
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let zeros = vec![0u8; 1 << 20];
        let mut written = 0;
        while written < len {
            if written == at {
                z.write_all(mark).unwrap();
                z.write_all(&zeros[mark.len()..]).unwrap();
            } else {
                z.write_all(&zeros).unwrap();
            }
            written += zeros.len();
        }
        let gz = z.finish().unwrap();
        let src = gunzip(&gz, &Limits::default()).unwrap();
        assert_eq!(src.size().unwrap(), len as u64);
        let mut buf = vec![0u8; mark.len()];
        src.read_exact_at(&mut buf, at as u64).unwrap();
        assert_eq!(buf, mark);
        src.read_exact_at(&mut buf, 3).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        let allocated = src.allocated_size().expect("a file");
        assert!(allocated < 1 << 20, "{allocated} bytes allocated");
    }
}
