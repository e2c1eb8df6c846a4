//! ISO 9660 / UDF / hybrid ISO images made by genisoimage and xorriso.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{detect, open, ErrorKind, Format, Limits, Source, Window};

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A small file tree to put on the discs.
fn tree(dir: &Path) -> PathBuf {
    let t = dir.join("tree");
    std::fs::create_dir_all(t.join("docs")).unwrap();
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(t.join("data.bin"), data).unwrap();
    std::fs::write(t.join("docs/readme.txt"), "glimpse\n").unwrap();
    t
}

fn genisoimage(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let t = tree(dir);
    let out = dir.join(name);
    run(Command::new("genisoimage")
        .arg("-quiet")
        .arg("-o")
        .arg(&out)
        .args(["-V", "GLIMPSE", "-sysid", "LINUX"])
        .args(extra)
        .arg(&t));
    out
}

fn efi_image(dir: &Path) -> PathBuf {
    let efi = dir.join("efi.img");
    run(Command::new("mkfs.vfat").arg("-C").arg(&efi).arg("1440"));
    efi
}

fn xorriso(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let t = tree(dir);
    let out = dir.join(name);
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-o"])
        .arg(&out)
        .args(["-V", "GLIMPSE_HYB"])
        .args(extra)
        .arg(&t));
    out
}

fn src(path: &Path) -> Source {
    Arc::new(std::fs::File::open(path).unwrap())
}

/// The volume size that `isoinfo -d` reports: an independent reading of the descriptor.
fn isoinfo_volume_bytes(path: &Path) -> u64 {
    let out = Command::new("isoinfo")
        .arg("-d")
        .arg("-i")
        .arg(path)
        .output()
        .expect("isoinfo (genisoimage) is required");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("isoinfo printed no {name:?}: {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    field("Volume size is:") * field("Logical block size is:")
}

#[test]
fn plain_iso_details_and_size_match_isoinfo() {
    let dir = tempfile::tempdir().unwrap();
    let path = genisoimage(dir.path(), "plain.iso", &["-J", "-R"]);
    let s = src(&path);
    let det = detect(s.as_ref()).unwrap();
    assert_eq!(det.matches, vec![Format::Iso]);
    let img = open(s, Format::Iso, &Limits::default()).unwrap();
    let info = img.info();
    assert_eq!(info.virtual_size, isoinfo_volume_bytes(&path));
    assert_eq!(info.details["volume-id"], "GLIMPSE");
    assert_eq!(info.details["system-id"], "LINUX");
    assert_eq!(info.details["block-size"], 2048);
    assert_eq!(info.details["joliet"], true);
    assert_eq!(info.details["udf"], false);
    assert_eq!(info.details["hybrid"], false);
    assert_eq!(info.details["el-torito"], false);
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    // The mapping covers the volume linearly.
    let mut pos = 0;
    while pos < info.virtual_size {
        let e = img.mapping(pos, 1 << 16).unwrap();
        glimpse_formats::validate_extent(&e, pos, 1 << 16, info.virtual_size).unwrap();
        if !e.reads_as_zero() {
            assert_eq!(e.kind, glimpse_formats::ExtentKind::Data { host: pos });
        }
        pos = e.end();
    }
    // qemu-img calls an ISO raw and reports the file's size; genisoimage writes exactly the
    // volume, so both readings agree here.
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(&path)
        .output()
        .expect("qemu-img is required");
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(q["virtual-size"].as_u64().unwrap(), info.virtual_size);
    // Reading the guest through the mapping gives the file's bytes.
    let size = info.virtual_size;
    let reader = glimpse_formats::reader::GuestReader::new(Arc::from(img), &Limits::default());
    let mut guest = vec![0u8; usize::try_from(size).unwrap()];
    reader.read_at(&mut guest, 0).unwrap();
    assert!(guest == std::fs::read(&path).unwrap());
}

#[test]
fn sparse_padding_maps_as_unallocated() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = genisoimage(dir.path(), "sparse.iso", &[]);
    let len = std::fs::metadata(&path).unwrap().len();
    // Grow the volume by 64 MiB of hole and say so in both halves of the volume space size.
    let blocks = u32::try_from((len + (64 << 20)) / 2048).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(32768 + 80)).unwrap();
    f.write_all(&blocks.to_le_bytes()).unwrap();
    f.write_all(&blocks.to_be_bytes()).unwrap();
    f.set_len(u64::from(blocks) * 2048).unwrap();
    drop(f);
    let img = open(src(&path), Format::Iso, &Limits::default()).unwrap();
    assert!(img.findings().is_empty(), "{:?}", img.findings());
    let (mut pos, mut zero, mut calls) = (0u64, 0u64, 0);
    while pos < img.info().virtual_size {
        let e = img.mapping(pos, u64::MAX).unwrap();
        glimpse_formats::validate_extent(&e, pos, u64::MAX, img.info().virtual_size).unwrap();
        if e.reads_as_zero() {
            zero += e.len;
        }
        pos = e.end();
        calls += 1;
    }
    // The 64 MiB hole is one extent (as zeros where the filesystem reports holes).
    assert!(calls < 64, "{calls} extents");
    assert!(zero == 0 || zero >= 60 << 20, "{zero}");
}

