//! The image-service gate against the real component it stands in front of: for one file per
//! class that OpenStack Glance refuses although qemu reads it (a qcow2 with extended L2
//! entries; a raw disk whose MBR fails the rules of Glance's format inspector; a fixed VHD,
//! which that inspector does not detect), and for the
//! files on the accepted side of each rule, `glimpse check` must reject exactly what a real
//! Glance 33 (`scripts/glance-testenv.sh`) refuses on upload, and the `oslo.utils` format
//! inspector of that Glance's venv must agree. Hybrid ISOs (xorriso) pin Glance's `iso`+`gpt`
//! special case. The readers (`convert`, `map`, `compare`, `checksum --content`) must still
//! take every such file without `--force`, and `convert`'s output must be what `qemu-img
//! compare` calls identical.
//!
//! Nothing skips: the Glance environment is installed and started by the project's helper
//! (and the test fails when it cannot be), qemu-img and xorriso must be installed.

mod upload_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use glimpse_testkit::qemu::img as qemu_img;
use serde_json::Value;
use upload_support::{glance, glimpse, text, unique, upload};

const BIN: &str = "glance_parity";
const MIB: usize = 1 << 20;

/// One file and how it is declared to Glance.
struct Case {
    name: &'static str,
    path: PathBuf,
    /// Glance's `disk_format` (and `check --expect-format`).
    disk_format: &'static str,
    /// What Glance 33.0.0 does with it (measured; the test checks it still does).
    glance_refuses: bool,
    /// The rejecting finding `check` must give when it rejects.
    code: &'static str,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .join("target")
        },
        PathBuf::from,
    )
}

/// An MBR entry: slot, boot indicator, start CHS, type, start LBA, sectors.
type Entry = (usize, u8, [u8; 3], u8, u32, u32);

