//! Unit tests: hand-built images, one field mutated per test.

use std::sync::Arc;

use super::footer::{geometry, DYN_CHECKSUM_AT, FOOTER_CHECKSUM_AT};
use super::*;
use crate::error::ErrorKind;
use crate::reader::GuestReader;

const BLOCK: u64 = 1 << 16;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn footer(disk_type: u32, size: u64, app: &[u8; 4], data_offset: u64) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    put32(&mut f, 8, 2);
    put32(&mut f, 12, 0x0001_0000);
    put64(&mut f, 16, data_offset);
    f[28..32].copy_from_slice(app);
    put64(&mut f, 40, size);
    put64(&mut f, 48, size);
    // qemu-img's force_size=on geometry.
    f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    put32(&mut f, 60, disk_type);
    seal_footer(&mut f);
    f
}

fn seal_footer(f: &mut [u8]) {
    let c = checksum(f, FOOTER_CHECKSUM_AT);
    put32(f, FOOTER_CHECKSUM_AT, c);
}

/// A dynamic disk laid out as qemu-img lays it out, with blocks `alloc` (block indexes)
/// allocated in that order, each filled with its index + 1.
struct Dyn {
    bytes: Vec<u8>,
    bat: usize,
    entries: u64,
}

impl Dyn {
    fn new(vsize: u64, alloc: &[u64]) -> Dyn {
        let entries = vsize.div_ceil(BLOCK);
        let bat = 1536usize;
        let bat_len = (entries * 4).div_ceil(512) * 512;
        let mut b = footer(TYPE_DYNAMIC, vsize, b"qem2", 512);
        let mut h = vec![0u8; 1024];
        h[..8].copy_from_slice(b"cxsparse");
        put64(&mut h, 8, u64::MAX);
        put64(&mut h, 16, bat as u64);
        put32(&mut h, 24, 0x0001_0000);
        put32(&mut h, 28, entries as u32);
        put32(&mut h, 32, BLOCK as u32);
        let c = checksum(&h, DYN_CHECKSUM_AT);
        put32(&mut h, DYN_CHECKSUM_AT, c);
        b.extend_from_slice(&h);
        b.extend(std::iter::repeat_n(0xFF, bat_len as usize));
        for &i in alloc {
            let sector = (b.len() / 512) as u32;
            put32(&mut b, bat + 4 * i as usize, sector);
            b.extend(std::iter::repeat_n(0xFF, 512));
            b.extend(std::iter::repeat_n(i as u8 + 1, BLOCK as usize));
        }
        let f = b[..512].to_vec();
        b.extend_from_slice(&f);
        Dyn {
            bytes: b,
            bat,
            entries,
        }
    }
    fn header_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[512..1536]
    }
    fn reseal_header(&mut self) {
        let c = checksum(self.header_mut(), DYN_CHECKSUM_AT);
        put32(self.header_mut(), DYN_CHECKSUM_AT, c);
    }
    /// Applies `f` to both footers and reseals them.
    fn footers(&mut self, f: impl Fn(&mut [u8])) {
        let n = self.bytes.len();
        for at in [0, n - 512] {
            f(&mut self.bytes[at..at + 512]);
            seal_footer(&mut self.bytes[at..at + 512]);
        }
    }
    fn set_entry(&mut self, i: usize, v: u32) {
        let at = self.bat + 4 * i;
        put32(&mut self.bytes, at, v);
    }
    fn open(&self) -> Result<VhdImage> {
        open(Arc::new(self.bytes.clone()), &Limits::default())
    }
}

fn codes(f: &[Finding]) -> Vec<&'static str> {
    f.iter().map(|f| f.code).collect()
}

fn walk(img: &dyn Image) -> Vec<Extent> {
    let size = img.info().virtual_size;
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < size {
        let e = img.mapping(pos, u64::MAX).unwrap();
        crate::image::validate_extent(&e, pos, u64::MAX, size).unwrap();
        pos = e.end();
        out.push(e);
    }
    out
}

