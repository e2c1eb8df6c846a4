//! `glimpse convert`: parallel streaming conversion between formats.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use glimpse_convert::copy::CopyMode;
use glimpse_convert::output::{
    check_not_referenced, check_not_source, OutputFile, OutputOptions, Storage,
};
use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{create, Target, WriteOptions};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::Format;

use crate::common::{load, parse_format, InputOpts};
use crate::interrupt;
use crate::source::is_stdin;

/// Arguments of `glimpse convert`.
#[derive(clap::Args)]
#[command(after_help = "Output options (-o), in qemu-img's spelling:
  qcow2: compat=1.1|0.10, cluster_size=512..2M, compression_type=zlib|zstd (with -c)
  vmdk:  subformat=monolithicSparse|streamOptimized, adapter_type=ide|lsilogic|buslogic|legacyESX
  vhd:   subformat=dynamic|fixed, force_size=on|off, block_size=4k..256M (dynamic),
         azure=on (round the size up to a whole MiB and write a fixed disk, as Azure requires);
         the virtual size is otherwise kept exact (qemu's force_size)
  vhdx:  subformat=dynamic|fixed, block_size=1M..256M
  vdi:   static=on|off
  ploop: cluster_size=N (a multiple of 512; default 1M); alias parallels
DST is written to a temporary file in its directory and renamed into place on success;
an existing DST is untouched by a failed or interrupted conversion.
DST may be - (stdout) for raw, vmdk subformat=streamOptimized and vhd subformat=fixed.")]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// Declared source format; a different detected format is refused.
    #[arg(short = 'f', value_parser = parse_format, value_name = "FORMAT")]
    source_format: Option<Format>,
    /// Output format (Glance's names; vpc is accepted for vhd).
    #[arg(short = 'O', value_parser = parse_format, value_name = "FORMAT")]
    output_format: Format,
    /// Output options, key=value,... (see below).
    #[arg(short = 'o', value_name = "OPTIONS", action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Compress (qcow2: zlib by default, or compression_type=zstd).
    #[arg(short = 'c')]
    compress: bool,
    /// Show a progress bar on stderr (when it is a terminal).
    #[arg(short = 'p')]
    progress_bar: bool,
    /// Progress as JSON lines on stderr: {"done":..,"total":..,"rate":..} per step.
    #[arg(long, value_name = "MODE", value_parser = ["json", "bar", "none"])]
    progress: Option<String>,
    /// fsync the output file before renaming it into place, and its directory after.
    #[arg(long)]
    fsync: bool,
    /// Write image data to stdout even when it is a terminal.
    #[arg(long)]
    force_tty: bool,
    /// How data stored verbatim in the source file is copied: auto (kernel, except into
    /// ext4: two threads through buffers, which is faster there), kernel (copy_file_range, a
    /// reflink on XFS and btrfs; read/write where the kernel refuses), readwrite (the same
    /// bytes through one buffer), off (read every chunk into memory). The output is the same.
    #[arg(long, value_name = "MODE", value_parser = ["auto", "kernel", "readwrite", "off"], default_value = "auto")]
    copy: String,
    #[command(flatten)]
    input: InputOpts,
    /// Source image.
    src: PathBuf,
    /// Destination file, or - for stdout.
    dst: PathBuf,
}

/// The error for a conversion a signal stopped (exit 2, as every command that could not do
/// its work; upload says the same).
fn interrupted(args: &Args) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: interrupted by {}; {} was not written",
        display(&args.src),
        interrupt::signal_name(),
        display(&args.dst)
    )
}

/// True when `e` comes from writing to a pipe whose reader has gone (`| head -c 1000`).
fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        // The crate error keeps its OS error out of `source()` (so that it is printed once):
        // ask it directly.
        let io = err.downcast_ref::<std::io::Error>().or_else(|| {
            err.downcast_ref::<glimpse_formats::Error>()
                .and_then(glimpse_formats::Error::io_error)
        });
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// 128 + SIGPIPE: the status a shell shows for a writer whose reader went away.
const EXIT_BROKEN_PIPE: u8 = 141;

/// The output: its target, and the temporary file with its registration for the signal
/// handler (none for stdout).
type Output = (Target, Option<(OutputFile, Option<interrupt::Registered>)>);

/// Where the image goes: stdout, or a temporary file renamed onto DST on success.
fn open_output(args: &Args, source: Option<&Storage>) -> anyhow::Result<Output> {
    if is_stdin(&args.dst) {
        let out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
        return Ok((Target::Stream(Box::new(out)), None));
    }
    let out = OutputFile::create(&args.dst, source, OutputOptions { fsync: args.fsync })
        .map_err(refused)?;
    // A temporary file without a name (O_TMPFILE) needs no removing.
    let registered = out.temp_path().map(interrupt::register);
    if out.other_links() > 0 {
        errln!(
            "glimpse: warning: {}: has {} other hard link(s); they keep the old content: the \
             output is a new file renamed into place, never the old one rewritten",
            display(&args.dst),
            out.other_links()
        );
    }
    Ok((out.target()?, Some((out, registered))))
}

