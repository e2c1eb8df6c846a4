//! Unit tests: hand-built images, one field mutated per test.

use std::sync::Arc;

use md5::{Digest, Md5};

use super::header::{EXT_MAGIC, FEATURE_DIRTY_BITMAP};
use super::*;
use crate::error::ErrorKind;
use crate::reader::GuestReader;

const CS: usize = 4096;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A `WithouFreSpacExt` image with 4 KiB clusters laid out as qemu-img lays it out: `bat`
/// in clusters, data cluster `k` (counted from the file start) filled with `k`.
fn build(bat: &[u32], sectors: u64) -> Vec<u8> {
    let data_off = (64 + 4 * bat.len()).div_ceil(CS) * CS;
    let mut b = vec![0u8; data_off];
    b[..16].copy_from_slice(MAGIC_EXT);
    put32(&mut b, 16, 2);
    put32(&mut b, 20, 16);
    put32(&mut b, 28, (CS / 512) as u32);
    put32(&mut b, 32, bat.len() as u32);
    put64(&mut b, 36, sectors);
    put32(&mut b, 48, (data_off / 512) as u32);
    for (i, e) in bat.iter().enumerate() {
        put32(&mut b, 64 + 4 * i, *e);
    }
    let last = bat.iter().copied().max().unwrap_or(0) as usize;
    for k in data_off / CS..=last {
        b.extend(std::iter::repeat_n(k as u8, CS));
    }
    b
}

fn open_bytes(b: &[u8]) -> Result<ParallelsImage> {
    open(Arc::new(b.to_vec()), &Limits::default())
}

fn codes(f: &[Finding]) -> Vec<&'static str> {
    f.iter().map(|f| f.code).collect()
}

fn read_all(img: ParallelsImage) -> Vec<u8> {
    let size = img.info().virtual_size as usize;
    let r = GuestReader::new(Arc::new(img), &Limits::default());
    let mut v = vec![0xEEu8; size];
    r.read_at(&mut v, 0).unwrap();
    v
}

#[test]
fn maps_coalesces_and_reads() {
    let b = build(&[1, 2, 0, 0, 4, 3], 6 * 8 + 3);
    assert_eq!(
        crate::detect::detect(&b).unwrap().matches,
        [Format::Parallels]
    );
    let img = open_bytes(&b).unwrap();
    assert_eq!(img.info().virtual_size, (6 * 8 + 3) * 512);
    assert_eq!(img.info().cluster_size, Some(CS as u64));
    assert_eq!(img.info().dirty, Some(false));
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    assert!(img.check(&Limits::default()).unwrap().is_empty());
    let mut pos = 0;
    let mut ext = Vec::new();
    while pos < img.info().virtual_size {
        let e = (&img as &dyn Image).mapping(pos, u64::MAX).unwrap();
        crate::image::validate_extent(&e, pos, u64::MAX, img.info().virtual_size).unwrap();
        pos = e.end();
        ext.push((e.len, e.kind));
    }
    let cs = CS as u64;
    assert_eq!(
        ext,
        [
            (2 * cs, ExtentKind::Data { host: cs }),
            (2 * cs, ExtentKind::Unallocated),
            (cs, ExtentKind::Data { host: 4 * cs }),
            (cs, ExtentKind::Data { host: 3 * cs }),
            // nb_sectors passes the BAT: qemu reads the rest as zeros.
            (3 * 512, ExtentKind::Unallocated),
        ]
    );
    let e = (&img as &dyn Image).mapping(cs + 5, 10).unwrap();
    assert_eq!((e.len, e.kind), (10, ExtentKind::Data { host: 2 * cs + 5 }));
    let v = read_all(img);
    let want: Vec<u8> = [1u8, 2, 0, 0, 4, 3]
        .iter()
        .flat_map(|&k| std::iter::repeat_n(k, CS))
        .chain(std::iter::repeat_n(0, 3 * 512))
        .collect();
    assert!(v == want);
}

