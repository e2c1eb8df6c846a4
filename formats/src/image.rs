//! What an opened image is: [`ImageInfo`], references, and the [`Image`] trait with its one
//! `mapping` call that everything downstream is built on.

use serde::Serialize;

use crate::error::Result;
use crate::finding::Finding;
use crate::format::Format;
use crate::io::Source;
use crate::limits::Limits;

/// What kind of outside file an image refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefKind {
    /// qcow2 backing file, VMDK parent.
    BackingFile,
    /// qcow2 external data file.
    DataFile,
    /// A VMDK extent in another file.
    Extent,
    /// A VHD/VHDX parent locator.
    ParentLocator,
    /// An OVF `href` outside the archive.
    Href,
}

/// A reference an image makes to another file. Reported, never opened.
///
/// Serialized with its fields and, for the kinds qemu follows (backing file, data file,
/// extent), `resolved`: the local paths qemu opens for the name ([`crate::refname::resolve`])
/// when they differ from the name as stored, and `unresolved: true` when the name could not be
/// resolved with confidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// What kind of reference.
    pub kind: RefKind,
    /// The name or path exactly as the image states it (lossily decoded).
    pub target: String,
    /// The format the image says the target has, if it says.
    pub format: Option<String>,
    /// Where in the file the reference is stored.
    pub offset: Option<u64>,
}

impl Reference {
    /// The local paths qemu opens for this reference ([`crate::refname::resolve`]).
    pub fn resolved(&self) -> crate::refname::Resolved {
        crate::refname::resolve(self.kind, &self.target)
    }
}

impl Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let followed = matches!(
            self.kind,
            RefKind::BackingFile | RefKind::DataFile | RefKind::Extent
        );
        let r = followed.then(|| self.resolved());
        let paths: Vec<&str> = r
            .as_ref()
            .map(|r| r.paths.iter().map(|p| p.path.as_str()).collect())
            .unwrap_or_default();
        let differs = r.is_some()
            && paths != [self.target.as_str()]
            && !(paths.is_empty() && self.target.is_empty());
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("kind", &self.kind)?;
        m.serialize_entry("target", &self.target)?;
        if let Some(f) = &self.format {
            m.serialize_entry("format", f)?;
        }
        if let Some(o) = &self.offset {
            m.serialize_entry("offset", o)?;
        }
        if differs {
            m.serialize_entry("resolved", &paths)?;
        }
        if r.as_ref().is_some_and(|r| !r.certain) {
            m.serialize_entry("unresolved", &true)?;
        }
        m.end()
    }
}

/// What `open` learns from an image's metadata.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageInfo {
    /// The format.
    pub format: Format,
    /// Size of the guest disk in bytes.
    pub virtual_size: u64,
    /// Host bytes allocated to the file, when known.
    pub actual_size: Option<u64>,
    /// Cluster, grain or block size in bytes, where the format has one.
    pub cluster_size: Option<u64>,
    /// The format's "dirty"/"in use" state, where it has one.
    pub dirty: Option<bool>,
    /// Whether guest data is encrypted (then the reader cannot see it).
    pub encrypted: bool,
    /// Format-specific facts, emitted as qemu-img's `format-specific.data`.
    pub details: serde_json::Map<String, serde_json::Value>,
    /// Every reference to another file.
    pub references: Vec<Reference>,
}

impl ImageInfo {
    /// An info record with only the format and virtual size set.
    pub fn new(format: Format, virtual_size: u64) -> Self {
        ImageInfo {
            format,
            virtual_size,
            actual_size: None,
            cluster_size: None,
            dirty: None,
            encrypted: false,
            details: serde_json::Map::new(),
            references: Vec::new(),
        }
    }

    /// Sets one format-specific detail.
    pub fn detail(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.details.insert(key.to_string(), value.into());
    }

    /// The backing file, if any.
    pub fn backing_file(&self) -> Option<&Reference> {
        self.references
            .iter()
            .find(|r| r.kind == RefKind::BackingFile)
    }
}

/// How compressed guest data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Raw deflate, no header (qcow2 zlib clusters).
    Deflate,
    /// zlib stream with header (streamOptimized VMDK grains).
    Zlib,
    /// zstd frame (qcow2 compression_type=zstd).
    Zstd,
}

