//! `glimpse upload`: validate locally, create the Glance image, stream the file once while
//! hashing it, then verify what Glance stored. Any failure after the create deletes the image
//! (unless `--keep-on-failure`), so a failed upload leaves nothing behind.

pub(crate) mod auth;
pub(crate) mod glance;
pub(crate) mod http;
pub(crate) mod validate;

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use glimpse_formats::policy::{self, Policy, Verdict};
use glimpse_formats::Severity;
use serde_json::{json, Map, Value};

use self::glance::{Digests, Glance, HashingBody};
use self::http::Http;
use self::validate::{ContainerFormat, DiskFormat, Plan};
use crate::common::{failed, parse_size, OutputFormat};
use crate::interrupt;

/// Image visibility.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Visibility {
    /// Every project sees it.
    Public,
    /// Only the owner's project.
    Private,
    /// The owner and projects it is shared with.
    Shared,
    /// Every project, without appearing in default lists.
    Community,
}

/// Arguments of `glimpse upload`.
#[derive(clap::Args)]
#[command(
    after_help = "Exit status: 0 uploaded and verified, 1 rejected before upload (nothing sent), \
2 error (the image, if one was created, has been deleted unless --keep-on-failure)."
)]
pub struct Args {
    /// The image file.
    file: PathBuf,

    /// Image name (default: the file name).
    #[arg(long)]
    name: Option<String>,
    /// Glance disk_format (default: the detected format).
    #[arg(long, value_enum)]
    disk_format: Option<DiskFormat>,
    /// Glance container_format (default: ova for an OVA file, bare otherwise).
    #[arg(long, value_enum)]
    container_format: Option<ContainerFormat>,
    /// Image visibility (Glance's default when not given: shared).
    #[arg(long, value_enum)]
    visibility: Option<Visibility>,
    /// Minimum disk in GiB (default: the virtual size in GiB, rounded up).
    #[arg(long)]
    min_disk: Option<u64>,
    /// Minimum RAM in MiB.
    #[arg(long)]
    min_ram: Option<u64>,
    /// Protect the image from deletion (set after the upload is verified).
    #[arg(long)]
    protected: bool,
    /// An extra property (repeat for more).
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// A tag (repeat for more).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Use interoperable import (stage, then glance-direct import) instead of a direct PUT.
    #[arg(long)]
    import: bool,
    /// Seconds to wait for an import to finish.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    import_timeout: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Show a progress bar.
    #[arg(short = 'p', long)]
    progress: bool,
    /// Log each request (method, URL, status, x-openstack-request-id) to stderr; never secrets.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Keep the Glance image when a step after its creation fails.
    #[arg(long)]
    keep_on_failure: bool,

    /// Reject images whose virtual size exceeds this (e.g. 100G).
    #[arg(long, value_parser = parse_size)]
    max_virtual_size: Option<u64>,
    /// Accept a backing file (qcow2) or parent (VMDK) reference.
    #[arg(long)]
    allow_backing_file: bool,
    /// Accept an image whose guest data is encrypted (the consumer holds the key); its
    /// content is still never read.
    #[arg(long)]
    allow_encrypted: bool,
    /// Upload even when the local check rejects the image (the findings are still printed).
    #[arg(long)]
    force: bool,

    #[command(flatten)]
    auth: auth::AuthArgs,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, _)) if CORE.contains(&k) => Err(format!(
            "{k:?} is a core attribute of the image, not an extra property{}",
            match k {
                "disk_format" | "container_format" => {
                    ": the formats are the checked ones (--disk-format, --container-format)"
                }
                "name" | "visibility" | "min_disk" | "min_ram" | "protected" => {
                    ": use its own option (--name, --visibility, --min-disk, --min-ram, --protected)"
                }
                "tags" => ": use --tag",
                _ => "",
            }
        )),
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// What the local inspection established.
struct Local {
    /// The input as it was checked, streamed to Glance from the same open file or the same
    /// pinned remote object: what is uploaded is what was checked, even if the path is
    /// replaced or the object changes in between.
    input: Input,
    disk: DiskFormat,
    container: ContainerFormat,
    size: u64,
    virtual_size: Option<u64>,
    /// The virtual size Glance's inspector records, to verify its record against: the
    /// virtual size, except for an ISO, whose size Glance takes from the volume descriptor
    /// (a hybrid ISO's appended partitions are outside it).
    glance_virtual_size: Option<u64>,
}

