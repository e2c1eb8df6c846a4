//! vdi writer. (Stub: filled in by the format's own work.)

use crate::{Error, Measure, Result, Target, WriteOptions, Writer};

/// Creates a vdi writer.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn create(_target: Target, _opts: &WriteOptions, _virtual_size: u64) -> Result<Box<dyn Writer>> {
    Err(Error::unsupported("writing vdi is not implemented yet"))
}

/// Output size of a vdi image.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn measure(_opts: &WriteOptions, _virtual_size: u64, _data_bytes: u64) -> Result<Measure> {
    Err(Error::unsupported("measuring vdi is not implemented yet"))
}