/// What backs one run of guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ExtentKind {
    /// Stored uncompressed at `host` in the source (the guest run maps linearly).
    Data {
        /// Source offset of the extent's first guest byte.
        host: u64,
    },
    /// Part of one compressed unit (cluster or grain).
    Compressed {
        /// The codec.
        codec: Codec,
        /// Source offset of the compressed stream.
        host: u64,
        /// Bytes of source the stream may occupy (an upper bound for qcow2).
        stored_len: u64,
        /// Guest bytes the unit decompresses to.
        unit_size: u64,
        /// Offset of the extent's first guest byte inside the decompressed unit.
        skip: u64,
    },
    /// Reads as zeros, explicitly marked so.
    Zero,
    /// Not allocated in this image; reads as zeros (no backing file is ever consulted).
    Unallocated,
}

/// One run of guest bytes and what backs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// What backs it.
    pub kind: ExtentKind,
}

impl Extent {
    /// One past the last guest byte.
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
    /// True for zero and unallocated extents: their bytes are zeros without reading.
    pub fn reads_as_zero(&self) -> bool {
        matches!(self.kind, ExtentKind::Zero | ExtentKind::Unallocated)
    }
}

/// The parts every image holds and hands out unchanged: what `open` learned, the findings it
/// made, and the source the image reads from. An [`Image`] implementation says where its parts
/// are with [`Image::core`]; the getters are the trait's defaults over it.
#[derive(Clone, Copy)]
pub struct ImageCore<'a> {
    /// What `open` learned.
    pub info: &'a ImageInfo,
    /// Findings noticed while opening.
    pub findings: &'a [Finding],
    /// The source the image's extents' host offsets are in.
    pub source: &'a Source,
}

impl<'a> ImageCore<'a> {
    /// The view of an image's `info`, `findings` and `source`.
    pub fn new(info: &'a ImageInfo, findings: &'a [Finding], source: &'a Source) -> Self {
        ImageCore {
            info,
            findings,
            source,
        }
    }
}

/// An opened image.
///
/// Formats implement [`Image::core`] and [`Image::extent_at`]; callers ask
/// [`mapping`](#method.mapping), the one entry point, which clamps the request before the
/// format sees it and checks the extent after.
///
/// # Security
/// Implementations never open another file, whatever the image names. They read only from
/// their own [`Source`], and every table they read was range-checked at `open`.
pub trait Image: Send + Sync {
    /// Where the image keeps its info, findings and source.
    fn core(&self) -> ImageCore<'_>;

    /// What `open` learned.
    fn info(&self) -> &ImageInfo {
        self.core().info
    }

    /// Findings noticed while opening (references, suspicious header fields, ...).
    fn findings(&self) -> &[Finding] {
        self.core().findings
    }

    /// The source the image reads from.
    fn source(&self) -> &Source {
        self.core().source
    }

    /// Deeper structural checks that read all metadata but no guest data (refcounts, every
    /// table entry). Returns findings; an `Err` only for I/O errors or hard limits.
    ///
    /// # Errors
    /// `Io` when the source cannot be read; `LimitExceeded` when the budget runs out.
    fn check(&self, _limits: &Limits) -> Result<Vec<Finding>> {
        Ok(Vec::new())
    }

    /// True when [`Image::check`] reads part of every stored unit of guest data (the marker of
    /// each compressed VMDK grain), so that over a network it costs the whole file. Readers
    /// check each such unit as they read it, so a command that reads all guest data anyway can
    /// leave this check out ([`Policy::skip_data_walk`](crate::policy::Policy)).
    fn check_reads_every_unit(&self) -> bool {
        false
    }

    /// The format's step of [`mapping`](#method.mapping): what backs guest bytes from `guest`,
    /// for at most `span` bytes. Only `mapping` calls it, with `1 <= span <= virtual_size -
    /// guest` already checked; it returns an extent starting at `guest` and at most `span`
    /// long, which `mapping` checks. Call `mapping`, not this.
    ///
    /// # Errors
    /// `Corrupt` when a table entry points outside the file; `Io` on read errors; whatever the
    /// format refuses to map (`Unsupported`, `Unsafe`).
    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent>;

