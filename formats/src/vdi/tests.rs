//! Unit tests: hand-built images, one field mutated per test.

use std::sync::Arc;

use super::*;
use crate::error::ErrorKind;
use crate::reader::GuestReader;

const MIB: u64 = 1 << 20;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// A VDI laid out as qemu-img lays it out. `map` is the block map; data block `n` is filled
/// with `n + 1`.
fn build(disk_size: u64, map: &[u32], image_type: u32) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[..40].copy_from_slice(b"<<< Oracle VM VirtualBox Disk Image >>>\n");
    put32(&mut b, 64, SIGNATURE);
    put32(&mut b, 68, VERSION_1_1);
    put32(&mut b, 72, 0x180);
    put32(&mut b, 76, image_type);
    let bmap_len = (map.len() * 4).div_ceil(512) * 512;
    put32(&mut b, 340, 512);
    put32(&mut b, 344, 512 + bmap_len as u32);
    put32(&mut b, 360, 512);
    b[368..376].copy_from_slice(&disk_size.to_le_bytes());
    put32(&mut b, 376, BLOCK_SIZE);
    put32(&mut b, 384, map.len() as u32);
    let allocated = map.iter().filter(|&&e| e < ZERO).count();
    put32(&mut b, 388, allocated as u32);
    b[392] = 1;
    let mut m = vec![0u8; bmap_len];
    for (i, e) in map.iter().enumerate() {
        put32(&mut m, i * 4, *e);
    }
    b.extend(m);
    let max = map
        .iter()
        .filter(|&&e| e < ZERO)
        .max()
        .map_or(0, |&e| e + 1);
    for n in 0..max {
        b.extend(std::iter::repeat_n(n as u8 + 1, MIB as usize));
    }
    b
}

fn open_bytes(b: &[u8]) -> Result<VdiImage> {
    open(Arc::new(b.to_vec()), &Limits::default())
}

fn codes(f: &[Finding]) -> Vec<&'static str> {
    f.iter().map(|f| f.code).collect()
}

#[test]
fn maps_coalesces_and_reads() {
    let map = [0, 1, UNALLOCATED, UNALLOCATED, ZERO, 2, 4, 3];
    let mut b = build(8 * MIB - 512 + 100, &map, TYPE_DYNAMIC);
    put32(&mut b, 388, 5);
    b.extend(std::iter::repeat_n(5u8, MIB as usize)); // block 4
    let img = open_bytes(&b).unwrap();
    assert!(crate::detect::detect(&b).unwrap().matches == [Format::Vdi]);
    assert_eq!(
        img.info().virtual_size,
        8 * MIB,
        "odd sizes round up to a sector, as in QEMU"
    );
    assert_eq!(img.info().details["image-type"], "dynamic");
    assert!(img.findings().is_empty());
    assert!(img.check(&Limits::default()).unwrap().is_empty());
    let mut pos = 0;
    let mut ext = Vec::new();
    while pos < img.info().virtual_size {
        let e = (&img as &dyn Image).mapping(pos, u64::MAX).unwrap();
        crate::image::validate_extent(&e, pos, u64::MAX, 8 * MIB).unwrap();
        pos = e.end();
        ext.push((e.len / MIB, e.kind));
    }
    let data = 1024;
    assert_eq!(
        ext,
        [
            (2, ExtentKind::Data { host: data }),
            (2, ExtentKind::Unallocated),
            (1, ExtentKind::Zero),
            (
                1,
                ExtentKind::Data {
                    host: data + 2 * MIB
                }
            ),
            (
                1,
                ExtentKind::Data {
                    host: data + 4 * MIB
                }
            ),
            (
                1,
                ExtentKind::Data {
                    host: data + 3 * MIB
                }
            ),
        ]
    );
    let e = (&img as &dyn Image).mapping(MIB + 5, 7).unwrap();
    assert_eq!(
        (e.len, e.kind),
        (
            7,
            ExtentKind::Data {
                host: data + MIB + 5
            }
        )
    );
    let img: Arc<dyn Image> = Arc::new(img);
    let r = GuestReader::new(img, &Limits::default());
    let mut buf = vec![0u8; 8 * MIB as usize];
    r.read_at(&mut buf, 0).unwrap();
    let at = |m: u64| buf[(m * MIB) as usize];
    assert_eq!(
        [at(0), at(1), at(2), at(4), at(5), at(6), at(7)],
        [1, 2, 0, 0, 3, 5, 4]
    );
}

