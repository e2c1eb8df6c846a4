//! OVA appliances (a tar holding an OVF descriptor, a manifest, a certificate and disks) and
//! standalone OVF descriptors.
//!
//! An OVA is read in place: [`read_ova`] walks the tar headers ([`tar`]), parses the
//! descriptor ([`ovf`]) and the manifest ([`manifest`]), and applies the archive rules
//! ([`check`]). Each disk is then opened through a [`Window`] onto its member with the
//! ordinary [`crate::detect`] and [`crate::open`], so everything built on [`Image`] (info,
//! check, map, compare, checksums, convert) works on the disk without extracting it.
//!
//! # Security
//! The archive is hostile input. Member names, types and hrefs are checked; no member is ever
//! written anywhere unless [`Ova::extract`] is called, and it refuses archives with any
//! rejecting finding. Hrefs are resolved only to members of the same archive; a standalone
//! descriptor's siblings are reachable only through [`OvfDir::open_disk`].

pub mod check;
pub mod dir;
pub mod manifest;
pub mod ovf;
pub mod tar;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::finding::{Finding, Severity};
use crate::format::Format;
use crate::image::{Extent, Image, ImageCore, ImageInfo, RefKind, Reference};
use crate::io::{ReadAt, Source, Window};
use crate::limits::{Budget, Limits};
use crate::probe::Probe;

pub use self::tar::{Member, MemberKind};
pub use dir::{read_ovf_dir, OvfDir};
pub use ovf::{Descriptor, DiskDesc, FileRef, VirtualSystem};

use check::HrefKind;

/// Headers the probe walks at most, looking for the `.ovf` member.
const PROBE_MEMBERS: usize = 64;

/// True when the source is a tar archive (ustar magic at 257, or a valid old-style header
/// checksum) one of whose first members is an `.ovf` descriptor.
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
    let budget = Budget::new(1 << 20);
    let opts = tar::WalkOptions {
        max_members: PROBE_MEMBERS,
        max_headers: 4 * PROBE_MEMBERS,
        strict: false,
    };
    let mut members = Vec::new();
    // A truncated or damaged archive still probes as OVA, so that the user sees the OVA error.
    let _ = tar::walk_into(p.src, &budget, opts, &mut members);
    members
        .iter()
        .any(|m| m.kind == MemberKind::Regular && is_ext(&m.name, "ovf"))
}

fn is_ext(name: &str, ext: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, e)| e.eq_ignore_ascii_case(ext))
}

/// A positional source read as a stream (for flate2).
struct Cursor<'a> {
    src: &'a dyn ReadAt,
    pos: u64,
}

impl Read for Cursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.src.read_at(buf, self.pos)?;
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
}

/// Inflated bytes held in memory before a gzip disk is spooled to a temporary file.
pub const SPOOL_THRESHOLD: usize = 8 << 20;

/// Decompresses a gzip file: every member, as `gzip -d`, Python's `gzip` and flate2's
/// `MultiGzDecoder` do (a hidden disk must not hide behind an empty first member). Random
/// access needs the whole disk: up to [`SPOOL_THRESHOLD`] bytes stay in memory, a larger disk is
/// spooled to an anonymous temporary file (removed when the source is dropped). At most
/// `limits.max_inflated_bytes` are inflated.
///
/// # Errors
/// `Corrupt` for a bad gzip stream (including bytes after the last member that are not a gzip
/// member); `LimitExceeded` (`ova.gzip-limit`) past the cap; `Io` when the temporary file
/// cannot be written.
pub fn gunzip(src: &dyn ReadAt, limits: &Limits) -> Result<Source> {
    gunzip_with(src, limits, &inflate_budget(limits))
}

/// The one budget of inflated bytes that all gzip disks of a command share.
fn inflate_budget(limits: &Limits) -> Budget {
    Budget::new(limits.max_inflated_bytes)
}

