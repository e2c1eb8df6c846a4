//! The header section: file identifier, the two headers, and the CRC-32C they share with the
//! region tables, the metadata and the log.
//!
//! Facts from qemu's `block/vhdx.h`/`block/vhdx.c` (which follow Microsoft's VHDX 1.0
//! specification): the first 1 MiB holds the file identifier at 0, header 1 at 64 KiB,
//! header 2 at 128 KiB, and the region tables at 192 KiB and 256 KiB.

use nom::number::complete::{le_u16, le_u32, le_u64};
use nom::Parser;

use crate::error::{Error, Result};

/// "vhdxfile": the file type identifier at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// "head": header signature.
pub const HEADER_SIGNATURE: u32 = u32::from_le_bytes(*b"head");
/// Offset of header 1 (64 KiB).
pub const HEADER1_OFFSET: u64 = 64 * 1024;
/// Offset of header 2 (128 KiB).
pub const HEADER2_OFFSET: u64 = 128 * 1024;
/// Bytes of a header covered by its checksum: the first 4 KiB of its 64 KiB block.
pub const HEADER_SIZE: usize = 4096;
/// Byte offset of the checksum field in headers, region tables and log entries.
pub const CHECKSUM_OFFSET: usize = 4;
/// The header section ends at 1 MiB; nothing else may live there.
pub const HEADER_SECTION_END: u64 = 1 << 20;
/// Bytes of the creator field after the signature (256 UTF-16 code units).
const CREATOR_BYTES: usize = 512;

/// A GUID as stored on disk (Microsoft layout: data1 LE u32, data2 LE u16, data3 LE u16,
/// data4 8 bytes). Compared byte for byte, as qemu does.
pub type Guid = [u8; 16];

/// Builds the on-disk bytes of a GUID written as `data1-data2-data3-data4`.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// The all-zero GUID ("no log").
pub const NIL_GUID: Guid = [0; 16];

/// CRC-32C of `buf` with the 4-byte checksum field at `crc_offset` taken as zero.
pub fn checksum(buf: &[u8], crc_offset: usize) -> u32 {
    let head = buf.get(..crc_offset).unwrap_or(buf);
    let tail = buf.get(crc_offset.saturating_add(4)..).unwrap_or_default();
    let crc = crc32c::crc32c(head);
    let crc = crc32c::crc32c_append(crc, &[0u8; 4]);
    crc32c::crc32c_append(crc, tail)
}

/// True when the stored little-endian checksum at `crc_offset` matches the contents.
pub fn checksum_ok(buf: &[u8], crc_offset: usize) -> bool {
    let stored = buf
        .get(crc_offset..crc_offset.saturating_add(4))
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes);
    stored == Some(checksum(buf, crc_offset))
}

/// Maps a nom error on a buffer read at `base` to our error with the byte offset.
pub fn nom_err(
    what: &str,
    base: u64,
    buf_len: usize,
    e: nom::Err<nom::error::Error<&[u8]>>,
) -> Error {
    let consumed = match &e {
        nom::Err::Error(inner) | nom::Err::Failure(inner) => {
            buf_len.saturating_sub(inner.input.len())
        }
        nom::Err::Incomplete(_) => buf_len,
    };
    Error::truncated(format!("{what}: structure ends early"))
        .at(base.saturating_add(consumed as u64))
}

/// Decodes a UTF-16LE string, stopping at the first NUL; invalid units become U+FFFD.
pub fn utf16(bytes: &[u8]) -> String {
    let units = bytes
        .chunks_exact(2)
        .map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .take_while(|&u| u != 0);
    char::decode_utf16(units)
        .map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// The creator string of the file identifier ("diagnostic only" per the spec).
pub fn creator(file_id: &[u8]) -> String {
    let end = FILE_SIGNATURE.len().saturating_add(CREATOR_BYTES);
    utf16(file_id.get(FILE_SIGNATURE.len()..end).unwrap_or_default())
}

/// One parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which copy (0 = at 64 KiB, 1 = at 128 KiB).
    pub index: usize,
    /// Source offset of the header.
    pub offset: u64,
    /// "Seq number of this header": the valid header with the higher one is current.
    pub sequence: u64,
    /// File write GUID and data write GUID, kept to compare two copies.
    pub write_guids: [u8; 32],
    /// "If zero, there is no valid log. If non-zero, log entries with this guid are valid."
    pub log_guid: Guid,
    /// Version of the log format (must be 0 when `log_guid` is zero).
    pub log_version: u16,
    /// Version of the file format; only 1 exists.
    pub version: u16,
    /// Length of the log in bytes, a multiple of 1 MiB.
    pub log_length: u32,
    /// Byte offset of the log in the file, a multiple of 1 MiB.
    pub log_offset: u64,
}

