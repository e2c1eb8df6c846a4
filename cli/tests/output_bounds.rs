//! What `info` and `check` print is bounded by the image's text, and one file's verdict does
//! not depend on the others (the resource-envelope review, E1, E2, E5). A table cell of 70,000
//! characters printed with a computed width panicked (exit 101); every row was padded to the
//! widest value, so a 51 KB OVA printed 299 MB and took 374 MB; and `check a b` shared one
//! budget, so a valid file could be rejected because another held the budget.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::qemu::img as qemu_img;
use support::{glimpse, json_of, s};

/// A VMDK text descriptor (as `gen_vmdk_longdesc.py` writes it) whose `createType` is
/// `create_type`; its one FLAT extent names another file.
fn descriptor(path: &Path, create_type: &str) {
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"{create_type}\"\n\n# Extent description\nRW 2048 FLAT \"x-flat.vmdk\" 0\n\n\
         ddb.virtualHWVersion = \"4\"\n"
    );
    std::fs::write(path, text).unwrap();
}

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_70000_character_value_is_printed_shortened_and_kept_whole_in_json() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("ct70k.vmdk");
    let ct = "a".repeat(70_000);
    descriptor(&p, &ct);

    // info: exit 0 in both outputs; the human row shortened to 4096 characters with a note.
    let o = glimpse(&["info", s(&p)]);
    assert_eq!(code(&o), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    let row = text
        .lines()
        .find(|l| l.starts_with("| create-type "))
        .unwrap_or_else(|| panic!("no create-type row"));
    assert!(
        row.contains(&format!(
            "{} ... (65904 more characters) |",
            "a".repeat(100)
        )),
        "{}",
        &row[row.len() - 80..]
    );
    assert!(
        text.lines().all(|l| l.len() < 4096 + 200),
        "a line too long"
    );
    // The border is as wide as the widest short value, not the long one.
    assert!(text.lines().next().unwrap().len() < 200, "{text}");
    let o = glimpse(&["info", "--output", "json", s(&p)]);
    assert_eq!(code(&o), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json_of(&o);
    assert_eq!(
        v["format-specific"]["data"]["create-type"],
        Value::from(ct.clone())
    );

    // check: rejected (a descriptor only), exit 1 in both outputs, not 101.
    let o = glimpse(&["check", s(&p)]);
    assert_eq!(code(&o), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    assert!(text.contains("| verdict "), "{text}");
    assert!(
        text.lines().all(|l| l.len() < 4096 + 200),
        "a line too long"
    );
    let o = glimpse(&["check", "--output", "json", s(&p)]);
    assert_eq!(code(&o), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json_of(&o);
    assert_eq!(v["verdict"], "reject");
    assert!(
        v["findings"].as_array().unwrap().iter().any(
            |f| f["code"] == "vmdk.create-type" && f["message"].as_str().unwrap().contains(&ct)
        ),
        "the finding quotes the whole createType"
    );

    // With another file on the command line: both printed, in order, exit 1.
    let ok = t.path().join("ok.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&ok), "1G"]);
    let o = glimpse(&["check", "--output", "json", s(&p), s(&ok)]);
    assert_eq!(code(&o), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json_of(&o);
    assert_eq!(v[0]["verdict"], "reject");
    assert_eq!(v[1]["verdict"], "pass");
    let o = glimpse(&["check", s(&ok), s(&p)]);
    assert_eq!(code(&o), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    let verdicts: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| verdict "))
        .collect();
    assert_eq!(verdicts.len(), 2, "{text}");
    assert!(verdicts[0].contains("PASS") && verdicts[1].contains("REJECT"));
}

/// Values of at most 80 characters: every row padded to the widest, as before.
/// The long-fuzz campaign's CLI replay (notes/fuzz10): a descriptor of 5,000 short extent
/// lines made the `extents` detail one value of over 65,535 characters, and info and check
/// panicked like the 70,000-character createType. Now they print, as any other image.
#[test]
fn a_descriptor_of_5000_extents_prints_in_both_outputs() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("many.vmdk");
    let mut text = String::from(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n",
    );
    for _ in 0..5000 {
        text.push_str("RW 8 FLAT \"x.vmdk\" 0\n");
    }
    std::fs::write(&p, text).unwrap();
    for (cmd, want) in [("info", 0), ("check", 1)] {
        for output in ["human", "json"] {
            let o = glimpse(&[cmd, "--output", output, s(&p)]);
            assert_eq!(
                code(&o),
                Some(want),
                "{cmd} {output}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                stdout(&o).lines().all(|l| l.len() < 4096 + 200),
                "{cmd} {output}: a line too long"
            );
        }
    }
}

#[test]
fn short_values_keep_the_table_format() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("d.vmdk");
    descriptor(&p, "monolithicFlat");
    assert!(
        s(&p).len() < 67,
        "a temporary path longer than the widest value"
    );
    let o = glimpse(&["info", s(&p)]);
    assert_eq!(code(&o), Some(0));
    let text = stdout(&o);
    let lines: Vec<&str> = text.lines().collect();
    // The widest key is "reference: extent", the widest value the extents detail.
    let extents = r#"[{"filename":"x-flat.vmdk","format":"FLAT","virtual-size":1048576}]"#;
    let sep = format!("+-{}-+-{}-+", "-".repeat(17), "-".repeat(extents.len()));
    assert_eq!(lines[0], sep, "{text}");
    assert_eq!(
        lines[1],
        format!(
            "| Field             | Value{} |",
            " ".repeat(extents.len() - 5)
        )
    );
    assert_eq!(lines[2], sep);
    assert!(lines.contains(&format!("| extents           | {extents} |").as_str()));
    assert!(lines.contains(
        &format!(
            "| format            | vmdk{} |",
            " ".repeat(extents.len() - 4)
        )
        .as_str()
    ));
    assert_eq!(lines.last(), Some(&sep.as_str()));
    assert!(lines.iter().all(|l| l.len() == sep.len()), "{text}");
}

/// A streamOptimized VMDK of one grain table (as the work-amp review's
/// `gen_vmdk_marker_reads.py 1` writes it) whose 512 entries all name one compressed grain:
/// every disk of an OVA that names it has a page of findings.
fn marker_vmdk() -> Vec<u8> {
    const S: usize = 512;
    let cap: u64 = 512 * 128;
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\n# Extent description\nRW {cap} SPARSE \"x.vmdk\"\n"
    );
    let (gd_sec, gt_sec, marker_sec) = (3u64, 4u64, 8u64);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&[0xaa; 128 * S]).unwrap();
    let data = z.finish().unwrap();
    let mut h = Vec::new();
    h.extend_from_slice(&0x564d_444bu32.to_le_bytes());
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(1u32 | (1 << 16) | (1 << 17)).to_le_bytes());
    h.extend_from_slice(&cap.to_le_bytes());
    h.extend_from_slice(&128u64.to_le_bytes()); // grain: 128 sectors
    h.extend_from_slice(&1u64.to_le_bytes()); // descriptor at sector 1
    h.extend_from_slice(&2u64.to_le_bytes()); // of 2 sectors
    h.extend_from_slice(&512u32.to_le_bytes()); // entries per grain table
    h.extend_from_slice(&0u64.to_le_bytes()); // no redundant directory
    h.extend_from_slice(&gd_sec.to_le_bytes());
    h.extend_from_slice(&gt_sec.to_le_bytes()); // overhead
    h.push(0);
    h.extend_from_slice(b"\n \r\n");
    h.extend_from_slice(&1u16.to_le_bytes()); // deflate
    let end = (marker_sec as usize * S + 12 + data.len()).div_ceil(S) * S;
    let mut f = vec![0u8; end];
    f[..h.len()].copy_from_slice(&h);
    f[S..S + desc.len()].copy_from_slice(desc.as_bytes());
    let gd = gd_sec as usize * S;
    f[gd..gd + 4].copy_from_slice(&(gt_sec as u32).to_le_bytes());
    for i in 0..512 {
        let at = gt_sec as usize * S + 4 * i;
        f[at..at + 4].copy_from_slice(&(marker_sec as u32).to_le_bytes());
    }
    let m = marker_sec as usize * S;
    f[m + 8..m + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
    f[m + 12..m + 12 + data.len()].copy_from_slice(&data);
    f
}

/// An OVA (like `gen_ova_wide.py`'s) of `n` disks whose ids are `len` characters long, each
/// naming its own copy of [`marker_vmdk`]: a member named by many disks is checked, and its
/// findings reported, once, so the rows come from distinct members.
fn wide_ova(dir: &Path, n: usize, len: usize) -> PathBuf {
    let stage = dir.join(format!("wide{n}.d"));
    std::fs::create_dir_all(&stage).unwrap();
    let disk = marker_vmdk();
    let url = "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";
    let disks: String = (0..n)
        .map(|i| {
            format!(
                r#"<Disk ovf:diskId="{:d>len$}" ovf:fileRef="f{i}" ovf:format="{url}"/>"#,
                i
            )
        })
        .collect();
    let files: String = (0..n)
        .map(|i| {
            format!(
                r#"<File ovf:id="f{i}" ovf:href="disk{i}" ovf:size="{}"/>"#,
                disk.len()
            )
        })
        .collect();
    let ovf = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
<References>{files}</References><DiskSection><Info>d</Info>{disks}</DiskSection>
<VirtualSystem ovf:id="vm"><Info>v</Info></VirtualSystem></Envelope>"#
    );
    std::fs::write(stage.join("x.ovf"), ovf).unwrap();
    let mut names = vec!["x.ovf".to_string()];
    for i in 0..n {
        std::fs::write(stage.join(format!("disk{i}")), &disk).unwrap();
        names.push(format!("disk{i}"));
    }
    let out = dir.join(format!("wide{n}.ova"));
    let st = Command::new("tar")
        .args(["--format=ustar", "-cf"])
        .arg(&out)
        .arg("-C")
        .arg(&stage)
        .args(&names)
        .status()
        .expect("GNU tar must be installed");
    assert!(st.success());
    out
}

/// `check` of an OVA of 256 disks with 40-character ids naming one 5 KiB member (51 KB; here
/// each disk has its own copy, since a shared member is checked once now): the human output
/// was 299 MB (every one of its 4,880 rows padded to the 55,000-character
/// `disks` detail) and took 374 MB, with JSON too. Now the human output stays under 2 MiB
/// and grows linearly with the disks (256 disks: at most 2.5 times 128's), and either output
/// peaks under 64 MiB.
#[test]
fn human_output_grows_linearly_with_the_rows() {
    let t = tempfile::tempdir().unwrap();
    let mut sizes = Vec::new();
    for n in [128, 256] {
        let ova = wide_ova(t.path(), n, 40);
        let r = support::rss::within(&["check", s(&ova)], &[1], 64 << 10, true);
        let rows = r.stdout.lines().filter(|l| l.starts_with("| ")).count();
        assert!(rows > 8 * n, "{n} disks: only {rows} rows");
        assert!(r.stdout.contains("| disks "), "no disks row");
        assert!(
            r.stdout.len() < 2 << 20,
            "{n} disks: {} bytes",
            r.stdout.len()
        );
        sizes.push(r.stdout.len());
        let r = support::rss::within(
            &["check", "--output", "json", s(&ova)],
            &[1],
            64 << 10,
            true,
        );
        assert!(
            r.stdout.len() < 8 << 20,
            "JSON of {n} disks: {} bytes",
            r.stdout.len()
        );
    }
    assert!(
        sizes[1] * 2 < sizes[0] * 5,
        "output not linear in the disks: {sizes:?}"
    );
}

/// A dynamic VHD (as the mem-amp review's `gen_vhd.py` writes it) whose BAT has `entries`
/// entries, all unallocated, of `block`-byte blocks: it passes `check`, and holds its BAT
/// (four bytes an entry) in the budget while it is checked.
fn big_bat_vhd(path: &Path, entries: u32, block: u32) {
    fn checksum(b: &[u8], at: usize) -> u32 {
        let sum: u32 = b
            .iter()
            .enumerate()
            .filter(|(i, _)| !(at..at + 4).contains(i))
            .map(|(_, &x)| u32::from(x))
            .fold(0, u32::wrapping_add);
        !sum
    }
    let size = u64::from(entries) * u64::from(block);
    let mut f = vec![0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x10000u32.to_be_bytes());
    f[16..24].copy_from_slice(&512u64.to_be_bytes());
    f[28..32].copy_from_slice(b"qemu");
    f[32..36].copy_from_slice(&0x50000u32.to_be_bytes());
    f[36..40].copy_from_slice(b"Wi2k");
    f[40..48].copy_from_slice(&size.to_be_bytes());
    f[48..56].copy_from_slice(&size.to_be_bytes());
    f[56..60].copy_from_slice(&((65535u32 << 16) | (16 << 8) | 255).to_be_bytes());
    f[60..64].copy_from_slice(&3u32.to_be_bytes());
    for (i, b) in f[68..84].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = checksum(&f, 64);
    f[64..68].copy_from_slice(&c.to_be_bytes());
    let mut h = vec![0u8; 1024];
    h[0..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&1536u64.to_be_bytes());
    h[24..28].copy_from_slice(&0x10000u32.to_be_bytes());
    h[28..32].copy_from_slice(&entries.to_be_bytes());
    h[32..36].copy_from_slice(&block.to_be_bytes());
    let c = checksum(&h, 36);
    h[36..40].copy_from_slice(&c.to_be_bytes());
    let mut o = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    o.write_all(&f).unwrap();
    o.write_all(&h).unwrap();
    let chunk = vec![0xffu8; 1 << 20];
    let mut left = (u64::from(entries) * 4).div_ceil(512) * 512;
    while left > 0 {
        let n = left.min(chunk.len() as u64);
        o.write_all(&chunk[..n as usize]).unwrap();
        left -= n;
    }
    o.write_all(&f).unwrap();
    o.flush().unwrap();
}

fn verdicts(args: &[&str]) -> Vec<String> {
    let o = glimpse(args);
    let v = json_of(&o);
    let items = match v {
        Value::Array(a) => a,
        one => vec![one],
    };
    items
        .iter()
        .map(|i| {
            format!(
                "{} {}",
                i["verdict"].as_str().unwrap_or("error"),
                support::codes(i).join(",")
            )
        })
        .collect()
}

/// `check a b c`: a 32 TiB VDI (`qemu-img create`, a 128 MiB block map) and a VHD whose BAT
/// is 112 MiB each pass alone, but cannot both hold their tables in the command's 224 MiB
/// budget; checked together, in either order and with a third file, each gets the verdict it
/// gets alone (one that a refused charge rejected is checked again alone).
#[test]
fn a_files_verdict_does_not_depend_on_the_others() {
    let t = tempfile::tempdir().unwrap();
    let vdi = t.path().join("32t.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", s(&vdi), "32T"]);
    let vhd = t.path().join("bat112m.vhd");
    big_bat_vhd(&vhd, 28 << 20, 4096);
    let small = t.path().join("small.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&small), "1G"]);
    let (vdi, vhd, small) = (s(&vdi), s(&vhd), s(&small));
    let alone: Vec<String> = [vdi, vhd, small]
        .iter()
        .map(|f| verdicts(&["check", "--output", "json", f]).remove(0))
        .collect();
    for a in &alone {
        assert!(a.starts_with("pass"), "alone: {alone:?}");
    }
    for order in [[vhd, vdi, small], [vdi, vhd, small], [small, vdi, vhd]] {
        let mut args = vec!["check", "--output", "json"];
        args.extend(order);
        let got = verdicts(&args);
        let want: Vec<String> = order
            .iter()
            .map(|f| alone[[vdi, vhd, small].iter().position(|x| x == f).unwrap()].clone())
            .collect();
        assert_eq!(got, want, "{order:?}");
    }
    // The human output says the same, and the exit status is 0.
    let o = glimpse(&["check", vhd, vdi]);
    assert_eq!(code(&o), Some(0), "{}", stdout(&o));
}
