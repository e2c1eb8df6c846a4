//! The qcow2 header (first cluster) and its extensions.
//!
//! Field meanings and units follow `docs/interop/qcow2.rst` in qemu; limits follow what
//! `block/qcow2.c` enforces at open ("if QEMU rejects this, we can, too").

use nom::number::complete::{be_u32, be_u64, u8 as nom_u8};
use nom::Parser;

use crate::error::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of the version 2 header in bytes (version 3 headers declare their own).
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header: fields through `header_length`.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The version 3 header qemu writes: fields through `compression_type`, padded to 8 bytes.
pub const V3_HEADER_LEN: u32 = 112;
/// Refcount order of version 2 images (16-bit refcounts), and qemu's default.
pub const DEFAULT_REFCOUNT_ORDER: u32 = 4;
/// Smallest cluster: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// QEMU's implementation limit: 2 MiB clusters.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need clusters of at least 16 KiB.
pub const MIN_EXTL2_CLUSTER_BITS: u32 = 14;
/// QEMU's `QCOW_MAX_REFTABLE_SIZE`: 8 MiB of refcount table.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's `QCOW_MAX_L1_SIZE`: 32 MiB of L1 table.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`: 1 KiB per bitmap at most.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// The spec: backing file names are at most 1023 bytes.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bit 0: refcounts may be inconsistent (lazy refcounts in use).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: any structure may be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest clusters live in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: `compression_type` is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: 128-bit L2 entries with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this reader understands.
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent. A program without bitmap support
/// clears it when it writes the image, and qemu then ignores the extension
/// (`qcow2_read_extensions`).
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit 1: the external data file is a consistent raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name string.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name string.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The fixed header fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Version number (valid values are 2 and 3).
    pub version: u32,
    /// Offset into the image file of the backing file name (not NUL terminated); 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes (at most 1023).
    pub backing_file_size: u32,
    /// Bits used for addressing an offset within a cluster (cluster size = 1 << bits).
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 for no encryption, 1 for AES, 2 for LUKS.
    pub crypt_method: u32,
    /// Number of entries in the active L1 table.
    pub l1_size: u32,
    /// Offset into the image file of the active L1 table (cluster aligned).
    pub l1_table_offset: u64,
    /// Offset into the image file of the refcount table (cluster aligned).
    pub refcount_table_offset: u64,
    /// Number of clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// Number of snapshots contained in the image.
    pub nb_snapshots: u32,
    /// Offset into the image file of the snapshot table (cluster aligned).
    pub snapshots_offset: u64,
    /// Bitmask of incompatible features (v3; 0 for v2).
    pub incompatible_features: u64,
    /// Bitmask of compatible features (v3; 0 for v2).
    pub compatible_features: u64,
    /// Bitmask of auto-clear features (v3; 0 for v2).
    pub autoclear_features: u64,
    /// Refcount width is `1 << refcount_order` bits (4 for v2).
    pub refcount_order: u32,
    /// Length of the header structure in bytes (72 for v2).
    pub header_length: u32,
    /// Compression method for compressed clusters: 0 deflate ("zlib"), 1 zstd.
    pub compression_type: u8,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits.min(63)
    }
    /// True for a version 3 `header_length` that is not a multiple of 8: the specification
    /// forbids it, qemu opens it.
    pub fn misaligned_length(&self) -> bool {
        self.version >= 3 && self.header_length % 8 != 0
    }
    /// True when L2 entries are 128-bit with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    /// Refcount entry width in bits.
    pub fn refcount_bits(&self) -> u64 {
        1u64 << self.refcount_order.min(6)
    }
}

fn nom_err(what: &str, offset: u64) -> Error {
    Error::truncated(format!("qcow2 header: {what} is cut short")).at(offset)
}

/// Parses the fixed header from `buf` (the start of the file). Checks magic, version,
/// cluster bits, header length, refcount order, feature bits and compression type, in the
/// order qemu does.
///
/// # Errors
/// `Truncated` when `buf` is shorter than the header; `Invalid`/`Unsupported` with a
/// `qcow2.*` code for a bad field.
pub fn parse(buf: &[u8]) -> Result<Header> {
    let (rest, mut h) = parse_v2(buf)?;
    if h.version == 3 {
        parse_v3(rest, &mut h)?;
    }
    check_features(&h)?;
    Ok(h)
}

