//! VHD against qemu-img: images made by `qemu-img convert -O vpc` must give qemu-img's virtual
//! size, the guest bytes `qemu-img convert -f vpc -O raw` gives and `qemu-img map`'s data runs; mappings must be disjoint
//! and cover the disk; every truncated prefix must fail cleanly. Committed hostile files must
//! give their findings. These tests fail, never skip, without qemu-img.

mod support;

use std::path::Path;
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{detect, open, ExtentKind, Format, Image, Limits, Severity};
use glimpse_testkit::qemu::virtual_size as qemu_virtual_size;
use support::{
    assert_same_guest, for_each_prefix, inspect_as, qemu_img, qemu_to_raw, raw_source, read_guest,
    src,
};

fn walk(img: &dyn Image) {
    let size = img.info().virtual_size;
    let mut pos = 0;
    while pos < size {
        let e = img.mapping(pos, u64::MAX).unwrap();
        glimpse_formats::validate_extent(&e, pos, u64::MAX, size).unwrap();
        pos = e.end();
    }
    assert_eq!(pos, size);
}

/// Merged (guest start, length, host offset) runs of data, from glimpse's mapping.
fn data_runs(img: &dyn Image) -> Vec<(u64, u64, u64)> {
    let size = img.info().virtual_size;
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < size {
        let e = img.mapping(pos, u64::MAX).unwrap();
        if let ExtentKind::Data { host } = e.kind {
            push_run(&mut out, e.start, e.len, host);
        }
        pos = e.end();
    }
    out
}

fn push_run(out: &mut Vec<(u64, u64, u64)>, start: u64, len: u64, host: u64) {
    match out.last_mut() {
        Some((s, l, h)) if *s + *l == start && *h + *l == host => *l += len,
        _ => out.push((start, len, host)),
    }
}

/// The same from `qemu-img map --output=json`.
fn qemu_data_runs(path: &Path) -> Vec<(u64, u64, u64)> {
    let json = qemu_img(&["map", "-f", "vpc", "--output=json", path.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut out = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"].as_bool().unwrap() {
            let (s, l, h) = (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["offset"].as_u64().unwrap(),
            );
            push_run(&mut out, s, l, h);
        }
    }
    out
}

/// The policy without the image-service gate, as the readers apply it (a fixed VHD is
/// `vhd.fixed-undetected` to the gate whatever its structure): declared VHD.
fn inspect_as_reader(s: glimpse_formats::Source) -> glimpse_formats::policy::Report {
    let reader = Policy {
        expect_format: Some(Format::Vhd),
        image_service: false,
        ..Policy::default()
    };
    inspect(s, &reader, &Limits::default()).unwrap()
}

#[test]
fn qemu_made_vhds_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // 30 MiB + 7 sectors is no CHS geometry: qemu-img rounds it up unless force_size=on.
    let size = (30 << 20) + 7 * 512;
    let input = raw_source(dir.path(), size, 1);
    for (n, opts) in [
        "subformat=dynamic",
        "subformat=dynamic,force_size=on",
        "subformat=fixed",
        "subformat=fixed,force_size=on",
    ]
    .iter()
    .enumerate()
    {
        let vhd = dir.path().join(format!("t{n}.vhd"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            opts,
            input.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ]);
        let want = qemu_virtual_size(&vhd, "vpc");
        let s = src(&vhd);
        assert_eq!(detect(s.as_ref()).unwrap().matches, [Format::Vhd], "{opts}");
        let img: Arc<dyn Image> =
            Arc::from(open(s.clone(), Format::Vhd, &Limits::default()).unwrap());
        assert_eq!(img.info().virtual_size, want, "{opts}");
        if opts.contains("force_size") {
            assert_eq!(want, size, "{opts}");
        }
        let fixed = opts.contains("fixed");
        assert_eq!(
            img.info().details["disk-type"],
            if fixed { "fixed" } else { "dynamic" }
        );
        assert!(img.findings().is_empty(), "{opts}: {:?}", img.findings());
        assert!(img.check(&Limits::default()).unwrap().is_empty());
        // The image-service gate refuses a fixed disk (Glance cannot detect it), with that
        // one code; without the gate, as for a reader, every disk passes.
        let report = inspect_as(s.clone(), Format::Vhd, &Limits::default());
        let rejected: Vec<&str> = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Reject)
            .map(|f| f.code)
            .collect();
        let want: &[&str] = if fixed {
            &["vhd.fixed-undetected"]
        } else {
            &[]
        };
        assert_eq!(rejected, want, "{opts}: {:?}", report.findings);
        let report = inspect_as_reader(s);
        assert_eq!(
            report.verdict(),
            Verdict::Pass,
            "{opts}: {:?}",
            report.findings
        );
        walk(img.as_ref());
        assert_eq!(data_runs(img.as_ref()), qemu_data_runs(&vhd), "{opts}");
        let raw = dir.path().join(format!("t{n}.raw"));
        qemu_to_raw(&vhd, "vpc", &raw);
        assert_same_guest(img, &raw);
    }
}

#[test]
fn fixed_vhd_declared_raw_is_a_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let vhd = dir.path().join("f.vhd");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "subformat=fixed",
        vhd.to_str().unwrap(),
        "4M",
    ]);
    // qemu-img itself calls it raw.
    let json = qemu_img(&["info", "--output=json", vhd.to_str().unwrap()]);
    assert!(json.contains("\"format\": \"raw\""));
    let report = inspect_as(src(&vhd), Format::Raw, &Limits::default());
    assert_eq!(report.verdict(), Verdict::Reject);
    assert!(
        report.findings.iter().any(|f| f.code == "format.mismatch"),
        "{:?}",
        report.findings
    );
}