/// A 4 MiB raw disk whose sector 0 holds `entries` and ends in 0x55AA.
fn mbr_disk(dir: &Path, name: &str, entries: &[Entry]) -> PathBuf {
    let mut b = vec![0u8; 4 * MIB];
    for &(k, status, chs, kind, lba, sectors) in entries {
        let e = 446 + 16 * k;
        b[e] = status;
        b[e + 1..e + 4].copy_from_slice(&chs);
        b[e + 4] = kind;
        b[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
        b[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    }
    b[510] = 0x55;
    b[511] = 0xAA;
    // some guest data past the table, so that a conversion has something to compare
    b[MIB..MIB + 4096].fill(0x5A);
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn qcow2(dir: &Path, name: &str, opts: &str) -> PathBuf {
    qemu_made(dir, name, "qcow2", opts)
}

/// A 4 MiB image that qemu-img converts to `fmt` with `opts`, with 1 MiB of data.
fn qemu_made(dir: &Path, name: &str, fmt: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    let src = dir.join(format!("{name}.src"));
    let mut data = vec![0u8; 4 * MIB];
    data[MIB..2 * MIB].fill(0xA5);
    std::fs::write(&src, data).unwrap();
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        fmt,
        "-o",
        opts,
        src.to_str().unwrap(),
        p.to_str().unwrap(),
    ]);
    std::fs::remove_file(src).unwrap();
    p
}

/// A hybrid ISO (an EFI partition appended: MBR, or GPT with `gpt`).
fn hybrid_iso(dir: &Path, name: &str, gpt: bool) -> PathBuf {
    let tree = dir.join("isotree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("hello.txt"), b"hello\n").unwrap();
    let efi = dir.join("efi.img");
    std::fs::write(&efi, vec![0u8; MIB]).unwrap();
    let p = dir.join(name);
    let mut c = Command::new("xorriso");
    c.args(["-as", "mkisofs", "-quiet", "-o"])
        .arg(&p)
        .args(["-V", "HYB", "-append_partition", "2", "0xef"])
        .arg(&efi);
    if gpt {
        c.arg("-appended_part_as_gpt");
    }
    let out = c
        .arg(&tree)
        .output()
        .expect("xorriso is required for this test (apt-get install xorriso)");
    assert!(out.status.success(), "xorriso: {}", text(&out).1);
    p
}

fn cases(dir: &Path) -> Vec<Case> {
    let c = |name, path, disk_format, glance_refuses, code| Case {
        name,
        path,
        disk_format,
        glance_refuses,
        code,
    };
    let pmbr = (0, 0x00, [0, 2, 0], 0xEE, 1, 8191);
    let linux = |k, status| (k, status, [0; 3], 0x83, 2048, 2048);
    let mut bit4 = std::fs::read(qcow2(dir, "bit4.qcow2", "cluster_size=65536")).unwrap();
    bit4[79] |= 1 << 4;
    let bit4_path = dir.join("bit4.qcow2");
    std::fs::write(&bit4_path, bit4).unwrap();
    // Glance's FAT test (two FATs, media 0xF8) hides the sector; another media byte does not
    let fat_bytes = |name: &str, media: u8| {
        let p = mbr_disk(dir, name, &[(0, 0x29, [0; 3], 0, 0, 0)]);
        let mut b = std::fs::read(&p).unwrap();
        b[0x10] = 2;
        b[0x15] = media;
        std::fs::write(&p, b).unwrap();
        p
    };
    let nosig = mbr_disk(dir, "nosig.raw", &[(0, 0x01, [0; 3], 0x83, 2048, 2048)]);
    let mut b = std::fs::read(&nosig).unwrap();
    b[510..512].fill(0);
    std::fs::write(&nosig, b).unwrap();
    let mkfs = |name: &str, fat: &str, kib: &str, extra: &[&str]| {
        let p = dir.join(name);
        let out = Command::new("mkfs.vfat")
            .args(["-C", "-F", fat])
            .args(extra)
            .arg(&p)
            .arg(kib)
            .output()
            .expect("mkfs.vfat is required for this test (apt-get install dosfstools)");
        assert!(out.status.success(), "mkfs.vfat: {}", text(&out).1);
        p
    };
    let x = "qcow2.extended-l2";
    let m = "raw.mbr-invalid";
    let v = "vhd.fixed-undetected";
    vec![
        c(
            "VHD dynamic",
            qemu_made(dir, "dynamic.vhd", "vpc", "subformat=dynamic"),
            "vhd",
            false,
            v,
        ),
        // its only footer is in the last sector, where Glance's inspector does not look
        c(
            "VHD fixed",
            qemu_made(dir, "fixed.vhd", "vpc", "subformat=fixed"),
            "vhd",
            true,
            v,
        ),
        c(
            "qcow2 v3",
            qcow2(dir, "v3.qcow2", "compat=1.1"),
            "qcow2",
            false,
            x,
        ),
        c(
            "qcow2 v2",
            qcow2(dir, "v2.qcow2", "compat=0.10"),
            "qcow2",
            false,
            x,
        ),
        c(
            "qcow2 extended_l2=on",
            qcow2(dir, "extl2.qcow2", "extended_l2=on,cluster_size=65536"),
            "qcow2",
            true,
            x,
        ),
        c("qcow2 with bit 4 set by hand", bit4_path, "qcow2", true, x),
        c(
            "raw, no signature (boot indicator 0x01)",
            nosig,
            "raw",
            false,
            m,
        ),
        c(
            "raw MBR, active partition",
            mbr_disk(dir, "active.raw", &[linux(0, 0x80)]),
            "raw",
            false,
            m,
        ),
        c(
            "raw MBR, entry in slot 4 only",
            mbr_disk(dir, "slot4.raw", &[linux(3, 0)]),
            "raw",
            false,
            m,
        ),
        c(
            "raw protective MBR",
            mbr_disk(dir, "pmbr.raw", &[pmbr]),
            "raw",
            false,
            m,
        ),
        c(
            "raw FAT bytes, media 0xF8",
            fat_bytes("fat-f8.raw", 0xF8),
            "raw",
            false,
            m,
        ),
        c(
            "raw FAT bytes, media 0xF0",
            fat_bytes("fat-f0.raw", 0xF0),
            "raw",
            true,
            m,
        ),
        // a real floppy image: media byte 0xF0, so Glance reads its boot code as an MBR
        c(
            "FAT12 floppy (mkfs.vfat)",
            mkfs("fat12.raw", "12", "1440", &[]),
            "raw",
            true,
            m,
        ),
        c(
            "FAT16 disk (mkfs.vfat)",
            mkfs("fat16.raw", "16", "4096", &["-s", "1"]),
            "raw",
            false,
            m,
        ),
        c(
            "raw MBR, boot indicator 0x01",
            mbr_disk(dir, "boot01.raw", &[linux(0, 0x01)]),
            "raw",
            true,
            m,
        ),
        c(
            "raw MBR, boot indicator 0x7f",
            mbr_disk(dir, "boot7f.raw", &[linux(0, 0x7f)]),
            "raw",
            true,
            m,
        ),
        c(
            "raw MBR, boot indicator 0x81 in an empty slot",
            mbr_disk(
                dir,
                "boot81-empty.raw",
                &[linux(0, 0), (2, 0x81, [0; 3], 0, 0, 0)],
            ),
            "raw",
            true,
            m,
        ),
        c(
            "raw protective MBR, start CHS 0/0/0",
            mbr_disk(dir, "pmbr-chs.raw", &[(0, 0, [0; 3], 0xEE, 1, 8191)]),
            "raw",
            true,
            m,
        ),
        c(
            "raw protective MBR, start LBA 2",
            mbr_disk(dir, "pmbr-lba.raw", &[(0, 0, [0, 2, 0], 0xEE, 2, 8190)]),
            "raw",
            true,
            m,
        ),
        c(
            "raw protective MBR plus a partition",
            mbr_disk(dir, "pmbr-extra.raw", &[pmbr, linux(1, 0)]),
            "raw",
            true,
            m,
        ),
        c(
            "raw protective MBR in slot 2",
            mbr_disk(dir, "pmbr-slot2.raw", &[(1, 0, [0, 2, 0], 0xEE, 1, 8191)]),
            "raw",
            true,
            m,
        ),
        c(
            "raw MBR signature, no entry",
            mbr_disk(dir, "noentry.raw", &[]),
            "raw",
            true,
            m,
        ),
        c(
            "hybrid ISO (MBR) as iso",
            hybrid_iso(dir, "hyb-mbr.iso", false),
            "iso",
            false,
            "",
        ),
        c(
            "hybrid ISO (GPT) as iso",
            hybrid_iso(dir, "hyb-gpt.iso", true),
            "iso",
            false,
            "",
        ),
        c(
            "hybrid ISO (MBR) as raw",
            dir.join("hyb-mbr.iso"),
            "raw",
            true,
            "format.mismatch",
        ),
    ]
}

/// The verdict of the oslo.utils format inspector of the Glance test venv, per file and
/// declared format: `None` when it accepts, the reason when it refuses (its safety check, or a
/// detected format other than the declared one; Glance takes `gpt`, a disk with a partition
/// table, as `raw`).
fn oslo(files: &[(&Path, &str)]) -> Vec<Option<String>> {
    let python = target_dir().join("glance-testenv/venv/bin/python");
    let script = r#"
import json, sys
from oslo_utils.imageutils import format_inspector as fi
args = sys.argv[1:]
for p, declared in zip(args[::2], args[1::2]):
    try:
        i = fi.detect_file_format(p)
        i.safety_check()
        found = str(i)
        if found != declared and not (declared == "raw" and found == "gpt"):
            print(json.dumps("detected " + found + ", declared " + declared))
        else:
            print(json.dumps(None))
    except Exception as e:
        print(json.dumps(type(e).__name__ + ": " + str(e)))
"#;
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(files.iter().flat_map(|(p, f)| [p.as_os_str(), f.as_ref()]))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (the Glance test venv is missing)",
                python.display()
            )
        });
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "oslo inspector: {stderr}");
    let v: Vec<Option<String>> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), files.len(), "{stdout}");
    v
}

