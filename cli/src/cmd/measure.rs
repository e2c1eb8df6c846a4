//! `glimpse measure`: required and fully-allocated output size for every target format.

use std::path::PathBuf;

use glimpse_convert::{measure, measure_image, Measure, WriteOptions};
use glimpse_formats::Format;
use serde_json::json;

use crate::common::{
    failed, load, name, parse_format, parse_size, print_json, InputOpts, OutputFormat,
};

/// Arguments of `glimpse measure`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// Output format.
    #[arg(short = 'O', value_parser = parse_format, value_name = "FORMAT")]
    output_format: Format,
    /// Output options, as for convert.
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Compression (as for convert; the estimate assumes no saving).
    #[arg(short = 'c')]
    compress: bool,
    /// Measure a new empty image of this size instead of a source.
    #[arg(long, value_parser = parse_size, conflicts_with = "src")]
    size: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    #[command(flatten)]
    input: InputOpts,
    /// Source image.
    #[arg(required_unless_present = "size")]
    src: Option<PathBuf>,
}

/// Runs `glimpse measure`: exit 0, 1 when the policy refuses the source, 2 on errors.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    let m = match sizes(&args) {
        Ok(m) => m,
        Err(e) => {
            let fname = args.src.as_deref().map(name).unwrap_or_default();
            let (v, status) = failed(&fname, &e);
            if args.output == OutputFormat::Json {
                print_json(vec![v]);
            }
            return Ok(status);
        }
    };
    match args.output {
        OutputFormat::Json => outln!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"required": m.required, "fully-allocated": m.fully_allocated})
            )?
        ),
        OutputFormat::Human => {
            outln!("required size: {}", m.required);
            outln!("fully allocated size: {}", m.fully_allocated);
        }
    }
    Ok(0)
}

fn sizes(args: &Args) -> anyhow::Result<Measure> {
    let opts = WriteOptions::parse(&args.options.join(","), args.compress)?;
    Ok(match (&args.src, args.size) {
        (Some(src), _) => {
            let image = load(src, None, &args.input)?.image;
            let m = measure_image(args.output_format, &opts, image.as_ref())?;
            crate::source::unchanged(src)?;
            m
        }
        (None, Some(s)) => measure(args.output_format, &opts, s, 0)?,
        (None, None) => anyhow::bail!("give a source image or --size"),
    })
}
