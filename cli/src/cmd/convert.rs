//! `glimpse convert`: parallel streaming conversion between formats.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{create, Target, WriteOptions};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{Format, Limits};

use crate::common::{load, parse_format, InputOpts};

/// Arguments of `glimpse convert`.
#[derive(clap::Args)]
#[command(after_help = "Output options (-o), in qemu-img's spelling:
  qcow2: compat=1.1|0.10, cluster_size=512..2M, compression_type=zlib|zstd (with -c)
  vmdk:  subformat=monolithicSparse|streamOptimized, adapter_type=ide|lsilogic|buslogic|legacyESX|pvscsi
  vhd:   subformat=dynamic|fixed, force_size=on|off, block_size=4k..256M (dynamic),
         azure=on (round the size up to a whole MiB and write a fixed disk, as Azure requires);
         the virtual size is otherwise kept exact (qemu's force_size)
  vhdx:  subformat=dynamic|fixed, block_size=1M..256M
  vdi:   static=on|off
DST may be - (stdout) for raw, vmdk subformat=streamOptimized and vhd subformat=fixed.")]
pub struct Args {
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
    #[command(flatten)]
    input: InputOpts,
    /// Source image.
    src: PathBuf,
    /// Destination file, or - for stdout.
    dst: PathBuf,
}

static CANCEL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    CANCEL.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

/// Runs `glimpse convert`.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let mut opts = WriteOptions::parse(&args.options.join(","), args.compress)?;
    opts.output_name = args
        .dst
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|_| args.dst.as_os_str() != "-")
        .map(str::to_string);
    if args.progress_bar && args.progress.as_deref().is_some_and(|m| m != "bar") {
        return Err(crate::common::usage(
            "-p (a progress bar) conflicts with --progress json|none",
        ));
    }
    let loaded =
        load(&args.src, args.source_format, &args.input).with_context(|| display(&args.src))?;
    let image = loaded.image;
    let size = image.info().virtual_size;
    let to_stdout = args.dst.as_os_str() == "-";
    let target = if to_stdout {
        Target::Stream(Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        )))
    } else {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&args.dst)
            .with_context(|| format!("{}: cannot create", args.dst.display()))?;
        Target::File(f)
    };
    install_signal_handlers();
    let cleanup = |e: anyhow::Error| -> anyhow::Error {
        if !to_stdout {
            let _ = std::fs::remove_file(&args.dst);
        }
        e
    };
    let writer = create(args.output_format, &opts, target, size)
        .map_err(|e| cleanup(anyhow::Error::new(e).context(format!("{}", args.dst.display()))))?;
    let reader = GuestReader::new(image.clone(), &Limits::default());

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
            eprintln!(
                "{{\"event\":\"progress\",\"done\":{done},\"total\":{total},\"rate\":{},\"elapsed\":{:.3}}}",
                (done as f64 / secs) as u64,
                secs
            );
        }
    };
    let copts = ConvertOptions {
        progress: Some(&progress),
        cancel: Some(&CANCEL),
        ..ConvertOptions::default()
    };
    let result = convert(image, writer, &reader, &copts);
    if let Some(pb) = &bar {
        pb.finish_and_clear();
    }
    match result {
        Ok(stats) => {
            if mode == "json" {
                eprintln!(
                    "{{\"event\":\"done\",\"done\":{size},\"total\":{size},\"read\":{},\"elapsed\":{:.3}}}",
                    stats.read_bytes,
                    start.elapsed().as_secs_f64()
                );
            }
            Ok(0)
        }
        Err(e) => {
            let msg = if CANCEL.load(Ordering::SeqCst) {
                "interrupted".to_string()
            } else {
                e.to_string()
            };
            Err(cleanup(anyhow::anyhow!("{}: {msg}", display(&args.src))))
        }
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