/// The virtual size Glance records for `info`: an ISO's volume size (volume space size ×
/// logical block size, the `volume-size` detail), every other format's virtual size.
fn glance_virtual_size(info: &glimpse_formats::ImageInfo) -> u64 {
    let volume = info.details.get("volume-size").and_then(|v| v.as_u64());
    match (info.format, volume) {
        (glimpse_formats::Format::Iso, Some(v)) => v,
        _ => info.virtual_size,
    }
}

/// Runs the command; returns the exit code (0 uploaded, 1 rejected before upload, 2 error).
/// An error is one line on stderr naming the file, and with `--output json` the
/// `{filename, error}` object on stdout.
pub fn run(args: Args) -> anyhow::Result<u8> {
    match run_checked(&args) {
        Ok(code) => Ok(code),
        Err(e) => {
            let (v, status) = failed(&crate::common::name(&args.file), &e);
            if args.output == OutputFormat::Json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(status)
        }
    }
}

fn run_checked(args: &Args) -> anyhow::Result<u8> {
    let given = args.auth.options();
    crate::remote::configure(crate::remote::Config {
        tls: given.tls.clone(),
        verbose: args.verbose,
        auth: Some(given),
        max_size: crate::remote::MAX_SIZE,
    });
    let local = match inspect(args)? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let mut opts = args.auth.options();
    auth::apply_cloud(&mut opts)?;
    require_scheme("OS_IMAGE_URL (--os-image-url)", opts.image_url.as_deref())?;
    require_scheme("OS_AUTH_URL (--os-auth-url)", opts.auth_url.as_deref())?;
    let http = Http::new(http::agent(&opts.tls)?, &opts.tls, args.verbose);
    let session = auth::authenticate(&http, &opts)?;
    interrupt::install(interrupt::Again::Waits);
    // A signal ends a request that waits on Glance (a reply can take up to an hour); the
    // cleanup then runs on a client of its own.
    http.stop_on_signal();
    let cleanup = http.for_cleanup()?;
    let glance = Glance::new(&http, &session.token, &session.image_url);
    let cleaner = Glance::new(&cleanup, &session.token, &session.image_url);
    upload(args, &local, &glance, &cleaner)
}

/// An endpoint without `http://` or `https://` would otherwise fail later with a confusing
/// "relative URL" error: say what is missing.
pub(crate) fn require_scheme(what: &str, url: Option<&str>) -> anyhow::Result<()> {
    match url {
        Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
            match u.split_once("://") {
                Some((scheme, _)) => bail!(
                    "{what} {u:?}: the scheme {scheme:?} is not supported: use https:// (or http://)"
                ),
                None => bail!("{what} {u:?} has no scheme: write https://{u} (or http://{u})"),
            }
        }
        _ => Ok(()),
    }
}

/// Local validation. `Ok(Err(1))` is a rejection already reported.
/// The opened input.
enum Input {
    /// A local file, and its metadata when it was opened, before the check.
    File(File, crate::source::Stamp),
    Remote(crate::remote::HttpSource),
}

impl Input {
    /// Opens `path` once, for both the check and the upload. A remote object must be pinnable
    /// (an ETag or Last-Modified): otherwise the bytes sent could not be tied to those checked.
    fn open(path: &std::path::Path) -> anyhow::Result<(Self, glimpse_formats::Source)> {
        if let Some(url) = crate::source::remote_input(path) {
            let src = crate::source::open_remote(url)?;
            if let Some(why) = src.unpinned_reason() {
                bail!(
                    "{why}, so the bytes uploaded could not be tied to the bytes checked (only \
                     a strong ETag can); nothing was sent"
                );
            }
            return Ok((Self::Remote(src.clone()), std::sync::Arc::new(src)));
        }
        let file = crate::source::open_input(path, glimpse_formats::io::Access::Random)?.file;
        let checked = file.try_clone().context("cannot open")?;
        let stamp = crate::source::Stamp::of(&file)?;
        Ok((Self::File(file, stamp), std::sync::Arc::new(checked)))
    }