/// Reads the next inflated bytes, mapping flate2's errors to glimpse's.
fn inflate_some(dec: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    loop {
        return match dec.read(buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::InvalidInput
                    || e.kind() == std::io::ErrorKind::InvalidData =>
            {
                Err(Error::corrupt(format!("invalid gzip stream: {e}")).code("ova.gzip-corrupt"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Error::truncated(format!("gzip stream ends early: {e}"))
                    .code("ova.gzip-corrupt"))
            }
            Err(e) => Err(Error::from(e)),
        };
    }
}

/// Where inflated bytes go: memory first, then a temporary file.
enum Spool {
    Mem(Vec<u8>),
    File(std::fs::File),
}

impl Spool {
    fn push(&mut self, chunk: &[u8]) -> Result<()> {
        use std::io::Write;
        let spill = |e: std::io::Error| Error::io(e, "spooling a gzip-compressed disk");
        if let Spool::Mem(v) = self {
            if v.len().saturating_add(chunk.len()) <= SPOOL_THRESHOLD {
                v.extend_from_slice(chunk);
                return Ok(());
            }
            let mut f = tempfile::tempfile().map_err(spill)?;
            f.write_all(v).map_err(spill)?;
            *self = Spool::File(f);
        }
        match self {
            Spool::File(f) => f.write_all(chunk).map_err(spill),
            Spool::Mem(_) => Ok(()),
        }
    }
}

/// [`gunzip`] charging a caller's budget, so that several disks share one cap.
fn gunzip_with(src: &dyn ReadAt, limits: &Limits, budget: &Budget) -> Result<Source> {
    let cap = limits.max_inflated_bytes;
    let mut dec = flate2::read::MultiGzDecoder::new(Cursor { src, pos: 0 });
    let mut spool = Spool::Mem(Vec::new());
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = inflate_some(&mut dec, &mut buf)?;
        if n == 0 {
            break;
        }
        total = total.saturating_add(n as u64);
        if total > cap {
            return Err(Error::limit(format!(
                "gzip-compressed disk decompresses to more than {cap} bytes"
            ))
            .code("ova.gzip-limit"));
        }
        budget
            .take(n as u64, "gzip-compressed disks")
            .map_err(|e| e.code("ova.gzip-limit"))?;
        spool.push(buf.get(..n).unwrap_or_default())?;
    }
    Ok(match spool {
        Spool::Mem(v) => Arc::new(v),
        Spool::File(f) => Arc::new(f),
    })
}

/// A disk of the appliance: the descriptor's `Disk`, and where its data is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskEntry {
    /// 0-based index in `DiskSection` order: what `--disk N` selects.
    pub index: usize,
    /// The descriptor's entry.
    #[serde(flatten)]
    pub desc: DiskDesc,
    /// The `File` href holding the disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
    /// The file's compression, when not `identity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// Index of the member holding the disk, when the href names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<usize>,
}

impl DiskEntry {
    /// The entry for disk `index` of a descriptor, backed by `file` (its `References` entry,
    /// if it has one) and, inside an archive, by `member`.
    pub fn new(
        index: usize,
        desc: &DiskDesc,
        file: Option<&FileRef>,
        member: Option<usize>,
    ) -> DiskEntry {
        DiskEntry {
            index,
            desc: desc.clone(),
            href: file.map(|f| f.href.clone()),
            compression: file
                .and_then(|f| f.compression.clone())
                .filter(|c| c != "identity"),
            member,
        }
    }
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

/// Reads an OVA in place: walks the tar, parses descriptor and manifest, applies the archive
/// rules. Does not read member data beyond the descriptor and manifest.
///
/// # Errors
/// `Invalid` (`ova.tar-malformed`), `Truncated` (`ova.truncated`) or `LimitExceeded`
/// (`ova.too-many-members`) when the tar itself cannot be walked; `Io`. A bad descriptor or
/// manifest is a finding, not an error.
///
/// # Security
/// Bounded: at most [`tar::MAX_MEMBERS`] members, names of [`tar::MAX_NAME`] bytes, pax
/// records of [`tar::MAX_PAX`] bytes, a descriptor of [`ovf::MAX_DESCRIPTOR`] bytes and a
/// manifest of [`manifest::MAX_MANIFEST`] bytes, all charged to the metadata budget.
pub fn read_ova(src: Source, limits: &Limits) -> Result<Ova> {
    let budget = limits.budget();
    let members = tar::walk(src.as_ref(), &budget, tar::WalkOptions::default())?;
    let mut findings = check::member_findings(&members);

    let regular = |i: &usize| {
        members
            .get(*i)
            .is_some_and(|m| m.kind == MemberKind::Regular)
    };
    let named = |ext: &'static str| -> Vec<usize> {
        (0..members.len())
            .filter(|i| regular(i) && members.get(*i).is_some_and(|m| is_ext(&m.name, ext)))
            .collect()
    };

