//! The safety policy: detection, findings and the caller's expectations in, a verdict out.
//! `check`, `convert` and `upload` all call [`inspect`], so they apply exactly the same rules.

use serde::Serialize;

use crate::detect::Detection;
use crate::error::{Error, ErrorKind, Result};
use crate::finding::{Finding, Severity};
use crate::format::Format;
use crate::image::{Image, ImageInfo};
use crate::io::Source;
use crate::limits::Limits;

/// What the caller expects of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The declared format. A different detected format is a rejection (`format.mismatch`).
    pub expect_format: Option<Format>,
    /// Largest acceptable virtual size (`size.limit`). Glance's default `image_size_cap` is
    /// 1 TiB.
    pub max_virtual_size: Option<u64>,
    /// Accept a qcow2 backing file (reported as info instead of a rejection).
    pub allow_backing_file: bool,
    /// Skip the structural checks that read all metadata ([`Image::check`]).
    pub skip_structure: bool,
    /// Skip them only for an image whose check reads every stored unit of guest data
    /// ([`Image::check_reads_every_unit`]): for a caller that then reads the guest data from a
    /// remote source, through readers that check each unit as they read it.
    pub skip_data_walk: bool,
    /// Which disk of a container with several (an OVA) to open; `None` for the first.
    /// A disk number on an image that is not an OVA, or past its last disk, is a `Usage` error.
    pub disk: Option<usize>,
    /// Accept an image whose guest data is encrypted (`image.encrypted` becomes a warning): the
    /// consumer holds the key. Readers still refuse it: glimpse never sees the plaintext.
    pub allow_encrypted: bool,
    /// The gate of an image service (`check`, `upload`, `audit`; the default): the findings
    /// of [`IMAGE_SERVICE_CODES`], warnings about what a reader handles but OpenStack
    /// Glance's format inspector refuses, become rejections. Off for a caller that only reads
    /// the image (convert, map, compare, measure, checksum).
    pub image_service: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            expect_format: None,
            max_virtual_size: None,
            allow_backing_file: false,
            skip_structure: false,
            skip_data_walk: false,
            disk: None,
            allow_encrypted: false,
            image_service: true,
        }
    }
}

/// Warnings that the image-service gate rejects, each for images of one format: what Glance
/// refuses on upload although qemu reads it (so the reader only warns).
const IMAGE_SERVICE_CODES: &[(&str, Format)] = &[
    ("qcow2.extended-l2", Format::Qcow2),
    ("raw.mbr-invalid", Format::Raw),
];

/// The verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// No rejecting finding.
    Pass,
    /// At least one rejecting finding.
    Reject,
}

/// What [`inspect`] learned about one image.
pub struct Report {
    /// Every format detection matched.
    pub detection: Detection,
    /// The opened image, when it could be opened.
    pub image: Option<Box<dyn Image>>,
    /// All findings, sorted by severity (rejections first), then offset.
    pub findings: Vec<Finding>,
    /// The read archive, when the image is an OVA that could be read as one.
    pub appliance: Option<crate::ova::Ova>,
}

impl Report {
    /// Pass or reject.
    pub fn verdict(&self) -> Verdict {
        if self.findings.iter().any(|f| f.severity == Severity::Reject) {
            Verdict::Reject
        } else {
            Verdict::Pass
        }
    }
    /// The image's info, when it could be opened.
    pub fn info(&self) -> Option<&ImageInfo> {
        self.image.as_deref().map(|i| i.info())
    }
    /// The detected format (the first match when ambiguous; raw when none matched).
    pub fn format(&self) -> Format {
        self.detection.format()
    }
}

/// Formats an image service accepts as `disk_format` and glimpse can read.
fn accepted(format: Format) -> bool {
    !matches!(format, Format::Qed | Format::Luks)
}

/// Codes that a backing-file allowance turns into information.
const BACKING_CODES: &[&str] = &["qcow2.backing-file", "vmdk.parent", "vhdx.differencing"];

