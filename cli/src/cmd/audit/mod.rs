//! `glimpse audit`: checks every image already stored in a Glance catalog, where it is stored.
//!
//! One thread lists the catalog (filters, `next` links, `--marker`, `--shard`) into a bounded
//! queue; `-j N` workers each audit one image at a time (the `check` policy on the stored
//! data read remotely, size and virtual-size comparisons, optionally a full digest pass, and
//! optionally the deactivation of what fails); the main thread prints one JSON line per image
//! as each finishes, then a summary. Memory is bounded by the queue lengths, one image's state
//! per worker, and the command's shared metadata budget, whatever N and the catalog size.
//!
//! Lines come out in the order images finish, not in id order, so the last id printed is not
//! a safe place to resume from: each line carries `resume_marker`, the highest listed id such
//! that every listed id up to it has its line printed (a watermark).
//!
//! SIGINT, SIGTERM or SIGHUP stop the listing and the start of new work; reads under way are
//! cut off, a deactivation under way finishes (its reply waits at most a minute), every
//! finished image gets its line, then the summary (with the resume point) and exit 2.

mod catalog;
mod digest;
mod inspect;
mod shard;

use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context};
use glimpse_formats::{Finding, Severity};
use serde_json::{json, Map, Value};

use self::catalog::{check_next, clip, valid_id, Catalog, Filters};
use self::shard::Shard;
use crate::cmd::upload::auth::{self, AuthArgs};
use crate::cmd::upload::http::{self, Http};
use crate::cmd::upload::require_scheme;
use crate::interrupt;

/// Arguments of `glimpse audit`.
#[derive(clap::Args)]
#[command(
    after_help = "Output: one JSON line per image on stdout (in the order images finish; \
`resume_marker` is where a stopped run can go on with --marker), then a summary table on \
stderr.\nExit status: 0 every image passed, 1 any image was rejected or did not match Glance's \
record, 2 any image (or the listing, or a deactivation) could not be audited, or a signal \
stopped the audit."
)]
pub struct Args {
    /// Audit this image only (repeat for more); no listing.
    #[arg(long = "image", value_name = "ID")]
    images: Vec<String>,
    /// List only images of this owner (project id).
    #[arg(long)]
    owner: Option<String>,
    /// List only images of this visibility (public, private, shared, community, all).
    #[arg(long)]
    visibility: Option<String>,
    /// List only images with this status; `any` lists every status Glance shows.
    #[arg(long, default_value = "active")]
    status: String,
    /// List only images of this disk_format.
    #[arg(long)]
    disk_format: Option<String>,
    /// List only images with this tag (repeat: images with every tag).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Resume the listing after this image id (images are listed in id order): use the
    /// `resume_marker` of the last line (or the summary's), not the last id printed.
    #[arg(long, value_name = "ID")]
    marker: Option<String>,
    /// Images per listing request (Glance caps it at its api_limit_max, 1000 by default).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1000))]
    page_size: u32,
    /// Audit only shard K of N (0-based): the images whose id hashes (FNV-1a) to K modulo N.
    /// N hosts, or a Kubernetes Indexed Job, then split a catalog with no coordinator.
    #[arg(long, value_name = "K/N")]
    shard: Option<Shard>,
    /// Skip the structural checks that walk all of an image's tables (`check`'s full
    /// consistency pass): references, format mismatches, sizes and every header finding are
    /// still reported, and far fewer bytes are read (a streamOptimized VMDK's check otherwise
    /// reads every grain).
    #[arg(long)]
    quick: bool,
    /// Also stream each image's whole data once and verify Glance's `checksum` (md5) and
    /// `os_hash_value`: this finds corruption in the store, at the cost of reading everything.
    #[arg(long)]
    verify_digests: bool,
    /// Images audited at once.
    #[arg(short = 'j', long = "jobs", value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: u16,
    /// Show progress on stderr (images done/listed, rate).
    #[arg(short = 'p', long)]
    progress: bool,
    /// Log each request (method, URL, status) to stderr; never secrets.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Deactivate each rejected or mismatched image (Images API deactivate action; Glance's
    /// policy decides who may). Without it the audit changes nothing.
    #[arg(long)]
    deactivate_rejected: bool,
    /// Reactivate this image (undoes a deactivation; repeatable) and do nothing else.
    #[arg(long = "reactivate", value_name = "ID", conflicts_with_all = [
        "images", "owner", "visibility", "disk_format", "tags", "marker", "shard",
        "verify_digests", "deactivate_rejected", "quick",
    ])]
    reactivate: Vec<String>,

    #[command(flatten)]
    auth: AuthArgs,
}

