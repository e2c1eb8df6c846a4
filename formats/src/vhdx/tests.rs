//! One test per finding: each takes a qemu-img-made image and mutates one field.

use std::process::Command;
use std::sync::Arc;

use super::*;
use crate::error::ErrorKind;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed for these tests");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qemu-img-made VHDX of `size` bytes holding `data` at the given guest offsets.
fn make(size: u64, opts: &str, data: &[(u64, &[u8])]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    let out = dir.path().join("out.vhdx");
    let mut img = vec![0u8; usize::try_from(size).unwrap()];
    for (off, d) in data {
        let o = usize::try_from(*off).unwrap();
        img[o..o + d.len()].copy_from_slice(d);
    }
    std::fs::write(&raw, &img).unwrap();
    let mut args = vec!["convert", "-f", "raw", "-O", "vhdx"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([raw.to_str().unwrap(), out.to_str().unwrap()]);
    qemu_img(&args);
    std::fs::read(out).unwrap()
}

fn small() -> Vec<u8> {
    make(
        4 << 20,
        "block_size=1M",
        &[(0, &[0xab; 5000]), (2 << 20, &[0xcd; 100])],
    )
}

fn open_v(v: Vec<u8>) -> Result<VhdxImage> {
    open(Arc::new(v), &Limits::default())
}

fn codes(img: &VhdxImage) -> Vec<(&'static str, crate::finding::Severity)> {
    img.findings()
        .iter()
        .map(|f| (f.code, f.severity))
        .collect()
}

fn err_code(r: Result<VhdxImage>) -> (ErrorKind, &'static str) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => (e.kind(), e.finding_code()),
    }
}

fn put32(v: &mut [u8], at: u64, x: u32) {
    let a = usize::try_from(at).unwrap();
    v[a..a + 4].copy_from_slice(&x.to_le_bytes());
}
fn put64(v: &mut [u8], at: u64, x: u64) {
    let a = usize::try_from(at).unwrap();
    v[a..a + 8].copy_from_slice(&x.to_le_bytes());
}
fn get32(v: &[u8], at: u64) -> u32 {
    let a = usize::try_from(at).unwrap();
    u32::from_le_bytes(v[a..a + 4].try_into().unwrap())
}
fn get64(v: &[u8], at: u64) -> u64 {
    let a = usize::try_from(at).unwrap();
    u64::from_le_bytes(v[a..a + 8].try_into().unwrap())
}

/// Recomputes the CRC-32C of the `len`-byte structure at `at`.
fn fix_crc(v: &mut [u8], at: u64, len: usize) {
    let a = usize::try_from(at).unwrap();
    let c = header::checksum(&v[a..a + len], 4);
    put32(v, at + 4, c);
}
fn fix_headers(v: &mut [u8]) {
    fix_crc(v, HEADER1_OFFSET, HEADER_SIZE);
    fix_crc(v, HEADER2_OFFSET, HEADER_SIZE);
}
fn fix_regions(v: &mut [u8]) {
    fix_crc(v, REGION1_OFFSET, REGION_TABLE_SIZE);
    fix_crc(v, REGION2_OFFSET, REGION_TABLE_SIZE);
}
/// Applies `f` to both region tables and fixes their checksums.
fn both_regions(v: &mut [u8], f: impl Fn(&mut [u8], u64)) {
    f(v, REGION1_OFFSET);
    f(v, REGION2_OFFSET);
    fix_regions(v);
}

/// (BAT offset, metadata region offset) from region table 1 (qemu writes BAT first).
fn regions_of(v: &[u8]) -> (u64, u64) {
    (
        get64(v, REGION1_OFFSET + 16 + 16),
        get64(v, REGION1_OFFSET + 48 + 16),
    )
}

/// Source offset of the metadata item `id`.
fn item_at(v: &[u8], id: header::Guid) -> u64 {
    let (_, md) = regions_of(v);
    let count = u64::from(u16::from_le_bytes([
        v[md as usize + 10],
        v[md as usize + 11],
    ]));
    for i in 0..count {
        let e = md + 32 + 32 * i;
        if v[e as usize..e as usize + 16] == id {
            return md + u64::from(get32(v, e + 16));
        }
    }
    panic!("no such item");
}

#[test]
fn probe_and_open_a_qemu_image() {
    let v = small();
    let p = Probe::new(&v).unwrap();
    assert!(probe(&p));
    let img = open_v(v).unwrap();
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    let i = img.info();
    assert_eq!(i.virtual_size, 4 << 20);
    assert_eq!(i.cluster_size, Some(1 << 20));
    assert_eq!(i.details["log-state"], "empty");
    assert_eq!(i.details["logical-sector-size"], 512);
    assert_eq!(i.details["leave-blocks-allocated"], false);
    assert!(i.details["creator"].as_str().unwrap().starts_with("QEMU"));
    let e = (&img as &dyn Image).mapping(0, u64::MAX).unwrap();
    assert!(matches!(e.kind, ExtentKind::Data { .. }));
    assert_eq!(e.len, 1 << 20);
    let e = (&img as &dyn Image).mapping(1 << 20, u64::MAX).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Zero, 1 << 20));
    assert!(!probe(&Probe::new(&vec![0u8; 4096]).unwrap()));
}

