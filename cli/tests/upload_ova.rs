//! `glimpse upload` of an OVA (`container_format=ova`) against the real glance-api. Needs the
//! OVA parser of glimpse-formats (`policy::inspect` with an expected format of ova).

mod upload_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};
use upload_support::{
    digests, glance, glimpse, json, raw_file, text, unique, upload, Proxy, PutMode,
};

const BIN: &str = "upload_ova";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OVA made the way exporters make one: the descriptor first, then the manifest, then a
/// streamOptimized VMDK. `corrupt_manifest` writes a wrong digest for the disk.
fn make_ova(dir: &Path, corrupt_manifest: bool) -> PathBuf {
    let work = dir.join("ova");
    std::fs::create_dir_all(&work).unwrap();
    let src = raw_file(dir, "src.raw", 2 * 1024 * 1024);
    let vmdk = work.join("disk1.vmdk");
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
        ])
        .arg(&src)
        .arg(&vmdk)
        .output()
        .expect("qemu-img is required for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vmdk_len = std::fs::metadata(&vmdk).unwrap().len();
    let ovf = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References>
    <File ovf:href="disk1.vmdk" ovf:id="file1" ovf:size="{vmdk_len}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="2097152" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="glimpse-test">
    <Info>A virtual machine</Info>
    <Name>glimpse-test</Name>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>disk0</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"#
    );
    std::fs::write(work.join("glimpse.ovf"), &ovf).unwrap();
    let disk_digest = if corrupt_manifest {
        "0".repeat(64)
    } else {
        hex(&Sha256::digest(std::fs::read(&vmdk).unwrap()))
    };
    let mf = format!(
        "SHA256(glimpse.ovf)= {}\nSHA256(disk1.vmdk)= {disk_digest}\n",
        hex(&Sha256::digest(ovf.as_bytes()))
    );
    std::fs::write(work.join("glimpse.mf"), mf).unwrap();
    let ova = dir.join(if corrupt_manifest {
        "bad.ova"
    } else {
        "good.ova"
    });
    let out = Command::new("tar")
        .arg("--format=ustar")
        .arg("-cf")
        .arg(&ova)
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
    ova
}

#[test]
fn an_ova_uploads_with_container_format_ova() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let ova = make_ova(dir.path(), false);
    let (md5, sha512) = digests(&ova);
    let name = unique("ova");
    // no --container-format: an OVA file defaults to ova, its disk to vmdk
    let out = upload(
        &g.url,
        &["--name", &name, "--output", "json", ova.to_str().unwrap()],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let img = json(&out);
    assert_eq!(img["status"], "active");
    assert_eq!(img["container_format"], "ova");
    assert_eq!(img["disk_format"], "vmdk");
    assert_eq!(img["checksum"], md5.as_str());
    assert_eq!(img["os_hash_value"], sha512.as_str());
    assert_eq!(img["min_disk"], 1);
    g.delete(img["id"].as_str().unwrap());
}

#[test]
fn an_ova_whose_manifest_does_not_match_is_refused_locally() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Pass);
    let dir = tempfile::tempdir().unwrap();
    let ova = make_ova(dir.path(), true);
    let name = unique("ova-bad-manifest");
    let out = upload(
        &proxy.url,
        &[
            "--name",
            &name,
            "--container-format",
            "ova",
            ova.to_str().unwrap(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(
        proxy.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert!(g.images_named(&name).is_empty());
}

#[test]
fn a_raw_file_declared_ova_is_refused_locally() {
    let g = glance(BIN);
    let proxy = Proxy::start(&g.url, PutMode::Pass);
    let dir = tempfile::tempdir().unwrap();
    let f = raw_file(dir.path(), "disk.raw", 100_000);
    let name = unique("raw-as-ova");
    let out = upload(
        &proxy.url,
        &[
            "--name",
            &name,
            "--container-format",
            "ova",
            "--disk-format",
            "vmdk",
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

/// Runs `qemu-img` with `args`, failing the test when it is missing or fails.
fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OVA of two disks, no manifest: a clean streamOptimized VMDK first, then a qcow2 whose
/// backing file is `base.raw` (never opened by glimpse).
fn make_ova_with_backed_second_disk(dir: &Path) -> PathBuf {
    let work = dir.join("ova2");
    std::fs::create_dir_all(&work).unwrap();
    let src = raw_file(dir, "src.raw", 2 * 1024 * 1024);
    let (vmdk, qcow2) = (work.join("disk1.vmdk"), work.join("disk2.qcow2"));
    let (src_s, vmdk_s, qcow2_s) = (
        src.to_str().unwrap(),
        vmdk.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    );
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        src_s,
        vmdk_s,
    ]);
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", src_s, "-F", "raw", qcow2_s, "2M",
    ]);
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    let ovf = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References>
    <File ovf:href="disk1.vmdk" ovf:id="file1" ovf:size="{}"/>
    <File ovf:href="disk2.qcow2" ovf:id="file2" ovf:size="{}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="2097152" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="2097152" ovf:diskId="vmdisk2" ovf:fileRef="file2"/>
  </DiskSection>
</Envelope>
"#,
        len(&vmdk),
        len(&qcow2)
    );
    std::fs::write(work.join("two.ovf"), ovf).unwrap();
    let ova = dir.join("two-disks.ova");
    let out = Command::new("tar")
        .arg("--format=ustar")
        .arg("-cf")
        .arg(&ova)
        .arg("-C")
        .arg(&work)
        .args(["two.ovf", "disk1.vmdk", "disk2.qcow2"])
        .output()
        .expect("tar is required for this test");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ova
}

/// Upload's gate is no weaker than `check`: the second disk's backing file rejects the OVA
/// before anything is sent. Runs without Glance: validation happens before any connection,
/// and the endpoint given refuses connections, so a passing validation fails differently.
#[test]
fn an_ova_whose_second_disk_has_a_backing_file_is_refused_locally() {
    let dir = tempfile::tempdir().unwrap();
    let ova = make_ova_with_backed_second_disk(dir.path());
    let ova_s = ova.to_str().unwrap();
    // The first disk alone passes: only the second disk can reject the appliance.
    let out = glimpse()
        .args(["check", "--disk", "0", ova_s])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    let nowhere = "http://127.0.0.1:9/";
    let out = upload(nowhere, &["--name", "two-disks", ova_s]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("qcow2.backing-file"), "{stderr}");
    assert!(stderr.contains("disk 1 (disk2.qcow2)"), "{stderr}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    // Allowed, the same appliance passes validation and only then fails to connect.
    let out = upload(
        nowhere,
        &["--name", "two-disks", "--allow-backing-file", ova_s],
    );
    let (stdout, stderr) = text(&out);
    assert_ne!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stderr.contains("failed the check"), "{stderr}");
}