/// An image's verdict in the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AuditVerdict {
    /// Passed every check.
    Pass,
    /// glimpse cannot inspect this disk_format/container_format pair (said why).
    Uninspectable,
    /// The stored data does not match Glance's record (size, virtual size, digests).
    Mismatch,
    /// The policy rejects the stored image.
    Reject,
    /// The image could not be audited.
    Error,
}

impl AuditVerdict {
    /// The JSON value.
    pub fn name(self) -> &'static str {
        match self {
            AuditVerdict::Pass => "pass",
            AuditVerdict::Uninspectable => "uninspectable",
            AuditVerdict::Mismatch => "mismatch",
            AuditVerdict::Reject => "reject",
            AuditVerdict::Error => "error",
        }
    }
}

/// One image's result.
pub struct Outcome {
    /// The JSON line.
    pub line: Value,
    /// The verdict.
    pub verdict: AuditVerdict,
    /// Bytes read from the store.
    pub bytes: u64,
    /// Requests made for the data.
    pub requests: u64,
    /// True when the image was deactivated.
    pub deactivated: bool,
    /// Audit it again alone ([`Msg::Retry`]).
    pub retry: bool,
    /// A signal cut the audit of this image short: no line, and a resume audits it again.
    pub interrupted: bool,
    /// A step failed after the verdict was established (the line has `error` too): exit 2.
    pub step_failed: bool,
}

impl Outcome {
    fn new(line: Value, verdict: AuditVerdict) -> Self {
        Outcome {
            line,
            verdict,
            bytes: 0,
            requests: 0,
            deactivated: false,
            retry: false,
            interrupted: false,
            step_failed: false,
        }
    }
}

/// What the workers share.
pub struct Ctx<'a> {
    catalog: Catalog<'a>,
    verify_digests: bool,
    deactivate: bool,
    quick: bool,
    /// More than one worker shares the metadata budget.
    parallel: bool,
    /// Bounds the remote sources open at once by the budget.
    gate: inspect::Gate,
}

/// Runs `glimpse audit`.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut opts = args.auth.options();
    auth::apply_cloud(&mut opts)?;
    require_scheme("OS_IMAGE_URL (--os-image-url)", opts.image_url.as_deref())?;
    require_scheme("OS_AUTH_URL (--os-auth-url)", opts.auth_url.as_deref())?;
    for id in args
        .images
        .iter()
        .chain(&args.reactivate)
        .chain(&args.marker)
    {
        if !valid_id(id) {
            return Err(crate::common::usage(format!(
                "{:?} is not an image id",
                clip(id)
            )));
        }
    }
    let agent = http::agent(&opts.tls)?;
    let client = Http::new(agent.clone(), &opts.tls, args.verbose);
    let session = auth::authenticate(&client, &opts)?;
    // Metadata calls wait a minute for a reply, not the upload agent's hour
    // (`catalog::API_TIMEOUT`); the listing's are cut off by a signal, the actions' are not.
    let list_http = client.for_cleanup()?;
    let api_http = client.for_cleanup()?;
    if args.reactivate.is_empty() {
        interrupt::install(interrupt::Again::Waits);
        list_http.stop_on_signal();
    }
    let catalog = Catalog::new(
        list_http,
        api_http,
        agent,
        &session.token,
        &session.image_url,
        args.verbose,
    );
    if !args.reactivate.is_empty() {
        return Ok(reactivate(&catalog, &args.reactivate));
    }
    let ctx = Ctx {
        catalog,
        verify_digests: args.verify_digests,
        deactivate: args.deactivate_rejected,
        quick: args.quick,
        parallel: args.jobs > 1,
        gate: inspect::Gate::default(),
    };
    Ok(audit(&args, &ctx))
}

