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
///
/// Runs are printed as they are found, never collected (an image may have as many runs as
/// clusters). What fails before the first run (opening, the policy, the first table read) is
/// the `{filename, error}` object as before; what fails after output started (a read error
/// mid-walk, the file changing under us) leaves the JSON array unterminated, so that nothing
/// takes it for a whole map, and says so on stderr with exit 2, as `qemu-img map` does.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    let fail = |e: &anyhow::Error| {
        let (v, status) = failed(&name(&args.file), e);
        if args.output == OutputFormat::Json {
            print_json(vec![v]);
        }
        status
    };
    let image = match load(&args.file, None, &args.input) {
        Ok(l) => l.image,
        Err(e) => return Ok(fail(&e)),
    };
    let mut runs = Merged::all(image.as_ref());
    let first = match runs.next().transpose() {
        Ok(r) => r,
        Err(e) => return Ok(fail(&e.into())),
    };
    let Some(first) = first else {
        // No run at all (an empty disk): nothing printed yet, so any error is still the object.
        if let Err(e) = crate::source::unchanged(&args.file) {
            return Ok(fail(&e.into()));
        }
        match args.output {
            OutputFormat::Json => outln!("[]"),
            OutputFormat::Human => header(),
        }
        return Ok(0);
    };
    let mut out = Pending::default();
    match args.output {
        OutputFormat::Json => out.add(format_args!("[")),
        OutputFormat::Human => header(),
    }
    let mut next: Option<glimpse_formats::Result<Run>> = Some(Ok(first));
    let mut sep = "\n";
    while let Some(r) = next {
        let r = match r {
            Ok(r) => r,
            Err(e) => return Ok(broken(&args, out, &e.into())),
        };
        match args.output {
            OutputFormat::Json => {
                out.add(format_args!("{sep}  {}", element(&r)));
                sep = ",\n";
            }
            OutputFormat::Human => out.add(format_args!("{}\n", line(&r))),
        }
        if crate::common::stdout_failed() {
            // Nobody reads the rest: the command exits with the write error (main.rs).
            return Ok(0);
        }
        next = runs.next();
    }
    if let Err(e) = crate::source::unchanged(&args.file) {
        return Ok(broken(&args, out, &e.into()));
    }
    if args.output == OutputFormat::Json {
        out.add(format_args!("\n]\n"));
    }
    out.flush();
    Ok(0)
}

/// Output not yet written: lines are written 64 KiB at a time, not one system call each.
#[derive(Default)]
struct Pending(String);

impl Pending {
    /// Bytes held before they are written.
    const FLUSH_AT: usize = 64 << 10;

    fn add(&mut self, args: std::fmt::Arguments<'_>) {
        let _ = std::fmt::Write::write_fmt(&mut self.0, args);
        if self.0.len() >= Self::FLUSH_AT {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.0.is_empty() {
            out!("{}", self.0);
            self.0.clear();
        }
    }
}

/// An error after output started: what was printed stays as it is (a JSON array without its
/// `]`), the error goes to stderr, and the command exits 2.
fn broken(args: &Args, mut out: Pending, e: &anyhow::Error) -> u8 {
    if args.output == OutputFormat::Json {
        // End the last element's line, so that the error does not share it in a terminal.
        out.add(format_args!("\n"));
    }
    out.flush();
    let _ = failed(&name(&args.file), e);
    2
}

/// One run as an element of the JSON array, pretty-printed and indented as it would be
/// inside the whole array (its values hold no newline).
fn element(r: &Run) -> String {
    serde_json::to_string_pretty(&json(r))
        .unwrap_or_default()
        .replace('\n', "\n  ")
}

/// The human output's header line.
fn header() {
    outln!("{:<20} {:<20} {:<20} kind", "Offset", "Length", "Mapped to");
}

/// One run as a human line (without its newline).
fn line(e: &Run) -> String {
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
    format!("{:<#20x} {:<#20x} {:<20} {kind}", e.start, e.len, mapped)
}