#[test]
fn header_checksum_one_bad_warns_both_bad_rejects() {
    let mut v = small();
    v[usize::try_from(HEADER1_OFFSET).unwrap() + 100] ^= 1;
    let img = open_v(v.clone()).unwrap();
    assert_eq!(
        codes(&img),
        vec![("vhdx.header-checksum", crate::finding::Severity::Warn)]
    );
    v[usize::try_from(HEADER2_OFFSET).unwrap() + 100] ^= 1;
    assert_eq!(
        err_code(open_v(v)),
        (ErrorKind::Corrupt, "vhdx.header-checksum")
    );
}

#[test]
fn higher_sequence_header_wins() {
    let mut v = small();
    // Header 1 gets the higher sequence and a log offset that would clash with the BAT.
    let s2 = get64(&v, HEADER2_OFFSET + 8);
    put64(&mut v, HEADER1_OFFSET + 8, s2 + 1);
    let (bat, _) = regions_of(&v);
    put64(&mut v, HEADER1_OFFSET + 72, bat);
    fix_headers(&mut v);
    assert_eq!(
        err_code(open_v(v)),
        (ErrorKind::Corrupt, "vhdx.region-table")
    );
}

#[test]
fn region_checksum() {
    let base = small();
    let mut v = base.clone();
    v[usize::try_from(REGION2_OFFSET).unwrap() + 1000] ^= 1;
    let img = open_v(v.clone()).unwrap();
    assert_eq!(
        codes(&img),
        vec![("vhdx.region-checksum", crate::finding::Severity::Warn)]
    );
    let mut v1 = base;
    v1[usize::try_from(REGION1_OFFSET).unwrap() + 1000] ^= 1;
    let img = open_v(v1).unwrap();
    assert_eq!(
        codes(&img),
        vec![("vhdx.region-checksum", crate::finding::Severity::Reject)]
    );
    v[usize::try_from(REGION1_OFFSET).unwrap() + 1000] ^= 1;
    assert_eq!(
        err_code(open_v(v.clone())),
        (ErrorKind::Corrupt, "vhdx.region-checksum")
    );
    // Two valid tables that differ: table 1 wins, with a warning.
    v[usize::try_from(REGION1_OFFSET).unwrap() + 1000] ^= 1;
    fix_regions(&mut v);
    let img = open_v(v).unwrap();
    assert_eq!(
        codes(&img),
        vec![("vhdx.region-table", crate::finding::Severity::Warn)]
    );
}

#[test]
fn unknown_required_region_is_refused() {
    let mut v = small();
    let add = |v: &mut [u8], t: u64, required: u32| {
        put32(v, t + 8, 3);
        let e = t + 16 + 64;
        v[e as usize..e as usize + 16].copy_from_slice(&[0x42; 16]);
        put64(v, e + 16, 7 << 20);
        put32(v, e + 24, 1 << 20);
        put32(v, e + 28, required);
    };
    let mut optional = v.clone();
    both_regions(&mut optional, |v, t| add(v, t, 0));
    // An optional unknown region is ignored (after its placement is checked).
    assert!(open_v(optional).is_ok());
    both_regions(&mut v, |v, t| add(v, t, 1));
    assert_eq!(
        err_code(open_v(v)),
        (ErrorKind::Unsupported, "vhdx.unknown-region")
    );
}

#[test]
fn metadata_items() {
    let base = small();
    let (_, md) = regions_of(&base);
    // Renaming the virtual disk size item (entry 1) makes it missing.
    let mut v = base.clone();
    v[(md + 64) as usize] ^= 0xff;
    v[(md + 64 + 24) as usize] = 0; // not required: ignored
    assert_eq!(err_code(open_v(v)), (ErrorKind::Invalid, "vhdx.metadata"));
    // The same, but flagged required: an unknown required item.
    let mut v = base.clone();
    v[(md + 64) as usize] ^= 0xff;
    assert_eq!(
        err_code(open_v(v)),
        (ErrorKind::Unsupported, "vhdx.metadata")
    );
    // An impossible logical sector size.
    let mut v = base.clone();
    let at = item_at(&v, metadata::LOGICAL_SECTOR_SIZE);
    put32(&mut v, at, 1000);
    assert_eq!(err_code(open_v(v)), (ErrorKind::Invalid, "vhdx.metadata"));
    // An item pointing outside the metadata region.
    let mut v = base;
    put32(&mut v, md + 64 + 16, 0xfff_ffff);
    assert_eq!(err_code(open_v(v)), (ErrorKind::Invalid, "vhdx.metadata"));
}

