//! `glimpse compare`: guest-visible content of two images, in any formats.

use std::path::PathBuf;

use anyhow::Context;
use glimpse_formats::compare::{first_difference, first_nonzero};
use glimpse_formats::reader::GuestReader;

use crate::common::{load, InputOpts};

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
    let limits = crate::common::limits();
    let open = |p: &PathBuf| {
        load(p, None, &args.input)
            .map(|l| GuestReader::new(l.image, &limits))
            .with_context(|| crate::common::name(p))
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
    if let Some(off) = first_nonzero(longer, common).with_context(|| crate::common::name(name))? {
        println!("Content mismatch at offset {off}! (the larger image has data past the end of the smaller)");
        return Ok(1);
    }
    println!("Images are identical.");
    Ok(0)
}
