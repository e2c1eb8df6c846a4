//! The appliance's disks: which member holds each, its bytes (decompressed when gzip), and
//! the disk opened as an image with the disk-level findings (declared format, capacity).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use serde::Serialize;

use crate::detect::Detection;
use crate::error::{Error, ErrorKind, Result};
use crate::finding::Finding;
use crate::format::Format;
use crate::image::{Image, ImageInfo, RefKind, Reference};
use crate::io::{ReadAt, Source};
use crate::limits::{Budget, Limits};

use super::check::{self, HrefKind};
use super::gzip::{gunzip_with, Memory, SPOOL_MEMORY_TOTAL};
use super::ovf::{DiskDesc, FileRef};
use super::tar::MemberKind;
use super::{manifest, read_ova, Ova, OvaImage};

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

/// What every disk of one archive shares: one metadata budget (the archive's
/// `Limits::budget()`, charged by the walk, the descriptor, the manifest, every gzip disk held
/// in memory and then every disk's parser), one cap on inflated gzip bytes, one on gzip bytes
/// held in memory, each gzip member inflated at most once while a disk uses it, and each
/// distinct disk file (a member read one way: [`FileKey`]) opened at most once, however many
/// disks name it.
pub(super) struct Shared {
    pub(super) metadata: Budget,
    pub(super) inflate: Budget,
    /// Caps the in-memory gzip spools of the archive together ([`SPOOL_MEMORY_TOTAL`]).
    spool_memory: Budget,
    /// The inflated bytes of each gzip member, by member index, while a source holds them:
    /// disks naming one member share them (256 disks naming one member once inflated it 256
    /// times, and held it 256 times).
    inflated: Mutex<HashMap<usize, Weak<dyn ReadAt>>>,
    /// Each disk's file: an index into `files`, shared by every disk that names the same
    /// member the same way; `None` for a disk whose file is no member.
    file_of: Vec<Option<usize>>,
    /// Each distinct file opened, at most once: 256 disks naming one member once opened (and
    /// then checked) it 256 times, a cost of disks × member rather than of the archive.
    files: Vec<OnceLock<Result<Arc<OpenedFile>>>>,
    opened: Vec<OnceLock<Result<Arc<OpenedDisk>>>>,
}

/// What makes two disks' images the same: the member, and how it is read (its compression).
/// The format is detected from those bytes, so it follows.
type FileKey = (usize, Option<String>);

