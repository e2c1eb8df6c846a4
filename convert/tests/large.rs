//! Disks whose tables pass 4 Mi entries: glimpse once capped every table at 4 Mi entries
//! (qemu's qcow2 L1 cap), and the writers refused what it could not read back. Each case
//! converts an empty qcow2 that qemu-img made to a writer whose table grows with the disk; the
//! output must pass `qemu-img check`, have qemu-img's virtual size, and open and check clean in
//! glimpse under the default limits. Empty sources keep the outputs sparse and the tests fast.
//! These tests fail, never skip, without qemu-img.

mod support;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{create, Target, WriteOptions};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{open, ErrorKind, Format, Image, Limits, Source};
use support::{qemu_img, qemu_virtual_size};

const TIB: u64 = 1 << 40;

/// An empty qcow2 of `size` bytes made by `qemu-img create`.
fn empty_qcow2(dir: &Path, size: u64) -> std::path::PathBuf {
    let path = dir.join(format!("empty-{size}.qcow2"));
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path.to_str().unwrap(),
        &size.to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// Converts `input` (qcow2) to `format` with `opts`, then has qemu-img and glimpse judge it.
fn convert_and_check(dir: &Path, input: &Path, format: Format, opts: &str) {
    let limits = Limits::default().per_command();
    let src: Source = Arc::new(File::open(input).unwrap());
    let img: Arc<dyn Image> = Arc::from(open(src, Format::Qcow2, &limits).unwrap());
    let size = img.info().virtual_size;
    let what = format!("{format} ({opts}) of {size} bytes");
    let out = dir.join(format!("out-{size}.{format}"));
    // One budget for the source, the writer's table, the reader's cache and the batches, as
    // the CLI has.
    let wopts = WriteOptions {
        budget: Some(limits.budget()),
        ..WriteOptions::parse(opts, false).unwrap()
    };
    let writer = create(
        format,
        &wopts,
        Target::File(File::create(&out).unwrap()),
        size,
    )
    .unwrap_or_else(|e| panic!("{what}: the writer refused: {e}"));
    let reader = GuestReader::new(img.clone(), &limits);
    let copts = ConvertOptions {
        budget: Some(limits.budget()),
        ..ConvertOptions::default()
    };
    convert(img, writer, &reader, &copts).unwrap_or_else(|e| panic!("{what}: {e}"));

    let check = qemu_img(&["check", "-f", format.qemu_name(), out.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(qemu_virtual_size(&out, format), size, "{what}");

    let limits = Limits::default().per_command();
    let written = open(Arc::new(File::open(&out).unwrap()), format, &limits)
        .unwrap_or_else(|e| panic!("{what}: glimpse cannot open its own output: {e}"));
    assert_eq!(written.info().virtual_size, size, "{what}");
    assert!(
        written.findings().is_empty(),
        "{what}: {:?}",
        written.findings()
    );
    let found = written.check(&limits).unwrap();
    assert!(found.is_empty(), "{what}: {found:?}");
}

#[test]
fn a_vdi_over_4_tib_is_written_and_reads_back() {
    // 5 Mi one-MiB blocks: 20 MiB of block map.
    let dir = tempfile::tempdir().unwrap();
    let input = empty_qcow2(dir.path(), 5 * TIB);
    convert_and_check(dir.path(), &input, Format::Vdi, "");
}

#[test]
fn a_ploop_over_4_tib_is_written_and_reads_back() {
    // 5 Mi one-MiB clusters: 20 MiB of BAT.
    let dir = tempfile::tempdir().unwrap();
    let input = empty_qcow2(dir.path(), 5 * TIB);
    convert_and_check(dir.path(), &input, Format::Parallels, "");
}

#[test]
fn a_ploop_at_its_bat_cap_is_written_and_checks_clean() {
    // 32 Mi four-KiB clusters: the largest BAT the writer allows (128 MiB). glimpse's own
    // check once charged 16 bytes per BAT entry, allocated or not, and refused this output
    // (report writer-edge F1); it now lists allocated entries only.
    let dir = tempfile::tempdir().unwrap();
    let input = empty_qcow2(dir.path(), 128 << 30);
    convert_and_check(dir.path(), &input, Format::Parallels, "cluster_size=4096");
}

#[test]
fn a_vhdx_of_small_blocks_over_4_tib_is_written_and_reads_back() {
    // 8 Mi one-MiB blocks and their bitmap entries: 64 MiB of BAT.
    let dir = tempfile::tempdir().unwrap();
    let input = empty_qcow2(dir.path(), 8 * TIB);
    convert_and_check(dir.path(), &input, Format::Vhdx, "block_size=1M");
}

#[test]
fn writers_refuse_tables_glimpse_would_not_read_back() {
    // Each past the 128 MiB table cap of the default limits, and each under qemu's own cap
    // (and so not refused for that): the writer says so before writing a byte.
    for (format, opts, size) in [
        // 40 Mi blocks: 160 MiB of map (qemu's VDI_BLOCKS_IN_IMAGE_MAX is about 512 Mi).
        (Format::Vdi, "", 40 * TIB),
        // 40 Mi clusters: 160 MiB of BAT (qemu's cap is INT_MAX / 4 entries).
        (Format::Parallels, "", 40 * TIB),
        // 20 Mi blocks and bitmap entries: 160 MiB of BAT (qemu caps only the disk, at 64 TiB).
        (Format::Vhdx, "block_size=1M", 20 * TIB),
        // 40 Mi blocks of 4 KiB: 160 MiB of BAT (qemu's cap is INT_MAX / 4 entries).
        (Format::Vhd, "block_size=4k", 160 << 30),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let e = match create(
            format,
            &WriteOptions::parse(opts, false).unwrap(),
            Target::File(File::create(&out).unwrap()),
            size,
        ) {
            Ok(_) => panic!("{format} ({opts}) of {size} bytes was accepted"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), ErrorKind::Invalid, "{format} ({opts}): {e}");
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 0, "{format}");
    }
}

#[test]
fn writers_charge_their_tables_and_refuse_what_the_budget_cannot_hold() {
    // Tables under every cap, each of 4 MiB or more: a budget with 2 MiB left refuses them
    // before a byte is written, and gives every byte back; one with room holds them while
    // the writer lives.
    for (format, opts, size, table) in [
        (Format::Vdi, "", TIB, 4u64 << 20),
        (Format::Parallels, "", TIB, 4 << 20),
        (Format::Vhdx, "block_size=1M", TIB, 8 << 20),
        (Format::Vhd, "block_size=4k", 4 << 30, 4 << 20),
        (Format::Qcow2, "cluster_size=512", 64 << 30, 16 << 20),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let budget = glimpse_formats::limits::Budget::new(2 << 20);
        let wopts = WriteOptions {
            budget: Some(budget.clone()),
            ..WriteOptions::parse(opts, false).unwrap()
        };
        let target = Target::File(File::create(&out).unwrap());
        let e = match create(format, &wopts, target, size) {
            Ok(_) => panic!("{format} ({opts}) of {size} bytes was accepted"),
            Err(e) => e,
        };
        assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{format} ({opts}): {e}");
        assert_eq!(std::fs::metadata(&out).unwrap().len(), 0, "{format}");
        assert_eq!(
            budget.left(),
            2 << 20,
            "{format}: the refusal kept a charge"
        );

        let budget = glimpse_formats::limits::Budget::new(64 << 20);
        let wopts = WriteOptions {
            budget: Some(budget.clone()),
            ..wopts
        };
        let target = Target::File(File::create(&out).unwrap());
        let w = create(format, &wopts, target, size).unwrap();
        let held = (64u64 << 20) - budget.left();
        assert!(held >= table, "{format} ({opts}): {held} bytes charged");
        drop(w);
        assert_eq!(
            budget.left(),
            64 << 20,
            "{format}: the writer kept a charge"
        );
    }
}