/// Detects, opens and checks `src`, and applies `policy`.
///
/// A parse failure is not an error here: it becomes a rejecting finding with the error's code.
///
/// # Errors
/// `Io` errors (the source could not be read), and `Usage` errors (`policy.disk` names a disk
/// the source does not have).
///
/// # Security
/// Never opens a file the image names. Reads metadata only, within `limits`.
pub fn inspect(src: Source, policy: &Policy, limits: &Limits) -> Result<Report> {
    let detection = crate::detect::detect(src.as_ref())?;
    inspect_detected(src, detection, policy, limits)
}

/// [`inspect`] with detection already done (by a caller that needed it first).
///
/// An OVA is read once: the report keeps the read archive ([`Report::appliance`]), whose
/// disks are each opened at most once, for [`every_disk`].
///
/// # Errors
/// `Io` and `Usage` errors, as [`inspect`].
pub fn inspect_detected(
    src: Source,
    detection: Detection,
    policy: &Policy,
    limits: &Limits,
) -> Result<Report> {
    let mut findings = preflight(&detection, src.size()?, policy)?;
    let mut appliance = None;
    let outer = src.clone();
    let opened = if detection.format() == Format::Ova {
        match crate::ova::read_ova(src, limits) {
            Ok(ova) => {
                let img = ova.open_selected(policy.disk, limits);
                appliance = Some(ova);
                img.map(|i| Box::new(i) as Box<dyn Image>)
            }
            Err(e) => Err(e),
        }
    } else {
        crate::open(src, detection.format(), limits)
    };
    let image = match opened {
        Ok(img) => Some(img),
        Err(e) if matches!(e.kind(), ErrorKind::Io | ErrorKind::Usage) => return Err(e),
        Err(e) => {
            findings.push(Finding::from_error(&e));
            None
        }
    };
    crate::vmdk_text::outer(&outer, detection.format(), image.is_some(), &mut findings)?;
    if let Some(img) = &image {
        judge(img.as_ref(), policy, limits, &mut findings)?;
    }
    Ok(Report {
        detection,
        image,
        findings: finish(findings, policy),
        appliance,
    })
}

/// The policy applied to an image the caller already opened (with `detection`, what detection
/// found in its bytes): the same findings [`inspect_detected`] reports for it, without
/// detecting or opening it again. The image's own findings, its structural check (unless
/// `policy.skip_structure`), encryption, size limit and the backing-file allowance; sorted,
/// rejections first. `policy.disk` is not consulted: the image is the one chosen.
///
/// # Errors
/// `Io` errors only; every other problem is a finding.
pub fn inspect_image(
    image: &dyn Image,
    detection: &Detection,
    policy: &Policy,
    limits: &Limits,
) -> Result<Vec<Finding>> {
    let own = Policy {
        disk: None,
        ..policy.clone()
    };
    let mut findings = preflight(detection, image.source().size()?, &own)?;
    judge(image, &own, limits, &mut findings)?;
    Ok(finish(findings, policy))
}

/// The findings decided before opening: an empty file, an ambiguous, mismatched or
/// unsupported format.
///
/// # Errors
/// `Usage` when `policy.disk` is given for an image that is not an OVA.
fn preflight(detection: &Detection, size: u64, policy: &Policy) -> Result<Vec<Finding>> {
    let mut findings = Vec::new();
    let format = detection.format();
    if let (Some(disk), false) = (policy.disk, format == Format::Ova) {
        return Err(Error::usage(format!(
            "--disk {disk} applies to an OVA only, and this is a {format} image"
        )));
    }
    if size == 0 {
        findings.push(Finding::reject(
            "raw.empty",
            "the file is empty (0 bytes): it holds no disk",
        ));
    }
    if detection.is_ambiguous() {
        let names = detection.names();
        findings.push(Finding::reject(
            "format.ambiguous",
            format!("the file matches several formats: {}", names.join(", ")),
        ));
    }
    if let Some(expected) = policy.expect_format {
        if expected != format {
            findings.push(Finding::reject(
                "format.mismatch",
                format!("declared format {expected} but the file is {format}"),
            ));
        }
    }
    if crate::unsupported::is_unsupported(format) {
        findings.push(Finding::reject(
            "format.unsupported",
            crate::unsupported::message(format),
        ));
    } else if !accepted(format) {
        findings.push(Finding::reject(
            "format.unsupported",
            format!("{format} images are not accepted by image services"),
        ));
    }
    Ok(findings)
}

