//! A standalone `.ovf` descriptor with its files beside it (an "OVF directory").
//!
//! # Security
//! This is glimpse's one explicit, deny-by-default gate to a file an image names. Reading the
//! descriptor ([`read_ovf_dir`]) opens nothing else: references are reported. Only
//! [`OvfDir::open_disk`], which a caller must ask for, opens a referenced file, and only when
//! its href is a single plain file name (no scheme, no `/` or `\`, no `..`, no `%`-escape) and
//! it is a regular file (not a symlink, opened with `O_NOFOLLOW`) in the descriptor's own
//! directory.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::finding::Finding;
use crate::format::Format;
use crate::image::Image;
use crate::io::{ReadAt, Source};
use crate::limits::Limits;

use super::check::{href_kind, HrefKind};
use super::ovf::{self, Descriptor, FileRef};

/// A referenced file and whether it may be opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SiblingRef {
    /// The descriptor's `File`.
    #[serde(flatten)]
    pub file: FileRef,
    /// True when the href is a plain name of a regular file beside the descriptor.
    pub openable: bool,
    /// The sibling's size in bytes, when openable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
}

/// A read OVF directory.
#[derive(Debug, Clone)]
pub struct OvfDir {
    /// The descriptor's path.
    pub path: PathBuf,
    /// What it says.
    pub descriptor: Descriptor,
    /// Its references, in order.
    pub references: Vec<SiblingRef>,
    /// `ova.href`, `ova.size-mismatch`, `ova.descriptor-malformed` findings.
    pub findings: Vec<Finding>,
}

fn sibling(dir: &Path, href: &str) -> Option<(PathBuf, u64)> {
    if href_kind(href) != HrefKind::Name {
        return None;
    }
    let p = dir.join(href);
    let md = std::fs::symlink_metadata(&p).ok()?;
    md.file_type().is_file().then_some((p, md.len()))
}

/// Reads the descriptor at `path` and reports its references without opening them.
///
/// # Errors
/// `Io` when the descriptor cannot be read; `LimitExceeded` when it is larger than
/// [`ovf::MAX_DESCRIPTOR`]; as [`ovf::parse`].
pub fn read_ovf_dir(path: &Path, limits: &Limits) -> Result<OvfDir> {
    let f = std::fs::File::open(path)
        .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
    let size = f.size()?;
    if size > ovf::MAX_DESCRIPTOR {
        return Err(Error::limit(format!(
            "descriptor of {size} bytes exceeds {}",
            ovf::MAX_DESCRIPTOR
        ))
        .code("ova.descriptor-malformed"));
    }
    let bytes = crate::io::read_vec(&f, 0, size, &limits.budget(), "OVF descriptor")?;
    let descriptor = ovf::parse(&bytes)?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut findings: Vec<Finding> = descriptor
        .problems
        .iter()
        .map(|p| Finding::reject("ova.descriptor-malformed", p.clone()))
        .collect();
    let mut references = Vec::new();
    for file in &descriptor.files {
        let found = sibling(&dir, &file.href);
        match (href_kind(&file.href), &found) {
            (HrefKind::Url, _) => findings.push(Finding::reject(
                "ova.href",
                format!("file {:?} is a URL", file.href),
            )),
            (HrefKind::Path, _) => findings.push(Finding::reject(
                "ova.href",
                format!("file {:?} is a path, not a sibling name", file.href),
            )),
            (HrefKind::Name, None) => findings.push(Finding::reject(
                "ova.href",
                format!(
                    "file {:?} is not a regular file beside the descriptor",
                    file.href
                ),
            )),
            (HrefKind::Name, Some((_, len))) => {
                if let Some(s) = file.size.filter(|s| s != len) {
                    findings.push(Finding::reject(
                        "ova.size-mismatch",
                        format!("{:?} has {len} bytes but References says {s}", file.href),
                    ));
                }
            }
        }
        references.push(SiblingRef {
            file: file.clone(),
            openable: found.is_some(),
            actual_size: found.map(|(_, l)| l),
        });
    }
    Ok(OvfDir {
        path: path.to_path_buf(),
        descriptor,
        references,
        findings,
    })
}

