//! The command-line contract of issue 12 ("One JSON contract, one exit-code contract", "Usage
//! errors and messages") and issue 11 §4 (encrypted images): one test per promise.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::qemu::img as qemu_img;
use support::schema::{assert_kebab, assert_valid};
use support::{glimpse, json_of, s};

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A 1 MiB raw disk with some data.
fn raw(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut d = vec![0u8; 1 << 20];
    d[4096..8192].fill(0xab);
    std::fs::write(&p, d).unwrap();
    p
}

/// A qcow2 overlay of a raw base.
fn overlay(dir: &Path) -> PathBuf {
    let base = raw(dir, "base.raw");
    let ov = dir.join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&ov),
    ]);
    ov
}

/// A one-disk OVA (descriptor, then a raw disk), archived with GNU tar.
fn ova(dir: &Path) -> PathBuf {
    let src = dir.join("ova.d");
    std::fs::create_dir_all(&src).unwrap();
    raw(&src, "disk.raw");
    let ovf = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="f0" ovf:href="disk.raw" ovf:size="1048576"/></References>
  <DiskSection><Info>disks</Info><Disk ovf:diskId="d0" ovf:fileRef="f0" ovf:capacity="1048576" ovf:capacityAllocationUnits="byte"/></DiskSection>
  <VirtualSystem ovf:id="vm"><Info>vm</Info></VirtualSystem>
</Envelope>
"#;
    std::fs::write(src.join("vm.ovf"), ovf).unwrap();
    let out = dir.join("vm.ova");
    let st = Command::new("tar")
        .args([
            "--format=ustar",
            "-cf",
            s(&out),
            "-C",
            s(&src),
            "vm.ovf",
            "disk.raw",
        ])
        .status()
        .expect("GNU tar must be installed");
    assert!(st.success());
    out
}

/// An encrypted qcow2 (`format` luks or aes), made by qemu-img with a throwaway secret.
fn encrypted(dir: &Path, format: &str) -> PathBuf {
    let p = dir.join(format!("enc-{format}.qcow2"));
    let mut o = format!("encrypt.format={format},encrypt.key-secret=sec0");
    if format == "luks" {
        o += ",encrypt.iter-time=10";
    }
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=not-a-real-key",
        "-o",
        &o,
        s(&p),
        "1M",
    ]);
    p
}

