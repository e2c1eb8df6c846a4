//! QED images (QEMU Enhanced Disk). Detected and opened only far enough to report the
//! virtual size, cluster size and backing file: image services do not accept QED, so the
//! policy refuses it (`format.unsupported`) and guest data is never mapped.
//!
//! Header (little-endian), from qemu's `docs/interop/qed_spec.txt` and `block/qed.h`:
//! magic, cluster_size, table_size, header_size, features, compat_features,
//! autoclear_features, l1_table_offset, image_size, backing_filename_offset,
//! backing_filename_size.

use nom::number::complete::{le_u32, le_u64};
use nom::Parser;

use crate::error::{Error, Result};
use crate::format::Format;
use crate::image::ImageInfo;
use crate::io::{read_up_to, Source};
use crate::limits::Limits;
use crate::probe::Probe;

use super::header_only::{backing_file, HeaderOnlyImage};

/// `QED\0`.
pub const MAGIC: [u8; 4] = *b"QED\0";
/// Feature bit 0: the image has a backing file.
const FEATURE_BACKING: u64 = 1;
/// Feature bit 1: the image needs a consistency check (dirty).
const FEATURE_NEED_CHECK: u64 = 2;
/// qemu's bounds on the cluster size: 4 KiB to 64 MiB, a power of two.
const MIN_CLUSTER: u32 = 4096;
const MAX_CLUSTER: u32 = 64 << 20;

/// An opened QED image.
pub type QedImage = HeaderOnlyImage;

/// True when the head starts with the QED magic.
pub fn probe(p: &Probe<'_>) -> bool {
    p.starts_with(&MAGIC)
}

/// Opens a QED image's header.
///
/// # Errors
/// `Truncated` for a short header; `Invalid` (`qed.header`) for impossible fields.
///
/// # Security
/// Reads the first 64 bytes and the backing file name inside the header; never opens
/// another file.
pub fn open(src: Source, limits: &Limits) -> Result<QedImage> {
    let head = read_up_to(src.as_ref(), 0, 64)?;
    type Fields = (u32, u32, u32, u32, u64, u64, u64, u64, u64, u32, u32);
    let r: nom::IResult<&[u8], Fields> = (
        le_u32, le_u32, le_u32, le_u32, le_u64, le_u64, le_u64, le_u64, le_u64, le_u32, le_u32,
    )
        .parse(&head);
    let Ok((_, f)) = r else {
        return Err(Error::truncated("QED header is cut short").at(0));
    };
    let (magic, cluster, table, hdr_clusters, features, _, _, _, size, bfo, bfs) = f;
    if magic.to_le_bytes() != MAGIC {
        return Err(Error::invalid("not a QED image").at(0));
    }
    if !cluster.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cluster) {
        return Err(
            Error::invalid(format!("QED cluster size {cluster} is invalid"))
                .at(4)
                .code("qed.header"),
        );
    }
    if !table.is_power_of_two() || table > 16 {
        return Err(Error::invalid(format!("QED table size {table} is invalid"))
            .at(8)
            .code("qed.header"));
    }
    // qemu refuses a size that is not whole sectors ("QED image size is invalid").
    if size % 512 != 0 {
        return Err(Error::invalid(format!(
            "QED image size {size} is not a multiple of 512; qemu refuses it"
        ))
        .at(48)
        .code("qed.header"));
    }
    let mut info = ImageInfo::new(Format::Qed, size);
    info.cluster_size = Some(u64::from(cluster));
    info.actual_size = src.allocated_size();
    info.dirty = Some(features & FEATURE_NEED_CHECK != 0);
    let mut findings = Vec::new();
    if features & FEATURE_BACKING != 0 {
        let hdr_len = u64::from(hdr_clusters).saturating_mul(u64::from(cluster));
        let end = u64::from(bfo).saturating_add(u64::from(bfs));
        if end > hdr_len || bfs > 1023 {
            return Err(Error::invalid("QED backing file name leaves the header")
                .at(56)
                .code("qed.header"));
        }
        let budget = limits.budget();
        let len = u64::from(bfs);
        let name = crate::io::read_vec(
            src.as_ref(),
            u64::from(bfo),
            len,
            &budget,
            "QED backing file name",
        )?;
        backing_file(&mut info, &mut findings, "QED", &name, u64::from(bfo));
        drop(name);
        budget.give_back(len);
    }
    Ok(HeaderOnlyImage::new(
        src,
        info,
        findings,
        "QED guest data is not read (the format is not accepted)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;
    use std::sync::Arc;

    #[test]
    fn qemu_img_qed_with_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let p = dir.path().join("a.qed");
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qed", "-b"])
            .arg(&base)
            .args(["-F", "raw"])
            .arg(&p)
            .arg("3M")
            .status()
            .expect("qemu-img must be installed");
        assert!(st.success());
        let f = std::fs::File::open(&p).unwrap();
        let det = crate::detect::detect(&f).unwrap();
        assert_eq!(det.matches, vec![Format::Qed]);
        let img = open(Arc::new(f), &Limits::default()).unwrap();
        assert_eq!(img.info().virtual_size, 3 << 20);
        assert_eq!(img.info().cluster_size, Some(65536));
        let r = img.info().backing_file().unwrap();
        assert!(r.target.ends_with("base.raw"));
        assert!((&img as &dyn Image).mapping(0, 1).is_err());

        // Report F1 class: an image size that is not whole sectors; qemu cannot open it.
        let mut b = std::fs::read(&p).unwrap();
        b[48..56].copy_from_slice(&((3u64 << 20) - 100).to_le_bytes());
        std::fs::write(&p, &b).unwrap();
        let q = std::process::Command::new("qemu-img")
            .arg("info")
            .arg(&p)
            .output()
            .expect("qemu-img must be installed");
        assert!(String::from_utf8_lossy(&q.stderr).contains("QED image size is invalid"));
        let e = open(Arc::new(b), &Limits::default()).err().unwrap();
        assert_eq!(e.finding_code(), "qed.header");
    }
}
