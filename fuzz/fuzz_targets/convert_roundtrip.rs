//! Fuzz target `convert_roundtrip`: builds a small raw disk from the input, converts it with
//! every writer through `glimpse_convert::pipeline::convert`, opens each output with
//! `glimpse_formats::open` and asserts that it reads back the same guest bytes.
//!
//! Input layout:
//! - bytes 0-1: the disk size, `u16_le * 16 + (byte0 & 15)`: 0 to 1 MiB - 1, odd sizes
//!   included;
//! - byte 2: flags; bit 0 puts the disk in a sparse file on tmpfs (zero runs become holes, so
//!   the raw reader's SEEK_DATA/SEEK_HOLE path runs), otherwise it stays in memory; bit 1
//!   writes the outputs in the default temporary directory instead of tmpfs (on ext4, file
//!   to file copies from a file-backed disk then take the paired path, `copy/paired.rs`);
//! - then runs, until the disk is full or the input ends (the rest of the disk is zero). A run
//!   byte `r`: bit 7 set means zeros, clear means data; its length is `(r & 0x3f) + 1` units
//!   of 64 KiB (bit 6 set) or 512 bytes. A data run is followed by a pattern byte `p` and
//!   `(p & 0x3f) + 1` pattern bytes; the run repeats the pattern (compressible) or, when bit 7
//!   of `p` is set, is pseudo-random bytes seeded by the pattern (incompressible, so
//!   compressing writers must fall back to plain clusters).
//!
//! Seed corpus: `fuzz/seeds.sh` writes a handful of hand-made layouts to
//! `fuzz/corpus/convert_roundtrip/` (empty disk, one odd-sized data run, alternating data and
//! zero runs across cluster boundaries, incompressible data, a 1 MiB - 1 disk ending in data,
//! file-backed and in-memory).

#![no_main]

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{create, Target, WriteOptions, WRITER_VARIANTS};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{open, ErrorKind, Format, Image, Limits, Source};
use glimpse_fuzz::{walk, READER};
use libfuzzer_sys::{fuzz_target, Corpus};

/// A run of the disk layout.
enum Run {
    Zero(u64),
    Data(Vec<u8>),
}