#[test]
fn dynamic_disk_maps_and_reads() {
    let d = Dyn::new(5 * BLOCK + 1024, &[3, 0, 5]);
    let img = d.open().unwrap();
    assert_eq!(img.info().virtual_size, 5 * BLOCK + 1024);
    assert_eq!(img.info().cluster_size, Some(BLOCK));
    assert_eq!(img.info().details["disk-type"], "dynamic");
    assert_eq!(img.info().details["creator"], "qem2 0.0");
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    assert!(img.check(&Limits::default()).unwrap().is_empty());
    let ext = walk(&img);
    let kinds: Vec<bool> = ext
        .iter()
        .map(|e| matches!(e.kind, ExtentKind::Data { .. }))
        .collect();
    assert_eq!(kinds, [true, false, true, false, true]);
    assert_eq!(ext[1].len, 2 * BLOCK, "unallocated blocks 1-2 coalesce");
    let img: Arc<dyn Image> = Arc::new(img);
    let r = GuestReader::new(img.clone(), &Limits::default());
    let mut buf = vec![0u8; img.info().virtual_size as usize];
    r.read_at(&mut buf, 0).unwrap();
    assert!(buf[..BLOCK as usize].iter().all(|&b| b == 1));
    assert!(buf[BLOCK as usize..3 * BLOCK as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(buf[3 * BLOCK as usize..4 * BLOCK as usize]
        .iter()
        .all(|&b| b == 4));
    assert!(buf[5 * BLOCK as usize..].iter().all(|&b| b == 6));
}

/// A block reads whole, as QEMU reads it, whatever its sector bitmap says; `check` rejects a
/// bitmap that marks absent sectors holding data (a reader that obeys it sees zeros there),
/// and accepts clear bits over zeros (how Hyper-V leaves unwritten sectors).
#[test]
fn sector_bitmaps_never_hide_data() {
    let mut d = Dyn::new(BLOCK, &[0]);
    let bitmap = d.bytes.len() - 512 - BLOCK as usize - 512;
    d.bytes[bitmap] = 0b1100_0000; // sectors 0-1 present, 2-7 absent
    let img = d.open().unwrap();
    let e = (&img as &dyn Image).mapping(0, u64::MAX).unwrap();
    assert_eq!(
        (e.len, matches!(e.kind, ExtentKind::Data { .. })),
        (BLOCK, true)
    );
    let e = (&img as &dyn Image).mapping(100, 10).unwrap();
    assert_eq!(e.len, 10);
    let f = img.check(&Limits::default()).unwrap();
    let hit = f
        .iter()
        .find(|f| f.code == "vhd.bitmap-hides-data")
        .unwrap_or_else(|| panic!("{f:?}"));
    assert_eq!(hit.severity, crate::finding::Severity::Reject);
    assert!(hit.message.contains("0x400"), "{}", hit.message);
    // The same bitmap over zeros: nothing hidden.
    let data = bitmap + 512;
    d.bytes[data + 1024..data + BLOCK as usize].fill(0);
    let f = d.open().unwrap().check(&Limits::default()).unwrap();
    assert!(!codes(&f).contains(&"vhd.bitmap-hides-data"), "{f:?}");
}

#[test]
fn probe_finds_fixed_footer_in_the_last_sector() {
    let mut b = vec![7u8; 4096];
    b.extend(footer(TYPE_FIXED, 4096, b"qem2", u64::MAX));
    let det = crate::detect::detect(&b).unwrap();
    assert_eq!(det.matches, [Format::Vhd]);
    let img = open(Arc::new(b.clone()), &Limits::default()).unwrap();
    assert_eq!(img.info().virtual_size, 4096);
    assert_eq!(img.info().details["disk-type"], "fixed");
    assert_eq!(
        walk(&img),
        [Extent {
            start: 0,
            len: 4096,
            kind: ExtentKind::Data { host: 0 }
        }]
    );

    // The old 511-byte footer.
    b.pop();
    assert_eq!(crate::detect::detect(&b).unwrap().matches, [Format::Vhd]);
    assert_eq!(
        open(Arc::new(b), &Limits::default())
            .unwrap()
            .info()
            .virtual_size,
        4096
    );
}

#[test]
fn zero_size_fixed_disk_is_one_footer() {
    let b = footer(TYPE_FIXED, 0, b"qem2", u64::MAX);
    let img = open(Arc::new(b), &Limits::default()).unwrap();
    assert_eq!(img.info().virtual_size, 0);
    assert!(img.findings().is_empty());
}

#[test]
fn footer_checksum_is_checked() {
    let mut d = Dyn::new(BLOCK, &[]);
    d.bytes[48] ^= 1;
    let e = d.open().err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::Corrupt, "vhd.checksum")
    );
}