    /// Fails when the local file was written since it was opened: the bytes sent may then
    /// differ from the bytes checked, though the digests of what was sent match (a remote
    /// object is pinned by its validator instead).
    fn unchanged(&self) -> anyhow::Result<()> {
        if let Self::File(f, before) = self {
            if crate::source::Stamp::of(f)? != *before {
                bail!(
                    "the file was modified during the check or the upload (its size or times changed), so what Glance holds may not be what was checked"
                );
            }
        }
        Ok(())
    }

    /// The whole input, front to back.
    fn reader(&self) -> anyhow::Result<Box<dyn std::io::Read + Send>> {
        Ok(match self {
            // Streamed from the server into Glance: no local copy.
            Self::Remote(src) => src.sequential().context("cannot read")?,
            Self::File(f, _) => {
                // The check read at offsets (pread): this descriptor's position is its own
                // to set.
                let mut f = f.try_clone().context("cannot open")?;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).context("cannot read")?;
                Box::new(f)
            }
        })
    }
}

fn inspect(args: &Args) -> anyhow::Result<Result<Local, u8>> {
    let (input, src) = Input::open(&args.file)?;
    let size = src.size().context("cannot read")?;
    let detection = glimpse_formats::detect(src.as_ref()).context("cannot read")?;
    let detected = detection.format();
    let Some(disk) = args
        .disk_format
        .or_else(|| DiskFormat::from_detected(detected))
    else {
        // QED, LUKS: there is no disk_format to declare, and the policy refuses them anyway
        let report =
            policy::inspect_detected(src, detection, &Policy::default(), &crate::common::limits())
                .context("cannot read")?;
        report_findings(args, &report.findings, false);
        errln!(
            "glimpse: {}: not uploaded: {detected} is not a Glance disk_format (nothing was sent)",
            crate::common::name(&args.file)
        );
        return Ok(Err(1));
    };
    let container = args
        .container_format
        .unwrap_or(if detected == glimpse_formats::Format::Ova {
            ContainerFormat::Ova
        } else {
            ContainerFormat::Bare
        });
    let plan = validate::plan(disk, container).map_err(|e| anyhow!("{e}"))?;
    let expect = match plan {
        Plan::Expect(f) => f,
        Plan::Uninspectable(why) => {
            errln!(
                "glimpse: warning: {}: disk_format {} / container_format {}: {why}",
                crate::common::name(&args.file),
                disk.name(),
                container.name()
            );
            // Uninspectable still has a size: an empty file is never a disk (raw.empty).
            if size == 0 {
                let f = glimpse_formats::Finding::reject(
                    "raw.empty",
                    "the file is empty (0 bytes): it holds no disk",
                );
                report_findings(args, std::slice::from_ref(&f), args.force);
                if !args.force {
                    errln!(
                        "glimpse: {}: not uploaded: the image failed the check (nothing was sent)",
                        crate::common::name(&args.file)
                    );
                    return Ok(Err(1));
                }
            }
            return Ok(Ok(Local {
                input,
                disk,
                container,
                size,
                virtual_size: None,
                glance_virtual_size: None,
            }));
        }
    };
    let policy = Policy {
        expect_format: Some(expect),
        max_virtual_size: args.max_virtual_size,
        allow_backing_file: args.allow_backing_file,
        skip_structure: false,
        skip_data_walk: false,
        disk: None,
        allow_encrypted: args.allow_encrypted,
        image_service: true,
    };
    let limits = crate::common::limits();
    let mut report =
        policy::inspect_detected(src, detection, &policy, &limits).context("cannot read")?;
    // The gate is no weaker than `check`: every disk of an OVA, on the archive read above.
    policy::every_disk(&mut report, &policy, &limits);
    let rejected = report.verdict() == Verdict::Reject;
    report_findings(args, &report.findings, args.force);
    if rejected && !args.force {
        errln!(
            "glimpse: {}: not uploaded: the image failed the check (nothing was sent)",
            crate::common::name(&args.file)
        );
        return Ok(Err(1));
    }
    let virtual_size = report.info().map(|i| i.virtual_size);
    let glance_virtual_size = report.info().map(glance_virtual_size);
    Ok(Ok(Local {
        input,
        disk,
        container,
        size,
        virtual_size,
        glance_virtual_size,
    }))
}