    // The descriptor.
    let ovfs = named("ovf");
    let descriptor_member = ovfs.first().copied();
    let mut descriptor = None;
    match ovfs.as_slice() {
        [] => findings.push(Finding::reject(
            "ova.descriptor-missing",
            "the archive has no .ovf descriptor",
        )),
        [_, more @ ..] => {
            for i in more {
                if let Some(m) = members.get(*i) {
                    findings.push(
                        Finding::reject(
                            "ova.descriptor-multiple",
                            format!("a second descriptor {:?}", m.name),
                        )
                        .at(m.header_offset),
                    );
                }
            }
        }
    }
    if let Some((i, m)) = descriptor_member.and_then(|i| Some((i, members.get(i)?))) {
        // OVF 1.1 (DSP0243) 5.3: the descriptor shall be the first file. A descriptor written
        // last (some exporters stream disks first) is readable, so only warned about.
        if i != 0 {
            let last = i.saturating_add(1) == members.len();
            findings.push(if last {
                Finding::warn(
                    "ova.descriptor-last",
                    format!(
                        "the descriptor {:?} is the last member, not the first",
                        m.name
                    ),
                )
                .at(m.header_offset)
            } else {
                Finding::reject(
                    "ova.descriptor-not-first",
                    format!("the descriptor {:?} is member {i}, not the first", m.name),
                )
                .at(m.header_offset)
            });
        }
        let parsed = if m.size > ovf::MAX_DESCRIPTOR {
            Err(Error::limit(format!(
                "descriptor of {} bytes exceeds {}",
                m.size,
                ovf::MAX_DESCRIPTOR
            ))
            .code("ova.descriptor-malformed"))
        } else {
            crate::io::read_vec(src.as_ref(), m.offset, m.size, &budget, "OVF descriptor")
                .and_then(|b| ovf::parse(&b))
        };
        match parsed {
            Ok(d) => {
                for p in &d.problems {
                    findings
                        .push(Finding::reject("ova.descriptor-malformed", p.clone()).at(m.offset));
                }
                descriptor = Some(d);
            }
            Err(e) if e.kind() == ErrorKind::Io => return Err(e),
            Err(e) => findings
                .push(Finding::reject("ova.descriptor-malformed", e.to_string()).at(m.offset)),
        }
    }

    // First member of each (normalized) name; a repeat is already an ova.member-name finding.
    // Other readers' names count too (a GNU sparse 1.0 member is found by its real name), after
    // glimpse's own.
    let mut by_name: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for r in 0..3 {
        for (i, m) in members.iter().enumerate() {
            if let Some(n) = check::readings(m)
                .get(r)
                .and_then(|(_, raw)| check::normalize(raw, m.kind))
            {
                by_name.entry(n).or_insert(i);
            }
        }
    }
    let member_by_name = |name: &str| -> Option<usize> { by_name.get(name).copied() };

    // References and disks.
    let mut disks = Vec::new();
    if let Some(d) = &descriptor {
        for f in &d.files {
            let at = descriptor_member
                .and_then(|i| members.get(i))
                .map_or(0, |m| m.offset);
            match check::href_kind(&f.href) {
                HrefKind::Url => findings.push(
                    Finding::reject(
                        "ova.href",
                        format!("file {:?} is a URL {:?}, outside the archive", f.id, f.href),
                    )
                    .at(at),
                ),
                HrefKind::Path => findings.push(
                    Finding::reject(
                        "ova.href",
                        format!(
                            "file {:?} href {:?} is a path, not a member name",
                            f.id, f.href
                        ),
                    )
                    .at(at),
                ),
                HrefKind::Name => {
                    match member_by_name(&f.href).and_then(|i| members.get(i)) {
                        None => findings.push(
                            Finding::reject(
                                "ova.href",
                                format!(
                                    "file {:?} names {:?}, which is not in the archive",
                                    f.id, f.href
                                ),
                            )
                            .at(at),
                        ),
                        Some(m) => {
                            if let Some(size) = f.size {
                                if size != m.size {
                                    findings.push(
                                    Finding::reject(
                                        "ova.size-mismatch",
                                        format!("member {:?} has {} bytes but References says {size}", m.name, m.size),
                                    )
                                    .at(m.header_offset),
                                );
                                }
                            }
                        }
                    }
                }
            }
            if f.chunk_size.is_some() {
                findings.push(
                    Finding::reject(
                        "ova.file-unsupported",
                        format!("file {:?} is split into chunks (chunkSize)", f.href),
                    )
                    .at(at),
                );
            }
            if let Some(c) = f.compression.as_deref() {
                if c != "identity" && c != "gzip" {
                    findings.push(
                        Finding::reject(
                            "ova.file-unsupported",
                            format!("file {:?} uses compression {c:?}", f.href),
                        )
                        .at(at),
                    );
                }
            }
        }
        for (index, desc) in d.disks.iter().enumerate() {
            let file = desc.file_ref.as_deref().and_then(|id| d.file(id));
            if let (Some(id), None) = (desc.file_ref.as_deref(), file) {
                findings.push(Finding::reject(
                    "ova.descriptor-malformed",
                    format!(
                        "disk {:?} names file {id:?}, which References does not list",
                        desc.disk_id
                    ),
                ));
            }
            let member = file
                .filter(|f| check::href_kind(&f.href) == HrefKind::Name)
                .and_then(|f| member_by_name(&f.href));
            if let Some(other) = disks
                .iter()
                .find(|e: &&DiskEntry| e.member.is_some() && e.member == member)
            {
                findings.push(Finding::reject(
                    "ova.descriptor-malformed",
                    format!(
                        "disks {} and {index} are backed by the same file",
                        other.index
                    ),
                ));
            }
            disks.push(DiskEntry::new(index, desc, file, member));
        }
    }

