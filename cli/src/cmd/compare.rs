//! `glimpse compare`: guest-visible content of two images, in any formats.

use std::path::PathBuf;

use glimpse_formats::compare::{first_difference, first_nonzero};
use glimpse_formats::reader::GuestReader;

use glimpse_formats::{Format, Image, Merged, RunKind};

use crate::common::{load, named, InputOpts};

/// Arguments of `glimpse compare`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// Strict: sizes must be equal (without it, the larger image's extra tail must be zero),
    /// and so must the block status, as in qemu-img compare -s.
    ///
    /// The block status is what `glimpse map --output json` prints (allocated, zero, data,
    /// whether an offset is known) plus whether qemu's answer for the range reaches the end
    /// of the disk, which depends on how far qemu's driver answers at once (a qcow2 L2 slice,
    /// a VDI block, a VMDK grain). The first offset where the two differ ends the comparison
    /// with "Strict mode: Offset N block status mismatch!", unless the content differs
    /// before it. A range stored as zeros in one image and unallocated in the other is a
    /// mismatch here, as in qemu.
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
    let attributed = |e: glimpse_formats::Error| match one_remote {
        Some(p) => named(e.into(), p),
        None => e.into(),
    };
    // In strict mode the first offset where the two block statuses differ ends the
    // comparison there, unless the content differs before it (qemu-img walks both in one
    // pass, offset by offset).
    let status_at = match args.strict {
        true => first_status_mismatch(&a, &b).map_err(attributed)?,
        false => None,
    };
    let found = first_difference(&a, &b, status_at.unwrap_or(common)).map_err(attributed)?;
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
/// an offset is known), and whether qemu's answer for it reaches the end of the disk
/// (`BDRV_BLOCK_EOF`, which `qemu-img compare -s` compares too). qemu's VHDX driver has no
/// block status, so qemu calls all of a VHDX disk present data without an offset.
type Status = (bool, bool, bool, bool, bool);

/// The longest run qemu's driver returns in one answer, where it has a bound: a qcow2 L2
/// slice (a cluster of L2 entries), one compressed qcow2 cluster, a VDI block, a VMDK grain,
/// an allocated VHD block. `None`: runs end only where the status or the host offset changes.
fn qemu_step(image: &dyn Image, kind: RunKind) -> Option<u64> {
    let info = image.info();
    let unit = info.cluster_size.filter(|c| *c > 0)?;
    match info.format {
        Format::Qcow2 if kind == RunKind::Compressed => Some(unit),
        Format::Qcow2 => {
            let entry = match info.details.get("extended-l2").and_then(|v| v.as_bool()) {
                Some(true) => 16,
                _ => 8,
            };
            unit.checked_div(entry).map(|n| n.saturating_mul(unit))
        }
        Format::Vdi | Format::Vmdk => Some(unit),
        Format::Vhd => match kind {
            RunKind::Data { .. }
                if info.details.get("disk-type").and_then(|v| v.as_str()) != Some("fixed") =>
            {
                Some(unit)
            }
            _ => None,
        },
        _ => None,
    }
}

/// The runs of `image` as (end, [`Status`]), in order; the last run is cut where qemu's last
/// answer would start, so that only the part after the cut has the end-of-disk flag.
fn statuses(
    image: &dyn Image,
) -> impl Iterator<Item = glimpse_formats::Result<(u64, Status)>> + '_ {
    let format = image.info().format;
    let size = image.info().virtual_size;
    let vhdx = format == Format::Vhdx;
    let mut runs = Merged::all_with_holes(image, crate::cmd::map::looks_under(image));
    let mut done = false;
    let mut tail: Option<(u64, Status)> = None;
    std::iter::from_fn(move || {
        if let Some(t) = tail.take() {
            return Some(Ok(t));
        }
        if done {
            return None;
        }
        if vhdx {
            done = true;
            return (size > 0).then_some(Ok((size, (true, false, true, false, true))));
        }
        match runs.next()? {
            Ok(r) => {
                let (data, zero, present, _, offset) = crate::cmd::map::flags(&r, format);
                let st = (data, zero, present, offset.is_some(), false);
                if r.end() < size {
                    return Some(Ok((r.end(), st)));
                }
                // The last run: qemu's last answer starts at the run's start or at the last
                // step boundary inside it.
                let last = qemu_step(image, r.kind)
                    .and_then(|step| {
                        let b = size.saturating_sub(1);
                        b.checked_sub(b.checked_rem(step)?)
                    })
                    .unwrap_or(0)
                    .max(r.start);
                let eof = (st.0, st.1, st.2, st.3, true);
                if last > r.start {
                    tail = Some((size, eof));
                    Some(Ok((last, st)))
                } else {
                    Some(Ok((size, eof)))
                }
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