/// Source offset of the metadata table entry for `id`.
fn entry_at(v: &[u8], id: header::Guid) -> u64 {
    let (_, md) = regions_of(v);
    let count = u64::from(u16::from_le_bytes([
        v[md as usize + 10],
        v[md as usize + 11],
    ]));
    (0..count)
        .map(|i| md + 32 + 32 * i)
        .find(|&e| v[e as usize..e as usize + 16] == id)
        .expect("no such entry")
}

fn overlap_finding(v: Vec<u8>) -> Option<String> {
    let img = open_v(v).unwrap();
    img.findings()
        .iter()
        .find(|f| f.code == "vhdx.metadata-overlap")
        .map(|f| {
            assert_eq!(f.severity, crate::finding::Severity::Reject);
            f.message.clone()
        })
}

#[test]
fn metadata_items_overlap() {
    let base = small();
    let md_len = get32(&base, REGION1_OFFSET + 48 + 24);
    assert_eq!(overlap_finding(base.clone()), None);
    let fp = entry_at(&base, metadata::FILE_PARAMETERS);
    let p83 = entry_at(&base, metadata::PAGE83_DATA);
    // The page 83 item (any 16 bytes are valid) moved onto the file parameters item.
    let mut v = base.clone();
    put32(&mut v, p83 + 16, get32(&base, fp + 16));
    let msg = overlap_finding(v).expect("page 83 over file parameters");
    assert!(
        msg.contains("Page 83 Data") && msg.contains("File Parameters"),
        "{msg}"
    );
    // The lowest item lengthened to reach the next one: every value still reads the same.
    let mut items: Vec<(u32, u64)> = [
        metadata::FILE_PARAMETERS,
        metadata::VIRTUAL_DISK_SIZE,
        metadata::PAGE83_DATA,
        metadata::LOGICAL_SECTOR_SIZE,
        metadata::PHYSICAL_SECTOR_SIZE,
    ]
    .iter()
    .map(|id| {
        let e = entry_at(&base, *id);
        (get32(&base, e + 16), e)
    })
    .collect();
    items.sort_unstable();
    let ((first_off, first), (next_off, _)) = (items[0], items[1]);
    let mut v = base.clone();
    put32(&mut v, first + 20, next_off - first_off + 1);
    assert!(overlap_finding(v).is_some());
    // Items touching end to end do not overlap.
    let mut v = base.clone();
    put32(&mut v, first + 20, next_off - first_off);
    assert_eq!(overlap_finding(v), None);
    // An item inside the metadata table, or running past the region, stays an open error.
    for (off, len) in [(0x100, 16), (0x1_0000 - 8, 16), (md_len - 8, 16)] {
        let mut v = base.clone();
        put32(&mut v, p83 + 16, off);
        put32(&mut v, p83 + 20, len);
        assert_eq!(
            err_code(open_v(v)),
            (ErrorKind::Invalid, "vhdx.metadata"),
            "{off:#x}"
        );
    }
}

#[test]
fn block_size_out_of_range() {
    for bad in [512 << 10, 3 << 20, 512 << 20] {
        let mut v = small();
        let at = item_at(&v, metadata::FILE_PARAMETERS);
        put32(&mut v, at, bad);
        assert_eq!(
            err_code(open_v(v)),
            (ErrorKind::Invalid, "vhdx.block-size"),
            "{bad}"
        );
    }
}

fn set_bat(v: &mut [u8], i: u64, entry: u64) {
    let (bat, _) = regions_of(v);
    put64(v, bat + 8 * i, entry);
}

/// Opens `v` (which must open: bad entries are not open errors) and returns the codes of
/// its `check` findings, each a rejection.
fn check_codes(img: &VhdxImage) -> Vec<&'static str> {
    let found = (img as &dyn Image).check(&Limits::default()).unwrap();
    assert!(found
        .iter()
        .all(|f| f.severity == crate::finding::Severity::Reject));
    found.iter().map(|f| f.code).collect()
}

/// The error `mapping` gives for guest offset `guest`, which must be refused.
fn refused(img: &VhdxImage, guest: u64) -> (ErrorKind, &'static str) {
    let e = (img as &dyn Image).mapping(guest, 1).unwrap_err();
    (e.kind(), e.finding_code())
}

#[test]
fn bat_entry_out_of_bounds() {
    let mut v = small();
    set_bat(&mut v, 1, (1 << 40) | bat::FULLY_PRESENT);
    let img = open_v(v).unwrap();
    assert_eq!(check_codes(&img), ["vhdx.bat-entry-out-of-bounds"]);
    assert_eq!(
        refused(&img, 1 << 20),
        (ErrorKind::Corrupt, "vhdx.bat-entry-out-of-bounds")
    );
    // The good blocks around it still map.
    let m = &img as &dyn Image;
    assert!(matches!(
        m.mapping(0, 1).unwrap().kind,
        ExtentKind::Data { .. }
    ));
    assert!(matches!(
        m.mapping(2 << 20, 1).unwrap().kind,
        ExtentKind::Data { .. }
    ));
    // A run from a good block stops before the bad one.
    let e = m.mapping(0, 4 << 20).unwrap();
    assert_eq!(e.len, 1 << 20);
}

