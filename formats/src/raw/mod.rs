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
    if let Some((ct, file)) = vmdk_descriptor_text(&src, &head)? {
        findings.push(Finding::reject(
            "raw.vmdk-descriptor-text",
            format!(
                "the text at the start of this raw file is a VMDK descriptor to qemu when the \
                 format is declared vmdk (createType {ct:?}, an extent naming the host file \
                 {file:?}): `qemu-img -f vmdk` opens that file"
            ),
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

/// How much of a file qemu's VMDK driver reads as a descriptor (`vmdk_read_desc`): 1 MiB - 1.
const QEMU_DESCRIPTOR: usize = (1 << 20) - 1;

/// What qemu's VMDK descriptor reader (`vmdk_open_desc_file`, `vmdk_parse_extents`) takes
/// from this file when told it is a VMDK: the text up to the first NUL in the first MiB, a
/// `createType` anywhere (qemu's `strstr`, then 2 bytes skipped, up to a quote) with a type
/// qemu opens, and an `RW <sectors> <type> "<file>"` line as `sscanf` reads it (across line
/// breaks). Returns the create type and the first file named. Reads at most 1 MiB; linear.
fn vmdk_descriptor_text(src: &Source, head: &[u8]) -> Result<Option<(String, String)>> {
    const TYPES: &[&[u8]] = &[
        b"monolithicFlat",
        b"vmfs",
        b"vmfsSparse",
        b"seSparse",
        b"twoGbMaxExtentSparse",
        b"twoGbMaxExtentFlat",
    ];
    let more;
    let buf = if head.contains(&0) || head.len() >= QEMU_DESCRIPTOR {
        head
    } else if src.size()? > head.len() as u64 {
        more = crate::io::read_up_to(src.as_ref(), 0, QEMU_DESCRIPTOR)?;
        &more[..]
    } else {
        head
    };
    let buf = buf
        .get(..buf.len().min(QEMU_DESCRIPTOR))
        .unwrap_or_default();
    let text = buf.split(|&b| b == 0).next().unwrap_or_default();
    let key = b"createType";
    let Some(at) = text.windows(key.len()).position(|w| w == key) else {
        return Ok(None);
    };
    let value = text
        .get(at.saturating_add(key.len()).saturating_add(2)..)
        .unwrap_or_default();
    let Some(end) = value.iter().position(|&b| b == b'"') else {
        return Ok(None);
    };
    let ct = value.get(..end).unwrap_or_default();
    if !TYPES.contains(&ct) {
        return Ok(None);
    }
    let Some(&(_, file)) = crate::vmdk::descriptor::qemu_rw_extents(text, 1).first() else {
        return Ok(None);
    };
    Ok(Some((
        String::from_utf8_lossy(ct).into_owned(),
        String::from_utf8_lossy(file).into_owned(),
    )))
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
    fn descriptor_text_qemu_reads_with_the_format_declared_vmdk_is_rejected() {
        let codes = |data: Vec<u8>| -> Vec<&'static str> {
            let img = open(Arc::new(data), &Limits::default()).unwrap();
            img.findings().iter().map(|f| f.code).collect()
        };
        let blob = b"createType=\"monolithicFlat\"\nRW 2048 FLAT \"/victim/base.raw\" 0\n";
        // report refs-diff F2: an MBR disk whose boot code is the descriptor text.
        let mut mbr = vec![0u8; 1 << 20];
        mbr[..blob.len()].copy_from_slice(blob);
        mbr[446..462].copy_from_slice(&[0x80, 0, 2, 0, 0x83, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0]);
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
        assert!(codes(mbr).contains(&"raw.vmdk-descriptor-text"));
        let mut text_first = blob.to_vec();
        text_first.extend(vec![0u8; 65536]);
        assert!(codes(text_first).contains(&"raw.vmdk-descriptor-text"));
        // Any two bytes after the key; tokens split over lines (sscanf crosses them); the
        // text past the 64 KiB head, before any NUL.
        for text in [
            &b"createTypeXXvmfs\"\nRW 1 VMFS \"/v/b\"\n"[..],
            b"createType=\"vmfs\"\nRW\n1\nVMFS\n\"/v/b\"\n",
        ] {
            assert_eq!(
                codes(text.to_vec()),
                ["raw.vmdk-descriptor-text"],
                "{text:?}"
            );
        }
        let mut far = vec![b' '; 100_000];
        far.extend_from_slice(blob);
        assert_eq!(codes(far), ["raw.vmdk-descriptor-text"]);
        // What qemu does not take: after a NUL, a type it refuses, no RW extent, ZERO.
        for text in [
            &b"\0createType=\"vmfs\"\nRW 1 VMFS \"/v/b\"\n"[..],
            b"createType=\"custom\"\nRW 1 VMFS \"/v/b\"\n",
            b"createType=\"vmfs\"\nRDONLY 1 VMFS \"/v/b\"\n",
            b"createType=\"vmfs\"\nRW 1 ZERO \"/v/b\"\n",
            b"createType=\"vmfs\"\nRWX 1 VMFS \"/v/b\"\n",
            b"createType=\"vmfs\"\nRW 1 VMFS \"\"\n",
        ] {
            assert!(codes(text.to_vec()).is_empty(), "{text:?}");
        }
        // Bounded: a MiB of line breaks, or of `RW` lines, is scanned in linear time.
        assert!(codes(
            b"createType=\"vmfs\""
                .iter()
                .copied()
                .chain(vec![b'\n'; 1 << 20])
                .collect()
        )
        .is_empty());
        assert!(codes(
            b"createType=\"vmfs\"\n"
                .iter()
                .copied()
                .chain(b"RW\n".repeat(300_000))
                .collect()
        )
        .is_empty());
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
