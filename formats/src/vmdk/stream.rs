//! streamOptimized markers and the footer.
//!
//! With markers, every grain is preceded by `lba: u64, size: u32` (the grain's first guest
//! sector and the compressed length), and every metadata block by a sector-sized marker
//! `numSectors: u64, 0: u32, type: u32`. A stream whose head says `gdOffset = GD_AT_END`
//! ends with: footer marker (sector -3), a copy of the header with the real `gdOffset`
//! (sector -2), end-of-stream marker (sector -1).

use nom::number::complete::{le_u32, le_u64};
use nom::Parser;

use super::header::{SparseHeader, GD_AT_END, HEADER_LEN, SECTOR};
use crate::error::{Error, Result};
use crate::io::ReadAt;

/// Bytes of a grain marker before the compressed data.
pub const GRAIN_MARKER_LEN: u64 = 12;
/// Metadata marker type: end of stream.
pub const MARKER_EOS: u32 = 0;
/// Metadata marker type: a grain table follows.
pub const MARKER_GT: u32 = 1;
/// Metadata marker type: the grain directory follows.
pub const MARKER_GD: u32 = 2;
/// Metadata marker type: the footer follows.
pub const MARKER_FOOTER: u32 = 3;

/// A marker as read: `val` is the grain's LBA (grain markers) or the metadata length in
/// sectors (metadata markers); `size` is the compressed length (0 for metadata markers);
/// `kind` is the metadata type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// LBA in sectors, or metadata sectors.
    pub val: u64,
    /// Compressed bytes that follow (0 for metadata markers).
    pub size: u32,
    /// Metadata type (meaningful only when `size` is 0).
    pub kind: u32,
}

/// Parses a marker from at least 16 bytes.
///
/// # Errors
/// `Truncated` when `buf` is short.
pub fn parse_marker(buf: &[u8], at: u64) -> Result<Marker> {
    let (_, (val, size, kind)) = (le_u64::<&[u8], nom::error::Error<&[u8]>>, le_u32, le_u32)
        .parse(buf)
        .map_err(|_| Error::truncated("VMDK marker is cut short").at(at))?;
    Ok(Marker { val, size, kind })
}

/// Reads the footer of a stream whose head has `gdOffset = GD_AT_END` and returns the footer
/// header, after checking it against `head`.
///
/// # Errors
/// `Truncated` for a file too short to hold one; `Corrupt` (`vmdk.footer`) when the markers
/// around it are wrong or its header disagrees with the head.
pub fn read_footer(src: &dyn ReadAt, size: u64, head: &SparseHeader) -> Result<SparseHeader> {
    let footer_err = |m: String, at: u64| Error::corrupt(m).at(at).code("vmdk.footer");
    // Header, footer marker, footer, EOS: qemu reads the footer at size - 1536.
    if size < 4 * SECTOR {
        return Err(footer_err(
            format!("a {size}-byte file cannot hold a VMDK stream footer"),
            0,
        ));
    }
    // `size` is at least four sectors (above).
    let at = size.saturating_sub(3 * SECTOR);
    let mut buf = [0u8; 3 * HEADER_LEN];
    src.read_exact_at(&mut buf, at)
        .map_err(|e| Error::from(e).context("reading the VMDK footer").at(at))?;
    let (fm, rest) = buf.split_at(HEADER_LEN);
    let (fh, eos) = rest.split_at(HEADER_LEN);
    let m = parse_marker(fm, at)?;
    if m.size != 0 || m.kind != MARKER_FOOTER {
        return Err(footer_err(
            format!(
                "no footer marker before the VMDK footer (size {}, type {})",
                m.size, m.kind
            ),
            at,
        ));
    }
    let eos_at = size.saturating_sub(SECTOR);
    let e = parse_marker(eos, eos_at)?;
    if e != (Marker {
        val: 0,
        size: 0,
        kind: MARKER_EOS,
    }) {
        return Err(footer_err(
            "the VMDK stream does not end with an end-of-stream marker".into(),
            eos_at,
        ));
    }
    let fat = size.saturating_sub(2 * SECTOR);
    let f = SparseHeader::parse(fh, fat).map_err(|e| e.code("vmdk.footer"))?;
    let same = f.version == head.version
        && f.flags == head.flags
        && f.capacity == head.capacity
        && f.grain_size == head.grain_size
        && f.descriptor_offset == head.descriptor_offset
        && f.descriptor_size == head.descriptor_size
        && f.gtes_per_gt == head.gtes_per_gt
        && f.compress_algorithm == head.compress_algorithm;
    if !same {
        return Err(footer_err(
            "the VMDK footer header disagrees with the head".into(),
            fat,
        ));
    }
    if f.gd_offset == GD_AT_END || f.gd_offset == 0 {
        return Err(footer_err(
            "the VMDK footer does not locate the grain directory".into(),
            fat.saturating_add(56),
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&128u64.to_le_bytes());
        b[8..12].copy_from_slice(&77u32.to_le_bytes());
        assert_eq!(
            parse_marker(&b, 0).unwrap(),
            Marker {
                val: 128,
                size: 77,
                kind: 0
            }
        );
        assert!(parse_marker(&b[..10], 0).is_err());
    }
}