/// Runs `glimpse convert`.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    interrupt::install(interrupt::Again::Exits);
    let mut opts = WriteOptions::parse(&args.options.join(","), args.compress)?;
    // The writer's tables share the command's one budget with the source and the pipeline.
    opts.budget = Some(crate::common::limits().budget());
    let to_stdout = is_stdin(&args.dst);
    opts.output_name = args
        .dst
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|_| !to_stdout)
        .map(str::to_string);
    if args.progress_bar && args.progress.as_deref().is_some_and(|m| m != "bar") {
        return Err(crate::common::usage(
            "-p (a progress bar) conflicts with --progress json|none",
        ));
    }
    if to_stdout && std::io::stdout().is_terminal() && !args.force_tty {
        anyhow::bail!(
            "refusing to write image data to a terminal: redirect stdout to a file or pipe \
             (or use --force-tty)"
        );
    }
    let stdout = if to_stdout {
        Some(stdout_storage()?)
    } else {
        None
    };
    if stdout.as_ref().is_some_and(is_null) {
        anyhow::bail!(
            "stdout is /dev/null (or was closed, which the runtime turns into /dev/null): the \
             image would be discarded; redirect stdout to a file, pipe or device \
             (output.not-regular)"
        );
    }
    // What the output lands on: DST, or the file stdout was redirected to (`- > x`, `- >> x`,
    // `- 1<> x`), which must no more be the source than DST may; a pipe or a socket is left
    // alone (it cannot be the file read).
    let landing = match stdout {
        Some(out) => out.is_file_or_block_device().then_some(out),
        None => Some(
            Storage::at(&args.dst)
                .map_err(|e| anyhow::anyhow!("{}: cannot inspect: {e}", display(&args.dst)))?,
        ),
    };
    let source = source_storage(&args.src)?;
    if let (Some(src), Some(dst)) = (&source, &landing) {
        // A source that does not exist is reported by opening it, below (and refused by the
        // output's own check, should it appear meanwhile).
        if src.exists() {
            check_not_source(src, dst).map_err(refused)?;
        }
    }
    let image = load(&args.src, args.source_format, &args.input)
        .map_err(|e| crate::common::named(e, &args.src))?
        .image;
    if let Some(dst) = &landing {
        // References are resolved against the source's directory: none for stdin or a URL.
        let dir = (source.is_some() && !is_stdin(&args.src)).then_some(args.src.as_path());
        let mut refs = image.info().references.clone();
        if let Some(path) = dir {
            refs.extend(descriptor_files(path, image.as_ref())?);
        }
        check_not_referenced(dir, &refs, dst).map_err(refused)?;
    }
    if interrupt::cancelled() {
        return Err(interrupted(&args));
    }
    let size = image.info().virtual_size;
    let (target, output) = open_output(&args, source.as_ref())?;
    let result = create(args.output_format, &opts, target, size)
        .map_err(glimpse_convert::pipeline::output_side)
        .and_then(|writer| run_pipeline(&args, image, writer));
    // A signal that came before the rename wins: the output is dropped, so removed.
    let result = match (result, output) {
        (Ok(_), _) if interrupt::cancelled() => Err(interrupted(&args)),
        (Ok(_), output) => match crate::source::unchanged(&args.src) {
            // The output is dropped, so removed; an existing DST keeps its content.
            Err(e) => Err(anyhow::Error::from(e).context(display(&args.src))),
            Ok(()) => match output {
                Some((out, _registered)) => out.commit().map_err(anyhow::Error::from),
                None => Ok(()),
            },
        },
        (Err(_), _) if interrupt::cancelled() => Err(interrupted(&args)),
        (Err(e), _) if to_stdout && is_broken_pipe(&e) => return Ok(EXIT_BROKEN_PIPE),
        // A write error names the output (a full disk is not the input's fault).
        (Err(e), _) if e.finding_code() == "output.write" => {
            Err(anyhow::anyhow!("{}: {e}", display(&args.dst)))
        }
        (Err(e), _) => Err(anyhow::anyhow!("{}: {e}", display(&args.src))),
    };
    result.map(|()| 0)
}

/// True when standard output is the null device (`> /dev/null`, or a closed descriptor, which
/// Rust's runtime reopens on `/dev/null` at start): its device number is /dev/null's, or 1:3
/// (Linux's null device) where /dev/null cannot be looked at.
fn is_null(out: &Storage) -> bool {
    use std::os::unix::fs::MetadataExt;
    let null = std::fs::metadata("/dev/null").map_or(libc::makedev(1, 3), |m| m.rdev());
    out.char_device() == Some(null)
}

/// What standard output is redirected to, from descriptor 1 itself (`fstat`): never through
/// `/dev/stdout`, which is a link into /proc and so unknown where /proc is not mounted.
fn stdout_storage() -> anyhow::Result<Storage> {
    use std::os::fd::AsFd;
    Storage::of_fd(std::io::stdout().as_fd(), "stdout")
        .map_err(|e| anyhow::anyhow!("stdout: cannot inspect: {e}"))
}

