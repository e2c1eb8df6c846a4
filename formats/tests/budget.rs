//! One metadata budget per command (issue 11 §6): opening, checking and reading an image
//! charges the command's shared budget, and dropping the image gives every byte back. A
//! command that opens many images (`check a b c`, `compare`, every disk of an OVA) is then
//! bounded as a whole, and never fails on the hundredth image because the first ninety-nine
//! leaked their charges.

mod support;

use std::fs::File;
use std::path::Path;
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

// Each format adds its cases here as its tables move to `table::read_entries` and
// `limits::Charge`, which give their bytes back on drop.

#[test]
fn raw_gives_its_budget_back() {
    case("raw", "a.img", &[], false);
}

#[test]
fn vmdk_gives_its_budget_back() {
    case("vmdk", "sparse.vmdk", &[], false);
    case("vmdk", "sparse-empty.vmdk", &[], true);
    let so = ["-o", "subformat=streamOptimized"];
    case("vmdk", "stream.vmdk", &so, false);
    case("vmdk", "stream-empty.vmdk", &so, true);
}

#[test]
fn vhdx_gives_its_budget_back() {
    case("vhdx", "dynamic.vhdx", &[], false);
    case("vhdx", "dynamic-empty.vhdx", &[], true);
    let fixed = ["-o", "subformat=fixed"];
    case("vhdx", "fixed.vhdx", &fixed, false);
    case("vhdx", "fixed-empty.vhdx", &fixed, true);
}
