//! LUKS encrypted volumes: detected and described, never decrypted.
//!
//! Both versions start with the magic `LUKS\xba\xbe` and a big-endian version number. LUKS1
//! has a fixed 592-byte header with eight key slots; LUKS2 has a 4096-byte binary header
//! followed by a JSON area that describes segments, key slots and digests.
//!
//! The virtual size is the payload size: the file size minus the payload offset, as qemu's
//! `luks` driver reports it. Guest data is encrypted, so `mapping` is unsupported; the policy
//! rejects LUKS as `format.unsupported` anyway.

use nom::bytes::complete::take;
use nom::number::complete::{be_u16, be_u64};
use nom::IResult;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::format::Format;
use crate::image::{Extent, Image, ImageCore, ImageInfo};
use crate::io::{read_vec, Source};
use crate::limits::Limits;
use crate::probe::Probe;
use serde::de::{IgnoredAny, MapAccess, Visitor};

mod luks1;

use luks1::{HEADER_LEN as LUKS1_HEADER, SECTOR as LUKS1_SECTOR};

/// The LUKS magic at offset 0 (both versions).
pub(crate) const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
/// Bytes of the LUKS2 binary header.
const LUKS2_BINARY: u64 = 4096;
/// LUKS2 header sizes allowed by the on-disk format spec (binary header plus JSON area),
/// 16 KiB to 4 MiB in powers of two.
const LUKS2_MIN_HDR: u64 = 16 << 10;
/// The largest LUKS2 header size allowed (4 MiB).
const LUKS2_MAX_HDR: u64 = 4 << 20;

/// True when the head starts with the LUKS magic and version 1 or 2.
pub fn probe(p: &Probe<'_>) -> bool {
    p.starts_with(MAGIC) && matches!(p.head_at(6, 2), Some([0, 1]) | Some([0, 2]))
}

/// A NUL-padded fixed-size string field.
fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(b.get(..end).unwrap_or_default())
        .trim()
        .to_string()
}

/// The LUKS2 binary header fields we use (LUKS2 on-disk format, big-endian).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Luks2 {
    /// Header size in bytes: binary header plus JSON area.
    hdr_size: u64,
    /// Sequence id, incremented on every update.
    seqid: u64,
    /// Label (48 bytes, NUL-padded).
    label: String,
    /// Checksum algorithm, e.g. "sha256" (32 bytes).
    checksum_alg: String,
    /// Volume UUID (40 bytes).
    uuid: String,
    /// Offset of this header copy in bytes (0 for the primary).
    hdr_offset: u64,
    /// Header checksum (64 bytes; the digest's length comes from the algorithm).
    csum: Vec<u8>,
}

fn luks2(i: &[u8]) -> IResult<&[u8], Luks2> {
    let (i, _magic) = take(6usize)(i)?;
    let (i, _version) = be_u16(i)?;
    let (i, hdr_size) = be_u64(i)?;
    let (i, seqid) = be_u64(i)?;
    let (i, label) = take(48usize)(i)?;
    let (i, checksum_alg) = take(32usize)(i)?;
    let (i, _salt) = take(64usize)(i)?;
    let (i, uuid) = take(40usize)(i)?;
    let (i, _subsystem) = take(48usize)(i)?;
    let (i, hdr_offset) = be_u64(i)?;
    let (i, _padding) = take(184usize)(i)?;
    let (i, csum) = take(64usize)(i)?;
    Ok((
        i,
        Luks2 {
            hdr_size,
            seqid,
            label: cstr(label),
            checksum_alg: cstr(checksum_alg),
            uuid: cstr(uuid),
            hdr_offset,
            csum: csum.to_vec(),
        },
    ))
}

/// An opened LUKS volume.
pub struct LuksImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
}

fn header_error(msg: impl Into<String>, at: u64) -> Error {
    Error::invalid(msg).at(at).code("luks.header")
}

