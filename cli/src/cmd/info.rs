//! `glimpse info`: format, sizes, details and references, from metadata only.

use std::path::PathBuf;

use glimpse_formats::{detect, open, Limits};
use serde_json::{json, Value};

use crate::common::{info_json, info_rows, name, open_source, print_json, table, OutputFormat};

/// Arguments of `glimpse info`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Image files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// Runs `glimpse info`: exit 0 when every file was read, 2 otherwise.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let limits = Limits::default();
    let mut out = Vec::new();
    let mut code = 0;
    for path in &args.files {
        let fname = name(path);
        let result = (|| -> anyhow::Result<(Value, String)> {
            let src = open_source(path)?;
            let det = detect(src.as_ref())?;
            let img = open(src, det.format(), &limits)?;
            let mut obj = info_json(&fname, img.info());
            let mut rows = info_rows(&fname, img.info());
            if det.is_ambiguous() {
                let names: Vec<&str> = det.matches.iter().map(|f| f.name()).collect();
                obj.insert("detected-formats".into(), json!(names));
                rows.push((
                    "detected formats".into(),
                    format!("{} (ambiguous!)", names.join(", ")),
                ));
            }
            Ok((Value::Object(obj), table(&rows)))
        })();
        match result {
            Ok((v, t)) => {
                out.push(v);
                if args.output == OutputFormat::Human {
                    print!("{t}");
                }
            }
            Err(e) => {
                eprintln!("glimpse: {fname}: {e:#}");
                code = 2;
            }
        }
    }
    if args.output == OutputFormat::Json && !out.is_empty() {
        print_json(out);
    }
    Ok(code)
}
