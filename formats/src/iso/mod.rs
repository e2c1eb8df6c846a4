//! ISO 9660 (ECMA-119) optical images, including UDF bridge and pure UDF discs.
//!
//! The volume descriptor set starts at sector 16 (byte 32768) in 2048-byte sectors. Each
//! descriptor holds a type byte, the standard identifier at +1 (`CD001` for ISO 9660; `BEA01`,
//! `NSR02`/`NSR03`, `TEA01` for the UDF volume recognition sequence) and a version byte.
//!
//! qemu-img calls an ISO `raw` and reports the file's size, and so does glimpse: the guest disk
//! is the whole file. The size that the primary volume descriptor declares (volume space size ×
//! logical block size) is reported as the `volume-size` detail; a file longer than its volume
//! is warned about (appended partitions), and a file shorter than its volume is rejected.

use nom::bytes::complete::take;
use nom::number::complete::{be_u16, be_u32, le_u16, le_u32, le_u8};
use nom::IResult;

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::format::Format;
use crate::image::{Extent, Image, ImageCore, ImageInfo};
use crate::io::{read_up_to, Source};
use crate::limits::Limits;
use crate::probe::Probe;

/// Size of one volume descriptor (and of an ISO 9660 sector), in bytes.
const SECTOR: usize = 2048;
/// Byte offset of the first volume descriptor: sector 16, after the 32 KiB system area.
pub const DESCRIPTORS_AT: usize = 16 * SECTOR;
/// Most descriptors walked: the 32 KiB that follow the system area in the 64 KiB detection
/// head. Real discs use three to six.
const MAX_DESCRIPTORS: usize = 16;

/// Volume descriptor type: boot record (El Torito when its boot system id says so).
const VD_BOOT: u8 = 0;
/// Volume descriptor type: primary.
const VD_PRIMARY: u8 = 1;
/// Volume descriptor type: supplementary (Joliet when its escape sequence says UCS-2).
const VD_SUPPLEMENTARY: u8 = 2;
/// Volume descriptor type: volume partition.
const VD_PARTITION: u8 = 3;
/// Volume descriptor type: set terminator.
const VD_TERMINATOR: u8 = 255;

/// What the walk over the volume descriptor area found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Scan {
    /// Sector 16 holds an ISO 9660 descriptor.
    iso9660: bool,
    /// Byte offset (relative to the descriptor area) of the first primary volume descriptor.
    primary: Option<usize>,
    /// A Joliet supplementary descriptor was seen.
    joliet: bool,
    /// A boot record was seen (El Torito or another boot system).
    boot_record: bool,
    /// The boot record names the El Torito specification.
    el_torito: bool,
    /// A UDF NSR02/NSR03 descriptor was seen in the volume recognition sequence.
    udf: bool,
    /// Volume partition descriptors seen.
    partitions: u32,
    /// The ISO 9660 set ended with a terminator.
    terminated: bool,
}

/// The 5-byte standard identifier of the descriptor at `off` in `area`.
fn ident(area: &[u8], off: usize) -> Option<&[u8]> {
    area.get(off.checked_add(1)?..off.checked_add(6)?)
}

/// Walks the descriptors in `area` (bytes from sector 16 on), bounded by [`MAX_DESCRIPTORS`].
fn scan(area: &[u8]) -> Scan {
    let mut s = Scan::default();
    let first = ident(area, 0);
    s.iso9660 = first == Some(&b"CD001"[..]);
    if !s.iso9660 && first != Some(&b"BEA01"[..]) {
        return s;
    }
    // Until the ISO 9660 terminator only CD001 descriptors are expected; after it (or on a
    // pure UDF disc) only the volume recognition sequence's identifiers. Anything else ends
    // the walk: file data may follow the descriptors directly.
    let mut in_iso_set = s.iso9660;
    for k in 0..MAX_DESCRIPTORS {
        let Some(off) = k.checked_mul(SECTOR) else {
            break;
        };
        let Some(id) = ident(area, off) else { break };
        let kind = area.get(off).copied().unwrap_or(0);
        if in_iso_set {
            if id != b"CD001" {
                break;
            }
            match kind {
                VD_BOOT => {
                    s.boot_record = true;
                    let system = area
                        .get(off.saturating_add(7)..off.saturating_add(39))
                        .unwrap_or_default();
                    s.el_torito |= system.starts_with(b"EL TORITO SPECIFICATION");
                }
                VD_PRIMARY if s.primary.is_none() => s.primary = Some(off),
                VD_SUPPLEMENTARY => {
                    // Joliet marks UCS-2 with escape sequences %/@, %/C or %/E at 88..120.
                    let esc = area
                        .get(off.saturating_add(88)..off.saturating_add(91))
                        .unwrap_or_default();
                    s.joliet |= matches!(esc, b"%/@" | b"%/C" | b"%/E");
                }
                VD_PARTITION => s.partitions = s.partitions.saturating_add(1),
                VD_TERMINATOR => {
                    s.terminated = true;
                    in_iso_set = false;
                }
                _ => {}
            }
            continue;
        }
        match id {
            b"BEA01" | b"BOOT2" | b"CDW02" => {}
            b"NSR02" | b"NSR03" => s.udf = true,
            b"TEA01" => break,
            // UDF on media with sectors larger than 2048 bytes spaces the sequence by the
            // sector size, leaving blank 2048-byte slots between descriptors.
            [0, 0, 0, 0, 0] if !s.iso9660 => {}
            _ => break,
        }
    }
    s
}