/// Opens a LUKS1 or LUKS2 volume's header.
///
/// # Errors
/// `Truncated` (`luks.truncated`) when the header or the payload offset passes the end of the
/// file; `Invalid` (`luks.header`) for a bad magic, version or JSON area, and for a LUKS1
/// header qemu refuses to open (see `luks1`: key slots, iteration counts, algorithm names and
/// key size), with the offset of the field at fault; `LimitExceeded` when
/// the JSON area does not fit the metadata budget; `Io` on read errors.
///
/// # Security
/// Reads the 592-byte LUKS1 header, or the LUKS2 header of at most 4 MiB (its declared size,
/// checked against the spec's range, the file size and the budget). Never decrypts anything.
pub fn open(src: Source, limits: &Limits) -> Result<LuksImage> {
    let size = src.size()?;
    let budget = limits.budget();
    let first = read_vec(
        src.as_ref(),
        0,
        LUKS1_HEADER.min(size),
        &budget,
        "LUKS header",
    )?;
    if first.get(..6) != Some(&MAGIC[..]) {
        return Err(header_error("no LUKS magic at offset 0", 0));
    }
    let version = match first.get(6..8) {
        Some([0, 1]) => 1u16,
        Some([0, 2]) => 2,
        Some(v) => {
            return Err(header_error(
                format!("unknown LUKS version bytes {v:02x?}"),
                6,
            ))
        }
        None => {
            return Err(Error::truncated("LUKS header cut short")
                .at(0)
                .code("luks.truncated"))
        }
    };
    let mut info = ImageInfo::new(Format::Luks, 0);
    let mut findings = Vec::new();
    info.encrypted = true;
    info.actual_size = src.allocated_size();
    info.detail("version", version);
    let payload_offset = if version == 1 {
        let (_, h) = luks1::parse(&first).map_err(|_| {
            Error::truncated("LUKS1 header cut short")
                .at(0)
                .code("luks.truncated")
        })?;
        let payload = u64::from(h.payload_offset).saturating_mul(LUKS1_SECTOR);
        let active: Vec<usize> = h
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active == luks1::SLOT_ENABLED)
            .map(|(k, _)| k)
            .collect();
        info.detail(
            "cipher",
            format!("{}-{}", cstr(&h.cipher_name), cstr(&h.cipher_mode)),
        );
        info.detail("hash", cstr(&h.hash_spec));
        info.detail("uuid", cstr(&h.uuid));
        info.detail("key-bytes", h.key_bytes);
        info.detail("key-slots", active.len());
        info.detail("active-key-slots", active);
        info.detail("payload-offset", payload);
        // What qemu checks before it opens the volume, even without its key.
        luks1::check_layout(&h)?;
        luks1::check_algorithms(&h)?;
        payload
    } else {
        open_luks2(&src, &budget, &mut info, &mut findings)?
    };
    // qemu's luks driver: length = underlying file length - payload offset (block/crypto.c).
    info.virtual_size = size.checked_sub(payload_offset).ok_or_else(|| {
        Error::truncated(format!(
            "the payload offset {payload_offset} lies past the end of the file ({size} bytes)"
        ))
        .at(0)
        .code("luks.truncated")
    })?;
    Ok(LuksImage {
        src,
        info,
        findings,
    })
}

/// Reads the LUKS2 binary header and JSON area; returns the payload offset in bytes.
fn open_luks2(
    src: &Source,
    budget: &crate::limits::Budget,
    info: &mut ImageInfo,
    findings: &mut Vec<Finding>,
) -> Result<u64> {
    let bin = read_vec(src.as_ref(), 0, LUKS2_BINARY, budget, "LUKS2 binary header")
        .map_err(|e| e.code("luks.truncated"))?;
    let (_, h) = luks2(&bin).map_err(|_| {
        Error::truncated("LUKS2 header cut short")
            .at(0)
            .code("luks.truncated")
    })?;
    info.detail("header-size", h.hdr_size);
    info.detail("sequence-id", h.seqid);
    info.detail("label", h.label.clone());
    info.detail("checksum-alg", h.checksum_alg.clone());
    info.detail("uuid", h.uuid.clone());
    if h.hdr_offset != 0 {
        findings.push(
            Finding::warn(
                "luks.header",
                format!("the primary header says it lives at {}", h.hdr_offset),
            )
            .at(256),
        );
    }
    let json = luks2_json(src, budget, &bin, &h, findings)?;
    luks2_segment(&json, h.hdr_size, info)
}

