//! Reading an archive: the tar walk, the descriptor, the member index, references and disks,
//! the manifest and certificates, each phase adding its archive-level findings.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::finding::Finding;
use crate::io::Source;
use crate::limits::{Budget, Limits};

use super::check::{self, HrefKind};
use super::disk::Shared;
use super::tar::{self, Member, MemberKind};
use super::{is_ext, manifest, ovf, Descriptor, DiskEntry, FileRef, Manifest, Ova};

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

    let ovfs = named(&members, "ovf");
    let descriptor_member = ovfs.first().copied();
    descriptor_place(&members, &ovfs, &mut findings);
    let descriptor = match descriptor_member.and_then(|i| members.get(i)) {
        Some(m) => read_descriptor(&src, m, &budget, &mut findings)?,
        None => None,
    };

    let index = NameIndex::new(&members);
    let mut disks = Vec::new();
    if let Some(d) = &descriptor {
        let at = descriptor_member
            .and_then(|i| members.get(i))
            .map_or(0, |m| m.offset);
        for f in &d.files {
            reference_findings(f, &members, &index, at, &mut findings);
        }
        disks = disk_entries(d, &index, &mut findings);
    }

    let manifest = read_manifest(&src, &members, &index, &budget, &mut findings)?;
    certificate_findings(&members, &mut findings);

    let shared = Arc::new(Shared::new(budget, limits, &disks));
    Ok(Ova {
        src,
        shared,
        members,
        descriptor_member,
        descriptor,
        manifest,
        disks,
        findings,
    })
}

/// The regular members whose name ends in `.ext`, in archive order.
fn named(members: &[Member], ext: &str) -> Vec<usize> {
    members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.kind == MemberKind::Regular && is_ext(&m.name, ext))
        .map(|(i, _)| i)
        .collect()
}

