//! Images of the qcow family that glimpse opens only as far as their header (QED, qcow
//! version 1): the virtual size, cluster size and backing file are reported, and the policy
//! refuses the format (`format.unsupported`); guest data is never mapped.

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::image::{Extent, Image, ImageCore, ImageInfo, RefKind, Reference};
use crate::io::Source;

/// An image opened as far as its header.
pub struct HeaderOnlyImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    /// Why guest data is not read: the message of every mapping's `format.unsupported`.
    refusal: String,
}

impl HeaderOnlyImage {
    /// The image of `src`, described by `info` and `findings`; mapping fails with `refusal`.
    pub(crate) fn new(
        src: Source,
        info: ImageInfo,
        findings: Vec<Finding>,
        refusal: String,
    ) -> Self {
        Self {
            src,
            info,
            findings,
            refusal,
        }
    }
}

/// Reports the backing file name `name`, stored at `offset`, of a `what` image ("QED",
/// "qcow1") as a reference and as a `qcow2.backing-file` rejection.
pub(crate) fn backing_file(
    info: &mut ImageInfo,
    findings: &mut Vec<Finding>,
    what: &str,
    name: &[u8],
    offset: u64,
) {
    let target = String::from_utf8_lossy(name).into_owned();
    findings.push(
        Finding::reject(
            "qcow2.backing-file",
            format!("the {what} image names a backing file: {target:?}"),
        )
        .at(offset),
    );
    info.references.push(Reference {
        kind: RefKind::BackingFile,
        target,
        format: None,
        offset: Some(offset),
    });
}

impl Image for HeaderOnlyImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }
    fn extent_at(&self, _guest: u64, _span: u64) -> Result<Extent> {
        Err(Error::unsupported(self.refusal.clone()).code("format.unsupported"))
    }
}