/// True when the probe windows look like ISO 9660 or UDF.
pub fn probe(p: &Probe<'_>) -> bool {
    let s = scan(p.head.get(DESCRIPTORS_AT..).unwrap_or_default());
    s.iso9660 || s.udf
}

/// The fields of the primary volume descriptor we use (ECMA-119 8.4).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Primary {
    /// Volume descriptor version: 1.
    version: u8,
    /// System identifier (a-characters, 32 bytes): the system that may act on sectors 0-15.
    system_id: String,
    /// Volume identifier (d-characters, 32 bytes).
    volume_id: String,
    /// Volume space size, little-endian half: number of logical blocks in the volume.
    space_le: u32,
    /// Volume space size, big-endian half (must equal the little-endian half).
    space_be: u32,
    /// Logical block size in bytes, little-endian half.
    block_le: u16,
    /// Logical block size in bytes, big-endian half.
    block_be: u16,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .trim_start()
        .to_string()
}

fn primary(i: &[u8]) -> IResult<&[u8], Primary> {
    let (i, _kind) = le_u8(i)?;
    let (i, _ident) = take(5usize)(i)?;
    let (i, version) = le_u8(i)?;
    let (i, _unused) = le_u8(i)?;
    let (i, system) = take(32usize)(i)?;
    let (i, volume) = take(32usize)(i)?;
    let (i, _unused) = take(8usize)(i)?;
    let (i, space_le) = le_u32(i)?;
    let (i, space_be) = be_u32(i)?;
    let (i, _escapes) = take(32usize)(i)?;
    let (i, _set_size) = take(4usize)(i)?;
    let (i, _seq) = take(4usize)(i)?;
    let (i, block_le) = le_u16(i)?;
    let (i, block_be) = be_u16(i)?;
    Ok((
        i,
        Primary {
            version,
            system_id: text(system),
            volume_id: text(volume),
            space_le,
            space_be,
            block_le,
            block_be,
        },
    ))
}

/// An opened ISO image.
pub struct IsoImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    /// Bytes actually present; reads past them fail.
    file_size: u64,
}

/// Opens an ISO 9660 or UDF image.
///
/// # Errors
/// `Truncated` (`iso.truncated`) when the file ends inside the descriptor area; `Invalid`
/// (`iso.no-primary`) when an ISO 9660 set has no primary descriptor; `Invalid`
/// (`iso.descriptor`) when the primary descriptor is malformed; `Io` on read errors.
///
/// # Security
/// Reads at most 64 KiB (the system area and 16 descriptors), whatever the image declares.
pub fn open(src: Source, limits: &Limits) -> Result<IsoImage> {
    let file_size = src.size()?;
    let head = read_up_to(src.as_ref(), 0, crate::partition::HEAD_LEN)?;
    let area = head.get(DESCRIPTORS_AT..).unwrap_or_default();
    if area.len() < SECTOR {
        return Err(Error::truncated(format!(
            "the file ({file_size} bytes) ends before the first volume descriptor is complete"
        ))
        .at(DESCRIPTORS_AT as u64)
        .code("iso.truncated"));
    }
    let s = scan(area);
    let (mut info, mut findings) = if let Some(rel) = s.primary {
        primary_volume(area, rel, file_size)?
    } else if s.iso9660 {
        return Err(
            Error::invalid("the ISO 9660 descriptor set has no primary volume descriptor")
                .at(DESCRIPTORS_AT as u64)
                .code("iso.no-primary"),
        );
    } else if s.udf {
        // Pure UDF: no ISO 9660 size to trust; like qemu-img, the disc is the whole file.
        (ImageInfo::new(Format::Iso, file_size), Vec::new())
    } else {
        return Err(
            Error::invalid("no ISO 9660 or UDF volume descriptors at sector 16")
                .at(DESCRIPTORS_AT as u64)
                .code("iso.no-primary"),
        );
    };
    if s.iso9660 && !s.terminated {
        findings.push(
            Finding::warn(
                "iso.descriptor",
                "the volume descriptor set has no terminator",
            )
            .at(DESCRIPTORS_AT as u64),
        );
    }
    info.actual_size = src.allocated_size();
    info.detail("joliet", s.joliet);
    info.detail("udf", s.udf);
    info.detail("el-torito", s.el_torito);
    if s.boot_record && !s.el_torito {
        info.detail("boot-record", true);
    }
    hybrid(&head, file_size, limits, &mut info, &mut findings);
    Ok(IsoImage {
        src,
        info,
        findings,
        file_size,
    })
}