/// The findings about an opened image: its own, its structural check, encryption and size.
///
/// # Errors
/// `Io` errors of the structural check.
fn judge(img: &dyn Image, policy: &Policy, limits: &Limits, out: &mut Vec<Finding>) -> Result<()> {
    out.extend(img.findings().iter().cloned());
    crate::vmdk_text::judge(img, out)?;
    let skip = policy.skip_structure || (policy.skip_data_walk && img.check_reads_every_unit());
    if !skip {
        match img.check(limits) {
            Ok(more) => out.extend(more),
            Err(e) if e.kind() == ErrorKind::Io => return Err(e),
            Err(e) => out.push(Finding::from_error(&e)),
        }
    }
    if policy.allow_backing_file {
        out.extend(unsafe_backing_names(img.info()));
    }
    if policy.image_service {
        let format = img.info().format;
        for f in out.iter_mut() {
            if IMAGE_SERVICE_CODES.contains(&(f.code, format)) {
                f.severity = Severity::Reject;
            }
        }
        out.extend(undetected_fixed_vhd(img.info()));
    }
    if let Some(f) = encrypted(img.info(), policy) {
        out.push(f);
    }
    let vsize = img.info().virtual_size;
    if let Some(max) = policy.max_virtual_size {
        if vsize > max {
            out.push(Finding::reject(
                "size.limit",
                format!("virtual size {vsize} exceeds the maximum of {max}"),
            ));
        }
    }
    Ok(())
}

/// A fixed VHD is its guest data followed by one footer in its last sector. OpenStack
/// Glance's format inspector (like qemu's probe) looks for the footer at byte 0 only, which a
/// fixed disk has only when it holds no data: it takes the file for raw and refuses it
/// declared `vhd` (415, measured on Glance 33), while glimpse refuses it declared `raw`
/// (`format.mismatch`: the raw disk would end in the footer). The image-service gate says so
/// before anything is sent; readers take the file as it is.
fn undetected_fixed_vhd(info: &ImageInfo) -> Option<Finding> {
    let fixed = info.format == Format::Vhd
        && info.details.get("disk-type").and_then(|t| t.as_str()) == Some("fixed");
    (fixed && info.virtual_size > 0).then(|| {
        Finding::reject(
            "vhd.fixed-undetected",
            "a fixed VHD keeps its only footer in its last sector, and OpenStack Glance's \
             format inspector looks for one at byte 0 only: Glance takes the file for raw and \
             refuses it as vhd. Convert it to a dynamic VHD (`glimpse convert -O vhd`), which \
             has a footer copy at byte 0, or to raw, to upload it",
        )
    })
}

/// The backing-file allowance covers plain file names only: a backing or parent name in
/// qemu's protocol syntax (`json:`, `nbd:`, `fat:`, `blkdebug:` ...), with NUL or control
/// bytes, or under /dev, /proc or /sys stays a rejection (`image.backing-name`).
fn unsafe_backing_names(info: &ImageInfo) -> Vec<Finding> {
    let mut out = Vec::new();
    for r in &info.references {
        if r.kind != crate::image::RefKind::BackingFile {
            continue;
        }
        if let Some(why) = crate::refname::unsafe_backing_name(&r.target) {
            let mut f = Finding::reject(
                "image.backing-name",
                format!(
                    "the backing file name {:?} is no plain file name: {why}; \
                     --allow-backing-file accepts plain names only",
                    r.target
                ),
            );
            f.offset = r.offset;
            out.push(f);
        }
    }
    out
}

