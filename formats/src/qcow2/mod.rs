//! Qcow2 images. (Stub: filled in by the format's own work.)

pub mod qed;

use crate::detect::Probe;
use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::image::{Extent, Image, ImageInfo};
use crate::io::Source;
use crate::limits::Limits;

/// An opened Qcow2 image.
pub struct Qcow2Image {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
}

/// True when the probe windows look like Qcow2.
pub fn probe(_p: &Probe<'_>) -> bool {
    false
}

/// Opens a Qcow2 image.
///
/// # Errors
/// `Unsupported` until implemented.
pub fn open(_src: Source, _limits: &Limits) -> Result<Qcow2Image> {
    Err(Error::unsupported("qcow2 is not implemented yet"))
}

impl Image for Qcow2Image {
    fn info(&self) -> &ImageInfo {
        &self.info
    }
    fn findings(&self) -> &[Finding] {
        &self.findings
    }
    fn mapping(&self, _guest: u64, _max_len: u64) -> Result<Extent> {
        Err(Error::unsupported("qcow2 mapping is not implemented yet"))
    }
    fn source(&self) -> &Source {
        &self.src
    }
}