#[test]
fn dynamic_header_checksum_is_a_finding() {
    let mut d = Dyn::new(BLOCK, &[]);
    d.header_mut()[40] = 1; // parent UUID byte, checksum left stale
    let img = d.open().unwrap();
    assert_eq!(codes(img.findings()), ["vhd.checksum"]);
}

#[test]
fn differencing_disk_reports_parent_locators() {
    let mut d = Dyn::new(BLOCK, &[]);
    d.footers(|f| put32(f, 60, TYPE_DIFFERENCING));
    let name: Vec<u8> = "parent.vhd"
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    d.header_mut()[64..64 + name.len()].copy_from_slice(&name);
    let path: Vec<u8> = "C:\\images\\parent.vhd"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let at = d.bytes.len() as u64 - 512; // where the tail footer is now
    let loc = 576;
    d.header_mut()[loc..loc + 4].copy_from_slice(b"W2ku");
    put32(d.header_mut(), loc + 4, 512);
    put32(d.header_mut(), loc + 8, path.len() as u32);
    put64(d.header_mut(), loc + 16, at);
    // A locator whose length is absurd is reported, not read.
    d.header_mut()[loc + 24..loc + 28].copy_from_slice(b"W2ru");
    put32(d.header_mut(), loc + 32, u32::MAX);
    put64(d.header_mut(), loc + 40, 0);
    d.reseal_header();
    let tail = d.bytes.split_off(d.bytes.len() - 512);
    d.bytes.extend_from_slice(&path);
    d.bytes.resize(d.bytes.len().div_ceil(512) * 512, 0);
    d.bytes.extend_from_slice(&tail);
    let img = d.open().unwrap();
    assert_eq!(
        codes(img.findings()),
        ["vhd.differencing", "vhd.differencing"]
    );
    let refs: Vec<&str> = img
        .info()
        .references
        .iter()
        .map(|r| r.target.as_str())
        .collect();
    assert_eq!(refs, ["parent.vhd", "W2ku:C:\\images\\parent.vhd"]);
    assert!(img
        .info()
        .references
        .iter()
        .all(|r| r.kind == RefKind::ParentLocator));
}

#[test]
fn head_and_tail_footers_must_agree() {
    let mut d = Dyn::new(BLOCK, &[]);
    let n = d.bytes.len();
    put32(&mut d.bytes[n - 512..], 24, 12345);
    seal_footer(&mut d.bytes[n - 512..]);
    assert_eq!(codes(d.open().unwrap().findings()), ["vhd.footer-mismatch"]);

    // A dynamic disk without its copy at offset 0 is refused, as QEMU refuses it.
    let mut d = Dyn::new(BLOCK, &[]);
    d.bytes[0] = b'x';
    assert_eq!(
        d.open().err().unwrap().finding_code(),
        "vhd.footer-mismatch"
    );

    // A fixed disk whose first sector is a VHD footer: qemu-img and glimpse would differ.
    let mut b = footer(TYPE_DYNAMIC, 4096, b"qem2", 512);
    b.resize(4096, 0);
    b.extend(footer(TYPE_FIXED, 4096, b"qem2", u64::MAX));
    let img = open(Arc::new(b), &Limits::default()).unwrap();
    assert_eq!(codes(img.findings()), ["vhd.footer-mismatch"]);
}

#[test]
fn block_size_must_be_a_sane_power_of_two() {
    for bad in [3000u32, 512, 1 << 30] {
        let mut d = Dyn::new(BLOCK, &[]);
        put32(d.header_mut(), 32, bad);
        d.reseal_header();
        let e = d.open().err().unwrap();
        assert_eq!(
            (e.kind(), e.finding_code()),
            (ErrorKind::Unsupported, "vhd.block-size"),
            "{bad}"
        );
    }
}

#[test]
fn bat_entry_past_the_end_is_refused() {
    let mut d = Dyn::new(2 * BLOCK, &[0]);
    d.set_entry(1, 0x0100_0000);
    let e = d.open().err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::Corrupt, "vhd.bat-entry-out-of-bounds")
    );
    assert_eq!(e.offset(), Some(1536 + 4));
}

