//! `glimpse ova {list,check,extract}` on archives made here with GNU tar around raw disks, and
//! on the committed hostile fixtures. The VMDK cases are in `ova_vmdk.rs`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sha2::Digest;
use support::{codes, glimpse, json_of, s, unnamed_files_in};

fn reject_codes(v: &Value) -> Vec<String> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "reject")
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

/// The one file's report of `check --output json` (an object today; an array of one if the JSON
/// contract changes to always print an array).
fn one(v: &Value) -> &Value {
    if v.is_array() {
        &v[0]
    } else {
        v
    }
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/hostile/ova")
        .join(name)
        .display()
        .to_string()
}

fn disk_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(17).wrapping_add(seed))
        .collect()
}

/// `(href, stored size, capacity, compression)` per disk.
fn ovf_xml(disks: &[(&str, u64, u64, Option<&str>)]) -> String {
    let mut files = String::new();
    let mut ds = String::new();
    for (i, (href, size, cap, comp)) in disks.iter().enumerate() {
        let comp = comp
            .map(|c| format!(r#" ovf:compression="{c}""#))
            .unwrap_or_default();
        files += &format!(r#"<File ovf:id="f{i}" ovf:href="{href}" ovf:size="{size}"{comp}/>"#);
        ds += &format!(
            r#"<Disk ovf:diskId="d{i}" ovf:fileRef="f{i}" ovf:capacity="{cap}" ovf:capacityAllocationUnits="byte"/>"#
        );
    }
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>{files}</References>
  <DiskSection><Info>disks</Info>{ds}</DiskSection>
  <VirtualSystem ovf:id="vm"><Info>vm</Info><Name>cli-vm</Name>
    <OperatingSystemSection ovf:id="101"><Info>os</Info><Description>Linux</Description></OperatingSystemSection>
    <VirtualHardwareSection><Info>hw</Info>
      <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>512</rasd:VirtualQuantity></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn manifest_line(algo: &str, name: &str, data: &[u8]) -> String {
    let d = match algo {
        "SHA1" => hex(&sha1::Sha1::digest(data)),
        "SHA256" => hex(&sha2::Sha256::digest(data)),
        "SHA512" => hex(&sha2::Sha512::digest(data)),
        _ => unreachable!(),
    };
    format!("{algo}({name})= {d}\n")
}

/// Writes `files` into `dir/src` and archives them, in order, with GNU tar into `dir/name`.
fn make_ova(dir: &Path, name: &str, format: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let src = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&src).unwrap();
    for (n, d) in files {
        std::fs::write(src.join(n), d).unwrap();
    }
    let out = dir.join(name);
    let st = Command::new("tar")
        .arg(format!("--format={format}"))
        .arg("-cf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .args(files.iter().map(|(n, _)| *n))
        .status()
        .expect("GNU tar must be installed");
    assert!(st.success());
    out
}

/// A valid appliance of raw disks with a manifest in `algo`.
fn appliance(dir: &Path, name: &str, disks: &[(&str, Vec<u8>)], algo: &str) -> PathBuf {
    let specs: Vec<(&str, u64, u64, Option<&str>)> = disks
        .iter()
        .map(|(n, d)| (*n, d.len() as u64, d.len() as u64, None))
        .collect();
    let xml = ovf_xml(&specs).into_bytes();
    let mut mf = manifest_line(algo, "vm.ovf", &xml);
    for (n, d) in disks {
        mf += &manifest_line(algo, n, d);
    }
    let mut files = vec![("vm.ovf", xml), ("vm.mf", mf.into_bytes())];
    files.extend(disks.iter().map(|(n, d)| (*n, d.clone())));
    make_ova(dir, name, "ustar", &files)
}

#[test]
fn list_json_and_human() {
    let t = tempfile::tempdir().unwrap();
    let ova = appliance(
        t.path(),
        "two.ova",
        &[
            ("a.img", disk_bytes(8192, 1)),
            ("b.img", disk_bytes(3000, 2)),
        ],
        "SHA256",
    );
    let out = glimpse(&["ova", "list", "--output", "json", s(&ova)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    let names: Vec<&str> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vm.ovf", "vm.mf", "a.img", "b.img"]);
    assert_eq!(v["members"][2]["size"], 8192);
    assert_eq!(v["members"][2]["type"], "regular");
    // Keys are kebab-case.
    assert_eq!(
        v["members"][2]["header-offset"],
        v["members"][2]["offset"].as_u64().unwrap() - 512
    );
    assert!(v["members"][2].get("header_offset").is_none(), "{v}");
    assert_eq!(v["disks"].as_array().unwrap().len(), 2);
    assert_eq!(v["disks"][1]["href"], "b.img");
    assert_eq!(v["disks"][1]["capacity"], 3000);
    assert_eq!(v["disks"][1]["virtual-size"], 3000);
    assert_eq!(v["disks"][1]["detected-format"], "raw");
    assert_eq!(v["virtual-systems"][0]["name"], "cli-vm");
    assert_eq!(v["virtual-systems"][0]["memory"], 512u64 << 20);
    assert_eq!(v["manifest"]["algorithms"][0], "sha256");

    let out = glimpse(&["ova", "list", s(&ova)]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("b.img") && text.contains("cli-vm") && text.contains("Disks:"),
        "{text}"
    );
}

#[test]
fn check_passes_good_archives_with_each_manifest_algorithm() {
    let t = tempfile::tempdir().unwrap();
    for algo in ["SHA256", "SHA512", "SHA1"] {
        let ova = appliance(
            t.path(),
            &format!("{algo}.ova"),
            &[("d.img", disk_bytes(4096, 3))],
            algo,
        );
        let out = glimpse(&["ova", "check", "--output", "json", s(&ova)]);
        let v = json_of(&out);
        assert_eq!(out.status.code(), Some(0), "{algo}: {v}");
        assert_eq!(v["verdict"], "pass");
        assert_eq!(
            codes(&v).contains(&"ova.manifest-sha1".to_string()),
            algo == "SHA1",
            "{v}"
        );
    }
    let ova = appliance(
        t.path(),
        "h.ova",
        &[("d.img", disk_bytes(4096, 3))],
        "SHA256",
    );
    let out = glimpse(&["ova", "check", s(&ova)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stdout).unwrap().contains(": pass"));
}

#[test]
fn tampered_manifest_is_rejected() {
    let t = tempfile::tempdir().unwrap();
    let xml = ovf_xml(&[("d.img", 4096, 4096, None)]).into_bytes();
    let disk = disk_bytes(4096, 4);
    let mut other = disk.clone();
    other[10] ^= 1;
    let mf = manifest_line("SHA256", "vm.ovf", &xml) + &manifest_line("SHA256", "d.img", &other);
    let ova = make_ova(
        t.path(),
        "t.ova",
        "ustar",
        &[("vm.ovf", xml), ("vm.mf", mf.into_bytes()), ("d.img", disk)],
    );
    let out = glimpse(&["ova", "check", "--output", "json", s(&ova)]);
    assert_eq!(out.status.code(), Some(1));
    let v = json_of(&out);
    assert_eq!(v["verdict"], "reject");
    assert_eq!(reject_codes(&v), ["ova.manifest-mismatch"]);
    let f = &v["findings"][0];
    assert!(
        f["offset"].as_u64().is_some() && f["message"].as_str().unwrap().contains("d.img"),
        "{f}"
    );
}

#[test]
fn hostile_fixtures_are_rejected_and_extract_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    // The gate (`check`) gives the codes fixtures/hostile/ova/expected-codes lists.
    let mut gate_rejects = Vec::new();
    let fixtures = glimpse_testkit::hostile::assert_codes("ova", |fx| {
        let out = glimpse(&["check", "--output", "json", s(&fx.path)]);
        assert_eq!(out.status.code(), Some(1), "{}", fx.name);
        let v = json_of(&out);
        gate_rejects.push(reject_codes(one(&v)));
        codes(one(&v))
    });
    for (fx, want) in fixtures.iter().zip(gate_rejects) {
        let name = fx.name.as_str();
        // `ova check` rejects for the gate's reasons too.
        let out = glimpse(&["ova", "check", "--output", "json", &fixture(name)]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let v = json_of(&out);
        let got = reject_codes(&v);
        assert!(want.iter().all(|c| got.contains(c)), "{name}: {want:?} {v}");

        let root = t.path().join(name);
        std::fs::create_dir(&root).unwrap();
        let dir = root.join("out");
        let out = glimpse(&["ova", "extract", &fixture(name), s(&dir)]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "{name} wrote into {}",
            root.display()
        );
    }
    assert!(!Path::new("/tmp/glimpse-evil.txt").exists());
    assert!(!t.path().join("glimpse-evil.txt").exists());
}

#[test]
fn extract_writes_members_once_and_never_overwrites() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk_bytes(10_000, 5);
    let ova = appliance(t.path(), "x.ova", &[("d.img", disk.clone())], "SHA256");
    let dir = t.path().join("new/dir");
    let out = glimpse(&["ova", "extract", "--output", "json", s(&ova), s(&dir)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_of(&out);
    assert_eq!(v["written"].as_array().unwrap().len(), 3);
    assert_eq!(std::fs::read(dir.join("d.img")).unwrap(), disk);
    // Written through temporary files renamed into place: none is left behind.
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["d.img", "vm.mf", "vm.ovf"]);

    std::fs::write(dir.join("vm.mf"), b"keep me").unwrap();
    std::fs::remove_file(dir.join("d.img")).unwrap();
    let out = glimpse(&["ova", "extract", s(&ova), s(&dir)]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(dir.join("vm.mf")).unwrap(), b"keep me");
    assert!(
        !dir.join("d.img").exists(),
        "nothing is written when a name already exists"
    );
}

#[test]
fn ovf_not_first_and_last() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk_bytes(4096, 6);
    let xml = ovf_xml(&[("d.img", 4096, 4096, None)]).into_bytes();
    let mid = make_ova(
        t.path(),
        "mid.ova",
        "ustar",
        &[
            ("d.img", disk.clone()),
            ("vm.ovf", xml.clone()),
            ("z.txt", b"z".to_vec()),
        ],
    );
    let v = json_of(&glimpse(&["ova", "check", "--output", "json", s(&mid)]));
    assert_eq!(reject_codes(&v), ["ova.descriptor-not-first"]);
    let last = make_ova(
        t.path(),
        "last.ova",
        "ustar",
        &[("d.img", disk), ("vm.ovf", xml)],
    );
    let out = glimpse(&["ova", "check", "--output", "json", s(&last)]);
    assert_eq!(out.status.code(), Some(0));
    assert!(codes(&json_of(&out)).contains(&"ova.descriptor-last".to_string()));
}

#[test]
fn pax_long_names() {
    let t = tempfile::tempdir().unwrap();
    let long = format!("{}.img", "n".repeat(140));
    let disk = disk_bytes(4096, 7);
    let xml = ovf_xml(&[(&long, 4096, 4096, None)]).into_bytes();
    let ova = make_ova(
        t.path(),
        "pax.ova",
        "pax",
        &[("vm.ovf", xml), (&long, disk)],
    );
    let out = glimpse(&["ova", "list", "--output", "json", s(&ova)]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out);
    assert_eq!(v["members"][1]["name"], long.as_str());
    assert_eq!(v["disks"][0]["virtual-size"], 4096);
    assert_eq!(glimpse(&["ova", "check", s(&ova)]).status.code(), Some(0));
}

#[test]
fn gzip_compressed_disk() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk_bytes(200_000, 8);
    std::fs::write(t.path().join("raw"), &disk).unwrap();
    let gz = Command::new("gzip")
        .arg("-c")
        .arg(t.path().join("raw"))
        .output()
        .expect("gzip must be installed")
        .stdout;
    let xml =
        ovf_xml(&[("d.img.gz", gz.len() as u64, disk.len() as u64, Some("gzip"))]).into_bytes();
    let ova = make_ova(
        t.path(),
        "gz.ova",
        "ustar",
        &[("vm.ovf", xml), ("d.img.gz", gz)],
    );
    let out = glimpse(&["ova", "list", "--output", "json", s(&ova)]);
    let v = json_of(&out);
    assert_eq!(v["disks"][0]["compression"], "gzip");
    assert_eq!(v["disks"][0]["virtual-size"], disk.len() as u64);
    let out = glimpse(&["ova", "check", "--output", "json", s(&ova)]);
    assert_eq!(out.status.code(), Some(0), "{}", json_of(&out));
}

#[test]
fn capacity_and_size_mismatches() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk_bytes(4096, 9);
    let xml = ovf_xml(&[("d.img", 4096, 8192, None)]).into_bytes();
    let ova = make_ova(
        t.path(),
        "cap.ova",
        "ustar",
        &[("vm.ovf", xml), ("d.img", disk.clone())],
    );
    let v = json_of(&glimpse(&["ova", "check", "--output", "json", s(&ova)]));
    assert_eq!(reject_codes(&v), ["ova.capacity-mismatch"]);
    let xml = ovf_xml(&[("d.img", 4000, 4096, None)]).into_bytes();
    let ova = make_ova(
        t.path(),
        "size.ova",
        "ustar",
        &[("vm.ovf", xml), ("d.img", disk.clone())],
    );
    let v = json_of(&glimpse(&["ova", "check", "--output", "json", s(&ova)]));
    assert_eq!(reject_codes(&v), ["ova.size-mismatch"]);
    let xml = ovf_xml(&[("http://evil.example/d.img", 4096, 4096, None)]).into_bytes();
    let ova = make_ova(
        t.path(),
        "url.ova",
        "ustar",
        &[("vm.ovf", xml), ("d.img", disk)],
    );
    let v = json_of(&glimpse(&["ova", "check", "--output", "json", s(&ova)]));
    assert_eq!(reject_codes(&v), ["ova.href"]);
}

#[test]
fn not_a_tar_is_rejected_and_a_missing_file_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let junk = t.path().join("junk.ova");
    std::fs::write(&junk, vec![0x5a; 4096]).unwrap();
    let out = glimpse(&["ova", "check", "--output", "json", s(&junk)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(reject_codes(&json_of(&out)), ["ova.tar-malformed"]);
    let out = glimpse(&["ova", "extract", s(&junk), s(&t.path().join("o"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!t.path().join("o").exists());

    let out = glimpse(&["ova", "check", s(&t.path().join("nope.ova"))]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.ova"));
    let out = glimpse(&["ova", "list", s(&t.path().join("nope.ova"))]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn standalone_ovf_lists_references_and_opens_only_siblings() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk_bytes(4096, 10);
    std::fs::write(t.path().join("d.img"), &disk).unwrap();
    let xml = ovf_xml(&[("d.img", 4096, 4096, None), ("../escape.img", 1, 1, None)]);
    std::fs::write(t.path().join("vm.ovf"), xml).unwrap();
    let ovf = t.path().join("vm.ovf");
    let out = glimpse(&["ova", "list", "--output", "json", s(&ovf)]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out);
    assert_eq!(v["references"][0]["openable"], true);
    assert_eq!(v["references"][1]["openable"], false);
    assert_eq!(v["disks"][0]["virtual-size"], 4096);
    assert!(v["disks"][1]["error"].as_str().is_some());
    let out = glimpse(&["ova", "check", "--output", "json", s(&ovf)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(reject_codes(&json_of(&out)), ["ova.href"]);
    // Plain `check` must not pass the descriptor as a raw disk (it is XML, not a disk).
    let out = glimpse(&["check", "--output", "json", s(&ovf)]);
    assert_eq!(out.status.code(), Some(1));
    let v = json_of(&out);
    assert_eq!(v["findings"][0]["code"], "raw.ovf-descriptor", "{v}");
}

#[test]
fn check_checks_every_disk_unless_one_is_chosen() {
    let t = tempfile::tempdir().unwrap();
    let overlay = t.path().join("o.qcow2");
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
        ])
        .arg(&overlay)
        .arg("1M")
        .status()
        .expect("qemu-img must be installed");
    assert!(st.success());
    let qcow = std::fs::read(&overlay).unwrap();
    let raw = disk_bytes(8192, 9);
    let xml = ovf_xml(&[
        ("a.img", raw.len() as u64, raw.len() as u64, None),
        ("b.qcow2", qcow.len() as u64, 1 << 20, None),
    ])
    .into_bytes();
    let ova = make_ova(
        t.path(),
        "two.ova",
        "ustar",
        &[("vm.ovf", xml), ("a.img", raw), ("b.qcow2", qcow)],
    );
    // Disk 0 is clean, disk 1 has a backing file: the appliance is rejected.
    let out = glimpse(&["check", "--output", "json", s(&ova)]);
    assert_eq!(out.status.code(), Some(1), "{}", json_of(&out));
    let all = json_of(&out);
    support::schema::assert_valid("check.json", &all);
    let v = one(&all);
    assert_eq!(v["verdict"], "reject");
    assert!(codes(v).contains(&"qcow2.backing-file".to_string()), "{v}");
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2);
    assert_eq!(
        (disks[0]["disk"].as_u64(), disks[1]["disk"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(disks[0]["verdict"], "pass");
    assert_eq!(disks[1]["verdict"], "reject");
    assert_eq!(disks[1]["href"], "b.qcow2");
    assert!(codes(&disks[1]).contains(&"qcow2.backing-file".to_string()));
    // Human output names the finding too.
    let out = glimpse(&["check", s(&ova)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("qcow2.backing-file"));
    // The policy applies to every disk: allowing backing files passes the appliance.
    let out = glimpse(&["check", "--allow-backing-file", s(&ova)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // `--disk N` checks that disk only.
    let out = glimpse(&["check", "--disk", "0", "--output", "json", s(&ova)]);
    assert_eq!(out.status.code(), Some(0), "{}", json_of(&out));
    assert!(one(&json_of(&out)).get("disks").is_none());
    let out = glimpse(&["check", "--disk", "1", s(&ova)]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn list_shows_the_names_other_readers_see() {
    let out = glimpse(&[
        "ova",
        "list",
        "--output",
        "json",
        &fixture("gnu-prefix-traversal.ova"),
    ]);
    let v = json_of(&out);
    let m = &v["members"][2];
    assert_eq!(m["name"], "glimpse-evil.txt");
    assert_eq!(m["tarfile-name"], "../../../../tmp/glimpse-evil.txt");
    assert!(m.get("gnu-tar-name").is_none(), "{m}");
    assert!(v["members"][1].get("tarfile-name").is_none());
}

#[test]
fn a_large_gzip_disk_is_not_held_in_memory() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let gz = Command::new("gzip")
        .arg("-c")
        .arg(&raw)
        .output()
        .expect("gzip must be installed")
        .stdout;
    let xml = ovf_xml(&[("d.img.gz", gz.len() as u64, 128 << 20, Some("gzip"))]).into_bytes();
    let ova = make_ova(
        t.path(),
        "big.ova",
        "ustar",
        &[("vm.ovf", xml), ("d.img.gz", gz)],
    );
    // Peak RSS of the check, from GNU time: the 128 MiB disk is spooled, not held.
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", env!("CARGO_BIN_EXE_glimpse"), "check"])
        .arg(&ova)
        .output()
        .expect("GNU time (/usr/bin/time) must be installed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let kib: u64 = err.trim().lines().last().unwrap().trim().parse().unwrap();
    assert!(kib < 64 * 1024, "peak RSS {kib} KiB");
}

/// Names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Starts `ova extract` of `ova` into `dir` and waits until its first temporary file exists:
/// one without a name (O_TMPFILE), so the directory shows nothing new meanwhile.
fn extract_until_a_temporary_file(ova: &Path, dir: &Path) -> std::process::Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["ova", "extract", s(ova), s(dir)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !(dir.is_dir() && unnamed_files_in(child.id(), dir) > 0)
        && start.elapsed() < std::time::Duration::from_secs(120)
    {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    if unnamed_files_in(child.id(), dir) == 0 {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no temporary file appeared");
    }
    let hidden: Vec<String> = listing(dir)
        .into_iter()
        .filter(|n| n.starts_with(".glimpse-extract-"))
        .collect();
    assert!(hidden.is_empty(), "a named temporary file: {hidden:?}");
    child
}

#[test]
fn a_signal_during_extract_leaves_no_temporary_file() {
    let t = tempfile::tempdir().unwrap();
    // Large enough that writing it outlasts the signal.
    let disk = disk_bytes(384 << 20, 9);
    let ova = appliance(t.path(), "big.ova", &[("d.img", disk)], "SHA256");
    std::fs::remove_dir_all(t.path().join("big.ova.d")).unwrap();
    for (sig, name) in [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        // A directory with a file of the user's, and one glimpse creates.
        let mine = t.path().join(format!("mine-{name}"));
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(mine.join("unrelated.txt"), b"keep me").unwrap();
        let fresh = t.path().join(format!("fresh-{name}"));
        for dir in [&mine, &fresh] {
            let mut child = extract_until_a_temporary_file(&ova, dir);
            // SAFETY: sending a signal to our own child process.
            assert_eq!(
                unsafe { libc::kill(i32::try_from(child.id()).unwrap(), sig) },
                0
            );
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            let status = child.wait().unwrap();
            assert_eq!(status.code(), Some(2), "{name}: {err}");
            assert!(
                err.contains(&format!("interrupted by {name}; nothing was extracted")),
                "{name}: {err}"
            );
        }
        assert_eq!(listing(&mine), ["unrelated.txt"], "{name}");
        assert_eq!(
            std::fs::read(mine.join("unrelated.txt")).unwrap(),
            b"keep me"
        );
        assert!(
            !fresh.exists(),
            "{name}: the directory glimpse made is removed"
        );
    }
    // Two signals: the second does not wait, and still removes the temporary files and the
    // directories glimpse made, however deep.
    let dir = t.path().join("twice");
    std::fs::create_dir(&dir).unwrap();
    let fresh = t.path().join("twice-fresh");
    for (into, made) in [(dir.clone(), None), (fresh.join("a/b"), Some(&fresh))] {
        let mut child = extract_until_a_temporary_file(&ova, &into);
        let pid = i32::try_from(child.id()).unwrap();
        for _ in 0..2 {
            // SAFETY: as above.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        }
        let status = child.wait().unwrap();
        assert!(matches!(status.code(), Some(143) | Some(2)), "{status:?}");
        match made {
            None => assert_eq!(listing(&into), Vec::<String>::new()),
            Some(top) => assert!(!top.exists(), "{} is left", top.display()),
        }
    }
    // SIGKILL, which no handler sees: the member being written has no name, so nothing is
    // left in the directory (a directory the extraction made stays, empty).
    let dir = t.path().join("killed");
    std::fs::create_dir(&dir).unwrap();
    let mut child = extract_until_a_temporary_file(&ova, &dir);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(listing(&dir), Vec::<String>::new());
}

/// A ustar header for a regular file.
fn ustar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[148..156].copy_from_slice(b"        ");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

#[test]
fn a_signal_stops_extract_while_it_checks_the_manifest() {
    use std::os::unix::fs::FileExt;
    let t = tempfile::tempdir().unwrap();
    // Three members of almost 8 GiB each, all holes in a sparse archive: digesting them for
    // the manifest takes far longer than the CPU limit below, writing them never starts.
    let big: u64 = (8 << 30) - 512;
    let xml = ovf_xml(&[]).into_bytes();
    let mut mf = String::new();
    for i in 0..3 {
        mf += &format!("SHA512(m{i}.img)= {}\n", "0".repeat(128));
    }
    let ova = t.path().join("holes.ova");
    let f = std::fs::File::create(&ova).unwrap();
    let mut at = 0u64;
    let mut put = |name: &str, data: &[u8], size: u64| {
        f.write_all_at(&ustar_header(name, size), at).unwrap();
        f.write_all_at(data, at + 512).unwrap();
        at += 512 + size.div_ceil(512) * 512;
    };
    put("vm.ovf", &xml, xml.len() as u64);
    put("vm.mf", mf.as_bytes(), mf.len() as u64);
    for i in 0..3 {
        put(&format!("m{i}.img"), &[], big);
    }
    f.set_len(at + 1024).unwrap();
    drop(f);
    let dir = t.path().join("fresh/out");
    // A CPU limit, so that a signal that is not noticed fails the test rather than hanging.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -t 20; exec '{}' ova extract '{}' '{}'",
            env!("CARGO_BIN_EXE_glimpse"),
            s(&ova),
            s(&dir)
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it has read 256 MiB: it is digesting.
    let read = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/io"))
            .ok()
            .and_then(|io| {
                io.lines()
                    .find_map(|l| l.strip_prefix("rchar: ").map(|n| n.trim().parse().ok()))
                    .flatten()
            })
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    while read(child.id()) < 256 << 20 && start.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(read(child.id()) >= 256 << 20, "the digest never started");
    // SAFETY: sending a signal to our own child process.
    assert_eq!(
        unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGINT) },
        0
    );
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{status:?}: {err}");
    assert!(
        err.contains("interrupted by SIGINT; nothing was extracted"),
        "{err}"
    );
    assert!(!t.path().join("fresh").exists());
}

#[test]
fn extract_under_a_file_size_limit_fails_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk_bytes(4 << 20, 3);
    let ova = appliance(t.path(), "x.ova", &[("d.img", disk)], "SHA256");
    let dir = t.path().join("out");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("unrelated.txt"), b"keep me").unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 1024; exec '{}' ova extract '{}' '{}'",
            env!("CARGO_BIN_EXE_glimpse"),
            s(&ova),
            s(&dir)
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // An ordinary error (not death by SIGXFSZ), naming the file it could not write.
    assert_eq!(out.status.code(), Some(2), "{:?} {err}", out.status);
    assert!(
        err.contains("writing") && err.contains("d.img") && err.contains("File too large"),
        "{err}"
    );
    assert_eq!(listing(&dir), ["unrelated.txt"]);
}

/// Runs `ova extract` with the open-file limit set to `soft`/`hard` for the child.
fn extract_with_nofile(ova: &Path, dir: &Path, soft: u64, hard: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glimpse"));
    cmd.args(["ova", "extract", s(ova), s(dir)]);
    // SAFETY: only setrlimit, which is async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

/// Every member stays open until all are written (unnamed files have no other handle), so an
/// archive of more members than the soft open-file limit (1,024 is common) used to fail with
/// "Too many open files" after its check passed. glimpse raises the soft limit to what it
/// needs; when even the hard limit is too low it says so before writing anything.
#[test]
fn an_archive_of_many_members_extracts_under_the_usual_open_file_limit() {
    let t = tempfile::tempdir().unwrap();
    let disk = disk_bytes(4096, 5);
    let specs = [("d.img", 4096u64, 4096u64, None)];
    let xml = ovf_xml(&specs).into_bytes();
    let mf = manifest_line("SHA256", "vm.ovf", &xml) + &manifest_line("SHA256", "d.img", &disk);
    let names: Vec<String> = (0..1100).map(|i| format!("n{i}.txt")).collect();
    let mut files = vec![("vm.ovf", xml), ("vm.mf", mf.into_bytes()), ("d.img", disk)];
    files.extend(names.iter().map(|n| (n.as_str(), n.as_bytes().to_vec())));
    let ova = make_ova(t.path(), "many.ova", "ustar", &files);
    let check = glimpse(&["ova", "check", s(&ova)]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let into = t.path().join("out");
    let o = extract_with_nofile(&ova, &into, 1024, 4096);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(listing(&into).len(), 1103);
    assert_eq!(std::fs::read(into.join("n7.txt")).unwrap(), b"n7.txt");
    let low = t.path().join("low");
    let o = extract_with_nofile(&ova, &low, 512, 512);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("open files") && err.contains("nothing was extracted"),
        "{err}"
    );
    assert!(!low.exists(), "nothing is left");
}
