//! OVA appliances (a tar holding an OVF descriptor, a manifest, a certificate and disks) and
//! standalone OVF descriptors.
//!
//! An OVA is read in place: [`read_ova`] walks the tar headers ([`tar`]), parses the
//! descriptor ([`ovf`]) and the manifest ([`manifest`]), and applies the archive rules
//! ([`check`]). Each disk is then opened through a [`Window`] onto its member (inflated first
//! when gzip), detected, and opened as its disk format, so everything built on [`Image`]
//! (info, check, map, compare, checksums, convert) works on the disk without extracting it.
//!
//! The container sits above the disk formats: [`crate::open`] hands `Format::Ova` to
//! [`open_disk`], and this module opens its disks through the crate's disk-format opener,
//! never back through [`crate::open`], so an appliance nested in a disk cannot recurse.
//! A read [`Ova`] opens each disk file at most once (disks naming one member share it, and
//! its check is run once), charges every disk's parser to the archive's one metadata budget,
//! and caps the inflated bytes of all its gzip disks together: the work of checking an
//! appliance is bounded by its bytes, not by its disks times a member's cost.
//!
//! Files by role: `archive` (reading, in phases), `check` (member-name and href rules),
//! `disk` (disk entries and opening), `gzip`, `verdict` (manifest digests, `ova check`, the
//! gate's per-disk inspection), `extract`, `appliance` (what `ova list`/`ova check` take: an
//! archive or a standalone descriptor), `dir` (the standalone descriptor).
//!
//! # Security
//! The archive is hostile input. Member names, types and hrefs are checked; no member is ever
//! written anywhere unless [`Ova::extract`] is called, and it refuses archives with any
//! rejecting finding. Hrefs are resolved only to members of the same archive; a standalone
//! descriptor's siblings are reachable only through [`OvfDir::open_disk`].

mod appliance;
mod archive;
pub mod check;
pub mod dir;
mod disk;
mod extract;
mod gzip;
pub mod manifest;
pub mod ovf;
pub mod tar;
mod verdict;

use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::image::{Extent, Image, ImageCore, ImageInfo};
use crate::io::{Source, Window};
use crate::limits::{Budget, Limits};
use crate::probe::Probe;

pub use self::tar::{Member, MemberKind};
pub use appliance::{
    is_ovf_path, not_a_tar, or_rejection, read_archive, read_dir, verdict, Appliance,
};
pub use archive::read_ova;
pub use dir::{read_ovf_dir, OvfDir};
pub use disk::{open_disk, DiskEntry};
pub use extract::{ExtractHooks, Extraction};
pub use gzip::{gunzip, SPOOL_MEMORY_TOTAL, SPOOL_THRESHOLD};
pub use ovf::{Descriptor, DiskDesc, FileRef, VirtualSystem};

use disk::{about_disk, Shared};

/// Bytes of extension records (pax headers, GNU long names) the probe reads at most.
const PROBE_BUDGET: u64 = 16 << 20;

/// True when the source is a tar archive (ustar magic at 257, or a valid old-style header
/// checksum) that has an `.ovf` descriptor among its members, or that glimpse cannot read
/// through: a header other tar readers may frame differently, or more members, headers or
/// extension bytes than the OVA reader takes. Such an archive goes to the OVA reader, which
/// refuses it, rather than passing as a raw disk that Glance, `tarfile` or GNU tar would read
/// as an appliance. The walk reads every header (up to [`tar::MAX_HEADERS`] of them), as
/// `ova check` does, so a descriptor stored after many other members is found too.
pub fn probe(p: &Probe<'_>) -> bool {
    let Some(head) = p.head_at(0, 512) else {
        return false;
    };
    let mut block = [0u8; 512];
    block.copy_from_slice(head);
    let ustar = head.get(257..262) == Some(b"ustar");
    if !(ustar || tar::header_checksum_ok(&block)) {
        return false;
    }
    let budget = Budget::new(PROBE_BUDGET);
    let mut members = Vec::new();
    // A truncated archive whose descriptor was seen still probes as OVA, so that the user sees
    // the OVA error; one cut short before any descriptor is left to the other probes.
    let walked = tar::walk_into(p.src, &budget, tar::WalkOptions::default(), &mut members);
    let unreadable = walked.err().is_some_and(|e| {
        !matches!(
            e.kind(),
            crate::error::ErrorKind::Truncated | crate::error::ErrorKind::Io
        )
    });
    unreadable
        || members
            .iter()
            .any(|m| m.kind == MemberKind::Regular && is_ext(&m.name, "ovf"))
}