/// The primary volume descriptor at `rel` in the descriptor area: block size, volume size
/// and how the file's size compares with the volume's.
fn primary_volume(area: &[u8], rel: usize, file_size: u64) -> Result<(ImageInfo, Vec<Finding>)> {
    let at = (DESCRIPTORS_AT as u64).saturating_add(rel as u64);
    let bytes = area.get(rel..).unwrap_or_default();
    let (_, p) = primary(bytes).map_err(|_| {
        Error::truncated("the primary volume descriptor is cut short")
            .at(at)
            .code("iso.truncated")
    })?;
    if p.version != 1 {
        return Err(Error::invalid(format!(
            "primary volume descriptor version {} (expected 1)",
            p.version
        ))
        .at(at.saturating_add(6))
        .code("iso.descriptor"));
    }
    // ECMA-119 6.1.2 and 8.4.12: 2^n bytes, at least 512, at most the 2048-byte sector.
    // Both halves of a both-endian field must agree, or two readers could disagree.
    if p.block_le != p.block_be || !matches!(p.block_le, 512 | 1024 | 2048) {
        return Err(Error::invalid(format!(
            "logical block size {}/{} (little/big-endian) is not 512, 1024 or 2048",
            p.block_le, p.block_be
        ))
        .at(at.saturating_add(128))
        .code("iso.descriptor"));
    }
    if p.space_le != p.space_be || p.space_le == 0 {
        return Err(Error::invalid(format!(
            "volume space size {}/{} (little/big-endian) is inconsistent or empty",
            p.space_le, p.space_be
        ))
        .at(at.saturating_add(80))
        .code("iso.descriptor"));
    }
    let block = u64::from(p.block_le);
    let vsize = u64::from(p.space_le).saturating_mul(block);
    // The guest disk is the whole file, as qemu (which opens an ISO as raw) and every
    // hypervisor see it: a hybrid ISO may keep a boot partition after the volume.
    let mut info = ImageInfo::new(Format::Iso, file_size);
    let mut findings = Vec::new();
    info.detail("volume-id", p.volume_id);
    info.detail("system-id", p.system_id);
    info.detail("block-size", block);
    info.detail("volume-size", vsize);
    if file_size < vsize {
        findings.push(
            Finding::reject(
                "iso.truncated",
                format!("the volume declares {vsize} bytes but the file has only {file_size}"),
            )
            .at(at.saturating_add(80)),
        );
    } else if let Some(trailing) = file_size.checked_sub(vsize).filter(|t| *t > 0) {
        info.detail("trailing-bytes", trailing);
        // Glance's inspector takes an ISO's size from the volume descriptor; the bytes
        // after it (appended partitions) are still part of the disk, so say they exist.
        findings.push(
            Finding::warn(
                "iso.trailing-data",
                format!(
                    "{trailing} bytes follow the {vsize}-byte ISO volume (appended partitions?); they are part of the guest disk, which is the whole file"
                ),
            )
            .at(vsize),
        );
    }
    Ok((info, findings))
}

/// A hybrid ISO carries an MBR or GPT in its system area so that it also boots as a disk:
/// its partitions join the details, and their findings the image's.
fn hybrid(
    head: &[u8],
    file_size: u64,
    limits: &Limits,
    info: &mut ImageInfo,
    findings: &mut Vec<Finding>,
) {
    let system_area = head.get(..DESCRIPTORS_AT).unwrap_or_default();
    let (parts, part_findings) = crate::partition::describe_with(system_area, file_size, limits);
    let hybrid = parts
        .get("partition-table")
        .and_then(|v| v.as_str())
        .is_some_and(|t| t != "none");
    info.detail("hybrid", hybrid);
    if hybrid {
        for (k, v) in parts {
            info.details.insert(k, v);
        }
        findings.extend(part_findings);
    }
}

