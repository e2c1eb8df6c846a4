//! The verdicts built on a read archive: manifest digests, `ova check`'s whole policy, and the
//! gate's per-disk inspection.

use std::sync::atomic::AtomicBool;

use crate::error::{ErrorKind, Result};
use crate::finding::Finding;
use crate::format::Format;

use super::tar::MemberKind;

use super::disk::about_disk;
use super::{check, manifest, Ova};
use crate::limits::Limits;

impl Ova {
    /// Applies the gate's `policy` to every disk backed by a file except `skip` (the disk a
    /// caller already inspected through [`crate::policy::inspect`]), for a gate that checks
    /// every disk. Each disk gets its disk-level findings (declared format, capacity) and what
    /// [`crate::policy::inspect_image`] reports for the disk as this archive opened it (its
    /// findings, structural check, size limit, backing-file allowance), prefixed with the
    /// disk: each disk file is detected and opened once per archive, and inspected once,
    /// under the first disk naming it (`skip` counts): a later disk naming the same member
    /// gets its disk-level findings and the archive's `ova.descriptor-malformed` rejection
    /// (`disks F and N are backed by the same file`: F's findings are its file's), and
    /// nothing is run again. The archive is read once:
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
        let own = crate::policy::Policy {
            disk: None,
            expect_format: None,
            ..policy.clone()
        };
        let mut out = Vec::new();
        let mut done = Done::default();
        if let Some(s) = skip {
            done.first(self, s);
        }
        for d in self.disks.iter().filter(|d| d.href.is_some()) {
            if Some(d.index) == skip {
                continue;
            }
            let first = done.first(self, d.index);
            let findings = match (self.opened(d.index, limits), first) {
                (Ok(o), None) => {
                    let mut f: Vec<Finding> = o.findings.clone();
                    // The disk as opened above: neither detected nor opened again.
                    let r = crate::policy::inspect_image(
                        o.image().as_ref(),
                        &o.file.detection,
                        &own,
                        limits,
                    )?;
                    f.extend(r.into_iter().map(|x| about_disk(x, d)));
                    f
                }
                (Ok(o), Some(first)) => {
                    let mut f = o.findings.clone();
                    f.push(shared_file(d, first));
                    f
                }
                (Err(e), _) if e.kind() == ErrorKind::Io => return Err(e),
                (Err(e), None) => vec![about_disk(Finding::from_error(&e), d)],
                (Err(_), Some(first)) => vec![shared_file(d, first)],
            };
            out.push((d.index, findings));
        }
        Ok(out)
    }

    /// Findings for the regular members that are no disk of the descriptor (an ISO the
    /// descriptor references for a CD drive, a file it does not name) but hold an image
    /// format: `ova extract` writes them and a consumer may use them, so each gets the same
    /// structural check and policy findings as a disk, prefixed with its name. Members that
    /// detect as raw bytes (or as the descriptor, manifest and certificate) are left alone.
    ///
    /// # Errors
    /// Only `Io` errors; every other problem is a finding.
    pub fn other_members(&self, limits: &Limits) -> Result<Vec<Finding>> {
        let used: std::collections::HashSet<usize> =
            self.disks.iter().filter_map(|d| d.member).collect();
        let mut out = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let meta = ["ovf", "mf", "cert"]
                .iter()
                .any(|e| super::is_ext(&m.name, e));
            if m.kind != MemberKind::Regular || used.contains(&i) || meta {
                continue;
            }
            let about = |mut f: Finding| {
                f.message = format!(
                    "member {:?} (no disk of the descriptor): {}",
                    m.name, f.message
                );
                f
            };
            let src = self.member_source(i)?;
            let det = match super::disk::detect_disk(src.as_ref(), i) {
                Ok(d) => d,
                Err(e) if e.kind() == ErrorKind::Io => return Err(e),
                Err(e) => {
                    out.push(about(Finding::from_error(&e)));
                    continue;
                }
            };
            let format = det.format();
            if format == Format::Raw && !det.is_ambiguous() {
                continue;
            }
            let opened = super::disk::open_shared(src, format, limits, &self.shared.metadata)
                .and_then(|img| {
                    let mut f = img.findings().to_vec();
                    f.extend(img.check(limits)?);
                    Ok(f)
                });
            match opened {
                Ok(f) => out.extend(f.into_iter().map(about)),
                Err(e) if e.kind() == ErrorKind::Io => return Err(e),
                Err(e) => out.push(about(Finding::from_error(&e))),
            }
        }
        Ok(out)
    }

    /// Verifies every manifest digest by reading each listed member in full.
    ///
    /// # Errors
    /// `Io` when the archive cannot be read.
    pub fn verify_manifest(&self) -> Result<Vec<Finding>> {
        self.verify_manifest_with(None)
    }

    /// [`Ova::verify_manifest`] that stops with `Invalid` once `cancel` is set.
    ///
    /// # Errors
    /// As [`Ova::verify_manifest`]; `Invalid` when cancelled.
    pub fn verify_manifest_with(&self, cancel: Option<&AtomicBool>) -> Result<Vec<Finding>> {
        let mut out = Vec::new();
        let Some(mf) = &self.manifest else {
            return Ok(out);
        };
        // Each entry's member by name, not by a walk of every member per entry: a manifest
        // of many lines over an archive of many members is linear, not their product.
        let mut by_name = std::collections::HashMap::new();
        for (i, m) in self.members.iter().enumerate() {
            if let Some(n) = check::normalized_name(m) {
                by_name.entry(n).or_insert(i);
            }
        }
        for e in &mf.entries {
            let Some(&i) = by_name.get(e.name.as_str()) else {
                continue; // reported as ova.manifest-missing-member
            };
            let Some(m) = self.members.get(i) else {
                continue;
            };
            let got = manifest::digest_with(self.member_source(i)?.as_ref(), e.algo, cancel)?;
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
    /// Each disk file (a member, read one way) is opened and checked once, and its findings
    /// reported once, under the first disk naming it; the archive's findings already reject
    /// disks that share a member. Findings are sorted, rejections first.
    ///
    /// # Errors
    /// Only `Io` errors; every other problem is a finding.
    pub fn check_all(&self, limits: &Limits) -> Result<Vec<Finding>> {
        self.check_all_with(limits, None)
    }

    /// [`Ova::check_all`] that stops with `Invalid` once `cancel` is set: the manifest digests
    /// poll it before each chunk, the disks before each disk.
    ///
    /// # Errors
    /// As [`Ova::check_all`]; `Invalid` when cancelled.
    pub fn check_all_with(
        &self,
        limits: &Limits,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<Finding>> {
        let mut out = self.findings.clone();
        out.extend(self.verify_manifest_with(cancel)?);
        let mut done = Done::default();
        for d in &self.disks {
            super::stop_if_cancelled(cancel)?;
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
            let first = done.first(self, d.index);
            match (self.opened(d.index, limits), first) {
                (Ok(o), None) => {
                    out.extend(o.findings.iter().cloned());
                    let own = o.file.findings.iter().chain(o.image().findings());
                    out.extend(own.cloned().map(|f| about_disk(f, d)));
                    match o.image().check(limits) {
                        Ok(more) => out.extend(more.into_iter().map(|f| about_disk(f, d))),
                        Err(e) if e.kind() == ErrorKind::Io => return Err(e),
                        Err(e) => out.push(about_disk(Finding::from_error(&e), d)),
                    }
                }
                // The file's findings are the first disk's; the archive's findings already
                // reject the sharing (`disks 0 and N are backed by the same file`).
                (Ok(o), Some(_)) => out.extend(o.findings.iter().cloned()),
                (Err(e), _) if e.kind() == ErrorKind::Io => return Err(e),
                (Err(e), None) => out.push(about_disk(Finding::from_error(&e), d)),
                (Err(_), Some(_)) => {}
            }
        }
        super::stop_if_cancelled(cancel)?;
        out.extend(self.other_members(limits)?);
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
}

/// The disk files already judged in one pass over the disks, and by which disk: each file is
/// opened and checked once, under the first disk naming it, so that the work is the archive's
/// bytes, not its disks times a member.
#[derive(Default)]
struct Done(std::collections::HashMap<usize, usize>);

impl Done {
    /// The disk already judged for disk `disk`'s file, if any; else `disk` is now the one.
    fn first(&mut self, ova: &Ova, disk: usize) -> Option<usize> {
        let file = ova.shared.file_of(disk)?;
        match self.0.entry(file) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(disk);
                None
            }
        }
    }
}

/// Disk `d` names the file disk `first` names: the archive's own finding
/// (`ova.descriptor-malformed`, the same words, so a report holding both holds it once). The
/// file was judged once, under disk `first`, and is not again.
fn shared_file(d: &super::DiskEntry, first: usize) -> Finding {
    Finding::reject(
        "ova.descriptor-malformed",
        format!("disks {first} and {} are backed by the same file", d.index),
    )
}
