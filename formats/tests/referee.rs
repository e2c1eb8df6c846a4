//! qemu as the referee of what an image is: whatever `qemu-img info -f FMT` cannot open must
//! not pass `check`, and where both open an image that passes, the virtual sizes agree.
//!
//! Images made by qemu-img get their metadata fields changed one at a time (to 0, 1, all
//! ones, one more and one less, twice and half, the top bit), with the format's own checksums
//! recomputed, so that the change reaches the code behind them. The same campaign, run wider
//! by hand (17,000 changes), found the classes these fields stand for: the end-of-extensions
//! length of qcow2, the bitmap directory, the LUKS header of an encrypted qcow2, the VHDX log
//! fields. Deterministic; fails, never skips, without qemu-img.

mod support;

use std::path::Path;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{Format, Limits};
use glimpse_testkit::qemu::{img as qemu_img, run as qemu_run};
use support::src;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A field: offset, width in bytes, big-endian.
type Field = (usize, usize, bool);

fn get(b: &[u8], (at, n, be): Field) -> u64 {
    let mut v = 0u64;
    for k in 0..n {
        let byte = u64::from(b[if be { at + k } else { at + n - 1 - k }]);
        v = (v << 8) | byte;
    }
    v
}

fn put(b: &mut [u8], (at, n, be): Field, v: u64) {
    for k in 0..n {
        let byte = (v >> (8 * (n - 1 - k))) as u8;
        b[if be { at + k } else { at + n - 1 - k }] = byte;
    }
}

/// The values a field is set to, from its value `v` in the seed.
fn values(v: u64, n: usize) -> Vec<u64> {
    let max = if n >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * n)) - 1
    };
    let mut out = vec![
        0,
        1,
        max,
        v.wrapping_add(1) & max,
        v.wrapping_sub(1) & max,
        v.wrapping_mul(2) & max,
        v / 2,
        (1u64 << (8 * n - 1)) | v,
    ];
    out.sort_unstable();
    out.dedup();
    out.retain(|&x| x != v);
    out
}

/// CRC-32C of a VHDX header or region table (`len` bytes at `at`), its checksum at +4 taken
/// as zero, stored back.
fn vhdx_crc(b: &mut [u8], at: usize, len: usize) {
    b[at + 4..at + 8].fill(0);
    let c = crc32c::crc32c(&b[at..at + len]);
    b[at + 4..at + 8].copy_from_slice(&c.to_le_bytes());
}

/// A seed: qemu's format name, glimpse's, the file, its fields, and what to recompute after a
/// change.
struct Seed {
    qemu: &'static str,
    format: Format,
    bytes: Vec<u8>,
    fields: Vec<Field>,
    fix: fn(&mut [u8]),
}

fn no_fix(_: &mut [u8]) {}

/// Fields at `(offset, width)`, all of one byte order.
fn fields(list: &[(usize, usize)], be: bool) -> Vec<Field> {
    list.iter().map(|&(a, n)| (a, n, be)).collect()
}

/// The VHD checksum (one's complement of the byte sum, its own 4 bytes as zero) of `len`
/// bytes at `at`, with the checksum at `at + sum_at`.
fn vhd_sum(b: &mut [u8], at: usize, len: usize, sum_at: usize) {
    b[at + sum_at..at + sum_at + 4].fill(0);
    let sum = b[at..at + len]
        .iter()
        .fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    b[at + sum_at..at + sum_at + 4].copy_from_slice(&(!sum).to_be_bytes());
}

/// A dynamic VHD's footer copies (at 0 and in the last sector) and its dynamic header.
fn fix_vhd(b: &mut [u8]) {
    let end = b.len() - 512;
    vhd_sum(b, 0, 512, 64);
    vhd_sum(b, end, 512, 64);
    vhd_sum(b, 512, 1024, 36);
}