/// `--reactivate`: one JSON line per image.
fn reactivate(catalog: &Catalog<'_>, ids: &[String]) -> u8 {
    let mut code = 0;
    let mut seen = HashSet::new();
    for id in ids.iter().filter(|id| seen.insert(id.as_str())) {
        // Glance answers 204 to the reactivation of an active image too: say so.
        let status = catalog
            .get(id)
            .ok()
            .and_then(|r| r.get("status").and_then(Value::as_str).map(str::to_string));
        if status.as_deref() == Some("active") {
            outln!(
                "{}",
                json!({"id": id, "reactivated": false, "already_active": true})
            );
            continue;
        }
        let line = match catalog.reactivate(id) {
            Ok(()) => json!({"id": id, "reactivated": true}),
            Err(e) => {
                errln!("glimpse: image {id}: cannot reactivate: {e:#}");
                code = 2;
                json!({"id": id, "reactivated": false, "error": format!("{e:#}")})
            }
        };
        outln!("{line}");
    }
    code
}

/// What the lister and the workers tell the main thread.
enum Msg {
    /// An image was queued: its place in the listing and its id (none for `--image`).
    Listed(u64, Option<String>),
    /// An image is done.
    Done(u64, Box<Outcome>),
    /// The listing failed; images already queued are still audited.
    ListFailed(anyhow::Error),
    /// The image hit the metadata budget that all workers share: it is audited again, alone,
    /// once the others are done, so that a busy budget never reads as a rejection.
    Retry(u64, Value),
}

/// A queued image: its place in the listing and its record.
type Work = (u64, Value);

fn audit(args: &Args, ctx: &Ctx<'_>) -> u8 {
    let jobs = usize::from(args.jobs.max(1));
    let started = Instant::now();
    let (work_tx, work_rx) = sync_channel::<Work>(jobs.saturating_mul(2));
    let (msg_tx, msg_rx) = sync_channel::<Msg>(jobs.saturating_mul(2));
    let work_rx = Arc::new(Mutex::new(work_rx));
    let filters = Filters {
        owner: args.owner.clone(),
        visibility: args.visibility.clone(),
        status: (args.status != "any").then(|| args.status.clone()),
        disk_format: args.disk_format.clone(),
        tags: args.tags.clone(),
        page_size: args.page_size,
    };
    let mut collector = Collector::new(args.progress, args.images.is_empty());
    // Nothing done yet: a resume starts where this run started.
    collector.summary.resume = args.marker.clone();
    std::thread::scope(|s| {
        let lister_tx = msg_tx.clone();
        s.spawn(move || list(args, ctx, &filters, &work_tx, &lister_tx));
        for _ in 0..jobs {
            let rx = Arc::clone(&work_rx);
            let tx = msg_tx.clone();
            s.spawn(move || work(ctx, &rx, &tx));
        }
        drop(msg_tx);
        collector.run(&msg_rx);
    });
    // Images whose metadata did not fit the budget the other workers were sharing: again,
    // one at a time, with all of it.
    for (seq, record) in std::mem::take(&mut collector.retries) {
        if interrupt::cancelled() {
            break;
        }
        let outcome = audit_one(ctx, &record, false);
        collector.done(seq, &outcome);
    }
    let mut summary = collector.finish();
    if interrupt::cancelled() {
        summary.interrupted = Some(interrupt::signal_name());
    }
    summary.elapsed = started.elapsed().as_secs_f64();
    summary.print();
    summary.exit_code()
}

