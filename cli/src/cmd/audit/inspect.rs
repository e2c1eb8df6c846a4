//! The checks on one stored image: the `check` policy on its data, read where it is stored,
//! with the declared `disk_format` as the expected format (the OVA policy for
//! `container_format=ova`); Glance's `size` and `virtual_size` against what the data says;
//! and, with `--verify-digests`, its `checksum` and `os_hash_value` against one full read.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use glimpse_formats::policy::{self, Policy};
use glimpse_formats::{Finding, Severity, Source};
use serde_json::Value;

use super::{digest, mismatch, AuditVerdict, Ctx};
use crate::cmd::upload::validate::{self, ContainerFormat, DiskFormat, Plan};
use crate::remote::HttpSource;

/// Whether the digests were verified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DigestState {
    /// `--verify-digests` was not given (or the image could not be read).
    #[default]
    NotChecked,
    /// Every digest Glance recorded that glimpse computes matches the stored data, and there
    /// was at least one.
    Verified,
    /// A digest does not match.
    Mismatch,
    /// Glance recorded no digest glimpse can verify (none, or only an `os_hash_algo` glimpse
    /// does not compute).
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
    let source: Source = Arc::new(stored.source.clone());
    let result = inspect(&source, expect, ctx.quick, out);
    drop(source);
    let t = stored.source.transfer();
    out.requests = out.requests.saturating_add(t.requests);
    out.bytes = out.bytes.saturating_add(t.bytes);
    drop(stored);
    result?;
    compare_sizes(record, out);
    Ok(())
}

fn inspect(
    source: &Source,
    expect: glimpse_formats::Format,
    quick: bool,
    out: &mut Checked,
) -> anyhow::Result<()> {
    let size = source.size().context("reading the stored data's size")?;
    out.stored_size = Some(size);
    let policy = Policy {
        expect_format: Some(expect),
        skip_structure: quick,
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
    let algo_lower = algo.map(str::to_ascii_lowercase);
    let size = number(record, "size");
    // One more try after a failed stream (a store hiccup), unless a signal stopped it.
    let mut tries = 0u32;
    let s = loop {
        tries = tries.saturating_add(1);
        let got = ctx.catalog.download(id).and_then(|(mut reader, len)| {
            out.requests = out.requests.saturating_add(1);
            let limit = size.or(len).unwrap_or(u64::MAX - 1);
            let got = digest::stream(&mut reader, algo_lower.as_deref(), limit);
            if let Ok(s) = &got {
                out.bytes = out.bytes.saturating_add(s.bytes);
            }
            got.context("reading the stored data")
        });
        match got {
            Ok(s) => break s,
            Err(e) if tries >= 2 || crate::interrupt::cancelled() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    };
    let mut bad = false;
    let mut compared = 0u32;
    if let Some(c) = checksum {
        compared = compared.saturating_add(1);
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
    if let (Some(_), Some(_)) = (value, &s.multihash) {
        compared = compared.saturating_add(1);
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
    } else if compared == 0 {
        DigestState::Unavailable
    } else {
        DigestState::Verified
    };
    Ok(())
}

/// Remote sources open at once, and a wake-up when one closes: each source charges its block
/// cache to the command's one metadata budget, so how many fit at once is the budget's call,
/// not `-j`'s.
#[derive(Default)]
pub struct Gate {
    open: Mutex<usize>,
    closed: Condvar,
}

/// What one remote source charges the budget (its block cache), and the headroom kept for the
/// metadata of the images being inspected: a worker opens a source only while both fit, or
/// when no other source is open.
const SOURCE_CHARGE: u64 = 32 << 20;
const RESERVE: u64 = 32 << 20;

/// The stored data of one image, read with range requests; gives its gate slot back when
/// dropped.
struct Stored<'g> {
    source: HttpSource,
    gate: &'g Gate,
}

impl Drop for Stored<'_> {
    fn drop(&mut self) {
        self.gate.leave();
    }
}

impl Gate {
    fn leave(&self) {
        if let Ok(mut n) = self.open.lock() {
            *n = n.saturating_sub(1);
        }
        self.closed.notify_all();
    }

    /// Waits until a source fits in the budget (or none is open), then takes a slot.
    fn enter(&self) -> anyhow::Result<()> {
        let budget = crate::common::limits().budget();
        let mut n = self
            .open
            .lock()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))?;
        while *n > 0 && budget.left() < SOURCE_CHARGE.saturating_add(RESERVE) {
            n = self
                .closed
                .wait_timeout(n, Duration::from_millis(100))
                .map_err(|_| anyhow::anyhow!("a worker panicked"))?
                .0;
        }
        *n = n.saturating_add(1);
        Ok(())
    }

    fn others_open(&self) -> bool {
        self.open.lock().map(|n| *n > 0).unwrap_or(false)
    }
}

