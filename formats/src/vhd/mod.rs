//! Vhd images. (Stub: filled in by the format's own work.)

use crate::detect::Probe;
use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::image::{Extent, Image, ImageInfo};
use crate::io::Source;
use crate::limits::Limits;

/// An opened Vhd image.
pub struct VhdImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
}

/// True when the probe windows look like Vhd.
pub fn probe(_p: &Probe<'_>) -> bool {
    false
}

/// Opens a Vhd image.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn open(_src: Source, _limits: &Limits) -> Result<VhdImage> {
    Err(Error::unsupported("vhd is not implemented yet"))
}

impl Image for VhdImage {
    fn info(&self) -> &ImageInfo {
        &self.info
    }
    fn findings(&self) -> &[Finding] {
        &self.findings
    }
    fn mapping(&self, _guest: u64, _max_len: u64) -> Result<Extent> {
        Err(Error::unsupported("vhd mapping is not implemented yet"))
    }
    fn source(&self) -> &Source {
        &self.src
    }
}