#[test]
fn entry_into_metadata() {
    for target in [0u64, 1 << 20, 2 << 20, 3 << 20] {
        let mut v = small();
        set_bat(&mut v, 1, target | bat::FULLY_PRESENT);
        let img = open_v(v).unwrap();
        assert_eq!(
            check_codes(&img),
            ["vhdx.entry-into-metadata"],
            "{target:#x}"
        );
        assert_eq!(
            refused(&img, 1 << 20),
            (ErrorKind::Corrupt, "vhdx.entry-into-metadata"),
            "{target:#x}"
        );
    }
}

#[test]
fn duplicate_block() {
    let mut v = small();
    let (bat, _) = regions_of(&v);
    let first = get64(&v, bat);
    set_bat(&mut v, 3, first);
    let img = open_v(v).unwrap();
    assert_eq!(check_codes(&img), ["vhdx.duplicate-block"]);
    let f = (&img as &dyn Image).check(&Limits::default()).unwrap();
    // Reported at the later entry.
    assert_eq!(f[0].offset, Some(bat + 24));
    // Both blocks that share bytes are refused; the others still map.
    for guest in [0, 3 << 20] {
        assert_eq!(
            refused(&img, guest),
            (ErrorKind::Corrupt, "vhdx.duplicate-block"),
            "{guest:#x}"
        );
    }
    assert!((&img as &dyn Image).mapping(2 << 20, 1).is_ok());
    // The refusal names the entry's offset.
    let e = (&img as &dyn Image).mapping(3 << 20, 1).unwrap_err();
    assert_eq!(e.offset(), Some(bat + 24));
}

#[test]
fn every_bad_entry_is_reported_in_bat_order() {
    let mut v = small();
    let (bat, _) = regions_of(&v);
    let first = get64(&v, bat);
    set_bat(&mut v, 1, 4);
    set_bat(&mut v, 2, (1 << 40) | bat::FULLY_PRESENT);
    set_bat(&mut v, 3, first);
    let img = open_v(v).unwrap();
    assert_eq!(
        check_codes(&img),
        [
            "vhdx.bat-state",
            "vhdx.bat-entry-out-of-bounds",
            "vhdx.duplicate-block"
        ]
    );
    for (block, code) in [
        (0, "vhdx.duplicate-block"),
        (1, "vhdx.bat-state"),
        (2, "vhdx.bat-entry-out-of-bounds"),
        (3, "vhdx.duplicate-block"),
    ] {
        assert_eq!(refused(&img, block << 20), (ErrorKind::Corrupt, code));
    }
    // Open's own findings do not carry the BAT's.
    assert!(codes(&img).iter().all(|(c, _)| !c.starts_with("vhdx.b")));
}

#[test]
fn bad_entry_findings_are_capped_per_code() {
    let geo = Geometry::new(1 << 20, 512, 40 << 20, false);
    let entries = vec![4u64; 40];
    let found = bat::validate(
        &entries,
        &geo,
        1 << 20,
        40 << 20,
        1 << 30,
        &[],
        &crate::limits::Budget::new(1 << 20),
    )
    .unwrap();
    assert_eq!(found.findings.len(), crate::finding::PER_CODE + 1);
    assert!(found.findings.iter().all(|f| f.code == "vhdx.bat-state"));
    assert!(found.findings[crate::finding::PER_CODE]
        .message
        .contains("24 more"));
    // Every bad entry is still refused, past the cap too.
    assert_eq!(found.bad_code(39), Some("vhdx.bat-state"));
    // The list of bad entries is charged to the budget.
    let e = bat::validate(
        &entries,
        &geo,
        1 << 20,
        40 << 20,
        1 << 30,
        &[],
        &crate::limits::Budget::new(100),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded);
}

#[test]
fn bat_state() {
    for state in [4u64, bat::PARTIALLY_PRESENT] {
        let mut v = small();
        set_bat(&mut v, 1, state);
        let img = open_v(v).unwrap();
        assert_eq!(check_codes(&img), ["vhdx.bat-state"], "{state}");
        assert_eq!(
            refused(&img, 1 << 20),
            (ErrorKind::Corrupt, "vhdx.bat-state"),
            "{state}"
        );
    }
    // Legacy "unmapped" (5) and spec "unmapped" (3) read as zeros, as in qemu.
    for state in [bat::UNMAPPED, bat::UNMAPPED_V095, bat::UNDEFINED] {
        let mut v = small();
        set_bat(&mut v, 1, state);
        let img = open_v(v).unwrap();
        assert!(check_codes(&img).is_empty());
        assert_eq!(
            (&img as &dyn Image).mapping(1 << 20, 1 << 20).unwrap().kind,
            ExtentKind::Unallocated
        );
    }
}