/// Lists (or looks up) the images to audit and queues them.
fn list(
    args: &Args,
    ctx: &Ctx<'_>,
    filters: &Filters,
    work: &SyncSender<Work>,
    msgs: &SyncSender<Msg>,
) {
    let mut seq: u64 = 0;
    let mut queue = |record: Value, listed: bool| -> bool {
        let id = record.get("id").and_then(Value::as_str).unwrap_or("");
        if let Some(shard) = &args.shard {
            if !shard.owns(id) {
                return true;
            }
        }
        seq = seq.saturating_add(1);
        let _ = msgs.send(Msg::Listed(seq, listed.then(|| id.to_string())));
        work.send((seq, record)).is_ok()
    };
    if !args.images.is_empty() {
        // Each image once, however often it was named: two audits of one image would
        // deactivate it twice at once (Glance answers one of them with a 500).
        let mut seen = HashSet::new();
        for id in args.images.iter().filter(|id| seen.insert(id.as_str())) {
            if interrupt::cancelled() {
                return;
            }
            match ctx.catalog.get(id) {
                Ok(record) => {
                    if !queue(record, false) {
                        return;
                    }
                }
                Err(e) => {
                    let _ = msgs.send(Msg::Listed(0, None));
                    let outcome = error_outcome(&json!({ "id": id }), &e);
                    let _ = msgs.send(Msg::Done(0, Box::new(outcome)));
                }
            }
        }
        return;
    }
    let fail = |e: anyhow::Error| {
        let _ = msgs.send(Msg::ListFailed(e));
    };
    let first = match ctx.catalog.first_page(filters, args.marker.as_deref()) {
        Ok(u) => u,
        Err(e) => return fail(e),
    };
    let mut url = first.clone();
    // The listing is sorted by id: each id must be above the one before (and the marker), so
    // no image is audited twice and no page sequence can loop.
    let mut last: Option<String> = args.marker.clone();
    let mut pages = HashSet::new();
    loop {
        if interrupt::cancelled() {
            return;
        }
        if !pages.insert(url.clone()) {
            return fail(anyhow!(
                "listing images: Glance's `next` link {:?} repeats a page already read",
                clip(&url)
            ));
        }
        let (images, next) = match ctx.catalog.page(&url) {
            Ok(p) => p,
            Err(e) if interrupt::cancelled() => {
                drop(e);
                return;
            }
            Err(e) => return fail(e),
        };
        let empty = images.is_empty();
        for record in images {
            if !record.is_object() {
                return fail(anyhow!(
                    "listing images: an entry of Glance's page is not an image record"
                ));
            }
            if let Some(why) = filters.refuses(&record) {
                return fail(anyhow!(
                    "listing images: Glance listed image {:?}, which is not one asked for: {why}",
                    clip(&id_text(&record))
                ));
            }
            if let Some(id) = record.get("id").and_then(Value::as_str) {
                if last.as_deref().is_some_and(|l| id <= l) {
                    return fail(anyhow!(
                        "listing images: Glance listed image {:?} after {:?}, out of id order \
                         (a repeated or reordered listing)",
                        clip(id),
                        clip(last.as_deref().unwrap_or_default())
                    ));
                }
                last = Some(id.to_string());
            }
            if interrupt::cancelled() {
                return;
            }
            if !queue(record, true) {
                return;
            }
        }
        let Some(n) = next else { return };
        if empty {
            return fail(anyhow!(
                "listing images: incomplete listing: Glance sent an empty page with a `next` link"
            ));
        }
        if let Err(e) = check_next(&first, &n, last.as_deref()) {
            return fail(e);
        }
        url = n;
    }
}

