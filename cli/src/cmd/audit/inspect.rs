//! The checks on one stored image: the `check` policy on its data, read where it is stored,
//! with the declared `disk_format` as the expected format (the OVA policy for
//! `container_format=ova`); Glance's `size` and `virtual_size` against what the data says;
//! and, with `--verify-digests`, its `checksum` and `os_hash_value` against one full read.

use anyhow::Context;
use clap::ValueEnum;
use glimpse_formats::policy::{self, Policy};
use glimpse_formats::{Finding, Severity, Source};
use serde_json::Value;

use super::{digest, mismatch, AuditVerdict, Ctx};
use crate::cmd::upload::validate::{self, ContainerFormat, DiskFormat, Plan};

/// Whether the digests were verified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DigestState {
    /// `--verify-digests` was not given (or the image could not be read).
    #[default]
    NotChecked,
    /// Every digest Glance recorded matches the stored data.
    Verified,
    /// A digest does not match.
    Mismatch,
    /// Glance recorded no digest to verify.
    Unavailable,
}

impl DigestState {
    /// The JSON value.
    pub fn name(self) -> &'static str {
        match self {
            DigestState::NotChecked => "not-checked",
            DigestState::Verified => "verified",
            DigestState::Mismatch => "mismatch",
            DigestState::Unavailable => "unavailable",
        }
    }
}

/// What the checks of one image found.
#[derive(Default)]
pub struct Checked {
    /// The policy's findings, then the audit's own (`audit.*`).
    pub findings: Vec<Finding>,
    /// An OVA's per-disk verdicts.
    pub disks: Option<Value>,
    /// The stored object's size.
    pub stored_size: Option<u64>,
    /// The virtual size glimpse read.
    pub virtual_size: Option<u64>,
    /// The digest check.
    pub digests: DigestState,
    /// Bytes read from the store.
    pub bytes: u64,
    /// Requests made for the data.
    pub requests: u64,
    /// The pair cannot be inspected.
    pub uninspectable: bool,
}

/// The audit's own codes: the stored data disagrees with Glance's record.
const AUDIT_PREFIX: &str = "audit.";

impl Checked {
    /// Reject when the policy rejects; mismatch when only the audit's comparisons fail.
    pub fn verdict(&self) -> AuditVerdict {
        let rejecting = |f: &&Finding| f.severity == Severity::Reject;
        if self
            .findings
            .iter()
            .filter(rejecting)
            .any(|f| !f.code.starts_with(AUDIT_PREFIX))
        {
            AuditVerdict::Reject
        } else if self.findings.iter().any(|f| rejecting(&f)) {
            AuditVerdict::Mismatch
        } else if self.uninspectable {
            AuditVerdict::Uninspectable
        } else {
            AuditVerdict::Pass
        }
    }

    /// True when a finding has this code.
    pub fn has(&self, code: &str) -> bool {
        self.findings.iter().any(|f| f.code == code)
    }
}

fn text<'a>(record: &'a Value, k: &str) -> Option<&'a str> {
    record.get(k).and_then(Value::as_str)
}

fn number(record: &Value, k: &str) -> Option<u64> {
    record.get(k).and_then(Value::as_u64)
}

/// What to inspect for the record's pair: the expected format, or why nothing can be.
fn plan(record: &Value) -> Result<glimpse_formats::Format, String> {
    let (Some(disk), Some(container)) = (
        text(record, "disk_format"),
        text(record, "container_format"),
    ) else {
        return Err("the record has no disk_format or container_format".into());
    };
    let d = DiskFormat::from_str(disk, false)
        .map_err(|_| format!("disk_format {disk:?} is not one glimpse knows"))?;
    let c = ContainerFormat::from_str(container, false)
        .map_err(|_| format!("container_format {container:?} is not one glimpse knows"))?;
    match validate::plan(d, c)? {
        Plan::Expect(f) => Ok(f),
        Plan::Uninspectable(why) => Err(why),
    }
}

/// The policy on the stored data, and the size comparisons.
///
/// # Errors
/// The data could not be read.
pub fn check(ctx: &Ctx<'_>, id: &str, record: &Value, out: &mut Checked) -> anyhow::Result<()> {
    let expect = match plan(record) {
        Ok(f) => Some(f),
        Err(why) => {
            out.uninspectable = true;
            out.findings.push(Finding::warn(
                "audit.uninspectable",
                format!("not inspected: {why}"),
            ));
            None
        }
    };
    let Some(expect) = expect else {
        return Ok(());
    };
    let stored = open_stored(ctx, id)?;
    let result = inspect(&stored.source, expect, out);
    let (requests, bytes) = (stored.transfer)();
    out.requests = out.requests.saturating_add(requests);
    out.bytes = out.bytes.saturating_add(bytes);
    result?;
    compare_sizes(record, out);
    Ok(())
}

