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
            // Nothing to read: convert cannot go on even when forced.
            assert!(r.image.is_none(), "{name}");
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
        // The same sector laid out as a FAT boot record is not a partition table.
        bytes[0x10] = 2;
        bytes[0x15] = 0xF8;
        assert!(!detect(&bytes).unwrap().partition_table, "{fmt}");
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