fn fix_vhdx(b: &mut [u8]) {
    for h in [64 << 10, 128 << 10] {
        vhdx_crc(b, h, 4096);
    }
    for r in [192 << 10, 256 << 10] {
        vhdx_crc(b, r, 64 << 10);
    }
}

/// The qcow2 header fields and, after them, each header extension's type and length and the
/// fields of the bitmaps and encryption extensions.
fn qcow2_fields(b: &[u8]) -> Vec<Field> {
    #[rustfmt::skip]
    let header = [
        (4, 4), (8, 8), (16, 4), (20, 4), (24, 8), (32, 4), (36, 4), (40, 8), (48, 8),
        (56, 4), (60, 4), (64, 8), (72, 8), (80, 8), (88, 8), (96, 4), (100, 4),
    ];
    let mut f = fields(&header, true);
    let mut at = usize::try_from(get(b, (100, 4, true))).unwrap();
    while at + 8 <= b.len() {
        let typ = get(b, (at, 4, true));
        let len = usize::try_from(get(b, (at + 4, 4, true))).unwrap();
        f.extend([(at, 4, true), (at + 4, 4, true)]);
        match typ {
            0 => break,
            0x2385_2875 => f.extend([(at + 8, 4, true), (at + 16, 8, true), (at + 24, 8, true)]),
            0x0537_be77 => f.extend([(at + 8, 8, true), (at + 16, 8, true)]),
            _ => {}
        }
        at += 8 + len.next_multiple_of(8);
    }
    f
}

