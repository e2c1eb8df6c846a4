//! `glimpse upload` of every disk format Glance inspects, against the real glance-api, with
//! images made by qemu-img (and genisoimage for ISO). These need the format parsers of
//! glimpse-formats (qcow2, VMDK, VHD, VHDX, VDI, ISO); they fail loudly where qemu-img or
//! genisoimage is missing.

mod upload_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use glimpse_testkit::qemu::img as qemu_img;
use upload_support::{
    digests, glance, glimpse, json, raw_file, text, unique, upload, Proxy, PutMode,
};

const BIN: &str = "upload_formats";

/// A raw source with data and zeros, converted to `fmt` (qemu-img's name) with `opts`.
fn make(dir: &Path, fmt: &str, opts: &[&str]) -> PathBuf {
    let src = raw_file(dir, "src.raw", 3 * 1024 * 1024);
    let out = dir.join(format!("disk.{fmt}"));
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
    args.extend_from_slice(opts);
    args.push(src.to_str().unwrap());
    args.push(out.to_str().unwrap());
    qemu_img(&args);
    out
}

fn upload_ok(file: &Path, disk_format: &str, extra: &[&str]) {
    let g = glance(BIN);
    let (md5, sha512) = digests(file);
    let name = unique(disk_format);
    let mut args = vec![
        "--name",
        &name,
        "--output",
        "json",
        "--disk-format",
        disk_format,
    ];
    args.extend_from_slice(extra);
    args.push(file.to_str().unwrap());
    let out = upload(&g.url, &args);
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{disk_format}: {stdout}\n{stderr}"
    );
    let img = json(&out);
    assert_eq!(img["status"], "active");
    assert_eq!(img["disk_format"], disk_format);
    assert_eq!(img["checksum"], md5.as_str());
    assert_eq!(img["os_hash_value"], sha512.as_str());
    assert_eq!(img["size"], std::fs::metadata(file).unwrap().len());
    g.delete(img["id"].as_str().unwrap());
}

#[test]
fn qcow2_uploads_active_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap();
    let f = make(dir.path(), "qcow2", &[]);
    upload_ok(&f, "qcow2", &[]);
}

#[test]
fn vmdk_uploads_active_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap();
    let f = make(dir.path(), "vmdk", &["-o", "subformat=streamOptimized"]);
    upload_ok(&f, "vmdk", &[]);
}

#[test]
fn vhd_uploads_active_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap();
    let f = make(dir.path(), "vpc", &[]);
    upload_ok(&f, "vhd", &[]);
}

#[test]
fn vhdx_uploads_active_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap();
    let f = make(dir.path(), "vhdx", &[]);
    upload_ok(&f, "vhdx", &[]);
}

#[test]
fn vdi_uploads_active_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap();
    let f = make(dir.path(), "vdi", &[]);
    upload_ok(&f, "vdi", &[]);
}

#[test]
fn iso_uploads_active_with_matching_digests() {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("README.TXT"), b"glimpse upload test\n").unwrap();
    let iso = dir.path().join("disk.iso");
    let out = Command::new("genisoimage")
        .args([
            "-quiet",
            "-V",
            "GLIMPSE",
            "-o",
            iso.to_str().unwrap(),
            content.to_str().unwrap(),
        ])
        .output()
        .expect("genisoimage is required for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    upload_ok(&iso, "iso", &[]);
}

/// A hybrid ISO with an EFI partition appended after its volume (xorriso
/// `-append_partition`, as distributions build bootable ISOs): Glance records the volume's
/// size as its virtual size, glimpse's virtual size is the whole file (the appended partition
/// is part of the disk). The upload must verify Glance's record by Glance's rule, not delete
/// the image it just uploaded (glanceparity campaign).
#[test]
fn hybrid_iso_with_an_appended_partition_uploads_active() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    std::fs::write(tree.join("hello.txt"), b"hello\n").unwrap();
    let efi = dir.path().join("efi.img");
    std::fs::write(&efi, vec![0x5au8; 1 << 20]).unwrap();
    let iso = dir.path().join("hybrid.iso");
    let out = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "HYB", "-o"])
        .arg(&iso)
        .args(["-append_partition", "2", "0xef"])
        .arg(&efi)
        .arg(&tree)
        .output()
        .expect("xorriso is required for this test (apt-get install xorriso)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file_size = std::fs::metadata(&iso).unwrap().len();

    let out = glimpse()
        .args(["info", "--output", "json"])
        .arg(&iso)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let info = json(&out);
    let volume = info["format-specific"]["data"]["volume-size"]
        .as_u64()
        .expect("volume-size");
    assert!(
        volume < file_size,
        "the partition is appended: {volume} < {file_size}"
    );
    assert_eq!(info["virtual-size"].as_u64(), Some(file_size));

    let name = unique("hybrid");
    let out = upload(
        &g.url,
        &[
            "--name",
            &name,
            "--output",
            "json",
            "--disk-format",
            "iso",
            iso.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let img = json(&out);
    assert_eq!(img["status"], "active");
    assert_eq!(img["virtual_size"].as_u64(), Some(volume), "{img}");
    assert_eq!(img["size"].as_u64(), Some(file_size));
    g.delete(img["id"].as_str().unwrap());
}

#[test]
fn the_detected_format_is_the_default_disk_format() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let f = make(dir.path(), "qcow2", &[]);
    let name = unique("detected");
    let out = upload(
        &g.url,
        &["--name", &name, "--output", "json", f.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let img = json(&out);
    assert_eq!(img["disk_format"], "qcow2");
    assert_eq!(
        img["virtual_size"],
        3 * 1024 * 1024,
        "Glance's inspector and ours agree"
    );
    assert_eq!(img["min_disk"], 1);
    g.delete(img["id"].as_str().unwrap());
}

#[test]
fn a_qcow2_declared_raw_is_refused_locally() {
    // Glance itself accepts this (204, with a log warning).
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Pass);
    let dir = tempfile::tempdir().unwrap();
    let f = make(dir.path(), "qcow2", &[]);
    let name = unique("qcow2-as-raw");
    let out = upload(
        &proxy.url,
        &["--name", &name, "--disk-format", "raw", f.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("format.mismatch"), "{stderr}");
    assert_eq!(
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(g.images_named(&name).is_empty());

    // nor may it pass as an Amazon image, which must be plain bytes
    let out = upload(
        &proxy.url,
        &[
            "--name",
            &name,
            "--disk-format",
            "ami",
            "--container-format",
            "ami",
            f.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{:?}", text(&out));
    assert_eq!(
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(g.images_named(&name).is_empty());
}

#[test]
fn a_qcow2_with_a_backing_file_is_refused_unless_allowed() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let base = make(dir.path(), "qcow2", &[]);
    let overlay = dir.path().join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);
    let name = unique("backing");
    let out = upload(&g.url, &["--name", &name, overlay.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("qcow2.backing-file"), "{stderr}");
    assert!(g.images_named(&name).is_empty());
}

#[test]
fn a_qed_image_is_refused_locally() {
    // QED has no Glance disk_format; glimpse refuses it rather than guess one.
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Pass);
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("disk.qed");
    qemu_img(&["create", "-q", "-f", "qed", f.to_str().unwrap(), "16M"]);
    let name = unique("qed");
    let out = upload(&proxy.url, &["--name", &name, f.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("format.unsupported"), "{stderr}");
    assert_eq!(
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(g.images_named(&name).is_empty());
}