/// A record's id as text, whatever its type, for a message.
fn id_text(record: &Value) -> String {
    match record.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

/// A worker: audits queued images until the queue closes (or a signal stops the audit).
fn work(ctx: &Ctx<'_>, rx: &Mutex<Receiver<Work>>, tx: &SyncSender<Msg>) {
    loop {
        let next = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok((seq, record)) = next else { return };
        if interrupt::cancelled() {
            // keep draining, so that the lister is never blocked on a full queue
            continue;
        }
        let outcome = audit_one(ctx, &record, ctx.parallel);
        let msg = if outcome.retry {
            Msg::Retry(seq, record)
        } else {
            Msg::Done(seq, Box::new(outcome))
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// The fields of a Glance record the JSON line repeats: strings, or null (with the names of
/// the fields that were there but not strings).
fn head(record: &Value) -> (Map<String, Value>, Vec<&'static str>) {
    let mut m = Map::new();
    let mut odd = Vec::new();
    for k in [
        "id",
        "name",
        "owner",
        "disk_format",
        "container_format",
        "status",
    ] {
        let v = match record.get(k) {
            Some(Value::String(s)) => Value::String(s.clone()),
            None | Some(Value::Null) => Value::Null,
            Some(_) => {
                odd.push(k);
                Value::Null
            }
        };
        m.insert(k.into(), v);
    }
    (m, odd)
}

fn error_outcome(record: &Value, e: &anyhow::Error) -> Outcome {
    let (mut line, _) = head(record);
    line.insert("verdict".into(), json!(AuditVerdict::Error.name()));
    line.insert("error".into(), json!(format!("{e:#}")));
    Outcome::new(Value::Object(line), AuditVerdict::Error)
}

/// A record field that must be a byte count: the count, or null (with a finding when the
/// field is there but is not one).
fn count_field(record: &Value, k: &'static str, findings: &mut Vec<Finding>) -> Value {
    match record.get(k) {
        None | Some(Value::Null) => Value::Null,
        Some(v) => match v.as_u64() {
            Some(n) => json!(n),
            None => {
                findings.push(mismatch(
                    "audit.record-field",
                    format!(
                        "Glance's {k} is {}, not a byte count: it cannot be compared",
                        clip(&v.to_string())
                    ),
                ));
                Value::Null
            }
        },
    }
}

/// Audits one image.
fn audit_one(ctx: &Ctx<'_>, record: &Value, may_retry: bool) -> Outcome {
    let id = match record.get("id").and_then(Value::as_str) {
        Some(id) if valid_id(id) => id.to_string(),
        _ => {
            let e = anyhow!(
                "Glance's record has no usable id ({:?})",
                clip(&id_text(record))
            );
            return error_outcome(record, &e);
        }
    };
    let mut checked = inspect::Checked::default();
    let (mut line, odd) = head(record);
    for k in odd {
        checked.findings.push(Finding::warn(
            "audit.record-field",
            format!("Glance's {k} is not a string: shown as null"),
        ));
    }
    for k in ["checksum", "os_hash_algo", "os_hash_value"] {
        if record
            .get(k)
            .is_some_and(|v| !v.is_null() && !v.is_string())
        {
            checked.findings.push(mismatch(
                "audit.record-field",
                format!("Glance's {k} is not a string: it cannot be compared"),
            ));
        }
    }
    let size = count_field(record, "size", &mut checked.findings);
    let virtual_size = count_field(record, "virtual_size", &mut checked.findings);
    let result = inspect::check(ctx, &id, record, &mut checked)
        .and_then(|()| {
            if ctx.verify_digests {
                inspect::verify_digests(ctx, &id, record, &mut checked)
            } else {
                Ok(())
            }
        })
        .with_context(|| format!("image {id}"));
    if may_retry && checked.has("size.limit") {
        return Outcome {
            retry: true,
            ..error_outcome(record, &anyhow!("retried alone"))
        };
    }
    // A signal during the checks: a read may have been cut off, so the verdict is not
    // trusted; no line, no deactivation, and the resume point stays before this image.
    if interrupt::cancelled() {
        return Outcome {
            interrupted: true,
            ..error_outcome(record, &anyhow!("interrupted"))
        };
    }
    // What the checks that finished established stands even when a later step failed: a
    // policy rejection found by the ranged reads is still a rejection (and is deactivated)
    // when the digest stream fails afterwards.
    let established = checked.verdict();
    let verdict = match &result {
        Err(_) if matches!(established, AuditVerdict::Reject | AuditVerdict::Mismatch) => {
            established
        }
        Err(_) => AuditVerdict::Error,
        Ok(()) => established,
    };
    line.insert("verdict".into(), json!(verdict.name()));
    line.insert(
        "findings".into(),
        serde_json::to_value(&checked.findings).unwrap_or(Value::Null),
    );
    if let Some(d) = checked.disks.take() {
        line.insert("disks".into(), d);
    }
    line.insert(
        "size".into(),
        json!({"glance": size, "stored": checked.stored_size}),
    );
    line.insert(
        "virtual_size".into(),
        json!({"glance": virtual_size, "glimpse": checked.virtual_size}),
    );
    line.insert("digests".into(), json!(checked.digests.name()));
    if ctx.quick && !checked.uninspectable {
        line.insert("structure".into(), json!("skipped"));
    }
    line.insert("bytes_read".into(), json!(checked.bytes));
    line.insert("requests".into(), json!(checked.requests));
    if let Err(e) = &result {
        line.insert("error".into(), json!(format!("{e:#}")));
    }
    let mut outcome = Outcome::new(Value::Null, verdict);
    outcome.bytes = checked.bytes;
    outcome.requests = checked.requests;
    outcome.step_failed = result.is_err() && verdict != AuditVerdict::Error;
    let failed = matches!(verdict, AuditVerdict::Reject | AuditVerdict::Mismatch);
    if ctx.deactivate && failed {
        let active = record.get("status").and_then(Value::as_str) == Some("active");
        if !active {
            line.insert("deactivated".into(), json!(false));
            line.insert(
                "deactivation".into(),
                json!("skipped: the image is not active"),
            );
        } else {
            match deactivate(ctx, &id) {
                Ok(()) => {
                    outcome.deactivated = true;
                    line.insert("deactivated".into(), json!(true));
                }
                Err(e) => {
                    line.insert("deactivated".into(), json!(false));
                    line.insert("deactivation".into(), json!(format!("failed: {e:#}")));
                }
            }
        }
    }
    outcome.line = Value::Object(line);
    outcome
}

/// Deactivates an image and makes sure of the result: a reply that was lost (a reset, a
/// timeout, a 5xx) does not say whether Glance acted, so the record is read again; what it
/// says is the answer. A second POST is sent once if the image is still active (Glance
/// deactivates an image once; a second request for a deactivated one is refused).
fn deactivate(ctx: &Ctx<'_>, id: &str) -> anyhow::Result<()> {
    let mut tries = 0u32;
    loop {
        tries = tries.saturating_add(1);
        let Err(e) = ctx.catalog.deactivate(id) else {
            return Ok(());
        };
        let refused = e
            .downcast_ref::<http::StatusError>()
            .is_some_and(|s| (400..500).contains(&s.status) && s.status != 408 && s.status != 429);
        let status = match ctx.catalog.get(id) {
            Ok(r) => r.get("status").and_then(Value::as_str).map(str::to_string),
            Err(again) => {
                return Err(e.context(format!(
                    "and reading the image again to see whether Glance acted failed too \
                     ({again:#}): unknown whether it is deactivated"
                )))
            }
        };
        match status.as_deref() {
            Some("deactivated") => return Ok(()),
            Some("active") if !refused && tries < 2 => {}
            other => {
                return Err(e.context(format!(
                    "Glance's record now says status {:?}",
                    other.unwrap_or("none")
                )))
            }
        }
    }
}

/// Counts for the summary.
#[derive(Default)]
struct Summary {
    listed: u64,
    by_verdict: [u64; 5],
    bytes: u64,
    requests: u64,
    deactivated: u64,
    deactivation_failed: u64,
    /// Images whose verdict stands but one of whose steps failed (exit 2).
    step_failed: u64,
    list_error: Option<String>,
    /// The signal that stopped the audit.
    interrupted: Option<&'static str>,
    /// Listed images with no line (a signal cut their audit short).
    unfinished: u64,
    /// Where to resume (`--marker`), when the audit listed.
    resume: Option<String>,
    /// Whether the audit listed (no `--image`).
    listing: bool,
    elapsed: f64,
}

impl Summary {
    fn images(&self) -> u64 {
        self.by_verdict.iter().sum()
    }

    fn count(&self, v: AuditVerdict) -> u64 {
        self.by_verdict.get(v as usize).copied().unwrap_or(0)
    }

    fn print(&self) {
        let n = self.images();
        let rate = if self.elapsed > 0.0 {
            n as f64 / self.elapsed
        } else {
            0.0
        };
        let per_image = self.bytes.checked_div(n).unwrap_or(0);
        let mut rows: Vec<(String, String)> = vec![("images audited".into(), n.to_string())];
        for v in [
            AuditVerdict::Pass,
            AuditVerdict::Reject,
            AuditVerdict::Mismatch,
            AuditVerdict::Uninspectable,
            AuditVerdict::Error,
        ] {
            rows.push((v.name().into(), self.count(v).to_string()));
        }
        if self.step_failed > 0 {
            rows.push((
                "a step failed after the verdict".into(),
                self.step_failed.to_string(),
            ));
        }
        if self.deactivated > 0 || self.deactivation_failed > 0 {
            rows.push(("deactivated".into(), self.deactivated.to_string()));
            rows.push((
                "deactivation failed".into(),
                self.deactivation_failed.to_string(),
            ));
        }
        rows.push((
            "bytes read".into(),
            format!(
                "{} ({} per image)",
                crate::common::short_size(self.bytes),
                crate::common::short_size(per_image)
            ),
        ));
        rows.push(("requests".into(), self.requests.to_string()));
        rows.push((
            "time".into(),
            format!("{:.1} s ({rate:.1} images/s)", self.elapsed),
        ));
        if let Some(e) = &self.list_error {
            rows.push(("listing failed".into(), e.clone()));
        }
        if let Some(sig) = self.interrupted {
            rows.push((
                "interrupted".into(),
                format!("by {sig}; {} listed images not finished", self.unfinished),
            ));
        }
        if self.listing && (self.interrupted.is_some() || self.list_error.is_some()) {
            rows.push((
                "resume with".into(),
                match &self.resume {
                    Some(m) => format!("--marker {m}"),
                    None => "no --marker (no image finished in listing order)".into(),
                },
            ));
        }
        errp!("{}", crate::common::table(&rows));
    }

    fn exit_code(&self) -> u8 {
        if self.list_error.is_some()
            || self.interrupted.is_some()
            || self.count(AuditVerdict::Error) > 0
            || self.deactivation_failed > 0
            || self.step_failed > 0
        {
            2
        } else if self.count(AuditVerdict::Reject) > 0 || self.count(AuditVerdict::Mismatch) > 0 {
            1
        } else {
            0
        }
    }
}

/// The main thread's side: prints each image's line as it arrives, and counts.
struct Collector {
    summary: Summary,
    bar: Option<indicatif::ProgressBar>,
    /// Images to audit again alone (see [`Msg::Retry`]).
    retries: Vec<Work>,
    /// Listed images, by their place in the listing, from the first one not yet done: the id,
    /// and whether it is done. Bounded by the images in flight.
    pending: BTreeMap<u64, (String, bool)>,
}

impl Collector {
    fn new(progress: bool, listing: bool) -> Self {
        let bar = progress.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(0),
                indicatif::ProgressDrawTarget::stderr(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{pos}/{len} images [{wide_bar}] {per_sec} {elapsed_precise} {msg}",
            ) {
                bar.set_style(style);
            }
            bar
        });
        Collector {
            summary: Summary {
                listing,
                ..Summary::default()
            },
            bar,
            retries: Vec::new(),
            pending: BTreeMap::new(),
        }
    }

    fn say(&self, msg: &str) {
        // Messages name images by what the catalog says (names, errors quoting image bytes).
        let msg = crate::common::printable(msg);
        match &self.bar {
            Some(b) => b.suspend(|| errln!("{msg}")),
            None => errln!("{msg}"),
        }
    }

    fn run(&mut self, rx: &Receiver<Msg>) {
        for msg in rx {
            match msg {
                Msg::Listed(seq, id) => {
                    self.summary.listed = self.summary.listed.saturating_add(1);
                    if let Some(id) = id {
                        self.pending.insert(seq, (id, false));
                    }
                    if let Some(b) = &self.bar {
                        b.set_length(self.summary.listed);
                    }
                }
                Msg::Done(seq, o) => self.done(seq, &o),
                Msg::Retry(seq, record) => self.retries.push((seq, record)),
                Msg::ListFailed(e) => {
                    self.say(&format!("glimpse: {e:#}"));
                    self.summary.list_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    /// Marks `seq` done and moves the resume point past every done image at the front.
    fn advance(&mut self, seq: u64) {
        if let Some(slot) = self.pending.get_mut(&seq) {
            slot.1 = true;
        }
        while let Some(entry) = self.pending.first_entry() {
            if !entry.get().1 {
                break;
            }
            let (id, _) = entry.remove();
            self.summary.resume = Some(id);
        }
    }

    fn done(&mut self, seq: u64, o: &Outcome) {
        if o.interrupted {
            return;
        }
        self.advance(seq);
        let s = &mut self.summary;
        if let Some(slot) = s.by_verdict.get_mut(o.verdict as usize) {
            *slot = slot.saturating_add(1);
        }
        s.bytes = s.bytes.saturating_add(o.bytes);
        s.requests = s.requests.saturating_add(o.requests);
        if o.step_failed {
            s.step_failed = s.step_failed.saturating_add(1);
        }
        let deactivation = o.line.get("deactivation").and_then(Value::as_str);
        if o.deactivated {
            s.deactivated = s.deactivated.saturating_add(1);
        } else if deactivation.is_some_and(|d| d.starts_with("failed")) {
            s.deactivation_failed = s.deactivation_failed.saturating_add(1);
        }
        let bad = s
            .count(AuditVerdict::Reject)
            .saturating_add(s.count(AuditVerdict::Mismatch));
        if o.step_failed || o.verdict == AuditVerdict::Error {
            if let Some(e) = o.line.get("error").and_then(Value::as_str) {
                self.say(&format!("glimpse: {e}"));
            }
        }
        if let Some(d) = deactivation.filter(|d| d.starts_with("failed")) {
            let id = o.line.get("id").and_then(Value::as_str).unwrap_or("?");
            self.say(&format!("glimpse: image {id}: deactivation {d}"));
        }
        let mut line = o.line.clone();
        if self.summary.listing {
            if let Some(l) = line.as_object_mut() {
                l.insert("resume_marker".into(), json!(self.summary.resume));
            }
        }
        outln!("{line}");
        if let Some(b) = &self.bar {
            b.inc(1);
            b.set_message(format!("{bad} failed"));
        }
    }

    fn finish(self) -> Summary {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
        let mut summary = self.summary;
        summary.unfinished = self
            .pending
            .values()
            .filter(|(_, done)| !done)
            .count()
            .try_into()
            .unwrap_or(u64::MAX);
        summary
    }
}

/// The severity of an audit finding of its own (not the policy's).
pub fn mismatch(code: &'static str, message: String) -> Finding {
    Finding {
        code,
        severity: Severity::Reject,
        message,
        offset: None,
    }
}
