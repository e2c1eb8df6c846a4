//! Vdi images. (Stub: filled in by the format's own work.)

use crate::detect::Probe;
use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::image::{Extent, Image, ImageInfo};
use crate::io::Source;
use crate::limits::Limits;

/// An opened Vdi image.
pub struct VdiImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
}

/// True when the probe windows look like Vdi.
pub fn probe(_p: &Probe<'_>) -> bool {
    false
}

/// Opens a Vdi image.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn open(_src: Source, _limits: &Limits) -> Result<VdiImage> {
    Err(Error::unsupported("vdi is not implemented yet"))
}

impl Image for VdiImage {
    fn info(&self) -> &ImageInfo {
        &self.info
    }
    fn findings(&self) -> &[Finding] {
        &self.findings
    }
    fn mapping(&self, _guest: u64, _max_len: u64) -> Result<Extent> {
        Err(Error::unsupported("vdi mapping is not implemented yet"))
    }
    fn source(&self) -> &Source {
        &self.src
    }
}
