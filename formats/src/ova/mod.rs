//! OVA appliances (a tar holding an OVF descriptor and disks) and OVF descriptors.
//! (Stub: filled in by the OVA work.)

use crate::detect::Probe;
use crate::error::{Error, Result};
use crate::image::Image;
use crate::io::Source;
use crate::limits::Limits;

/// True when the source is a tar archive with an `.ovf` member.
pub fn probe(_p: &Probe<'_>) -> bool {
    false
}

/// Opens the disk `disk` (0-based; `None` for the first) inside an OVA.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn open_disk(_src: Source, _limits: &Limits, _disk: Option<usize>) -> Result<Box<dyn Image>> {
    Err(Error::unsupported("ova is not implemented yet"))
}
