//! VHDX reader against qemu-img-made images: sizes, bytes, extents, truncation.

mod support;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_formats::reader::GuestReader;
use glimpse_formats::{Format, Image, Limits, Source, Window};
use support::{qemu_img, qemu_json};

const MIB: u64 = 1 << 20;

/// A raw file with deterministic data runs and holes elsewhere.
fn raw_with_holes(path: &Path, size: u64) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (off, len) in [
        (0u64, 3000usize),
        (MIB + 17, 200_000),
        (5 * MIB, 4096),
        (size - 1000, 1000),
    ] {
        let d: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        f.write_all_at(&d, off).unwrap();
    }
}

/// The fixtures: (name, path) of qemu-img-made VHDX files.
fn fixtures(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let p = |n: &str| dir.join(n);
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    let raw = p("holes.raw");
    raw_with_holes(&raw, 7 * MIB + 512 * 3);
    let list = [
        ("dynamic-empty", p("dyn.vhdx")),
        ("fixed-empty", p("fixed.vhdx")),
        ("block-1m-empty", p("b1m.vhdx")),
        ("converted-dynamic", p("cd.vhdx")),
        ("converted-fixed", p("cf.vhdx")),
        ("converted-1m", p("c1m.vhdx")),
    ];
    qemu_img(&["create", "-q", "-f", "vhdx", &s(&list[0].1), "20M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "subformat=fixed",
        &s(&list[1].1),
        "3M",
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        &s(&list[2].1),
        "5M",
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        &s(&raw),
        &s(&list[3].1),
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "subformat=fixed",
        &s(&raw),
        &s(&list[4].1),
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        &s(&raw),
        &s(&list[5].1),
    ]);
    list.into()
}

fn open(path: &Path) -> Arc<dyn Image> {
    let src: Source = Arc::new(File::open(path).unwrap());
    Arc::from(glimpse_formats::open(src, Format::Vhdx, &Limits::default()).unwrap())
}

#[test]
fn detect_size_and_bytes_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in fixtures(dir.path()) {
        let ps = path.to_str().unwrap();
        let det = glimpse_formats::detect(&File::open(&path).unwrap()).unwrap();
        assert_eq!(det.matches, vec![Format::Vhdx], "{name}");
        let img = open(&path);
        assert!(img.findings().is_empty(), "{name}: {:?}", img.findings());
        let info = qemu_json(&["info", "--output=json", "-f", "vhdx", ps]);
        let size = img.info().virtual_size;
        assert_eq!(size, info["virtual-size"].as_u64().unwrap(), "{name}");
        assert_eq!(
            img.info().cluster_size,
            info["cluster-size"].as_u64(),
            "{name}"
        );

        let raw = dir.path().join(format!("{name}.out.raw"));
        qemu_img(&[
            "convert",
            "-f",
            "vhdx",
            "-O",
            "raw",
            ps,
            raw.to_str().unwrap(),
        ]);
        let want = std::fs::read(&raw).unwrap();
        let mut got = vec![0u8; usize::try_from(size).unwrap()];
        GuestReader::new(img, &Limits::default())
            .read_at(&mut got, 0)
            .unwrap();
        assert!(
            got == want,
            "{name}: guest bytes differ from qemu-img convert"
        );
    }
}

#[test]
fn extents_are_disjoint_and_cover_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in fixtures(dir.path()) {
        let img = open(&path);
        let size = img.info().virtual_size;
        for max in [u64::MAX, 4096, MIB + 3] {
            let mut pos = 0;
            while pos < size {
                let e = img.mapping(pos, max).unwrap();
                glimpse_formats::validate_extent(&e, pos, max, size).unwrap();
                pos = e.end();
            }
            assert_eq!(pos, size, "{name}");
        }
        assert!(img.mapping(size, 1).is_err(), "{name}");
    }
}

/// Opens a prefix of `data`; when it opens, walks and reads everything and returns the codes
/// `check` reports. Must never panic. A prefix that cuts off allocated blocks opens (bad BAT
/// entries are check findings), and then the walk must be refused where it reaches them; a
/// prefix that checks clean must map and read to the end.
fn try_prefix(data: &Arc<Vec<u8>>, len: u64) -> Option<Vec<&'static str>> {
    let src: Source = Arc::new(Window::new(data.clone(), 0, len).unwrap());
    let img = glimpse_formats::open(src, Format::Vhdx, &Limits::tight()).ok()?;
    let img: Arc<dyn Image> = Arc::from(img);
    let codes: Vec<&'static str> = img
        .check(&Limits::tight())
        .unwrap()
        .iter()
        .map(|f| f.code)
        .collect();
    let size = img.info().virtual_size;
    let reader = GuestReader::new(img.clone(), &Limits::tight());
    let mut pos = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut refused = None;
    while pos < size {
        let e = match img.mapping(pos, 1 << 16) {
            Ok(e) => e,
            Err(e) => {
                refused = Some(e.finding_code());
                break;
            }
        };
        let n = usize::try_from(e.len).unwrap();
        let read = reader.read_at(&mut buf[..n], pos);
        if codes.is_empty() {
            read.unwrap();
        }
        pos = e.end();
    }
    if codes.is_empty() {
        assert_eq!(refused, None, "prefix of {len} bytes checks clean");
    } else {
        assert!(
            codes.iter().all(|c| *c == "vhdx.bat-entry-out-of-bounds"),
            "prefix of {len} bytes: {codes:?}"
        );
        assert_eq!(
            refused,
            Some("vhdx.bat-entry-out-of-bounds"),
            "prefix of {len} bytes"
        );
    }
    Some(codes)
}

