//! Unit tests on images built in memory: one mutated field per finding or error.

use std::io::Write;
use std::sync::Arc;

use super::*;
use crate::error::ErrorKind;
use crate::reader::GuestReader;

const CAP: u64 = 10240; // sectors: 5 MiB, 80 grains of 64 KiB
const GRAIN: usize = 65536;

fn desc(create: &str, extra: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{create}\"\n\n# Extent description\nRW {CAP} SPARSE \"t.vmdk\"\n{extra}\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n"
    )
}

fn header(version: u32, flags: u32, gd: u64, rgd: u64, overhead: u64, compress: u16) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&version.to_le_bytes());
    h[8..12].copy_from_slice(&flags.to_le_bytes());
    h[12..20].copy_from_slice(&CAP.to_le_bytes());
    h[20..28].copy_from_slice(&128u64.to_le_bytes());
    h[28..36].copy_from_slice(&1u64.to_le_bytes());
    h[36..44].copy_from_slice(&20u64.to_le_bytes());
    h[44..48].copy_from_slice(&512u32.to_le_bytes());
    h[48..56].copy_from_slice(&rgd.to_le_bytes());
    h[56..64].copy_from_slice(&gd.to_le_bytes());
    h[64..72].copy_from_slice(&overhead.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    h[77..79].copy_from_slice(&compress.to_le_bytes());
    h
}

fn put(img: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if img.len() < at + bytes.len() {
        img.resize(at + bytes.len(), 0);
    }
    img[at..at + bytes.len()].copy_from_slice(bytes);
}

fn pattern(g: u64) -> Vec<u8> {
    (0..GRAIN)
        .map(|i| (i as u64 * 7 + g * 13 + 1) as u8)
        .collect()
}

/// Allocated grains of the test images: grain number -> content.
const DATA_GRAINS: [u64; 4] = [0, 1, 5, 79];

/// A monolithicSparse image: header, descriptor at 1, GD at 21, GT at 22, grains from 128.
fn sparse_with(descriptor: &str) -> Vec<u8> {
    let mut img = header(1, 3, 21, 0, 128, 0);
    // Flags 3 = newline detector + redundant GD; put the RGD at 26 with its own GT at 27.
    img[48..56].copy_from_slice(&26u64.to_le_bytes());
    put(&mut img, 512, descriptor.as_bytes());
    put(&mut img, 21 * 512, &22u32.to_le_bytes());
    put(&mut img, 26 * 512, &27u32.to_le_bytes());
    let mut next = 128u32;
    for g in DATA_GRAINS {
        put(&mut img, 22 * 512 + g as usize * 4, &next.to_le_bytes());
        put(&mut img, 27 * 512 + g as usize * 4, &next.to_le_bytes());
        put(&mut img, next as usize * 512, &pattern(g));
        next += 128;
    }
    img
}