/// The JSON area after the binary header: its size checked, the sha256 header checksum
/// verified (a mismatch is a finding), parsed.
fn luks2_json(
    src: &Source,
    budget: &crate::limits::Budget,
    bin: &[u8],
    h: &Luks2,
    findings: &mut Vec<Finding>,
) -> Result<Luks2Json> {
    let json_len = h
        .hdr_size
        .checked_sub(LUKS2_BINARY)
        .filter(|_| (LUKS2_MIN_HDR..=LUKS2_MAX_HDR).contains(&h.hdr_size))
        .filter(|_| h.hdr_size.is_power_of_two())
        .ok_or_else(|| {
            header_error(
                format!(
                    "LUKS2 header size {} is not a power of two in 16 KiB..4 MiB",
                    h.hdr_size
                ),
                8,
            )
        })?;
    let json_area = read_vec(
        src.as_ref(),
        LUKS2_BINARY,
        json_len,
        budget,
        "LUKS2 JSON area",
    )
    .map_err(|e| e.code("luks.truncated"))?;
    if h.checksum_alg == "sha256" {
        let mut zeroed = bin.to_vec();
        if let Some(c) = zeroed.get_mut(448..512) {
            c.fill(0);
        }
        let mut d = Sha256::new();
        d.update(&zeroed);
        d.update(&json_area);
        if d.finalize().as_slice() != h.csum.get(..32).unwrap_or_default() {
            findings.push(
                Finding::warn(
                    "luks.checksum",
                    "the LUKS2 header checksum (sha256) does not match",
                )
                .at(448),
            );
        }
    }
    let end = json_area
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(json_area.len());
    let text = json_area.get(..end).unwrap_or_default();
    serde_json::from_slice(text).map_err(|e| {
        header_error(
            format!("the LUKS2 JSON area does not parse: {e}"),
            LUKS2_BINARY,
        )
    })
}

/// Segment 0 (or the first segment): the payload offset, which must lie past the header,
/// plus the cipher, digest hash and key-slot count for the details.
fn luks2_segment(json: &Luks2Json, hdr_size: u64, info: &mut ImageInfo) -> Result<u64> {
    let Some(seg) = json.segments.chosen.as_ref().map(|(_, s)| s) else {
        return Err(header_error(
            "the LUKS2 JSON area has no segment",
            LUKS2_BINARY,
        ));
    };
    let offset = seg
        .offset
        .as_deref()
        .and_then(|o| o.parse::<u64>().ok())
        .ok_or_else(|| header_error("LUKS2 segment 0 has no numeric offset", LUKS2_BINARY))?;
    if let Some(cipher) = &seg.encryption {
        info.detail("cipher", cipher.as_str());
    }
    if let Some(seg_size) = &seg.size {
        info.detail("segment-size", seg_size.as_str());
    }
    if let Some(hash) = json
        .digests
        .chosen
        .as_ref()
        .and_then(|(_, d)| d.hash.as_ref())
    {
        info.detail("hash", hash.as_str());
    }
    info.detail("key-slots", json.keyslots.count());
    info.detail("payload-offset", offset);
    if offset < hdr_size {
        return Err(header_error(
            format!("payload offset {offset} overlaps the header"),
            LUKS2_BINARY,
        ));
    }
    Ok(offset)
}

