//! `glimpse compare`: guest-visible content of two images, in any formats.

use std::path::PathBuf;

use anyhow::Context;
use glimpse_formats::reader::GuestReader;
use glimpse_formats::Limits;
use rayon::prelude::*;

use crate::common::{load, InputOpts};

/// Arguments of `glimpse compare`.
#[derive(clap::Args)]
pub struct Args {
    /// Sizes must be equal; without it, the larger image's extra tail must be zero (as in
    /// qemu-img compare).
    #[arg(long, short = 's')]
    strict: bool,
    #[command(flatten)]
    input: InputOpts,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

/// Bytes compared by one worker at a time.
const PIECE: u64 = 1 << 20;
/// Bytes of pieces handed to the workers per batch.
const BATCH: u64 = 64 << 20;

/// Runs `glimpse compare`: exit 0 identical, 1 different or refused by the policy (an overlay
/// without `--force`), 2 error.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let limits = Limits::default();
    let open = |p: &PathBuf| {
        load(p, None, &args.input)
            .map(|l| GuestReader::new(l.image, &limits))
            .with_context(|| p.display().to_string())
    };
    let (a, b) = (open(&args.a)?, open(&args.b)?);
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    if args.strict && sa != sb {
        println!("Strict mode: Image size mismatch! ({sa} and {sb} bytes)");
        return Ok(1);
    }
    let common = sa.min(sb);
    if let Some(off) = first_difference(&a, &b, common)? {
        println!("Content mismatch at offset {off}!");
        return Ok(1);
    }
    let (longer, name) = if sa > sb {
        (&a, &args.a)
    } else {
        (&b, &args.b)
    };
    if let Some(off) = first_nonzero(longer, common).with_context(|| name.display().to_string())? {
        println!("Content mismatch at offset {off}! (the larger image has data past the end of the smaller)");
        return Ok(1);
    }
    println!("Images are identical.");
    Ok(0)
}

/// The mapping of `r` from `pos`: (end of the extent, reads as zero).
fn run_at(r: &GuestReader, pos: u64, end: u64) -> anyhow::Result<(u64, bool)> {
    let e = r.image().mapping(pos, end - pos)?;
    Ok((e.end(), e.reads_as_zero()))
}

/// Walks both mappings together. Ranges that are zero on both sides are skipped without
/// reading; the rest is read and compared in parallel, in batches, in order.
fn first_difference(a: &GuestReader, b: &GuestReader, size: u64) -> anyhow::Result<Option<u64>> {
    let mut pos = 0;
    let (mut ea, mut eb) = ((0u64, true), (0u64, true));
    let mut pending: Vec<(u64, u64, bool, bool)> = Vec::new(); // (start, len, a_zero, b_zero)
    let mut pending_bytes = 0;
    while pos < size {
        if ea.0 <= pos {
            ea = run_at(a, pos, size)?;
        }
        if eb.0 <= pos {
            eb = run_at(b, pos, size)?;
        }
        let end = ea.0.min(eb.0);
        if !(ea.1 && eb.1) {
            let mut p = pos;
            while p < end {
                let n = (end - p).min(PIECE);
                pending.push((p, n, ea.1, eb.1));
                pending_bytes += n;
                p += n;
            }
        }
        pos = end;
        if pending_bytes >= BATCH || (pos >= size && !pending.is_empty()) {
            if let Some(off) = compare_batch(a, b, &pending)? {
                return Ok(Some(off));
            }
            pending.clear();
            pending_bytes = 0;
        }
    }
    Ok(None)
}

thread_local! {
    /// Per-worker read buffers, reused so that each piece costs no allocation or zero-fill.
    static BUFS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The first non-zero byte's index.
fn nonzero(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b != 0)
}

fn compare_batch(
    a: &GuestReader,
    b: &GuestReader,
    pieces: &[(u64, u64, bool, bool)],
) -> anyhow::Result<Option<u64>> {
    let diffs: Vec<Option<u64>> = pieces
        .par_iter()
        .map(|&(start, len, za, zb)| -> anyhow::Result<Option<u64>> {
            let n = usize::try_from(len)?;
            BUFS.with(|cell| -> anyhow::Result<Option<u64>> {
                let (x, y) = &mut *cell.borrow_mut();
                for buf in [&mut *x, &mut *y] {
                    if buf.len() < n {
                        buf.resize(n, 0);
                    }
                }
                let (x, y) = (&mut x[..n], &mut y[..n]);
                // A side the mapping calls zero is not read: the other must be zero there.
                let at = match (za, zb) {
                    (true, true) => None,
                    (true, false) => {
                        b.read_at(y, start)?;
                        nonzero(y)
                    }
                    (false, true) => {
                        a.read_at(x, start)?;
                        nonzero(x)
                    }
                    (false, false) => {
                        a.read_at(x, start)?;
                        b.read_at(y, start)?;
                        if x == y {
                            None // memcmp: the common case
                        } else {
                            x.iter().zip(y.iter()).position(|(p, q)| p != q)
                        }
                    }
                };
                Ok(at.map(|i| start + i as u64))
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(diffs.into_iter().flatten().min())
}

/// The first non-zero guest byte at or after `from`, if any.
fn first_nonzero(r: &GuestReader, from: u64) -> anyhow::Result<Option<u64>> {
    let size = r.virtual_size();
    let mut pos = from;
    while pos < size {
        let (end, zero) = run_at(r, pos, size)?;
        if !zero {
            let mut p = pos;
            while p < end {
                let n = (end - p).min(PIECE);
                let mut buf = vec![0u8; usize::try_from(n)?];
                r.read_at(&mut buf, p)?;
                if let Some(i) = buf.iter().position(|&x| x != 0) {
                    return Ok(Some(p + i as u64));
                }
                p += n;
            }
        }
        pos = end;
    }
    Ok(None)
}
