//! Content digests of sub-sector disks (issue 12, "Small raw files keep their content
//! digest"): a 440-byte raw and its qcow2 conversions, which qemu-img and glimpse round up to
//! a 512-byte sector, are one disk with one digest (docs/content-digest.md).

mod support;

use std::process::Command;

use support::{content_digest, glimpse, s};

#[test]
fn a_440_byte_raw_and_its_qcow2_conversions_share_one_content_digest() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("mbr.raw");
    let mut data = vec![0u8; 440];
    data[0] = 0xeb;
    data[439] = 0x90;
    std::fs::write(&raw, &data).unwrap();

    let ours = dir.path().join("ours.qcow2");
    let o = glimpse(&["convert", "-O", "qcow2", s(&raw), s(&ours)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs = dir.path().join("theirs.qcow2");
    let q = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&theirs)
        .output()
        .expect("qemu-img is required");
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));

    let want = content_digest(&raw);
    assert_eq!(content_digest(&ours), want);
    assert_eq!(content_digest(&theirs), want);
    // A whole extra sector of zeros is a different disk.
    let longer = dir.path().join("longer.raw");
    data.resize(1024, 0);
    std::fs::write(&longer, &data).unwrap();
    assert_ne!(content_digest(&longer), want);
}