fn inspect(
    source: &Source,
    expect: glimpse_formats::Format,
    out: &mut Checked,
) -> anyhow::Result<()> {
    let size = source.size().context("reading the stored data's size")?;
    out.stored_size = Some(size);
    let policy = Policy {
        expect_format: Some(expect),
        ..Policy::default()
    };
    let limits = crate::common::limits();
    let mut report =
        policy::inspect(source.clone(), &policy, &limits).context("inspecting the stored data")?;
    if let Some(disks) = policy::every_disk(&mut report, &policy, &limits) {
        out.disks = serde_json::to_value(disks).ok();
    }
    out.virtual_size = report.info().map(|i| i.virtual_size);
    out.findings.append(&mut report.findings);
    Ok(())
}

/// Glance's `size` against the stored object, and its `virtual_size` against glimpse's.
fn compare_sizes(record: &Value, out: &mut Checked) {
    match (number(record, "size"), out.stored_size) {
        (Some(theirs), Some(ours)) if theirs != ours => out.findings.push(mismatch(
            "audit.size-mismatch",
            format!("Glance's size is {theirs} but the stored object holds {ours} bytes"),
        )),
        _ => {}
    }
    // A format mismatch already says the virtual sizes mean different things.
    if out.has("format.mismatch") {
        return;
    }
    match (number(record, "virtual_size"), out.virtual_size) {
        (Some(theirs), Some(ours)) if theirs > 0 && theirs != ours => out.findings.push(mismatch(
            "audit.virtual-size-mismatch",
            format!("Glance's virtual_size is {theirs} but the image's is {ours}"),
        )),
        _ => {}
    }
}

/// `--verify-digests`: one full read through md5 and the `os_hash_algo` digest.
///
/// # Errors
/// The data could not be read.
pub fn verify_digests(
    ctx: &Ctx<'_>,
    id: &str,
    record: &Value,
    out: &mut Checked,
) -> anyhow::Result<()> {
    let checksum = text(record, "checksum");
    let algo = text(record, "os_hash_algo");
    let value = text(record, "os_hash_value");
    if checksum.is_none() && value.is_none() {
        out.digests = DigestState::Unavailable;
        return Ok(());
    }
    let (mut reader, len) = ctx.catalog.download(id)?;
    out.requests = out.requests.saturating_add(1);
    let size = number(record, "size");
    let limit = size.or(len).unwrap_or(u64::MAX - 1);
    let got = digest::stream(&mut reader, algo, limit);
    if let Ok(s) = &got {
        out.bytes = out.bytes.saturating_add(s.bytes);
    }
    let s = got.context("reading the stored data")?;
    let mut bad = false;
    if let Some(c) = checksum {
        if !c.eq_ignore_ascii_case(&s.md5) {
            bad = true;
            out.findings.push(mismatch(
                "audit.checksum-mismatch",
                format!(
                    "Glance's checksum (md5) is {c} but the stored data's is {}",
                    s.md5
                ),
            ));
        }
    }
    match (value, &s.multihash) {
        (Some(v), Some(ours)) if !v.eq_ignore_ascii_case(ours) => {
            bad = true;
            out.findings.push(mismatch(
                "audit.os-hash-mismatch",
                format!(
                    "Glance's os_hash_value ({}) is {v} but the stored data's is {ours}",
                    algo.unwrap_or("?")
                ),
            ));
        }
        (Some(_), None) => out.findings.push(Finding::info(
            "audit.os-hash-unchecked",
            format!(
                "os_hash_algo {:?} is not one glimpse computes (sha256, sha384, sha512)",
                algo.unwrap_or("")
            ),
        )),
        _ => {}
    }
    if !out.has("audit.size-mismatch") {
        if let Some(theirs) = size {
            if s.longer || s.bytes != theirs {
                let more = if s.longer { "more than " } else { "" };
                out.findings.push(mismatch(
                    "audit.size-mismatch",
                    format!(
                        "Glance's size is {theirs} but the stored data streamed {more}{} bytes",
                        if s.longer { theirs } else { s.bytes }
                    ),
                ));
            }
        }
    }
    if out.stored_size.is_none() && !s.longer {
        out.stored_size = Some(s.bytes);
    }
    out.digests = if bad {
        DigestState::Mismatch
    } else {
        DigestState::Verified
    };
    Ok(())
}

/// The stored data as a positional source, and a way to ask what reading it cost
/// (requests, bytes).
struct Stored {
    source: Source,
    transfer: Box<dyn Fn() -> (u64, u64)>,
}

/// Opens `GET /v2/images/{id}/file` for range reads.
fn open_stored(ctx: &Ctx<'_>, id: &str) -> anyhow::Result<Stored> {
    let _ = (
        ctx.catalog.file_url(id)?,
        ctx.catalog.agent(),
        ctx.catalog.auth_headers(),
    );
    anyhow::bail!("remote reads (issue 16) are not in this build yet")
}
