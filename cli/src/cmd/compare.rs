//! `glimpse compare`: guest-visible content of two images, in any formats.

use std::path::PathBuf;

use glimpse_formats::compare::{first_difference, first_nonzero};
use glimpse_formats::reader::GuestReader;

use glimpse_formats::{Format, Image, Merged};

use crate::common::{load, named, InputOpts};

/// Arguments of `glimpse compare`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// Strict: sizes must be equal; without it, the larger image's extra tail must be zero
    /// (as in qemu-img compare).
    ///
    /// Strict mode compares sizes and guest content, not allocation: a range stored as zeros
    /// in one image and unallocated (or a zero cluster) in the other is identical here, where
    /// `qemu-img compare -s` exits 1 with "Strict mode: Offset N block status mismatch!".
    /// qemu's block status depends on each driver and on the file system under the image, so
    /// glimpse does not imitate it.
    ///
    /// On a difference, "Content mismatch at offset N!" names the first differing byte;
    /// qemu-img prints the same words with the start of the 512-byte sector that holds it
    /// (N rounded down to a multiple of 512).
    #[arg(long, short = 's')]
    strict: bool,
    #[command(flatten)]
    input: InputOpts,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

/// Runs `glimpse compare`: exit 0 identical, 1 different or refused by the policy (an overlay
/// without `--force`), 2 error.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    let difference = first_mismatch(&args)?;
    // Neither file may have been written to while it was compared.
    for p in [&args.a, &args.b] {
        crate::source::unchanged(p).map_err(|e| named(e.into(), p))?;
    }
    match difference {
        Some(message) => {
            outln!("{message}");
            Ok(1)
        }
        None => {
            outln!("Images are identical.");
            Ok(0)
        }
    }
}

/// What qemu-img compare says of two images that differ, or `None` when they are the same.
fn first_mismatch(args: &Args) -> anyhow::Result<Option<String>> {
    let limits = crate::common::limits();
    let open = |p: &PathBuf| {
        load(p, None, &args.input)
            .map(|l| GuestReader::new(l.image, &limits))
            .map_err(|e| named(e, p))
    };
    let (a, b) = (open(&args.a)?, open(&args.b)?);
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    if args.strict && sa != sb {
        return Ok(Some(format!(
            "Strict mode: Image size mismatch! ({sa} and {sb} bytes)"
        )));
    }
    let common = sa.min(sb);
    // A read error does not say which image it came from; when only one input is a URL (the
    // one that can fail mid-read for reasons of its own: a server that changed or went
    // away), it is named.
    let remote = |p: &PathBuf| crate::source::remote_input(p).is_some();
    let one_remote = match (remote(&args.a), remote(&args.b)) {
        (true, false) => Some(&args.a),
        (false, true) => Some(&args.b),
        _ => None,
    };
    // In strict mode the first offset where the two block statuses differ ends the
    // comparison there, unless the content differs before it (qemu-img walks both in one
    // pass, offset by offset).
    let status_at = match args.strict {
        true => first_status_mismatch(&a, &b).map_err(|e| match one_remote {
            Some(p) => named(e.into(), p),
            None => e.into(),
        })?,
        false => None,
    };
    let found =
        first_difference(&a, &b, status_at.unwrap_or(common)).map_err(|e| match one_remote {
            Some(p) => named(e.into(), p),
            None => e.into(),
        })?;
    if let Some(off) = found {
        return Ok(Some(format!("Content mismatch at offset {off}!")));
    }
    if let Some(off) = status_at {
        return Ok(Some(format!(
            "Strict mode: Offset {off} block status mismatch!"
        )));
    }
    let (longer, name) = if sa > sb {
        (&a, &args.a)
    } else {
        (&b, &args.b)
    };
    if let Some(off) = first_nonzero(longer, common).map_err(|e| named(e.into(), name))? {
        return Ok(Some(format!(
            "Content mismatch at offset {off}! (the larger image has data past the end of the smaller)"
        )));
    }
    Ok(None)
}

/// qemu's block status of a run, as `qemu-img map` shows it: (data, zero, present, whether
/// an offset is known). qemu's VHDX driver has no block status, so qemu calls all of a VHDX
/// disk present data without an offset.
type Status = (bool, bool, bool, bool);

/// The runs of `image` with their [`Status`], neighbours of one status joined.
fn statuses(
    image: &dyn Image,
) -> impl Iterator<Item = glimpse_formats::Result<(u64, Status)>> + '_ {
    let format = image.info().format;
    let vhdx = format == Format::Vhdx;
    let mut runs = Merged::all_with_holes(image, crate::cmd::map::looks_under(image));
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        if vhdx {
            done = true;
            let end = image.info().virtual_size;
            return (end > 0).then_some(Ok((end, (true, false, true, false))));
        }
        match runs.next()? {
            Ok(r) => {
                let (data, zero, present, _, offset) = crate::cmd::map::flags(&r, format);
                Some(Ok((r.end(), (data, zero, present, offset.is_some()))))
            }
            Err(e) => {
                done = true;
                Some(Err(e))
            }
        }
    })
}

/// The first guest offset where the block statuses of `a` and `b` (of one size) differ, as
/// `qemu-img compare -s` finds it, or `None`. One step per run of either image, as `map`.
fn first_status_mismatch(a: &GuestReader, b: &GuestReader) -> glimpse_formats::Result<Option<u64>> {
    let (mut ia, mut ib) = (statuses(a.image().as_ref()), statuses(b.image().as_ref()));
    let (mut ra, mut rb) = (ia.next().transpose()?, ib.next().transpose()?);
    let mut pos = 0u64;
    while let (Some((ea, sa)), Some((eb, sb))) = (ra, rb) {
        if sa != sb {
            return Ok(Some(pos));
        }
        pos = ea.min(eb);
        if ea <= pos {
            ra = ia.next().transpose()?;
        }
        if eb <= pos {
            rb = ib.next().transpose()?;
        }
    }
    Ok(None)
}