/// Findings on stderr (and, for a rejection with `--output json`, the verdict on stdout).
fn report_findings(args: &Args, findings: &[glimpse_formats::Finding], forced: bool) {
    for f in findings {
        let sev = match f.severity {
            Severity::Reject if forced => "rejected (--force: uploading anyway)",
            Severity::Reject => "rejected",
            Severity::Warn => "warning",
            Severity::Info => continue,
        };
        let at = f
            .offset
            .map(|o| format!(" at offset {o:#x}"))
            .unwrap_or_default();
        errln!(
            "glimpse: {}: {sev}: {}{at}: {}",
            crate::common::name(&args.file),
            f.code,
            f.message
        );
    }
    let rejected = findings.iter().any(|f| f.severity == Severity::Reject);
    if rejected && !forced && args.output == OutputFormat::Json {
        let out = json!({"filename": crate::common::name(&args.file), "verdict": "reject", "findings": findings});
        if let Ok(text) = serde_json::to_string_pretty(&out) {
            outln!("{text}");
        }
    }
}

const GIB: u64 = 1 << 30;

/// The create request: the id glimpse chose, core attributes, tags and extra properties in one
/// POST (Glance takes extra properties as top-level string members; none may be a core
/// attribute, [`parse_property`]). `protected` is left out: a protected image
/// cannot be deleted, so it is set only after the upload has been verified.
fn create_body(args: &Args, local: &Local, id: &str) -> Value {
    let name = args.name.clone().unwrap_or_else(|| {
        // A URL's name without its query (a presigned URL's signature).
        PathBuf::from(crate::common::name(&args.file))
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mut m = Map::new();
    m.insert("id".into(), id.into());
    m.insert("name".into(), name.into());
    m.insert("disk_format".into(), local.disk.name().into());
    m.insert("container_format".into(), local.container.name().into());
    if let Some(v) = args.visibility {
        let s = match v {
            Visibility::Public => "public",
            Visibility::Private => "private",
            Visibility::Shared => "shared",
            Visibility::Community => "community",
        };
        m.insert("visibility".into(), s.into());
    }
    let min_disk = args
        .min_disk
        .or_else(|| local.virtual_size.map(|v| v.div_ceil(GIB)));
    if let Some(d) = min_disk {
        m.insert("min_disk".into(), d.into());
    }
    if let Some(r) = args.min_ram {
        m.insert("min_ram".into(), r.into());
    }
    if !args.tags.is_empty() {
        m.insert("tags".into(), args.tags.clone().into());
    }
    for (k, v) in &args.properties {
        m.insert(k.clone(), v.clone().into());
    }
    Value::Object(m)
}

/// Everything after local validation: create, send, verify, and delete on any failure.
///
/// glimpse chooses the image's id and sends it with the create, so that an image Glance made
/// can be found and deleted even when the create's reply is lost (a reset, a gateway error, a
/// signal while waiting), and so that no id from a reply ever goes into a URL.
fn upload(
    args: &Args,
    local: &Local,
    glance: &Glance<'_>,
    cleaner: &Glance<'_>,
) -> anyhow::Result<u8> {
    if interrupt::cancelled() {
        bail!(
            "interrupted by {} before the image was created",
            interrupt::signal_name()
        );
    }
    let id = new_image_id()?;
    let created = glance
        .create(create_body(args, local, &id))
        .and_then(|record| match record.get("id").and_then(Value::as_str) {
            Some(got) if got == id => Ok(()),
            got => Err(anyhow!(
                "Glance's reply to the create names image {got:?}, not the {id} asked for"
            )),
        });
    if let Err(e) = created {
        // 409: an image with this id exists, and is not this run's: never delete it. A
        // request that never reached Glance made nothing.
        if glance::status_of(&e) == Some(409) || glance::never_reached(&e) {
            return Err(e.context("creating the image (nothing was created)"));
        }
        return failed_after_create(args, e, &id, cleaner, false);
    }
    if args.verbose {
        errln!("glimpse: created image {id}");
    }
    match send_and_verify(args, local, glance, &id) {
        Ok(image) => {
            print_image(&image, args.output)?;
            Ok(0)
        }
        Err(e) => failed_after_create(args, e, &id, cleaner, true),
    }
}

/// Reports a failure once the create was sent, removes the image (unless
/// `--keep-on-failure`) and says whether anything is left: on stderr, and with `--output
/// json` as `image_id` and `left_behind` beside the error. `created` is false when the create
/// itself failed: the image may or may not exist.
fn failed_after_create(
    args: &Args,
    e: anyhow::Error,
    id: &str,
    cleaner: &Glance<'_>,
    created: bool,
) -> anyhow::Result<u8> {
    let e = if created {
        e
    } else {
        e.context("creating the image")
    };
    let e = if interrupt::cancelled() && !format!("{e:#}").contains("interrupted by") {
        // The signal ended a request that was waiting on Glance.
        e.context(format!("interrupted by {}", interrupt::signal_name()))
    } else {
        e
    };
    let (mut v, _) = failed(&crate::common::name(&args.file), &e);
    let left_behind = if args.keep_on_failure {
        if created {
            errln!("glimpse: image {id} was kept (--keep-on-failure)");
        } else {
            errln!("glimpse: image {id} may exist; it was kept (--keep-on-failure)");
        }
        true
    } else {
        if args.protected {
            // A lost reply to the PATCH that protects it: a protected image cannot be
            // deleted until it is unprotected (a no-op when it is not protected).
            let _ = cleaner.patch(
                id,
                json!([{"op": "replace", "path": "/protected", "value": false}]),
            );
        }
        match cleaner.delete(id) {
            Ok(()) => {
                errln!("glimpse: image {id} deleted; nothing was left behind");
                false
            }
            Err(d) if !created && glance::status_of(&d) == Some(404) => {
                errln!("glimpse: no image {id} was created; nothing was left behind");
                false
            }
            Err(d) => {
                errln!("glimpse: image {id} could NOT be deleted: {d:#}");
                true
            }
        }
    };
    if args.output == OutputFormat::Json {
        v["image_id"] = id.into();
        v["left_behind"] = left_behind.into();
        outln!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(2)
}

/// A random (version 4) UUID, the form of Glance's own image ids.
fn new_image_id() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    let mut got = 0;
    while got < b.len() {
        let rest = &mut b[got..];
        // SAFETY: a writable buffer of the length given.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => got += n,
            Err(_) => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(anyhow!(e).context("cannot draw a random image id"));
                }
            }
        }
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

fn send_and_verify(
    args: &Args,
    local: &Local,
    glance: &Glance<'_>,
    id: &str,
) -> anyhow::Result<Value> {
    let file = local.input.reader()?;
    let progress = args.progress.then(|| {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(local.size),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bytes}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec} {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let mut body = HashingBody::new(file, local.size, interrupt::flag(), progress);
    let started = Instant::now();
    let sent = glance.put_data(id, args.import, &mut body, local.size);
    if args.verbose && sent.is_ok() {
        let secs = started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            local.size as f64 / secs / f64::from(1u32 << 20)
        } else {
            0.0
        };
        errln!(
            "glimpse: sent {} bytes in {secs:.2} s ({rate:.1} MiB/s)",
            local.size
        );
    }
    let digests = match sent {
        Ok(()) => body.finish()?,
        Err(e) => {
            let _ = body.finish();
            if interrupt::cancelled() {
                bail!(
                    "interrupted by {} during the upload",
                    interrupt::signal_name()
                );
            }
            let hint = put_failure_hint(&e);
            return Err(e.context(hint));
        }
    };
    local.input.unchanged()?;
    let mut image = if args.import {
        glance
            .import(id)
            .context("starting the glance-direct import")?;
        wait_for_import(glance, id, Duration::from_secs(args.import_timeout))?
    } else {
        glance.get(id)?
    };
    if interrupt::cancelled() {
        bail!(
            "interrupted by {} after the upload",
            interrupt::signal_name()
        );
    }
    verify(&image, id, local, &digests)?;
    if args.protected {
        image = glance.patch(
            id,
            json!([{"op": "replace", "path": "/protected", "value": true}]),
        )?;
    }
    Ok(image)
}

/// What to say of a failed PUT: when Glance closed the connection while the data was still
/// being sent, its reason (a reply it may have sent first) is lost; the usual causes are its
/// size limits.
fn put_failure_hint(e: &anyhow::Error) -> &'static str {
    if glance::connection_lost(e) {
        "the upload failed: Glance closed the connection before it had all the data (an image over its image_size_cap or the project's storage quota ends this way)"
    } else {
        "the upload failed"
    }
}