impl Shared {
    pub(super) fn new(metadata: Budget, limits: &Limits, disks: &[DiskEntry]) -> Self {
        let mut keys: HashMap<FileKey, usize> = HashMap::new();
        let file_of: Vec<Option<usize>> = disks
            .iter()
            .map(|d| {
                let member = d.member?;
                let next = keys.len();
                Some(*keys.entry((member, d.compression.clone())).or_insert(next))
            })
            .collect();
        Shared {
            metadata,
            inflate: Budget::new(limits.max_inflated_bytes),
            spool_memory: Budget::new(SPOOL_MEMORY_TOTAL),
            inflated: Mutex::new(HashMap::new()),
            file_of,
            files: (0..keys.len()).map(|_| OnceLock::new()).collect(),
            opened: (0..disks.len()).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Which distinct file disk `disk` reads (equal for disks naming one member the same
    /// way), when its file is a member.
    pub(super) fn file_of(&self, disk: usize) -> Option<usize> {
        self.file_of.get(disk).copied().flatten()
    }

    /// Member `member` inflated: the bytes a live source already holds, else inflated now
    /// (charged as [`super::gunzip`] says) and remembered while anything holds them.
    fn inflated(&self, member: usize, window: &dyn ReadAt, limits: &Limits) -> Result<Source> {
        // A poisoned lock only means another thread panicked; the map is still a cache.
        let mut map = self
            .inflated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(src) = map.get(&member).and_then(Weak::upgrade) {
            return Ok(src);
        }
        let memory = Memory {
            metadata: self.metadata.clone(),
            total: self.spool_memory.clone(),
        };
        let src = gunzip_with(window, limits, &self.inflate, &memory)?;
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(member, Arc::downgrade(&src));
        Ok(src)
    }
}

/// What `slot` remembers, or else `open`'s result, remembered unless it is an `Io` error (a
/// later call tries again): each disk, and each file disks name, is opened at most once.
fn once<T>(slot: &OnceLock<Result<Arc<T>>>, open: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
    if let Some(done) = slot.get() {
        return done.as_ref().map(Arc::clone).map_err(replay);
    }
    match open() {
        Ok(o) => {
            let o = Arc::new(o);
            let _ = slot.set(Ok(Arc::clone(&o)));
            Ok(o)
        }
        Err(e) if e.kind() == ErrorKind::Io => Err(e),
        Err(e) => {
            let _ = slot.set(Err(replay(&e)));
            Err(e)
        }
    }
}

/// The same error again, for a disk whose failed open is remembered. Only non-`Io` errors
/// are remembered, and they carry no I/O source, so nothing is lost.
fn replay(e: &Error) -> Error {
    let mut out = Error::new(e.kind(), e.message()).code(e.finding_code());
    if let Some(at) = e.offset() {
        out = out.at(at);
    }
    out
}

/// Detects a disk's format; an appliance inside an appliance is refused, because opening it
/// would recurse without bound.
///
/// # Errors
/// `Unsafe` (`ova.disk-format`) for a nested OVA; `Io`.
pub(super) fn detect_disk(src: &dyn ReadAt, disk: usize) -> Result<Detection> {
    let det = crate::detect::detect(src)?;
    if det.matches.contains(&Format::Ova) {
        return Err(Error::unsafe_(format!("disk {disk} is itself an OVA")).code("ova.disk-format"));
    }
    Ok(det)
}

/// Opens a disk of the archive as `format`, charging the archive's one budget: the command's
/// when its limits are per command, else one made for the archive. Every table the disk holds
/// stays charged until the disk is dropped.
///
/// # Errors
/// As [`crate::open()`]; `LimitExceeded` when the disks together pass the budget.
pub(super) fn open_shared(
    src: Source,
    format: Format,
    limits: &Limits,
    budget: &Budget,
) -> Result<Box<dyn Image>> {
    let own = Limits {
        shared: Some(budget.clone()),
        ..limits.clone()
    };
    crate::open_disk_format(src, format, &own)
}

/// Prefixes a disk's finding with which disk it is about.
pub(super) fn about_disk(mut f: Finding, d: &DiskEntry) -> Finding {
    f.message = format!(
        "disk {} ({}): {}",
        d.index,
        d.href.as_deref().unwrap_or("no file"),
        f.message
    );
    f
}

/// A disk file of the archive opened as its detected format: what every disk naming it
/// shares.
pub(super) struct OpenedFile {
    pub(super) image: Arc<dyn Image>,
    /// What detection found in the file's bytes.
    pub(super) detection: Detection,
    /// The file's own findings before its image's (an ambiguous format), not yet about a disk.
    pub(super) findings: Vec<Finding>,
}

/// A disk opened inside an OVA: its file, shared with any other disk naming it, and the
/// disk-level findings (declared format, capacity), already about the disk.
pub(super) struct OpenedDisk {
    pub(super) file: Arc<OpenedFile>,
    pub(super) findings: Vec<Finding>,
}

impl OpenedDisk {
    pub(super) fn image(&self) -> &Arc<dyn Image> {
        &self.file.image
    }
}

impl Ova {
    /// The disk's bytes: a window onto its member, or the decompressed member for
    /// `compression="gzip"` (see [`super::gunzip`] for the bound).
    ///
    /// # Errors
    /// `Invalid` for an unknown disk; `Unsupported` (`ova.href`) for a disk whose file is not a
    /// member; `Unsupported` for other compressions; as [`super::gunzip`].
    pub fn disk_source(&self, disk: usize, limits: &Limits) -> Result<Source> {
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
            Some("gzip") => self.shared.inflated(member, window.as_ref(), limits),
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

    /// Disk `disk` opened, at most once per archive: later calls get the same image (or the
    /// same error), so a command that lists, checks and opens disks parses each one once.
    ///
    /// # Errors
    /// As [`Ova::open_disk`]. An `Io` error is not remembered: a later call tries again.
    pub(super) fn opened(&self, disk: usize, limits: &Limits) -> Result<Arc<OpenedDisk>> {
        let slot = self
            .shared
            .opened
            .get(disk)
            .ok_or_else(|| self.no_such_disk(disk))?;
        once(slot, || self.open_one(disk, limits))
    }

    /// The file disk `disk` reads, opened at most once per archive whatever the number of
    /// disks naming it: later calls, for this disk or another, get the same image (or error).
    /// An `Io` error is not remembered.
    fn opened_file(&self, disk: usize, limits: &Limits) -> Result<Arc<OpenedFile>> {
        let Some(slot) = self
            .shared
            .file_of(disk)
            .and_then(|f| self.shared.files.get(f))
        else {
            // No member: `disk_source` says why, reading nothing.
            self.disk_source(disk, limits)?;
            return Err(Error::invalid(format!("disk {disk} has no member")).code("ova.href"));
        };
        once(slot, || self.open_file(disk, limits))
    }

    fn open_file(&self, disk: usize, limits: &Limits) -> Result<OpenedFile> {
        let src = self.disk_source(disk, limits)?;
        let det = detect_disk(src.as_ref(), disk)?;
        let mut findings = Vec::new();
        if det.is_ambiguous() {
            let names = det.names();
            findings.push(Finding::reject(
                "format.ambiguous",
                format!("the disk matches several formats: {}", names.join(", ")),
            ));
        }
        let image = open_shared(src, det.format(), limits, &self.shared.metadata)?;
        Ok(OpenedFile {
            image: Arc::from(image),
            detection: det,
            findings,
        })
    }

    fn open_one(&self, disk: usize, limits: &Limits) -> Result<OpenedDisk> {
        let d = self
            .disks
            .get(disk)
            .ok_or_else(|| self.no_such_disk(disk))?;
        let file = self.opened_file(disk, limits)?;
        let mut findings = Vec::new();
        let format = file.detection.format();
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
        let vsize = file.image.info().virtual_size;
        if let Some(cap) = d.desc.capacity {
            if cap != vsize {
                findings.push(Finding::reject(
                    "ova.capacity-mismatch",
                    format!("the descriptor's capacity is {cap} bytes but the {format} disk's virtual size is {vsize}"),
                ));
            }
        }
        let findings = findings.into_iter().map(|f| about_disk(f, d)).collect();
        Ok(OpenedDisk { file, findings })
    }

    /// Opens disk `disk`'s own image (its format's info, findings and mapping), without the
    /// appliance's facts and findings: for listing.
    ///
    /// # Errors
    /// As [`Ova::open_disk`].
    pub fn open_inner(&self, disk: usize, limits: &Limits) -> Result<Arc<dyn Image>> {
        Ok(Arc::clone(self.opened(disk, limits)?.image()))
    }

    /// Opens disk `disk` (0-based, `DiskSection` order) as an [`OvaImage`].
    ///
    /// # Errors
    /// As [`Ova::disk_source`], plus whatever the disk's own parser reports (`Unsafe`
    /// `ova.disk-format` for an OVA nested in the disk).
    pub fn open_disk(&self, disk: usize, limits: &Limits) -> Result<OvaImage> {
        let opened = self.opened(disk, limits)?;
        let d = self
            .disks
            .get(disk)
            .ok_or_else(|| self.no_such_disk(disk))?;
        let inner = Arc::clone(opened.image());
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
                    self.opened(e.index, limits)
                        .ok()
                        .map(|o| o.image().info().virtual_size)
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
        findings.extend(opened.findings.iter().cloned());
        let own = opened.file.findings.iter().chain(inner.findings());
        findings.extend(own.cloned().map(|f| about_disk(f, d)));
        Ok(OvaImage {
            ova: self.clone(),
            disk: d.clone(),
            inner,
            info,
            findings,
        })
    }
}

/// Opens disk `disk` (0-based, in the descriptor's `DiskSection` order; `None` for the first
/// disk backed by a file) of the OVA in `src`.
///
/// # Errors
/// As [`read_ova`] and [`Ova::open_selected`].
pub fn open_disk(src: Source, limits: &Limits, disk: Option<usize>) -> Result<Box<dyn Image>> {
    let ova = read_ova(src, limits)?;
    Ok(Box::new(ova.open_selected(disk, limits)?))
}

impl Ova {
    /// Opens disk `disk` (0-based, in the descriptor's `DiskSection` order; `None` for the
    /// first disk backed by a file) of this read archive, without reading the archive again.
    ///
    /// # Errors
    /// As [`Ova::open_disk`]; `Invalid` (`ova.descriptor-missing`,
    /// `ova.descriptor-malformed`) when there is no usable descriptor, (`ova.no-disks`) when
    /// no disk has a file.
    pub fn open_selected(&self, disk: Option<usize>, limits: &Limits) -> Result<OvaImage> {
        if self.descriptor.is_none() {
            let f = self
                .findings
                .iter()
                .find(|f| f.code.starts_with("ova.descriptor"))
                .map(|f| f.message.clone())
                .unwrap_or_else(|| "no usable descriptor".into());
            let code = if self.descriptor_member.is_none() {
                "ova.descriptor-missing"
            } else {
                "ova.descriptor-malformed"
            };
            return Err(Error::invalid(f).code(code));
        }
        let i = match disk {
            Some(i) => i,
            None => self.default_disk().ok_or_else(|| {
                Error::invalid("the descriptor lists no disk with a file").code("ova.no-disks")
            })?,
        };
        self.open_disk(i, limits)
    }
}
