//! `glimpse map`: the extents backing the guest disk, as `qemu-img map` prints them.

use std::path::PathBuf;

use glimpse_formats::{Format, Image, Merged, Run, RunKind};
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

/// qemu-img's flags for a run of an image of `format`: (data, zero, present, compressed,
/// offset), as `qemu-img map --output=json` sets them for that format:
/// - a stored range in a hole of the source file is `data` and `zero` with its offset (qemu
///   asks the file underneath);
/// - raw zero ranges (file holes) keep their offset, which is the guest offset;
/// - VHDX data has no offset (qemu's VHDX driver gives none);
/// - unallocated VDI and VHD blocks are `present` (qemu's drivers for them call unallocated
///   blocks zero, which counts as present); elsewhere unallocated is not present.
pub(crate) fn flags(r: &Run, format: Format) -> (bool, bool, bool, bool, Option<u64>) {
    match r.kind {
        RunKind::Data { .. } if format == Format::Vhdx => (true, false, true, false, None),
        RunKind::Data { host } => (true, false, true, false, Some(host)),
        RunKind::Hole { .. } if format == Format::Vhdx => (true, true, true, false, None),
        RunKind::Hole { host } => (true, true, true, false, Some(host)),
        RunKind::Compressed => (true, false, true, true, None),
        RunKind::Zero if format == Format::Raw => (false, true, true, false, Some(r.start)),
        RunKind::Zero => (false, true, true, false, None),
        RunKind::Unallocated => (
            false,
            true,
            matches!(format, Format::Vdi | Format::Vhd),
            false,
            None,
        ),
    }
}

/// Whether qemu's driver for this image asks the file underneath about holes in stored data
/// (its block status says `RAW` or `RECURSE`): raw, a static VDI, a fixed VHD, and a qcow2
/// that qemu takes for preallocated metadata. There a stored range in a hole is `zero` (and
/// `data`), as in qemu; elsewhere (dynamic VDI and VHD, VHDX, VMDK, parallels, other qcow2)
/// qemu calls it data, and so does `map`. `measure` looks under every format (less space,
/// still enough).
pub(crate) fn looks_under(image: &dyn Image) -> bool {
    let info = image.info();
    let detail = |k: &str| info.details.get(k).and_then(|v| v.as_str());
    match info.format {
        Format::Raw => true,
        Format::Qcow2 => qcow2_preallocated(image),
        Format::Vdi => detail("image-type") == Some("static"),
        Format::Vhd => detail("disk-type") == Some("fixed"),
        _ => false,
    }
}

/// qemu's test for a qcow2 with preallocated metadata (`qcow2_detect_metadata_preallocation`),
/// with the file's clusters standing for its referenced ones: the file holds at least
/// `max(real * 10 / 9, real + 2)` clusters, where `real` is how many clusters' worth of bytes
/// the file system has allocated to it. A file sparse by more than a tenth, that is.
fn qcow2_preallocated(image: &dyn Image) -> bool {
    let src = image.source();
    let (Some(cluster), Ok(len), Some(alloc)) = (
        image.info().cluster_size.filter(|c| *c > 0),
        src.size(),
        src.allocated_size(),
    ) else {
        return false;
    };
    let clusters = len.div_ceil(cluster);
    let real = alloc.checked_div(cluster).unwrap_or(0);
    let threshold = (real.saturating_mul(10) / 9).max(real.saturating_add(2));
    clusters >= threshold
}

/// One run as `qemu-img map --output=json` prints an entry.
fn json(r: &Run, format: Format) -> Value {
    let (data, zero, present, compressed, offset) = flags(r, format);
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
    let format = image.info().format;
    let mut runs = Merged::all_with_holes(image.as_ref(), looks_under(image.as_ref()));
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
                out.add(format_args!("{sep}  {}", element(&r, format)));
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
fn element(r: &Run, format: Format) -> String {
    serde_json::to_string_pretty(&json(r, format))
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
        RunKind::Hole { .. } => "hole",
    };
    let mapped = match e.kind {
        RunKind::Data { host } | RunKind::Hole { host } => format!("{host:#x}"),
        _ => "-".into(),
    };
    format!("{:<#20x} {:<#20x} {:<20} {kind}", e.start, e.len, mapped)
}