    // The manifest and certificate.
    let mfs = named("mf");
    let mut manifest = None;
    for i in mfs.iter().skip(1) {
        if let Some(m) = members.get(*i) {
            findings.push(
                Finding::reject(
                    "ova.manifest-multiple",
                    format!("a second manifest {:?}", m.name),
                )
                .at(m.header_offset),
            );
        }
    }
    if let Some(m) = mfs.first().and_then(|i| members.get(*i)) {
        let parsed = if m.size > manifest::MAX_MANIFEST {
            Err(Error::limit(format!(
                "manifest of {} bytes exceeds {}",
                m.size,
                manifest::MAX_MANIFEST
            ))
            .code("ova.manifest-malformed"))
        } else {
            crate::io::read_vec(src.as_ref(), m.offset, m.size, &budget, "manifest")
                .and_then(|b| manifest::parse(&b))
        };
        match parsed {
            Ok(all) => {
                // Each file is digested once: a manifest naming one big member a thousand
                // times must not cost a thousand reads.
                let mut seen = std::collections::HashSet::new();
                let mut entries = Vec::new();
                for e in all {
                    if seen.insert(e.name.clone()) {
                        entries.push(e);
                    } else {
                        findings.push(
                            Finding::reject(
                                "ova.manifest-malformed",
                                format!("the manifest lists {:?} more than once", e.name),
                            )
                            .at(m.offset),
                        );
                    }
                }
                for e in &entries {
                    if member_by_name(&e.name).is_none() {
                        findings.push(
                            Finding::reject(
                                "ova.manifest-missing-member",
                                format!(
                                    "the manifest lists {:?}, which is not in the archive",
                                    e.name
                                ),
                            )
                            .at(m.offset),
                        );
                    }
                }
                if !entries.is_empty() && entries.iter().all(|e| e.algo == manifest::Algo::Sha1) {
                    findings.push(
                        Finding::warn("ova.manifest-sha1", "the manifest uses only SHA-1, which is broken for collisions; use SHA-256")
                            .at(m.offset),
                    );
                }
                for (j, other) in members.iter().enumerate() {
                    let covered = check::normalized_name(other).is_some_and(|n| seen.contains(n));
                    if other.kind == MemberKind::Regular
                        && !mfs.contains(&j)
                        && !is_ext(&other.name, "cert")
                        && !covered
                    {
                        findings.push(
                            Finding::warn(
                                "ova.manifest-unlisted",
                                format!("member {:?} is not in the manifest", other.name),
                            )
                            .at(other.header_offset),
                        );
                    }
                }
                manifest = Some(Manifest {
                    name: m.name.clone(),
                    entries,
                });
            }
            Err(e) if e.kind() == ErrorKind::Io => return Err(e),
            Err(e) => {
                findings.push(Finding::reject("ova.manifest-malformed", e.to_string()).at(m.offset))
            }
        }
    } else {
        findings.push(Finding::info(
            "ova.manifest-absent",
            "the archive has no manifest: member integrity is not verified",
        ));
    }
    for i in named("cert") {
        if let Some(m) = members.get(i) {
            findings.push(
                Finding::info(
                    "ova.certificate-unverified",
                    format!(
                        "certificate {:?} is present; glimpse does not verify OVF signatures",
                        m.name
                    ),
                )
                .at(m.header_offset),
            );
        }
    }

