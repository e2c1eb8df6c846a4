//! Luks images. (Stub: filled in by the format's own work.)

use crate::detect::Probe;
use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::image::{Extent, Image, ImageInfo};
use crate::io::Source;
use crate::limits::Limits;

/// An opened Luks image.
pub struct LuksImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
}

/// True when the probe windows look like Luks.
pub fn probe(_p: &Probe<'_>) -> bool {
    false
}

/// Opens a Luks image.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn open(_src: Source, _limits: &Limits) -> Result<LuksImage> {
    Err(Error::unsupported("luks is not implemented yet"))
}

impl Image for LuksImage {
    fn info(&self) -> &ImageInfo {
        &self.info
    }
    fn findings(&self) -> &[Finding] {
        &self.findings
    }
    fn mapping(&self, _guest: u64, _max_len: u64) -> Result<Extent> {
        Err(Error::unsupported("luks mapping is not implemented yet"))
    }
    fn source(&self) -> &Source {
        &self.src
    }
}