fn is_ext(name: &str, ext: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, e)| e.eq_ignore_ascii_case(ext))
}

/// The parsed manifest and where it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// The manifest member's name.
    pub name: String,
    /// Its lines.
    pub entries: Vec<manifest::Entry>,
}

/// A read OVA: members, descriptor, manifest and the archive-level findings.
#[derive(Clone)]
pub struct Ova {
    src: Source,
    shared: Arc<Shared>,
    /// Every member, in archive order.
    pub members: Vec<Member>,
    /// Index of the descriptor member used (the first `.ovf`).
    pub descriptor_member: Option<usize>,
    /// The descriptor, when it parsed.
    pub descriptor: Option<Descriptor>,
    /// The manifest, when there is one and it parsed.
    pub manifest: Option<Manifest>,
    /// Every disk in the descriptor.
    pub disks: Vec<DiskEntry>,
    /// Archive-level findings (names, types, descriptor, hrefs, sizes, manifest shape).
    pub findings: Vec<Finding>,
}

impl Ova {
    /// The archive.
    pub fn source(&self) -> &Source {
        &self.src
    }

    /// A window onto member `i`'s data.
    ///
    /// # Errors
    /// `Invalid` for an unknown index; `Truncated` if the member passes the archive's end.
    pub fn member_source(&self, i: usize) -> Result<Source> {
        let m = self
            .members
            .get(i)
            .ok_or_else(|| Error::invalid(format!("no member {i}")))?;
        Ok(Arc::new(Window::new(self.src.clone(), m.offset, m.size)?))
    }

    /// The index of the disk whose href is `name`, for picking a disk by file name.
    pub fn disk_by_name(&self, name: &str) -> Option<usize> {
        self.disks
            .iter()
            .position(|d| d.href.as_deref() == Some(name))
    }

    /// The disk a user's `--disk` value names: a 0-based index, or else a file name (href).
    pub fn select(&self, sel: &str) -> Option<usize> {
        match sel.parse::<usize>() {
            Ok(i) if i < self.disks.len() => Some(i),
            _ => self.disk_by_name(sel),
        }
    }

    /// The first disk backed by a file (what `open_disk(.., None)` opens).
    pub fn default_disk(&self) -> Option<usize> {
        self.disks.iter().position(|d| d.href.is_some())
    }
}

/// One disk of an OVA opened as an image: the disk's mapping and data, the appliance's facts
/// and findings.
pub struct OvaImage {
    ova: Ova,
    disk: DiskEntry,
    inner: Arc<dyn Image>,
    info: ImageInfo,
    findings: Vec<Finding>,
}

impl OvaImage {
    /// The appliance.
    pub fn ova(&self) -> &Ova {
        &self.ova
    }
    /// The disk opened.
    pub fn disk(&self) -> &DiskEntry {
        &self.disk
    }
    /// The disk's own image (its format's info and findings).
    pub fn inner(&self) -> &dyn Image {
        self.inner.as_ref()
    }
}

impl Image for OvaImage {
    /// The source is the disk's (a window onto its member), which its extents' host offsets
    /// are in.
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, self.inner.source())
    }
    fn check(&self, limits: &Limits) -> Result<Vec<Finding>> {
        let mut out = self.ova.verify_manifest()?;
        out.extend(
            self.inner
                .check(limits)?
                .into_iter()
                .map(|f| about_disk(f, &self.disk)),
        );
        Ok(out)
    }
    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        // Through the disk's own entry point: its contract is checked against its own size.
        self.inner.mapping(guest, span)
    }
    fn content_extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        self.inner.content_mapping(guest, span)
    }
}

#[cfg(test)]
mod tests;

/// `Invalid` once `cancel` (set by a caller's signal handler) is set: what the long steps of
/// `ova check` and `ova extract` poll between chunks and disks.
fn stop_if_cancelled(cancel: Option<&std::sync::atomic::AtomicBool>) -> Result<()> {
    if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst)) {
        return Err(Error::invalid("cancelled"));
    }
    Ok(())
}