#[test]
fn table_bounds_and_size() {
    let mut v = small();
    both_regions(&mut v, |v, t| put64(v, t + 16 + 16, 1 << 40));
    assert_eq!(
        err_code(open_v(v)),
        (ErrorKind::Corrupt, "table.out-of-bounds")
    );
    let v = small();
    let tight = Limits {
        max_table_bytes: 16,
        ..Limits::default()
    };
    let e = open(Arc::new(v), &tight).err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::LimitExceeded, "table.too-large")
    );
}

#[test]
fn bat_region_too_small() {
    let mut v = small();
    both_regions(&mut v, |v, t| put32(v, t + 16 + 24, 16));
    assert_eq!(
        err_code(open_v(v)),
        (ErrorKind::Corrupt, "vhdx.region-table")
    );
}

#[test]
fn regions_overlap_each_other_or_the_header_section() {
    let base = small();
    let (bat, md) = regions_of(&base);
    // (region table entry field, new offset): the BAT onto the metadata region, the
    // metadata region onto the BAT, and the metadata region onto the header section.
    for (field, to) in [(16 + 16, md), (48 + 16, bat), (48 + 16, 0)] {
        let mut v = base.clone();
        both_regions(&mut v, |v, t| put64(v, t + field, to));
        assert_eq!(
            err_code(open_v(v)),
            (ErrorKind::Corrupt, "vhdx.region-table"),
            "{field} {to:#x}"
        );
    }
}

/// Sets a log GUID in both headers (higher sequence unchanged).
fn with_log_guid(v: &mut [u8]) -> u64 {
    for h in [HEADER1_OFFSET, HEADER2_OFFSET] {
        let a = usize::try_from(h + 48).unwrap();
        v[a..a + 16].copy_from_slice(&[0x5a; 16]);
    }
    fix_headers(v);
    get64(v, HEADER1_OFFSET + 72)
}

/// qemu refuses a current header whose log version is not 0, or whose log (named by a GUID) is
/// not a whole number of MiB long, before it looks at anything else (`vhdx_parse_log`).
#[test]
fn log_fields_qemu_refuses() {
    let version = |v: &mut Vec<u8>| {
        for h in [HEADER1_OFFSET, HEADER2_OFFSET] {
            let a = usize::try_from(h + 64).unwrap();
            v[a..a + 2].copy_from_slice(&1u16.to_le_bytes());
        }
        fix_headers(v);
    };
    let length = |v: &mut Vec<u8>| {
        with_log_guid(v);
        for h in [HEADER1_OFFSET, HEADER2_OFFSET] {
            put32(v, h + 68, 512 << 10);
        }
        fix_headers(v);
    };
    for (what, mutate) in [
        ("log version", &version as &dyn Fn(&mut Vec<u8>)),
        ("log length", &length),
    ] {
        let mut v = small();
        mutate(&mut v);
        let e = open_v(v).err().unwrap_or_else(|| panic!("{what}: opened"));
        assert_eq!(e.finding_code(), "vhdx.log", "{what}");
    }
    // Without a log GUID the length does not matter (qemu stops at the GUID).
    let mut v = small();
    for h in [HEADER1_OFFSET, HEADER2_OFFSET] {
        put32(&mut v, h + 68, 512 << 10);
    }
    fix_headers(&mut v);
    open_v(v).unwrap();
}