impl OvfDir {
    /// The descriptor's disks, in `DiskSection` order (no archive members: `member` is
    /// `None`).
    pub fn disks(&self) -> Vec<super::DiskEntry> {
        let d = &self.descriptor;
        d.disks
            .iter()
            .enumerate()
            .map(|(index, desc)| {
                let file = desc.file_ref.as_deref().and_then(|id| d.file(id));
                super::DiskEntry::new(index, desc, file, None)
            })
            .collect()
    }

    /// Every file the descriptor names (each `File`'s href, whatever its kind), as references
    /// of kind `Href` resolved against the descriptor's directory: the files `ova` commands
    /// read beside it, which a command writing a destination must not replace. Nothing is
    /// opened or stat-ed here.
    pub fn file_references(&self) -> Vec<crate::image::Reference> {
        self.descriptor
            .files
            .iter()
            .map(|f| crate::image::Reference {
                kind: crate::image::RefKind::Href,
                target: f.href.clone(),
                format: None,
                offset: None,
            })
            .collect()
    }

    /// Opens disk `disk` (0-based, `DiskSection` order) from the file beside the descriptor:
    /// the explicit gate described in the module docs. A `gzip` file is decompressed under
    /// `limits` (see [`super::gunzip`]).
    ///
    /// # Errors
    /// `Unsafe` (`ova.href`) when the href is not a plain sibling name or the file is not a
    /// regular file; `Io`; whatever the disk's parser reports.
    pub fn open_disk(&self, disk: usize, limits: &Limits) -> Result<Box<dyn Image>> {
        let (f, file) = self.sibling_file(disk)?;
        image_of(f, file, disk, limits)
    }

    /// Disk `disk`'s file beside the descriptor, opened (nothing read yet), and its
    /// `References` entry.
    fn sibling_file(&self, disk: usize) -> Result<(std::fs::File, &FileRef)> {
        let d = self
            .descriptor
            .disks
            .get(disk)
            .ok_or_else(|| Error::invalid(format!("there is no disk {disk}")))?;
        let file = d
            .file_ref
            .as_deref()
            .and_then(|id| self.descriptor.file(id))
            .ok_or_else(|| Error::invalid(format!("disk {disk} has no file")).code("ova.href"))?;
        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let (path, _) = sibling(&dir, &file.href).ok_or_else(|| {
            Error::unsafe_(format!(
                "{:?} is not a plain file name beside the descriptor",
                file.href
            ))
            .code("ova.href")
        })?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io(e, format!("opening {}", path.display())))?;
        Ok((f, file))
    }

    /// What the `ova list` rows show of each disk ([`DiskFacts`]): each distinct file opened
    /// once, however many disks name it.
    pub(super) fn facts(&self, limits: &Limits) -> DiskFacts<'_> {
        DiskFacts {
            dir: self,
            limits: limits.clone(),
            seen: HashMap::new(),
        }
    }

    /// Every `ova check` finding for the directory: the descriptor's findings, then for each
    /// disk whose file may be opened its own findings, its structural check and its
    /// capacity; sorted, rejections first. Each distinct file ([`FileKey`]: the same file
    /// under any name, read the same way) is opened and checked once, under the first disk
    /// naming it: a later disk naming it is rejected as the archive rejects a shared member
    /// (`ova.descriptor-malformed`), and its capacity compared with the size found once.
    ///
    /// # Errors
    /// `Io`, and any error of a disk's structural check.
    pub fn check_all(&self, limits: &Limits) -> Result<Vec<Finding>> {
        let mut out = self.findings.clone();
        // For each file judged: the first disk naming it and the virtual size found.
        let mut seen: HashMap<FileKey, (usize, Option<u64>)> = HashMap::new();
        for (i, r) in self.descriptor.disks.iter().enumerate() {
            let openable = r
                .file_ref
                .as_deref()
                .and_then(|id| self.references.iter().find(|s| s.file.id == id))
                .is_some_and(|s| s.openable);
            if !openable {
                continue; // reported as ova.href
            }
            let capacity = |vsize: u64| {
                r.capacity.filter(|c| *c != vsize).map(|cap| {
                    Finding::reject(
                        "ova.capacity-mismatch",
                        format!("disk {i}: capacity {cap} but virtual size {vsize}"),
                    )
                })
            };
            let (f, file) = match self.sibling_file(i) {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::Io => return Err(e),
                Err(e) => {
                    out.push(Finding::from_error(&e));
                    continue;
                }
            };
            let key = file_key(&f, file)?;
            if let Some((first, vsize)) = seen.get(&key) {
                out.push(Finding::reject(
                    "ova.descriptor-malformed",
                    format!(
                        "disks {first} and {i} are backed by the same file: it is opened and \
                         checked once, and its findings are disk {first}'s"
                    ),
                ));
                out.extend(vsize.and_then(capacity));
                continue;
            }
            match image_of(f, file, i, limits) {
                Ok(img) => {
                    out.extend(img.findings().iter().cloned());
                    out.extend(img.check(limits)?);
                    let vsize = img.info().virtual_size;
                    out.extend(capacity(vsize));
                    seen.insert(key, (i, Some(vsize)));
                }
                Err(e) if e.kind() == ErrorKind::Io => return Err(e),
                Err(e) => {
                    out.push(Finding::from_error(&e));
                    seen.insert(key, (i, None));
                }
            }
        }
        out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.offset.cmp(&b.offset)));
        Ok(out)
    }
}

