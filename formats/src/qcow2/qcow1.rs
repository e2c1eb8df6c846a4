//! qcow version 1 images. Detected and opened only far enough to report the virtual size,
//! cluster size, encryption and backing file: glimpse does not read qcow1 guest data, so the
//! policy refuses it (`format.unsupported`) and guest data is never mapped. The header is
//! opened so that a report names the backing file qemu would open (report refs-diff F4).
//!
//! Header (big-endian, 48 bytes), from qemu's `block/qcow.c` (`QCowHeader`, `qcow_open`):
//! magic, version, backing_file_offset (u64), backing_file_size (u32), mtime (u32), size
//! (u64, bytes), cluster_bits (u8), l2_bits (u8), padding (u16), crypt_method (u32),
//! l1_table_offset (u64).

use nom::number::complete::{be_u16, be_u32, be_u64, u8 as nom_u8};
use nom::Parser;

use crate::error::{Error, Result};
use crate::format::Format;
use crate::image::ImageInfo;
use crate::io::{read_up_to, Source};
use crate::limits::Limits;

use super::header_only::{backing_file, HeaderOnlyImage};

/// The longest backing file name qemu reads ("Backing file name too long").
const MAX_BACKING_NAME: u32 = 1023;

/// An opened qcow1 image.
pub type Qcow1Image = HeaderOnlyImage;

fn header_error(msg: String, at: u64) -> Error {
    Error::invalid(msg).at(at).code("qcow1.header")
}

/// Opens a qcow1 image's header.
///
/// # Errors
/// `Truncated` for a short header; `Invalid` (`qcow1.header`) for fields qemu refuses.
///
/// # Security
/// Reads the 48-byte header and at most 1023 bytes of backing file name; never opens another
/// file.
pub fn open(src: Source, _limits: &Limits) -> Result<Qcow1Image> {
    let head = read_up_to(src.as_ref(), 0, 48)?;
    type Fields = (u32, u32, u64, u32, u32, u64, u8, u8, u16, u32, u64);
    let r: nom::IResult<&[u8], Fields> = (
        be_u32, be_u32, be_u64, be_u32, be_u32, be_u64, nom_u8, nom_u8, be_u16, be_u32, be_u64,
    )
        .parse(&head);
    let Ok((_, f)) = r else {
        return Err(Error::truncated("qcow1 header is cut short").at(0));
    };
    let (_, version, bfo, bfs, _, size, cbits, l2bits, _, crypt, _) = f;
    if version != 1 {
        return Err(header_error(format!("qcow version {version} is not 1"), 4));
    }
    // qemu's own checks, in its order.
    if size <= 1 {
        return Err(header_error(format!("image size {size} is too small"), 24));
    }
    if !(9..=16).contains(&cbits) {
        return Err(header_error(
            format!("cluster_bits {cbits} is outside 9..=16"),
            32,
        ));
    }
    if !(6..=13).contains(&l2bits) {
        return Err(header_error(
            format!("l2_bits {l2bits} is outside 6..=13"),
            33,
        ));
    }
    if crypt > 1 {
        return Err(header_error(
            format!("encryption method {crypt} is invalid"),
            36,
        ));
    }
    let shift = u32::from(cbits).saturating_add(u32::from(l2bits));
    if size > u64::MAX.saturating_sub(1u64 << shift) {
        return Err(header_error(format!("image size {size} is too large"), 24));
    }
    // qemu keeps whole sectors.
    let mut info = ImageInfo::new(Format::Qcow1, size & !511);
    info.cluster_size = Some(1u64 << cbits);
    info.actual_size = src.allocated_size();
    info.encrypted = crypt != 0;
    let mut findings = Vec::new();
    if bfo != 0 {
        if bfs > MAX_BACKING_NAME {
            return Err(header_error(
                format!("backing file name of {bfs} bytes is too long"),
                16,
            ));
        }
        let name = read_up_to(src.as_ref(), bfo, bfs as usize)?;
        backing_file(&mut info, &mut findings, "qcow1", &name, bfo);
    }
    Ok(HeaderOnlyImage::new(
        src,
        info,
        findings,
        crate::unsupported::message(Format::Qcow1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;
    use std::sync::Arc;

    #[test]
    fn qemu_img_qcow1_with_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let p = dir.path().join("a.qcow");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow", "-b"])
            .arg(&base)
            .args(["-F", "raw"])
            .arg(&p)
            .arg("3M")
            .status()
            .expect("qemu-img must be installed");
        assert!(st.success());
        let f = std::fs::File::open(&p).unwrap();
        let det = crate::detect::detect(&f).unwrap();
        assert_eq!(det.matches, vec![Format::Qcow1]);
        let img = open(Arc::new(f), &Limits::default()).unwrap();
        assert_eq!(img.info().virtual_size, 3 << 20);
        let r = img.info().backing_file().unwrap();
        assert!(r.target.ends_with("base.raw"), "{}", r.target);
        assert_eq!(img.findings()[0].code, "qcow2.backing-file");
        let e = (&img as &dyn Image).mapping(0, 1).err().unwrap();
        assert_eq!(e.finding_code(), "format.unsupported");

        // Fields qemu refuses: cluster_bits 8, l2_bits 14, encryption method 2, size 1, a
        // backing file name of 1024 bytes.
        let b = std::fs::read(&p).unwrap();
        for (at, bytes) in [
            (32usize, vec![8u8]),
            (33, vec![14]),
            (36, 2u32.to_be_bytes().to_vec()),
            (24, 1u64.to_be_bytes().to_vec()),
            (16, 1024u32.to_be_bytes().to_vec()),
        ] {
            let mut m = b.clone();
            m[at..at + bytes.len()].copy_from_slice(&bytes);
            let e = open(Arc::new(m), &Limits::default()).err().unwrap();
            assert_eq!(e.finding_code(), "qcow1.header", "field at {at}");
        }
    }
}
