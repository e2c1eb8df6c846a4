//! Report wild-diff F0: qemu's VMDK driver, once the format is declared vmdk, reads any file
//! whose first 4 bytes are not a sparse magic as a descriptor (the text up to the first NUL in
//! the first MiB), and opens the host files its extents name. Every format that leaves bytes
//! free at offset 0 (a raw disk, an ISO's system area, a fixed VHD's guest data, a VHDX's
//! `creator` field, a VDI's text pre-header, an OVA's first member name) can carry such text
//! and stay a valid image of its own format. The policy rejects it for every format but VMDK;
//! the formats that cannot carry it are shown to have a NUL within their first bytes, all magic.
//!
//! Images are made by qemu-img (and genisoimage, the tar crate); every mutated file is also
//! opened by `qemu-img info -f vmdk`, which must name the planted extent: the threat is real.
//! qemu-img must be installed: this test fails without it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{detect, Format, Limits};

/// What qemu needs to open the file fully: `CID` and `parentCID` (it looks for them in the
/// first 10 KiB only, after it has opened the extents: without them it opens the host file and
/// then fails). glimpse rejects the text without them too.
const CIDS: &[u8] = b"CID=1\nparentCID=1\n";
/// Descriptor text naming the file `e` next to the image.
const REST: &[u8] = b"createType=\"vmfs\"\nRW 1 VMFS \"e\"\n";
/// Both: 50 bytes, it fits a VDI's 64-byte pre-header.
const TEXT: &[u8] = b"CID=1\nparentCID=1\ncreateType=\"vmfs\"\nRW 1 VMFS \"e\"\n";
/// The same on one line (a tar member name): the extent is read from the line start, the rest
/// of the line is ignored by `sscanf`, the keys are found by `strstr` anywhere.
const ONE_LINE: &[u8] = b"RW 1 VMFS \"e\" CID=1 parentCID=1 createType=\"vmfs\" vm.ovf";
/// No descriptor qemu reads is shorter: `createType="` (12 bytes), a 4-letter type and its
/// quote, then an `RW <n> <type> "<f>"` extent.
const SHORTEST: usize = 20;
/// qemu reads at most this much text (`vmdk_read_desc`).
const QEMU_TEXT: usize = (1 << 20) - 1;

fn qemu_create(dir: &Path, fmt: &str, opts: &[&str]) -> Vec<u8> {
    let path = dir.join(format!("made.{fmt}"));
    let mut args = vec!["create", "-q", "-f", fmt];
    args.extend(opts);
    let p = path.to_str().unwrap().to_string();
    args.push(&p);
    args.push("8M");
    glimpse_testkit::qemu::img(&args);
    std::fs::read(&path).unwrap()
}

fn iso(dir: &Path) -> Vec<u8> {
    let content = dir.join("isodir");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), b"hello\n").unwrap();
    let out = dir.join("made.iso");
    let st = Command::new("genisoimage")
        .args(["-quiet", "-r", "-J", "-o"])
        .arg(&out)
        .arg(&content)
        .status()
        .expect("genisoimage must be installed");
    assert!(st.success());
    std::fs::read(out).unwrap()
}

/// A ustar header with `name` stored verbatim.
fn header(name: &[u8], size: usize) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    h
}

/// An appliance of one raw disk whose descriptor member is called `ovf_name`.
fn ova(ovf_name: &[u8]) -> Vec<u8> {
    let disk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 | 1).collect();
    let xml = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
  <References><File ovf:id="file0" ovf:href="disk.img" ovf:size="{n}"/></References>
  <DiskSection><Info>Virtual disks</Info><Disk ovf:diskId="vmdisk0" ovf:fileRef="file0" ovf:capacity="{n}" ovf:capacityAllocationUnits="byte"/></DiskSection>
  <VirtualSystem ovf:id="vm1"><Info>A VM</Info></VirtualSystem>
</Envelope>
"#,
        n = disk.len()
    );
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header(ovf_name, xml.len()), xml.as_bytes())
        .unwrap();
    b.append(&header(b"disk.img", disk.len()), disk.as_slice())
        .unwrap();
    b.into_inner().unwrap()
}

