//! The guest disk of an ISO is the whole file (issue 12, "ISO images keep every byte"): a
//! partition that xorriso appends after the ISO 9660 volume (how Debian ships its UEFI boot
//! image) survives `convert`, and `compare`, `map` and `checksum --content` see it.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{content_digest, glimpse, json_of, s};

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} is required: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ISO whose GPT-described FAT partition lies after the volume, with files in both.
fn iso_with_appended_partition(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("readme.txt"), b"inside the ISO volume\n").unwrap();
    let efi = dir.join("efi.img");
    run(Command::new("mkfs.fat").arg("-C").arg(&efi).arg("1440"));
    let payload = dir.join("BOOTX64.EFI");
    std::fs::write(&payload, vec![0x5a_u8; 200_000]).unwrap();
    run(Command::new("mcopy")
        .arg("-i")
        .arg(&efi)
        .arg(&payload)
        .arg("::/"));
    let iso = dir.join("appended.iso");
    run(Command::new("xorriso")
        .args(["-as", "mkisofs", "-o"])
        .arg(&iso)
        .args(["-V", "APPENDED", "-append_partition", "2", "0xef"])
        .arg(&efi)
        .arg("-appended_part_as_gpt")
        .arg(&tree));
    iso
}

#[test]
fn an_iso_with_an_appended_partition_converts_to_the_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let iso = iso_with_appended_partition(dir.path());
    let bytes = std::fs::read(&iso).unwrap();
    let info = json_of(&glimpse(&["info", "--output", "json", s(&iso)]));
    let vol = info["format-specific"]["data"]["volume-size"]
        .as_u64()
        .unwrap();
    assert!(
        vol < bytes.len() as u64,
        "the partition is after the volume"
    );
    assert_eq!(info["virtual-size"], bytes.len() as u64);

    let out = dir.path().join("out.raw");
    let o = glimpse(&["convert", "-O", "raw", s(&iso), s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&out).unwrap() == bytes, "convert lost bytes");

    // A copy cut at the end of the volume is a different disk.
    let cut = dir.path().join("cut.iso");
    std::fs::write(&cut, &bytes[..usize::try_from(vol).unwrap()]).unwrap();
    let c = glimpse(&["compare", s(&iso), s(&cut)]);
    assert_eq!(
        c.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&c.stdout)
    );
    assert_ne!(content_digest(&iso), content_digest(&cut));
    assert_eq!(content_digest(&iso), content_digest(&out));

    // map covers the file.
    let m = json_of(&glimpse(&["map", "--output", "json", s(&iso)]));
    let end = m
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(end, bytes.len() as u64);
}
