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
