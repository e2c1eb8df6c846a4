//! Detection is a superset of qemu's probe: every committed hostile fixture that `qemu-img
//! info` (probing, no `-f`) opens as a format other than raw is detected as that format by
//! glimpse. qemu-img must be installed: this test fails without it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{detect, Format, Limits};

fn hostile() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hostile")
}

/// Every fixture file under `dir`, recursively (scripts and READMEs left out).
fn fixtures(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            fixtures(&p, out);
        } else if !p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(glimpse_testkit::hostile::is_not_a_fixture)
        {
            out.push(p);
        }
    }
}

/// The format `qemu-img info` probes and opens `path` as, or `None` when it cannot open it.
/// (`-U`: a hostile descriptor may name a host file in use; qemu-img only reads metadata.)
fn qemu_format(path: &Path) -> Option<String> {
    let p = path.to_str().expect("a UTF-8 path");
    let out = glimpse_testkit::qemu::run(&["info", "-U", "--output=json", p]);
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img JSON");
    Some(v["format"].as_str().expect("a format name").to_string())
}

#[test]
fn every_format_qemu_probes_is_detected() {
    let mut files = Vec::new();
    fixtures(&hostile(), &mut files);
    assert!(files.len() > 40, "only {} fixtures found", files.len());
    let mut compared = 0;
    let mut wrong = Vec::new();
    for f in &files {
        let Some(qemu) = qemu_format(f) else { continue };
        compared += 1;
        if qemu == "raw" {
            continue;
        }
        let det = detect(&File::open(f).unwrap()).unwrap();
        if !det.matches.iter().any(|m| m.qemu_name() == qemu) {
            wrong.push(format!(
                "{}: qemu-img says {qemu}, glimpse {:?}",
                f.display(),
                det.matches
            ));
        }
    }
    assert!(compared > 30, "qemu-img opened only {compared} fixtures");
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn unsupported_formats_are_rejected_by_name() {
    let dir = hostile().join("unsupported");
    let cases = [
        ("bochs-growing.bochs", Format::Bochs),
        ("cloop-v2.cloop", Format::Cloop),
        ("udif-zero.dmg", Format::Dmg),
        ("qcow1-empty.qcow", Format::Qcow1),
    ];
    for (name, want) in cases {
        let path = dir.join(name);
        assert_eq!(
            qemu_format(&path).as_deref(),
            Some(want.qemu_name()),
            "{name}"
        );
        let det = detect(&File::open(&path).unwrap()).unwrap();
        assert_eq!(det.matches, vec![want], "{name}");
        for expect in [None, Some(Format::Raw)] {
            let policy = Policy {
                expect_format: expect,
                ..Policy::default()
            };
            let src = Arc::new(File::open(&path).unwrap());
            let r = inspect(src, &policy, &Limits::default()).unwrap();
            assert_eq!(r.verdict(), Verdict::Reject, "{name}");
            // Nothing to read: convert cannot go on even when forced. qcow1 alone opens as
            // far as its header (for its virtual size and backing file), and its guest data
            // is refused with the same code.
            match &r.image {
                None => assert_ne!(want, Format::Qcow1),
                Some(img) => {
                    assert_eq!(want, Format::Qcow1, "{name}");
                    let e = img.mapping(0, 1).expect_err("no guest data");
                    assert_eq!(e.finding_code(), "format.unsupported");
                }
            }
            let f = r
                .findings
                .iter()
                .find(|f| f.code == "format.unsupported")
                .unwrap_or_else(|| panic!("{name}: {:?}", r.findings));
            assert!(f.message.starts_with(want.name()), "{}", f.message);
            assert_eq!(
                r.findings
                    .iter()
                    .filter(|f| f.code == "format.unsupported")
                    .count(),
                1,
                "{name}"
            );
            if expect.is_some() {
                assert!(r.findings.iter().any(|f| f.code == "format.mismatch"));
            }
        }
    }
    assert_eq!(Format::Qcow1.name(), "qcow1");
}

#[test]
fn iso_with_a_descriptor_in_its_system_area_is_not_a_clean_iso() {
    let path = hostile().join("iso/vmdk-descriptor-in-system-area.iso");
    assert_eq!(qemu_format(&path).as_deref(), Some("vmdk"));
    let det = detect(&File::open(&path).unwrap()).unwrap();
    assert!(det.matches.contains(&Format::Vmdk), "{:?}", det.matches);
    let src = Arc::new(File::open(&path).unwrap());
    let r = inspect(src, &Policy::default(), &Limits::default()).unwrap();
    assert_eq!(r.verdict(), Verdict::Reject);
    let codes: Vec<_> = r.findings.iter().map(|f| f.code).collect();
    assert!(codes.contains(&"format.ambiguous"), "{codes:?}");
    assert!(codes.contains(&"vmdk.external-extent"), "{codes:?}");
}

/// A container whose first sector ends in the MBR signature is a partitioned disk to anything
/// that reads it raw, and two formats to Glance's inspector (its `gpt` match): refused as
/// ambiguous, for every container qemu-img writes. A raw disk with a partition table, a FAT
/// boot sector and a clean image are not.
#[test]
fn containers_carrying_a_partition_table_signature_are_ambiguous() {
    let tmp = tempfile::tempdir().unwrap();
    for fmt in ["qcow2", "vmdk", "vpc", "vhdx", "vdi", "parallels"] {
        let path = tmp.path().join(format!("t.{fmt}"));
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt])
            .arg(&path)
            .arg("16M")
            .status()
            .expect("qemu-img must be installed");
        assert!(st.success(), "{fmt}");
        let clean = std::fs::read(&path).unwrap();
        let det = detect(&clean).unwrap();
        assert!(!det.is_ambiguous(), "{fmt}: {:?}", det.names());
        let mut bytes = clean.clone();
        bytes[510] = 0x55;
        bytes[511] = 0xAA;
        if fmt == "vpc" {
            // The footer copy at byte 0 is checksummed (the one's complement of its byte sum,
            // the field itself left out).
            bytes[64..68].fill(0);
            let sum: u32 = bytes[..512].iter().map(|b| u32::from(*b)).sum();
            bytes[64..68].copy_from_slice(&(!sum).to_be_bytes());
        }
        // qemu still opens it as the container.
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(qemu_format(&path).as_deref(), Some(fmt), "{fmt}");
        let det = detect(&bytes).unwrap();
        assert!(det.is_ambiguous(), "{fmt}");
        assert!(det.names().contains(&"mbr/gpt"), "{fmt}: {:?}", det.names());
        let r = inspect(
            Arc::new(bytes.clone()),
            &Policy::default(),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(r.verdict(), Verdict::Reject, "{fmt}");
        assert!(
            r.findings.iter().any(|f| f.code == "format.ambiguous"),
            "{fmt}"
        );
        // Glance's two FAT bytes (two FATs, fixed-disk media) do not make it a FAT boot
        // record: no jump, no BPB, no FAT label, and the kernel still reads the entries.
        bytes[0x10] = 2;
        bytes[0x15] = 0xF8;
        assert!(detect(&bytes).unwrap().is_ambiguous(), "{fmt}");
    }
    let mut raw = vec![0u8; 1 << 20];
    raw[446 + 4] = 0x83;
    raw[446 + 8] = 1;
    raw[446 + 12] = 100;
    raw[510] = 0x55;
    raw[511] = 0xAA;
    let det = detect(&raw).unwrap();
    assert!(det.partition_table && !det.is_ambiguous());
    // The same disk as a fixed VHD (the guest bytes, then a footer): its partition table is
    // content.
    let path = tmp.path().join("raw.img");
    std::fs::write(&path, &raw).unwrap();
    let vhd = tmp.path().join("fixed.vhd");
    let st = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            "subformat=fixed",
        ])
        .arg(&path)
        .arg(&vhd)
        .status()
        .expect("qemu-img must be installed");
    assert!(st.success());
    let det = detect(&std::fs::read(&vhd).unwrap()).unwrap();
    assert_eq!(det.matches, [Format::Vhd]);
    assert!(!det.is_ambiguous(), "{:?}", det.names());
}

