//! One metadata budget per command (issue 11 §6): opening, checking and reading an image
//! charges the command's shared budget, and dropping the image gives every byte back. A
//! command that opens many images (`check a b c`, `compare`, every disk of an OVA) is then
//! bounded as a whole, and never fails on the hundredth image because the first ninety-nine
//! leaked their charges.

mod support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_formats::reader::GuestReader;
use glimpse_formats::{open_detected, Limits, Source};
use support::qemu_img;

fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let p = path.to_str().unwrap();
    args.push(p);
    let out = std::process::Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("qemu-io comes with qemu-img");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Opens, checks and reads `path` three times under one per-command budget, asserting that
/// each round gives back everything it charged.
fn round_trips_the_budget(path: &Path) {
    let limits = Limits::default().per_command();
    let full = limits.budget().left();
    for round in 0..3 {
        let src: Source = Arc::new(File::open(path).unwrap());
        let (_, img) = open_detected(src, &limits).unwrap();
        assert!(limits.budget().left() <= full);
        img.check(&limits).unwrap();
        let img: Arc<dyn glimpse_formats::Image> = Arc::from(img);
        let reader = GuestReader::new(img.clone(), &limits);
        let mut buf = vec![0u8; 4096];
        reader.read_at(&mut buf, 0).unwrap();
        drop(reader);
        drop(img);
        assert_eq!(
            limits.budget().left(),
            full,
            "{} round {round}: {} bytes of budget never given back",
            path.display(),
            full - limits.budget().left()
        );
    }
}

/// Creates a 64 MiB image of `fmt` with qemu-img (`opts` passed to create), writes two runs of
/// data into it with qemu-io unless `empty`, and round-trips the budget on it.
fn case(fmt: &str, name: &str, opts: &[&str], empty: bool) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    let ps = p.to_str().unwrap();
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend_from_slice(opts);
    args.extend([ps, "64M"]);
    qemu_img(&args);
    if !empty {
        qemu_io(fmt, &p, &["write -P 0x5a 0 1M", "write -P 0x11 33M 64k"]);
    }
    round_trips_the_budget(&p);
}

/// [`case`] for each `(name, create options)` variant of `fmt`, once with data and once empty.
fn with_and_without_data(fmt: &str, variants: &[(&str, &[&str])]) {
    for (name, opts) in variants {
        case(fmt, name, opts, false);
        case(fmt, &format!("empty-{name}"), opts, true);
    }
}

/// A 64 MiB qcow2 `s.qcow2` in `dir` with data, an internal snapshot, then more writes:
/// snapshot L1 tables and shared clusters.
fn qcow2_with_snapshot(dir: &Path) -> PathBuf {
    let a = dir.join("s.qcow2");
    let ap = a.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ap, "64M"]);
    qemu_io("qcow2", &a, &["write -P 0x5a 0 1M"]);
    qemu_img(&["snapshot", "-c", "s1", ap]);
    qemu_io(
        "qcow2",
        &a,
        &["write -P 0x11 512k 1M", "write -P 0x22 40M 64k"],
    );
    a
}

// Each format adds its cases here as its tables move to `table::read_entries` and
// `limits::Charge`, which give their bytes back on drop.

#[test]
fn raw_gives_its_budget_back() {
    case("raw", "a.img", &[], false);
}

#[test]
fn vhd_gives_its_budget_back() {
    with_and_without_data(
        "vpc",
        &[
            ("dynamic.vhd", &[]),
            ("fixed.vhd", &["-o", "subformat=fixed"]),
        ],
    );
}

#[test]
fn vdi_gives_its_budget_back() {
    with_and_without_data(
        "vdi",
        &[("dynamic.vdi", &[]), ("static.vdi", &["-o", "static=on"])],
    );
}

/// A qcow2 with data: the L1 table, the L2 cache and the check's charges all come back.
#[test]
fn qcow2_gives_its_budget_back() {
    case("qcow2", "a.qcow2", &[], false);
}

#[test]
fn qcow2_extended_l2_gives_its_budget_back() {
    case(
        "qcow2",
        "x.qcow2",
        &["-o", "extended_l2=on,cluster_size=128k"],
        false,
    );
}

#[test]
fn qcow2_empty_gives_its_budget_back() {
    case("qcow2", "e.qcow2", &[], true);
}

/// `qemu-img convert -c` of a qcow2 with data: compressed clusters.
#[test]
fn qcow2_compressed_gives_its_budget_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let c = dir.path().join("c.qcow2");
    let (ap, cp) = (a.to_str().unwrap(), c.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", ap, "64M"]);
    qemu_io(
        "qcow2",
        &a,
        &["write -P 0x5a 0 1M", "write -P 0x11 33M 64k"],
    );
    qemu_img(&["convert", "-q", "-c", "-O", "qcow2", ap, cp]);
    round_trips_the_budget(&c);
}

/// An internal snapshot, then more writes (see [`qcow2_with_snapshot`]).
#[test]
fn qcow2_snapshot_gives_its_budget_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = qcow2_with_snapshot(dir.path());
    round_trips_the_budget(&a);
}

#[test]
fn qed_gives_its_budget_back() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let p = dir.path().join("a.qed");
    let (bp, pp) = (base.to_str().unwrap(), p.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qed", "-b", bp, "-F", "raw", pp, "3M"]);
    let limits = Limits::default().per_command();
    let full = limits.budget().left();
    for _ in 0..3 {
        let src: Source = Arc::new(File::open(&p).unwrap());
        let (_, img) = open_detected(src, &limits).unwrap();
        img.check(&limits).unwrap();
        drop(img);
        assert_eq!(limits.budget().left(), full);
    }
}

/// Whatever budget a command has, an open or a check that runs out of it part way gives back
/// everything it took: every error path of qcow2's open and check returns its charges.
#[test]
fn qcow2_gives_its_budget_back_when_it_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    let a = qcow2_with_snapshot(dir.path());
    let (mut opened, mut checked) = (0, 0);
    for kib in (8..=1024).step_by(8) {
        let limits = Limits {
            max_metadata_bytes: kib << 10,
            ..Limits::default()
        }
        .per_command();
        let full = limits.budget().left();
        let src: Source = Arc::new(File::open(&a).unwrap());
        if let Ok((_, img)) = open_detected(src, &limits) {
            opened += 1;
            if img.check(&limits).is_ok() {
                checked += 1;
            }
        }
        assert_eq!(limits.budget().left(), full, "{kib} KiB");
    }
    // Some budgets fail the open, some the check, some neither.
    assert!(opened > 0 && checked > 0 && checked < opened && opened < 128);
}

/// Persistent bitmaps: the bitmap directory and tables that check reads come back too.
#[test]
fn qcow2_with_bitmaps_gives_its_budget_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("b.qcow2");
    let ap = a.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ap, "64M"]);
    qemu_io("qcow2", &a, &["write -P 0x5a 0 1M"]);
    qemu_img(&["bitmap", "--add", ap, "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", ap, "b1"]);
    round_trips_the_budget(&a);
}

#[test]
fn vmdk_gives_its_budget_back() {
    with_and_without_data(
        "vmdk",
        &[
            ("sparse.vmdk", &[]),
            ("stream.vmdk", &["-o", "subformat=streamOptimized"]),
        ],
    );
}

#[test]
fn vhdx_gives_its_budget_back() {
    with_and_without_data(
        "vhdx",
        &[
            ("dynamic.vhdx", &[]),
            ("fixed.vhdx", &["-o", "subformat=fixed"]),
        ],
    );
}

#[test]
fn parallels_gives_its_budget_back() {
    with_and_without_data("parallels", &[("a.hds", &[])]);
}