#[test]
fn log_not_empty() {
    let mut v = small();
    let log = with_log_guid(&mut v);
    // A log GUID with no entries: empty.
    let img = open_v(v.clone()).unwrap();
    assert_eq!(img.info().details["log-state"], "empty");
    // An entry header carrying that GUID: non-empty, rejected, nothing mapped.
    let a = usize::try_from(log).unwrap();
    v[a..a + 4].copy_from_slice(b"loge");
    v[a + 32..a + 48].copy_from_slice(&[0x5a; 16]);
    let img = open_v(v).unwrap();
    assert_eq!(
        codes(&img),
        vec![("vhdx.log-not-empty", crate::finding::Severity::Reject)]
    );
    assert_eq!(img.info().details["log-state"], "non-empty");
    assert_eq!(
        (&img as &dyn Image)
            .mapping(0, 1)
            .unwrap_err()
            .finding_code(),
        "vhdx.log-not-empty"
    );
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[test]
fn differencing() {
    let base = make(4 << 20, "block_size=1M", &[]);
    let (_, md) = regions_of(&base);
    let fp = item_at(&base, metadata::FILE_PARAMETERS);
    // has_parent without a locator: invalid, as in qemu.
    let mut v = base.clone();
    put32(&mut v, fp + 4, metadata::HAS_PARENT);
    assert_eq!(err_code(open_v(v)), (ErrorKind::Invalid, "vhdx.metadata"));

    // Add a parent locator item (entry 6) after qemu's five items.
    let mut v = base;
    put32(&mut v, fp + 4, metadata::HAS_PARENT);
    let item_off: u32 = 128 << 10;
    let mut item = vec![0u8; 20];
    item[..16].copy_from_slice(&header::guid(
        0xb04a_efb7,
        0xd19e,
        0x4a81,
        [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
    ));
    item[18..20].copy_from_slice(&2u16.to_le_bytes());
    let pairs = [
        ("relative_path", "..\\base.vhdx"),
        ("parent_linkage", "{0000}"),
    ];
    let mut strings: Vec<u8> = Vec::new();
    let str_base = 20 + 12 * pairs.len();
    for (k, val) in pairs {
        let (kb, vb) = (utf16le(k), utf16le(val));
        let ko = str_base + strings.len();
        strings.extend(&kb);
        let vo = str_base + strings.len();
        strings.extend(&vb);
        item.extend((ko as u32).to_le_bytes());
        item.extend((vo as u32).to_le_bytes());
        item.extend((kb.len() as u16).to_le_bytes());
        item.extend((vb.len() as u16).to_le_bytes());
    }
    item.extend(strings);
    let abs = usize::try_from(md + u64::from(item_off)).unwrap();
    v[abs..abs + item.len()].copy_from_slice(&item);
    v[(md + 10) as usize..(md + 12) as usize].copy_from_slice(&6u16.to_le_bytes());
    let e = md + 32 + 32 * 5;
    v[e as usize..e as usize + 16].copy_from_slice(&metadata::PARENT_LOCATOR);
    put32(&mut v, e + 16, item_off);
    put32(&mut v, e + 20, u32::try_from(item.len()).unwrap());
    put32(&mut v, e + 24, metadata::FLAG_REQUIRED);
    let with_parent = v.clone();
    let img = open_v(v).unwrap();
    assert_eq!(
        codes(&img),
        vec![("vhdx.differencing", crate::finding::Severity::Reject)]
    );
    let refs = &img.info().references;
    assert_eq!(refs.len(), 1);
    assert_eq!(
        (refs[0].kind, refs[0].target.as_str()),
        (RefKind::ParentLocator, "..\\base.vhdx")
    );
    assert_eq!(
        img.info().details["parent-locator"]["parent_linkage"],
        "{0000}"
    );
    // Blocks qemu marked ZERO stay zero; the parent is never read.
    assert_eq!(
        (&img as &dyn Image).mapping(0, u64::MAX).unwrap().kind,
        ExtentKind::Zero
    );

    // The page 83 item moved into the parent locator's strings: both still decode.
    let mut v = with_parent;
    let p83 = entry_at(&v, metadata::PAGE83_DATA);
    put32(&mut v, p83 + 16, item_off + 40);
    let msg = overlap_finding(v).expect("page 83 inside the parent locator");
    assert!(msg.contains("Parent Locator"), "{msg}");
}

#[test]
fn mapping_coalesces_and_is_bounded() {
    let v = make(
        8 << 20,
        "block_size=1M",
        &[
            (0, &[1; 10]),
            (1 << 20, &[2; 10]),
            (2 << 20, &[3; 10]),
            (6 << 20, &[4; 10]),
        ],
    );
    let img = open_v(v).unwrap();
    let mut pos = 0;
    let mut got = Vec::new();
    while pos < 8 << 20 {
        let e = (&img as &dyn Image).mapping(pos, u64::MAX).unwrap();
        crate::image::validate_extent(&e, pos, u64::MAX, 8 << 20).unwrap();
        got.push((
            e.start >> 20,
            e.len >> 20,
            matches!(e.kind, ExtentKind::Data { .. }),
        ));
        pos = e.end();
    }
    // qemu-img writes consecutive blocks consecutively, so blocks 0-2 form one data run.
    assert_eq!(
        got,
        vec![(0, 3, true), (3, 3, false), (6, 1, true), (7, 1, false)]
    );
    let e = (&img as &dyn Image).mapping(5, 7).unwrap();
    assert_eq!((e.start, e.len), (5, 7));
    assert!((&img as &dyn Image).mapping(8 << 20, 1).is_err());
}

#[test]
fn equal_sequence_headers_must_match() {
    // Identical copies (as Disk2VHD writes them) are fine.
    let mut v = small();
    let h1 = usize::try_from(HEADER1_OFFSET).unwrap();
    let h2 = usize::try_from(HEADER2_OFFSET).unwrap();
    let copy = v[h2..h2 + HEADER_SIZE].to_vec();
    v[h1..h1 + HEADER_SIZE].copy_from_slice(&copy);
    assert!(open_v(v.clone()).is_ok());
    // Same sequence, different data write GUID: no way to tell which is current.
    v[h1 + 40] ^= 1;
    fix_headers(&mut v);
    assert_eq!(
        err_code(open_v(v)),
        (ErrorKind::Corrupt, "vhdx.header-checksum")
    );
}

#[test]
fn logical_sector_size_4096() {
    let mut v = small();
    let at = item_at(&v, metadata::LOGICAL_SECTOR_SIZE);
    put32(&mut v, at, 4096);
    // Report F6: qemu refuses it ("Operation not supported"), so glimpse does too.
    assert_eq!(
        err_code(open_v(v)),
        (ErrorKind::Unsupported, "vhdx.metadata")
    );
    // 2^23 sectors of 4 KiB per chunk: 32768 payload blocks of 1 MiB per bitmap entry.
    assert_eq!(
        Geometry::new(1 << 20, 4096, 4 << 20, false).chunk_ratio,
        32768
    );
}

#[test]
fn virtual_disk_size_zero_and_one_open_as_qemu_opens_them() {
    // qemu opens a VHDX of size 0 that `qemu-img create` writes, and the one glimpse writes for
    // an empty disk (convert/tests/vhdx.rs `empty_disk` checks both against qemu-img): their
    // BAT regions hold the (0 - 1) >> log2(chunk ratio) entries qemu counts for an empty disk.
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.vhdx");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        empty.to_str().unwrap(),
        "0",
    ]);
    let img = open_v(std::fs::read(&empty).unwrap()).unwrap();
    assert_eq!(img.info().virtual_size, 0);
    // An image of 4 MiB with its size set to 0 keeps a 1 MiB BAT region: qemu refuses it, and
    // so does glimpse. Size 1 (no whole sector) opens in both as a 0-byte disk.
    let mut v = small();
    let at = item_at(&v, metadata::VIRTUAL_DISK_SIZE) as usize;
    let qemu_opens = |v: &[u8]| {
        let f = dir.path().join("mutated.vhdx");
        std::fs::write(&f, v).unwrap();
        Command::new("qemu-img")
            .args(["info", f.to_str().unwrap()])
            .output()
            .expect("qemu-img must be installed for these tests")
            .status
            .success()
    };
    v[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    assert!(!qemu_opens(&v));
    assert_eq!(
        err_code(open_v(v.clone())),
        (ErrorKind::Corrupt, "vhdx.region-table")
    );
    v[at..at + 8].copy_from_slice(&1u64.to_le_bytes());
    assert!(qemu_opens(&v));
    assert_eq!(open_v(v).unwrap().info().virtual_size, 0);
}

#[test]
fn sector_bitmap_entry_states() {
    // 256 MiB blocks have a chunk ratio of 16: entry 16 is a sector bitmap entry.
    let geo = Geometry::new(256 << 20, 512, 17 * (256 << 20), false);
    assert_eq!((geo.chunk_ratio, geo.entries), (16, 18));
    assert!(geo.is_bitmap(16) && !geo.is_bitmap(15) && !geo.is_bitmap(17));
    assert_eq!(geo.payload_index(16), 17);
    let mut entries = vec![0u64; 18];
    let file = 8u64 << 30;
    let ok = |e: &[u64]| {
        bat::validate(
            e,
            &geo,
            2 << 20,
            17 * (256 << 20),
            file,
            &[],
            &crate::limits::Budget::new(1 << 20),
        )
    };
    assert!(ok(&entries).unwrap().is_clean());
    entries[16] = (300 << 20) | bat::SB_PRESENT;
    assert!(ok(&entries).unwrap().is_clean());
    entries[16] = bat::ZERO;
    let found = ok(&entries).unwrap();
    assert_eq!(found.bad_code(16), Some("vhdx.bat-state"));
    assert_eq!(found.bad_code(15), None);
    assert_eq!(found.findings.len(), 1);
    assert_eq!(found.findings[0].code, "vhdx.bat-state");
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// An image over an arbitrary BAT of valid payload states, built without a file.
    fn image(block_shift: u32, blocks: u64, tail: u64, states: &[u8]) -> VhdxImage {
        let bs = 1u64 << block_shift;
        let size = (blocks * bs).saturating_sub(tail).max(1);
        let geo = Geometry::new(bs, 512, size, false);
        let bat: Vec<u64> = (0..geo.entries)
            .map(|i| {
                if geo.is_bitmap(i) {
                    return 0;
                }
                match states[(i as usize) % states.len()] % 6 {
                    0 => bat::NOT_PRESENT,
                    1 => bat::ZERO,
                    2 => bat::UNMAPPED,
                    // Data blocks: contiguous runs, with a gap every third one.
                    _ => ((16 + i + i / 3) << 20) | bat::FULLY_PRESENT,
                }
            })
            .collect();
        let src: Source = Arc::new(Vec::<u8>::new());
        VhdxImage {
            src,
            info: ImageInfo::new(Format::Vhdx, size),
            findings: Vec::new(),
            geo,
            bat: Arc::new(crate::table::Table::unbudgeted(bat)),
            bad: Arc::new(bat::Validation::none()),
            log_non_empty: false,
        }
    }

    #[test]
    fn one_call_walks_a_bounded_number_of_blocks() {
        let img = image(20, 1 << 17, 0, &[0]);
        let e = (&img as &dyn Image).mapping(0, u64::MAX).unwrap();
        assert_eq!(
            (e.len, e.kind),
            ((MAX_BLOCKS_PER_CALL + 1) << 20, ExtentKind::Unallocated)
        );
        let e = (&img as &dyn Image).mapping(e.end(), u64::MAX).unwrap();
        assert_eq!(e.end(), 1 << 37);
    }

    proptest! {
        #[test]
        fn extents_tile_the_disk_and_follow_the_bat(
            block_shift in 20u32..22,
            blocks in 1u64..40,
            tail in 0u64..5000,
            states in proptest::collection::vec(any::<u8>(), 1..50),
            max in 1u64..(8 << 20),
        ) {
            let img = image(block_shift, blocks, tail, &states);
            let size = img.info().virtual_size;
            let bs = img.geo.block_size;
            let mut pos = 0;
            while pos < size {
                let e = (&img as &dyn Image).mapping(pos, max).unwrap();
                crate::image::validate_extent(&e, pos, max, size).unwrap();
                // Every block the extent touches has the extent's kind.
                let mut b = e.start / bs;
                while b * bs < e.end() {
                    let entry = img.bat[img.geo.payload_index(b) as usize];
                    let off = (b * bs).max(e.start);
                    match e.kind {
                        ExtentKind::Data { host } => prop_assert_eq!(
                            host + (off - e.start),
                            (entry & bat::OFFSET_MASK) + off % bs
                        ),
                        ExtentKind::Zero => prop_assert_eq!(entry & bat::STATE_MASK, bat::ZERO),
                        ExtentKind::Unallocated => prop_assert!(matches!(entry & bat::STATE_MASK, bat::NOT_PRESENT | bat::UNMAPPED)),
                        ExtentKind::Compressed { .. } => prop_assert!(false),
                    }
                    b += 1;
                }
                pos = e.end();
            }
            prop_assert_eq!(pos, size);
        }
    }
}

/// A source that is `base` with its first bytes replaced by `head` and single bytes patched.
struct Patched {
    base: Arc<Vec<u8>>,
    head: Vec<u8>,
    patches: Vec<(usize, u8)>,
}

impl crate::io::ReadAt for Patched {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.base.as_slice().read_at(buf, offset)?;
        let off = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, b) in buf[..n].iter_mut().enumerate() {
            let at = off + i;
            if let Some(h) = self.head.get(at) {
                *b = *h;
            }
        }
        for &(at, v) in &self.patches {
            if at >= off && at < off + n {
                buf[at - off] = v;
            }
        }
        Ok(n)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.base.len() as u64)
    }
}