/// Polls until the import lands, fails or times out.
fn wait_for_import(glance: &Glance<'_>, id: &str, timeout: Duration) -> anyhow::Result<Value> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        let image = glance.get(id)?;
        let status = image.get("status").and_then(Value::as_str).unwrap_or("");
        let failed = image
            .get("os_glance_failed_import")
            .and_then(Value::as_str)
            .unwrap_or("");
        if status == "active" {
            return Ok(image);
        }
        if !failed.is_empty() || matches!(status, "queued" | "killed" | "deleted") {
            let why = glance
                .failed_task_message(id)
                .unwrap_or_else(|| "Glance gave no reason".into());
            bail!("the import failed (status {status}, os_glance_failed_import {failed:?}): {why}");
        }
        if start.elapsed() >= timeout {
            bail!(
                "the import did not finish within {} s (status {status}); raise --import-timeout for large images",
                timeout.as_secs()
            );
        }
        // Sleep in short steps so that Ctrl-C is noticed quickly.
        let until = Instant::now() + delay;
        while Instant::now() < until {
            if interrupt::cancelled() {
                bail!(
                    "interrupted by {} while waiting for the import",
                    interrupt::signal_name()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Compares Glance's record with what was sent.
fn verify(image: &Value, id: &str, local: &Local, d: &Digests) -> anyhow::Result<()> {
    let s = |k: &str| image.get(k).and_then(Value::as_str);
    let n = |k: &str| image.get(k).and_then(Value::as_u64);
    let mut bad = Vec::new();
    for (key, want) in [
        ("id", id),
        ("disk_format", local.disk.name()),
        ("container_format", local.container.name()),
    ] {
        if s(key) != Some(want) {
            bad.push(format!(
                "{key} is {} instead of {want}",
                s(key).map_or("missing".into(), |v| format!("{v:?}"))
            ));
        }
    }
    if s("status") != Some("active") {
        bad.push(format!(
            "status is {} instead of active",
            s("status").unwrap_or("missing")
        ));
    }
    if n("size") != Some(d.size) {
        bad.push(format!(
            "size is {:?} but {} bytes were sent",
            n("size"),
            d.size
        ));
    }
    if s("checksum") != Some(d.md5.as_str()) {
        bad.push(format!(
            "checksum (md5) is {:?} but the file's is {}",
            s("checksum"),
            d.md5
        ));
    }
    match s("os_hash_algo") {
        Some("sha512") => {
            if s("os_hash_value") != Some(d.sha512.as_str()) {
                bad.push(format!(
                    "os_hash_value (sha512) is {:?} but the file's is {}",
                    s("os_hash_value"),
                    d.sha512
                ));
            }
        }
        other => bad.push(format!(
            "os_hash_algo is {other:?}; glimpse verifies sha512"
        )),
    }
    if let (Some(theirs), Some(ours)) = (n("virtual_size"), local.glance_virtual_size) {
        if theirs != ours {
            bad.push(format!(
                "virtual_size is {theirs} but the image's is {ours}"
            ));
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "Glance's record does not match what was sent: {}",
            bad.join("; ")
        ))
    }
}

/// Core attributes shown as rows; anything else is an extra property, shown together as
/// `properties` the way `openstack image create` does.
const CORE: &[&str] = &[
    "checksum",
    "container_format",
    "created_at",
    "disk_format",
    "file",
    "id",
    "min_disk",
    "min_ram",
    "name",
    "owner",
    "protected",
    "schema",
    "size",
    "status",
    "tags",
    "updated_at",
    "virtual_size",
    "visibility",
    "os_hash_algo",
    "os_hash_value",
    "os_hidden",
    "self",
    "stores",
    "locations",
    "direct_url",
];

fn print_image(image: &Value, output: OutputFormat) -> anyhow::Result<()> {
    if output == OutputFormat::Json {
        outln!("{}", serde_json::to_string_pretty(image)?);
        return Ok(());
    }
    let Some(obj) = image.as_object() else {
        bail!("Glance's record is not an object")
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    };
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut props = Vec::new();
    for (k, v) in obj {
        if CORE.contains(&k.as_str()) {
            rows.push((k.clone(), text(v)));
        } else {
            props.push(format!("{k}='{}'", text(v)));
        }
    }
    props.sort();
    if !props.is_empty() {
        rows.push(("properties".into(), props.join(", ")));
    }
    rows.sort();
    // The record is the server's: the shared table pads by hand and caps its columns.
    out!("{}", crate::common::table(&rows));
    Ok(())
}