#[test]
fn bat_entry_into_metadata_is_found_by_check() {
    let mut d = Dyn::new(2 * BLOCK, &[0]);
    d.set_entry(0, 1); // sector 1 is the dynamic disk header
    let img = d.open().unwrap();
    assert_eq!(
        codes(&img.check(&Limits::default()).unwrap()),
        ["vhd.entry-into-metadata"]
    );
}

#[test]
fn bat_entry_over_a_parent_locator_is_found_by_check() {
    // Block 0's bitmap is at 0x800, its data at 0xa00: put a locator's data there.
    let mut d = Dyn::new(BLOCK, &[0]);
    d.footers(|f| put32(f, 60, TYPE_DIFFERENCING));
    d.header_mut()[576..580].copy_from_slice(b"W2ku");
    put32(d.header_mut(), 576 + 8, 40);
    put64(d.header_mut(), 576 + 16, 0xa00);
    d.reseal_header();
    let img = d.open().unwrap();
    assert_eq!(codes(img.findings()), ["vhd.differencing"]);
    let found = img.check(&Limits::default()).unwrap();
    assert_eq!(codes(&found), ["vhd.entry-into-metadata"]);
    assert!(
        found[0].message.contains("parent locator"),
        "{}",
        found[0].message
    );
    // The same locator fields in a dynamic disk are not metadata: nobody reads them.
    let mut d = Dyn::new(BLOCK, &[0]);
    d.header_mut()[576..580].copy_from_slice(b"W2ku");
    put32(d.header_mut(), 576 + 8, 40);
    put64(d.header_mut(), 576 + 16, 0xa00);
    d.reseal_header();
    assert!(d
        .open()
        .unwrap()
        .check(&Limits::default())
        .unwrap()
        .is_empty());
}

#[test]
fn duplicate_blocks_are_found_by_check() {
    let mut d = Dyn::new(2 * BLOCK, &[0]);
    let e0 = u32::from_be_bytes(d.bytes[1536..1540].try_into().unwrap());
    d.set_entry(1, e0);
    let img = d.open().unwrap();
    assert_eq!(
        codes(&img.check(&Limits::default()).unwrap()),
        ["vhd.duplicate-block"]
    );
}

#[test]
fn bat_table_is_range_checked() {
    let mut d = Dyn::new(BLOCK, &[]);
    put64(d.header_mut(), 16, 1 << 40);
    d.reseal_header();
    assert_eq!(
        d.open().err().unwrap().finding_code(),
        "table.out-of-bounds"
    );

    // Past qemu's INT_MAX / 4 entries, and between the byte cap (128 MiB, 32 Mi entries)
    // and qemu's: both refused before the BAT is read, whatever the file holds.
    for (entries, says) in [
        (u32::MAX, "qemu"),
        (footer::MAX_TABLE_ENTRIES + 1, "qemu"),
        ((32 << 20) + 1, "limit of 134217728 bytes"),
    ] {
        let mut d = Dyn::new(BLOCK, &[]);
        put32(d.header_mut(), 28, entries);
        d.reseal_header();
        let e = d.open().err().unwrap();
        assert_eq!(
            (e.kind(), e.finding_code()),
            (ErrorKind::LimitExceeded, "table.too-large"),
            "{entries}"
        );
        assert!(e.message().contains(says), "{entries}: {}", e.message());
    }
    assert!(d.entries >= 1);

    // A BAT too small for the disk.
    let mut d = Dyn::new(2 * BLOCK, &[]);
    put32(d.header_mut(), 28, 1);
    d.reseal_header();
    assert_eq!(d.open().err().unwrap().finding_code(), "vhd.dynamic-header");
}