/// Decodes the layout (see the file comment). Returns the disk size, flags and runs.
fn layout(data: &[u8]) -> Option<(u64, u8, Vec<Run>)> {
    let (&b0, &b1, &flags) = (data.first()?, data.get(1)?, data.get(2)?);
    let size = u64::from(u16::from_le_bytes([b0, b1])) * 16 + u64::from(b0 & 15);
    let mut runs = Vec::new();
    let mut filled = 0u64;
    let mut rest = &data[3..];
    while filled < size {
        let Some((&r, tail)) = rest.split_first() else {
            break;
        };
        rest = tail;
        let unit = if r & 0x40 != 0 { 64 << 10 } else { 512 };
        let len = (u64::from(r & 0x3f) + 1) * unit;
        let len = len.min(size - filled);
        filled += len;
        if r & 0x80 != 0 {
            runs.push(Run::Zero(len));
            continue;
        }
        let Some((&p, tail)) = rest.split_first() else {
            break;
        };
        let plen = usize::from(p & 0x3f) + 1;
        let pattern = &tail[..plen.min(tail.len())];
        rest = &tail[pattern.len()..];
        let n = usize::try_from(len).ok()?;
        let bytes = if pattern.is_empty() {
            vec![0xa5; n]
        } else if p & 0x80 != 0 {
            // xorshift64*, seeded by the pattern: incompressible but reproducible.
            let mut s = pattern.iter().fold(0x9e37_79b9_7f4a_7c15u64, |s, &b| {
                (s ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            }) | 1;
            (0..n)
                .map(|_| {
                    s ^= s >> 12;
                    s ^= s << 25;
                    s ^= s >> 27;
                    (s.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
                })
                .collect()
        } else {
            pattern.iter().copied().cycle().take(n).collect()
        };
        runs.push(Run::Data(bytes));
    }
    Some((size, flags, runs))
}

/// A scratch file on tmpfs when there is one: fsync and sparse files cost nothing there.
fn scratch() -> std::fs::File {
    let shm = std::path::Path::new("/dev/shm");
    let f = if shm.is_dir() {
        tempfile::tempfile_in(shm)
    } else {
        tempfile::tempfile()
    };
    f.expect("scratch file")
}

fn read_all(img: Arc<dyn Image>, limits: &Limits) -> Vec<u8> {
    let vsize = usize::try_from(img.info().virtual_size).expect("small disk");
    let mut buf = vec![0u8; vsize];
    let reader = GuestReader::new(img, limits);
    if let Err(e) = reader.read_at(&mut buf, 0) {
        panic!("reading back a freshly written image failed: {e}");
    }
    buf
}

fuzz_target!(|data: &[u8]| -> Corpus {
    let Some((size, flags, runs)) = layout(data) else {
        return Corpus::Reject;
    };
    let limits = Limits::tight();

    let mut disk = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    for r in &runs {
        match r {
            Run::Zero(n) => disk.resize(disk.len() + usize::try_from(*n).unwrap_or(0), 0),
            Run::Data(d) => disk.extend_from_slice(d),
        }
    }
    disk.resize(usize::try_from(size).unwrap_or(0), 0);

    let src: Source = if flags & 1 != 0 {
        let mut f = scratch();
        let mut pos = 0u64;
        for r in &runs {
            match r {
                Run::Zero(n) => pos += n,
                Run::Data(d) => {
                    f.seek(SeekFrom::Start(pos)).expect("seek");
                    f.write_all(d).expect("write");
                    pos += d.len() as u64;
                }
            }
        }
        f.set_len(size).expect("set_len");
        Arc::new(f)
    } else {
        Arc::new(disk.clone())
    };
    let source_img: Arc<dyn Image> =
        Arc::from(open(src, Format::Raw, &limits).expect("raw always opens"));
    assert_eq!(
        read_all(source_img.clone(), &limits),
        disk,
        "the raw source does not read back"
    );

    for &(format, opts, compress) in WRITER_VARIANTS {
        let wopts = WriteOptions::parse(opts, compress).expect("valid options");
        let out = if flags & 2 != 0 {
            tempfile::tempfile().expect("scratch file")
        } else {
            scratch()
        };
        let target = Target::File(out.try_clone().expect("dup"));
        // Writers and readers that are not implemented yet say Unsupported: skipping only that
        // kind is acceptable in a fuzz target (it is not a test), and it lets this target run
        // unchanged as writers land. Any other error on a plain small disk is a bug.
        let writer = match create(format, &wopts, target, size) {
            Ok(w) => w,
            Err(e) if e.kind() == ErrorKind::Unsupported => continue,
            // An empty sparse VMDK or fixed VHD is refused on purpose: qemu-img cannot open
            // either (convert/tests/empty.rs).
            Err(e)
                if size == 0
                    && e.kind() == ErrorKind::Invalid
                    && (format == Format::Vmdk || opts.contains("fixed")) =>
            {
                continue
            }
            Err(e) => panic!("create {format} ({opts}): {e}"),
        };
        let reader = GuestReader::new(source_img.clone(), &limits);
        let copts = ConvertOptions {
            batch_bytes: 256 << 10,
            ..ConvertOptions::default()
        };
        match convert(source_img.clone(), writer, &reader, &copts) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Unsupported => continue,
            Err(e) => panic!("convert to {format} ({opts}): {e}"),
        }
        let written: Arc<dyn Image> = match open(Arc::new(out), format, &limits) {
            Ok(img) => Arc::from(img),
            Err(e) if e.kind() == ErrorKind::Unsupported => continue,
            Err(e) => panic!("open the {format} ({opts}) output: {e}"),
        };
        let vsize = written.info().virtual_size;
        // Formats may round the disk up (to whole sectors, say), never down.
        assert!(
            vsize >= size && vsize <= size + (2 << 20),
            "{format} ({opts}): virtual size {vsize} for a {size}-byte disk"
        );
        walk(&written, &limits, &READER);
        let back = read_all(written, &limits);
        let (same, tail) = back.split_at(disk.len());
        assert!(
            same == disk.as_slice(),
            "{format} ({opts}): guest bytes differ after a round trip"
        );
        assert!(
            tail.iter().all(|&b| b == 0),
            "{format} ({opts}): bytes past the source size are not zero"
        );
    }
    Corpus::Keep
});
