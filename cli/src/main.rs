//! The `glimpse` command line: clap definitions, rendering and glue. Logic a library user would
//! want lives in `glimpse-formats` and `glimpse-convert`.
// Output goes through `outln!`/`errln!`, which turn a failed write into an exit status, never
// a panic.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `println!` that cannot panic: a failed write to stdout (a full disk, EIO, a closed pipe)
/// is remembered, later output is dropped, and the command exits 2 (141 for a closed pipe)
/// when it ends (`common::write_out`).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::common::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that cannot panic (see `outln!`).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::common::write_out(format_args!($($arg)*))
    };
}

/// `eprintln!` that cannot panic: a message that cannot be written to stderr is dropped (there
/// is nowhere left to say so), and the command goes on.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::common::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `eprint!` that cannot panic (see `errln!`).
macro_rules! errp {
    ($($arg:tt)*) => {
        $crate::common::write_err(format_args!($($arg)*))
    };
}

mod cmd;
mod common;
mod interrupt;
mod remote;
mod source;

/// Inspect, validate, convert and upload virtual-disk images (qcow2, VMDK, VHD, VHDX, VDI,
/// raw, ISO, OVA).
#[derive(Parser)]
#[command(
    name = "glimpse",
    version,
    propagate_version = true,
    about,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show format, virtual size, actual size, format details and references.
    Info(cmd::info::Args),
    /// Apply the safety policy and structural checks (exit 0 pass, 1 reject, 2 error).
    Check(cmd::check::Args),
    /// List the extents backing the guest disk (data, zero, compressed, unallocated).
    Map(cmd::map::Args),
    /// Compare guest-visible content of two images in any formats (exit 0 same, 1 differ).
    Compare(cmd::compare::Args),
    /// File digests in one pass (Glance's checksum and os_hash_value), or a content digest.
    Checksum(cmd::checksum::Args),
    /// Convert an image to another format, in parallel and streaming.
    Convert(cmd::convert::Args),
    /// Measure the output size of a conversion.
    Measure(cmd::measure::Args),
    /// Inspect, check and extract OVA appliances.
    Ova(cmd::ova::Args),
    /// Validate, then upload to OpenStack Glance and verify what it stored.
    Upload(Box<cmd::upload::Args>),
    /// Check every image already stored in a Glance catalog, where it is stored.
    Audit(Box<cmd::audit::Args>),
}

/// Keeps freed chunk buffers in the heap for reuse. The pipeline allocates and frees
/// buffers of 64 KiB to 32 MiB at a high rate; with glibc's defaults each one is a fresh
/// mmap (or the heap is trimmed), so every chunk pays page faults for memory it just had.
fn tune_allocator() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if let Command::Info(_)
    | Command::Check(_)
    | Command::Map(_)
    | Command::Compare(_)
    | Command::Checksum(_)
    | Command::Measure(_) = cli.command
    {
        source::die_on_sigpipe();
    }
    let result = match cli.command {
        Command::Info(a) => cmd::info::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Map(a) => cmd::map::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Checksum(a) => cmd::checksum::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Measure(a) => cmd::measure::run(a),
        Command::Ova(a) => cmd::ova::run(a),
        Command::Upload(a) => cmd::upload::run(*a),
        Command::Audit(a) => cmd::audit::run(*a),
    };
    remote::log_transfers();
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            errln!("glimpse: {}", common::printable(&format!("{e:#}")));
            common::exit_status(&e)
        }
    };
    // What was printed must have reached stdout: a result a pipeline never got is a failure.
    match common::stdout_error() {
        None => ExitCode::from(code),
        Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(141),
        Some(e) => {
            errln!("glimpse: stdout: cannot write: {e}");
            ExitCode::from(2)
        }
    }
}
