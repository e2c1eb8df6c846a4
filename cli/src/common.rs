//! Helpers shared by the subcommands: opening images under the policy, and rendering.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use glimpse_formats::policy::{inspect, Policy, Report, Verdict};
use glimpse_formats::{Format, Image, ImageInfo, Limits, Source};
use serde_json::{json, Map, Value};

/// `--output human|json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A readable Field/Value table.
    #[default]
    Human,
    /// Machine-readable JSON.
    Json,
}

/// Opens `path` read-only as a shared positional source (a pipe or device without a size is
/// refused: see `source.rs`).
pub fn open_source(path: &Path) -> anyhow::Result<Source> {
    crate::source::open_random(path)
}

/// Parses a size such as `10G`, `512M` or `1099511627776` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    glimpse_convert::parse_size(s).ok_or_else(|| {
        format!("{s:?} is not a size (use a number with an optional k, M, G or T suffix)")
    })
}

/// Parses a format name (Glance's names; `vpc` is an alias of `vhd`).
pub fn parse_format(s: &str) -> Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

/// Options that say how an input image is opened by commands that read guest data.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct InputOpts {
    /// Proceed even when the safety policy rejects the image (a referenced file is still
    /// never opened).
    #[arg(long)]
    pub force: bool,
    /// With an OVA holding several disks: the disk to use (0-based).
    #[arg(long, value_name = "N")]
    pub disk: Option<usize>,
}

/// An image opened for reading guest data, with the policy report that allowed it.
pub struct Loaded {
    /// The image.
    pub image: Arc<dyn Image>,
}

/// Detects, opens and checks `path` under the default policy (plus `expect`), refusing a
/// rejected image unless `--force`.
pub fn load(path: &Path, expect: Option<Format>, opts: &InputOpts) -> anyhow::Result<Loaded> {
    let src = open_source(path)?;
    let policy = Policy {
        expect_format: expect,
        disk: opts.disk,
        ..Policy::default()
    };
    let report =
        inspect(src, &policy, &Limits::default()).with_context(|| path.display().to_string())?;
    let verdict = report.verdict();
    let Report {
        image, findings, ..
    } = report;
    if verdict == Verdict::Reject {
        let reasons: Vec<String> = findings
            .iter()
            .filter(|f| f.severity == glimpse_formats::Severity::Reject)
            .map(|f| format!("{} ({})", f.message, f.code))
            .collect();
        if !opts.force || image.is_none() {
            anyhow::bail!(
                "{}: rejected by the safety policy: {}{}",
                path.display(),
                reasons.join("; "),
                if image.is_some() {
                    " (use --force to read it anyway)"
                } else {
                    ""
                }
            );
        }
        eprintln!(
            "glimpse: warning: {}: reading despite: {}",
            path.display(),
            reasons.join("; ")
        );
    }
    let image = image.with_context(|| format!("{}: cannot be opened", path.display()))?;
    Ok(Loaded {
        image: Arc::from(image),
    })
}

/// The qemu-img-style JSON object for an image's info.
pub fn info_json(filename: &str, info: &ImageInfo) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(info.format.name()));
    m.insert("virtual-size".into(), json!(info.virtual_size));
    if let Some(a) = info.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(c) = info.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    if let Some(d) = info.dirty {
        m.insert("dirty-flag".into(), json!(d));
    }
    if info.encrypted {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = info.backing_file() {
        m.insert("backing-filename".into(), json!(b.target));
        if let Some(f) = &b.format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    if !info.details.is_empty() {
        m.insert(
            "format-specific".into(),
            json!({"type": info.format.qemu_name(), "data": info.details}),
        );
    }
    m.insert(
        "references".into(),
        serde_json::to_value(&info.references).unwrap_or(Value::Null),
    );
    m
}

/// Renders a Field/Value table like `glance image-show` prints.
pub fn table(rows: &[(String, String)]) -> String {
    let w1 = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let w2 = rows
        .iter()
        .flat_map(|(_, v)| v.lines().map(|l| l.chars().count()))
        .max()
        .unwrap_or(0)
        .max(5);
    let sep = format!("+-{}-+-{}-+\n", "-".repeat(w1), "-".repeat(w2));
    let mut out = String::new();
    out.push_str(&sep);
    out.push_str(&format!("| {:<w1$} | {:<w2$} |\n", "Field", "Value"));
    out.push_str(&sep);
    for (k, v) in rows {
        let mut first = true;
        for line in v.lines().chain(if v.is_empty() { Some("") } else { None }) {
            let key = if first { k.as_str() } else { "" };
            out.push_str(&format!("| {key:<w1$} | {line:<w2$} |\n"));
            first = false;
        }
    }
    out.push_str(&sep);
    out
}

/// Binary units above bytes, for [`scaled`].
const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];

/// `n` in the largest binary unit it reaches: `None` below 1 KiB.
fn scaled(n: u64) -> Option<(f64, &'static str)> {
    let mut v = n as f64;
    let mut unit = None;
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = Some(u);
    }
    unit.map(|u| (v, u))
}

/// A human-readable byte count with the exact value: `1 GiB (1073741824 bytes)`.
pub fn human_size(n: u64) -> String {
    match scaled(n) {
        None => format!("{n} bytes"),
        Some((v, u)) => format!("{v:.3} {u} ({n} bytes)").replace(".000 ", " "),
    }
}

/// A short byte count for table columns: `512 B`, `4.0 KiB`.
pub fn short_size(n: u64) -> String {
    match scaled(n) {
        None => format!("{n} B"),
        Some((v, u)) => format!("{v:.1} {u}"),
    }
}

/// Rows of the human info table.
pub fn info_rows(filename: &str, info: &ImageInfo) -> Vec<(String, String)> {
    let mut rows = vec![
        ("filename".to_string(), filename.to_string()),
        ("format".to_string(), info.format.name().to_string()),
        ("virtual size".to_string(), human_size(info.virtual_size)),
    ];
    if let Some(a) = info.actual_size {
        rows.push(("actual size".into(), human_size(a)));
    }
    if let Some(c) = info.cluster_size {
        rows.push(("cluster size".into(), c.to_string()));
    }
    if let Some(d) = info.dirty {
        rows.push(("dirty flag".into(), d.to_string()));
    }
    if info.encrypted {
        rows.push(("encrypted".into(), "yes".into()));
    }
    for (k, v) in &info.details {
        let text = match v {
            Value::String(s) => s.clone(),
            other => serde_json::to_string(other).unwrap_or_default(),
        };
        rows.push((k.clone(), text));
    }
    for r in &info.references {
        let kind = serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let fmt = r
            .format
            .as_deref()
            .map(|f| format!(" (format {f})"))
            .unwrap_or_default();
        rows.push((format!("reference: {kind}"), format!("{}{fmt}", r.target)));
    }
    rows
}

/// Prints JSON: one object for one file, an array for several.
pub fn print_json(items: Vec<Value>) {
    let v = if items.len() == 1 {
        items.into_iter().next().unwrap_or(Value::Null)
    } else {
        Value::Array(items)
    };
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// The display name of a path.
pub fn name(path: &Path) -> String {
    path.display().to_string()
}