#[test]
fn random_mutations_never_panic() {
    let base = Arc::new(small());
    let (bat, md) = regions_of(&base);
    let head_len = usize::try_from(REGION2_OFFSET).unwrap() + REGION_TABLE_SIZE;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut opened = 0;
    for _ in 0..2000 {
        let mut head = base[..head_len].to_vec();
        let mut patches = Vec::new();
        for _ in 0..1 + rnd(4) {
            // Aim at the fields: headers, region entries, metadata table and items, BAT.
            let at = match rnd(5) {
                0 => HEADER1_OFFSET + rnd(80),
                1 => HEADER2_OFFSET + rnd(80),
                2 => REGION1_OFFSET + rnd(96),
                3 => {
                    md + if rnd(2) == 0 {
                        rnd(200)
                    } else {
                        65536 + rnd(48)
                    }
                }
                _ => bat + rnd(64),
            };
            let v = match rnd(4) {
                0 => 0,
                1 => 0xff,
                _ => rnd(256) as u8,
            };
            let at = usize::try_from(at).unwrap();
            match head.get_mut(at) {
                Some(b) => *b = v,
                None => patches.push((at, v)),
            }
        }
        // Keep checksums valid most of the time so the parser gets past them.
        if rnd(4) != 0 {
            fix_headers(&mut head);
            fix_regions(&mut head);
        }
        let src: Source = Arc::new(Patched {
            base: base.clone(),
            head,
            patches,
        });
        let Ok(img) = open(src, &Limits::tight()) else {
            continue;
        };
        opened += 1;
        let img: Arc<dyn Image> = Arc::new(img);
        let size = img.info().virtual_size;
        let reader = crate::reader::GuestReader::new(img.clone(), &Limits::tight());
        let mut pos = 0;
        let mut buf = vec![0u8; 4096];
        while pos < size {
            let Ok(e) = img.mapping(pos, u64::MAX) else {
                break;
            };
            crate::image::validate_extent(&e, pos, u64::MAX, size).unwrap();
            let n = usize::try_from(e.len.min(4096)).unwrap();
            let _ = reader.read_at(&mut buf[..n], pos);
            pos = e.end();
        }
    }
    assert!(
        opened > 50,
        "only {opened} mutants opened: the test is not reaching the mapping"
    );
}