/// The HTTP block cache of each image being inspected: one readahead window (4 MiB), so that
/// about fifty inspections fit in the command's budget at once instead of seven with the
/// default 32 MiB (metadata reads are small; a full read streams past the cache).
const SOURCE_CACHE: u64 = 4 << 20;

/// Opens `GET /v2/images/{id}/file` for range reads.
fn open_stored<'g>(ctx: &'g Ctx<'_>, id: &str) -> anyhow::Result<Stored<'g>> {
    let url = ctx.catalog.file_url(id)?;
    loop {
        ctx.gate.enter()?;
        match HttpSource::open_with_cache(
            ctx.catalog.agent(),
            &url,
            ctx.catalog.auth_headers(),
            SOURCE_CACHE,
        ) {
            Ok(source) => {
                return Ok(Stored {
                    source,
                    gate: &ctx.gate,
                })
            }
            Err(e) => {
                ctx.gate.leave();
                // The budget was taken between the wait and the open: wait again, unless
                // nothing else holds it.
                let busy = format!("{e:#}").contains("metadata budget exhausted");
                if !(busy && ctx.gate.others_open()) {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_verdict_puts_policy_rejections_before_mismatches() {
        let mut c = Checked::default();
        assert_eq!(c.verdict(), AuditVerdict::Pass);
        c.uninspectable = true;
        assert_eq!(c.verdict(), AuditVerdict::Uninspectable);
        c.findings.push(mismatch("audit.size-mismatch", "x".into()));
        assert_eq!(c.verdict(), AuditVerdict::Mismatch);
        c.findings.push(Finding::reject("qcow2.data-file", "y"));
        assert_eq!(c.verdict(), AuditVerdict::Reject);
        let mut w = Checked::default();
        w.findings
            .push(Finding::warn("qcow2.lazy-refcounts-dirty", "z"));
        assert_eq!(w.verdict(), AuditVerdict::Pass);
    }

    #[test]
    fn sizes_are_compared_only_when_both_are_known() {
        let mut c = Checked {
            stored_size: Some(100),
            virtual_size: Some(1 << 20),
            ..Checked::default()
        };
        compare_sizes(&json!({"size": 100, "virtual_size": 1048576}), &mut c);
        assert!(c.findings.is_empty());
        compare_sizes(&json!({"size": 99, "virtual_size": null}), &mut c);
        assert_eq!(c.findings.len(), 1);
        assert!(c.has("audit.size-mismatch"));
        let mut c = Checked {
            virtual_size: Some(1 << 40),
            ..Checked::default()
        };
        compare_sizes(&json!({"virtual_size": 1048576}), &mut c);
        assert!(c.has("audit.virtual-size-mismatch"));
        // a declared format that is not the real one: the sizes are not comparable
        let mut c = Checked {
            virtual_size: Some(1 << 40),
            findings: vec![Finding::reject("format.mismatch", "m")],
            ..Checked::default()
        };
        compare_sizes(&json!({"virtual_size": 1048576}), &mut c);
        assert!(!c.has("audit.virtual-size-mismatch"));
    }

    #[test]
    fn pairs_glimpse_cannot_read_say_why() {
        assert_eq!(
            plan(&json!({"disk_format": "qcow2", "container_format": "bare"})),
            Ok(glimpse_formats::Format::Qcow2)
        );
        assert_eq!(
            plan(&json!({"disk_format": "vmdk", "container_format": "ova"})),
            Ok(glimpse_formats::Format::Ova)
        );
        assert!(plan(&json!({"disk_format": "raw", "container_format": "docker"})).is_err());
        assert!(plan(&json!({"disk_format": "zfs", "container_format": "bare"})).is_err());
        assert!(plan(&json!({"disk_format": null, "container_format": null})).is_err());
    }
}