#[test]
fn old_magic_counts_the_bat_in_sectors_and_the_size_in_32_bits() {
    let mut b = build(&[0, 0], 16);
    b[..16].copy_from_slice(MAGIC_V1);
    put32(&mut b, 48, 0); // data_off 0: right after the BAT
    put64(&mut b, 36, (1 << 32) | 16);
    // Guest cluster 1 at sector 10: the data area starts at sector 1 (after the BAT), so this
    // is off the cluster grid, which qemu reads anyway.
    put32(&mut b, 68, 10);
    b.resize(10 * 512 + CS, 7);
    let img = open_bytes(&b).unwrap();
    assert_eq!(img.info().virtual_size, 16 * 512);
    assert_eq!(img.info().details["subformat"], "WithoutFreeSpace");
    let e = (&img as &dyn Image).mapping(CS as u64, u64::MAX).unwrap();
    assert_eq!(e.kind, ExtentKind::Data { host: 10 * 512 });
    let f = img.check(&Limits::default()).unwrap();
    assert_eq!(codes(&f), ["parallels.cluster-misaligned"]);
}

#[test]
fn header_fields_qemu_refuses_are_refused() {
    let good = build(&[1], 8);
    let cases: [(usize, u32, &str, ErrorKind); 3] = [
        (16, 1, "parallels.header", ErrorKind::Unsupported),
        (28, 0, "parallels.cluster-size", ErrorKind::Unsupported),
        (
            28,
            MAX_TRACKS + 1,
            "parallels.cluster-size",
            ErrorKind::Unsupported,
        ),
    ];
    for (at, v, code, kind) in cases {
        let mut b = good.clone();
        put32(&mut b, at, v);
        let e = open_bytes(&b).err().unwrap();
        assert_eq!((e.finding_code(), e.kind()), (code, kind), "{at} {v}");
    }
    let mut b = good.clone();
    put32(&mut b, 32, MAX_BAT_ENTRIES + 1);
    assert_eq!(
        open_bytes(&b).err().unwrap().finding_code(),
        "table.too-large"
    );
    let mut b = good.clone();
    put32(&mut b, 32, 1 << 20);
    let e = open(Arc::new(b.clone()), &Limits::tight()).err().unwrap();
    assert_eq!(e.finding_code(), "table.too-large");
    assert_eq!(
        open_bytes(&b).err().unwrap().finding_code(),
        "table.out-of-bounds"
    );
    for n in 0..64 {
        assert!(open_bytes(&good[..n]).is_err(), "prefix {n}");
    }
}

#[test]
fn in_use_and_data_offset_are_findings() {
    let mut b = build(&[1], 8);
    put32(&mut b, 44, INUSE_OPEN);
    let img = open_bytes(&b).unwrap();
    assert_eq!(codes(img.findings()), ["parallels.dirty"]);
    assert_eq!(img.info().dirty, Some(true));
    let mut b = build(&[1], 8);
    put32(&mut b, 48, 1);
    assert_eq!(
        codes(open_bytes(&b).unwrap().findings()),
        ["parallels.data-offset"]
    );
}

#[test]
fn clusters_outside_the_file_are_refused() {
    let mut b = build(&[1, 2], 16);
    put32(&mut b, 68, 40);
    let img = open_bytes(&b).unwrap();
    assert_eq!(codes(img.findings()), ["parallels.cluster-past-eof"]);
    let e = (&img as &dyn Image).mapping(CS as u64, 1).err().unwrap();
    assert_eq!(e.finding_code(), "parallels.cluster-past-eof");
    let mut b = build(&[1, 2], 16);
    b.truncate(b.len() - 100);
    let img = open_bytes(&b).unwrap();
    assert_eq!(codes(img.findings()), ["parallels.truncated"]);
}

