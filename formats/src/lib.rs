//! # glimpse-formats
//!
//! Safe parsers, structural checks and guest readers for virtual-disk images: qcow2, VMDK,
//! VHD, VHDX, VDI, Parallels (ploop), raw, ISO and OVA/OVF, plus detection of QED and LUKS and
//! of the formats qemu opens that glimpse does not read ([`unsupported`]: qcow1, Bochs, cloop,
//! DMG).
//!
//! The layers, top to bottom:
//!
//! 1. **Sources.** Everything reads through [`ReadAt`]: positional, `&self`, `Sync`, so that
//!    parallel workers share one source. It is implemented for files, byte slices and
//!    [`Window`]s onto part of a file (an OVA member).
//! 2. **Detection.** [`detect()`] reads bounded windows (head, ISO descriptors, tail) and
//!    returns *every* format that matches.
//! 3. **Open.** [`open()`] parses one format's metadata under [`Limits`] and yields an
//!    [`Image`]: an [`ImageInfo`], the [`Finding`]s seen while parsing, and the one
//!    `mapping` call that says what backs any guest range (formats implement its inner step,
//!    [`Image::extent_at`]; the entry point clamps the request and checks the answer).
//!    [`Extents`] and [`Merged`] walk a range extent by extent.
//! 4. **Policy.** [`policy::inspect`] turns detection, findings and the caller's expectations
//!    into a verdict. `check`, `convert` and `upload` all use it.
//! 5. **Reading.** [`reader::GuestReader`] reads guest bytes at any offset on top of `mapping`,
//!    decompressing what it must under a bounded cache. [`compare`] compares two images'
//!    guest content on top of it.
//!
//! # Security
//! Image bytes are hostile input. No input may cause a panic, an unbounded allocation or
//! unbounded work; every table is range-checked against the source size through
//! [`table::check_table`]; and no file other than the source is ever opened because an image
//! names it: references are reported as [`Reference`]s and findings.

#![warn(missing_docs)]
// Hostile input: outside tests the whole crate is held to "no panics, no silent overflow".
// Tests may index and unwrap freely.
#![cfg_attr(
    not(test),
    warn(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used
    )
)]

pub mod codes;
pub mod compare;
pub mod detect;
pub mod digest;
pub mod error;
pub mod extents;
pub mod finding;
pub mod format;
pub mod image;
pub mod io;
pub mod limits;
pub mod lru;
pub mod policy;
pub mod probe;
pub mod ranges;
pub mod reader;
pub mod refname;
pub mod table;
pub mod tmpfile;
pub mod unsupported;
pub mod vmdk_text;
mod xml;

pub mod iso;
pub mod luks;
pub mod ova;
pub mod parallels;
pub mod partition;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

pub use detect::{detect, Detection};
pub use error::{Error, ErrorKind, Result};
pub use extents::{Extents, Holes, Merged, Run, RunKind};
pub use finding::{Finding, Severity};
pub use format::Format;
pub use image::{
    validate_extent, Codec, Extent, ExtentKind, Image, ImageCore, ImageInfo, RefKind, Reference,
};
pub use io::{ReadAt, Source, Window};
pub use limits::{Budget, Limits};

/// Opens `src` as `format`.
///
/// # Errors
/// Whatever the format's parser reports: `Truncated`, `Invalid`, `Corrupt`, `Unsupported`,
/// `LimitExceeded`, `Unsafe`, or `Io`.
///
/// # Security
/// Reads only from `src`, within `limits`. Never opens another file.
pub fn open(src: Source, format: Format, limits: &Limits) -> Result<Box<dyn Image>> {
    match format {
        // The container sits above the disk formats: it opens its disk through
        // `open_disk_format`, never back through this function.
        Format::Ova => ova::open_disk(src, limits, None),
        _ => open_disk_format(src, format, limits),
    }
}

/// Opens `src` as one of the disk formats: every format but the OVA container, which is
/// refused (an appliance inside an appliance would recurse).
///
/// # Errors
/// As [`open()`]; `Unsafe` (`ova.disk-format`) for [`Format::Ova`].
pub(crate) fn open_disk_format(
    src: Source,
    format: Format,
    limits: &Limits,
) -> Result<Box<dyn Image>> {
    let image: Box<dyn Image> = match format {
        Format::Raw => Box::new(raw::open(src, limits)?),
        Format::Qcow2 => Box::new(qcow2::open(src, limits)?),
        Format::Qed => Box::new(qcow2::qed::open(src, limits)?),
        Format::Vmdk => Box::new(vmdk::open(src, limits)?),
        Format::Vhd => Box::new(vhd::open(src, limits)?),
        Format::Vhdx => Box::new(vhdx::open(src, limits)?),
        Format::Vdi => Box::new(vdi::open(src, limits)?),
        Format::Iso => Box::new(iso::open(src, limits)?),
        Format::Luks => Box::new(luks::open(src, limits)?),
        Format::Ova => {
            return Err(
                Error::unsafe_("an OVA cannot be the disk of an OVA").code("ova.disk-format")
            )
        }
        Format::Parallels => Box::new(parallels::open(src, limits)?),
        Format::Qcow1 => Box::new(qcow2::qcow1::open(src, limits)?),
        Format::Bochs | Format::Cloop | Format::Dmg => unsupported::open(format)?,
    };
    if image.info().virtual_size > limits.max_virtual_size {
        return Err(Error::limit(format!(
            "virtual size {} exceeds the limit of {}",
            image.info().virtual_size,
            limits.max_virtual_size
        ))
        .code("size.limit"));
    }
    Ok(image)
}

/// Detects the format of `src` and opens it as the detected format (raw when nothing matched,
/// the first match when several did).
///
/// # Errors
/// As [`open()`].
pub fn open_detected(src: Source, limits: &Limits) -> Result<(Detection, Box<dyn Image>)> {
    let det = detect(src.as_ref())?;
    let img = open(src, det.format(), limits)?;
    Ok((det, img))
}