/// Item 1: with --output json every command prints one document, whatever happens; failing
/// files appear as {filename, error}; keys are kebab-case; outputs match docs/json.
#[test]
fn json_is_one_document_with_failing_files_in_it() {
    let d = tempfile::tempdir().unwrap();
    let good = raw(d.path(), "good.raw");
    let missing = d.path().join("missing.qcow2");
    let (g, m) = (s(&good), s(&missing));

    // One file that cannot be read: an error object, not nothing.
    for (cmd, schema) in [
        (vec!["info", "--output", "json", m], "info.json"),
        (vec!["check", "--output", "json", m], "check.json"),
        (vec!["map", "--output", "json", m], "map.json"),
        (vec!["checksum", "--output", "json", m], "checksum.json"),
        (
            vec!["measure", "-O", "qcow2", "--output", "json", m],
            "measure.json",
        ),
    ] {
        let o = glimpse(&cmd);
        assert_eq!(code(&o), 2, "{cmd:?}");
        let v = json_of(&o);
        assert_valid(schema, &v);
        assert_valid("error.json", &v);
        assert_eq!(v["filename"], m, "{cmd:?}");
        assert_eq!(v["error"]["kind"], "io", "{cmd:?}");
        assert_eq!(v["error"]["code"], "io.error", "{cmd:?}");
    }

    // ova: a missing file and a file that is not an OVA are error objects too.
    for (sub, f) in [("list", m), ("list", g), ("check", m)] {
        let o = glimpse(&["ova", sub, "--output", "json", f]);
        assert_eq!(code(&o), 2, "ova {sub}");
        let v = json_of(&o);
        assert_valid("error.json", &v);
        assert_eq!(v["filename"], f);
    }

    // Several files: an array in argument order, the failing one included.
    for (cmd, schema) in [
        ("info", "info.json"),
        ("check", "check.json"),
        ("checksum", "checksum.json"),
    ] {
        let o = glimpse(&[cmd, "--output", "json", g, m]);
        assert_eq!(code(&o), 2, "{cmd}");
        let v = json_of(&o);
        assert_valid(schema, &v);
        let a = v.as_array().expect("an array for several files");
        assert_eq!(a.len(), 2, "{cmd}");
        assert_eq!(a[0]["filename"], g);
        assert!(a[0].get("error").is_none());
        assert_eq!(a[1]["filename"], m);
        assert!(a[1]["error"]["message"].is_string());
        assert_kebab(&v, &[]);
    }

    // Successes match their schemas, with kebab-case keys.
    let q = d.path().join("q.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", g, s(&q)]);
    for (cmd, schema) in [
        (vec!["info", "--output", "json", s(&q)], "info.json"),
        (vec!["check", "--output", "json", s(&q)], "check.json"),
        (vec!["map", "--output", "json", s(&q)], "map.json"),
        (vec!["checksum", "--output", "json", s(&q)], "checksum.json"),
        (
            vec!["checksum", "--content", "--output", "json", s(&q)],
            "checksum.json",
        ),
        (
            vec!["measure", "-O", "vhd", "--output", "json", s(&q)],
            "measure.json",
        ),
    ] {
        let o = glimpse(&cmd);
        assert_eq!(code(&o), 0, "{cmd:?}: {}", stderr(&o));
        let v = json_of(&o);
        assert_valid(schema, &v);
        assert_kebab(&v, &[]);
        assert!(
            !v.is_array() || cmd[0] == "map",
            "{cmd:?}: one file is an object"
        );
    }

    // A policy refusal in a reader is an error object of kind "rejected".
    let ov = overlay(d.path());
    let o = glimpse(&["map", "--output", "json", s(&ov)]);
    assert_eq!(code(&o), 1);
    let v = json_of(&o);
    assert_valid("map.json", &v);
    assert_eq!(v["error"]["kind"], "rejected");
    assert_eq!(v["error"]["code"], "qcow2.backing-file");

    // upload: the rejection names the file `filename`, like every other command.
    let empty = d.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    let o = glimpse(&["upload", "--output", "json", "--name", "x", s(&empty)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    let v = json_of(&o);
    assert_valid("upload.json", &v);
    assert_eq!(v["filename"], s(&empty));
    assert!(v.get("file").is_none());
}

/// Item 2: 0 done, 1 rejected by the policy, 2 could not do it, in every command.
#[test]
fn exit_codes_mean_the_same_in_every_command() {
    let d = tempfile::tempdir().unwrap();
    let good = raw(d.path(), "good.raw");
    let out = d.path().join("out.raw");
    // convert refusing a hostile source: 1 (it was 2), and nothing is written.
    let o = glimpse(&["convert", "-f", "qcow2", "-O", "raw", s(&good), s(&out)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("format.mismatch"));
    assert!(!out.exists());
    let ov = overlay(d.path());
    for cmd in [
        vec!["convert", "-O", "raw", s(&ov), s(&out)],
        vec!["map", s(&ov)],
        vec!["measure", "-O", "raw", s(&ov)],
        vec!["checksum", "--content", s(&ov)],
        vec!["compare", s(&ov), s(&good)],
        vec!["check", s(&ov)],
    ] {
        let o = glimpse(&cmd);
        assert_eq!(code(&o), 1, "{cmd:?}: {}", stderr(&o));
    }
    // Could not do it: 2.
    let missing = d.path().join("missing");
    for cmd in [
        vec!["convert", "-O", "raw", s(&missing), s(&out)],
        vec!["map", s(&missing)],
        vec!["compare", s(&good), s(&missing)],
        vec!["measure", "-O", "raw", s(&missing)],
    ] {
        assert_eq!(code(&glimpse(&cmd)), 2, "{cmd:?}");
    }
    assert_eq!(
        code(&glimpse(&["convert", "-O", "raw", s(&good), s(&out)])),
        0
    );
}

/// Item 3: --disk everywhere and checked; conflicting options are errors; --force on an
/// overlay says the backing data is not read; compare of an overlay refuses without --force.
#[test]
fn usage_errors_are_errors() {
    let d = tempfile::tempdir().unwrap();
    let good = raw(d.path(), "good.raw");
    let g = s(&good);
    let appliance = ova(d.path());
    let a = s(&appliance);

    // info --disk on an OVA works and describes that disk.
    let o = glimpse(&["info", "--disk", "0", "--output", "json", a]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(json_of(&o)["virtual-size"], 1 << 20);
    // Out of range: a usage error (2), not a rejection (1), in every command.
    for cmd in [
        vec!["info", "--disk", "5", a],
        vec!["check", "--disk", "5", a],
        vec!["map", "--disk", "5", a],
        vec!["checksum", "--content", "--disk", "5", a],
        vec!["compare", "--disk", "5", a, a],
    ] {
        let o = glimpse(&cmd);
        assert_eq!(code(&o), 2, "{cmd:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("no disk 5"), "{cmd:?}: {}", stderr(&o));
    }
    // --disk on a non-OVA: an error.
    for cmd in [
        vec!["info", "--disk", "0", g],
        vec!["check", "--disk", "0", g],
        vec!["map", "--disk", "0", g],
    ] {
        let o = glimpse(&cmd);
        assert_eq!(code(&o), 2, "{cmd:?}");
        assert!(stderr(&o).contains("OVA only"), "{cmd:?}: {}", stderr(&o));
    }
    // Conflicts.
    let out = d.path().join("o.raw");
    for cmd in [
        vec!["checksum", "--content", "--algo", "md5", g],
        vec!["checksum", "--disk", "0", a],
        vec![
            "convert",
            "-p",
            "--progress",
            "json",
            "-O",
            "raw",
            g,
            s(&out),
        ],
        vec![
            "convert",
            "-p",
            "--progress",
            "none",
            "-O",
            "raw",
            g,
            s(&out),
        ],
    ] {
        let o = glimpse(&cmd);
        assert_eq!(code(&o), 2, "{cmd:?}");
        assert!(o.stdout.is_empty(), "{cmd:?}");
        assert!(!out.exists(), "{cmd:?}");
    }
    // An overlay: refused without --force, read with a warning about the backing data.
    let ov = overlay(d.path());
    let o = glimpse(&["compare", s(&ov), g]);
    assert_eq!(code(&o), 1);
    assert!(o.stdout.is_empty());
    let o = glimpse(&["compare", "--force", s(&ov), g]);
    assert!(
        stderr(&o).contains("backing file") && stderr(&o).contains("not read"),
        "{}",
        stderr(&o)
    );
}

/// Item 4: each error is one line naming the file once; a missing scheme and a non-OVA are
/// named; the --force hint only where --force helps.
#[test]
fn messages_are_one_line_naming_the_file_once() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("nonexistent.qcow2");
    let m = s(&missing);
    for cmd in [
        vec!["info", m],
        vec!["check", m],
        vec!["map", m],
        vec!["checksum", m],
    ] {
        let o = glimpse(&cmd);
        let e = stderr(&o);
        assert_eq!(e.trim_end().lines().count(), 1, "{cmd:?}: {e}");
        assert_eq!(e.matches("nonexistent.qcow2").count(), 1, "{cmd:?}: {e}");
    }
    let dir = d.path().join("adir");
    std::fs::create_dir(&dir).unwrap();
    for cmd in ["info", "check", "map"] {
        let e = stderr(&glimpse(&[cmd, s(&dir)]));
        assert_eq!(e.trim_end().lines().count(), 1, "{cmd}: {e}");
        assert!(e.matches("os error 21").count() <= 1, "{cmd}: {e}");
        assert_eq!(e.matches("adir").count(), 1, "{cmd}: {e}");
    }

    let good = raw(d.path(), "good.raw");
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["upload", "--name", "x", s(&good)])
        .env("OS_IMAGE_URL", "glance.example:9292")
        .env("OS_AUTH_TOKEN", "t")
        .env_remove("OS_CLOUD")
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no scheme"), "{}", stderr(&o));

    let o = glimpse(&["ova", "list", s(&good)]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("not an OVA"), "{}", stderr(&o));

    // --force helps a format mismatch: the hint is there.
    let out = d.path().join("o.raw");
    let o = glimpse(&["convert", "-f", "qcow2", "-O", "raw", s(&good), s(&out)]);
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    // It cannot help an encrypted image: no hint.
    let enc = encrypted(d.path(), "aes");
    let o = glimpse(&["convert", "-O", "raw", s(&enc), s(&out)]);
    assert_eq!(code(&o), 1);
    assert!(!stderr(&o).contains("use --force"), "{}", stderr(&o));
}

/// Item 5: a 0-byte file is rejected by check (raw.empty) and not uploaded unless forced.
#[test]
fn empty_file_is_rejected_and_not_uploaded() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let o = glimpse(&["check", "--output", "json", s(&empty)]);
    assert_eq!(code(&o), 1);
    let v = json_of(&o);
    assert_eq!(v["verdict"], "reject");
    assert!(support::codes(&v).contains(&"raw.empty".to_string()));
    let o = glimpse(&["upload", "--name", "x", s(&empty)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("raw.empty"), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing was sent"), "{}", stderr(&o));
    // Also when declared as a format glimpse detects but does not read (ploop).
    let o = glimpse(&["upload", "--disk-format", "ploop", "--name", "x", s(&empty)]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("raw.empty"), "{}", stderr(&o));
}

/// Item 6: the installed binary is lean; a profiling profile keeps debug info.
#[test]
fn release_profile_is_lean_and_profiling_keeps_debug_info() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
        .unwrap();
    let section = |name: &str| -> String {
        let start = text
            .find(&format!("[profile.{name}]"))
            .unwrap_or_else(|| panic!("no {name}"));
        let rest = &text[start + 1..];
        rest[..rest.find("\n[").unwrap_or(rest.len())].to_string()
    };
    let release = section("release");
    assert!(release.contains("debug = false"), "{release}");
    assert!(release.contains("strip = true"), "{release}");
    let prof = section("profiling");
    assert!(prof.contains("inherits = \"release\""), "{prof}");
    assert!(prof.contains("debug = 1"), "{prof}");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    assert!(readme.contains("24 minutes") && readme.contains("3.6 GB"));
}

/// Item 7 (issue 11 §4): encrypted qcow2 (LUKS and AES) is rejected by default, accepted by
/// check with --allow-encrypted, and never read, even with --force.
#[test]
fn encrypted_images_are_rejected_and_never_read() {
    let d = tempfile::tempdir().unwrap();
    let good = raw(d.path(), "good.raw");
    for format in ["luks", "aes"] {
        let enc = encrypted(d.path(), format);
        let e = s(&enc);
        let o = glimpse(&["check", "--output", "json", e]);
        assert_eq!(code(&o), 1, "{format}");
        let v = json_of(&o);
        assert!(
            support::codes(&v).contains(&"image.encrypted".to_string()),
            "{v}"
        );
        let o = glimpse(&["check", "--allow-encrypted", "--output", "json", e]);
        assert_eq!(code(&o), 0, "{format}: {}", stderr(&o));
        assert_eq!(json_of(&o)["verdict"], "pass");

        let out = d.path().join("out.raw");
        let o = glimpse(&["convert", "-O", "raw", e, s(&out)]);
        assert_eq!(code(&o), 1, "{format}");
        assert!(!out.exists());
        for cmd in [
            vec!["convert", "--force", "-O", "raw", e, s(&out)],
            vec!["map", "--force", e],
            vec!["compare", "--force", e, s(&good)],
            vec!["checksum", "--content", "--force", e],
        ] {
            let o = glimpse(&cmd);
            assert_eq!(code(&o), 2, "{cmd:?}");
            assert!(o.stdout.is_empty(), "{cmd:?}");
            assert!(stderr(&o).contains("encrypted"), "{cmd:?}: {}", stderr(&o));
        }
        assert!(!out.exists());
        // upload: rejected before anything is sent, unless --allow-encrypted.
        let o = glimpse(&["upload", "--name", "x", e]);
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains("image.encrypted"));
    }
}

/// The schema validator itself refuses what the schemas exclude, so the tests above prove
/// something.
#[test]
fn the_schema_validator_rejects_wrong_documents() {
    use support::schema::check_against;
    let bad = [
        ("error.json", serde_json::json!({"filename": "x"})),
        (
            "error.json",
            serde_json::json!({"filename": "x", "error": {"kind": "nope", "code": "c", "message": "m", "offset": null}}),
        ),
        ("map.json", serde_json::json!([{"start": 0}])),
        (
            "check.json",
            serde_json::json!([{"filename": "x", "format": "raw"}]),
        ),
        (
            "checksum.json",
            serde_json::json!({"filename": "x", "md5": "XYZ"}),
        ),
        (
            "upload.json",
            serde_json::json!({"file": "x", "verdict": "reject", "findings": []}),
        ),
        (
            "upload.json",
            serde_json::json!({"filename": "x", "error": {"kind": "io", "code": "io.error", "message": "m", "offset": null}, "image_id": "i", "left_behind": "no"}),
        ),
    ];
    for (schema, v) in bad {
        assert!(check_against(schema, &v).is_err(), "{schema} accepted {v}");
    }
}

/// Strings an image carries (a backing file name, an archive member's name) reach the human
/// output escaped: an uploader cannot clear the operator's screen, set the terminal title, or
/// add a line that reads like glimpse's own.
#[test]
fn strings_from_an_image_cannot_drive_the_terminal() {
    let d = tempfile::tempdir().unwrap();
    let hostile = "\u{1b}]0;PWN\u{7}\u{1b}[2J\n| verdict | PASS |\r\u{202e}gpj";
    let q = d.path().join("esc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-u",
        "-f",
        "qcow2",
        "-b",
        hostile,
        "-F",
        "raw",
        s(&q),
        "1M",
    ]);
    for cmd in ["info", "check"] {
        let o = glimpse(&[cmd, s(&q)]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            out.contains("\\u{1b}]0;PWN\\u{7}\\u{1b}[2J\\n| verdict | PASS |\\r\\u{202e}gpj"),
            "{cmd}: {out}"
        );
        for bad in ['\u{1b}', '\u{7}', '\r', '\u{202e}'] {
            assert!(!out.contains(bad), "{cmd}: {bad:?} in {out}");
        }
        // Every line is a row of the table or one of its rules.
        assert!(
            out.lines()
                .all(|l| l.starts_with("| ") || l.starts_with("+-")),
            "{cmd}: {out}"
        );
        assert!(!out.lines().any(|l| l.starts_with("| verdict")) || cmd == "check");
        if cmd == "check" {
            assert_eq!(code(&o), 1, "{out}");
            assert_eq!(
                out.lines().filter(|l| l.contains("PASS")).count(),
                2,
                "{out}"
            );
            assert!(out
                .lines()
                .any(|l| l.starts_with("| verdict") && l.contains("REJECT")));
        }
    }
    // An archive member's name, in `ova list` and `ova check`.
    let src = d.path().join("ova.d");
    std::fs::create_dir_all(&src).unwrap();
    let member = "disk\u{1b}[2J\nx.raw";
    raw(&src, member);
    std::fs::write(src.join("vm.ovf"), "<Envelope/>").unwrap();
    let a = d.path().join("esc.ova");
    let st = Command::new("tar")
        .args([
            "--format=ustar",
            "-cf",
            s(&a),
            "-C",
            s(&src),
            "vm.ovf",
            member,
        ])
        .status()
        .expect("GNU tar must be installed");
    assert!(st.success());
    for cmd in ["list", "check"] {
        let o = glimpse(&["ova", cmd, s(&a)]);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(!out.contains('\u{1b}'), "ova {cmd}: {out}");
        assert!(
            !out.lines().any(|l| l.starts_with("x.raw")),
            "ova {cmd}: {out}"
        );
    }
    let o = glimpse(&["ova", "list", s(&a)]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("disk\\u{1b}[2J\\nx.raw"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn ova_documents_match_their_schemas() {
    let d = tempfile::tempdir().unwrap();
    let mut inputs = vec![
        ova(d.path()),
        d.path().join("missing.ova"),
        raw(d.path(), "r.raw"),
    ];
    let hostile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/hostile/ova");
    let mut listed: Vec<PathBuf> = std::fs::read_dir(&hostile)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "ova"))
        .collect();
    listed.sort();
    assert!(listed.len() >= 10, "{listed:?}");
    inputs.extend(listed);
    let mut reports = 0;
    for (i, p) in inputs.iter().enumerate() {
        for (cmd, schema) in [("list", "ova-list.json"), ("check", "ova-check.json")] {
            let o = glimpse(&["ova", cmd, "--output", "json", s(p)]);
            assert!(matches!(code(&o), 0..=2), "{cmd} {p:?}: {}", stderr(&o));
            let v = json_of(&o);
            assert_valid(schema, &v);
            assert_kebab(&v, &[]);
            reports += usize::from(v.get("error").is_none());
        }
        let into = d.path().join(format!("x{i}"));
        let o = glimpse(&["ova", "extract", "--output", "json", s(p), s(&into)]);
        let v = json_of(&o);
        assert_valid("ova-check.json", &v);
        if code(&o) == 0 {
            assert!(!v["written"].as_array().unwrap().is_empty(), "{p:?}: {v}");
        }
    }
    assert!(reports > 20, "most inputs give a report, not an error");
}
