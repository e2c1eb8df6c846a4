//! OVAs holding VMDK disks made by qemu-img, as VMware and VirtualBox export them. These need
//! the VMDK parser (`formats/src/vmdk`) and the `convert` command; qemu-img and GNU tar must be
//! installed (the tests fail, never skip, without them).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{codes, glimpse, json_of, s};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const STREAM: &str = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

/// A raw disk of `mib` MiB with data in a few places, converted by qemu-img to a
/// streamOptimized VMDK at `dir/name`.
fn stream_vmdk(dir: &Path, name: &str, mib: u64, seed: u8) -> PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    let mut data = vec![0u8; (mib << 20) as usize];
    for (i, b) in data.iter_mut().enumerate().take(300_000) {
        *b = (i as u8).wrapping_mul(13).wrapping_add(seed);
    }
    let tail = data.len() - 5000;
    data[tail..].fill(seed | 1);
    std::fs::write(&raw, &data).unwrap();
    let out = dir.join(name);
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            s(&raw),
            s(&out),
        ],
    );
    out
}

/// `(href, file, capacity)` per disk; the OVA holds the descriptor, then each file.
fn make_ova(dir: &Path, name: &str, disks: &[(&str, &Path, u64)]) -> PathBuf {
    let stage = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&stage).unwrap();
    let mut files = String::new();
    let mut ds = String::new();
    for (i, (href, path, cap)) in disks.iter().enumerate() {
        let size = std::fs::metadata(path).unwrap().len();
        std::fs::copy(path, stage.join(href)).unwrap();
        files += &format!(r#"<File ovf:id="file{i}" ovf:href="{href}" ovf:size="{size}"/>"#);
        ds += &format!(
            r#"<Disk ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:capacity="{}" ovf:capacityAllocationUnits="byte * 2^20" ovf:format="{STREAM}"/>"#,
            cap >> 20
        );
    }
    let xml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>{files}</References>
  <DiskSection><Info>disks</Info>{ds}</DiskSection>
  <VirtualSystem ovf:id="vm"><Info>vm</Info><Name>vmdk-vm</Name></VirtualSystem>
</Envelope>
"#
    );
    std::fs::write(stage.join("vm.ovf"), xml).unwrap();
    let out = dir.join(name);
    let mut args = vec![
        "--format=ustar".to_string(),
        "-cf".into(),
        s(&out).into(),
        "-C".into(),
        s(&stage).into(),
        "vm.ovf".into(),
    ];
    args.extend(disks.iter().map(|(h, _, _)| h.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run("tar", &argv);
    out
}

#[test]
fn stream_optimized_disk_lists_and_passes() {
    let t = tempfile::tempdir().unwrap();
    let vmdk = stream_vmdk(t.path(), "disk1.vmdk", 2, 1);
    let ova = make_ova(t.path(), "one.ova", &[("disk1.vmdk", &vmdk, 2 << 20)]);
    let out = glimpse(&["ova", "list", "--output", "json", s(&ova)]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out);
    assert_eq!(v["disks"][0]["format"], "vmdk streamOptimized");
    assert_eq!(v["disks"][0]["detected-format"], "vmdk");
    assert_eq!(v["disks"][0]["virtual-size"], 2u64 << 20);
    assert_eq!(v["disks"][0]["capacity"], 2u64 << 20);
    let out = glimpse(&["ova", "check", "--output", "json", s(&ova)]);
    assert_eq!(out.status.code(), Some(0), "{}", json_of(&out));
}

#[test]
fn several_vmdk_disks_and_capacity_mismatch() {
    let t = tempfile::tempdir().unwrap();
    let a = stream_vmdk(t.path(), "a.vmdk", 1, 2);
    let b = stream_vmdk(t.path(), "b.vmdk", 3, 3);
    let ova = make_ova(
        t.path(),
        "two.ova",
        &[("a.vmdk", &a, 1 << 20), ("b.vmdk", &b, 3 << 20)],
    );
    let v = json_of(&glimpse(&["ova", "list", "--output", "json", s(&ova)]));
    assert_eq!(v["disks"][1]["virtual-size"], 3u64 << 20);
    assert_eq!(glimpse(&["ova", "check", s(&ova)]).status.code(), Some(0));

    let bad = make_ova(t.path(), "cap.ova", &[("a.vmdk", &a, 4 << 20)]);
    let out = glimpse(&["ova", "check", "--output", "json", s(&bad)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(codes(&json_of(&out)).contains(&"ova.capacity-mismatch".to_string()));
}

#[test]
fn vmdk_with_external_extent_is_rejected_through_the_ova() {
    let t = tempfile::tempdir().unwrap();
    let desc = t.path().join("flat.vmdk");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            s(&desc),
            "1M",
        ],
    );
    let ova = make_ova(t.path(), "ext.ova", &[("flat.vmdk", &desc, 1 << 20)]);
    let out = glimpse(&["ova", "check", "--output", "json", s(&ova)]);
    assert_eq!(out.status.code(), Some(1));
    let v = json_of(&out);
    assert!(codes(&v).iter().any(|c| c == "vmdk.external-extent"), "{v}");
}

#[test]
fn convert_an_ova_equals_its_vmdk() {
    let t = tempfile::tempdir().unwrap();
    let a = stream_vmdk(t.path(), "a.vmdk", 1, 4);
    let b = stream_vmdk(t.path(), "b.vmdk", 2, 5);
    let ova = make_ova(
        t.path(),
        "x.ova",
        &[("a.vmdk", &a, 1 << 20), ("b.vmdk", &b, 2 << 20)],
    );
    let out_q = t.path().join("out.qcow2");
    let out = glimpse(&["convert", "-O", "qcow2", s(&ova), s(&out_q)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(
        "qemu-img",
        &["compare", "-f", "vmdk", "-F", "qcow2", s(&a), s(&out_q)],
    );
    run("qemu-img", &["check", "-f", "qcow2", s(&out_q)]);
}
