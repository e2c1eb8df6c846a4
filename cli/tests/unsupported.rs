//! Files qemu-img opens as a format are never raw to glimpse (issue 11 §1, issue 12): the
//! committed samples of formats glimpse does not read, and the VMDK descriptors that qemu's
//! probe claims, are rejected by `check` (also when declared raw) and never converted, even
//! with `--force`.

mod support;

use std::path::{Path, PathBuf};

use serde_json::Value;
use support::{glimpse, json_of, s};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/hostile")
        .join(rel)
}

/// The one report of a single-file `check --output json` (an object, or an array of one).
fn report(v: Value) -> Value {
    match v {
        Value::Array(mut a) if a.len() == 1 => a.remove(0),
        other => other,
    }
}

/// Each fixture and the format `check` names; the codes are its line in the folder's
/// `expected-codes`.
const CASES: [(&str, &str); 9] = [
    ("unsupported/bochs-growing.bochs", "bochs"),
    ("unsupported/cloop-v2.cloop", "cloop"),
    ("unsupported/udif-zero.dmg", "dmg"),
    ("unsupported/qcow1-empty.qcow", "qcow1"),
    ("vmdk/version-first-extent-after-comments.vmdk", "vmdk"),
    ("vmdk/binary-after-nul.vmdk", "vmdk"),
    ("vmdk/control-char-in-comment.vmdk", "vmdk"),
    ("vmdk/cowd-parent-hint.vmdk", "vmdk"),
    ("iso/vmdk-descriptor-in-system-area.iso", "vmdk"),
];

#[test]
fn check_rejects_them_even_when_declared_raw() {
    for (rel, format) in CASES {
        let path = fixture(rel);
        let (folder, name) = rel.split_once('/').unwrap();
        let want = glimpse_testkit::hostile::fixture(folder, name).codes;
        for declared in [None, Some("raw")] {
            let mut args = vec!["check", "--output", "json"];
            if let Some(d) = declared {
                args.extend(["--expect-format", d]);
            }
            args.push(s(&path));
            let out = glimpse(&args);
            assert_eq!(out.status.code(), Some(1), "{rel} {declared:?}");
            let v = report(json_of(&out));
            assert_eq!(v["verdict"], "reject", "{rel}");
            assert_eq!(v["format"], format, "{rel}: {v}");
            let codes = support::codes(&v);
            if declared.is_none() {
                assert_eq!(codes, want, "{rel}");
            }
            assert!(want.iter().all(|c| codes.contains(c)), "{rel}: {codes:?}");
            if declared.is_some() {
                assert!(codes.iter().any(|c| c == "format.mismatch"), "{rel}");
            }
        }
    }
}

#[test]
fn convert_refuses_them_even_forced() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("out.raw");
    for (rel, _) in CASES {
        let path = fixture(rel);
        for force in [false, true] {
            let mut args = vec!["convert", "-O", "raw"];
            if force {
                args.push("--force");
            }
            args.extend([s(&path), s(&dst)]);
            let out = glimpse(&args);
            // A policy refusal is exit 1; forced, the file still cannot be read: exit 2.
            let want = if force { 2 } else { 1 };
            assert_eq!(out.status.code(), Some(want), "{rel} force={force}");
            assert!(!dst.exists(), "{rel} force={force}: an output was left");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!err.contains("panicked"), "{rel}: {err}");
        }
    }
}

/// Runs `glimpse upload <first> [--disk-format <declared>] <path>` against an image service URL
/// with no server behind it. Returns the arguments, the exit code and stderr.
fn upload_to_nowhere<'a>(
    first: &[&'a str],
    declared: Option<&'a str>,
    path: &'a Path,
) -> (Vec<&'a str>, Option<i32>, String) {
    let mut args = vec!["upload"];
    args.extend_from_slice(first);
    if let Some(d) = declared {
        args.extend(["--disk-format", d]);
    }
    args.push(s(path));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(&args)
        .env("OS_IMAGE_URL", "http://127.0.0.1:9")
        .env("OS_AUTH_TOKEN", "unused")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (args, out.status.code(), err)
}

/// `upload` inspects a declared ploop like any other format (glimpse reads Parallels since
/// issue 14): anything else declared ploop, or a Parallels file declared raw, is a mismatch.
/// The refusal comes before any request: the URL here has no server.
#[test]
fn upload_refuses_them_before_sending_anything() {
    let parallels = fixture("unsupported/parallels-empty.parallels");
    let qcow1 = fixture("unsupported/qcow1-empty.qcow");
    let cases: [(&Path, Option<&str>, &[&str]); 2] = [
        (&parallels, Some("raw"), &["format.mismatch"]),
        (
            &qcow1,
            Some("ploop"),
            &["format.mismatch", "format.unsupported"],
        ),
    ];
    for (path, declared, codes) in cases {
        let (args, code, err) = upload_to_nowhere(&[], declared, path);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        for code in codes {
            assert!(err.contains(code), "{args:?}: {err}");
        }
        assert!(err.contains("nothing was sent"), "{args:?}: {err}");
    }
}

/// A good Parallels image declared ploop (or detected, with no declaration) passes the
/// inspection: upload goes on to create the image, which fails here only because the URL has
/// no server. The same file declared raw is refused before anything is sent.
#[test]
fn upload_inspects_a_good_ploop_and_goes_on() {
    let good =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/parallels/v2-qemu.parallels");
    for declared in [Some("ploop"), None] {
        let (args, code, err) = upload_to_nowhere(&["--name", "x"], declared, &good);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("POST"), "{args:?}: {err}");
        assert!(!err.contains("rejected"), "{args:?}: {err}");
    }
}
