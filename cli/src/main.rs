//! The `glimpse` command line: clap definitions, rendering and glue. Logic a library user would
//! want lives in `glimpse-formats` and `glimpse-convert`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;
mod common;
mod interrupt;
mod remote;
mod source;

/// Inspect, validate, convert and upload virtual-disk images (qcow2, VMDK, VHD, VHDX, VDI,
/// raw, ISO, OVA).
#[derive(Parser)]
#[command(name = "glimpse", version, about, max_term_width = 100)]
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
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("glimpse: {}", common::printable(&format!("{e:#}")));
            ExitCode::from(common::exit_status(&e))
        }
    }
}