#[test]
fn udf_bridge_is_iso_with_udf() {
    let dir = tempfile::tempdir().unwrap();
    let path = genisoimage(dir.path(), "udf.iso", &["-udf", "-R"]);
    let s = src(&path);
    assert_eq!(detect(s.as_ref()).unwrap().matches, vec![Format::Iso]);
    let img = open(s, Format::Iso, &Limits::default()).unwrap();
    assert_eq!(img.info().details["udf"], true);
    assert_eq!(img.info().virtual_size, isoinfo_volume_bytes(&path));
}

#[test]
fn el_torito_boot_record() {
    let dir = tempfile::tempdir().unwrap();
    let t = tree(dir.path());
    std::fs::write(t.join("boot.img"), vec![0xF4u8; 2048]).unwrap();
    let out = dir.path().join("boot.iso");
    run(Command::new("genisoimage")
        .args(["-quiet", "-no-emul-boot", "-b", "boot.img", "-o"])
        .arg(&out)
        .arg(&t));
    let img = open(src(&out), Format::Iso, &Limits::default()).unwrap();
    assert_eq!(img.info().details["el-torito"], true);
}

#[test]
fn hybrid_mbr_is_iso_not_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let efi = efi_image(dir.path());
    let path = xorriso(
        dir.path(),
        "hyb-mbr.iso",
        &[
            "-partition_offset",
            "16",
            "-append_partition",
            "2",
            "0xef",
            efi.to_str().unwrap(),
        ],
    );
    let s = src(&path);
    let det = detect(s.as_ref()).unwrap();
    assert_eq!(det.matches, vec![Format::Iso]);
    assert!(!det.is_ambiguous());
    let img = open(s.clone(), Format::Iso, &Limits::default()).unwrap();
    let d = &img.info().details;
    assert_eq!(d["hybrid"], true);
    assert_eq!(d["partition-table"], "mbr");
    assert_eq!(d["partitions"].as_array().unwrap().len(), 2);
    assert_eq!(img.info().virtual_size, isoinfo_volume_bytes(&path));
    // With -partition_offset xorriso counts the appended partition into the volume size.
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(file_len, img.info().virtual_size);
    assert!(d.get("trailing-bytes").is_none());
    let r = inspect(
        s,
        &Policy {
            expect_format: Some(Format::Iso),
            ..Policy::default()
        },
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(r.verdict(), Verdict::Pass, "{:?}", r.findings);
}

