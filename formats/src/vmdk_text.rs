//! A VMDK descriptor in the first bytes of a file of any other format.
//!
//! qemu's VMDK driver, once the format is declared vmdk (`qemu-img -f vmdk`, a Glance
//! `disk_format=vmdk`), reads every file whose first 4 bytes are not a sparse magic (`KDMV`,
//! `COWD`) as a descriptor: the text up to its first NUL within the first MiB. A raw disk's boot
//! code, an ISO's 32 KiB system area, a fixed VHD's first guest sector, a VHDX's free `creator`
//! field (after `vhdxfile`, with no NUL in between) and a VDI's 64-byte text pre-header can all
//! hold such text while the file stays a valid image of its own format; qemu then opens the host
//! file its extent names. The policy runs this test on every image but a VMDK (whose own reader
//! already judges its descriptor), so no format's free bytes at offset 0 carry one
//! (`formats/tests/vmdk_text.rs`).

use crate::error::Result;
use crate::finding::Finding;
use crate::format::Format;
use crate::image::Image;
use crate::io::Source;

/// How much of a file qemu's VMDK driver reads as a descriptor (`vmdk_read_desc`): 1 MiB - 1.
const QEMU_DESCRIPTOR: usize = (1 << 20) - 1;

/// The first read, one sector: almost every image has a NUL in its first bytes, which ends
/// qemu's text (an OVA's first member name; so its disks' bytes are not read again).
const FIRST_READ: usize = 512;

/// The policy's test of an opened image: its own bytes (the file, or an OVA disk's member,
/// tested as the disk's own format).
///
/// # Errors
/// `Io` when the source cannot be read.
pub(crate) fn judge(img: &dyn Image, out: &mut Vec<Finding>) -> Result<()> {
    let info = img.info();
    let format = match info.format {
        Format::Ova => info
            .details
            .get("disk-format")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse().ok())
            .unwrap_or(Format::Raw),
        f => f,
    };
    out.extend(finding(img.source(), format)?);
    Ok(())
}

/// The policy's test of the file itself where [`judge`] does not see it: an OVA archive (whose
/// disks `judge` sees), and a file that could not be opened as `format`.
///
/// # Errors
/// `Io` when the source cannot be read.
pub(crate) fn outer(
    src: &Source,
    format: Format,
    opened: bool,
    out: &mut Vec<Finding>,
) -> Result<()> {
    if format == Format::Ova || !opened {
        out.extend(finding(src, format)?);
    }
    Ok(())
}

/// The rejection for `src`, detected as `format`, when qemu's VMDK driver would read a
/// descriptor naming a file at its byte 0: `raw.vmdk-descriptor-text` for a raw file,
/// `image.vmdk-descriptor-text` for any other format; `None` for a VMDK. Reads at most 1 MiB
/// (512 bytes when a NUL comes first); linear.
///
/// # Errors
/// `Io` when the source cannot be read.
pub fn finding(src: &Source, format: Format) -> Result<Option<Finding>> {
    if format == Format::Vmdk {
        return Ok(None);
    }
    let Some((ct, file)) = descriptor_text(src)? else {
        return Ok(None);
    };
    let (code, what) = match format {
        Format::Raw => ("raw.vmdk-descriptor-text", "this raw file".to_string()),
        other => ("image.vmdk-descriptor-text", format!("this {other} image")),
    };
    Ok(Some(Finding::reject(
        code,
        format!(
            "the text at the start of {what} is a VMDK descriptor to qemu when the format is \
             declared vmdk (createType {ct:?}, an extent naming the host file {file:?}): \
             `qemu-img -f vmdk` opens that file"
        ),
    )))
}

/// What qemu's VMDK descriptor reader (`vmdk_open_desc_file`, `vmdk_parse_extents`) takes
/// from this file when told it is a VMDK: the text up to the first NUL in the first MiB, a
/// `createType` anywhere (qemu's `strstr`, then 2 bytes skipped, up to a quote) with a type
/// qemu opens, and an `RW <sectors> <type> "<file>"` line as `sscanf` reads it (across line
/// breaks). Returns the create type and the first file named. Reads at most 1 MiB; linear.
fn descriptor_text(src: &Source) -> Result<Option<(String, String)>> {
    const TYPES: &[&[u8]] = &[
        b"monolithicFlat",
        b"vmfs",
        b"vmfsSparse",
        b"seSparse",
        b"twoGbMaxExtentSparse",
        b"twoGbMaxExtentFlat",
    ];
    let mut buf = crate::io::read_up_to(src.as_ref(), 0, FIRST_READ)?;
    if !buf.contains(&0) && buf.len() == FIRST_READ {
        buf = crate::io::read_up_to(src.as_ref(), 0, QEMU_DESCRIPTOR)?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn codes(data: Vec<u8>) -> Vec<&'static str> {
        codes_as(data, Format::Raw)
    }

    fn codes_as(data: Vec<u8>, format: Format) -> Vec<&'static str> {
        let src: Source = Arc::new(data);
        finding(&src, format)
            .unwrap()
            .into_iter()
            .map(|f| f.code)
            .collect()
    }

    #[test]
    fn the_code_names_raw_or_any_other_format_and_a_vmdk_is_left_to_its_reader() {
        let text = b"createType=\"vmfs\"\nRW 1 VMFS \"/v/b\"\n".to_vec();
        assert_eq!(
            codes_as(text.clone(), Format::Raw),
            ["raw.vmdk-descriptor-text"]
        );
        for f in [
            Format::Iso,
            Format::Vhd,
            Format::Vhdx,
            Format::Vdi,
            Format::Ova,
        ] {
            assert_eq!(
                codes_as(text.clone(), f),
                ["image.vmdk-descriptor-text"],
                "{f}"
            );
        }
        assert!(codes_as(text, Format::Vmdk).is_empty());
    }

    #[test]
    fn descriptor_text_qemu_reads_with_the_format_declared_vmdk_is_rejected() {
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
}
