//! Raw images: the guest disk byte for byte.
//!
//! The virtual size is the file's exact length, as Glance reports it. qemu-img rounds a raw
//! file's size up to a whole 512-byte sector; glimpse does not, because the bytes past the end
//! do not exist, and because `upload` and `audit` hold Glance's `virtual_size` to glimpse's
//! (`cli/tests/cli.rs`: `raw_size_is_the_exact_file_length_not_rounded_like_qemu`). Every other format's size is whole
//! sectors, as qemu's.

use crate::error::Result;
use crate::finding::Finding;
use crate::format::Format;
use crate::image::{Extent, Image, ImageCore, ImageInfo};
use crate::io::Source;
use crate::limits::Limits;

/// An opened raw image.
pub struct RawImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    runs: crate::io::LinearMap,
}

/// Opens a raw image. Partition-table facts (MBR, GPT, FAT) found in the first sectors are
/// reported as details.
///
/// # Errors
/// `Io` when the source cannot be read.
pub fn open(src: Source, limits: &Limits) -> Result<RawImage> {
    let size = src.size()?;
    let mut info = ImageInfo::new(Format::Raw, size);
    info.actual_size = src.allocated_size();
    let head = crate::io::read_up_to(src.as_ref(), 0, crate::partition::HEAD_LEN)?;
    let (details, mut findings) = crate::partition::describe_with(&head, size, limits);
    info.details = details;
    if is_ovf_descriptor(&head) {
        findings.push(Finding::reject(
            "raw.ovf-descriptor",
            "this is an OVF descriptor (XML), not a disk image; inspect the appliance with \
             `glimpse ova list` or `glimpse ova check`",
        ));
    }
    Ok(RawImage {
        src,
        info,
        findings,
        runs: crate::io::LinearMap::default(),
    })
}

/// True when the head is an OVF envelope: optional BOM and whitespace, then markup, and the
/// OVF envelope namespace in the bytes read. A disk whose first sector is XML naming that
/// namespace is not a disk anyone boots; it is a descriptor about to be uploaded as one.
fn is_ovf_descriptor(head: &[u8]) -> bool {
    let text = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let start = text.iter().position(|b| !b.is_ascii_whitespace());
    let markup = start.is_some_and(|i| text.get(i) == Some(&b'<'));
    let has = |needle: &[u8]| text.windows(needle.len()).any(|w| w == needle);
    markup && has(b"schemas.dmtf.org/ovf/envelope") && has(b"Envelope")
}

impl Image for RawImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }
    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        self.runs.extent(
            self.src.as_ref(),
            guest,
            guest.saturating_add(span),
            self.info.virtual_size,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ExtentKind;
    use std::io::{Seek, SeekFrom, Write};
    use std::sync::Arc;

    #[test]
    fn an_ovf_descriptor_is_not_a_raw_disk() {
        let xml = b"\xef\xbb\xbf\n<?xml version=\"1.0\"?>\n<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\"/>";
        let img = open(Arc::new(xml.to_vec()), &Limits::default()).unwrap();
        let codes: Vec<&str> = img.findings().iter().map(|f| f.code).collect();
        assert_eq!(codes, ["raw.ovf-descriptor"]);
        assert_eq!(img.findings()[0].severity, crate::finding::Severity::Reject);
        // Markup without the namespace, or the namespace after binary bytes, is just data.
        for data in [
            &b"<html><Envelope/></html>"[..],
            &b"\x00\x01<Envelope xmlns=\"http://schemas.dmtf.org/ovf/envelope/1\"/>"[..],
        ] {
            let img = open(Arc::new(data.to_vec()), &Limits::default()).unwrap();
            assert!(img.findings().is_empty());
        }
    }

    #[test]
    fn holes_map_as_zero_and_cover_the_file() {
        let mut f = tempfile::tempfile().unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.set_len(3 << 20).unwrap();
        let img = open(Arc::new(f), &Limits::default()).unwrap();
        assert_eq!(img.info().virtual_size, 3 << 20);
        let mut pos = 0;
        let mut data = 0;
        while pos < img.info().virtual_size {
            let e = (&img as &dyn Image).mapping(pos, u64::MAX).unwrap();
            crate::image::validate_extent(&e, pos, u64::MAX, 3 << 20).unwrap();
            if let ExtentKind::Data { host } = e.kind {
                assert_eq!(host, pos);
                data += e.len;
            }
            pos = e.end();
        }
        assert!((4096..3 << 20).contains(&data), "data {data}");
        assert!((&img as &dyn Image).mapping(3 << 20, 1).is_err());
    }
}