#[test]
fn every_truncated_prefix_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let input = raw_source(dir.path(), 5 << 20, 2);
    for opts in ["subformat=dynamic", "subformat=fixed"] {
        let vhd = dir.path().join("p.vhd");
        let _ = std::fs::remove_file(&vhd);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            opts,
            input.to_str().unwrap(),
            vhd.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&vhd).unwrap();
        for_each_prefix(&bytes, Format::Vhd, 4096, 4093, |img| {
            walk(img.as_ref());
            read_guest(&img).unwrap();
        });
    }
}

/// `fixtures/hostile/vhd/*.vhd` give the codes their `expected-codes` lines list (see the
/// README there), also when declared VHD.
#[test]
fn hostile_fixtures_give_their_findings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hostile/vhd");
    let policy = Policy {
        expect_format: Some(Format::Vhd),
        ..Policy::default()
    };
    for (fx, report) in glimpse_testkit::hostile::check_dir_with("vhd", &policy) {
        assert_eq!(report.verdict(), Verdict::Reject, "{}", fx.name);
    }
    let img = open(
        src(&dir.join("differencing-parent-locator.vhd")),
        Format::Vhd,
        &Limits::default(),
    )
    .unwrap();
    assert!(img
        .info()
        .references
        .iter()
        .any(|r| r.target.ends_with("parent.vhd")));
}

/// Report F1 and F7: a fixed VHD's size is whole sectors, as `qemu-img info -f vpc` reports
/// it, and a footer whose size is not the data before it is refused, while the file qemu-img
/// probes (as raw) is the whole file.
#[test]
fn fixed_vhd_sizes_follow_qemu_and_must_match_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let footer = |current: u64| {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x1_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&[0xff; 8]);
        f[28..32].copy_from_slice(b"win ");
        f[40..48].copy_from_slice(&current.to_be_bytes());
        f[48..56].copy_from_slice(&current.to_be_bytes());
        f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
        f[60..64].copy_from_slice(&2u32.to_be_bytes());
        let sum = f.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
        f
    };
    // (data bytes, current size, passes)
    for (n, (data, current, ok)) in [
        (1 << 20, (1 << 20) - 100, true),
        (1 << 20, 1 << 20, true),
        (4 << 20, 1 << 20, false),
        (1 << 20, (1 << 20) - 1000, false),
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("f{n}.vhd"));
        let mut b = vec![5u8; data];
        b.extend(footer(current));
        std::fs::write(&p, &b).unwrap();
        let img = open(src(&p), Format::Vhd, &Limits::default()).unwrap();
        assert_eq!(img.info().virtual_size, qemu_virtual_size(&p, "vpc"), "{n}");
        let report = inspect_as_reader(src(&p));
        let codes: Vec<&str> = report.findings.iter().map(|f| f.code).collect();
        if ok {
            assert_eq!(report.verdict(), Verdict::Pass, "{n}: {codes:?}");
        } else {
            assert_eq!(codes, ["vhd.fixed-size"], "{n}");
            assert_eq!(report.verdict(), Verdict::Reject, "{n}");
        }
    }
    // qemu-img probes the F7 fixture as a raw disk of the whole file.
    let fx = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/hostile/vhd/raw-with-fixed-footer.vhd");
    let json = qemu_img(&["info", "--output=json", fx.to_str().unwrap()]);
    assert!(json.contains("\"format\": \"raw\""), "{json}");
    assert!(json.contains("\"virtual-size\": 65536"), "{json}");
}

/// A fixed disk of a creator qemu sizes by its geometry ("vpc ", Virtual PC, and "qemu") is as
/// large as the geometry says, rounded down from the data, as `qemu-img info -f vpc` and a
/// guest of qemu see it; a geometry larger than the data is refused, since qemu would serve
/// the footer as disk data. Found by the differential campaign against qemu-img (class B).
#[test]
fn a_fixed_disk_of_virtual_pc_is_as_large_as_its_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let data: u64 = 16 << 20;
    for (n, (app, cyls, size, ok)) in [
        (b"vpc ", 481u16, 481 * 4 * 17 * 512, true),
        (b"qemu", 481, 481 * 4 * 17 * 512, true),
        (b"win ", 481, data, true),
        (b"vpc ", 482, 0, false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x1_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&[0xff; 8]);
        f[28..32].copy_from_slice(app);
        f[40..48].copy_from_slice(&data.to_be_bytes());
        f[48..56].copy_from_slice(&data.to_be_bytes());
        f[56..58].copy_from_slice(&cyls.to_be_bytes());
        f[58..60].copy_from_slice(&[4, 17]);
        f[60..64].copy_from_slice(&2u32.to_be_bytes());
        let sum = f.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        f[64..68].copy_from_slice(&(!sum).to_be_bytes());
        let p = dir.path().join(format!("vpc{n}.vhd"));
        let mut b = vec![5u8; usize::try_from(data).unwrap()];
        b.extend(f);
        std::fs::write(&p, &b).unwrap();
        let report = inspect_as_reader(src(&p));
        let codes: Vec<&str> = report.findings.iter().map(|f| f.code).collect();
        if ok {
            let img = open(src(&p), Format::Vhd, &Limits::default()).unwrap();
            assert_eq!(img.info().virtual_size, size, "{n}");
            assert_eq!(size, qemu_virtual_size(&p, "vpc"), "{n}");
            assert_eq!(report.verdict(), Verdict::Pass, "{n}: {codes:?}");
        } else {
            assert!(codes.contains(&"vhd.truncated"), "{n}: {codes:?}");
            assert_eq!(report.verdict(), Verdict::Reject, "{n}");
        }
    }
}