#[test]
fn truncated_prefixes_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in fixtures(dir.path()) {
        if name != "converted-1m" && name != "converted-fixed" {
            continue;
        }
        let data = Arc::new(std::fs::read(&path).unwrap());
        let full = data.len() as u64;
        // Every 512-byte prefix through the header section and the structures after it, every
        // 4 KiB prefix after that, and each prefix next to a structure boundary.
        let mut lens: Vec<u64> = (0..(4 * MIB).min(full)).step_by(512).collect();
        lens.extend((4 * MIB..full).step_by(4096));
        for b in [
            8,
            520,
            64 << 10,
            128 << 10,
            192 << 10,
            256 << 10,
            320 << 10,
            MIB,
            2 * MIB,
            3 * MIB,
            4 * MIB,
            full,
        ] {
            lens.extend(
                [b.saturating_sub(1), b, b + 1]
                    .into_iter()
                    .filter(|&l| l < full),
            );
        }
        let mut cut = 0;
        for len in lens {
            if let Some(codes) = try_prefix(&data, len) {
                // A prefix checks clean only when it still holds every allocated block.
                if codes.is_empty() {
                    assert!(len > 4 * MIB, "{name}: prefix of {len} bytes checks clean");
                } else {
                    cut += 1;
                }
            }
        }
        assert!(cut > 0, "{name}: no prefix opened with blocks cut off");
        assert_eq!(
            try_prefix(&data, full),
            Some(vec![]),
            "{name}: the whole file must open and check clean"
        );
    }
}

#[test]
fn committed_hostile_files_are_refused() {
    let mut seen = 0;
    // `check` gives the codes listed in fixtures/hostile/vhdx/expected-codes.
    for (fx, _) in glimpse_testkit::hostile::check_dir("vhdx") {
        let path = fx.path;
        seen += 1;
        let src: Source = Arc::new(File::open(&path).unwrap());
        let det = glimpse_formats::detect(src.as_ref()).unwrap();
        assert_eq!(det.matches, vec![Format::Vhdx], "{path:?}");
        let err = glimpse_formats::open(src, Format::Vhdx, &Limits::tight())
            .err()
            .expect("hostile file must not open");
        assert_eq!(
            err.kind(),
            glimpse_formats::ErrorKind::Truncated,
            "{path:?}: {err}"
        );
        assert_eq!(err.offset(), Some(0x10000), "{path:?}: {err}");
    }
    assert_eq!(seen, 1);
}

#[test]
fn policy_passes_qemu_images_and_rejects_broken_ones() {
    use glimpse_formats::policy::{inspect, Policy, Verdict};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", path.to_str().unwrap(), "6M"]);
    let policy = Policy {
        expect_format: Some(Format::Vhdx),
        ..Policy::default()
    };
    let src: Source = Arc::new(File::open(&path).unwrap());
    let report = inspect(src, &policy, &Limits::default()).unwrap();
    assert_eq!(report.verdict(), Verdict::Pass, "{:?}", report.findings);

    // Both headers broken: the open error becomes a rejecting finding with its code.
    let mut v = std::fs::read(&path).unwrap();
    v[0x10000 + 200] ^= 1;
    v[0x20000 + 200] ^= 1;
    let report = inspect(Arc::new(v), &policy, &Limits::default()).unwrap();
    assert_eq!(report.verdict(), Verdict::Reject);
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.code == "vhdx.header-checksum"),
        "{:?}",
        report.findings
    );
}

#[test]
fn a_qemu_made_vhdx_of_small_blocks_over_4_tib_opens_and_checks_clean() {
    // 8 TiB in 1 MiB blocks: 8 Mi payload entries and their bitmap entries, 64 MiB of BAT,
    // more entries than the one cap of 4 Mi per table glimpse once applied. qemu opens it.
    let dir = tempfile::tempdir().unwrap();
    let vhdx = dir.path().join("8t.vhdx");
    let p = vhdx.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "vhdx", "-o", "block_size=1M", p, "8T"]);
    let info = qemu_json(&["info", "-f", "vhdx", "--output=json", p]);
    let want = info["virtual-size"].as_u64().unwrap();
    assert_eq!(want, 8 << 40);
    let limits = Limits::default().per_command();
    let src: Source = Arc::new(File::open(&vhdx).unwrap());
    let img = glimpse_formats::open(src.clone(), Format::Vhdx, &limits).unwrap();
    assert_eq!(img.info().virtual_size, want);
    assert_eq!(img.info().cluster_size, Some(MIB));
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    assert!(img.check(&limits).unwrap().is_empty());
}