#[test]
fn static_image_reports_its_type() {
    let b = build(2 * MIB, &[0, 1], TYPE_STATIC);
    let img = open_bytes(&b).unwrap();
    assert_eq!(img.info().details["image-type"], "static");
    assert_eq!(img.info().cluster_size, Some(MIB));
}

#[test]
fn block_past_the_end_is_refused() {
    // A bad entry is a check finding and a mapping error, not an open error: info and the
    // readable blocks still work (docs/findings.md, "Open error or check finding").
    let mut b = build(2 * MIB, &[0, UNALLOCATED], TYPE_DYNAMIC);
    put32(&mut b, 516, 7);
    let img = open_bytes(&b).unwrap();
    let f = img.check(&Limits::default()).unwrap();
    assert_eq!(codes(&f)[0], "vdi.block-out-of-range");
    assert_eq!(f[0].offset, Some(516));
    assert!(img.extent_at(0, MIB).is_ok());
    let e = img.extent_at(MIB, MIB).err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code(), e.offset()),
        (ErrorKind::Corrupt, "vdi.block-out-of-range", Some(516))
    );
    // A run of contiguous blocks stops before the one past the end.
    let mut b = build(2 * MIB, &[0, 1], TYPE_DYNAMIC);
    b.truncate(b.len() - 4096);
    let img = open_bytes(&b).unwrap();
    assert_eq!(img.extent_at(0, 2 * MIB).unwrap().len, MIB);
    assert!(img.extent_at(MIB, MIB).is_err());
    assert!(codes(&img.check(&Limits::default()).unwrap()).contains(&"vdi.block-out-of-range"));
}

#[test]
fn block_beyond_the_allocated_count_is_found_by_check() {
    let mut b = build(2 * MIB, &[0, 1], TYPE_DYNAMIC);
    put32(&mut b, 388, 1);
    let img = open_bytes(&b).unwrap();
    let c = codes(&img.check(&Limits::default()).unwrap());
    assert_eq!(c, ["vdi.block-out-of-range", "vdi.header"]);
}

#[test]
fn duplicate_blocks_are_found_by_check() {
    let mut b = build(2 * MIB, &[0, 1], TYPE_DYNAMIC);
    put32(&mut b, 516, 0);
    put32(&mut b, 388, 2);
    let img = open_bytes(&b).unwrap();
    assert_eq!(
        codes(&img.check(&Limits::default()).unwrap()),
        ["vdi.duplicate-block"]
    );
}

#[test]
fn check_findings_are_capped_per_code() {
    // Twenty entries share data block 0: nineteen duplicates, sixteen kept and one summary.
    let b = build(20 * MIB, &[0; 20], TYPE_DYNAMIC);
    let found = open_bytes(&b).unwrap().check(&Limits::default()).unwrap();
    assert_eq!(found.len(), crate::finding::PER_CODE + 1);
    assert!(found.iter().all(|f| f.code == "vdi.duplicate-block"));
    assert_eq!(
        found.last().unwrap().message,
        "3 more like this (19 in all)"
    );
}

#[test]
fn header_fields_qemu_refuses_are_refused() {
    for (at, v) in [
        (68usize, 0x0001_0000u32),
        (376, 4096),
        (360, 4096),
        (340, 100),
        (344, 1000),
        (380, 512),
        (76, 9),
    ] {
        let mut b = build(MIB, &[0], TYPE_DYNAMIC);
        put32(&mut b, at, v);
        let e = open_bytes(&b).err().unwrap();
        assert_eq!(
            (e.kind(), e.finding_code()),
            (ErrorKind::Unsupported, "vdi.header"),
            "field at {at}"
        );
    }
    let mut b = build(MIB, &[0], TYPE_DYNAMIC);
    b[368..376].copy_from_slice(&(2 * MIB).to_le_bytes());
    assert_eq!(open_bytes(&b).err().unwrap().finding_code(), "vdi.header");
    // An overlapping data area opens but is rejected.
    let mut b = build(MIB, &[0], TYPE_DYNAMIC);
    put32(&mut b, 344, 512);
    assert_eq!(codes(open_bytes(&b).unwrap().findings()), ["vdi.header"]);
    let mut b = build(MIB, &[0], TYPE_DYNAMIC);
    b[64] ^= 1;
    assert_eq!(open_bytes(&b).err().unwrap().kind(), ErrorKind::Invalid);
}