/// The descriptor's place: missing, repeated, or not the first member.
fn descriptor_place(members: &[Member], ovfs: &[usize], findings: &mut Vec<Finding>) {
    match ovfs {
        [] => findings.push(Finding::reject(
            "ova.descriptor-missing",
            "the archive has no .ovf descriptor",
        )),
        [_, more @ ..] => {
            for m in more.iter().filter_map(|i| members.get(*i)) {
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
    let Some((i, m)) = ovfs.first().and_then(|i| Some((*i, members.get(*i)?))) else {
        return;
    };
    // OVF 1.1 (DSP0243) 5.3: the descriptor shall be the first file. A descriptor written
    // last (some exporters stream disks first) is readable, so only warned about.
    if i == 0 {
        return;
    }
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

/// Parses the descriptor member `m`. A descriptor that does not parse is a finding.
fn read_descriptor(
    src: &Source,
    m: &Member,
    budget: &Budget,
    findings: &mut Vec<Finding>,
) -> Result<Option<Descriptor>> {
    let parsed = if m.size > ovf::MAX_DESCRIPTOR {
        Err(Error::limit(format!(
            "descriptor of {} bytes exceeds {}",
            m.size,
            ovf::MAX_DESCRIPTOR
        ))
        .code("ova.descriptor-malformed"))
    } else {
        crate::io::read_vec(src.as_ref(), m.offset, m.size, budget, "OVF descriptor")
            .and_then(|b| ovf::parse(&b))
    };
    match parsed {
        Ok(d) => {
            for p in &d.problems {
                findings.push(Finding::reject("ova.descriptor-malformed", p.clone()).at(m.offset));
            }
            Ok(Some(d))
        }
        Err(e) if e.kind() == ErrorKind::Io => Err(e),
        Err(e) => {
            findings.push(Finding::reject("ova.descriptor-malformed", e.to_string()).at(m.offset));
            Ok(None)
        }
    }
}

/// The first member of each (normalized) name; a repeat is already an `ova.member-name`
/// finding. Other readers' names count too (a GNU sparse 1.0 member is found by its real
/// name), after glimpse's own.
struct NameIndex<'a>(HashMap<&'a str, usize>);

impl<'a> NameIndex<'a> {
    fn new(members: &'a [Member]) -> Self {
        let mut by_name = HashMap::new();
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
        NameIndex(by_name)
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.0.get(name).copied()
    }
}

/// One `References` file: where its href points, its size, chunking and compression.
fn reference_findings(
    f: &FileRef,
    members: &[Member],
    index: &NameIndex<'_>,
    at: u64,
    findings: &mut Vec<Finding>,
) {
    let href = |msg: String| Finding::reject("ova.href", msg).at(at);
    match check::href_kind(&f.href) {
        HrefKind::Url => findings.push(href(format!(
            "file {:?} is a URL {:?}, outside the archive",
            f.id, f.href
        ))),
        HrefKind::Path => findings.push(href(format!(
            "file {:?} href {:?} is a path, not a member name",
            f.id, f.href
        ))),
        HrefKind::Name => match index.get(&f.href).and_then(|i| members.get(i)) {
            None => findings.push(href(format!(
                "file {:?} names {:?}, which is not in the archive",
                f.id, f.href
            ))),
            Some(m) => {
                if let Some(size) = f.size.filter(|s| *s != m.size) {
                    findings.push(
                        Finding::reject(
                            "ova.size-mismatch",
                            format!(
                                "member {:?} has {} bytes but References says {size}",
                                m.name, m.size
                            ),
                        )
                        .at(m.header_offset),
                    );
                }
            }
        },
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

/// The descriptor's disks with the member holding each; a disk naming an unlisted file or a
/// file another disk already uses is malformed.
fn disk_entries(
    d: &Descriptor,
    index: &NameIndex<'_>,
    findings: &mut Vec<Finding>,
) -> Vec<DiskEntry> {
    let mut disks: Vec<DiskEntry> = Vec::new();
    for (i, desc) in d.disks.iter().enumerate() {
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
            .and_then(|f| index.get(&f.href));
        if let Some(other) = disks
            .iter()
            .find(|e| e.member.is_some() && e.member == member)
        {
            findings.push(Finding::reject(
                "ova.descriptor-malformed",
                format!("disks {} and {i} are backed by the same file", other.index),
            ));
        }
        disks.push(DiskEntry::new(i, desc, file, member));
    }
    disks
}

/// The manifest: the first `.mf` member parsed, a second one rejected, none reported.
fn read_manifest(
    src: &Source,
    members: &[Member],
    index: &NameIndex<'_>,
    budget: &Budget,
    findings: &mut Vec<Finding>,
) -> Result<Option<Manifest>> {
    let mfs = named(members, "mf");
    for m in mfs.iter().skip(1).filter_map(|i| members.get(*i)) {
        findings.push(
            Finding::reject(
                "ova.manifest-multiple",
                format!("a second manifest {:?}", m.name),
            )
            .at(m.header_offset),
        );
    }
    let Some(m) = mfs.first().and_then(|i| members.get(*i)) else {
        findings.push(Finding::info(
            "ova.manifest-absent",
            "the archive has no manifest: member integrity is not verified",
        ));
        return Ok(None);
    };
    let parsed = if m.size > manifest::MAX_MANIFEST {
        Err(Error::limit(format!(
            "manifest of {} bytes exceeds {}",
            m.size,
            manifest::MAX_MANIFEST
        ))
        .code("ova.manifest-malformed"))
    } else {
        crate::io::read_vec(src.as_ref(), m.offset, m.size, budget, "manifest")
            .and_then(|b| manifest::parse(&b))
    };
    match parsed {
        Ok(all) => Ok(Some(manifest_entries(
            m, all, members, &mfs, index, findings,
        ))),
        Err(e) if e.kind() == ErrorKind::Io => Err(e),
        Err(e) => {
            findings.push(Finding::reject("ova.manifest-malformed", e.to_string()).at(m.offset));
            Ok(None)
        }
    }
}

/// The manifest's lines against the archive: repeats, missing members, SHA-1 only, and
/// members the manifest does not cover.
fn manifest_entries(
    m: &Member,
    all: Vec<manifest::Entry>,
    members: &[Member],
    mfs: &[usize],
    index: &NameIndex<'_>,
    findings: &mut Vec<Finding>,
) -> Manifest {
    // Each file is digested once: a manifest naming one big member a thousand times must not
    // cost a thousand reads.
    let mut seen = HashSet::new();
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
    for e in entries.iter().filter(|e| index.get(&e.name).is_none()) {
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
    if !entries.is_empty() && entries.iter().all(|e| e.algo == manifest::Algo::Sha1) {
        findings.push(
            Finding::warn(
                "ova.manifest-sha1",
                "the manifest uses only SHA-1, which is broken for collisions; use SHA-256",
            )
            .at(m.offset),
        );
    }
    for (j, other) in members.iter().enumerate() {
        let covered = check::normalized_name(other).is_some_and(|n| seen.contains(n));
        if other.kind == MemberKind::Regular
            && mfs.binary_search(&j).is_err() // mfs is in archive order
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
    Manifest {
        name: m.name.clone(),
        entries,
    }
}

/// Certificates are reported, never verified.
fn certificate_findings(members: &[Member], findings: &mut Vec<Finding>) {
    for m in named(members, "cert")
        .iter()
        .filter_map(|i| members.get(*i))
    {
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