    Ok(Ova {
        src,
        members,
        descriptor_member,
        descriptor,
        manifest,
        disks,
        findings,
    })
}

/// Prefixes a disk's finding with which disk it is about.
fn about_disk(mut f: Finding, d: &DiskEntry) -> Finding {
    f.message = format!(
        "disk {} ({}): {}",
        d.index,
        d.href.as_deref().unwrap_or("no file"),
        f.message
    );
    f
}

/// A disk opened inside an OVA, with the disk-level findings (declared format, capacity).
struct OpenedDisk {
    image: Box<dyn Image>,
    findings: Vec<Finding>,
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

    /// The disk's bytes: a window onto its member, or the decompressed member for
    /// `compression="gzip"` (see [`gunzip`] for the bound).
    ///
    /// # Errors
    /// `Invalid` for an unknown disk; `Unsupported` (`ova.href`) for a disk whose file is not a
    /// member; `Unsupported` for other compressions; as [`gunzip`].
    pub fn disk_source(&self, disk: usize, limits: &Limits) -> Result<Source> {
        self.disk_source_with(disk, limits, &inflate_budget(limits))
    }

    fn disk_source_with(&self, disk: usize, limits: &Limits, budget: &Budget) -> Result<Source> {
        let d = self.disks.get(disk).ok_or_else(|| {
            Error::invalid(format!(
                "the appliance has {} disks; there is no disk {disk}",
                self.disks.len()
            ))
        })?;
        let Some(member) = d.member else {
            return Err(Error::unsupported(format!(
                "disk {disk} ({:?}) has no member in the archive",
                d.href.as_deref().unwrap_or("no file")
            ))
            .code("ova.href"));
        };
        if let Some(m) = self.members.get(member) {
            if m.kind == MemberKind::Sparse {
                return Err(Error::unsafe_(format!(
                    "disk {disk} member {:?} is a GNU sparse file: its stored bytes are not the disk",
                    m.name
                ))
                .code("ova.sparse-member"));
            }
            if m.kind != MemberKind::Regular {
                return Err(Error::unsafe_(format!(
                    "disk {disk} member {:?} is not a regular file",
                    m.name
                ))
                .code("ova.member-type"));
            }
        }
        let window = self.member_source(member)?;
        match d.compression.as_deref() {
            None => Ok(window),
            Some("gzip") => gunzip_with(window.as_ref(), limits, budget),
            Some(c) => Err(
                Error::unsupported(format!("disk {disk} uses compression {c:?}"))
                    .code("ova.file-unsupported"),
            ),
        }
    }

    /// A disk number past the last disk: the caller's mistake, not a verdict on the archive.
    fn no_such_disk(&self, disk: usize) -> Error {
        Error::usage(format!(
            "no disk {disk}: the OVA has {} disk(s), numbered from 0",
            self.disks.len()
        ))
    }

    fn open_one(&self, disk: usize, limits: &Limits, budget: &Budget) -> Result<OpenedDisk> {
        let d = self
            .disks
            .get(disk)
            .ok_or_else(|| self.no_such_disk(disk))?;
        let src = self.disk_source_with(disk, limits, budget)?;
        let det = crate::detect(src.as_ref())?;
        let mut findings = Vec::new();
        if det.matches.contains(&Format::Ova) {
            // An appliance inside an appliance would recurse without bound.
            return Err(
                Error::unsafe_(format!("disk {disk} is itself an OVA")).code("ova.disk-format")
            );
        }
        if det.is_ambiguous() {
            let names: Vec<&str> = det.matches.iter().map(|f| f.name()).collect();
            findings.push(Finding::reject(
                "format.ambiguous",
                format!("the disk matches several formats: {}", names.join(", ")),
            ));
        }
        let format = det.format();
        if let Some(declared) = d.desc.declared_format() {
            if declared != format {
                findings.push(Finding::reject(
                    "ova.disk-format",
                    format!(
                        "the descriptor declares {declared} ({}) but the disk is {format}",
                        d.desc.format_url.as_deref().unwrap_or("")
                    ),
                ));
            }
        }
        let image = crate::open(src, format, limits)?;
        let vsize = image.info().virtual_size;
        if let Some(cap) = d.desc.capacity {
            if cap != vsize {
                findings.push(Finding::reject(
                    "ova.capacity-mismatch",
                    format!("the descriptor's capacity is {cap} bytes but the {format} disk's virtual size is {vsize}"),
                ));
            }
        }
        let findings = findings.into_iter().map(|f| about_disk(f, d)).collect();
        Ok(OpenedDisk { image, findings })
    }

