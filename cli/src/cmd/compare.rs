//! `glimpse compare`: guest-visible content of two images, in any formats.

use std::path::PathBuf;

use glimpse_formats::compare::{first_difference, first_nonzero};
use glimpse_formats::reader::GuestReader;

use crate::common::{load, named, InputOpts};

/// Arguments of `glimpse compare`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
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
    if let Some(off) = first_difference(&a, &b, common)? {
        return Ok(Some(format!("Content mismatch at offset {off}!")));
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
