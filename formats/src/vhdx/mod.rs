//! Vhdx images. (Stub: filled in by the format's own work.)

use crate::detect::Probe;
use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::image::{Extent, Image, ImageInfo};
use crate::io::Source;
use crate::limits::Limits;

/// An opened Vhdx image.
pub struct VhdxImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
}

/// True when the probe windows look like Vhdx.
pub fn probe(_p: &Probe<'_>) -> bool {
    false
}

/// Opens a Vhdx image.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn open(_src: Source, _limits: &Limits) -> Result<VhdxImage> {
    Err(Error::unsupported("vhdx is not implemented yet"))
}

impl Image for VhdxImage {
    fn info(&self) -> &ImageInfo {
        &self.info
    }
    fn findings(&self) -> &[Finding] {
        &self.findings
    }
    fn mapping(&self, _guest: u64, _max_len: u64) -> Result<Extent> {
        Err(Error::unsupported("vhdx mapping is not implemented yet"))
    }
    fn source(&self) -> &Source {
        &self.src
    }
}
