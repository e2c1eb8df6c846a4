//! What `ova list` and `ova check` take: an OVA archive, or a standalone `.ovf` descriptor
//! with its files beside it. The listing and the verdict are built here; the command line
//! only prints them.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{ErrorKind, Result};
use crate::finding::{Finding, Severity};
use crate::format::Format;
use crate::io::{ReadAt, Source};
use crate::limits::Limits;

use super::{read_ova, read_ovf_dir, DiskEntry, Manifest, Ova, OvfDir};

/// True when `path` names a standalone descriptor (`.ovf`, any case) rather than an archive.
pub fn is_ovf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("ovf"))
}

/// A read appliance.
#[derive(Clone)]
pub enum Appliance {
    /// An OVA archive.
    Archive(Ova),
    /// A standalone descriptor and its siblings.
    Dir(OvfDir),
}

/// An appliance that could not be read at all is a rejection (the finding), not an error;
/// only an `Io` error stays an error.
///
/// # Errors
/// The `Io` error of `read`.
pub fn or_rejection(read: Result<Appliance>) -> Result<std::result::Result<Appliance, Finding>> {
    match read {
        Ok(a) => Ok(Ok(a)),
        Err(e) if e.kind() == ErrorKind::Io => Err(e),
        Err(e) => Ok(Err(Finding::from_error(&e))),
    }
}

/// Reads the archive in `src`.
///
/// # Errors
/// As [`read_ova`].
pub fn read_archive(src: Source, limits: &Limits) -> Result<Appliance> {
    read_ova(src, limits).map(Appliance::Archive)
}

/// Reads the standalone descriptor at `path`.
///
/// # Errors
/// As [`read_ovf_dir`].
pub fn read_dir(path: &Path, limits: &Limits) -> Result<Appliance> {
    read_ovf_dir(path, limits).map(Appliance::Dir)
}

/// For a file that should be an archive: `Some(format)` (what it looks like instead) when it
/// is no tar at all (no ustar magic, not detected as OVA), so that a listing can say so
/// rather than list nothing.
///
/// # Errors
/// `Io`.
pub fn not_a_tar(src: &dyn ReadAt) -> Result<Option<Format>> {
    let det = crate::detect::detect(src)?;
    let mut magic = [0u8; 5];
    let ustar = src.read_exact_at(&mut magic, 257).is_ok() && &magic == b"ustar";
    Ok((!ustar && !det.matches.contains(&Format::Ova)).then(|| det.format()))
}

/// `"reject"` when any finding rejects, else `"pass"`.
pub fn verdict(findings: &[Finding]) -> &'static str {
    if findings.iter().any(|f| f.severity == Severity::Reject) {
        "reject"
    } else {
        "pass"
    }
}

/// The disk rows of a listing: the descriptor's facts plus what opening each disk shows
/// (`facts`: the detected format and virtual size, or the error).
fn disk_rows(
    disks: &[DiskEntry],
    mut facts: impl FnMut(usize) -> std::result::Result<(Format, u64), String>,
) -> Vec<Value> {
    disks
        .iter()
        .map(|d| {
            let mut v = serde_json::to_value(d).unwrap_or_default();
            if let (Some(fmt), Some(obj)) = (d.desc.format_name(), v.as_object_mut()) {
                obj.insert("format".into(), fmt.into());
            }
            if d.href.is_some() {
                let facts = match facts(d.index) {
                    Ok((format, vsize)) => vec![
                        ("detected-format", format.name().into()),
                        ("virtual-size", vsize.into()),
                    ],
                    Err(e) => vec![("error", e.into())],
                };
                if let Some(obj) = v.as_object_mut() {
                    for (k, x) in facts {
                        obj.insert(k.into(), x);
                    }
                }
            }
            v
        })
        .collect()
}

/// The manifest's distinct algorithms, in first-seen order.
fn algorithms(m: &Manifest) -> Vec<Value> {
    let mut v: Vec<Value> = Vec::new();
    for e in &m.entries {
        let a = serde_json::to_value(e.algo).unwrap_or_default();
        if !v.contains(&a) {
            v.push(a);
        }
    }
    v
}

impl Appliance {
    /// The `ova list` document for the file `filename`: members (archives), references
    /// (directories), disks with what opening each shows, virtual systems and the manifest.
    pub fn listing(&self, filename: &str, limits: &Limits) -> Value {
        match self {
            Appliance::Archive(o) => {
                let members: Vec<Value> = o
                    .members
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let mut v = serde_json::to_value(m).unwrap_or_default();
                        if let Some(obj) = v.as_object_mut() {
                            obj.insert("index".into(), i.into());
                        }
                        v
                    })
                    .collect();
                let descriptor = o.descriptor.as_ref();
                json!({
                    "filename": filename,
                    "members": members,
                    "descriptor": o.descriptor_member.and_then(|i| o.members.get(i)).map(|m| m.name.clone()),
                    "manifest": o.manifest.as_ref().map(|m| json!({
                        "name": m.name,
                        "algorithms": algorithms(m),
                        "entries": m.entries.len(),
                    })),
                    "disks": disk_rows(&o.disks, |i| {
                        // Each distinct member opened once ([`Ova::open_inner`] shares it).
                        o.open_inner(i, limits)
                            .map(|img| (img.info().format, img.info().virtual_size))
                            .map_err(|e| e.to_string())
                    }),
                    "references": descriptor.map(|d| d.files.clone()).unwrap_or_default(),
                    "virtual-systems": descriptor.map(|d| d.systems.clone()).unwrap_or_default(),
                })
            }
            Appliance::Dir(d) => {
                let mut facts = d.facts(limits);
                let disks = disk_rows(&d.disks(), |i| facts.get(i));
                json!({
                    "filename": filename,
                    "references": d.references,
                    "disks": disks,
                    "virtual-systems": d.descriptor.systems,
                })
            }
        }
    }

    /// Every `ova check` finding, sorted, rejections first.
    ///
    /// # Errors
    /// Only `Io` errors; every other problem is a finding.
    pub fn check(&self, limits: &Limits) -> Result<Vec<Finding>> {
        match self {
            Appliance::Archive(o) => o.check_all(limits),
            Appliance::Dir(d) => d.check_all(limits),
        }
    }
}
