//! `glimpse audit`: checks every image already stored in a Glance catalog, where it is stored.
//!
//! One thread lists the catalog (filters, `next` links, `--marker`, `--shard`) into a bounded
//! queue; `-j N` workers each audit one image at a time (the `check` policy on the stored
//! data read remotely, size and virtual-size comparisons, optionally a full digest pass, and
//! optionally the deactivation of what fails); the main thread prints one JSON line per image
//! as each finishes, then a summary. Memory is bounded by the queue lengths, one image's state
//! per worker, and the command's shared metadata budget, whatever N and the catalog size.

mod catalog;
mod digest;
mod inspect;
mod shard;

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Context};
use glimpse_formats::{Finding, Severity};
use serde_json::{json, Map, Value};

use self::catalog::{clip, valid_id, Catalog, Filters};
use self::shard::Shard;
use crate::cmd::upload::auth::{self, AuthArgs};
use crate::cmd::upload::http::{self, Http};
use crate::cmd::upload::require_scheme;

/// Arguments of `glimpse audit`.
#[derive(clap::Args)]
#[command(
    after_help = "Output: one JSON line per image on stdout (in the order images finish), then a \
summary table on stderr.\nExit status: 0 every image passed, 1 any image was rejected or did not \
match Glance's record, 2 any image (or the listing) could not be audited."
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
    /// Resume the listing after this image id (images are listed in id order).
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
    /// Deactivate each rejected or mismatched image (Images API deactivate action, admin
    /// only). Without it the audit changes nothing.
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
    let catalog = Catalog::new(
        &client,
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
    for id in ids {
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
    /// More images were queued.
    Listed(u64),
    /// An image is done.
    Done(Box<Outcome>),
    /// The listing failed; images already queued are still audited.
    ListFailed(anyhow::Error),
    /// The image hit the metadata budget that all workers share: it is audited again, alone,
    /// once the others are done, so that a busy budget never reads as a rejection.
    Retry(Value),
}

fn audit(args: &Args, ctx: &Ctx<'_>) -> u8 {
    let jobs = usize::from(args.jobs.max(1));
    let started = Instant::now();
    let (work_tx, work_rx) = sync_channel::<Value>(jobs.saturating_mul(2));
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
    let mut collector = Collector::new(args.progress);
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
    for record in std::mem::take(&mut collector.retries) {
        let outcome = audit_one(ctx, &record, false);
        collector.done(&outcome);
    }
    let mut summary = collector.finish();
    summary.elapsed = started.elapsed().as_secs_f64();
    summary.print();
    summary.exit_code()
}

/// Lists (or looks up) the images to audit and queues them.
fn list(
    args: &Args,
    ctx: &Ctx<'_>,
    filters: &Filters,
    work: &SyncSender<Value>,
    msgs: &SyncSender<Msg>,
) {
    let queue = |record: Value| -> bool {
        let id = record.get("id").and_then(Value::as_str).unwrap_or("");
        if let Some(shard) = &args.shard {
            if !shard.owns(id) {
                return true;
            }
        }
        let _ = msgs.send(Msg::Listed(1));
        work.send(record).is_ok()
    };
    if !args.images.is_empty() {
        for id in &args.images {
            match ctx.catalog.get(id) {
                Ok(record) => {
                    if !queue(record) {
                        return;
                    }
                }
                Err(e) => {
                    let _ = msgs.send(Msg::Listed(1));
                    let _ = msgs.send(Msg::Done(Box::new(error_outcome(&json!({ "id": id }), &e))));
                }
            }
        }
        return;
    }
    let mut url = match ctx.catalog.first_page(filters, args.marker.as_deref()) {
        Ok(u) => u,
        Err(e) => {
            let _ = msgs.send(Msg::ListFailed(e));
            return;
        }
    };
    loop {
        let (images, next) = match ctx.catalog.page(&url) {
            Ok(p) => p,
            Err(e) => {
                let _ = msgs.send(Msg::ListFailed(e));
                return;
            }
        };
        let empty = images.is_empty();
        for record in images {
            if !record.is_object() {
                let _ = msgs.send(Msg::ListFailed(anyhow!(
                    "listing images: an entry of Glance's page is not an image record"
                )));
                return;
            }
            if !queue(record) {
                return;
            }
        }
        match next {
            // a page that does not move on would repeat forever
            Some(n) if n == url => {
                let _ = msgs.send(Msg::ListFailed(anyhow!(
                    "listing images: Glance's `next` link repeats the page just read"
                )));
                return;
            }
            Some(n) if !empty => url = n,
            _ => return,
        }
    }
}

/// A worker: audits queued images until the queue closes.
fn work(ctx: &Ctx<'_>, rx: &Mutex<Receiver<Value>>, tx: &SyncSender<Msg>) {
    loop {
        let next = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(record) = next else { return };
        let outcome = audit_one(ctx, &record, ctx.parallel);
        let msg = if outcome.retry {
            Msg::Retry(record)
        } else {
            Msg::Done(Box::new(outcome))
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// The fields of a Glance record the JSON line repeats.
fn head(record: &Value) -> Map<String, Value> {
    let mut m = Map::new();
    for k in [
        "id",
        "name",
        "owner",
        "disk_format",
        "container_format",
        "status",
    ] {
        m.insert(k.into(), record.get(k).cloned().unwrap_or(Value::Null));
    }
    m
}

fn error_outcome(record: &Value, e: &anyhow::Error) -> Outcome {
    let mut line = head(record);
    line.insert("verdict".into(), json!(AuditVerdict::Error.name()));
    line.insert("error".into(), json!(format!("{e:#}")));
    Outcome {
        line: Value::Object(line),
        verdict: AuditVerdict::Error,
        bytes: 0,
        requests: 0,
        deactivated: false,
        retry: false,
    }
}

/// Audits one image.
fn audit_one(ctx: &Ctx<'_>, record: &Value, may_retry: bool) -> Outcome {
    let id = match record.get("id").and_then(Value::as_str) {
        Some(id) if valid_id(id) => id.to_string(),
        other => {
            let e = anyhow!(
                "Glance's record has no usable id ({:?})",
                other.map(clip).unwrap_or_default()
            );
            return error_outcome(record, &e);
        }
    };
    let mut checked = inspect::Checked::default();
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
    let mut line = head(record);
    let verdict = match &result {
        Err(_) => AuditVerdict::Error,
        Ok(()) => checked.verdict(),
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
        json!({"glance": record.get("size"), "stored": checked.stored_size}),
    );
    line.insert(
        "virtual_size".into(),
        json!({"glance": record.get("virtual_size"), "glimpse": checked.virtual_size}),
    );
    line.insert("digests".into(), json!(checked.digests.name()));
    line.insert("bytes_read".into(), json!(checked.bytes));
    line.insert("requests".into(), json!(checked.requests));
    if let Err(e) = &result {
        line.insert("error".into(), json!(format!("{e:#}")));
    }
    let mut deactivated = false;
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
            match ctx.catalog.deactivate(&id) {
                Ok(()) => {
                    deactivated = true;
                    line.insert("deactivated".into(), json!(true));
                }
                Err(e) => {
                    line.insert("deactivated".into(), json!(false));
                    line.insert("deactivation".into(), json!(format!("failed: {e:#}")));
                }
            }
        }
    }
    Outcome {
        line: Value::Object(line),
        verdict,
        bytes: checked.bytes,
        requests: checked.requests,
        deactivated,
        retry: false,
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
    list_error: Option<String>,
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
        errp!("{}", crate::common::table(&rows));
    }

    fn exit_code(&self) -> u8 {
        if self.list_error.is_some()
            || self.count(AuditVerdict::Error) > 0
            || self.deactivation_failed > 0
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
    retries: Vec<Value>,
}

impl Collector {
    fn new(progress: bool) -> Self {
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
            summary: Summary::default(),
            bar,
            retries: Vec::new(),
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
                Msg::Listed(n) => {
                    self.summary.listed = self.summary.listed.saturating_add(n);
                    if let Some(b) = &self.bar {
                        b.set_length(self.summary.listed);
                    }
                }
                Msg::Done(o) => self.done(&o),
                Msg::Retry(record) => self.retries.push(record),
                Msg::ListFailed(e) => {
                    self.say(&format!("glimpse: {e:#}"));
                    self.summary.list_error = Some(format!("{e:#}"));
                }
            }
        }
    }

    fn done(&mut self, o: &Outcome) {
        let s = &mut self.summary;
        if let Some(slot) = s.by_verdict.get_mut(o.verdict as usize) {
            *slot = slot.saturating_add(1);
        }
        s.bytes = s.bytes.saturating_add(o.bytes);
        s.requests = s.requests.saturating_add(o.requests);
        if o.deactivated {
            s.deactivated += 1;
        } else if o
            .line
            .get("deactivation")
            .and_then(Value::as_str)
            .is_some_and(|d| d.starts_with("failed"))
        {
            s.deactivation_failed += 1;
        }
        let bad = s.count(AuditVerdict::Reject) + s.count(AuditVerdict::Mismatch);
        if o.verdict == AuditVerdict::Error {
            if let Some(e) = o.line.get("error").and_then(Value::as_str) {
                self.say(&format!("glimpse: {e}"));
            }
        }
        outln!("{}", o.line);
        if let Some(b) = &self.bar {
            b.inc(1);
            b.set_message(format!("{bad} failed"));
        }
    }

    fn finish(self) -> Summary {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
        self.summary
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