/// One format's clean image and the byte ranges at offset 0 it leaves free: `text` may be
/// written anywhere in `at..end` with the bytes before it made non-NUL (spaces), and the file
/// stays that format.
struct Free {
    what: &'static str,
    format: Format,
    bytes: Vec<u8>,
    at: usize,
    end: usize,
    text: &'static [u8],
}

fn free_ranges(dir: &Path) -> Vec<Free> {
    let raw = qemu_create(dir, "raw", &[]);
    let fixed = qemu_create(dir, "vpc", &["-o", "subformat=fixed"]);
    let fixed_end = fixed.len() - 512;
    let vdi = qemu_create(dir, "vdi", &[]);
    let vhdx = qemu_create(dir, "vhdx", &[]);
    let iso = iso(dir);
    let mut mbr = raw.clone();
    mbr[446 + 4] = 0x83;
    mbr[446 + 8] = 1;
    mbr[446 + 12] = 100;
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    vec![
        Free {
            what: "raw disk",
            format: Format::Raw,
            end: raw.len(),
            bytes: raw,
            at: 0,
            text: REST,
        },
        Free {
            what: "MBR boot code",
            format: Format::Raw,
            bytes: mbr,
            at: 0,
            end: 446,
            text: REST,
        },
        Free {
            what: "ISO system area",
            format: Format::Iso,
            bytes: iso,
            at: 0,
            end: 32768,
            text: REST,
        },
        Free {
            what: "fixed VHD guest data",
            format: Format::Vhd,
            bytes: fixed,
            at: 0,
            end: fixed_end,
            text: REST,
        },
        // `vhdxfile`, then the UTF-16 creator: any bytes, no NUL required.
        Free {
            what: "VHDX creator",
            format: Format::Vhdx,
            bytes: vhdx,
            at: 8,
            end: 8 + 512,
            text: REST,
        },
        Free {
            what: "VDI pre-header text",
            format: Format::Vdi,
            bytes: vdi,
            at: 0,
            end: 64,
            text: REST,
        },
        // The first member's name: 100 bytes, NUL-padded; the test rebuilds the archive.
        Free {
            what: "OVA descriptor name",
            format: Format::Ova,
            bytes: Vec::new(),
            at: 0,
            end: 100,
            text: ONE_LINE,
        },
    ]
}

/// `qemu-img info -f vmdk` opens `path` and names the planted extent `e` beside it.
fn qemu_names_the_extent(path: &Path, what: &str) {
    let v = glimpse_testkit::qemu::info(path, Some("vmdk"));
    let extents = v["format-specific"]["data"]["extents"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: no extents in {v}"));
    let named = extents
        .iter()
        .filter_map(|e| e["filename"].as_str())
        .collect::<Vec<_>>();
    let want = path.parent().unwrap().join("e");
    assert!(
        named.iter().any(|n| Path::new(n) == want),
        "{what}: qemu names {named:?}"
    );
}

#[test]
fn descriptor_text_in_the_free_bytes_at_offset_0_of_every_format_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("e"), vec![0u8; 4096]).unwrap();
    let mut tried = 0;
    for free in free_ranges(tmp.path()) {
        let last = free.end.min(QEMU_TEXT) - free.text.len();
        let first = if free.format == Format::Ova {
            free.at
        } else {
            free.at + CIDS.len()
        };
        for start in [first, last] {
            let bytes = if free.format == Format::Ova {
                let mut name = vec![b' '; start];
                name.extend_from_slice(free.text);
                if name.len() > 100 {
                    continue;
                }
                ova(&name)
            } else {
                let mut b = free.bytes.clone();
                b[free.at..free.at + CIDS.len()].copy_from_slice(CIDS);
                b[..start]
                    .iter_mut()
                    .filter(|c| **c == 0)
                    .for_each(|c| *c = b' ');
                b[start..start + free.text.len()].copy_from_slice(free.text);
                b
            };
            let what = format!("{} at {start}", free.what);
            assert!(!bytes[..start].contains(&0), "{what}");
            // The bytes were free: the file is still the same format.
            let det = detect(&bytes).unwrap();
            assert_eq!(det.format(), free.format, "{what}: {:?}", det.matches);
            assert!(!det.is_ambiguous(), "{what}: {:?}", det.names());
            let path = tmp.path().join(format!("t{tried}"));
            std::fs::write(&path, &bytes).unwrap();
            qemu_names_the_extent(&path, &what);
            let r = inspect(Arc::new(bytes), &Policy::default(), &Limits::default()).unwrap();
            assert_eq!(r.verdict(), Verdict::Reject, "{what}: {:?}", r.findings);
            let code = if free.format == Format::Raw {
                "raw.vmdk-descriptor-text"
            } else {
                "image.vmdk-descriptor-text"
            };
            assert!(
                r.findings.iter().any(|f| f.code == code),
                "{what}: {:?}",
                r.findings
            );
            tried += 1;
        }
    }
    assert_eq!(tried, 14);
}