impl Image for IsoImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }
    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        // The virtual size is the file size at open; a file that shrank since is truncated.
        if guest >= self.file_size {
            return Err(Error::truncated(format!(
                "guest offset {guest:#x} lies past the end of the file ({} bytes)",
                self.file_size
            ))
            .at(guest)
            .code("iso.truncated"));
        }
        let end = guest.saturating_add(span.min(self.file_size.saturating_sub(guest)));
        crate::io::linear_extent(self.src.as_ref(), guest, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A minimal ISO: primary descriptor, terminator, `blocks` blocks of 2048 bytes.
    fn iso(blocks: u32) -> Vec<u8> {
        let mut b = vec![0u8; (blocks as usize).max(20) * 2048];
        let p = DESCRIPTORS_AT;
        b[p] = VD_PRIMARY;
        b[p + 1..p + 6].copy_from_slice(b"CD001");
        b[p + 6] = 1;
        b[p + 40..p + 72].copy_from_slice(b"TESTVOL                         ");
        b[p + 80..p + 84].copy_from_slice(&blocks.to_le_bytes());
        b[p + 84..p + 88].copy_from_slice(&blocks.to_be_bytes());
        b[p + 128..p + 130].copy_from_slice(&2048u16.to_le_bytes());
        b[p + 130..p + 132].copy_from_slice(&2048u16.to_be_bytes());
        let t = p + 2048;
        b[t] = VD_TERMINATOR;
        b[t + 1..t + 6].copy_from_slice(b"CD001");
        b[t + 6] = 1;
        b
    }

    #[test]
    fn minimal_iso_opens_and_maps() {
        let img = open(Arc::new(iso(32)), &Limits::default()).unwrap();
        assert_eq!(img.info().virtual_size, 32 * 2048);
        assert_eq!(img.info().details["volume-id"], "TESTVOL");
        let e = (&img as &dyn Image).mapping(100, u64::MAX).unwrap();
        crate::image::validate_extent(&e, 100, u64::MAX, 32 * 2048).unwrap();
        assert_eq!(e.len, 32 * 2048 - 100);
    }

    #[test]
    fn bad_block_size_and_mismatched_halves_are_descriptor_errors() {
        let mut b = iso(32);
        b[DESCRIPTORS_AT + 128..DESCRIPTORS_AT + 130].copy_from_slice(&3000u16.to_le_bytes());
        let e = open(Arc::new(b), &Limits::default()).err().unwrap();
        assert_eq!(e.finding_code(), "iso.descriptor");
        let mut b = iso(32);
        b[DESCRIPTORS_AT + 84..DESCRIPTORS_AT + 88].copy_from_slice(&33u32.to_be_bytes());
        let e = open(Arc::new(b), &Limits::default()).err().unwrap();
        assert_eq!(e.finding_code(), "iso.descriptor");
    }

    #[test]
    fn truncated_volume_is_rejected_and_unmapped_past_the_file() {
        let mut b = iso(64);
        b.truncate(40 * 2048);
        let img = open(Arc::new(b), &Limits::default()).unwrap();
        assert_eq!(img.findings()[0].code, "iso.truncated");
        assert_eq!(img.info().virtual_size, 40 * 2048);
        assert_eq!(img.info().details["volume-size"], 64 * 2048);
        assert!((&img as &dyn Image).mapping(40 * 2048, 1).is_err());
        let e = (&img as &dyn Image).mapping(0, u64::MAX).unwrap();
        assert_eq!(e.len, 40 * 2048);
    }

    #[test]
    fn set_without_primary() {
        let mut b = iso(32);
        b[DESCRIPTORS_AT] = VD_SUPPLEMENTARY;
        let e = open(Arc::new(b), &Limits::default()).err().unwrap();
        assert_eq!(e.finding_code(), "iso.no-primary");
    }

    #[test]
    fn pure_udf_is_iso_sized_by_the_file() {
        let mut b = vec![0u8; 64 * 2048];
        for (k, id) in [b"BEA01", b"NSR03", b"TEA01"].iter().enumerate() {
            let o = DESCRIPTORS_AT + k * 2048;
            b[o + 1..o + 6].copy_from_slice(*id);
            b[o + 6] = 1;
        }
        let src: Arc<Vec<u8>> = Arc::new(b);
        assert!(probe(&Probe::new(src.as_ref()).unwrap()));
        let img = open(src, &Limits::default()).unwrap();
        assert_eq!(img.info().virtual_size, 64 * 2048);
        assert_eq!(img.info().details["udf"], true);
    }
}