/// The version 2 fields, with the magic, version and cluster bits checked; the rest of `buf`.
fn parse_v2(buf: &[u8]) -> Result<(&[u8], Header)> {
    let fixed = (
        be_u32::<&[u8], nom::error::Error<&[u8]>>,
        be_u32,
        be_u64,
        be_u32,
        be_u32,
        be_u64,
        be_u32,
        be_u32,
        be_u64,
        be_u64,
        be_u32,
        be_u32,
        be_u64,
    )
        .parse(buf);
    let Ok((rest, f)) = fixed else {
        return Err(nom_err("the version 2 fields", 0));
    };
    let (magic, version, bfo, bfs, cbits, size, crypt, l1s, l1o, rto, rtc, nbs, so) = f;
    if magic.to_be_bytes() != MAGIC {
        return Err(Error::invalid("not a qcow2 image (bad magic)")
            .at(0)
            .code("format.invalid"));
    }
    if !(2..=3).contains(&version) {
        return Err(
            Error::unsupported(format!("qcow2 version {version} (only 2 and 3 exist)"))
                .at(4)
                .code("qcow2.version"),
        );
    }
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cbits) {
        return Err(
            Error::invalid(format!("cluster_bits {cbits} is outside 9..=21"))
                .at(20)
                .code("qcow2.cluster-bits"),
        );
    }
    let h = Header {
        version,
        backing_file_offset: bfo,
        backing_file_size: bfs,
        cluster_bits: cbits,
        size,
        crypt_method: crypt,
        l1_size: l1s,
        l1_table_offset: l1o,
        refcount_table_offset: rto,
        refcount_table_clusters: rtc,
        nb_snapshots: nbs,
        snapshots_offset: so,
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: DEFAULT_REFCOUNT_ORDER,
        header_length: V2_HEADER_LEN,
        compression_type: 0,
    };
    Ok((rest, h))
}

/// The version 3 fields after the version 2 ones (`rest`), into `h`.
fn parse_v3(rest: &[u8], h: &mut Header) -> Result<()> {
    let v3: nom::IResult<&[u8], (u64, u64, u64, u32, u32)> =
        (be_u64, be_u64, be_u64, be_u32, be_u32).parse(rest);
    let Ok((rest, (inc, comp, auto, ro, hl))) = v3 else {
        return Err(nom_err("the version 3 fields", 72));
    };
    // qemu refuses only a length outside 104..=cluster size; one that is not a multiple of
    // 8 (the spec's rule) it opens, so the image is opened here too, for its references,
    // and [`Header::misaligned_length`] makes it a rejecting finding.
    if hl < V3_MIN_HEADER_LEN || u64::from(hl) > h.cluster_size() {
        return Err(Error::invalid(format!(
            "header_length {hl} must be a multiple of 8 between 104 and the cluster size"
        ))
        .at(100)
        .code("qcow2.header-length"));
    }
    h.incompatible_features = inc;
    h.compatible_features = comp;
    h.autoclear_features = auto;
    h.refcount_order = ro;
    h.header_length = hl;
    if hl > V3_MIN_HEADER_LEN {
        let r: nom::IResult<&[u8], u8> = nom_u8(rest);
        let Ok((_, ct)) = r else {
            return Err(nom_err("compression_type", 104));
        };
        h.compression_type = ct;
    }
    Ok(())
}

/// The refcount order, feature bits, compression type and encryption method, in qemu's
/// order.
fn check_features(h: &Header) -> Result<()> {
    if h.refcount_order > 6 {
        return Err(
            Error::invalid(format!("refcount_order {} exceeds 6", h.refcount_order))
                .at(96)
                .code("qcow2.refcount-order"),
        );
    }
    let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(
            Error::unsupported(format!("unknown incompatible feature bits {unknown:#x}"))
                .at(72)
                .code("qcow2.unknown-incompatible-feature"),
        );
    }
    // qemu (validate_compression_type): the bit and the field must agree, and only zlib and
    // zstd exist.
    let bit = h.incompatible_features & INCOMPAT_COMPRESSION != 0;
    if h.compression_type > 1 || bit != (h.compression_type != 0) {
        return Err(Error::invalid(format!(
            "compression_type {} does not agree with incompatible bit 3 ({bit}) or is unknown",
            h.compression_type
        ))
        .at(104)
        .code("qcow2.compression-type"));
    }
    if h.extended_l2() && h.cluster_bits < MIN_EXTL2_CLUSTER_BITS {
        return Err(Error::invalid(format!(
            "extended L2 entries need clusters of at least 16 KiB (cluster_bits {})",
            h.cluster_bits
        ))
        .at(20)
        .code("qcow2.cluster-bits"));
    }
    if h.crypt_method > 2 {
        return Err(
            Error::invalid(format!("unknown crypt_method {}", h.crypt_method))
                .at(32)
                .code("qcow2.encrypted"),
        );
    }
    Ok(())
}

/// The bitmaps extension's fields (`docs/interop/qcow2.rst`, "Bitmaps extension").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the bitmap directory.
    pub nb_bitmaps: u32,
    /// Reserved, must be zero (qemu refuses the image otherwise).
    pub reserved: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset into the image file of the bitmap directory (cluster aligned).
    pub directory_offset: u64,
}

/// What the header extensions say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format name, and where it is stored.
    pub backing_format: Option<(String, u64)>,
    /// External data file name, and where it is stored.
    pub data_file: Option<(String, u64)>,
    /// Full disk encryption header: (offset, length) in bytes.
    pub crypto: Option<(u64, u64)>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Feature name table present.
    pub feature_table: bool,
}