/// What glimpse reads of a LUKS2 JSON area. Everything else is skipped as it is parsed
/// (`IgnoredAny` allocates nothing), so a 4 MiB area of `[0,0,0,...]` costs nothing beyond its
/// text: parsed into a `serde_json::Value` it took 105 MB. It reads what a `Value` would have
/// shown: a member of an unexpected type is as if absent, and of a repeated key the last wins.
#[derive(Debug, Default)]
struct Luks2Json {
    segments: First,
    digests: First,
    keyslots: Keys,
}

/// The string members of a segment or a digest that glimpse reports.
#[derive(Debug, Default)]
struct Fields {
    offset: Option<String>,
    encryption: Option<String>,
    size: Option<String>,
    hash: Option<String>,
}

/// The member `"0"` of a JSON object, else its first by key (the order of `serde_json`'s
/// map); every other member is skipped unread.
#[derive(Debug, Default)]
struct First {
    chosen: Option<(String, Fields)>,
}

/// How many distinct keys a JSON object has (a repeated key counts once, as in a map),
/// remembering at most [`MAX_KEYS`] of them: past that, every further key counts.
#[derive(Debug, Default)]
struct Keys {
    seen: std::collections::BTreeSet<String>,
    more: usize,
}

/// Keys [`Keys`] remembers to count repeats: LUKS2 has at most 32 key slots.
const MAX_KEYS: usize = 256;

impl Keys {
    fn count(&self) -> usize {
        self.seen.len().saturating_add(self.more)
    }
}

/// A JSON string, or `None` for a value of any other type.
#[derive(Debug, Default)]
struct MaybeStr(Option<String>);

/// A key of a JSON object, borrowed from the text when it has no escape.
type Key<'de> = std::borrow::Cow<'de, str>;

/// A value read from a JSON object: `Default` (after skipping it) for any other JSON value.
trait FromObject: Default {
    fn from_object<'de, A: MapAccess<'de>>(map: A) -> std::result::Result<Self, A::Error>;
    fn from_text(_: &str) -> Self {
        Self::default()
    }
}

/// The visitor of a [`FromObject`]: objects are read, everything else skipped.
struct Lenient<T>(std::marker::PhantomData<T>);