/// Creates an image in Glance and PUTs the file's bytes straight to it (no glimpse involved):
/// whether Glance refused the data (415, "Image failed safety checks" or a format error).
fn glance_refuses(url: &str, case: &Case) -> bool {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let body = serde_json::json!({
        "name": unique("parity"),
        "disk_format": case.disk_format,
        "container_format": "bare",
    });
    let mut resp = agent
        .post(format!("{url}/v2/images"))
        .header("X-Auth-Token", "test")
        .content_type("application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(
        resp.status().as_u16(),
        201,
        "{}: creating the image",
        case.name
    );
    let v: Value = serde_json::from_slice(&resp.body_mut().read_to_vec().unwrap()).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    let resp = agent
        .put(format!("{url}/v2/images/{id}/file"))
        .header("X-Auth-Token", "test")
        .content_type("application/octet-stream")
        .send(std::fs::read(&case.path).unwrap())
        .unwrap();
    let status = resp.status().as_u16();
    glance(BIN).delete(&id);
    assert!(
        matches!(status, 204 | 415),
        "{}: Glance answered {status}",
        case.name
    );
    status == 415
}

/// `glimpse check --expect-format F`: the rejecting codes, empty when it passes.
fn check(case: &Case) -> Vec<String> {
    let out = glimpse()
        .args([
            "check",
            "--output",
            "json",
            "--expect-format",
            case.disk_format,
        ])
        .arg(&case.path)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<String> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "reject")
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        out.status.code(),
        Some(if codes.is_empty() { 0 } else { 1 }),
        "{}: {v}",
        case.name
    );
    codes
}