/// The other formats qemu-img writes cannot carry the text at offset 0: their first NUL comes
/// before [`SHORTEST`], and every byte before it is magic (changing it changes the detected
/// format). VMDK itself is left to its own reader (`vmdk.external-extent`).
#[test]
fn formats_with_a_nul_among_their_first_magic_bytes_cannot_carry_it() {
    let tmp = tempfile::tempdir().unwrap();
    let luks = [
        "--object",
        "secret,id=s0,data=pw",
        "-o",
        "key-secret=s0,iter-time=10",
    ];
    for (fmt, opts, want) in [
        ("qcow2", &[][..], Format::Qcow2),
        ("qcow", &[], Format::Qcow1),
        ("qed", &[], Format::Qed),
        ("vpc", &[], Format::Vhd),
        ("parallels", &[], Format::Parallels),
        ("luks", &luks[..], Format::Luks),
    ] {
        let bytes = qemu_create(tmp.path(), fmt, opts);
        assert_eq!(detect(&bytes).unwrap().format(), want, "{fmt}");
        let nul = bytes.iter().position(|&b| b == 0).unwrap();
        assert!(nul < SHORTEST, "{fmt}: first NUL at {nul}");
        for i in 0..nul {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            let other = detect(&b).unwrap().format() != want;
            // A dynamic VHD is still found by its footer; its header copy must match it.
            let r = inspect(Arc::new(b), &Policy::default(), &Limits::default()).unwrap();
            assert!(
                other || r.verdict() == Verdict::Reject,
                "{fmt}: byte {i} is free"
            );
        }
        // And the text written over them is refused, whatever the file then is.
        let mut b = bytes.clone();
        b[..TEXT.len()].copy_from_slice(TEXT);
        let r = inspect(Arc::new(b), &Policy::default(), &Limits::default()).unwrap();
        assert!(
            r.findings
                .iter()
                .any(|f| f.code.ends_with(".vmdk-descriptor-text")),
            "{fmt}: {:?}",
            r.findings
        );
    }
}

/// The policy's test runs on the file and, in an OVA, on each disk: a raw disk member whose
/// boot code is the text is rejected with the raw code.
#[test]
fn a_raw_disk_in_an_appliance_is_tested_too() {
    let clean = ova(b"vm.ovf");
    let r = inspect(
        Arc::new(clean.clone()),
        &Policy::default(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(r.verdict(), Verdict::Pass, "{:?}", r.findings);
    let at = clean.windows(9).position(|w| w == b"disk.img\0").unwrap() + 512;
    let mut b = clean;
    b[at..at + TEXT.len()].copy_from_slice(TEXT);
    let r = inspect(Arc::new(b), &Policy::default(), &Limits::default()).unwrap();
    assert_eq!(r.verdict(), Verdict::Reject);
    assert!(
        r.findings
            .iter()
            .any(|f| f.code == "raw.vmdk-descriptor-text"),
        "{:?}",
        r.findings
    );
}
