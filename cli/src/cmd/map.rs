//! `glimpse map`: the extents backing the guest disk, as `qemu-img map` prints them.

use std::path::PathBuf;

use glimpse_formats::{Merged, Run, RunKind};
use serde_json::{json, Value};

use crate::common::{failed, load, name, print_json, InputOpts, OutputFormat};

/// Arguments of `glimpse map`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// Output format: with json, an array of extents, or an object with `filename` and
    /// `error` when the image cannot be mapped.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    #[command(flatten)]
    input: InputOpts,
    /// Image file.
    file: PathBuf,
}

/// qemu-img's flags for a run: (data, zero, present, compressed, offset).
fn flags(r: &Run) -> (bool, bool, bool, bool, Option<u64>) {
    match r.kind {
        RunKind::Data { host } => (true, false, true, false, Some(host)),
        RunKind::Compressed => (true, false, true, true, None),
        RunKind::Zero => (false, true, true, false, None),
        RunKind::Unallocated => (false, true, false, false, None),
    }
}

/// One run as `qemu-img map --output=json` prints an entry.
fn json(r: &Run) -> Value {
    let (data, zero, present, compressed, offset) = flags(r);
    let mut v = json!({
        "start": r.start, "length": r.len, "depth": 0, "present": present,
        "zero": zero, "data": data, "compressed": compressed,
    });
    if let (Some(o), Some(m)) = (offset, v.as_object_mut()) {
        m.insert("offset".into(), json!(o));
    }
    v
}

/// Runs `glimpse map`: exit 0, 1 when the policy refuses the image, 2 when it cannot be read.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    let entries = match extents(&args) {
        Ok(e) => e,
        Err(e) => {
            let (v, status) = failed(&name(&args.file), &e);
            if args.output == OutputFormat::Json {
                print_json(vec![v]);
            }
            return Ok(status);
        }
    };
    match args.output {
        OutputFormat::Json => {
            let v: Vec<Value> = entries.iter().map(json).collect();
            outln!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            outln!("{:<20} {:<20} {:<20} kind", "Offset", "Length", "Mapped to");
            for e in &entries {
                let kind = match e.kind {
                    RunKind::Compressed => "compressed",
                    RunKind::Data { .. } => "data",
                    RunKind::Zero => "zero",
                    RunKind::Unallocated => "unallocated",
                };
                let mapped = match e.kind {
                    RunKind::Data { host } => format!("{host:#x}"),
                    _ => "-".into(),
                };
                outln!("{:<#20x} {:<#20x} {:<20} {kind}", e.start, e.len, mapped);
            }
        }
    }
    Ok(0)
}

/// The merged extents of the image.
fn extents(args: &Args) -> anyhow::Result<Vec<Run>> {
    let image = load(&args.file, None, &args.input)?.image;
    let runs = Merged::all(image.as_ref()).collect::<glimpse_formats::Result<_>>()?;
    crate::source::unchanged(&args.file)?;
    Ok(runs)
}
