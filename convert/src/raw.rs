//! Raw writer: guest bytes as they are. Zero chunks become holes in a file target.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};

use crate::{Chunk, Error, Payload, Result, Target, WriteOptions, Writer};

/// Chunk size: big enough to amortise syscalls, small enough to find holes.
const CHUNK: u64 = 1 << 20;

/// Creates a raw writer.
///
/// # Errors
/// `Invalid` when options are given (raw has none).
pub fn create(target: Target, opts: &WriteOptions, virtual_size: u64) -> Result<Box<dyn Writer>> {
    opts.only("raw", &[])?;
    Ok(Box::new(RawWriter {
        target,
        pos: 0,
        virtual_size,
    }))
}

struct RawWriter {
    target: Target,
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

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        if chunk.guest != self.pos {
            return Err(Error::invalid(format!(
                "raw writer: chunk at {} but expected {}",
                chunk.guest, self.pos
            )));
        }
        match (&mut self.target, chunk.payload) {
            (Target::File(f), Payload::Data(d)) => {
                f.seek(SeekFrom::Start(chunk.guest))?;
                f.write_all(&d)?;
            }
            (Target::Stream(w), Payload::Data(d)) => w.write_all(&d)?,
            (Target::File(_), Payload::Zero) => {}
            (Target::Stream(w), Payload::Zero) => write_zeros(w.as_mut(), chunk.len)?,
            (_, Payload::Compressed(_)) => {
                return Err(Error::invalid("raw writer got a compressed chunk"))
            }
        }
        self.pos = chunk.guest.saturating_add(chunk.len);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        match self.target {
            Target::File(f) => finish_file(f, self.virtual_size),
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
