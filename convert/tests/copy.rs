//! File-to-file copies (issue 15): the kernel path (`copy_file_range`), its read/write
//! fallback and the path that reads every chunk into memory make the same output, byte for
//! byte, for every writer and every kind of source whose data lies verbatim in a file; qemu-img
//! calls the output identical to the source and clean.

mod support;

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use glimpse_convert::copy::CopyMode;
use glimpse_convert::pipeline::{convert, ConvertOptions, Stats};
use glimpse_convert::{create, Target, WriteOptions, WRITER_VARIANTS};
use glimpse_formats::io::Window;
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{open, Format, Image, Limits, Source};
use glimpse_testkit::qemu;
use support::sparse_bytes;

const SIZE: u64 = 12 << 20;

/// Raw bytes with data, holes, and zeros that are written (allocated) rather than holes,
/// including a 64 KiB cluster and a 1 MiB chunk whose only non-zero byte is their last one.
fn source_bytes() -> Vec<u8> {
    let mut data = sparse_bytes(SIZE, 7);
    data[(3 << 20)..(4 << 20)].fill(0);
    data[(4 << 20) - 1] = 0x5a;
    data[(5 << 20)..(5 << 20) + 65536].fill(0);
    data[(5 << 20) + 65535] = 0xa5;
    data
}

/// Writes `data` to `path` after `prefix` bytes of 0xEE, leaving its runs of 1 MiB zeros as
/// holes only in the second half, so both written and unwritten zeros occur.
fn write_source(path: &Path, prefix: usize, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    f.write_all(&vec![0xEE; prefix]).unwrap();
    let half = data.len() / 2;
    f.write_all(&data[..half]).unwrap();
    for (i, c) in data[half..].chunks(1 << 20).enumerate() {
        let at = (prefix + half + (i << 20)) as u64;
        if c.iter().any(|&b| b != 0) {
            std::os::unix::fs::FileExt::write_all_at(&f, c, at).unwrap();
        }
    }
    f.set_len((prefix + data.len()) as u64).unwrap();
}

/// Converts the image from `offset` of `path` to its end, opened as `format`, with `mode`.
fn run(
    path: &Path,
    offset: u64,
    format: Format,
    out: &Path,
    variant: (Format, &str, bool),
    mode: CopyMode,
) -> Stats {
    let limits = Limits::default();
    let file = Arc::new(File::open(path).unwrap());
    let len = file.metadata().unwrap().len() - offset;
    let src: Source = Arc::new(Window::new(file, offset, len).unwrap());
    let img: Arc<dyn Image> = Arc::from(open(src, format, &limits).unwrap());
    let reader = GuestReader::new(img.clone(), &limits);
    let (fmt, opts, compress) = variant;
    let w = create(
        fmt,
        &WriteOptions::parse(opts, compress).unwrap(),
        Target::File(File::create(out).unwrap()),
        img.info().virtual_size,
    )
    .unwrap();
    let copts = ConvertOptions {
        copy: mode,
        ..ConvertOptions::default()
    };
    convert(img, w, &reader, &copts).unwrap()
}