#[test]
fn check_finds_shared_and_misplaced_clusters() {
    let b = build(&[1, 2, 1], 24);
    let f = open_bytes(&b).unwrap().check(&Limits::default()).unwrap();
    assert_eq!(codes(&f), ["parallels.duplicate-cluster"]);
    // A WithouFreSpacExt entry can only point into the header as cluster 0... which is
    // "unallocated"; the old magic can point at sector 0.
    let mut b = build(&[0, 2], 16);
    b[..16].copy_from_slice(MAGIC_V1);
    put32(&mut b, 48, 8);
    put32(&mut b, 64, 1);
    put32(&mut b, 68, 16);
    let f = open_bytes(&b).unwrap().check(&Limits::default()).unwrap();
    assert_eq!(codes(&f), ["parallels.cluster-in-metadata"]);
}

/// A format extension cluster with the given features (magic, data), checksummed.
fn extension(features: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut c = vec![0u8; CS];
    put64(&mut c, 0, EXT_MAGIC);
    let mut pos = 24;
    for (magic, data) in features {
        put64(&mut c, pos, *magic);
        put32(&mut c, pos + 16, data.len() as u32);
        c[pos + 24..pos + 24 + data.len()].copy_from_slice(data);
        pos += 24 + data.len().div_ceil(8) * 8;
    }
    seal(&mut c);
    c
}

/// Writes the extension cluster's checksum, after a test has edited it.
fn seal(ext: &mut [u8]) {
    let sum = Md5::digest(&ext[24..]);
    ext[8..24].copy_from_slice(&sum);
}

fn bitmap(sectors: u64, l1: &[u64]) -> Vec<u8> {
    let mut d = vec![0u8; 32];
    put64(&mut d, 0, sectors);
    d[8..24].copy_from_slice(&[0x11; 16]);
    put32(&mut d, 24, 8);
    put32(&mut d, 28, l1.len() as u32);
    for e in l1 {
        d.extend(e.to_le_bytes());
    }
    d
}

fn with_extension(ext: Vec<u8>) -> Vec<u8> {
    let mut b = build(&[1, 2], 16);
    let at = b.len();
    put64(&mut b, 56, (at / 512) as u64);
    b.extend(ext);
    b
}

#[test]
fn the_format_extension_is_read_and_checked() {
    // A dirty bitmap with one cluster of bits, placed after the extension cluster.
    let mut b = with_extension(extension(&[(FEATURE_DIRTY_BITMAP, bitmap(16, &[0]))]));
    let img = open_bytes(&b).unwrap();
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    assert_eq!(img.bitmaps().len(), 1);
    assert_eq!(img.info().details["dirty-bitmaps"], 1);
    assert!(img.check(&Limits::default()).unwrap().is_empty());
    // Its cluster placed on a data cluster.
    b = with_extension(extension(&[(FEATURE_DIRTY_BITMAP, bitmap(16, &[8]))]));
    let f = open_bytes(&b).unwrap().check(&Limits::default()).unwrap();
    assert_eq!(codes(&f), ["parallels.cluster-in-metadata"]);
    // Wrong size, unknown feature, bad checksum, cluster past the end.
    b = with_extension(extension(&[(FEATURE_DIRTY_BITMAP, bitmap(17, &[0]))]));
    assert_eq!(
        codes(open_bytes(&b).unwrap().findings()),
        ["parallels.extension"]
    );
    b = with_extension(extension(&[(0x1234, vec![1, 2, 3])]));
    assert_eq!(
        codes(open_bytes(&b).unwrap().findings()),
        ["parallels.unknown-extension"]
    );
    let n = b.len();
    b[n - 1] ^= 1;
    assert_eq!(
        codes(open_bytes(&b).unwrap().findings()),
        ["parallels.extension"]
    );
    b.truncate(n - 1);
    assert_eq!(
        codes(open_bytes(&b).unwrap().findings()),
        ["parallels.extension"]
    );
}