/// The backing-file allowance, then the order: severity (rejections first), then offset.
fn finish(mut findings: Vec<Finding>, policy: &Policy) -> Vec<Finding> {
    if policy.allow_backing_file {
        for f in &mut findings {
            if BACKING_CODES.contains(&f.code) {
                f.severity = Severity::Info;
            }
        }
    }
    findings.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.offset.cmp(&b.offset)));
    findings.dedup();
    findings
}

/// One disk's verdict in a gate that checks every disk of an OVA.
#[derive(Debug, Clone, Serialize)]
pub struct DiskVerdict {
    /// 0-based disk index; `None` (JSON `null`) for a failure not about one disk.
    pub disk: Option<usize>,
    /// The disk's file, when it names one.
    pub href: Option<String>,
    /// Pass or reject.
    pub verdict: Verdict,
    /// The disk's findings.
    pub findings: Vec<Finding>,
}

/// A gate checks every disk: for an OVA inspected without `policy.disk`, every other disk
/// with a file is inspected under the same policy on the archive `report` already read
/// ([`crate::ova::Ova::inspect_disks`]; each disk opened once). Their findings join the
/// report's (so any rejecting disk rejects the appliance), re-sorted; the per-disk verdicts
/// are returned, the inspected disk first, then (without a disk index) the findings of
/// members that are no disk but hold an image. `None` when the report is not of an OVA read as an
/// archive, or one disk was chosen.
pub fn every_disk(
    report: &mut Report,
    policy: &Policy,
    limits: &Limits,
) -> Option<Vec<DiskVerdict>> {
    if report.format() != Format::Ova || policy.disk.is_some() {
        return None;
    }
    let appliance = report.appliance.as_ref()?;
    let first = appliance.default_disk();
    let mut per_disk = match appliance.inspect_disks(policy, limits, first) {
        Ok(v) => v.into_iter().map(|(i, f)| (Some(i), f)).collect(),
        Err(e) => vec![(None, vec![Finding::from_error(&e)])],
    };
    if let Some(i) = first {
        per_disk.insert(0, (Some(i), report.findings.clone()));
    }
    // Members that are no disk but hold an image: checked too (see `Ova::other_members`).
    match appliance.other_members(limits) {
        Ok(f) if f.is_empty() => {}
        Ok(f) => per_disk.push((None, f)),
        Err(e) => per_disk.push((None, vec![Finding::from_error(&e)])),
    }
    let mut out = Vec::new();
    for (i, findings) in per_disk {
        let reject = findings.iter().any(|f| f.severity == Severity::Reject);
        out.push(DiskVerdict {
            disk: i,
            href: i
                .and_then(|i| appliance.disks.get(i))
                .and_then(|d| d.href.clone()),
            verdict: if reject {
                Verdict::Reject
            } else {
                Verdict::Pass
            },
            findings: findings.clone(),
        });
        for f in findings {
            if !report.findings.contains(&f) {
                report.findings.push(f);
            }
        }
    }
    report
        .findings
        .sort_by(|a, b| b.severity.cmp(&a.severity).then(a.offset.cmp(&b.offset)));
    Some(out)
}

