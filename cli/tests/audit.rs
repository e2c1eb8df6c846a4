//! `glimpse audit` against the real glance-api of scripts/glance-testenv.sh: a catalog seeded
//! through the Images API with good images of every format, hostile ones that Glance itself
//! let in, and one whose stored bytes were changed after the upload. Each test tags its own
//! images and audits only that tag, so the tests of this binary share one Glance safely.

mod audit_support;
mod upload_support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use audit_support::{
    audit, audit_cmd, codes, corrupt_in_store, download_status, ids, lines, pages, record, seed,
    Rewriter,
};
use glimpse_testkit::qemu::img as qemu_img;
use serde_json::{json, Value};
use upload_support::{glance, raw_file, text, unique, Proxy, PutMode, TOKEN};

const BIN: &str = "audit";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A 3 MiB raw source converted by qemu-img to `fmt` with `opts`.
fn make(dir: &Path, fmt: &str, opts: &[&str]) -> Vec<u8> {
    let src = raw_file(dir, "src.raw", 3 * 1024 * 1024);
    let out = dir.join(format!("disk-{fmt}-{}", opts.join("_").replace('=', "-")));
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    args.extend_from_slice(opts);
    args.push(src.to_str().unwrap());
    args.push(out.to_str().unwrap());
    qemu_img(&args);
    std::fs::read(out).unwrap()
}