fn string(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Walks the header extensions in `cluster` (the first cluster, or as much of it as the file
/// holds) from `start` up to `end` (exclusive; the cluster size, or the backing file name's
/// offset when it is smaller, as qemu does).
///
/// # Errors
/// `Invalid` with `qcow2.header-extension` when an extension runs past `end` or a known one
/// is malformed; `Truncated` when the file ends inside the area.
pub fn parse_extensions(cluster: &[u8], start: u64, end: u64) -> Result<Extensions> {
    let mut ext = Extensions::default();
    let mut off = start;
    let bad = |msg: String, at: u64| Error::invalid(msg).at(at).code("qcow2.header-extension");
    // Each step advances by at least 8 bytes, so the loop is bounded by the cluster size.
    while off < end {
        let hdr_end = off
            .checked_add(8)
            .ok_or_else(|| bad("extension offset overflows".into(), off))?;
        if hdr_end > end {
            return Err(bad(
                format!("header extension at {off:#x} overruns the first cluster"),
                off,
            ));
        }
        let head = slice(cluster, off, 8)?;
        let r: nom::IResult<&[u8], (u32, u32)> = (be_u32, be_u32).parse(head);
        let Ok((_, (typ, len))) = r else {
            return Err(nom_err("header extension", off));
        };
        // qemu checks the length before the type, the end marker's too ("Header extension
        // too large"): a huge length there makes the image unopenable.
        let data_end = hdr_end
            .checked_add(u64::from(len))
            .filter(|e| *e <= end)
            .ok_or_else(|| {
                bad(
                    format!("header extension {typ:#x} ({len} bytes) overruns the first cluster"),
                    off,
                )
            })?;
        if typ == EXT_END {
            break;
        }
        let data = slice(cluster, hdr_end, u64::from(len))?;
        match typ {
            EXT_BACKING_FORMAT => ext.backing_format = Some((string(data), hdr_end)),
            EXT_DATA_FILE => ext.data_file = Some((string(data), hdr_end)),
            EXT_FEATURE_TABLE => {
                if len % 48 != 0 {
                    return Err(bad(
                        format!("feature name table length {len} is not a multiple of 48"),
                        off,
                    ));
                }
                ext.feature_table = true;
            }
            EXT_CRYPTO => {
                let r: nom::IResult<&[u8], (u64, u64)> = (be_u64, be_u64).parse(data);
                match r {
                    Ok((_, v)) if len == 16 => ext.crypto = Some(v),
                    _ => {
                        return Err(bad(
                            format!("encryption header extension has length {len}, not 16"),
                            off,
                        ))
                    }
                }
            }
            EXT_BITMAPS => {
                let r: nom::IResult<&[u8], (u32, u32, u64, u64)> =
                    (be_u32, be_u32, be_u64, be_u64).parse(data);
                match r {
                    Ok((_, (n, r, sz, o))) if len == 24 => {
                        ext.bitmaps = Some(BitmapsExt {
                            nb_bitmaps: n,
                            reserved: r,
                            directory_size: sz,
                            directory_offset: o,
                        })
                    }
                    _ => {
                        return Err(bad(
                            format!("bitmaps extension has length {len}, not 24"),
                            off,
                        ))
                    }
                }
            }
            _ => {}
        }
        // Data is padded to a multiple of 8.
        off = data_end
            .checked_add(7)
            .map(|e| e & !7)
            .ok_or_else(|| bad("extension offset overflows".into(), off))?;
    }
    Ok(ext)
}

/// `len` bytes of `buf` at `off`, or `Truncated`.
pub fn slice(buf: &[u8], off: u64, len: u64) -> Result<&[u8]> {
    let s = usize::try_from(off).ok();
    let e = off.checked_add(len).and_then(|e| usize::try_from(e).ok());
    s.zip(e).and_then(|(s, e)| buf.get(s..e)).ok_or_else(|| {
        Error::truncated(format!("{len} bytes at {off:#x} pass the end of the data")).at(off)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_stop_at_end_marker_and_reject_overruns() {
        let mut c = vec![0u8; 512];
        c[112..116].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        c[116..120].copy_from_slice(&3u32.to_be_bytes());
        c[120..123].copy_from_slice(b"raw");
        let e = parse_extensions(&c, 112, 512).unwrap();
        assert_eq!(e.backing_format, Some(("raw".to_string(), 120)));
        c[116..120].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(
            parse_extensions(&c, 112, 512).unwrap_err().finding_code(),
            "qcow2.header-extension"
        );
        assert_eq!(
            parse_extensions(&c, 508, 512).unwrap_err().finding_code(),
            "qcow2.header-extension"
        );
    }

    #[test]
    fn the_end_markers_length_is_checked_as_qemu_checks_it() {
        // The end marker (type 0) at 112, its length what is left of the area or more: qemu
        // checks the length before the type ("Header extension too large").
        let mut c = vec![0u8; 512];
        for (len, ok) in [(0u32, true), (392, true), (393, false), (u32::MAX, false)] {
            c[116..120].copy_from_slice(&len.to_be_bytes());
            let r = parse_extensions(&c, 112, 512);
            assert_eq!(r.is_ok(), ok, "{len}");
            if !ok {
                assert_eq!(r.unwrap_err().finding_code(), "qcow2.header-extension");
            }
        }
    }
}