/// `qemu-img create -f FMT` of 8 MiB, read back.
fn qemu_created(dir: &Path, fmt: &str) -> Vec<u8> {
    let path = dir.join(format!("c.{fmt}"));
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .arg(&path)
        .arg("8M")
        .status()
        .expect("qemu-img must be installed");
    assert!(st.success(), "{fmt}");
    std::fs::read(&path).unwrap()
}

/// Sector 0 as an MBR with one Linux partition (active), and Glance's two FAT bytes set.
fn fat_bytes_mbr(b: &mut [u8]) {
    b[446] = 0x80;
    b[446 + 4] = 0x83;
    b[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    b[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
    b[462..510].fill(0);
    b[510] = 0x55;
    b[511] = 0xAA;
    b[0x10] = 2;
    b[0x15] = 0xF8;
}

fn assert_ambiguous_polyglot(bytes: Vec<u8>, want: Format, what: &str) {
    let det = detect(&bytes).unwrap();
    assert_eq!(det.matches, [want], "{what}");
    assert!(det.is_ambiguous(), "{what}");
    assert!(
        det.names().contains(&"mbr/gpt"),
        "{what}: {:?}",
        det.names()
    );
    let r = inspect(Arc::new(bytes), &Policy::default(), &Limits::default()).unwrap();
    assert_eq!(r.verdict(), Verdict::Reject, "{what}");
    assert!(
        r.findings.iter().any(|f| f.code == "format.ambiguous"),
        "{what}: {:?}",
        r.findings
    );
}

/// Report red2 F2: a VHDX or Parallels file whose first sector is also a valid MBR (boot
/// indicators 0x00/0x80, so the kernel reads it; `blkid -p` says `PTTYPE="dos"`) stays
/// ambiguous when bytes 0x10 and 0x15 hold Glance's FAT shortcut (2, 0xF8). In Parallels,
/// byte 0x10 is the version field, 2 already.
#[test]
fn fat_bytes_do_not_hide_an_mbr_in_a_container() {
    let tmp = tempfile::tempdir().unwrap();
    for (fmt, want) in [("vhdx", Format::Vhdx), ("parallels", Format::Parallels)] {
        let mut bytes = qemu_created(tmp.path(), fmt);
        fat_bytes_mbr(&mut bytes);
        // qemu still opens it as the container.
        let path = tmp.path().join(format!("poly.{fmt}"));
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(qemu_format(&path).as_deref(), Some(fmt), "{fmt}");
        assert_ambiguous_polyglot(bytes, want, fmt);
    }
}

/// Report red2 F2, GPT variant: a VHDX whose identifier region holds a complete primary GPT
/// (protective MBR with Glance's FAT bytes, `EFI PART` header at LBA 1 with valid CRCs, one
/// partition) is ambiguous, at 512-byte and at 4096-byte (4Kn) sectors. (A sector 0 that
/// is also a full FAT BPB with a GPT behind it is covered by the `partition` unit tests: the
/// VHDX magic leaves no room for a jump instruction.)
#[test]
fn fat_bytes_do_not_hide_a_gpt_in_a_container() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = qemu_created(tmp.path(), "vhdx");
    for sector in [512usize, 4096] {
        let mut b = clean.clone();
        let lbas = u64::try_from(b.len() / sector).unwrap();
        b[446..510].fill(0);
        b[446 + 4] = 0xEE;
        b[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        b[446 + 12..446 + 16].copy_from_slice(&u32::try_from(lbas - 1).unwrap().to_le_bytes());
        b[510] = 0x55;
        b[511] = 0xAA;
        b[0x10] = 2;
        b[0x15] = 0xF8;
        // 4 entries of 128 bytes at LBA 2, one Linux partition at LBAs 40..=100.
        let e = 2 * sector;
        b[e..e + 4 * 128].fill(0);
        b[e..e + 16].copy_from_slice(&[0xaf; 16]);
        b[e + 16..e + 32].copy_from_slice(&[0x01; 16]);
        b[e + 32..e + 40].copy_from_slice(&40u64.to_le_bytes());
        b[e + 40..e + 48].copy_from_slice(&100u64.to_le_bytes());
        let entries_crc = crc32fast::hash(&b[e..e + 4 * 128]);
        let h = sector;
        b[h..h + 512].fill(0);
        b[h..h + 8].copy_from_slice(b"EFI PART");
        b[h + 8..h + 12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        b[h + 12..h + 16].copy_from_slice(&92u32.to_le_bytes());
        b[h + 24..h + 32].copy_from_slice(&1u64.to_le_bytes());
        b[h + 32..h + 40].copy_from_slice(&(lbas - 1).to_le_bytes());
        b[h + 56..h + 72].copy_from_slice(&[0x02; 16]);
        b[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        b[h + 80..h + 84].copy_from_slice(&4u32.to_le_bytes());
        b[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        b[h + 88..h + 92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[h..h + 92]);
        b[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
        let what = format!("{sector}-byte sectors");
        let path = tmp.path().join("gpt.vhdx");
        std::fs::write(&path, &b).unwrap();
        assert_eq!(qemu_format(&path).as_deref(), Some("vhdx"), "{what}");
        assert_ambiguous_polyglot(b, Format::Vhdx, &what);
    }
}

/// Report wild-diff F2: qemu reads the probe buffer with zeros past the end of a short file, so
/// a file cut right after the last non-NUL byte of a format's magic (and of the fields qemu's
/// probe compares with it) is still that format to qemu: a 3-byte file `QED` is QED. glimpse's
/// magic probes compare the same zero-padded bytes. qemu-img decides: on the cut file its
/// probe picks a driver other than raw (it opens the file as that format, or that driver
/// refuses it while `-f raw` opens it), and glimpse detects the format.
#[test]
fn a_magic_cut_after_its_last_non_nul_byte_is_probed_as_qemu_probes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let luks = [
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "key-secret=s0,iter-time=10",
    ];
    // (qemu-img format, create options, glimpse's format, bytes qemu's probe compares)
    let made: [(&str, &[&str], Format, usize); 9] = [
        ("qcow2", &[], Format::Qcow2, 8),
        ("qcow", &[], Format::Qcow1, 8),
        ("qed", &[], Format::Qed, 4),
        ("vmdk", &[], Format::Vmdk, 4),
        ("vpc", &[], Format::Vhd, 8),
        ("vhdx", &[], Format::Vhdx, 8),
        ("vdi", &[], Format::Vdi, 68),
        ("parallels", &[], Format::Parallels, 20),
        ("luks", &luks, Format::Luks, 8),
    ];
    let mut cases: Vec<(String, Vec<u8>, Format, usize)> = Vec::new();
    for (fmt, opts, want, window) in made {
        let path = tmp.path().join(format!("made.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt];
        args.extend(opts);
        args.extend([path.to_str().unwrap(), "8M"]);
        glimpse_testkit::qemu::img(&args);
        cases.push((fmt.to_string(), std::fs::read(&path).unwrap(), want, window));
    }
    // Bochs (qemu-img does not write it): magic, type, subtype as C strings, version 2.0.
    let mut bochs = vec![0u8; 512];
    bochs[..22].copy_from_slice(b"Bochs Virtual HD Image");
    bochs[32..39].copy_from_slice(b"Redolog");
    bochs[48..55].copy_from_slice(b"Growing");
    bochs[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    cases.push(("bochs".to_string(), bochs, Format::Bochs, 68));
    let mut shorter = Vec::new();
    for (fmt, bytes, want, window) in cases {
        let cut = bytes[..window].iter().rposition(|&b| b != 0).unwrap() + 1;
        if cut < window {
            shorter.push(fmt.clone());
        }
        let path = tmp.path().join(format!("cut-{fmt}"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let p = path.to_str().unwrap();
        let out = glimpse_testkit::qemu::run(&["info", "-U", "--output=json", p]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_ne!(v["format"], "raw", "{fmt}: qemu probes {v}");
        } else {
            // Not raw: qemu's raw driver opens any readable file.
            let raw = glimpse_testkit::qemu::run(&["info", "-U", "-f", "raw", p]);
            assert!(raw.status.success(), "{fmt}");
        }
        let det = detect(&bytes[..cut].to_vec()).unwrap();
        assert_eq!(det.matches, [want], "{fmt} cut to {cut} bytes");
    }
    // The cases where the padding matters: a magic or a field qemu compares ends in NULs.
    assert_eq!(shorter, ["qed", "parallels", "bochs"]);
}