    /// [`Image::extent_at`] for a reader of guest content only (digests, convert, compare):
    /// bytes marked zero and unallocated bytes both read as zeros (no backing file is ever
    /// consulted), so the extent may join them, reported as either kind. Only
    /// [`content_mapping`](#method.content_mapping) calls it.
    ///
    /// Formats whose tables can be named from many places (a qcow2 L2 table from every L1
    /// entry, a VMDK grain table from every directory entry) override it: there, a table that
    /// alternates the two kinds would otherwise cut every cluster of a huge guest into an
    /// extent of its own, and a content walk would cost per cluster, not per stored byte.
    ///
    /// # Errors
    /// As [`Image::extent_at`].
    fn content_extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        self.extent_at(guest, span)
    }
}

impl dyn Image + '_ {
    /// What backs guest bytes starting at `guest`: an extent starting exactly at `guest`, at
    /// least 1 and at most `max_len` bytes long, ending no later than the virtual size; a
    /// compressed extent lies inside its unit and its stream starts inside the source.
    ///
    /// This is the one mapping entry point, an inherent method of `dyn Image` so that no
    /// format can override it: the clamp and the contract check are written once, here, and
    /// every consumer (reader, digests, convert, `map`, `compare`) gets them.
    ///
    /// # Errors
    /// `Invalid` when `guest` is at or past the virtual size or `max_len` is 0; `Corrupt` when
    /// a table entry points outside the file or the format breaks the contract; `Io` on read
    /// errors.
    pub fn mapping(&self, guest: u64, max_len: u64) -> Result<Extent> {
        self.checked_mapping(guest, max_len, false)
    }

    /// [`mapping`](#method.mapping) for a reader of guest content only: a run that reads as
    /// zeros may join marked-zero and unallocated bytes and be reported as either kind
    /// ([`Image::content_extent_at`]). Everything else, and the contract checks, are as
    /// `mapping`'s. `map` asks `mapping`, which keeps the two kinds apart.
    ///
    /// # Errors
    /// As [`mapping`](#method.mapping).
    pub fn content_mapping(&self, guest: u64, max_len: u64) -> Result<Extent> {
        self.checked_mapping(guest, max_len, true)
    }

    fn checked_mapping(&self, guest: u64, max_len: u64, content: bool) -> Result<Extent> {
        let virtual_size = self.info().virtual_size;
        let span = mapping_span(guest, max_len, virtual_size)?;
        let e = match content {
            true => self.content_extent_at(guest, span)?,
            false => self.extent_at(guest, span)?,
        };
        validate_extent(&e, guest, span, virtual_size)?;
        if let ExtentKind::Compressed { host, .. } = e.kind {
            // The stream's end may pass the file end (qcow2 states a sector-rounded upper
            // bound), but its start may not.
            let size = self.source().size()?;
            if host >= size {
                return Err(crate::error::Error::corrupt(format!(
                    "mapping at {guest:#x} returned compressed data at {host:#x}, past the end of the source ({size} bytes)"
                ))
                .at(host));
            }
        }
        Ok(e)
    }
}

/// Validates `mapping` arguments and returns how many bytes an extent at `guest` may span:
/// `min(max_len, virtual_size - guest)`.
///
/// # Errors
/// `Invalid` when `guest` is at or past `virtual_size` or `max_len` is 0.
fn mapping_span(guest: u64, max_len: u64, virtual_size: u64) -> Result<u64> {
    match virtual_size.checked_sub(guest) {
        Some(room) if room > 0 && max_len > 0 => Ok(max_len.min(room)),
        _ => Err(crate::error::Error::invalid(format!(
            "guest offset {guest:#x} (length {max_len}) is outside the virtual disk ({virtual_size} bytes)"
        ))),
    }
}

