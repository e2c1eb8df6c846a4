//! VDI against qemu-img: images made by `qemu-img convert -O vdi` must give qemu-img's virtual
//! size, the guest bytes `qemu-img convert -f vdi -O raw` gives, and the data ranges
//! `qemu-img map` gives; mappings must be disjoint and cover the disk; every truncated prefix
//! must fail cleanly. These tests fail, never skip, without qemu-img.

mod support;

use std::sync::Arc;

use glimpse_formats::policy::{Policy, Verdict};
use glimpse_formats::{detect, open, Format, Image, Limits};
use support::{
    assert_same_guest, data_ranges, for_each_prefix, inspect_as, qemu_data_ranges, qemu_img,
    qemu_json, qemu_to_raw, raw_source, read_guest, src,
};

#[test]
fn qemu_made_vdis_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (n, (size, opts)) in [
        ((20 << 20) + 7 * 512, "static=off"),
        ((9 << 20) + 512, "static=on"),
        (1 << 20, "static=off"),
    ]
    .into_iter()
    .enumerate()
    {
        let input = raw_source(dir.path(), size, n as u64 + 1);
        let vdi = dir.path().join(format!("t{n}.vdi"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vdi",
            "-o",
            opts,
            input.to_str().unwrap(),
            vdi.to_str().unwrap(),
        ]);
        let info = qemu_json(&["info", "-f", "vdi", "--output=json", vdi.to_str().unwrap()]);
        let s = src(&vdi);
        assert_eq!(detect(s.as_ref()).unwrap().matches, [Format::Vdi]);
        let img: Arc<dyn Image> =
            Arc::from(open(s.clone(), Format::Vdi, &Limits::default()).unwrap());
        assert_eq!(
            img.info().virtual_size,
            info["virtual-size"].as_u64().unwrap(),
            "{opts}"
        );
        assert_eq!(img.info().virtual_size, size);
        let kind = if opts == "static=on" {
            "static"
        } else {
            "dynamic"
        };
        assert_eq!(img.info().details["image-type"], kind);
        assert!(img.findings().is_empty());
        assert!(img.check(&Limits::default()).unwrap().is_empty());
        let report = inspect_as(s, Format::Vdi, &Limits::default());
        assert_eq!(report.verdict(), Verdict::Pass, "{:?}", report.findings);
        assert_eq!(
            data_ranges(img.as_ref()),
            qemu_data_ranges(&vdi, "vdi"),
            "{opts}"
        );
        let raw = dir.path().join(format!("t{n}.raw"));
        qemu_to_raw(&vdi, "vdi", &raw);
        assert_same_guest(img, &raw);
    }
}

#[test]
fn every_truncated_prefix_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let input = raw_source(dir.path(), 5 << 20, 9);
    let vdi = dir.path().join("p.vdi");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        input.to_str().unwrap(),
        vdi.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&vdi).unwrap();
    for_each_prefix(&bytes, Format::Vdi, 4096, 4093, |img| {
        // A prefix that cuts a data block opens (as in qemu), check rejects the block and
        // reading it fails; any other prefix that opens reads whole.
        let cut = img
            .check(&Limits::default())
            .unwrap()
            .iter()
            .any(|f| f.code == "vdi.block-out-of-range");
        assert_eq!(read_guest(&img).is_err(), cut);
    });

    // Cut inside the last block: qemu-img info still opens it, and so does glimpse `info`;
    // the verdict is a rejection with the bad entry's code.
    let cut = dir.path().join("cut.vdi");
    std::fs::write(&cut, &bytes[..bytes.len() - 4096]).unwrap();
    let info = qemu_json(&["info", "-f", "vdi", "--output=json", cut.to_str().unwrap()]);
    let s = src(&cut);
    let img = open(s.clone(), Format::Vdi, &Limits::default()).unwrap();
    assert_eq!(
        img.info().virtual_size,
        info["virtual-size"].as_u64().unwrap()
    );
    let report = inspect_as(s, Format::Vdi, &Limits::default());
    assert_eq!(report.verdict(), Verdict::Reject);
    assert!(report
        .findings
        .iter()
        .any(|f| f.code == "vdi.block-out-of-range"));
}

/// `fixtures/hostile/vdi/*.vdi` give the codes their `expected-codes` lines list (see the
/// README there), also when declared VDI.
#[test]
fn hostile_fixtures_give_their_findings() {
    let policy = Policy {
        expect_format: Some(Format::Vdi),
        ..Policy::default()
    };
    for (fx, report) in glimpse_testkit::hostile::check_dir_with("vdi", &policy) {
        assert_eq!(report.verdict(), Verdict::Reject, "{}", fx.name);
    }
}

#[test]
fn a_qemu_made_vdi_over_4_tib_opens_and_checks_clean() {
    // 5 Mi blocks: 20 MiB of block map, more entries than the one cap of 4 Mi entries per
    // table that glimpse once applied to every format. qemu opens it; so must glimpse.
    let dir = tempfile::tempdir().unwrap();
    let vdi = dir.path().join("5t.vdi");
    let p = vdi.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "vdi", p, "5T"]);
    let want = qemu_json(&["info", "-f", "vdi", "--output=json", p])["virtual-size"]
        .as_u64()
        .unwrap();
    assert_eq!(want, 5 << 40);
    let limits = Limits::default().per_command();
    let img = open(src(&vdi), Format::Vdi, &limits).unwrap();
    assert_eq!(img.info().virtual_size, want);
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    assert!(img.check(&limits).unwrap().is_empty());
    let report = inspect_as(src(&vdi), Format::Vdi, &Limits::default());
    assert_eq!(report.verdict(), Verdict::Pass, "{:?}", report.findings);
}
