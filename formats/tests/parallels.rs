//! Parallels (ploop) against qemu-img: the committed samples (`fixtures/parallels/`) and
//! images made by `qemu-img convert -O parallels` / `qemu-img create` + `qemu-io` must give
//! qemu-img's virtual size, the guest bytes `qemu-img convert -f parallels -O raw` gives, and
//! the data ranges `qemu-img map` gives; every truncated prefix must fail cleanly; the
//! committed hostile files must give their codes. These tests fail, never skip, without
//! qemu-img.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use glimpse_formats::policy::Verdict;
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{detect, open, Format, Image, Limits};
use glimpse_testkit::fixtures_dir as fixtures;
use support::{
    assert_same_guest, data_ranges, for_each_prefix, inspect_as, qemu_data_ranges, qemu_img,
    qemu_json, qemu_to_raw, raw_source, read_guest, src,
};

/// Opens `path` and compares it with qemu-img in every way this file promises.
fn assert_reads_like_qemu(path: &Path, tmp: &Path) -> Arc<dyn Image> {
    let name = path.display().to_string();
    let p = path.to_str().unwrap();
    let info = qemu_json(&["info", "-f", "parallels", "--output=json", p]);
    let s = src(path);
    assert_eq!(
        detect(s.as_ref()).unwrap().matches,
        [Format::Parallels],
        "{name}"
    );
    let img: Arc<dyn Image> =
        Arc::from(open(s.clone(), Format::Parallels, &Limits::default()).unwrap());
    assert_eq!(
        img.info().virtual_size,
        info["virtual-size"].as_u64().unwrap(),
        "{name}"
    );
    assert!(img.findings().is_empty(), "{name}: {:?}", img.findings());
    assert!(img.check(&Limits::default()).unwrap().is_empty(), "{name}");
    let report = inspect_as(s, Format::Parallels, &Limits::default());
    assert_eq!(
        report.verdict(),
        Verdict::Pass,
        "{name}: {:?}",
        report.findings
    );
    assert_eq!(
        data_ranges(img.as_ref()),
        qemu_data_ranges(path, "parallels"),
        "{name}"
    );
    let raw = tmp.join("guest.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_to_raw(path, "parallels", &raw);
    assert_same_guest(img.clone(), &raw);
    img
}

#[test]
fn committed_samples_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let samples = fixtures().join("parallels");
    for name in [
        "v1-sectors.parallels",
        "v2-qemu.parallels",
        "with-bitmap.parallels",
    ] {
        let img = assert_reads_like_qemu(&samples.join(name), dir.path());
        let sub = &img.info().details["subformat"];
        let want = if name.starts_with("v1") {
            "WithoutFreeSpace"
        } else {
            "WithouFreSpacExt"
        };
        assert_eq!(sub, want, "{name}");
    }
    // The bitmap sample's extension is reported.
    let img = open(
        src(&samples.join("with-bitmap.parallels")),
        Format::Parallels,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(img.info().details["dirty-bitmaps"], 1);
    // The empty sample that used to be refused as unsupported now reads as 1 MiB of zeros.
    let empty = fixtures().join("hostile/unsupported/parallels-empty.parallels");
    let img = assert_reads_like_qemu(&empty, dir.path());
    assert_eq!(img.info().virtual_size, 1 << 20);
}

#[test]
fn qemu_made_images_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for (n, (size, cluster)) in [
        ((9 << 20) + 7 * 512, "4k"),
        (5 << 20, "64k"),
        ((20 << 20) + 512, "1M"),
        (3 << 20, "3k"),
    ]
    .into_iter()
    .enumerate()
    {
        let input = raw_source(dir.path(), size, n as u64 + 1);
        let out = dir.path().join(format!("t{n}.hds"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "parallels",
            "-o",
            &format!("cluster_size={cluster}"),
            input.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let img = assert_reads_like_qemu(&out, dir.path());
        assert_eq!(img.info().virtual_size, size, "{cluster}");
    }
    // qemu-img create, then writes through qemu-io out of guest order.
    let out = dir.path().join("io.hds");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "parallels",
        out.to_str().unwrap(),
        "64M",
    ]);
    let st = Command::new("qemu-io")
        .args([
            "-f",
            "parallels",
            "-c",
            "write -P 0xab 40M 1M",
            "-c",
            "write -P 0xcd 0 1536k",
            "-c",
            "write -P 0xef 63M 4k",
            out.to_str().unwrap(),
        ])
        .output()
        .expect("qemu-io must be installed (qemu-utils)");
    assert!(st.status.success(), "{st:?}");
    assert_reads_like_qemu(&out, dir.path());
}