/// Why a header copy was not usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderFault {
    /// The signature is not "head".
    Signature,
    /// The CRC-32C does not match.
    Checksum,
    /// The version is not 1.
    Version,
}

/// Parses one 4 KiB header buffer read at `offset`.
///
/// # Errors
/// The fault that makes the copy unusable: signature, checksum or version, in qemu's order
/// (checksum first, then signature and version).
pub fn parse_header(
    buf: &[u8],
    offset: u64,
    index: usize,
) -> std::result::Result<Header, HeaderFault> {
    if buf.len() < HEADER_SIZE
        || !checksum_ok(buf.get(..HEADER_SIZE).unwrap_or_default(), CHECKSUM_OFFSET)
    {
        return Err(HeaderFault::Checksum);
    }
    let parsed: nom::IResult<&[u8], _> = (
        le_u32,
        le_u32,
        le_u64,
        nom::bytes::complete::take(32usize),
        nom::bytes::complete::take(16usize),
        le_u16,
        le_u16,
        le_u32,
        le_u64,
    )
        .parse(buf);
    let Ok((
        _,
        (sig, _crc, sequence, guids, log_guid, log_version, version, log_length, log_offset),
    )) = parsed
    else {
        return Err(HeaderFault::Checksum);
    };
    if sig != HEADER_SIGNATURE {
        return Err(HeaderFault::Signature);
    }
    if version != 1 {
        return Err(HeaderFault::Version);
    }
    let log_guid = <[u8; 16]>::try_from(log_guid).map_err(|_| HeaderFault::Checksum)?;
    let write_guids = <[u8; 32]>::try_from(guids).map_err(|_| HeaderFault::Checksum)?;
    Ok(Header {
        index,
        offset,
        sequence,
        write_guids,
        log_guid,
        log_version,
        version,
        log_length,
        log_offset,
    })
}

/// Picks the current header from the two copies, as qemu does: the only valid one, or the
/// valid one with the higher sequence number. Two valid copies with equal sequence numbers
/// are accepted only when identical (Disk2VHD writes them so); otherwise the file is corrupt.
///
/// # Errors
/// `Corrupt` (`vhdx.header-checksum`) when neither copy is valid or the two disagree with
/// equal sequence numbers.
pub fn select(
    h1: std::result::Result<Header, HeaderFault>,
    h2: std::result::Result<Header, HeaderFault>,
) -> Result<Header> {
    match (h1, h2) {
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(f1), Err(f2)) => Err(Error::corrupt(format!(
            "no valid VHDX header (header 1: {}, header 2: {})",
            fault_name(f1),
            fault_name(f2)
        ))
        .at(HEADER1_OFFSET)
        .code("vhdx.header-checksum")),
        (Ok(a), Ok(b)) => {
            if a.sequence > b.sequence {
                Ok(a)
            } else if b.sequence > a.sequence {
                Ok(b)
            } else if (Header {
                index: 0,
                offset: 0,
                ..a.clone()
            }) == (Header {
                index: 0,
                offset: 0,
                ..b.clone()
            }) {
                Ok(a)
            } else {
                Err(Error::corrupt(
                    "both VHDX headers are valid with the same sequence number but differ",
                )
                .at(HEADER1_OFFSET)
                .code("vhdx.header-checksum"))
            }
        }
    }
}

/// A short name for a header fault, for messages.
pub fn fault_name(f: HeaderFault) -> &'static str {
    match f {
        HeaderFault::Signature => "bad signature",
        HeaderFault::Checksum => "bad checksum",
        HeaderFault::Version => "unsupported version",
    }
}