/// Checks the `mapping` contract for an extent returned for `guest`. [`Image`]'s `mapping`
/// runs it on every extent; tests and fuzz harnesses may run it again.
///
/// # Errors
/// `Corrupt` when the extent does not start at `guest`, is empty, is longer than `max_len`,
/// passes `virtual_size`, or (compressed) passes its unit's end or stores no bytes.
pub fn validate_extent(e: &Extent, guest: u64, max_len: u64, virtual_size: u64) -> Result<()> {
    let end = e.start.checked_add(e.len);
    if e.start != guest || e.len == 0 || e.len > max_len || end.is_none_or(|end| end > virtual_size)
    {
        return Err(crate::error::Error::corrupt(format!(
            "mapping at {guest:#x} returned {}+{} (max {max_len}, size {virtual_size})",
            e.start, e.len
        )));
    }
    if let ExtentKind::Compressed {
        stored_len,
        unit_size,
        skip,
        ..
    } = e.kind
    {
        // A unit is decompressed whole and the extent cut out of it: the extent must lie
        // inside the unit (so `skip < unit_size`), and the unit must store some bytes.
        if skip.checked_add(e.len).is_none_or(|end| end > unit_size) || stored_len == 0 {
            return Err(crate::error::Error::corrupt(format!(
                "mapping at {guest:#x} returned compressed {}+{} at {skip} of a {unit_size}-byte unit stored in {stored_len} bytes",
                e.start, e.len
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::sync::{Arc, Mutex};

    /// An image that answers every request with `answer(guest, span)` and records the spans it
    /// was asked for.
    struct Fixed {
        info: ImageInfo,
        src: Source,
        kind: ExtentKind,
        /// Added to the span the format was given, to break the contract.
        extra: u64,
        asked: Mutex<Vec<(u64, u64)>>,
    }

    impl Image for Fixed {
        fn core(&self) -> ImageCore<'_> {
            ImageCore::new(&self.info, &[], &self.src)
        }
        fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
            self.asked.lock().unwrap().push((guest, span));
            Ok(Extent {
                start: guest,
                len: span + self.extra,
                kind: self.kind,
            })
        }
    }

    fn fixed(kind: ExtentKind, extra: u64) -> Fixed {
        Fixed {
            info: ImageInfo::new(crate::format::Format::Raw, 1000),
            src: Arc::new(vec![0u8; 100]),
            kind,
            extra,
            asked: Mutex::new(Vec::new()),
        }
    }

    fn compressed(host: u64, stored_len: u64, skip: u64) -> ExtentKind {
        ExtentKind::Compressed {
            codec: Codec::Deflate,
            host,
            stored_len,
            unit_size: 512,
            skip,
        }
    }

    #[test]
    fn the_format_sees_only_clamped_requests() {
        let img = fixed(ExtentKind::Zero, 0);
        let d: &dyn Image = &img;
        assert_eq!(d.mapping(900, u64::MAX).unwrap().len, 100);
        assert_eq!(d.mapping(10, 5).unwrap().len, 5);
        for (guest, max_len) in [(1000, 1), (u64::MAX, 1), (0, 0)] {
            let e = d.mapping(guest, max_len).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{guest} {max_len}");
        }
        assert_eq!(*img.asked.lock().unwrap(), vec![(900, 100), (10, 5)]);
    }

    #[test]
    fn an_extent_longer_than_asked_is_refused() {
        let img = fixed(ExtentKind::Zero, 1);
        let d: &dyn Image = &img;
        assert_eq!(d.mapping(0, 10).unwrap_err().kind(), ErrorKind::Corrupt);
        // Even when the request ran to the end of the disk.
        assert_eq!(d.mapping(990, 99).unwrap_err().kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn compressed_extents_lie_inside_their_unit_and_the_source() {
        let ok = fixed(compressed(99, 1, 100), 0);
        let d: &dyn Image = &ok;
        assert!(d.mapping(0, 412).is_ok());
        for (kind, len) in [
            (compressed(99, 1, 100), 413), // passes the unit's end
            (compressed(99, 1, 512), 1),   // starts at the unit's end
            (compressed(99, 1, u64::MAX), 1),
            (compressed(99, 0, 0), 1),  // stores nothing
            (compressed(100, 1, 0), 1), // starts at the source's end
        ] {
            let img = fixed(kind, 0);
            let d: &dyn Image = &img;
            let e = d.mapping(0, len).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{kind:?} {len}");
        }
    }
}
