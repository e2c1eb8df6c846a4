//! Raw writer: guest bytes as they are. Zero chunks become holes in a file target.

use std::fs::File;
use std::io::Write;

use crate::{
    check_chunk_at, write_zero_span, Chunk, Error, Payload, Result, Target, WriteOptions, Writer,
};

/// Chunk size: big enough to amortise syscalls, small enough to find holes.
const CHUNK: u64 = 1 << 20;

/// Creates a raw writer. A file target is sized to the whole disk at once (a hole, so it costs
/// nothing), which refuses a disk larger than the file system's largest file before anything
/// is written, instead of failing at the end of a long conversion.
///
/// # Errors
/// `Invalid` when options are given (raw has none); `LimitExceeded` when the file system
/// cannot hold a file of `virtual_size` bytes.
pub fn create(target: Target, opts: &WriteOptions, virtual_size: u64) -> Result<Box<dyn Writer>> {
    opts.only("raw", &[])?;
    if let Target::File(f) = &target {
        reserve_len(f, virtual_size)?;
    }
    Ok(Box::new(RawWriter {
        target,
        pos: 0,
        virtual_size,
        copies: crate::copy::CopyMerger::default(),
    }))
}

/// Sets the length of an output file to `size` (sparse), with a clear error when the file
/// system's largest file is smaller (`EFBIG`, or `EINVAL` past `i64::MAX`).
///
/// # Errors
/// `LimitExceeded` for a size the file system cannot hold; `Io` for other errors (both with
/// code `output.write`).
pub(crate) fn reserve_len(f: &File, size: u64) -> Result<()> {
    let too_big = |why: String| {
        Error::limit(format!(
            "the output file system (or the file-size limit, ulimit -f) cannot hold a {size}-byte file ({why}); write to a file system with a larger maximum file size, or to another format"
        ))
        .code("output.write")
    };
    if i64::try_from(size).is_err() {
        return Err(too_big("past the largest file offset".into()));
    }
    f.set_len(size).map_err(|e| {
        // Linux: EFBIG past the file system's maximum file size, EINVAL past the kernel's.
        if matches!(e.raw_os_error(), Some(27 | 22)) {
            too_big(e.to_string())
        } else {
            crate::pipeline::output_side(Error::from(e))
        }
    })
}

struct RawWriter {
    target: Target,
    /// Pending file-to-file copies.
    copies: crate::copy::CopyMerger,
    pos: u64,
    virtual_size: u64,
}

/// Writes `n` zero bytes to a stream.
pub(crate) fn write_zeros(w: &mut dyn Write, mut n: u64) -> std::io::Result<()> {
    static Z: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(Z.len() as u64) as usize;
        w.write_all(&Z[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl Writer for RawWriter {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }

    fn accepts_copy(&self) -> bool {
        matches!(self.target, Target::File(_))
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        check_chunk_at("raw", &chunk, self.pos, 1)?;
        match (&mut self.target, chunk.payload) {
            (Target::File(f), p @ (Payload::Data(_) | Payload::Copy(_))) => {
                p.write_at(f, chunk.guest, &mut self.copies)?
            }
            (Target::Stream(w), Payload::Data(d)) => w.write_all(&d)?,
            (Target::Stream(_), Payload::Copy(_)) => {
                return Err(Error::invalid("raw writer got a copy for a stream"))
            }
            (Target::File(_), Payload::Zero) => {}
            (Target::Stream(w), Payload::Zero) => write_zeros(w.as_mut(), chunk.len)?,
            (_, Payload::Compressed(_)) => {
                return Err(Error::invalid("raw writer got a compressed chunk"))
            }
        }
        self.pos = chunk.guest.saturating_add(chunk.len);
        Ok(())
    }

    fn write_zeros(&mut self, guest: u64, len: u64) -> Result<()> {
        write_zero_span(self, guest, len)
    }

    fn batch_end(&mut self) -> Result<()> {
        if let Target::File(f) = &self.target {
            self.copies.hand_off(f)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        match self.target {
            Target::File(f) => {
                let mut copies = self.copies;
                copies.flush(&f)?;
                finish_file(f, self.virtual_size)
            }
            Target::Stream(mut w) => {
                if self.pos != self.virtual_size {
                    return Err(Error::invalid(
                        "raw writer: stream ended before the virtual size",
                    ));
                }
                w.flush()?;
                Ok(())
            }
        }
    }
}

fn finish_file(f: File, size: u64) -> Result<()> {
    f.set_len(size)?;
    Ok(())
}