#[test]
fn every_truncated_prefix_fails_cleanly() {
    for name in ["v1-sectors.parallels", "with-bitmap.parallels"] {
        let bytes = std::fs::read(fixtures().join("parallels").join(name)).unwrap();
        for_each_prefix(&bytes, Format::Parallels, 2048, 509, |img| {
            // A cluster cut short is an error, never a panic or a short read.
            let _ = read_guest(&img);
        });
    }
}

/// `fixtures/hostile/parallels/*` and the code each must produce (see the README there).
#[test]
fn hostile_fixtures_give_their_codes() {
    let dir = fixtures().join("hostile/parallels");
    let cases = [
        ("bat-past-eof.parallels", "parallels.cluster-past-eof"),
        ("truncated.parallels", "parallels.truncated"),
        (
            "cluster-in-header.parallels",
            "parallels.cluster-in-metadata",
        ),
        ("duplicate-cluster.parallels", "parallels.duplicate-cluster"),
        ("fat-bytes-mbr.parallels", "format.ambiguous"),
        ("fat-bytes-gpt.parallels", "format.ambiguous"),
        ("bat-too-large.parallels", "table.too-large"),
        ("in-use.parallels", "parallels.dirty"),
        ("cluster-size-zero.parallels", "parallels.cluster-size"),
        ("version-1.parallels", "parallels.header"),
        ("data-offset-in-bat.parallels", "parallels.data-offset"),
        ("unknown-extension.parallels", "parallels.unknown-extension"),
        ("extension-bad-checksum.parallels", "parallels.extension"),
        ("extension-over-bat.parallels", "parallels.metadata-overlap"),
        ("DiskDescriptor.xml", "parallels.descriptor"),
        (
            "descriptor-after-doctype-and-comment.xml",
            "parallels.descriptor",
        ),
        ("descriptor-utf16.xml", "parallels.descriptor"),
    ];
    let mut seen = 0;
    for (name, code) in cases {
        let path = dir.join(name);
        assert!(
            std::fs::metadata(&path).unwrap().len() < 64 * 1024,
            "{name}"
        );
        let s = src(&path);
        assert_eq!(
            detect(s.as_ref()).unwrap().matches,
            [Format::Parallels],
            "{name}"
        );
        let report = inspect_as(s, Format::Parallels, &Limits::default());
        assert_eq!(report.verdict(), Verdict::Reject, "{name}");
        assert!(
            report.findings.iter().any(|f| f.code == code),
            "{name}: {:?}",
            report.findings
        );
        // Readers never panic on them, whatever the verdict.
        if let Ok(img) = open(src(&path), Format::Parallels, &Limits::tight()) {
            let img: Arc<dyn Image> = Arc::from(img);
            let r = GuestReader::new(img.clone(), &Limits::tight());
            let mut buf = vec![0u8; img.info().virtual_size.min(1 << 20) as usize];
            let _ = r.read_at(&mut buf, 0);
        }
        seen += 1;
    }
    let on_disk = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            let n = e.as_ref().unwrap().file_name();
            let n = n.to_string_lossy();
            n.ends_with(".parallels") || n.ends_with(".xml")
        })
        .count();
    assert_eq!(seen, on_disk, "every hostile file has a case");
    // Behind any XML prolog, in UTF-16 too, the rejection names the file the descriptor lists.
    for name in [
        "descriptor-after-doctype-and-comment.xml",
        "descriptor-utf16.xml",
    ] {
        let e = open(src(&dir.join(name)), Format::Parallels, &Limits::default())
            .err()
            .unwrap();
        assert!(e.message().contains("root.hds"), "{name}: {}", e.message());
    }
    // The descriptor's rejection names the file it lists.
    let e = open(
        src(&dir.join("DiskDescriptor.xml")),
        Format::Parallels,
        &Limits::default(),
    )
    .err()
    .unwrap();
    assert!(e.message().contains("root.hds"), "{}", e.message());
}