/// The storage the source is read from, for the same-storage checks: stdin's own file for
/// `-` (`fstat` of descriptor 0, so that `convert - x.qcow2 < x.qcow2` is caught with or
/// without /proc), the path otherwise; `None` for a URL.
fn source_storage(src: &Path) -> anyhow::Result<Option<Storage>> {
    use std::os::fd::AsFd;
    if is_stdin(src) {
        return Storage::of_fd(std::io::stdin().as_fd(), "stdin")
            .map(Some)
            .map_err(|e| anyhow::anyhow!("stdin: cannot open: {e}"));
    }
    if src.to_str().is_some_and(crate::remote::is_remote) {
        return Ok(None);
    }
    Storage::at(src)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{}: cannot open: {e}", display(src)))
}

/// The files a standalone OVF descriptor given as the source names (its hrefs: the disks
/// `ova list` and `ova check` read beside it), for the destination check. Converted with
/// `--force`, a descriptor reads as a raw disk whose image names no file, yet
/// `convert --force -O raw x.ovf disk1.vmdk` would replace the appliance's disk. A source is
/// taken for a descriptor when its content is one (`raw.ovf-descriptor`) or its name ends in
/// `.ovf`. Only the descriptor itself is read again; the files it names are not opened (the
/// check only stat-s them). A source flagged as a descriptor whose files cannot be read
/// refuses every destination.
fn descriptor_files(
    src: &Path,
    image: &dyn glimpse_formats::Image,
) -> anyhow::Result<Vec<glimpse_formats::Reference>> {
    let flagged = image
        .findings()
        .iter()
        .any(|f| f.code == "raw.ovf-descriptor");
    if !flagged && !glimpse_formats::ova::is_ovf_path(src) {
        return Ok(Vec::new());
    }
    match glimpse_formats::ova::read_ovf_dir(src, &crate::common::limits()) {
        Ok(d) => Ok(d.file_references()),
        Err(_) if !flagged => Ok(Vec::new()),
        Err(e) => Err(anyhow::anyhow!(
            "{}: is an OVF descriptor whose file references cannot be read ({e}); refusing \
             to write any destination for it, even with --force (output.source-reference)",
            display(src)
        )),
    }
}

/// A refusal of the destination, with its stable code (`output.same-as-source`, ...).
fn refused(e: glimpse_formats::Error) -> anyhow::Error {
    match e.kind() {
        glimpse_formats::ErrorKind::Io => anyhow::anyhow!("{e}"),
        _ => anyhow::anyhow!("{e} ({})", e.finding_code()),
    }
}

/// Runs the conversion with the progress display the arguments ask for.
fn run_pipeline(
    args: &Args,
    image: std::sync::Arc<dyn glimpse_formats::Image>,
    writer: Box<dyn glimpse_convert::Writer>,
) -> glimpse_formats::Result<glimpse_convert::pipeline::Stats> {
    let size = image.info().virtual_size;
    let reader = GuestReader::new(image.clone(), &crate::common::limits());
    let mode = match (args.progress.as_deref(), args.progress_bar) {
        (Some(m), _) => m.to_string(),
        (None, true) => "bar".into(),
        (None, false) => "none".into(),
    };
    let bar = (mode == "bar" && std::io::stderr().is_terminal()).then(|| {
        let pb = indicatif::ProgressBar::new(size);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let start = Instant::now();
    let last = Mutex::new(0u64);
    let progress = |done: u64, total: u64| {
        if let Some(pb) = &bar {
            pb.set_position(done);
        } else if mode == "json" {
            if let Ok(mut l) = last.lock() {
                *l = done;
            }
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            errln!(
                "{{\"event\":\"progress\",\"done\":{done},\"total\":{total},\"rate\":{},\"elapsed\":{:.3}}}",
                (done as f64 / secs) as u64,
                secs
            );
        }
    };
    let copts = ConvertOptions {
        progress: Some(&progress),
        cancel: Some(interrupt::flag()),
        budget: Some(crate::common::limits().budget()),
        copy: match args.copy.as_str() {
            "readwrite" => CopyMode::ReadWrite,
            "off" => CopyMode::Off,
            "kernel" => CopyMode::Kernel,
            _ => CopyMode::Auto,
        },
        ..ConvertOptions::default()
    };
    let result = convert(image, writer, &reader, &copts);
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    if let (Ok(stats), "json") = (&result, mode.as_str()) {
        errln!(
            "{{\"event\":\"done\",\"done\":{size},\"total\":{size},\"read\":{},\"kernel_copied\":{},\"buffer_copied\":{},\"paired_copied\":{},\"elapsed\":{:.3}}}",
            stats.read_bytes,
            stats.kernel_copied,
            stats.buffer_copied,
            stats.paired_copied,
            start.elapsed().as_secs_f64()
        );
    }
    result
}

fn display(p: &Path) -> String {
    crate::common::name(p)
}
