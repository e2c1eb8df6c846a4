//! Whole-chunk compression for the parallel stage.

use std::io::Write;

use crate::{Codec, Error, Result};

/// Compresses `data` as one whole buffer with `codec` at `level`.
///
/// # Errors
/// `Io` if the encoder fails (it does not for in-memory buffers in practice).
pub fn compress(codec: Codec, level: i32, data: &[u8]) -> Result<Vec<u8>> {
    let lvl = flate2::Compression::new(u32::try_from(level.clamp(0, 9)).unwrap_or(6));
    let out = Vec::with_capacity(data.len() / 2);
    match codec {
        Codec::Deflate => {
            let mut e = flate2::write::DeflateEncoder::new(out, lvl);
            e.write_all(data)?;
            Ok(e.finish()?)
        }
        Codec::Zlib => {
            let mut e = flate2::write::ZlibEncoder::new(out, lvl);
            e.write_all(data)?;
            Ok(e.finish()?)
        }
        Codec::Zstd => zstd::bulk::compress(data, level).map_err(|e| Error::io(e, "zstd compression")),
    }
}