#[test]
fn hybrid_gpt_is_iso_with_gpt_details() {
    let dir = tempfile::tempdir().unwrap();
    let efi = efi_image(dir.path());
    let path = xorriso(
        dir.path(),
        "hyb-gpt.iso",
        &[
            "-append_partition",
            "2",
            "0xef",
            efi.to_str().unwrap(),
            "-appended_part_as_gpt",
        ],
    );
    let s = src(&path);
    assert_eq!(detect(s.as_ref()).unwrap().matches, vec![Format::Iso]);
    let img = open(s, Format::Iso, &Limits::default()).unwrap();
    let d = &img.info().details;
    assert_eq!(d["hybrid"], true);
    assert_eq!(d["partition-table"], "gpt");
    assert!(!d["partitions"].as_array().unwrap().is_empty());
    // Without -partition_offset the appended partition lies after the ISO volume.
    // The guest disk is the whole file, the appended partition included.
    let file_len = std::fs::metadata(&path).unwrap().len();
    let vol = isoinfo_volume_bytes(&path);
    assert_eq!(d["volume-size"], vol);
    assert_eq!(img.info().virtual_size, file_len);
    assert_eq!(d["trailing-bytes"], file_len - vol);
    assert!(
        img.findings().iter().all(|f| f.code != "raw.gpt-checksum"),
        "{:?}",
        img.findings()
    );
}

#[test]
fn padded_iso_is_the_whole_file_and_reports_the_volume_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = genisoimage(dir.path(), "pad.iso", &[]);
    let vol = isoinfo_volume_bytes(&path);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(vol + 4096 * 3).unwrap();
    let img = open(src(&path), Format::Iso, &Limits::default()).unwrap();
    assert_eq!(img.info().virtual_size, vol + 4096 * 3);
    assert_eq!(img.info().details["volume-size"], vol);
    assert_eq!(img.info().details["trailing-bytes"], 4096 * 3);
}

fn patched(path: &Path, at: usize, bytes: &[u8]) -> Source {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    Arc::new(b)
}

#[test]
fn finding_iso_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path = genisoimage(dir.path(), "t.iso", &[]);
    let mut b = std::fs::read(&path).unwrap();
    b.truncate(b.len() - 2048);
    let s: Source = Arc::new(b);
    let r = inspect(s, &Policy::default(), &Limits::default()).unwrap();
    assert_eq!(r.verdict(), Verdict::Reject);
    assert!(
        r.findings.iter().any(|f| f.code == "iso.truncated"),
        "{:?}",
        r.findings
    );
}

#[test]
fn finding_iso_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let path = genisoimage(dir.path(), "d.iso", &[]);
    // Logical block size 4096 in both halves: larger than the 2048-byte sector.
    let s = patched(&path, 32768 + 128, &[0x00, 0x10, 0x10, 0x00]);
    let e = open(s.clone(), Format::Iso, &Limits::default())
        .err()
        .unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::Invalid, "iso.descriptor")
    );
    let r = inspect(s, &Policy::default(), &Limits::default()).unwrap();
    assert!(r.findings.iter().any(|f| f.code == "iso.descriptor"));
}

#[test]
fn finding_iso_no_primary() {
    let dir = tempfile::tempdir().unwrap();
    let path = genisoimage(dir.path(), "n.iso", &[]);
    // Turn the primary descriptor into a volume partition descriptor (type 3).
    let s = patched(&path, 32768, &[3]);
    assert_eq!(detect(s.as_ref()).unwrap().matches, vec![Format::Iso]);
    let e = open(s, Format::Iso, &Limits::default()).err().unwrap();
    assert_eq!(e.finding_code(), "iso.no-primary");
}

