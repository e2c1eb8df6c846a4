//! Iso images. (Stub: filled in by the format's own work.)

use crate::detect::Probe;
use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::image::{Extent, Image, ImageInfo};
use crate::io::Source;
use crate::limits::Limits;

/// An opened Iso image.
pub struct IsoImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
}

/// True when the probe windows look like Iso.
pub fn probe(_p: &Probe<'_>) -> bool {
    false
}

/// Opens a Iso image.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn open(_src: Source, _limits: &Limits) -> Result<IsoImage> {
    Err(Error::unsupported("iso is not implemented yet"))
}

impl Image for IsoImage {
    fn info(&self) -> &ImageInfo {
        &self.info
    }
    fn findings(&self) -> &[Finding] {
        &self.findings
    }
    fn mapping(&self, _guest: u64, _max_len: u64) -> Result<Extent> {
        Err(Error::unsupported("iso mapping is not implemented yet"))
    }
    fn source(&self) -> &Source {
        &self.src
    }
}