    /// Opens disk `disk`'s own image (its format's info, findings and mapping), without the
    /// appliance's facts and findings: for listing.
    ///
    /// # Errors
    /// As [`Ova::open_disk`].
    pub fn open_inner(&self, disk: usize, limits: &Limits) -> Result<Box<dyn Image>> {
        Ok(self.open_one(disk, limits, &inflate_budget(limits))?.image)
    }

    /// Opens disk `disk` (0-based, `DiskSection` order) as an [`OvaImage`].
    ///
    /// # Errors
    /// As [`Ova::disk_source`], plus whatever the disk's own parser reports (`Unsafe`
    /// `ova.disk-format` for an OVA nested in the disk).
    pub fn open_disk(&self, disk: usize, limits: &Limits) -> Result<OvaImage> {
        let opened = self.open_one(disk, limits, &inflate_budget(limits))?;
        let d = self
            .disks
            .get(disk)
            .ok_or_else(|| self.no_such_disk(disk))?;
        let inner = opened.image;
        let ii = inner.info();
        let mut info = ImageInfo::new(Format::Ova, ii.virtual_size);
        info.actual_size = self.src.allocated_size();
        info.cluster_size = ii.cluster_size;
        info.dirty = ii.dirty;
        info.encrypted = ii.encrypted;
        info.references = ii.references.clone();
        if let Some(desc) = &self.descriptor {
            for f in &desc.files {
                if check::href_kind(&f.href) != HrefKind::Name {
                    info.references.push(Reference {
                        kind: RefKind::Href,
                        target: f.href.clone(),
                        format: None,
                        offset: None,
                    });
                }
            }
        }
        info.detail("disk", disk);
        info.detail("disk-format", ii.format.name());
        info.detail(
            "disk-details",
            serde_json::Value::Object(ii.details.clone()),
        );
        let disks: Vec<serde_json::Value> = self
            .disks
            .iter()
            .map(|e| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                let vs = if e.index == disk {
                    Some(ii.virtual_size)
                } else if e.compression.is_none() {
                    // Other disks: metadata only (a gzip disk would be decompressed: skipped).
                    self.open_one(e.index, limits, &inflate_budget(limits))
                        .ok()
                        .map(|o| o.image.info().virtual_size)
                } else {
                    None
                };
                if let (Some(obj), Some(vs)) = (v.as_object_mut(), vs) {
                    obj.insert("virtual-size".into(), vs.into());
                }
                v
            })
            .collect();
        info.detail("disks", disks);
        if let Some(desc) = &self.descriptor {
            info.detail(
                "virtual-systems",
                serde_json::to_value(&desc.systems).unwrap_or_default(),
            );
        }
        info.detail("members", self.members.len());
        if let Some(m) = &self.manifest {
            let algos: Vec<manifest::Algo> = m.entries.iter().map(|e| e.algo).collect();
            info.detail(
                "manifest",
                serde_json::to_value(algos.first()).unwrap_or_default(),
            );
        }
        let mut findings = self.findings.clone();
        findings.extend(opened.findings);
        findings.extend(inner.findings().iter().cloned().map(|f| about_disk(f, d)));
        Ok(OvaImage {
            ova: self.clone(),
            disk: d.clone(),
            inner,
            info,
            findings,
        })
    }

    /// Applies the gate's `policy` to every disk backed by a file except `skip` (the disk a
    /// caller already inspected through [`crate::policy::inspect`]), for a gate that checks
    /// every disk. Each disk gets its disk-level findings (declared format, capacity) and what
    /// [`crate::policy::inspect`] reports for its own bytes (findings, structural check, size
    /// limit, backing-file allowance), prefixed with the disk. The archive is read once:
    /// archive-level findings and manifest digests are not repeated, and one budget bounds
    /// the inflated bytes of all gzip disks.
    ///
    /// # Errors
    /// Only `Io` errors; every other problem is a finding.
    pub fn inspect_disks(
        &self,
        policy: &crate::policy::Policy,
        limits: &Limits,
        skip: Option<usize>,
    ) -> Result<Vec<(usize, Vec<Finding>)>> {
        let budget = inflate_budget(limits);
        let own = crate::policy::Policy {
            disk: None,
            expect_format: None,
            ..policy.clone()
        };
        let mut out = Vec::new();
        for d in self.disks.iter().filter(|d| d.href.is_some()) {
            if Some(d.index) == skip {
                continue;
            }
            let findings = match self.open_one(d.index, limits, &budget) {
                Ok(o) => {
                    let src = o.image.source().clone();
                    let mut f: Vec<Finding> = o
                        .findings
                        .into_iter()
                        .filter(|f| f.code != "format.ambiguous")
                        .collect();
                    let r = crate::policy::inspect(src, &own, limits)?;
                    f.extend(r.findings.into_iter().map(|x| about_disk(x, d)));
                    f
                }
                Err(e) if e.kind() == ErrorKind::Io => return Err(e),
                Err(e) => vec![about_disk(Finding::from_error(&e), d)],
            };
            out.push((d.index, findings));
        }
        Ok(out)
    }

    /// Verifies every manifest digest by reading each listed member in full.
    ///
    /// # Errors
    /// `Io` when the archive cannot be read.
    pub fn verify_manifest(&self) -> Result<Vec<Finding>> {
        let mut out = Vec::new();
        let Some(mf) = &self.manifest else {
            return Ok(out);
        };
        for e in &mf.entries {
            let Some(i) = self
                .members
                .iter()
                .position(|m| check::normalized_name(m) == Some(e.name.as_str()))
            else {
                continue; // reported as ova.manifest-missing-member
            };
            let Some(m) = self.members.get(i) else {
                continue;
            };
            let got = manifest::digest(self.member_source(i)?.as_ref(), e.algo)?;
            if got != e.digest {
                out.push(
                    Finding::reject(
                        "ova.manifest-mismatch",
                        format!(
                            "{:?} {:?} digest is {got}, the manifest says {}",
                            m.name, e.algo, e.digest
                        ),
                    )
                    .at(m.offset),
                );
            }
        }
        Ok(out)
    }

    /// The whole `ova check` policy: archive findings, manifest digests, and for every disk
    /// its declared format and capacity, its own findings and its structural check.
    /// Findings are sorted, rejections first.
    ///
    /// # Errors
    /// Only `Io` errors; every other problem is a finding.
    pub fn check_all(&self, limits: &Limits) -> Result<Vec<Finding>> {
        let mut out = self.findings.clone();
        out.extend(self.verify_manifest()?);
        // One cap for all gzip-compressed disks together.
        let budget = inflate_budget(limits);
        for d in &self.disks {
            if d.member.is_none() {
                if d.href.is_some() {
                    continue; // reported as ova.href
                }
                out.push(Finding::info(
                    "ova.disk-blank",
                    format!(
                        "disk {} ({:?}) has no file: a blank disk created on import",
                        d.index, d.desc.disk_id
                    ),
                ));
                continue;
            }
            match self.open_one(d.index, limits, &budget) {
                Ok(o) => {
                    out.extend(o.findings);
                    out.extend(o.image.findings().iter().cloned().map(|f| about_disk(f, d)));
                    match o.image.check(limits) {
                        Ok(more) => out.extend(more.into_iter().map(|f| about_disk(f, d))),
                        Err(e) if e.kind() == ErrorKind::Io => return Err(e),
                        Err(e) => out.push(about_disk(Finding::from_error(&e), d)),
                    }
                }
                Err(e) if e.kind() == ErrorKind::Io => return Err(e),
                Err(e) => out.push(about_disk(Finding::from_error(&e), d)),
            }
        }
        if self.disks.is_empty() && self.descriptor.is_some() {
            out.push(Finding::warn(
                "ova.no-disks",
                "the descriptor lists no disks",
            ));
        }
        out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.offset.cmp(&b.offset)));
        out.dedup();
        Ok(out)
    }

    /// Extracts every regular-file member into `dir` (created if missing) — but only when
    /// [`Ova::check_all`] finds nothing to reject. Each member is written to a temporary file
    /// in `dir` and renamed into place (never replacing a file) only once all are written, so
    /// nothing is overwritten or left half-written; names are single plain components, so
    /// nothing lands outside `dir`. On any error the files created so far are removed.
    ///
    /// # Errors
    /// `Io` for write errors (including a name that already exists in `dir`).
    ///
    /// # Security
    /// Writes nothing at all for a rejected archive; never creates links, devices or
    /// directories other than `dir`.
    pub fn extract(&self, dir: &Path, limits: &Limits) -> Result<Extraction> {
        let findings = self.check_all(limits)?;
        if findings.iter().any(|f| f.severity == Severity::Reject) {
            return Ok(Extraction {
                written: Vec::new(),
                findings,
                rejected: true,
            });
        }
        let mut plan = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.kind != MemberKind::Regular {
                continue;
            }
            // check_all rejected every unsafe name; this is a second line of defence.
            let name = check::normalized_name(m)
                .filter(|_| check::name_problem(m).is_none())
                .ok_or_else(|| {
                    Error::unsafe_(format!("member name {:?} is unsafe", m.name))
                        .code("ova.member-name")
                })?;
            plan.push((i, dir.join(name)));
        }
        for (_, p) in &plan {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(Error::io(
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                    format!("{} already exists; nothing was extracted", p.display()),
                ));
            }
        }
        let created_dir = std::fs::symlink_metadata(dir).is_err();
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
        let written = self.write_all(plan).inspect_err(|_| {
            if created_dir {
                // Only succeeds when empty: never removes anything but our own directory.
                let _ = std::fs::remove_dir(dir);
            }
        })?;
        Ok(Extraction {
            written,
            findings,
            rejected: false,
        })
    }

    /// Writes every planned member to a temporary file beside its destination, then, once all
    /// are written, renames each into place without replacing anything. On any failure the
    /// temporary files and the files already renamed are removed: an existing file is never
    /// opened for writing, truncated or replaced.
    fn write_all(&self, plan: Vec<(usize, PathBuf)>) -> Result<Vec<PathBuf>> {
        let mut temps = Vec::new();
        for (i, path) in plan {
            // Dropping a temporary file removes it.
            temps.push((self.write_member(i, &path)?, path));
        }
        let mut written: Vec<PathBuf> = Vec::new();
        for (tmp, path) in temps {
            if let Err(e) = tmp.persist_noclobber(&path) {
                for p in &written {
                    let _ = std::fs::remove_file(p);
                }
                return Err(Error::io(
                    e.error,
                    format!("renaming into {}", path.display()),
                ));
            }
            written.push(path);
        }
        Ok(written)
    }

    fn write_member(&self, i: usize, path: &Path) -> Result<tempfile::NamedTempFile> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let dir = path.parent().unwrap_or(Path::new("."));
        let werr = |e: std::io::Error| Error::io(e, format!("writing {}", path.display()));
        let mut tmp = tempfile::Builder::new()
            .prefix(".glimpse-extract-")
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(|e| Error::io(e, format!("creating a temporary file in {}", dir.display())))?;
        let src = self.member_source(i)?;
        let f = tmp.as_file_mut();
        crate::io::for_each_chunk(src.as_ref(), |chunk, _| f.write_all(chunk).map_err(werr))?;
        f.sync_all().map_err(werr)?;
        Ok(tmp)
    }
}