#[test]
fn size_follows_qemu_creator_rules() {
    // "vpc " and "qemu": the CHS geometry (rounded down); an explained info finding.
    let size = 40 * BLOCK;
    let (c, h, s) = geometry(size / 512);
    let chs = u64::from(c) * u64::from(h) * u64::from(s) * 512;
    assert!(chs < size);
    for (app, want) in [
        (b"vpc ", chs),
        (b"qemu", chs),
        (b"win ", size),
        (b"xyz ", size),
        (b"vpc\0", size),
    ] {
        let mut d = Dyn::new(size, &[]);
        d.footers(|f| {
            f[28..32].copy_from_slice(app);
            f[56..58].copy_from_slice(&c.to_be_bytes());
            f[58] = h;
            f[59] = s;
        });
        let img = d.open().unwrap();
        assert_eq!(img.info().virtual_size, want, "{app:?}");
        let expect: &[&str] = if want == chs {
            &["vhd.size-mismatch"]
        } else {
            &[]
        };
        assert_eq!(codes(img.findings()), expect);
    }
    // The maximum geometry always means the current size.
    let mut d = Dyn::new(size, &[]);
    d.footers(|f| {
        f[28..32].copy_from_slice(b"qemu");
        f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    });
    let img = d.open().unwrap();
    assert_eq!(img.info().virtual_size, size);
    assert!(img.findings().is_empty());
}

#[test]
fn unknown_disk_type_and_huge_disks_are_refused() {
    let mut d = Dyn::new(BLOCK, &[]);
    d.footers(|f| put32(f, 60, 5));
    assert_eq!(d.open().err().unwrap().finding_code(), "vhd.disk-type");
    let mut d = Dyn::new(BLOCK, &[]);
    d.footers(|f| put64(f, 48, 3 << 40));
    assert_eq!(d.open().err().unwrap().finding_code(), "vhd.too-large");
}

#[test]
fn every_prefix_fails_cleanly() {
    let d = Dyn::new(3 * BLOCK + 512, &[2, 0]);
    for n in 0..d.bytes.len() {
        let src: Source = Arc::new(d.bytes[..n].to_vec());
        if let Ok(img) = open(src, &Limits::default()) {
            let _ = img.check(&Limits::default());
            let img: Arc<dyn Image> = Arc::new(img);
            let r = GuestReader::new(img.clone(), &Limits::default());
            let mut buf = vec![0u8; img.info().virtual_size as usize];
            r.read_at(&mut buf, 0).unwrap();
        }
    }
}

#[test]
fn fixed_disk_whose_data_runs_into_the_footer_is_refused() {
    let mut b = vec![7u8; 4096];
    b.extend(footer(TYPE_FIXED, 8192, b"qem2", u64::MAX));
    let e = open(Arc::new(b), &Limits::default()).err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::Truncated, "vhd.truncated")
    );
}

#[test]
fn a_huge_empty_disk_maps_in_a_few_bounded_calls() {
    // 32 GiB of 64 KiB blocks: 524288 BAT entries, all unused.
    let d = Dyn::new(32 << 30, &[]);
    let img = d.open().unwrap();
    let ext = walk(&img);
    assert!(ext.len() <= 9, "{} extents", ext.len());
    assert!(ext
        .iter()
        .all(|e| e.kind == ExtentKind::Unallocated && e.len <= (MAX_SCAN + 1) * BLOCK));
}

#[test]
fn fixed_footer_size_must_match_the_data() {
    let fixed = |data: usize, current: u64| {
        let mut b = vec![7u8; data];
        b.extend(footer(TYPE_FIXED, current, b"win ", u64::MAX));
        open(Arc::new(b), &Limits::default()).unwrap()
    };
    // Report F7: a raw disk whose last sector is a footer declaring 16 KiB. qemu-img
    // probes the file as a raw disk of the whole file; a VHD reader sees 16 KiB.
    let img = fixed(65536, 16384);
    assert_eq!(img.info().virtual_size, 16384);
    assert_eq!(codes(img.findings()), ["vhd.fixed-size"]);
    let f = &img.findings()[0];
    assert!(f.message.contains("66048 byte raw disk"), "{}", f.message);
    // Data shorter than an odd current size's whole sectors.
    assert_eq!(codes(fixed(3584, 4000).findings()), ["vhd.fixed-size"]);
    // Exact data, and an odd current size whose data is rounded up to a whole sector
    // (report F1b): accepted; the size is whole sectors, as qemu-img -f vpc reports it.
    assert!(fixed(65536, 65536).findings().is_empty());
    let img = fixed(4096, 4000);
    assert!(img.findings().is_empty());
    assert_eq!(img.info().virtual_size, 3584);
}
