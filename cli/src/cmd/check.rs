//! `glimpse check`: the safety policy and structural checks.

use std::path::PathBuf;

use glimpse_formats::policy::{self, inspect, Policy, Report, Verdict};
use glimpse_formats::{Format, Limits, Severity};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use crate::common::{
    failed, info_json, info_rows, name, open_source, parse_format, parse_size, print_json, table,
    OutputFormat,
};

/// Arguments of `glimpse check`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// The declared format: a different detected format is a rejection (a qcow2 declared raw,
    /// or a raw declared qcow2). Glance's names; vpc is accepted for vhd.
    #[arg(long, value_parser = parse_format, value_name = "FORMAT")]
    expect_format: Option<Format>,
    /// Reject images whose virtual size exceeds this (k, M, G, T suffixes). No default;
    /// Glance's default image_size_cap is 1 TiB.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    max_virtual_size: Option<u64>,
    /// Accept a qcow2 backing file (it is still never opened).
    #[arg(long)]
    allow_backing_file: bool,
    /// Accept an image whose guest data is encrypted (`image.encrypted` becomes a warning):
    /// for an upload where the consumer holds the key. Its content is still never read.
    #[arg(long)]
    allow_encrypted: bool,
    /// With an OVA holding several disks: check only this disk (0-based). By default every
    /// disk is checked.
    #[arg(long, value_name = "N")]
    disk: Option<usize>,
    /// Output format: with json, one object for one file, an array for several; a file that
    /// could not be checked is an object with `filename` and `error`.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Image files; several are checked in parallel.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

enum Outcome {
    Checked {
        json: Value,
        human: String,
        verdict: Verdict,
    },
    Failed(String, anyhow::Error),
}

/// Runs `glimpse check`: exit 0 when every file passes, 1 when any is rejected, 2 when any
/// could not be checked.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    let policy = Policy {
        expect_format: args.expect_format,
        max_virtual_size: args.max_virtual_size,
        allow_backing_file: args.allow_backing_file,
        disk: args.disk,
        allow_encrypted: args.allow_encrypted,
        ..Policy::default()
    };
    let limits = crate::common::limits();
    let outcomes: Vec<Outcome> = args
        .files
        .par_iter()
        .map(|p| check_one(p, &policy, &limits))
        .collect();

    let mut code = 0u8;
    let mut items = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Checked {
                json,
                human,
                verdict,
            } => {
                if verdict == Verdict::Reject {
                    code = code.max(1);
                }
                if args.output == OutputFormat::Human {
                    out!("{human}");
                }
                items.push(json);
            }
            Outcome::Failed(fname, e) => {
                items.push(failed(&fname, &e).0);
                code = 2;
            }
        }
    }
    if args.output == OutputFormat::Json {
        print_json(items);
    }
    Ok(code)
}

/// An OVA checked without `--disk`: a gate checks every disk, not only the first
/// ([`policy::every_disk`], on the archive `inspect` already read). The per-disk verdicts and
/// findings are returned for the JSON `disks` array.
fn every_disk(report: &mut Report, policy: &Policy, limits: &Limits) -> Option<Value> {
    let disks = policy::every_disk(report, policy, limits)?;
    serde_json::to_value(disks).ok()
}

fn check_one(path: &std::path::Path, policy: &Policy, limits: &Limits) -> Outcome {
    let fname = name(path);
    let src = match open_source(path) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(fname, e),
    };
    let checked = inspect(src, policy, limits)
        .map_err(anyhow::Error::from)
        .map(|mut report| {
            let disks = every_disk(&mut report, policy, limits);
            (report, disks)
        });
    let (report, disks) = match crate::source::settled(path, checked) {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(fname, e),
    };
    let verdict = report.verdict();
    let mut obj = match report.info() {
        Some(info) => info_json(&fname, info),
        None => {
            let mut m = Map::new();
            m.insert("filename".into(), json!(fname));
            m.insert("format".into(), json!(report.format().name()));
            m
        }
    };
    let detected: Vec<&str> = report.detection.matches.iter().map(|f| f.name()).collect();
    obj.insert("detected-formats".into(), json!(detected));
    obj.insert("verdict".into(), json!(verdict));
    obj.insert(
        "findings".into(),
        serde_json::to_value(&report.findings).unwrap_or(Value::Null),
    );
    if let Some(d) = disks {
        obj.insert("disks".into(), d);
    }

    let mut rows = match report.info() {
        Some(info) => info_rows(&fname, info),
        None => vec![
            ("filename".into(), fname.clone()),
            ("format".into(), report.format().name().into()),
        ],
    };
    rows.insert(
        0,
        (
            "verdict".into(),
            if verdict == Verdict::Pass {
                "PASS".into()
            } else {
                "REJECT".into()
            },
        ),
    );
    for f in &report.findings {
        let sev = match f.severity {
            Severity::Reject => "reject",
            Severity::Warn => "warn",
            Severity::Info => "info",
        };
        let at = f.offset.map(|o| format!(" @ {o:#x}")).unwrap_or_default();
        rows.push((format!("{sev}: {}", f.code), format!("{}{at}", f.message)));
    }
    Outcome::Checked {
        json: Value::Object(obj),
        human: table(&rows),
        verdict,
    }
}
