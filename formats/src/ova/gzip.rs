//! Gzip-compressed disks (`ovf:compression="gzip"`): inflated in full, under a cap shared by
//! every disk of a command, into memory or a temporary file.

use std::io::Read;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{ReadAt, Source};
use crate::limits::{Budget, Charge, Limits};

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

/// Inflated bytes one gzip disk may hold in memory before it is spooled to a temporary file.
pub const SPOOL_THRESHOLD: usize = 8 << 20;

/// Inflated bytes all the gzip disks of one archive may hold in memory together: past this,
/// every further disk is spooled to a temporary file from its first byte, however many disks
/// the descriptor lists (up to 256 of them once took 2 GiB).
pub const SPOOL_MEMORY_TOTAL: u64 = 32 << 20;

/// Decompresses a gzip file: every member, as `gzip -d`, Python's `gzip` and flate2's
/// `MultiGzDecoder` do (a hidden disk must not hide behind an empty first member). Random
/// access needs the whole disk: up to [`SPOOL_THRESHOLD`] bytes stay in memory, charged to the
/// command's budget (`limits.budget()`) for as long as the source lives, while the budget can
/// hold them; a larger disk, or one the budget cannot hold, is spooled to an anonymous
/// temporary file (removed when the source is dropped). At most `limits.max_inflated_bytes`
/// are inflated.
///
/// # Errors
/// `Corrupt` for a bad gzip stream (including bytes after the last member that are not a gzip
/// member); `LimitExceeded` (`ova.gzip-limit`) past the cap; `Io` when the temporary file
/// cannot be written.
pub fn gunzip(src: &dyn ReadAt, limits: &Limits) -> Result<Source> {
    let memory = Memory {
        metadata: limits.budget(),
        total: Budget::new(SPOOL_MEMORY_TOTAL),
    };
    gunzip_with(src, limits, &inflate_budget(limits), &memory)
}

/// What pays for a gzip disk held in memory: the command's metadata budget, and a cap on the
/// in-memory spools of one archive together ([`SPOOL_MEMORY_TOTAL`]).
#[derive(Clone)]
pub(super) struct Memory {
    pub(super) metadata: Budget,
    pub(super) total: Budget,
}

/// A gzip disk inflated into memory, holding its charges until it is dropped.
struct MemSpool {
    bytes: Vec<u8>,
    _held: [Charge; 2],
}

impl ReadAt for MemSpool {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.bytes.read_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        self.bytes.size()
    }
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

/// Where inflated bytes go: memory first, while the disk is small and the budgets can pay for
/// its capacity, then a temporary file, which is sparse: runs of zeros (what a gzip bomb
/// inflates to, and most of a real raw disk) are left as holes, so they cost no disk space or
/// writes, and every later reader skips them as holes.
enum Spool {
    Mem(Vec<u8>, [Charge; 2]),
    /// The file and its length so far (the last hole is made by setting the length).
    File(std::fs::File, u64),
}

fn spill(e: std::io::Error) -> Error {
    Error::io(e, "spooling a gzip-compressed disk")
}

/// Makes room for `more` bytes in an in-memory spool, both charges paying for the capacity
/// first; false (nothing allocated) when the disk would pass [`SPOOL_THRESHOLD`] or either
/// budget cannot pay.
fn mem_room(v: &mut Vec<u8>, held: &mut [Charge; 2], more: usize) -> bool {
    let need = v.len().saturating_add(more);
    if need > SPOOL_THRESHOLD {
        return false;
    }
    if need <= v.capacity() {
        return true;
    }
    let new_cap = v.capacity().saturating_mul(2).clamp(need, SPOOL_THRESHOLD);
    let add = new_cap.saturating_sub(v.capacity()) as u64;
    let [a, b] = held;
    if a.grow(add, "gzip disk in memory").is_err() {
        return false;
    }
    if b.grow(add, "gzip disks in memory").is_err() {
        // Given back with the charge when the spool moves to a file.
        return false;
    }
    v.try_reserve_exact(new_cap.saturating_sub(v.len())).is_ok()
}

impl Spool {
    fn new(memory: &Memory) -> Result<Spool> {
        Ok(Spool::Mem(
            Vec::new(),
            [
                memory.metadata.charge(0, "gzip disk in memory")?,
                memory.total.charge(0, "gzip disks in memory")?,
            ],
        ))
    }

    fn push(&mut self, chunk: &[u8]) -> Result<()> {
        if let Spool::Mem(v, held) = self {
            if mem_room(v, held, chunk.len()) {
                v.extend_from_slice(chunk);
                return Ok(());
            }
            let f = tempfile::tempfile().map_err(spill)?;
            let bytes = std::mem::take(v);
            // The charges go back to the budgets: the bytes move to the file.
            *self = Spool::File(f, 0);
            self.push(&bytes)?;
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
            Spool::Mem(bytes, held) => Arc::new(MemSpool { bytes, _held: held }),
            Spool::File(f, len) => {
                f.set_len(len).map_err(spill)?;
                Arc::new(f)
            }
        })
    }
}

/// [`gunzip`] charging a caller's budgets, so that several disks share one cap on inflated
/// bytes and one on bytes held in memory.
pub(super) fn gunzip_with(
    src: &dyn ReadAt,
    limits: &Limits,
    budget: &Budget,
    memory: &Memory,
) -> Result<Source> {
    let cap = limits.max_inflated_bytes;
    let mut dec = flate2::read::MultiGzDecoder::new(Cursor { src, pos: 0 });
    let mut spool = Spool::new(memory)?;
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