#[rustfmt::skip]
fn seeds(dir: &Path) -> Vec<Seed> {
    let make = |name: &str, args: &[&str]| {
        let p = dir.join(name);
        let mut a = args.to_vec();
        a.push(s(&p));
        qemu_img(&a);
        std::fs::read(&p).unwrap()
    };
    let qcow2 = |bytes: Vec<u8>| Seed {
        qemu: "qcow2",
        format: Format::Qcow2,
        fields: qcow2_fields(&bytes),
        bytes,
        fix: no_fix,
    };
    // qcow2: v3 with a persistent bitmap, v2 with 4 KiB clusters, and LUKS-encrypted.
    let bm = dir.join("bm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&bm), "16M"]);
    qemu_img(&["bitmap", "--add", s(&bm), "b0"]);
    let mut out = vec![
        qcow2(std::fs::read(&bm).unwrap()),
        qcow2(make("v2.qcow2", &["create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k,size=16M"])),
        qcow2(make("luks.qcow2", &[
            "create", "-q", "--object", "secret,id=s0,data=x", "-f", "qcow2", "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,size=1M",
        ])),
    ];
    // VHDX: both headers' sequence, log and version fields, both region tables' entries.
    let mut vhdx = Vec::new();
    for h in [64usize << 10, 128 << 10] {
        vhdx.extend([(h + 8, 8), (h + 64, 2), (h + 66, 2), (h + 68, 4), (h + 72, 8)]);
    }
    for r in [192usize << 10, 256 << 10] {
        vhdx.extend([(r + 8, 4), (r + 32, 8), (r + 40, 4), (r + 44, 4), (r + 64, 8), (r + 72, 4), (r + 76, 4)]);
    }
    out.push(Seed {
        qemu: "vhdx",
        format: Format::Vhdx,
        bytes: make("d.vhdx", &["create", "-q", "-f", "vhdx", "-o", "size=16M"]),
        fields: fields(&vhdx, false),
        fix: fix_vhdx,
    });
    // VDI: the header after its text.
    out.push(Seed {
        qemu: "vdi",
        format: Format::Vdi,
        bytes: make("d.vdi", &["create", "-q", "-f", "vdi", "-o", "size=16M"]),
        fields: fields(&[
            (0x44, 4), (0x48, 4), (0x4c, 4), (0x50, 4), (0x154, 4), (0x158, 4), (0x168, 4),
            (0x170, 8), (0x178, 4), (0x17c, 4), (0x180, 4), (0x184, 4),
        ], false),
        fix: no_fix,
    });
    // VMDK, monolithicSparse: the sparse header.
    out.push(Seed {
        qemu: "vmdk",
        format: Format::Vmdk,
        bytes: make("d.vmdk", &["create", "-q", "-f", "vmdk", "-o", "size=16M"]),
        fields: fields(&[
            (4, 4), (8, 4), (12, 8), (20, 8), (28, 8), (36, 8), (44, 4), (48, 8), (56, 8),
            (64, 8), (77, 2),
        ], false),
        fix: no_fix,
    });
    // VHD, dynamic: the footer's fields (the copy at 0, then the one at the end: a change to
    // one copy only is a disagreement), and the dynamic header's.
    let vhd = make("d.vhd", &["create", "-q", "-f", "vpc", "-o", "subformat=dynamic,size=16M"]);
    let tail = vhd.len() - 512;
    let mut f = Vec::new();
    for at in [0, tail] {
        f.extend([(at + 8, 4), (at + 12, 4), (at + 16, 8), (at + 40, 8), (at + 48, 8), (at + 56, 2), (at + 58, 1), (at + 59, 1), (at + 60, 4)]);
    }
    f.extend([(512 + 8, 8), (512 + 16, 8), (512 + 24, 4), (512 + 28, 4), (512 + 32, 4)]);
    out.push(Seed {
        qemu: "vpc",
        format: Format::Vhd,
        bytes: vhd,
        fields: fields(&f, true),
        fix: fix_vhd,
    });
    // Parallels: the header after its magic.
    out.push(Seed {
        qemu: "parallels",
        format: Format::Parallels,
        bytes: make("d.hds", &["create", "-q", "-f", "parallels", "-o", "size=16M"]),
        fields: fields(&[
            (16, 4), (20, 4), (24, 4), (28, 4), (32, 4), (36, 8), (44, 4), (48, 4), (52, 4),
            (56, 8),
        ], false),
        fix: no_fix,
    });
    out
}

#[test]
fn what_qemu_cannot_open_does_not_pass() {
    let dir = tempfile::tempdir().unwrap();
    let policy = Policy {
        allow_encrypted: true,
        ..Policy::default()
    };
    let mut failures = Vec::new();
    let mut runs = 0;
    for (k, seed) in seeds(dir.path()).into_iter().enumerate() {
        let policy = Policy {
            expect_format: Some(seed.format),
            ..policy.clone()
        };
        for &field in &seed.fields {
            for v in values(get(&seed.bytes, field), field.1) {
                let mut b = seed.bytes.clone();
                put(&mut b, field, v);
                (seed.fix)(&mut b);
                let p = dir.path().join(format!("m{k}.img"));
                std::fs::write(&p, &b).unwrap();
                runs += 1;
                let q = qemu_run(&["info", "--output=json", "-f", seed.qemu, s(&p)]);
                let report = inspect(src(&p), &policy, &Limits::default()).unwrap();
                let what = format!("{} field {:#x}+{} = {v:#x}", seed.qemu, field.0, field.1);
                if !q.status.success() {
                    if report.verdict() == Verdict::Pass {
                        failures.push(format!(
                            "{what}: qemu cannot open it ({}) but it passes",
                            String::from_utf8_lossy(&q.stderr).trim()
                        ));
                    }
                    continue;
                }
                if report.verdict() == Verdict::Pass {
                    let qemu: serde_json::Value = serde_json::from_slice(&q.stdout).unwrap();
                    let ours = report.info().map(|i| i.virtual_size);
                    if ours != qemu["virtual-size"].as_u64() {
                        failures.push(format!(
                            "{what}: virtual size {ours:?}, qemu {}",
                            qemu["virtual-size"]
                        ));
                    }
                }
            }
        }
    }
    assert!(runs > 300, "{runs} changes");
    assert!(
        failures.is_empty(),
        "{} of {runs}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