/// What [`Ova::extract`] did.
#[derive(Debug)]
pub struct Extraction {
    /// Files written, in archive order (empty when rejected).
    pub written: Vec<PathBuf>,
    /// The check's findings.
    pub findings: Vec<Finding>,
    /// True when the check rejected the archive and nothing was written.
    pub rejected: bool,
}

/// One disk of an OVA opened as an image: the disk's mapping and data, the appliance's facts
/// and findings.
pub struct OvaImage {
    ova: Ova,
    disk: DiskEntry,
    inner: Box<dyn Image>,
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
        ImageCore {
            info: &self.info,
            findings: &self.findings,
            source: self.inner.source(),
        }
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
}

/// Opens disk `disk` (0-based, in the descriptor's `DiskSection` order; `None` for the first
/// disk backed by a file) of the OVA in `src`.
///
/// # Errors
/// As [`read_ova`] and [`Ova::open_disk`]; `Invalid` (`ova.descriptor-missing`) when there
/// is no usable descriptor or no disk.
pub fn open_disk(src: Source, limits: &Limits, disk: Option<usize>) -> Result<Box<dyn Image>> {
    let ova = read_ova(src, limits)?;
    if ova.descriptor.is_none() {
        let f = ova
            .findings
            .iter()
            .find(|f| f.code.starts_with("ova.descriptor"))
            .map(|f| f.message.clone())
            .unwrap_or_else(|| "no usable descriptor".into());
        let code = if ova.descriptor_member.is_none() {
            "ova.descriptor-missing"
        } else {
            "ova.descriptor-malformed"
        };
        return Err(Error::invalid(f).code(code));
    }
    let i = match disk {
        Some(i) => i,
        None => ova.default_disk().ok_or_else(|| {
            Error::invalid("the descriptor lists no disk with a file").code("ova.no-disks")
        })?,
    };
    Ok(Box::new(ova.open_disk(i, limits)?))
}