fn sparse() -> Vec<u8> {
    sparse_with(&desc("monolithicSparse", ""))
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn pad(img: &mut Vec<u8>) {
    img.resize(img.len().div_ceil(512) * 512, 0);
}

fn meta_marker(img: &mut Vec<u8>, sectors: u64, kind: u32) {
    let mut m = vec![0u8; 512];
    m[0..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    img.extend_from_slice(&m);
}

/// A streamOptimized image in footer form, laid out as VMware's stream writers do.
fn stream() -> Vec<u8> {
    let flags = 1 | (1 << 16) | (1 << 17);
    let mut img = header(3, flags, u64::MAX, 0, 21, 1);
    put(&mut img, 512, desc("streamOptimized", "").as_bytes());
    img.resize(21 * 512, 0);
    let mut gt = vec![0u8; 2048];
    for g in DATA_GRAINS {
        let sector = (img.len() / 512) as u32;
        gt[g as usize * 4..g as usize * 4 + 4].copy_from_slice(&sector.to_le_bytes());
        let z = zlib(&pattern(g));
        img.extend_from_slice(&(g * 128).to_le_bytes());
        img.extend_from_slice(&(z.len() as u32).to_le_bytes());
        img.extend_from_slice(&z);
        pad(&mut img);
    }
    meta_marker(&mut img, 4, stream::MARKER_GT);
    let gt_sector = (img.len() / 512) as u32;
    img.extend_from_slice(&gt);
    meta_marker(&mut img, 1, stream::MARKER_GD);
    let gd_sector = (img.len() / 512) as u64;
    img.extend_from_slice(&gt_sector.to_le_bytes());
    pad(&mut img);
    meta_marker(&mut img, 1, stream::MARKER_FOOTER);
    img.extend_from_slice(&header(3, flags, gd_sector, 0, 21, 1));
    meta_marker(&mut img, 0, stream::MARKER_EOS);
    img
}

fn open_bytes(b: Vec<u8>) -> Result<VmdkImage> {
    open(Arc::new(b), &Limits::default())
}

fn codes(img: &VmdkImage) -> Vec<&'static str> {
    let mut c: Vec<_> = img.findings().iter().map(|f| f.code).collect();
    c.extend(
        img.check(&Limits::default())
            .unwrap()
            .iter()
            .map(|f| f.code),
    );
    c
}

fn expected(vsize: u64) -> Vec<u8> {
    let mut v = vec![0u8; vsize as usize];
    for g in DATA_GRAINS {
        let at = g as usize * GRAIN;
        v[at..at + GRAIN].copy_from_slice(&pattern(g));
    }
    v
}

fn read_all(img: VmdkImage) -> Vec<u8> {
    let vsize = img.info().virtual_size;
    let arc: Arc<dyn Image> = Arc::new(img);
    // Walk the mapping: disjoint, covering, contract respected.
    let mut pos = 0;
    while pos < vsize {
        let e = arc.mapping(pos, u64::MAX).unwrap();
        crate::image::validate_extent(&e, pos, u64::MAX, vsize).unwrap();
        pos = e.end();
    }
    let r = GuestReader::new(arc, &Limits::default());
    let mut buf = vec![0u8; vsize as usize];
    r.read_at(&mut buf, 0).unwrap();
    buf
}

#[test]
fn monolithic_sparse_reads_and_is_clean() {
    let img = open_bytes(sparse()).unwrap();
    assert_eq!(img.info().virtual_size, CAP * 512);
    assert_eq!(img.info().cluster_size, Some(65536));
    assert_eq!(img.info().details["create-type"], "monolithicSparse");
    assert_eq!(img.info().details["cid"], 0x12345678);
    assert!(img.info().references.is_empty());
    assert!(codes(&img).is_empty(), "{:?}", codes(&img));
    // Grains 0 and 1 are contiguous on the host: one extent.
    let e = (&img as &dyn Image).mapping(0, u64::MAX).unwrap();
    assert_eq!(
        (e.len, e.kind),
        (2 * GRAIN as u64, ExtentKind::Data { host: 128 * 512 })
    );
    // Grains 2..5 are unallocated: one extent.
    let e = (&img as &dyn Image)
        .mapping(2 * GRAIN as u64 + 100, u64::MAX)
        .unwrap();
    assert_eq!(
        (e.len, e.kind),
        (3 * GRAIN as u64 - 100, ExtentKind::Unallocated)
    );
    assert_eq!(read_all(img), expected(CAP * 512));
}

#[test]
fn stream_footer_form_reads_and_is_clean() {
    let img = open_bytes(stream()).unwrap();
    assert_eq!(img.info().details["create-type"], "streamOptimized");
    assert_eq!(img.info().details["extents"][0]["compressed"], true);
    assert!(codes(&img).is_empty(), "{:?}", codes(&img));
    let e = (&img as &dyn Image)
        .mapping(GRAIN as u64 + 5, u64::MAX)
        .unwrap();
    assert!(
        matches!(
            e.kind,
            ExtentKind::Compressed {
                skip: 5,
                unit_size: 65536,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.len, GRAIN as u64 - 5);
    assert_eq!(read_all(img), expected(CAP * 512));
}

#[test]
fn probe_sees_sparse_and_descriptors() {
    for b in [sparse(), stream(), desc("monolithicFlat", "").into_bytes()] {
        let p = Probe::new(&b).unwrap();
        assert!(probe(&p));
    }
    // An unknown version is still VMDK (qemu probes the magic alone), and fails to open.
    let mut b = sparse();
    b[4] = 9;
    assert!(probe(&Probe::new(&b).unwrap()));
    assert_eq!(open_bytes(b).err().unwrap().finding_code(), "vmdk.header");
    assert!(!probe(&Probe::new(&b"just text\n".to_vec()).unwrap()));
}

fn sparse_codes(b: Vec<u8>) -> Vec<&'static str> {
    codes(&open_bytes(b).unwrap())
}

#[test]
fn external_extent_with_and_without_slash() {
    for extra in [
        "RW 100 FLAT \"/etc/shadow\" 0",
        "RW 100 FLAT \"shadow\" 0",
        "RDONLY 100 SPARSE \"other.vmdk\"",
    ] {
        let img = open_bytes(sparse_with(&desc("monolithicSparse", extra))).unwrap();
        assert!(codes(&img).contains(&"vmdk.external-extent"), "{extra}");
        assert_eq!(img.info().references.len(), 1);
        assert_eq!(img.info().references[0].kind, RefKind::Extent);
    }
    // A FLAT first extent in an embedded descriptor is not this file either.
    let d = desc("monolithicSparse", "").replace(
        &format!("RW {CAP} SPARSE \"t.vmdk\""),
        "RW 10240 FLAT \"x\" 0",
    );
    let c = sparse_codes(sparse_with(&d));
    assert!(
        c.contains(&"vmdk.external-extent") && c.contains(&"vmdk.descriptor-syntax"),
        "{c:?}"
    );
}

#[test]
fn create_type_and_parent() {
    assert!(sparse_codes(sparse_with(&desc("monolithicFlat", ""))).contains(&"vmdk.create-type"));
    assert!(sparse_codes(sparse_with(&desc("streamOptimized", ""))).contains(&"vmdk.create-type"));
    let d = desc("monolithicSparse", "").replace("parentCID=ffffffff", "parentCID=1234abcd");
    let img = open_bytes(sparse_with(&d)).unwrap();
    assert!(codes(&img).contains(&"vmdk.parent"));
    assert_eq!(
        img.info().backing_file().unwrap().target,
        "parentCID=1234abcd"
    );
    let d = desc("monolithicSparse", "parentFileNameHint=\"base.vmdk\"");
    let img = open_bytes(sparse_with(&d)).unwrap();
    assert_eq!(img.info().backing_file().unwrap().target, "base.vmdk");
    // qemu scans 10 KiB from sector 1 even past a NUL-free short descriptor area.
    let mut b = sparse();
    b[36..44].copy_from_slice(&1u64.to_le_bytes());
    let text = desc("monolithicSparse", "");
    let filler = "#".repeat(512 - text.len() - 1) + "\n";
    let long = format!("{text}{filler}parentFileNameHint=\"evil.vmdk\"\n");
    b[512..512 + long.len()].copy_from_slice(long.as_bytes());
    assert!(sparse_codes(b).contains(&"vmdk.parent"));
}

#[test]
fn descriptor_offset_and_syntax() {
    let mut b = sparse();
    // Move the descriptor to sector 2: still inside the 20-sector area, so it parses.
    let text = desc("monolithicSparse", "");
    b[512..512 + text.len()].fill(0);
    b[1024..1024 + text.len()].copy_from_slice(text.as_bytes());
    b[28..36].copy_from_slice(&2u64.to_le_bytes());
    assert!(sparse_codes(b).contains(&"vmdk.descriptor-offset"));
    let c = sparse_codes(sparse_with(&desc(
        "monolithicSparse",
        "this is not a descriptor line",
    )));
    assert!(c.contains(&"vmdk.descriptor-syntax"), "{c:?}");
    let mut b = sparse();
    b[28..36].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(open_bytes(b).is_err());
    let mut b = sparse();
    b[36..44].copy_from_slice(&4096u64.to_le_bytes());
    assert_eq!(
        open_bytes(b).err().unwrap().finding_code(),
        "vmdk.descriptor-size"
    );
}

#[test]
fn descriptor_only_files_are_info_and_unsafe_to_map() {
    let text = "# Disk DescriptorFile\nversion=1\nCID=3369021f\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 6144 FLAT \"f-flat.vmdk\" 0\nRDONLY 10 ZERO\n";
    let img = open_bytes(text.as_bytes().to_vec()).unwrap();
    assert_eq!(img.info().virtual_size, 6144 * 512);
    assert_eq!(img.info().details["extents"][0]["format"], "FLAT");
    let c = codes(&img);
    for code in [
        "vmdk.descriptor-only",
        "vmdk.create-type",
        "vmdk.external-extent",
    ] {
        assert!(c.contains(&code), "{code} in {c:?}");
    }
    assert_eq!(img.info().references[0].target, "f-flat.vmdk");
    assert_eq!(
        (&img as &dyn Image).mapping(0, 1).unwrap_err().kind(),
        ErrorKind::Unsafe
    );

    // A sparse header of capacity 0 wrapping a descriptor: qemu would open its extents.
    let mut b = sparse_with(
        &desc("monolithicFlat", "").replace("SPARSE \"t.vmdk\"", "FLAT \"/dev/sda\" 0"),
    );
    b[12..20].copy_from_slice(&0u64.to_le_bytes());
    let img = open_bytes(b).unwrap();
    assert!(codes(&img).contains(&"vmdk.descriptor-only"));
    assert_eq!(img.info().references[0].target, "/dev/sda");
    assert_eq!(
        (&img as &dyn Image).mapping(0, 1).unwrap_err().kind(),
        ErrorKind::Unsafe
    );
}

#[test]
fn footer_inconsistencies() {
    let good = stream();
    let n = good.len();
    // Footer marker type wrong.
    let mut b = good.clone();
    b[n - 1536 + 12] = 2;
    assert_eq!(open_bytes(b).err().unwrap().finding_code(), "vmdk.footer");
    // EOS marker not empty.
    let mut b = good.clone();
    b[n - 512] = 1;
    assert_eq!(open_bytes(b).err().unwrap().finding_code(), "vmdk.footer");
    // Footer header disagrees on capacity.
    let mut b = good.clone();
    b[n - 1024 + 12] ^= 1;
    assert_eq!(open_bytes(b).err().unwrap().finding_code(), "vmdk.footer");
    // Footer without a grain directory.
    let mut b = good.clone();
    b[n - 1024 + 56..n - 1024 + 64].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(open_bytes(b).err().unwrap().finding_code(), "vmdk.footer");
    // Footer magic gone.
    let mut b = good;
    b[n - 1024] = b'X';
    assert_eq!(open_bytes(b).err().unwrap().finding_code(), "vmdk.footer");
}

#[test]
fn grain_size_is_checked() {
    let mut b = sparse();
    b[20..28].copy_from_slice(&96u64.to_le_bytes());
    assert_eq!(
        open_bytes(b).err().unwrap().finding_code(),
        "vmdk.grain-size"
    );
}

#[test]
fn tables_are_checked() {
    // GD past the end of the file.
    let mut b = sparse();
    b[56..64].copy_from_slice(&1_000_000u64.to_le_bytes());
    assert_eq!(
        open_bytes(b).err().unwrap().finding_code(),
        "table.out-of-bounds"
    );
    // Too many GD entries for the limits.
    let mut b = sparse();
    b[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = open(Arc::new(b), &Limits::tight()).err().unwrap();
    assert_eq!(e.finding_code(), "table.too-large");
    // A GT past the end: check reports it, mapping errors.
    let mut b = sparse();
    b[21 * 512..21 * 512 + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
    let img = open_bytes(b).unwrap();
    assert!(codes(&img).contains(&"table.out-of-bounds"));
    assert_eq!(
        (&img as &dyn Image)
            .mapping(0, 1)
            .unwrap_err()
            .finding_code(),
        "table.out-of-bounds"
    );
}

#[test]
fn grain_pointers_are_checked() {
    let gte = |g: usize| 22 * 512 + g * 4;
    // Grain past EOF.
    let mut b = sparse();
    b[gte(1)..gte(1) + 4].copy_from_slice(&100_000u32.to_le_bytes());
    let img = open_bytes(b).unwrap();
    assert!(codes(&img).contains(&"vmdk.gt-entry-out-of-bounds"));
    assert_eq!(
        (&img as &dyn Image)
            .mapping(GRAIN as u64, 1)
            .unwrap_err()
            .finding_code(),
        "vmdk.gt-entry-out-of-bounds"
    );
    // Grain on top of the descriptor.
    let mut b = sparse();
    b[gte(1)..gte(1) + 4].copy_from_slice(&2u32.to_le_bytes());
    assert!(sparse_codes(b).contains(&"vmdk.entry-into-metadata"));
    // Grain on top of the grain table.
    let mut b = sparse();
    b[gte(1)..gte(1) + 4].copy_from_slice(&22u32.to_le_bytes());
    assert!(sparse_codes(b).contains(&"vmdk.entry-into-metadata"));
    // The grain directory placed over the descriptor.
    let mut b = sparse();
    b[56..64].copy_from_slice(&2u64.to_le_bytes());
    b[2 * 512..2 * 512 + 4].copy_from_slice(&22u32.to_le_bytes());
    assert!(sparse_codes(b).contains(&"vmdk.metadata-overlap"));
    // Two entries for one grain.
    let mut b = sparse();
    b[gte(5)..gte(5) + 4].copy_from_slice(&128u32.to_le_bytes());
    assert!(sparse_codes(b).contains(&"vmdk.duplicate-grain"));
}

#[test]
fn stream_grain_markers_are_checked() {
    let b = stream();
    let img = open_bytes(b.clone()).unwrap();
    let ExtentKind::Compressed { host, .. } =
        (&img as &dyn Image).mapping(GRAIN as u64, 1).unwrap().kind
    else {
        panic!()
    };
    let marker = (host - 12) as usize;
    let mut m = b.clone();
    m[marker] ^= 1; // LBA no longer grain 1's
    let img = open_bytes(m).unwrap();
    assert!(codes(&img).contains(&"vmdk.grain-marker"));
    assert_eq!(
        (&img as &dyn Image)
            .mapping(GRAIN as u64, 1)
            .unwrap_err()
            .finding_code(),
        "vmdk.grain-marker"
    );
    let mut m = b;
    m[marker + 8..marker + 12].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
    assert!(codes(&open_bytes(m).unwrap()).contains(&"vmdk.grain-marker"));
}

#[test]
fn zero_grains_need_the_flag() {
    let mut b = sparse();
    b[8..12].copy_from_slice(&7u32.to_le_bytes());
    b[22 * 512 + 40..22 * 512 + 44].copy_from_slice(&1u32.to_le_bytes());
    b[27 * 512 + 40..27 * 512 + 44].copy_from_slice(&1u32.to_le_bytes());
    let img = open_bytes(b).unwrap();
    assert_eq!(
        (&img as &dyn Image)
            .mapping(10 * GRAIN as u64, u64::MAX)
            .unwrap()
            .kind,
        ExtentKind::Zero
    );
    assert!(codes(&img).is_empty());
}

#[test]
fn every_prefix_fails_cleanly() {
    for full in [sparse(), stream()] {
        for cut in (0..full.len()).step_by(97).chain([full.len() - 1]) {
            let b = full[..cut].to_vec();
            if let Ok(img) = open(Arc::new(b), &Limits::tight()) {
                let _ = img.check(&Limits::tight());
                let vs = img.info().virtual_size;
                let mut pos = 0;
                while pos < vs {
                    match (&img as &dyn Image).mapping(pos, u64::MAX) {
                        Ok(e) => pos = e.end(),
                        Err(_) => pos += 65536,
                    }
                }
            }
        }
    }
}

#[test]
fn warnings_for_extent_size_and_unclean_shutdown() {
    let d = desc("monolithicSparse", "").replace(&format!("RW {CAP} SPARSE"), "RW 99 SPARSE");
    let img = open_bytes(sparse_with(&d)).unwrap();
    let f = img
        .findings()
        .iter()
        .find(|f| f.code == "vmdk.extent-size")
        .unwrap();
    assert_eq!(f.severity, crate::finding::Severity::Warn);
    let mut b = sparse();
    b[72] = 1;
    let img = open_bytes(b).unwrap();
    let f = img
        .findings()
        .iter()
        .find(|f| f.code == "vmdk.unclean-shutdown")
        .unwrap();
    assert_eq!(f.severity, crate::finding::Severity::Warn);
}

#[test]
fn what_qemu_reads_past_the_declared_descriptor_is_reported() {
    // Capacity 0: qemu parses extents past the declared 1-sector descriptor, up to a NUL.
    let text = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n";
    let filler = "#".repeat(512 - text.len() - 1) + "\n";
    let body = format!("{text}{filler}RW 100 FLAT \"/etc/shadow\" 0\n");
    let mut b = header(1, 1, 0, 0, 0, 0);
    b[12..20].copy_from_slice(&0u64.to_le_bytes());
    b[36..44].copy_from_slice(&1u64.to_le_bytes());
    put(&mut b, 512, body.as_bytes());
    let img = open_bytes(b).unwrap();
    assert!(img
        .info()
        .references
        .iter()
        .any(|r| r.target == "/etc/shadow"));
    // A hint hidden in a comment of a descriptor file still names a parent for qemu.
    let text = "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n# parentFileNameHint=\"x\"\nRW 1 FLAT \"f\" 0\n";
    let img = open_bytes(text.as_bytes().to_vec()).unwrap();
    assert!(codes(&img).contains(&"vmdk.parent"));
    assert_eq!(
        img.info().backing_file().unwrap().kind,
        RefKind::BackingFile
    );
}

#[test]
fn redundant_tables_must_agree() {
    let mut b = sparse();
    // The redundant GT (sector 27) says grain 5 is elsewhere.
    b[27 * 512 + 20..27 * 512 + 24].copy_from_slice(&9999u32.to_le_bytes());
    let img = open_bytes(b).unwrap();
    let f = img.check(&Limits::default()).unwrap();
    assert!(
        f.iter()
            .any(|f| f.code == "vmdk.redundant-mismatch"
                && f.severity == crate::finding::Severity::Warn),
        "{f:?}"
    );
    // A grain on top of the redundant grain table is into metadata.
    let mut b = sparse();
    b[22 * 512 + 4..22 * 512 + 8].copy_from_slice(&27u32.to_le_bytes());
    assert!(sparse_codes(b).contains(&"vmdk.entry-into-metadata"));
}

/// 30,000 GD entries all naming the one GT, whose 512 one-sector grains all exist.
fn shared_gt_image() -> Vec<u8> {
    let gd_entries = 30_000u64;
    let cap = gd_entries * 512; // grains of one sector keep the file small
    let gd_sectors = (gd_entries * 4).div_ceil(512);
    let gt = 1 + gd_sectors;
    let first_grain = gt + 4;
    let mut img = header(1, 1, 1, 0, first_grain, 0);
    img[12..20].copy_from_slice(&cap.to_le_bytes());
    img[20..28].copy_from_slice(&1u64.to_le_bytes());
    img[28..36].copy_from_slice(&0u64.to_le_bytes()); // no embedded descriptor
    img[36..44].copy_from_slice(&0u64.to_le_bytes());
    for i in 0..gd_entries as usize {
        put(&mut img, 512 + i * 4, &(gt as u32).to_le_bytes());
    }
    for j in 0..512usize {
        let g = (first_grain + j as u64) as u32;
        put(&mut img, gt as usize * 512 + j * 4, &g.to_le_bytes());
    }
    put(&mut img, (first_grain as usize + 512) * 512 - 1, &[0u8]);
    img
}

#[test]
fn grain_tables_shared_by_many_directory_entries_are_walked_once() {
    // 30,000 GD entries all naming the one GT, whose 512 grains all exist: a record per
    // grain per entry would be 15 million records. The shared table is a finding, and the
    // check lists its grains once.
    let gd_entries = 30_000u64;
    let cap = gd_entries * 512; // grains of one sector keep the file small
    let gd_sectors = (gd_entries * 4).div_ceil(512);
    let gt = 1 + gd_sectors;
    let first_grain = gt + 4;
    let mut img = header(1, 1, 1, 0, first_grain, 0);
    img[12..20].copy_from_slice(&cap.to_le_bytes());
    img[20..28].copy_from_slice(&1u64.to_le_bytes());
    img[28..36].copy_from_slice(&0u64.to_le_bytes()); // no embedded descriptor
    img[36..44].copy_from_slice(&0u64.to_le_bytes());
    for i in 0..gd_entries as usize {
        put(&mut img, 512 + i * 4, &(gt as u32).to_le_bytes());
    }
    for j in 0..512usize {
        let g = (first_grain + j as u64) as u32;
        put(&mut img, gt as usize * 512 + j * 4, &g.to_le_bytes());
    }
    put(&mut img, (first_grain as usize + 512) * 512 - 1, &[0u8]);
    let img = open_bytes(img).unwrap();
    let limits = Limits {
        max_metadata_bytes: 16 << 20,
        ..Limits::default()
    };
    let f = img.check(&limits).unwrap();
    assert!(f.iter().any(|f| f.code == "vmdk.duplicate-grain"), "{f:?}");
    assert!(f.len() < 100, "{}", f.len());
}

#[test]
fn a_vsphere_encrypted_descriptor_marks_the_image_encrypted() {
    let keysafe = "encryption.keySafe = \"vmware:key/list/(pair/(null/,HMAC-SHA-256,x))\"\nencryption.data = \"AAAA\"\n";
    for b in [
        sparse_with(&desc("monolithicSparse", keysafe)),
        desc("monolithicFlat", keysafe).into_bytes(),
    ] {
        let img = open_bytes(b).unwrap();
        assert!(img.info().encrypted);
        assert_eq!(img.info().details["encrypt"]["format"], "vmware");
    }
    let plain = open_bytes(sparse_with(&desc("monolithicSparse", ""))).unwrap();
    assert!(!plain.info().encrypted);
}

#[test]
fn check_charges_its_lists_and_gives_them_back() {
    // The GD (30,000 entries, 120,000 bytes) stays charged while the image lives; check's
    // grain-table list (16 bytes per entry) is charged while it runs and then given back.
    let open_with = |bytes: u64| {
        let limits = Limits {
            max_metadata_bytes: bytes,
            ..Limits::default()
        }
        .per_command();
        let img = open(Arc::new(shared_gt_image()), &limits).unwrap();
        (limits, img)
    };
    let (limits, img) = open_with(1 << 20);
    assert_eq!(limits.budget().left(), (1 << 20) - 120_000);
    let f = img.check(&limits).unwrap();
    assert!(f.iter().any(|f| f.code == "vmdk.duplicate-grain"), "{f:?}");
    assert_eq!(limits.budget().left(), (1 << 20) - 120_000);
    drop(img);
    assert_eq!(limits.budget().left(), 1 << 20);
    // Room for the GD but not for 30,000 table records.
    let (limits, img) = open_with(400_000);
    let e = img.check(&limits).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    assert_eq!(limits.budget().left(), 400_000 - 120_000);
}

#[test]
fn grain_offset_past_the_end_is_refused_like_qemu() {
    // Report F6: grain_offset (overHead, byte 64) = 0xffffffff sectors; qemu: "File
    // truncated, expecting at least 2199023255040 bytes".
    let mut b = sparse();
    b[64..72].copy_from_slice(&0xffff_ffffu64.to_le_bytes());
    let e = open_bytes(b).err().unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (crate::error::ErrorKind::Truncated, "vmdk.header")
    );
    // Exactly the file's length (no grain after it) still opens.
    let mut b = sparse();
    let sectors = b.len() as u64 / 512;
    b[64..72].copy_from_slice(&sectors.to_le_bytes());
    assert!(open_bytes(b).is_ok());
}