#[test]
fn check_rejects_exactly_what_glance_refuses() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let cases = cases(dir.path());
    let files: Vec<(&Path, &str)> = cases
        .iter()
        .map(|c| (c.path.as_path(), c.disk_format))
        .collect();
    let oslo = oslo(&files);
    for (case, oslo) in cases.iter().zip(oslo) {
        let refused = glance_refuses(&g.url, case);
        assert_eq!(
            refused, case.glance_refuses,
            "{}: Glance 33 no longer does what it did when measured",
            case.name
        );
        // oslo's inspector alone refuses a hybrid ISO (gpt + iso); Glance takes it as iso.
        if case.disk_format != "iso" {
            assert_eq!(
                oslo.is_some(),
                refused,
                "{}: the oslo inspector says {oslo:?}",
                case.name
            );
        }
        let codes = check(case);
        assert_eq!(
            !codes.is_empty(),
            refused,
            "{}: Glance refused={refused}, check rejected with {codes:?} (oslo: {oslo:?})",
            case.name
        );
        if refused {
            assert!(
                codes.iter().any(|c| c == case.code),
                "{}: {codes:?}, want {}",
                case.name,
                case.code
            );
            // and the upload gate refuses it before sending anything
            let name = unique("parity-gate");
            let out = upload(
                &g.url,
                &[
                    "--name",
                    &name,
                    "--disk-format",
                    case.disk_format,
                    case.path.to_str().unwrap(),
                ],
            );
            assert_eq!(
                out.status.code(),
                Some(1),
                "{}: {}",
                case.name,
                text(&out).1
            );
            assert!(g.images_named(&name).is_empty(), "{}", case.name);
        }
    }
}

#[test]
fn readers_take_what_only_an_image_service_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases(dir.path());
    let mut converted = 0;
    for case in cases
        .iter()
        .filter(|c| c.glance_refuses && c.disk_format != "iso" && c.code != "format.mismatch")
    {
        let src = case.path.to_str().unwrap();
        // qemu-img's name for VHD
        let fmt = match case.disk_format {
            "vhd" => "vpc",
            f => f,
        };
        // what the gate rejects, the readers only warn about
        assert!(check(case).iter().any(|c| c == case.code), "{}", case.name);
        for target in ["qcow2", "raw"] {
            let dst = dir.path().join(format!("out-{converted}.{target}"));
            let out = glimpse()
                .args(["convert", "-O", target, src])
                .arg(&dst)
                .output()
                .unwrap();
            let (stdout, stderr) = text(&out);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{} -> {target}: {stdout}\n{stderr}",
                case.name
            );
            let cmp = qemu_img(&[
                "compare",
                "-f",
                fmt,
                "-F",
                target,
                src,
                dst.to_str().unwrap(),
            ]);
            assert!(cmp.contains("identical"), "{}: {cmp}", case.name);
            let out = glimpse()
                .arg("compare")
                .arg(src)
                .arg(&dst)
                .output()
                .unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{}: {}",
                case.name,
                text(&out).1
            );
            converted += 1;
        }
        for args in [&["map"][..], &["checksum", "--content"][..]] {
            let out = glimpse().args(args).arg(src).output().unwrap();
            assert_eq!(
                out.status.code(),
                Some(0),
                "{} {args:?}: {}",
                case.name,
                text(&out).1
            );
        }
        let out = glimpse()
            .args(["measure", "-O", "qcow2", src])
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            case.name,
            text(&out).1
        );
    }
    // every class on the refused side went through: 2 qcow2 files, 10 raw disks and a fixed
    // VHD, twice
    assert_eq!(converted, 2 * 13);
}

/// The way out that `vhd.fixed-undetected` names: `glimpse convert -O vhd` of a fixed VHD is a
/// dynamic VHD (a footer copy at byte 0) with the same guest bytes, which the gate passes and
/// the real Glance stores.
#[test]
fn a_fixed_vhd_converted_to_dynamic_passes_and_glance_takes_it() {
    let g = glance(BIN);
    let dir = tempfile::tempdir().unwrap();
    let fixed = qemu_made(dir.path(), "fixed.vhd", "vpc", "subformat=fixed");
    let dynamic = dir.path().join("dynamic.vhd");
    let out = glimpse()
        .args(["convert", "-O", "vhd"])
        .arg(&fixed)
        .arg(&dynamic)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "vpc",
        fixed.to_str().unwrap(),
        dynamic.to_str().unwrap(),
    ]);
    assert!(cmp.contains("identical"), "{cmp}");
    let case = |name, path| Case {
        name,
        path,
        disk_format: "vhd",
        glance_refuses: false,
        code: "",
    };
    assert!(check(&case("fixed", fixed)).contains(&"vhd.fixed-undetected".to_string()));
    let converted = case("converted", dynamic);
    assert!(check(&converted).is_empty());
    assert!(!glance_refuses(&g.url, &converted));
}