/// What makes two disks' files the same: the file (device and inode, so that a second name
/// for it, a hard link or another case on a case-insensitive file system, is the same file),
/// and how it is read (its compression).
type FileKey = (u64, u64, Option<String>);

/// The key of an opened sibling, from the open file itself (not from its name, which may
/// have been replaced since).
///
/// # Errors
/// `Io` when the file cannot be stat'ed.
fn file_key(f: &std::fs::File, file: &FileRef) -> Result<FileKey> {
    let md = f
        .metadata()
        .map_err(|e| Error::io(e, format!("reading the metadata of {:?}", file.href)))?;
    let compression = file.compression.clone().filter(|c| c != "identity");
    Ok((md.dev(), md.ino(), compression))
}

/// An opened sibling as its disk format: inflated first when gzip, detected, opened.
fn image_of(
    f: std::fs::File,
    file: &FileRef,
    disk: usize,
    limits: &Limits,
) -> Result<Box<dyn Image>> {
    let src: Source = match file.compression.as_deref() {
        None | Some("identity") => Arc::new(f),
        Some("gzip") => super::gunzip(&f, limits)?,
        Some(c) => {
            return Err(
                Error::unsupported(format!("compression {c:?}")).code("ova.file-unsupported")
            )
        }
    };
    let det = super::disk::detect_disk(src.as_ref(), disk)?;
    crate::open_disk_format(src, det.format(), limits)
}

/// The listing's facts of each disk of a directory (detected format and virtual size, or the
/// error), each distinct file opened once and dropped at once: what is kept is the facts.
pub(super) struct DiskFacts<'a> {
    dir: &'a OvfDir,
    limits: Limits,
    seen: HashMap<FileKey, std::result::Result<(Format, u64), String>>,
}

impl DiskFacts<'_> {
    /// Disk `disk`'s facts.
    pub(super) fn get(&mut self, disk: usize) -> std::result::Result<(Format, u64), String> {
        let (f, file) = self.dir.sibling_file(disk).map_err(|e| e.to_string())?;
        let key = file_key(&f, file).map_err(|e| e.to_string())?;
        if let Some(done) = self.seen.get(&key) {
            return done.clone();
        }
        let got = image_of(f, file, disk, &self.limits)
            .map(|img| (img.info().format, img.info().virtual_size))
            .map_err(|e| e.to_string());
        self.seen.insert(key, got.clone());
        got
    }
}
