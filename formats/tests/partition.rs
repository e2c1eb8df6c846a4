//! Partition-table and boot-sector details of raw disks (sgdisk, mkfs.vfat, a written MBR),
//! one test per finding code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use glimpse_formats::partition::{describe, HEAD_LEN};
use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{detect, open, Format, Limits, Source};

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const MIB: u64 = 1 << 20;

fn blank(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// A 4 MiB disk with a GPT: an EFI system partition and a Linux partition to the end.
fn gpt_disk(dir: &Path) -> PathBuf {
    let p = blank(dir, "gpt.raw", 4 * MIB);
    run(Command::new("sgdisk")
        .args([
            "--clear",
            "-n",
            "1:2048:4095",
            "-t",
            "1:ef00",
            "-c",
            "1:esp",
            "-n",
            "2:4096:0",
            "-t",
            "2:8300",
            "-c",
            "2:data",
        ])
        .arg(&p));
    p
}

/// An MBR written by hand, as `sfdisk` would: entries at 446, signature at 510.
fn mbr(entries: &[(u8, u8, u32, u32)], size: u64) -> Vec<u8> {
    let mut b = vec![0u8; usize::try_from(size).unwrap()];
    for (k, &(status, kind, start, sectors)) in entries.iter().enumerate() {
        let o = 446 + 16 * k;
        b[o] = status;
        b[o + 4] = kind;
        b[o + 8..o + 12].copy_from_slice(&start.to_le_bytes());
        b[o + 12..o + 16].copy_from_slice(&sectors.to_le_bytes());
    }
    b[510..512].copy_from_slice(&[0x55, 0xAA]);
    b
}

fn raw_info(
    s: Source,
) -> (
    serde_json::Map<String, serde_json::Value>,
    Vec<&'static str>,
) {
    let img = open(s, Format::Raw, &Limits::default()).unwrap();
    let codes = img.findings().iter().map(|f| f.code).collect();
    (img.info().details.clone(), codes)
}

#[test]
fn gpt_from_sgdisk() {
    let dir = tempfile::tempdir().unwrap();
    let p = gpt_disk(dir.path());
    let (d, codes) = raw_info(Arc::new(std::fs::File::open(&p).unwrap()));
    assert!(codes.is_empty(), "{codes:?}");
    assert_eq!(d["partition-table"], "gpt");
    assert_eq!(d["protective-mbr"], true);
    let parts = d["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["name"], "esp");
    assert_eq!(
        parts[0]["type-guid"],
        "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
    );
    assert_eq!(parts[0]["first-lba"], 2048);
    assert_eq!(parts[0]["last-lba"], 4095);
    assert_eq!(parts[1]["name"], "data");
    assert_eq!(
        parts[1]["type-guid"],
        "0fc63daf-8483-4772-8e79-3d69d8477de4"
    );
    assert_eq!(parts[1]["start"], 4096 * 512);
}

#[test]
fn mbr_written_by_hand() {
    let b = mbr(&[(0x80, 0x83, 2048, 4096), (0, 0x0c, 6144, 2048)], 4 * MIB);
    let (d, codes) = raw_info(Arc::new(b));
    assert!(codes.is_empty(), "{codes:?}");
    assert_eq!(d["partition-table"], "mbr");
    let parts = d["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["bootable"], true);
    assert_eq!(parts[0]["type"], "0x83");
    assert_eq!(parts[0]["start"], MIB);
    assert_eq!(parts[0]["length"], 2 * MIB);
    assert_eq!(parts[1]["bootable"], false);
    assert_eq!(parts[1]["type"], "0x0c");
}

#[test]
fn fat_boot_sector_from_mkfs_vfat() {
    let dir = tempfile::tempdir().unwrap();
    // FAT16 and FAT32 need enough clusters: 512-byte clusters on 4 MiB and 33 MiB.
    for (fat, kind, kib, extra) in [
        ("12", "fat12", "1440", &[][..]),
        ("16", "fat16", "4096", &["-s", "1"][..]),
        ("32", "fat32", "34000", &["-s", "1"][..]),
    ] {
        let p = dir.path().join(format!("fat{fat}.raw"));
        run(Command::new("mkfs.vfat")
            .args(["-C", "-F", fat])
            .args(extra)
            .arg(&p)
            .arg(kib));
        let (d, codes) = raw_info(Arc::new(std::fs::File::open(&p).unwrap()));
        // A 1.44 MB floppy's media byte is 0xF0, not the fixed disk's 0xF8: Glance's FAT test
        // then fails, it reads the boot code as an MBR and refuses the upload (measured with
        // Glance 33), so glimpse warns, and the image-service gate rejects.
        let floppy = fat == "12";
        if floppy {
            assert_eq!(codes, ["raw.mbr-invalid"]);
        } else {
            assert!(codes.is_empty(), "{codes:?}");
        }
        assert_eq!(d["boot-sector"], kind);
        assert_eq!(d["bytes-per-sector"], 512);
        // A volume boot record also ends in 0x55AA but is not a partition table.
        assert_eq!(d["partition-table"], "none");
        // And a raw FAT image is raw, never an ambiguous container (report red2 F2's fix
        // reads more 0x55AA sectors as tables, but only a container's table is ambiguous).
        let s: Source = Arc::new(std::fs::File::open(&p).unwrap());
        let det = detect(s.as_ref()).unwrap();
        assert_eq!(det.matches, [], "fat{fat}");
        assert!(!det.is_ambiguous(), "fat{fat}");
        let r = inspect(s.clone(), &Policy::default(), &Limits::default()).unwrap();
        let want = if floppy {
            Verdict::Reject
        } else {
            Verdict::Pass
        };
        assert_eq!(r.verdict(), want, "fat{fat}: {:?}", r.findings);
        let reader = Policy {
            image_service: false,
            ..Policy::default()
        };
        let r = inspect(s, &reader, &Limits::default()).unwrap();
        assert_eq!(r.verdict(), Verdict::Pass, "fat{fat}: {:?}", r.findings);
    }
}

#[test]
fn finding_raw_mbr_no_partitions() {
    let (d, codes) = raw_info(Arc::new(mbr(&[], MIB)));
    assert_eq!(d["partition-table"], "mbr");
    // Glance's inspector refuses it too ("GPT MBR has no partitions defined").
    assert_eq!(codes, ["raw.mbr-no-partitions", "raw.mbr-invalid"]);
}

#[test]
fn finding_raw_gpt_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let p = gpt_disk(dir.path());
    let good = std::fs::read(&p).unwrap();
    // A changed disk GUID byte breaks the header CRC32.
    let mut b = good.clone();
    b[512 + 56] ^= 0xFF;
    let (_, codes) = raw_info(Arc::new(b));
    assert_eq!(codes, ["raw.gpt-checksum"]);
    // A changed partition name breaks the entry array CRC32.
    let mut b = good;
    b[1024 + 56] ^= 0x01;
    let (d, codes) = raw_info(Arc::new(b));
    assert_eq!(codes, ["raw.gpt-checksum"]);
    assert_eq!(d["partition-table"], "gpt");
}

#[test]
fn finding_raw_partition_out_of_bounds() {
    // MBR: a partition that ends 1 MiB past a 2 MiB disk.
    let (_, codes) = raw_info(Arc::new(mbr(&[(0, 0x83, 2048, 4096)], 2 * MIB)));
    assert_eq!(codes, ["raw.partition-out-of-bounds"]);
    // GPT: the disk was cut after partitioning, so partition 2 ends past it.
    let dir = tempfile::tempdir().unwrap();
    let p = gpt_disk(dir.path());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(3 * MIB)
        .unwrap();
    let (_, codes) = raw_info(Arc::new(std::fs::File::open(&p).unwrap()));
    assert_eq!(codes, ["raw.partition-out-of-bounds"]);
}

/// Every prefix of the head describes without panicking; short prefixes drop the table.
#[test]
fn truncated_heads_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let gpt = std::fs::read(gpt_disk(dir.path())).unwrap();
    let fat = {
        let p = dir.path().join("f.raw");
        run(Command::new("mkfs.vfat").arg("-C").arg(&p).arg("1440"));
        std::fs::read(p).unwrap()
    };
    let m = mbr(&[(0x80, 0x83, 2048, 4096)], 4 * MIB);
    for disk in [&gpt, &fat, &m] {
        for len in (0..HEAD_LEN.min(disk.len()))
            .step_by(5)
            .chain([511, 512, 1023, 1024, 17_407, 17_408])
        {
            let (d, _) = describe(&disk[..len], len as u64);
            if len < 512 {
                assert_eq!(d["partition-table"], "none");
            }
        }
    }
}

/// The committed hostile files (fixtures/hostile/raw/README.md) give their warnings, the
/// codes their `expected-codes` lines list, when opened as raw as well as through `check`.
#[test]
fn hostile_fixtures() {
    for (fx, _) in glimpse_testkit::hostile::check_dir("raw") {
        let (_, mut codes) = raw_info(Arc::new(std::fs::File::open(&fx.path).unwrap()));
        // `check` orders by severity, and the gate rejects `raw.mbr-invalid`: compare the sets
        let mut want = fx.codes.clone();
        codes.sort_unstable();
        want.sort_unstable();
        assert_eq!(codes, want, "{}", fx.name);
    }
}