/// `image.encrypted` for an image whose guest data is encrypted: a rejection unless the
/// caller accepts encrypted images, because no check can see the plaintext.
fn encrypted(info: &ImageInfo, policy: &Policy) -> Option<Finding> {
    if !info.encrypted {
        return None;
    }
    let how = info
        .details
        .get("encrypt")
        .and_then(|e| e.get("format"))
        .and_then(|f| f.as_str())
        .map(|f| format!(" ({f})"))
        .unwrap_or_default();
    Some(if policy.allow_encrypted {
        Finding::warn(
            "image.encrypted",
            format!("guest data is encrypted{how}: accepted unchecked (--allow-encrypted)"),
        )
    } else {
        Finding::reject(
            "image.encrypted",
            format!(
                "guest data is encrypted{how}: its content cannot be checked (--allow-encrypted accepts it)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn raw_passes_and_a_declared_qcow2_is_a_mismatch() {
        let src: Source = Arc::new(vec![0u8; 4096]);
        let r = inspect(src.clone(), &Policy::default(), &Limits::default()).unwrap();
        assert_eq!(r.verdict(), Verdict::Pass);
        let p = Policy {
            expect_format: Some(Format::Qcow2),
            ..Policy::default()
        };
        let r = inspect(src, &p, &Limits::default()).unwrap();
        assert_eq!(r.verdict(), Verdict::Reject);
        assert!(r.findings.iter().any(|f| f.code == "format.mismatch"));
    }

    #[test]
    fn allowed_backing_files_must_be_plain_names() {
        let fixture = include_bytes!("../../fixtures/hostile/qcow2/backing-file.qcow2");
        let allow = Policy {
            allow_backing_file: true,
            skip_structure: true,
            ..Policy::default()
        };
        let run = |name: &[u8; 11]| {
            let mut b = fixture.to_vec();
            b[400..411].copy_from_slice(name);
            let r = inspect(Arc::new(b), &allow, &Limits::default()).unwrap();
            let unsafe_name = r.findings.iter().any(|f| f.code == "image.backing-name");
            (r.verdict(), unsafe_name)
        };
        assert_eq!(run(b"base.qcow2x"), (Verdict::Pass, false));
        assert_eq!(run(b"../b/x:y.qc"), (Verdict::Pass, false));
        for bad in [
            b"json:{'a':1",
            b"nbd:h:1/abc",
            b"fat:rw:/srv",
            b"file:/b.raw",
            b"/dev/fd/099",
            b"/x/../proc/",
            b"b.raw\0junk0",
            b"b.raw\njunk0",
        ] {
            assert_eq!(run(bad), (Verdict::Reject, true), "{bad:?}");
        }
    }

    #[test]
    fn size_limit() {
        let src: Source = Arc::new(vec![0u8; 4096]);
        let p = Policy {
            max_virtual_size: Some(1024),
            ..Policy::default()
        };
        let r = inspect(src, &p, &Limits::default()).unwrap();
        assert!(r.findings.iter().any(|f| f.code == "size.limit"));
    }

    #[test]
    fn an_empty_file_is_rejected() {
        let src: Source = Arc::new(Vec::<u8>::new());
        let r = inspect(src, &Policy::default(), &Limits::default()).unwrap();
        assert_eq!(r.verdict(), Verdict::Reject);
        assert!(r.findings.iter().any(|f| f.code == "raw.empty"));
    }

    #[test]
    fn a_disk_number_on_a_raw_image_is_a_usage_error() {
        let src: Source = Arc::new(vec![0u8; 4096]);
        let p = Policy {
            disk: Some(0),
            ..Policy::default()
        };
        let e = inspect(src, &p, &Limits::default()).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Usage);
    }

    #[test]
    fn an_opened_image_gets_the_findings_inspect_gives() {
        let src: Source = Arc::new(Vec::<u8>::new());
        let p = Policy {
            expect_format: Some(Format::Qcow2),
            max_virtual_size: Some(0),
            ..Policy::default()
        };
        let r = inspect(src.clone(), &p, &Limits::default()).unwrap();
        let det = crate::detect::detect(src.as_ref()).unwrap();
        let img = crate::open(src, det.format(), &Limits::default()).unwrap();
        let f = inspect_image(img.as_ref(), &det, &p, &Limits::default()).unwrap();
        assert_eq!(f, r.findings);
        assert!(f.iter().any(|f| f.code == "format.mismatch"));
    }
}