fn check_source(dir: &Path, src: &Path, offset: u64, format: Format, reference: &Path) {
    for &variant in WRITER_VARIANTS {
        let (fmt, opts, compress) = variant;
        if fmt == Format::Vmdk && opts.contains("stream") {
            continue; // streamOptimized compresses every grain: nothing to copy
        }
        let copies = !compress && fmt != Format::Vmdk;
        let what = format!("{format} -> {fmt} {opts}");
        let mut outs = Vec::new();
        for mode in [
            CopyMode::Kernel,
            CopyMode::ReadWrite,
            CopyMode::Off,
            CopyMode::Auto,
        ] {
            let out = dir.join(format!("out-{mode:?}"));
            let stats = run(src, offset, format, &out, variant, mode);
            match (copies, mode) {
                (true, CopyMode::Kernel) => {
                    assert!(stats.kernel_copied > 0, "{what}: {stats:?}");
                    assert_eq!(stats.buffer_copied, 0, "{what}: the kernel refused");
                    assert_eq!(stats.paired_copied, 0, "{what}");
                }
                (true, CopyMode::ReadWrite) => {
                    assert!(stats.buffer_copied > 0, "{what}: {stats:?}");
                    assert_eq!(stats.kernel_copied + stats.paired_copied, 0, "{what}");
                }
                (true, CopyMode::Auto) => {
                    // Paired into ext4, the kernel's elsewhere: never both.
                    let (k, p) = (stats.kernel_copied, stats.paired_copied);
                    assert!((k > 0) != (p > 0), "{what}: {stats:?}");
                    assert_eq!(stats.buffer_copied, 0, "{what}: the kernel refused");
                }
                _ => assert_eq!(
                    stats.kernel_copied + stats.buffer_copied + stats.paired_copied,
                    0,
                    "{what}"
                ),
            }
            let map = qemu::json(&[
                "map",
                "--output=json",
                "-f",
                fmt.qemu_name(),
                out.to_str().unwrap(),
            ]);
            outs.push((std::fs::read(&out).unwrap(), map));
            if mode == CopyMode::Kernel {
                let q = fmt.qemu_name();
                qemu::assert_identical(reference, "raw", &out, q);
                let code = qemu::check(&out, q);
                assert!(
                    code == 0 || code == 63,
                    "{what}: qemu-img check exit {code}"
                );
            }
        }
        for (i, other) in ["read/write", "in-memory", "paired"].iter().enumerate() {
            let (a, b) = (&outs[0], &outs[i + 1]);
            // Headers of VHD, VHDX and VDI carry a fresh UUID and timestamp (the CLI test
            // compares those byte for byte under SOURCE_DATE_EPOCH). The in-memory path
            // writes the zero parts of a partly allocated chunk where a copy leaves them as
            // holes, so only the fallback has the same layout as the kernel copy (the bytes
            // read back are the same).
            assert_eq!(
                a.0.len(),
                b.0.len(),
                "{what}: kernel and {other} sizes differ"
            );
            if i != 1 {
                assert_eq!(a.1, b.1, "{what}: kernel and {other} layouts differ");
            }
            if matches!(fmt, Format::Raw | Format::Qcow2 | Format::Parallels) {
                assert!(a.0 == b.0, "{what}: kernel and {other} outputs differ");
            }
        }
    }
}

#[test]
fn every_writer_gives_the_same_bytes_by_kernel_copy_fallback_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = source_bytes();
    let raw = dir.path().join("src.raw");
    write_source(&raw, 0, &data);
    check_source(dir.path(), &raw, 0, Format::Raw, &raw);

    // The same bytes as a qcow2 (its data clusters lie verbatim in the file) ...
    let q = dir.path().join("src.qcow2");
    qemu::convert(&raw, "raw", &q, "qcow2", &[]);
    check_source(dir.path(), &q, 0, Format::Qcow2, &raw);

    // ... and as a raw disk 3 KiB into a larger file (an OVA member, say): copies start at
    // the window's offset in the file.
    let inner = dir.path().join("member.bin");
    write_source(&inner, 3072, &data);
    check_source(dir.path(), &inner, 3072, Format::Raw, &raw);
}

#[test]
fn the_zero_probe_decides_like_a_full_read() {
    // Zero clusters that are written stay unallocated in a qcow2 output, and a cluster whose
    // last byte is its only data is stored, whichever path moved the bytes.
    let dir = tempfile::tempdir().unwrap();
    let data = source_bytes();
    let raw = dir.path().join("src.raw");
    write_source(&raw, 0, &data);
    let out = dir.path().join("o.qcow2");
    let stats = run(
        &raw,
        0,
        Format::Raw,
        &out,
        (Format::Qcow2, "", false),
        CopyMode::Kernel,
    );
    let nonzero = data
        .chunks(65536)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    assert_eq!(stats.data_chunks, nonzero);
    assert_eq!(stats.kernel_copied, nonzero * 65536);
    // Zero clusters were found, written ones among them (the first half has no holes).
    let written_zero = data[..data.len() / 2]
        .chunks(65536)
        .filter(|c| c.iter().all(|&b| b == 0))
        .count() as u64;
    assert!(written_zero > 0);
    assert!(stats.zero_chunks >= written_zero);
}
