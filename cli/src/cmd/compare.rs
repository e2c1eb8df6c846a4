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
    // A read error does not say which image it came from; when only one input is a URL (the
    // one that can fail mid-read for reasons of its own: a server that changed or went
    // away), it is named.
    let remote = |p: &PathBuf| crate::source::remote_input(p).is_some();
    let one_remote = match (remote(&args.a), remote(&args.b)) {
        (true, false) => Some(&args.a),
        (false, true) => Some(&args.b),
        _ => None,
    };
    let found = first_difference(&a, &b, common).map_err(|e| match one_remote {
        Some(p) => named(e.into(), p),
        None => e.into(),
    })?;
    if let Some(off) = found {
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