/// Every truncated prefix errors or reports `iso.truncated`; none panics.
#[test]
fn truncated_prefixes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let efi = efi_image(dir.path());
    let paths = [
        genisoimage(dir.path(), "p.iso", &["-J"]),
        genisoimage(dir.path(), "u.iso", &["-udf"]),
        xorriso(
            dir.path(),
            "h.iso",
            &[
                "-append_partition",
                "2",
                "0xef",
                efi.to_str().unwrap(),
                "-appended_part_as_gpt",
            ],
        ),
    ];
    for path in paths {
        let full: Arc<Vec<u8>> = Arc::new(std::fs::read(&path).unwrap());
        let whole = open(full.clone(), Format::Iso, &Limits::default()).unwrap();
        let vol = whole.info().details["volume-size"].as_u64().unwrap();
        // Byte by byte through the descriptor area, then every sector boundary and its
        // neighbours to the end.
        let mut lens: Vec<u64> = (0..36_000u64).step_by(7).chain(32_760..38_920).collect();
        for s in (0..full.len() as u64).step_by(2048) {
            lens.extend([s.saturating_sub(1), s, s + 1]);
        }
        for len in lens.into_iter().filter(|&l| l < full.len() as u64) {
            let s: Source = Arc::new(Window::new(full.clone(), 0, len).unwrap());
            match open(s.clone(), Format::Iso, &Limits::tight()) {
                Err(_) => {}
                Ok(img) => {
                    if len < vol {
                        assert!(
                            img.findings().iter().any(|f| f.code == "iso.truncated"),
                            "len {len}"
                        );
                        assert!(img.mapping(len, 1).is_err());
                    }
                    if len > 0 && len <= vol {
                        let e = img.mapping(len - 1, u64::MAX).unwrap();
                        assert_eq!(e.end(), len);
                    }
                }
            }
            let _ = detect(s.as_ref()).unwrap();
        }
    }
}

/// The committed hostile files (fixtures/hostile/iso/README.md) give the codes their
/// `expected-codes` lines list; the ISO ones are detected as ISO alone.
#[test]
fn hostile_fixtures() {
    for (fx, r) in glimpse_testkit::hostile::check_dir("iso") {
        let name = &fx.name;
        assert_eq!(r.verdict(), Verdict::Reject, "{name}");
        if fx.codes.iter().any(|c| c.starts_with("vmdk.")) {
            continue; // the VMDK descriptor in the system area: tests/detect.rs
        }
        assert_eq!(
            detect(src(&fx.path).as_ref()).unwrap().matches,
            vec![Format::Iso],
            "{name}"
        );
    }
}

/// `fixtures/generate.sh` runs, writes its manifest, and the ISO, LUKS and raw variants it
/// lists are detected as the manifest says (raw: no format matched) and open.
#[test]
fn generate_sh_iso_luks_raw_variants() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generate.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "generate.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "one summary line"
    );
    let manifest = std::fs::read_to_string(dir.path().join("manifest.tsv")).unwrap();
    let mut seen = 0;
    for line in manifest.lines().filter(|l| !l.starts_with('#')) {
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "{line}");
        let path = dir.path().join(cols[0]);
        assert!(path.is_file(), "{line}");
        let fmt: Format = cols[1].parse().unwrap();
        if !matches!(fmt, Format::Iso | Format::Luks | Format::Raw) {
            continue;
        }
        seen += 1;
        let s = src(&path);
        let det = detect(s.as_ref()).unwrap();
        let want = if fmt == Format::Raw {
            vec![]
        } else {
            vec![fmt]
        };
        assert_eq!(det.matches, want, "{line}");
        let img = open(s, fmt, &Limits::default()).unwrap();
        // The GPT hybrid appends partitions past the volume: that one warning is expected.
        let unexpected: Vec<_> = img
            .findings()
            .iter()
            .filter(|f| f.code != "iso.trailing-data")
            .collect();
        assert!(unexpected.is_empty(), "{line}: {unexpected:?}");
        assert_eq!(
            img.findings().iter().any(|f| f.code == "iso.trailing-data"),
            cols[0] == "iso-hybrid-gpt.iso",
            "{line}"
        );
        if fmt == Format::Iso {
            assert_eq!(
                img.info().details["volume-size"],
                isoinfo_volume_bytes(&path),
                "{line}"
            );
            let file_len = std::fs::metadata(&path).unwrap().len();
            assert_eq!(img.info().virtual_size, file_len, "{line}");
        }
    }
    assert_eq!(seen, 9);
}