#[test]
fn an_empty_block_map_overlaps_no_data_area() {
    // No blocks: the map takes no bytes, so a data area starting before its offset and
    // reaching past it overlaps nothing (glimpse before the RegionIndex said it did).
    let mut b = build(0, &[], TYPE_DYNAMIC);
    b.resize(1024, 0);
    put32(&mut b, 340, 1024);
    assert_eq!(codes(open_bytes(&b).unwrap().findings()), [] as [&str; 0]);
    // One entry, the data area over it: still rejected.
    let mut b = build(MIB, &[UNALLOCATED], TYPE_DYNAMIC);
    put32(&mut b, 344, 0);
    assert_eq!(codes(open_bytes(&b).unwrap().findings()), ["vdi.header"]);
}

#[test]
fn differencing_images_are_reported() {
    let mut b = build(MIB, &[UNALLOCATED], TYPE_DIFF);
    b[424..440].copy_from_slice(&[
        0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 1, 2, 3, 4, 5, 6,
    ]);
    let img = open_bytes(&b).unwrap();
    assert_eq!(codes(img.findings()), ["vdi.differencing"]);
    assert_eq!(
        img.info().references[0].target,
        "uuid:00112233-4455-6677-8899-010203040506"
    );
    assert!(img.findings()[0]
        .message
        .contains("over parent image 00112233-4455-6677-8899-010203040506:"));
    // A normal type with a parent UUID is differencing too; the message names that UUID,
    // not the nil link UUID (report: "vdi_parent_uuid.vdi").
    let mut b = build(MIB, &[UNALLOCATED], TYPE_DYNAMIC);
    b[440..456].copy_from_slice(&[0x22; 16]);
    let img = open_bytes(&b).unwrap();
    assert_eq!(codes(img.findings()), ["vdi.differencing"]);
    let f = &img.findings()[0];
    assert!(
        f.message
            .contains("parent UUID 22222222-2222-2222-2222-222222222222"),
        "{}",
        f.message
    );
    assert!(!f.message.contains("00000000-0000"), "{}", f.message);
    assert_eq!(f.offset, Some(440));
    assert_eq!(
        img.info().references[0].target,
        "uuid:22222222-2222-2222-2222-222222222222"
    );
}

#[test]
fn block_map_is_range_checked() {
    let mut b = build(MIB, &[0], TYPE_DYNAMIC);
    put32(&mut b, 340, 1 << 30);
    assert_eq!(
        open_bytes(&b).err().unwrap().finding_code(),
        "table.out-of-bounds"
    );
    // 800 KB of map: above the tight limits' 512 KiB per table.
    let mut b = build(MIB, &[0], TYPE_DYNAMIC);
    put32(&mut b, 384, 200_000);
    let e = open(Arc::new(b), &Limits::tight()).err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::LimitExceeded, "table.too-large")
    );
}

#[test]
fn block_counts_follow_qemu_then_the_byte_cap() {
    // 5 Mi blocks (a 5 TiB disk, which qemu opens) pass the table cap: the map is only
    // range-checked against the file.
    let mut b = build(MIB, &[0], TYPE_DYNAMIC);
    put32(&mut b, 384, 5 << 20);
    assert_eq!(
        open_bytes(&b).err().unwrap().finding_code(),
        "table.out-of-bounds"
    );
    // More than 128 MiB of map: qemu would open it, glimpse refuses it before reading.
    put32(&mut b, 384, (32 << 20) + 1);
    let e = open_bytes(&b).err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::LimitExceeded, "table.too-large")
    );
    // Past qemu's VDI_BLOCKS_IN_IMAGE_MAX: refused as qemu refuses it.
    put32(&mut b, 384, MAX_BLOCKS + 1);
    let e = open_bytes(&b).err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::Unsupported, "vdi.header")
    );
}

#[test]
fn every_prefix_fails_cleanly() {
    let b = build(3 * MIB, &[1, UNALLOCATED, 0], TYPE_DYNAMIC);
    let mut n = 0;
    while n < b.len() {
        if let Ok(img) = open_bytes(&b[..n]) {
            // A prefix that cuts a block opens; check rejects it and the read refuses it.
            let cut =
                codes(&img.check(&Limits::default()).unwrap()).contains(&"vdi.block-out-of-range");
            let img: Arc<dyn Image> = Arc::new(img);
            let r = GuestReader::new(img.clone(), &Limits::default());
            let mut buf = vec![0u8; img.info().virtual_size as usize];
            assert_eq!(r.read_at(&mut buf, 0).is_err(), cut, "prefix of {n} bytes");
        }
        n += if n < 4096 { 1 } else { 4093 };
    }
}