#[test]
fn a_ploop_descriptor_is_detected_and_refused_naming_its_files() {
    let xml = b"<?xml version='1.0' encoding='UTF-8'?>\n<Parallels_disk_image Version=\"1.0\">\n  <StorageData><Storage><Image><File>root.hds</File></Image><Image><File>/etc/shadow</File></Image></Storage></StorageData>\n</Parallels_disk_image>\n";
    assert_eq!(
        crate::detect::detect(&xml.to_vec()).unwrap().matches,
        [Format::Parallels]
    );
    let e = open_bytes(xml).err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::Unsafe, "parallels.descriptor")
    );
    assert!(
        e.message().contains("root.hds, /etc/shadow"),
        "{}",
        e.message()
    );
    // Some other XML is not a descriptor.
    assert!(!is_descriptor(
        b"<?xml version='1.0'?><a><Parallels_disk_image/></a>"
    ));
    assert!(crate::detect::detect(&b"WithoutFreeSpac".to_vec())
        .unwrap()
        .matches
        .is_empty());
    assert!(!crate::unsupported::is_unsupported(Format::Parallels));
}

#[test]
fn descriptor_names_are_bounded_and_a_bom_is_allowed() {
    let mut xml = b"\xEF\xBB\xBF  <Parallels_disk_image>".to_vec();
    for i in 0..40 {
        xml.extend(format!("<File>d{i}.hds</File>").bytes());
    }
    assert!(is_descriptor(&xml));
    let names = descriptor_files(&xml);
    assert_eq!(names.len(), MAX_NAMES);
    assert_eq!(names[0], "d0.hds");
    let e = open_bytes(b"<Parallels_disk_image></Parallels_disk_image>")
        .err()
        .unwrap();
    assert!(e.message().contains("no image file"), "{}", e.message());
    // Not a descriptor: the root element after other text.
    assert!(!is_descriptor(b"hello <Parallels_disk_image>"));
    // Report F5: an XML parser skips any prolog, so detection does too (prolog.rs has the
    // cases); a prolog longer than the 64 KiB window is refused rather than called raw.
    let mut far = vec![b' '; 2000];
    far.extend(b"<Parallels_disk_image>");
    assert!(is_descriptor(&far));
    let mut long = b"<?xml version='1.0'?><!--".to_vec();
    long.resize(DESCRIPTOR_SEARCH, b'x');
    assert!(is_descriptor(&long));
    assert!(!is_descriptor(&long[..1000]));
    // Report refs-diff F6: whitespace alone is no XML (qemu calls it raw).
    for ws in [
        vec![b' '; 1 << 20],
        vec![b'\n'; 70_000],
        vec![b'\t'; DESCRIPTOR_SEARCH],
    ] {
        assert!(!is_descriptor(&ws));
        assert!(crate::detect::detect(&ws).unwrap().matches.is_empty());
    }
    assert_eq!(
        open_bytes(b"not an image at all").err().unwrap().kind(),
        ErrorKind::Invalid
    );
}

#[test]
fn extension_feature_flags_and_walks_are_bounded() {
    // A feature with flags set, and one whose data passes the cluster.
    let edits: [fn(&mut [u8]); 2] = [
        |ext| put64(ext, 24 + 8, 1),
        |ext| put32(ext, 24 + 16, u32::MAX),
    ];
    for edit in edits {
        let mut ext = extension(&[(FEATURE_DIRTY_BITMAP, bitmap(16, &[]))]);
        edit(&mut ext);
        seal(&mut ext);
        let b = with_extension(ext);
        assert_eq!(
            codes(open_bytes(&b).unwrap().findings()),
            ["parallels.extension"]
        );
    }
    // A cluster of nothing but non-zero feature headers with no data ends without a marker.
    let mut c = vec![0u8; CS];
    for at in (24..CS - 23).step_by(24) {
        put64(&mut c, at, 0x77);
    }
    assert_eq!(
        header::features(&c).err().unwrap().finding_code(),
        "parallels.extension"
    );
}