impl<'de, T: FromObject> Visitor<'de> for Lenient<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> std::result::Result<T, A::Error> {
        T::from_object(map)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> std::result::Result<T, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(T::default())
    }
    fn visit_str<E>(self, s: &str) -> std::result::Result<T, E> {
        Ok(T::from_text(s))
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<T, E> {
        Ok(T::default())
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<T, E> {
        Ok(T::default())
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<T, E> {
        Ok(T::default())
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E>(self) -> std::result::Result<T, E> {
        Ok(T::default())
    }
}

/// `Deserialize` for each [`FromObject`] type, through [`Lenient`].
macro_rules! lenient {
    ($($t:ty),*) => {$(
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(
                d: D,
            ) -> std::result::Result<Self, D::Error> {
                d.deserialize_any(Lenient(std::marker::PhantomData))
            }
        }
    )*};
}
lenient!(Luks2Json, Fields, First, Keys, MaybeStr);

impl FromObject for MaybeStr {
    fn from_object<'de, A: MapAccess<'de>>(map: A) -> std::result::Result<Self, A::Error> {
        IgnoredAny.visit_map(map)?;
        Ok(MaybeStr(None))
    }
    fn from_text(s: &str) -> Self {
        MaybeStr(Some(s.to_owned()))
    }
}

impl FromObject for Luks2Json {
    fn from_object<'de, A: MapAccess<'de>>(mut map: A) -> std::result::Result<Self, A::Error> {
        let mut out = Luks2Json::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match key.as_ref() {
                "segments" => out.segments = map.next_value()?,
                "digests" => out.digests = map.next_value()?,
                "keyslots" => out.keyslots = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(out)
    }
}

impl FromObject for Fields {
    fn from_object<'de, A: MapAccess<'de>>(mut map: A) -> std::result::Result<Self, A::Error> {
        let mut out = Fields::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let slot = match key.as_ref() {
                "offset" => &mut out.offset,
                "encryption" => &mut out.encryption,
                "size" => &mut out.size,
                "hash" => &mut out.hash,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = map.next_value::<MaybeStr>()?.0;
        }
        Ok(out)
    }
}

impl FromObject for First {
    fn from_object<'de, A: MapAccess<'de>>(mut map: A) -> std::result::Result<Self, A::Error> {
        let mut out = First::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            // "0" wins over any other key, then the least key; of a repeated key, the last.
            let wanted = match &out.chosen {
                None => true,
                Some((k, _)) if k == "0" => key == "0",
                Some((k, _)) => key == "0" || key.as_ref() <= k.as_str(),
            };
            if wanted {
                let v: Fields = map.next_value()?;
                out.chosen = Some((key.into_owned(), v));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

impl FromObject for Keys {
    fn from_object<'de, A: MapAccess<'de>>(mut map: A) -> std::result::Result<Self, A::Error> {
        let mut out = Keys::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            map.next_value::<IgnoredAny>()?;
            if out.seen.contains(key.as_ref()) {
                continue;
            }
            if out.seen.len() < MAX_KEYS {
                out.seen.insert(key.into_owned());
            } else {
                out.more = out.more.saturating_add(1);
            }
        }
        Ok(out)
    }
}

impl Image for LuksImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }
    fn extent_at(&self, guest: u64, _span: u64) -> Result<Extent> {
        Err(Error::unsupported("LUKS guest data is encrypted and cannot be mapped").at(guest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    pub(crate) fn luks2_image(json: &str, total: usize) -> Vec<u8> {
        let mut b = vec![0u8; total];
        b[..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[8..16].copy_from_slice(&16384u64.to_be_bytes());
        b[16..24].copy_from_slice(&7u64.to_be_bytes());
        b[24..29].copy_from_slice(b"label");
        b[72..78].copy_from_slice(b"sha256");
        b[168..172].copy_from_slice(b"uuid");
        b[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
        let mut d = Sha256::new();
        d.update(&b[..16384]);
        let sum = d.finalize();
        b[448..480].copy_from_slice(&sum);
        b
    }

    const JSON: &str = r#"{"keyslots":{"0":{}},"segments":{"0":{"type":"crypt","offset":"32768","size":"dynamic","encryption":"aes-xts-plain64"}},"digests":{"0":{"hash":"sha256"}},"config":{}}"#;

    #[test]
    fn luks2_minimal_header() {
        let img = open(Arc::new(luks2_image(JSON, 65536)), &Limits::default()).unwrap();
        assert_eq!(img.info().virtual_size, 65536 - 32768);
        assert_eq!(img.info().details["cipher"], "aes-xts-plain64");
        assert!(img.findings().is_empty(), "{:?}", img.findings());
        assert!(img.info().encrypted);
        assert_eq!(
            (&img as &dyn Image).mapping(0, 1).unwrap_err().kind(),
            crate::error::ErrorKind::Unsupported
        );
    }

    #[test]
    fn luks2_checksum_and_header_size() {
        let mut b = luks2_image(JSON, 65536);
        b[4200] ^= 1;
        let img = open(Arc::new(b), &Limits::default()).unwrap();
        assert_eq!(img.findings()[0].code, "luks.checksum");
        let mut b = luks2_image(JSON, 65536);
        b[8..16].copy_from_slice(&12345u64.to_be_bytes());
        assert_eq!(
            open(Arc::new(b), &Limits::default())
                .err()
                .unwrap()
                .finding_code(),
            "luks.header"
        );
        let b = luks2_image(JSON, 20000);
        assert_eq!(
            open(Arc::new(b), &Limits::default())
                .err()
                .unwrap()
                .finding_code(),
            "luks.truncated"
        );
    }
}
