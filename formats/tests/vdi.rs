//! VDI against qemu-img: images made by `qemu-img convert -O vdi` must give qemu-img's virtual
//! size, the guest bytes `qemu-img convert -f vdi -O raw` gives, and the data ranges
//! `qemu-img map` gives; mappings must be disjoint and cover the disk; every truncated prefix
//! must fail cleanly. These tests fail, never skip, without qemu-img.

mod support;

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{detect, open, Format, Image, Limits, Source};
use support::{data_ranges, qemu_data_ranges, qemu_img, qemu_json, raw_source};

fn src(path: &Path) -> Source {
    Arc::new(File::open(path).unwrap())
}

fn assert_same_guest(img: Arc<dyn Image>, raw: &Path) {
    let size = img.info().virtual_size;
    let r = GuestReader::new(img, &Limits::default());
    let mut f = File::open(raw).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    let mut pos = 0;
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    while pos < size {
        let n = (size - pos).min(1 << 20) as usize;
        r.read_at(&mut a[..n], pos).unwrap();
        f.read_exact(&mut b[..n]).unwrap();
        assert!(
            a[..n] == b[..n],
            "guest bytes differ in the MiB at {pos:#x}"
        );
        pos += n as u64;
    }
}

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
        let report = inspect(
            s,
            &Policy {
                expect_format: Some(Format::Vdi),
                ..Policy::default()
            },
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(report.verdict(), Verdict::Pass, "{:?}", report.findings);
        assert_eq!(
            data_ranges(img.as_ref()),
            qemu_data_ranges(&vdi, "vdi"),
            "{opts}"
        );
        let raw = dir.path().join(format!("t{n}.raw"));
        qemu_img(&[
            "convert",
            "-f",
            "vdi",
            "-O",
            "raw",
            vdi.to_str().unwrap(),
            raw.to_str().unwrap(),
        ]);
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
    let len = bytes.len();
    let mut n = 0;
    while n < len {
        let s: Source = Arc::new(bytes[..n].to_vec());
        if let Ok(img) = open(s, Format::Vdi, &Limits::default()) {
            let _ = img.check(&Limits::default());
            let img: Arc<dyn Image> = Arc::from(img);
            data_ranges(img.as_ref());
            let r = GuestReader::new(img.clone(), &Limits::default());
            let mut buf = vec![0u8; img.info().virtual_size as usize];
            r.read_at(&mut buf, 0).unwrap();
        }
        n += if n < 4096 || n + 4096 > len { 1 } else { 4093 };
    }
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