fn iso(dir: &Path) -> Vec<u8> {
    let content = dir.join("iso-content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("README.TXT"), b"glimpse audit test\n").unwrap();
    let iso = dir.join("disk.iso");
    let out = Command::new("genisoimage")
        .args(["-quiet", "-V", "GLIMPSE", "-o"])
        .arg(&iso)
        .arg(&content)
        .output()
        .expect("genisoimage is required for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(iso).unwrap()
}

/// An OVA as exporters make one: descriptor, manifest, streamOptimized VMDK.
fn ova(dir: &Path) -> Vec<u8> {
    use sha2::{Digest as _, Sha256};
    let work = dir.join("ova");
    std::fs::create_dir_all(&work).unwrap();
    let vmdk = make(dir, "vmdk", &["-o", "subformat=streamOptimized"]);
    std::fs::write(work.join("disk1.vmdk"), &vmdk).unwrap();
    let ovf = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>
    <File ovf:href="disk1.vmdk" ovf:id="file1" ovf:size="{}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="3145728" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="glimpse-audit">
    <Info>A virtual machine</Info>
    <Name>glimpse-audit</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item>
        <rasd:ElementName>disk0</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#,
        vmdk.len()
    );
    std::fs::write(work.join("glimpse.ovf"), &ovf).unwrap();
    let mf = format!(
        "SHA256(glimpse.ovf)= {}\nSHA256(disk1.vmdk)= {}\n",
        hex(&Sha256::digest(ovf.as_bytes())),
        hex(&Sha256::digest(&vmdk))
    );
    std::fs::write(work.join("glimpse.mf"), mf).unwrap();
    let out_path = dir.join("good.ova");
    let out = Command::new("tar")
        .args(["--format=ustar", "-cf"])
        .arg(&out_path)
        .arg("-C")
        .arg(&work)
        .args(["glimpse.ovf", "glimpse.mf", "disk1.vmdk"])
        .output()
        .expect("tar is required for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(out_path).unwrap()
}

fn hostile(folder: &str, name: &str) -> Vec<u8> {
    let p: PathBuf = glimpse_testkit::hostile::dir(folder).join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// What the seeded catalog holds and what the audit must say of each image.
struct Seeded {
    tag: String,
    /// id -> (label, expected verdict, a code the findings must hold)
    expect: Vec<(String, &'static str, &'static str, Option<&'static str>)>,
}

fn seed_catalog() -> Seeded {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tag = unique("hostile-catalog");
    let t = [tag.as_str()];
    let mut expect = Vec::new();
    let mut put = |label: &'static str,
                   disk: &str,
                   container: &str,
                   data: Vec<u8>,
                   verdict: &'static str,
                   code: Option<&'static str>| {
        let id = seed(g, &format!("{tag}-{label}"), disk, container, &data, &t);
        expect.push((id, label, verdict, code));
    };
    // good images of every format, bare (so Glance inspected them too)
    put(
        "raw",
        "raw",
        "bare",
        read(raw_file(d, "a.raw", 1 << 20)),
        "pass",
        None,
    );
    put(
        "qcow2",
        "qcow2",
        "bare",
        make(d, "qcow2", &[]),
        "pass",
        None,
    );
    put(
        "vmdk-stream",
        "vmdk",
        "bare",
        make(d, "vmdk", &["-o", "subformat=streamOptimized"]),
        "pass",
        None,
    );
    put(
        "vmdk-sparse",
        "vmdk",
        "bare",
        make(d, "vmdk", &["-o", "subformat=monolithicSparse"]),
        "pass",
        None,
    );
    put("vhd", "vhd", "bare", make(d, "vpc", &[]), "pass", None);
    put("vhdx", "vhdx", "bare", make(d, "vhdx", &[]), "pass", None);
    put("vdi", "vdi", "bare", make(d, "vdi", &[]), "pass", None);
    put("iso", "iso", "bare", iso(d), "pass", None);
    put("ova", "vmdk", "ova", ova(d), "pass", None);
    // hostile images Glance let in: its inspector accepts a qcow2 declared raw (it only
    // logs a warning), and inspects nothing that is not container_format=bare
    put(
        "qcow2-declared-raw",
        "raw",
        "bare",
        make(d, "qcow2", &[]),
        "reject",
        Some("format.mismatch"),
    );
    put(
        "backing-file",
        "qcow2",
        "ovf",
        hostile("qcow2", "backing-file.qcow2"),
        "reject",
        Some("qcow2.backing-file"),
    );
    put(
        "data-file",
        "qcow2",
        "ovf",
        hostile("qcow2", "data-file-bit.qcow2"),
        "reject",
        Some("qcow2.data-file"),
    );
    put(
        "vmdk-host-extent",
        "vmdk",
        "ovf",
        hostile("vmdk", "external-extent-no-slash.vmdk"),
        "reject",
        Some("vmdk.external-extent"),
    );
    put(
        "ova-traversal",
        "vmdk",
        "ova",
        hostile("ova", "traversal.ova"),
        "reject",
        Some("ova.member-name"),
    );
    // a good image whose stored bytes change after the upload
    let data = read(raw_file(d, "b.raw", 1 << 20));
    let id = seed(g, &format!("{tag}-corrupted"), "raw", "bare", &data, &t);
    corrupt_in_store(BIN, &id);
    expect.push((id, "corrupted", "mismatch", Some("audit.checksum-mismatch")));
    Seeded { tag, expect }
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn by_id(lines: &[Value]) -> std::collections::BTreeMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["id"].as_str().unwrap().to_string(), l.clone()))
        .collect()
}

#[test]
fn the_audit_finds_exactly_the_hostile_and_corrupted_images_and_deactivates_them() {
    let g = glance(BIN);
    let s = seed_catalog();

    // 1. A read-only audit with digests: every image judged as expected, nothing changed.
    let out = audit(&g.url, &["--tag", &s.tag, "--verify-digests", "-j", "4"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let got = by_id(&lines(&out));
    assert_eq!(got.len(), s.expect.len(), "{stdout}");
    for (id, label, verdict, code) in &s.expect {
        let line = &got[id];
        assert_eq!(line["verdict"], *verdict, "{label}: {line}");
        if let Some(c) = code {
            assert!(codes(line).iter().any(|x| x == c), "{label}: {line}");
        }
        assert_eq!(
            line["digests"],
            if *label == "corrupted" {
                "mismatch"
            } else {
                "verified"
            },
            "{label}: {line}"
        );
        assert!(line["bytes_read"].as_u64().unwrap() > 0, "{label}: {line}");
        assert!(line.get("deactivated").is_none(), "{label}: {line}");
        assert_eq!(record(g, id)["status"], "active", "{label}");
    }
    assert!(stderr.contains("images audited"), "{stderr}");

    // Without --verify-digests the corrupted image is not read in full, so it passes the
    // policy (its bytes are still a raw disk): corruption is what the digests are for.
    let out = audit(&g.url, &["--tag", &s.tag]);
    let got = by_id(&lines(&out));
    let corrupted = &s.expect.last().unwrap().0;
    assert_eq!(got[corrupted]["verdict"], "pass", "{}", got[corrupted]);
    assert_eq!(got[corrupted]["digests"], "not-checked");

    // --quick skips the structural walk: the same verdicts from the headers alone, and less
    // read for every image
    let quick = audit(&g.url, &["--tag", &s.tag, "--quick"]);
    assert_eq!(quick.status.code(), Some(1), "{:?}", text(&quick));
    let quick = by_id(&lines(&quick));
    for (id, label, _, _) in &s.expect {
        assert_eq!(
            quick[id]["verdict"], got[id]["verdict"],
            "{label}: {}",
            quick[id]
        );
        assert!(
            quick[id]["bytes_read"].as_u64() <= got[id]["bytes_read"].as_u64(),
            "{label}: {} vs {}",
            quick[id],
            got[id]
        );
        // and each line says the structural pass was skipped; a full audit's does not
        assert_eq!(quick[id]["structure"], "skipped", "{label}: {}", quick[id]);
        assert!(got[id].get("structure").is_none(), "{label}: {}", got[id]);
    }

    // 2. --deactivate-rejected: exactly the failing images are deactivated; a member can no
    // longer download them (an admin still can), and can download the others.
    let out = audit(
        &g.url,
        &["--tag", &s.tag, "--verify-digests", "--deactivate-rejected"],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let got = by_id(&lines(&out));
    for (id, label, verdict, _) in &s.expect {
        let bad = *verdict != "pass";
        assert_eq!(
            got[id].get("deactivated").and_then(Value::as_bool),
            bad.then_some(true),
            "{label}: {}",
            got[id]
        );
        let status = record(g, id)["status"].as_str().unwrap().to_string();
        assert_eq!(
            status,
            if bad { "deactivated" } else { "active" },
            "{label}"
        );
        assert_eq!(
            download_status(g, id, false),
            if bad { 403 } else { 200 },
            "member download of {label}"
        );
        if bad {
            assert_eq!(
                download_status(g, id, true),
                200,
                "admin download of {label}"
            );
        }
    }
    assert!(stderr.contains("deactivated"), "{stderr}");

    // The default listing is of active images: what was deactivated is not audited again.
    let out = audit(&g.url, &["--tag", &s.tag, "--verify-digests"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let n_good = s.expect.iter().filter(|e| e.2 == "pass").count();
    assert_eq!(lines(&out).len(), n_good);

    // 3. --reactivate undoes one.
    let (id, label, _, _) = s.expect.iter().find(|e| e.2 == "reject").unwrap();
    let out = audit(&g.url, &["--reactivate", id]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(lines(&out)[0]["reactivated"], true);
    // again: it is active, and the line says so instead of claiming a reactivation
    let out = audit(&g.url, &["--reactivate", id, "--reactivate", id]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let again = lines(&out);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["reactivated"], false);
    assert_eq!(again[0]["already_active"], true);
    assert_eq!(record(g, id)["status"], "active", "{label}");
    assert_eq!(download_status(g, id, false), 200);
    // and the audit names it again
    let out = audit(&g.url, &["--image", id]);
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert_eq!(lines(&out)[0]["verdict"], "reject");
}

/// `n` small raw images with a fresh tag; returns the tag and the sorted ids.
fn seed_raw(n: usize, label: &str) -> (String, Vec<String>) {
    let g = glance(BIN);
    let tag = unique(label);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut ids: Vec<String> = (0..n)
        .map(|i| seed(g, &format!("{tag}-{i}"), "raw", "bare", &data, &[&tag]))
        .collect();
    ids.sort();
    (tag, ids)
}

#[test]
fn paging_marker_and_shards_cover_the_catalog_exactly_once() {
    let g = glance(BIN);
    let (tag, all) = seed_raw(23, "paging");

    // small pages: every image once, over several listing requests
    let out = audit(
        &g.url,
        &["--tag", &tag, "--page-size", "4", "-j", "3", "-v"],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(ids(&lines(&out)), all);
    let list_requests = stderr
        .lines()
        .filter(|l| l.contains("GET ") && l.contains("/v2/images?") && !l.contains("->"))
        .count();
    assert!(
        list_requests >= 6,
        "{list_requests} listing requests:\n{stderr}"
    );
    assert!(!stderr.contains(TOKEN), "the token leaked into the log");

    // --marker resumes after an id, in id order
    let out = audit(
        &g.url,
        &["--tag", &tag, "--page-size", "5", "--marker", &all[9]],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(ids(&lines(&out)), all[10..].to_vec());
    // the resume point never falls below where this run started
    for l in lines(&out) {
        assert!(
            l["resume_marker"].as_str().unwrap() >= all[9].as_str(),
            "{l}"
        );
    }

    // three shards: disjoint, and together the whole catalog
    let mut union = BTreeSet::new();
    let mut total = 0;
    for k in 0..3 {
        let shard = format!("{k}/3");
        let out = audit(
            &g.url,
            &["--tag", &tag, "--shard", &shard, "--page-size", "7"],
        );
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
        let got = ids(&lines(&out));
        total += got.len();
        union.extend(got);
    }
    assert_eq!(total, all.len(), "an image was audited by two shards");
    assert_eq!(union.into_iter().collect::<Vec<_>>(), all);

    // --image, repeated: exactly those, no listing
    let out = audit(&g.url, &["--image", &all[3], "--image", &all[17], "-v"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    assert_eq!(ids(&lines(&out)), vec![all[3].clone(), all[17].clone()]);
    assert!(!text(&out).1.contains("/v2/images?"), "listed with --image");
}

#[test]
fn errors_are_exit_2_with_the_image_named() {
    let g = glance(BIN);
    let missing = "00000000-0000-4000-8000-000000000000";
    let out = audit(&g.url, &["--image", missing]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    let l = lines(&out);
    assert_eq!(l[0]["id"], missing);
    assert_eq!(l[0]["verdict"], "error");
    assert!(l[0]["error"].as_str().unwrap().contains("404"), "{}", l[0]);

    // a stored object cut short after the upload: Glance still announces the recorded size,
    // then closes the connection early, so the image cannot be read: an error, named
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let id = seed(g, &unique("truncated"), "raw", "bare", &data, &[]);
    let stored = audit_support::stored_file(BIN, &id);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&stored)
        .unwrap()
        .set_len(300_000)
        .unwrap();
    let out = audit(&g.url, &["--image", &id]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert_eq!(lines(&out)[0]["verdict"], "error", "{stdout}");
    assert!(stderr.contains(&id), "{stderr}");

    // an id that is not one is a usage error before anything is sent
    let out = audit(&g.url, &["--image", "../../etc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("not an image id"), "{:?}", text(&out));

    // nothing listening: the listing fails, exit 2
    let out = audit("http://127.0.0.1:9", &[]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
    assert!(text(&out).1.contains("listing failed"), "{:?}", text(&out));

    // --shard is K/N with K < N
    let out = audit(&g.url, &["--shard", "3/3"]);
    assert_eq!(out.status.code(), Some(2));
}

/// docs/json/audit.json refuses what the audit never prints, so the validation in
/// `audit_support::lines` proves something; and it takes the shapes the tests above do not
/// reach (a failed deactivation or reactivation, an OVA's disks).
#[test]
fn the_audit_schema_takes_every_line_shape_and_refuses_others() {
    use audit_support::schema::check_against;
    let audited = json!({
        "id": "5873312c-0000-4000-8000-000000000000", "name": "web-01", "owner": "3f1e",
        "disk_format": "vmdk", "container_format": "ova", "status": "active",
        "verdict": "reject",
        "findings": [{"code": "ova.member-name", "severity": "reject", "message": "m", "offset": 512}],
        "disks": [{"disk": 0, "href": "disk1.vmdk", "verdict": "reject", "findings": []},
                  {"disk": null, "href": null, "verdict": "reject", "findings": []}],
        "size": {"glance": 4096, "stored": 4096}, "virtual_size": {"glance": null, "glimpse": 1048576},
        "digests": "not-checked", "bytes_read": 4096, "requests": 1,
        "deactivated": false, "deactivation": "failed: 403 Forbidden"
    });
    let with = |k: &str, v: Value| {
        let mut l = audited.clone();
        l[k] = v;
        l
    };
    let without = |k: &str| {
        let mut l = audited.clone();
        l.as_object_mut().unwrap().remove(k);
        l
    };
    let mut failed_read = without("deactivation");
    failed_read.as_object_mut().unwrap().remove("deactivated");
    failed_read["verdict"] = json!("error");
    failed_read["error"] = json!("image x: reading the stored data: connection closed");
    let unread = json!({"id": "00000000-0000-4000-8000-000000000000", "name": null, "owner": null,
        "disk_format": null, "container_format": null, "status": null, "verdict": "error",
        "error": "404 Not Found"});
    let mut judged_with_error = audited.clone();
    judged_with_error["error"] = json!("image x: reading the stored data: timeout");
    let mut unread_resumable = unread.clone();
    unread_resumable["resume_marker"] = json!(null);
    let good = [
        audited.clone(),
        with("structure", json!("skipped")),
        with(
            "resume_marker",
            json!("5873312c-0000-4000-8000-000000000000"),
        ),
        with("resume_marker", json!(null)),
        judged_with_error,
        failed_read.clone(),
        unread.clone(),
        unread_resumable,
        json!({"id": "x", "reactivated": true}),
        json!({"id": "x", "reactivated": false, "already_active": true}),
        json!({"id": "x", "reactivated": false, "error": "403 Forbidden"}),
    ];
    for v in &good {
        if let Err(e) = check_against("audit.json", v) {
            panic!("{e}: {v}");
        }
    }
    let mut error_without_message = failed_read.clone();
    error_without_message
        .as_object_mut()
        .unwrap()
        .remove("error");
    // a verdict stands with an error only when it is a reject or a mismatch
    let mut pass_with_error = with("verdict", json!("pass"));
    pass_with_error["error"] = json!("a pass cannot have an error");
    let mut unread_with_findings = unread.clone();
    unread_with_findings["findings"] = json!([]);
    let bad = [
        with("verdict", json!("maybe")),
        with("verdict", json!("error")),
        pass_with_error,
        with("structure", json!("checked")),
        with("resume_marker", json!(7)),
        with("digests", json!("skipped")),
        with("bytes-read", json!(1)),
        with("size", json!({"glance": 1})),
        with(
            "findings",
            json!([{"code": "c", "severity": "fatal", "message": "m"}]),
        ),
        with(
            "disks",
            json!([{"disk": 0, "verdict": "pass", "findings": []}]),
        ),
        without("requests"),
        error_without_message,
        unread_with_findings,
        json!({"id": "x", "reactivated": true, "verdict": "pass"}),
        json!({"id": "x", "reactivated": false, "already_active": false}),
        json!({"id": "x"}),
    ];
    for v in &bad {
        assert!(check_against("audit.json", v).is_err(), "accepted {v}");
    }
}

/// `n` qcow2 images declared raw (a policy reject Glance lets in) and `good` raw ones, with a
/// fresh tag; returns the tag, the sorted reject ids and the sorted good ids.
fn seed_mixed(n: usize, good: usize, label: &str) -> (String, Vec<String>, Vec<String>) {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let tag = unique(label);
    let qcow2 = make(dir.path(), "qcow2", &[]);
    let raw: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut bad: Vec<String> = (0..n)
        .map(|i| seed(g, &format!("{tag}-bad{i}"), "raw", "bare", &qcow2, &[&tag]))
        .collect();
    let mut ok: Vec<String> = (0..good)
        .map(|i| seed(g, &format!("{tag}-ok{i}"), "raw", "bare", &raw, &[&tag]))
        .collect();
    bad.sort();
    ok.sort();
    (tag, bad, ok)
}

/// Finding 3 of the red team: lines come out in finish order, so the last id printed is not a
/// resume point. Each line's `resume_marker` is: every listed id up to it has its line, and a
/// resume from it covers the rest.
#[test]
fn each_line_carries_a_resume_marker_that_skips_nothing() {
    let g = glance(BIN);
    let (tag, all) = seed_raw(8, "watermark");
    // the lowest id's data is slow to come: it finishes after images listed later
    let slow: &'static str = Box::leak(format!("GET /v2/images/{}/file", all[0]).into_boxed_str());
    let proxy = Proxy::start(&g.url, PutMode::HoldReply(slow, Duration::from_secs(3)));
    let out = audit(&proxy.url, &["--tag", &tag, "-j", "4", "--page-size", "3"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let got = lines(&out);
    assert_eq!(ids(&got), all);
    assert_ne!(
        got[0]["id"],
        all[0].as_str(),
        "the slow image finished first: {stdout}"
    );
    let mut printed = BTreeSet::new();
    for l in &got {
        printed.insert(l["id"].as_str().unwrap().to_string());
        match l["resume_marker"].as_str() {
            None => {
                assert!(l["resume_marker"].is_null(), "{l}");
                assert!(!printed.contains(&all[0]), "{stdout}");
            }
            Some(m) => {
                for id in all.iter().filter(|id| id.as_str() <= m) {
                    assert!(
                        printed.contains(id),
                        "{id} <= marker {m} has no line yet: {stdout}"
                    );
                }
            }
        }
    }
    // before the slow image's line, no marker can pass it
    let slow_at = got.iter().position(|l| l["id"] == all[0].as_str()).unwrap();
    assert!(
        got[..slow_at].iter().all(|l| l["resume_marker"].is_null()),
        "{stdout}"
    );
    assert_eq!(
        got.last().unwrap()["resume_marker"],
        all.last().unwrap().as_str()
    );
    // with --image there is no listing, hence no marker
    let out = audit(&g.url, &["--image", &all[1]]);
    assert!(lines(&out)[0].get("resume_marker").is_none());
}

/// Finding 2: a signal during `--deactivate-rejected` lets the deactivation under way finish,
/// prints its line, the summary and the resume point, exits 2; Glance's state and the lines
/// agree, and a resume from the marker covers every image.
#[test]
fn a_signal_mid_audit_reports_every_deactivation_made_and_where_to_resume() {
    let g = glance(BIN);
    let (tag, bad, ok) = seed_mixed(3, 3, "sigint");
    // Glance acts on the deactivation at once, its reply reaches glimpse 4 s later
    let proxy = Proxy::start(
        &g.url,
        PutMode::HoldReply("POST /v2/images/", Duration::from_secs(4)),
    );
    let child = audit_cmd(
        &proxy.url,
        &[
            "--tag",
            &tag,
            "--deactivate-rejected",
            "-j",
            "2",
            "--page-size",
            "2",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !proxy.heads().iter().any(|h| h.starts_with("POST ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no deactivation was sent"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert!(started.elapsed() < Duration::from_secs(60), "{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stderr.contains("by SIGINT"), "{stderr}");
    let got = by_id(&lines(&out));
    // every image Glance deactivated has a line that says so, and no other line does
    let mut deactivated = 0;
    for id in bad.iter().chain(&ok) {
        let status = record(g, id)["status"].as_str().unwrap().to_string();
        let said = got
            .get(id)
            .and_then(|l| l.get("deactivated"))
            .and_then(Value::as_bool);
        if status == "deactivated" {
            deactivated += 1;
            assert_eq!(
                said,
                Some(true),
                "{id} deactivated without a line:\n{stdout}\n{stderr}"
            );
        } else {
            assert_ne!(said, Some(true), "{id}: {stdout}");
        }
    }
    assert!(deactivated >= 1, "{stdout}\n{stderr}");
    // resume: the summary's marker, the same as the last line's
    let resume = stderr
        .lines()
        .filter(|l| l.contains("resume with"))
        .find_map(|l| l.split("| --marker ").nth(1))
        .map(|m| m.split_whitespace().next().unwrap().to_string());
    let last = lines(&out)
        .last()
        .and_then(|l| l["resume_marker"].as_str().map(str::to_string));
    assert_eq!(resume, last, "{stderr}\n{stdout}");
    let mut args = vec!["--tag", tag.as_str(), "--deactivate-rejected"];
    if let Some(m) = &resume {
        args.extend(["--marker", m]);
    }
    let again = audit(&g.url, &args);
    assert_ne!(again.status.code(), Some(2), "{:?}", text(&again));
    let again = by_id(&lines(&again));
    for id in bad.iter().chain(&ok) {
        if resume.as_deref().is_some_and(|m| id.as_str() <= m) {
            assert!(
                got.contains_key(id),
                "{id} is below the marker without a line"
            );
        } else {
            let done_before = got.get(id).and_then(|l| l.get("deactivated")) == Some(&json!(true));
            assert!(
                again.contains_key(id) || done_before,
                "{id} was skipped by the resume"
            );
        }
    }
    // and in the end every rejected image is deactivated, every good one active
    for id in &bad {
        assert_eq!(record(g, id)["status"], "deactivated", "{id}");
    }
    for id in &ok {
        assert_eq!(record(g, id)["status"], "active", "{id}");
    }
}

/// Findings 6 and 10: the deactivate reply is lost after Glance acted (the record is read
/// again: true), and an image named twice is audited and deactivated once.
#[test]
fn a_lost_deactivate_reply_is_settled_by_reading_the_record() {
    let g = glance(BIN);
    let (_, bad, _) = seed_mixed(2, 0, "lostreply");
    let proxy = Proxy::start(&g.url, PutMode::DropReply("POST /v2/images/"));
    let out = audit(
        &proxy.url,
        &[
            "--image",
            &bad[0],
            "--image",
            &bad[0],
            "--deactivate-rejected",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let got = lines(&out);
    assert_eq!(got.len(), 1, "{stdout}");
    assert_eq!(got[0]["verdict"], "reject");
    assert_eq!(got[0]["deactivated"], true, "{stdout}");
    assert_eq!(record(g, &bad[0])["status"], "deactivated");
    // the same, directly: two names of one image, one audit, one deactivation
    let out = audit(
        &g.url,
        &[
            "--image",
            &bad[1],
            "--image",
            &bad[1],
            "--deactivate-rejected",
        ],
    );
    let got = lines(&out);
    assert_eq!(got.len(), 1, "{:?}", text(&out));
    assert_eq!(got[0]["deactivated"], true);
    assert!(text(&out).1.contains("deactivated"), "{:?}", text(&out));
}

/// Findings 7, 8, 10 and 11: a listing that changes its filters, repeats or reorders images,
/// or sends an empty page with a `next` link ends with an error (exit 2); nothing outside the
/// filters is audited or deactivated, and no image is audited twice.
#[test]
fn a_listing_that_leaves_its_filters_or_repeats_itself_is_an_error() {
    let g = glance(BIN);
    let (tag_a, bad_a, ok_a) = seed_mixed(2, 3, "scope-a");
    let (tag_b, bad_b, _) = seed_mixed(2, 1, "scope-b");
    let all_a: BTreeSet<String> = bad_a.iter().chain(&ok_a).cloned().collect();

    // the next link of the first page is rewritten to list tag B instead
    let (ta, tb) = (tag_a.clone(), tag_b.clone());
    let proxy = Rewriter::start(
        &g.url,
        pages(move |_, v| {
            if let Some(n) = v["next"].as_str() {
                v["next"] = json!(n.replace(&ta, &tb));
            }
        }),
    );
    let out = audit(
        &proxy.url,
        &["--tag", &tag_a, "--page-size", "2", "--deactivate-rejected"],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("listing failed"), "{stderr}");
    assert!(stderr.contains("changes the listing's filters"), "{stderr}");
    for l in lines(&out) {
        assert!(
            all_a.contains(l["id"].as_str().unwrap()),
            "outside the scope: {l}"
        );
    }
    for id in &bad_b {
        assert_eq!(
            record(g, id)["status"],
            "active",
            "{id} deactivated out of scope"
        );
    }
    assert!(!proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.contains(&tag_b)));

    // records outside the filters in a page (a gateway that serves another tag's page)
    let (ta, tb) = (tag_a.clone(), tag_b.clone());
    let proxy = Rewriter::start(
        &g.url,
        std::sync::Arc::new(move |head: &str, body: Vec<u8>| {
            if !head.starts_with("GET /v2/images?") {
                return Some(body);
            }
            let path = head.split(' ').nth(1).unwrap().replace(&ta, &tb);
            let url = format!("{}{path}", g.url);
            let mut r = ureq::get(&url)
                .header("X-Auth-Token", TOKEN)
                .call()
                .unwrap();
            Some(r.body_mut().read_to_vec().unwrap())
        }),
    );
    let out = audit(&proxy.url, &["--tag", &tag_a, "--deactivate-rejected"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("not one asked for"), "{stderr}");
    assert!(lines(&out).is_empty(), "{stdout}");
    for id in &bad_b {
        assert_eq!(
            record(g, id)["status"],
            "active",
            "{id} deactivated out of scope"
        );
    }

    // every page twice over: each image audited once, then the error
    let proxy = Rewriter::start(
        &g.url,
        pages(|_, v| {
            let imgs = v["images"].as_array().cloned().unwrap_or_default();
            let mut twice = imgs.clone();
            twice.extend(imgs);
            v["images"] = json!(twice);
        }),
    );
    let out = audit(&proxy.url, &["--tag", &tag_a, "--page-size", "10"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("out of id order"), "{stderr}");
    let got = lines(&out);
    // (the first run above deactivated the rejects of its first page, in scope: not listed now)
    let active: Vec<String> = all_a
        .iter()
        .filter(|id| record(g, id)["status"] == "active")
        .cloned()
        .collect();
    assert_eq!(ids(&got), active, "{stdout}\n{stderr}");

    // a next link back to an earlier page (a loop), and an empty page with a next link
    let first_next = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let seen = first_next.clone();
    let proxy = Rewriter::start(
        &g.url,
        pages(move |line, v| {
            let mut first = seen.lock().unwrap();
            if !line.contains("marker=") {
                *first = v["next"].as_str().map(str::to_string);
            } else if let Some(n) = first.clone() {
                v["next"] = json!(n);
            }
        }),
    );
    let out = audit(&proxy.url, &["--tag", &tag_a, "--page-size", "2"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("listing failed"), "{stderr}");
    // The first two pages, then the loop. They hold the active images only: 4, or 3 when both
    // rejects sorted into the page the first run deactivated (one run in ten, by the ids).
    assert_eq!(lines(&out).len(), active.len().min(4), "{stdout}");
    let proxy = Rewriter::start(
        &g.url,
        pages(|line, v| {
            if line.contains("marker=") {
                v["images"] = json!([]);
            }
        }),
    );
    let out = audit(&proxy.url, &["--tag", &tag_a, "--page-size", "2"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("incomplete listing"), "{stderr}");
}

/// Findings 12 and 13: record fields of the wrong type are never copied into a line (every
/// line validates) and are findings, not silently skipped comparisons; `verified` needs a
/// digest that was compared.
#[test]
fn odd_record_fields_are_findings_and_unverifiable_digests_are_unavailable() {
    let g = glance(BIN);
    let (tag, all) = seed_raw(4, "oddrec");
    let odd = all.clone();
    let proxy = Rewriter::start(
        &g.url,
        pages(move |_, v| {
            for r in v["images"].as_array_mut().unwrap() {
                let id = r["id"].as_str().unwrap().to_string();
                if id == odd[0] {
                    r["size"] = json!("8192");
                    r["name"] = json!(5);
                } else if id == odd[1] {
                    r["virtual_size"] = json!(1.5);
                    r["owner"] = json!({"x": 1});
                } else if id == odd[2] {
                    r["size"] = json!(-1);
                } else {
                    r["checksum"] = Value::Null;
                    r["os_hash_algo"] = json!("sha3_512");
                    r["os_hash_value"] = json!("00");
                }
            }
        }),
    );
    let out = audit(&proxy.url, &["--tag", &tag, "--verify-digests"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let got = by_id(&lines(&out));
    for id in &all[..3] {
        let l = &got[id];
        assert_eq!(l["verdict"], "mismatch", "{l}");
        assert!(codes(l).iter().any(|c| c == "audit.record-field"), "{l}");
    }
    assert!(got[&all[0]]["size"]["glance"].is_null());
    assert!(got[&all[0]]["name"].is_null());
    assert!(got[&all[1]]["virtual_size"]["glance"].is_null());
    assert!(got[&all[2]]["size"]["glance"].is_null());
    let l = &got[&all[3]];
    assert_eq!(l["verdict"], "pass", "{l}");
    assert_eq!(l["digests"], "unavailable", "{l}");
    assert!(
        codes(l).iter().any(|c| c == "audit.os-hash-unchecked"),
        "{l}"
    );
    // a recorded algorithm in other case is still compared
    let proxy = Rewriter::start(
        &g.url,
        pages(|_, v| {
            for r in v["images"].as_array_mut().unwrap() {
                r["checksum"] = Value::Null;
                let a = r["os_hash_algo"].as_str().unwrap().to_ascii_uppercase();
                r["os_hash_algo"] = json!(a);
            }
        }),
    );
    let out = audit(&proxy.url, &["--tag", &tag, "--verify-digests"]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    for l in lines(&out) {
        assert_eq!(l["digests"], "verified", "{l}");
    }
}

/// Finding 5: a verdict the ranged reads established stands when the later digest stream
/// fails: the image is still a reject, is deactivated, and the line says both (exit 2).
#[test]
fn a_reject_stays_a_reject_and_is_deactivated_when_the_digest_stream_fails() {
    let g = glance(BIN);
    let (_, bad, _) = seed_mixed(1, 0, "rejectthenfail");
    let file: &'static str = Box::leak(format!("GET /v2/images/{}/file", bad[0]).into_boxed_str());
    // the whole-image GET (no Range) never gets a reply; the ranged reads do
    let proxy = Rewriter::start(
        &g.url,
        std::sync::Arc::new(move |head: &str, body: Vec<u8>| {
            let ranged = head.to_ascii_lowercase().contains("\r\nrange:");
            (!head.starts_with(file) || ranged).then_some(body)
        }),
    );
    let out = audit(
        &proxy.url,
        &[
            "--image",
            &bad[0],
            "--verify-digests",
            "--deactivate-rejected",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    let l = &lines(&out)[0];
    assert_eq!(l["verdict"], "reject", "{l}");
    assert!(codes(l).iter().any(|c| c == "format.mismatch"), "{l}");
    assert!(l["error"].as_str().unwrap().contains("file"), "{l}");
    assert_eq!(l["deactivated"], true, "{l}");
    assert_eq!(record(g, &bad[0])["status"], "deactivated");
    assert!(
        stderr.contains("a step failed after the verdict"),
        "{stderr}"
    );
}

/// Finding 9: a listing request that never gets its reply fails after the metadata timeout
/// (a minute), not the upload agent's hour.
#[test]
fn a_stalled_listing_fails_within_the_metadata_timeout() {
    let g = glance(BIN);
    let proxy = Proxy::start(
        &g.url,
        PutMode::HoldReply("GET /v2/images?", Duration::from_secs(100)),
    );
    let started = std::time::Instant::now();
    let out = audit(&proxy.url, &["--tag", &unique("stalled")]);
    let took = started.elapsed();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("listing failed"), "{stderr}");
    assert!(took < Duration::from_secs(90), "{took:?}\n{stderr}");
}
