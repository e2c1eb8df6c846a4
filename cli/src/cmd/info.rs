//! `glimpse info`: format, sizes, details and references, from metadata only.

use std::path::{Path, PathBuf};

use glimpse_formats::{detect, Limits};
use serde_json::{json, Value};

use crate::common::{
    failed, info_json, info_rows, name, open_image, open_source, print_json, table, OutputFormat,
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
    let mut out = Vec::new();
    let mut code = 0;
    for path in &args.files {
        let fname = name(path);
        match crate::source::settled(path, describe(path, &fname, args.disk, &limits)) {
            Ok((v, t)) => {
                out.push(v);
                if args.output == OutputFormat::Human {
                    out!("{t}");
                }
            }
            Err(e) => {
                let (v, _) = failed(&fname, &e);
                out.push(v);
                code = 2;
            }
        }
    }
    if args.output == OutputFormat::Json {
        print_json(out);
    }
    Ok(code)
}

/// One file's JSON object and human table.
fn describe(
    path: &Path,
    fname: &str,
    disk: Option<usize>,
    limits: &Limits,
) -> anyhow::Result<(Value, String)> {
    let src = open_source(path)?;
    let det = detect(src.as_ref())?;
    let img = open_image(src, &det, disk, limits)?;
    let mut obj = info_json(fname, img.info());
    let mut rows = info_rows(fname, img.info());
    if det.is_ambiguous() {
        let names = det.names();
        obj.insert("detected-formats".into(), json!(names));
        rows.push((
            "detected formats".into(),
            format!("{} (ambiguous!)", names.join(", ")),
        ));
    }
    Ok((Value::Object(obj), table(&rows)))
}
