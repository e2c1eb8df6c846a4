//! `glimpse info`: format, sizes, details and references, from metadata only.

use std::path::{Path, PathBuf};

use glimpse_formats::{detect, Limits};
use serde_json::{json, Value};

use crate::common::{
    failed, info_json, info_rows, name, open_image, open_source, table, JsonItems, OutputFormat,
};

/// Arguments of `glimpse info`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// Output format: with json, one object for one file, an array for several; a file that
    /// could not be read is an object with `filename` and `error`.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// With an OVA holding several disks: the disk to describe (0-based).
    #[arg(long, value_name = "N")]
    disk: Option<usize>,
    /// Image files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// Runs `glimpse info`: exit 0 when every file was read, 2 otherwise.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    let limits = crate::common::limits();
    let human = args.output == OutputFormat::Human;
    let mut json = (!human).then(|| JsonItems::new(args.files.len()));
    let mut code = 0;
    for path in &args.files {
        let fname = name(path);
        match crate::source::settled(path, describe(path, &fname, args.disk, &limits, human)) {
            Ok(Described::Human(t)) => out!("{t}"),
            Ok(Described::Json(v)) => {
                if let Some(json) = &mut json {
                    json.item(v);
                }
            }
            Err(e) => {
                let (v, _) = failed(&fname, &e);
                if let Some(json) = &mut json {
                    json.item(v);
                }
                code = 2;
            }
        }
    }
    if let Some(json) = json {
        json.finish();
    }
    Ok(code)
}

/// One file described in the output format asked for.
enum Described {
    Json(Value),
    Human(String),
}

/// One file's JSON object, or its human table when `human`.
fn describe(
    path: &Path,
    fname: &str,
    disk: Option<usize>,
    limits: &Limits,
    human: bool,
) -> anyhow::Result<Described> {
    let src = open_source(path)?;
    let det = detect(src.as_ref())?;
    let img = open_image(src, &det, disk, limits)?;
    let names = det.is_ambiguous().then(|| det.names());
    if human {
        let mut rows = info_rows(fname, img.info());
        if let Some(names) = names {
            rows.push((
                "detected formats".into(),
                format!("{} (ambiguous!)", names.join(", ")),
            ));
        }
        return Ok(Described::Human(table(&rows)));
    }
    let mut obj = info_json(fname, img.info());
    if let Some(names) = names {
        obj.insert("detected-formats".into(), json!(names));
    }
    Ok(Described::Json(Value::Object(obj)))
}
