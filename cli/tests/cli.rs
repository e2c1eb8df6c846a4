//! Integration tests of the `glimpse` binary on raw images (the formats with their own
//! parsers have their own test files). Tests that compare with qemu-img fail when it is
//! missing; they never skip.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::qemu::run as qemu_img;
use support::{glimpse, s};

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", stdout(o)))
}

/// A deterministic raw image: data, text and zero runs (holes), `mib` MiB plus `extra` bytes.
fn mixed_raw(dir: &Path, name: &str, mib: u64, extra: u64) -> PathBuf {
    use std::io::{Seek, SeekFrom, Write};
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..mib {
        match i % 4 {
            0 => {
                let buf: Vec<u8> = (0..1 << 20)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                f.seek(SeekFrom::Start(i << 20)).unwrap();
                f.write_all(&buf).unwrap();
            }
            1 => {
                let text = b"glimpse test line of text\n".repeat(1 << 20 >> 4);
                f.seek(SeekFrom::Start(i << 20)).unwrap();
                f.write_all(&text[..1 << 20]).unwrap();
            }
            _ => {}
        }
    }
    f.set_len((mib << 20) + extra).unwrap();
    p
}

#[test]
fn info_json_matches_qemu_img_for_raw() {
    let d = tempfile::tempdir().unwrap();
    let p = mixed_raw(d.path(), "a.raw", 3, 512);
    let ours = json(&glimpse(&["info", "--output", "json", s(&p)]));
    let theirs: Value =
        serde_json::from_slice(&qemu_img(&["info", "--output=json", s(&p)]).stdout).unwrap();
    assert_eq!(ours["format"], theirs["format"]);
    assert_eq!(ours["virtual-size"], theirs["virtual-size"]);
    assert_eq!(ours["filename"], s(&p));
    // Two files give an array.
    let both = json(&glimpse(&["info", "--output", "json", s(&p), s(&p)]));
    assert_eq!(both.as_array().map(Vec::len), Some(2));
}

#[test]
fn raw_size_is_the_exact_file_length_not_rounded_like_qemu() {
    let d = tempfile::tempdir().unwrap();
    let p = mixed_raw(d.path(), "odd.raw", 1, 7);
    let ours = json(&glimpse(&["info", "--output", "json", s(&p)]));
    assert_eq!(ours["virtual-size"], (1u64 << 20) + 7);
    let theirs: Value =
        serde_json::from_slice(&qemu_img(&["info", "--output=json", s(&p)]).stdout).unwrap();
    assert_eq!(
        theirs["virtual-size"],
        (1u64 << 20) + 512,
        "qemu-img rounds raw sizes up to a sector"
    );
}

#[test]
fn errors_are_one_line_naming_the_file_with_exit_2() {
    let o = glimpse(&["info", "/nonexistent/disk.qcow2"]);
    assert_eq!(code(&o), 2);
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/disk.qcow2"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"));
    let o = glimpse(&["check", "/nonexistent/x"]);
    assert_eq!(code(&o), 2);
    let o = glimpse(&["convert", "-O", "nosuchformat", "a", "b"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn check_exit_codes_and_json() {
    let d = tempfile::tempdir().unwrap();
    let p = mixed_raw(d.path(), "a.raw", 2, 0);
    let o = glimpse(&["check", s(&p)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("PASS"));

    let o = glimpse(&[
        "check",
        "--expect-format",
        "qcow2",
        "--output",
        "json",
        s(&p),
    ]);
    assert_eq!(code(&o), 1);
    let v = json(&o);
    assert_eq!(v["verdict"], "reject");
    let codes: Vec<&str> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["code"].as_str())
        .collect();
    assert!(codes.contains(&"format.mismatch"), "{codes:?}");
    assert_eq!(v["findings"][0]["severity"], "reject");

    let o = glimpse(&[
        "check",
        "--max-virtual-size",
        "1M",
        "--output",
        "json",
        s(&p),
    ]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).contains("size.limit"));

    // Several files: one rejected makes exit 1; one missing makes exit 2.
    let o = glimpse(&[
        "check",
        "--expect-format",
        "raw",
        "--output",
        "json",
        s(&p),
        s(&p),
    ]);
    assert_eq!(code(&o), 0);
    assert_eq!(json(&o).as_array().map(Vec::len), Some(2));
    let o = glimpse(&["check", s(&p), "/nonexistent"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn convert_raw_to_raw_file_and_stdout_are_identical() {
    let d = tempfile::tempdir().unwrap();
    let src = mixed_raw(d.path(), "a.raw", 5, 4096 + 3);
    let out = d.path().join("b.raw");
    let o = glimpse(&["convert", "-O", "raw", s(&src), s(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&out).unwrap());
    let q = qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&out)]);
    assert_eq!(code(&q), 0, "{}", stdout(&q));
    // Zero ranges become holes.
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&out).unwrap();
    assert!(m.blocks() * 512 < m.len(), "output is not sparse");

    let piped = glimpse(&["convert", "-O", "raw", s(&src), "-"]);
    assert_eq!(code(&piped), 0);
    assert_eq!(piped.stdout, std::fs::read(&out).unwrap());
}

#[test]
fn convert_json_progress_and_cleanup_on_failure() {
    let d = tempfile::tempdir().unwrap();
    let src = mixed_raw(d.path(), "a.raw", 40, 0);
    let out = d.path().join("b.raw");
    let o = glimpse(&[
        "convert",
        "--progress",
        "json",
        "-O",
        "raw",
        s(&src),
        s(&out),
    ]);
    assert_eq!(code(&o), 0);
    let lines: Vec<Value> = stderr(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2);
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "done");
    assert_eq!(last["total"], 40u64 << 20);
    assert!(lines
        .iter()
        .any(|l| l["event"] == "progress" && l["rate"].as_u64().is_some()));

    // A format that cannot be written: exit 2 and no partial output.
    let bad = d.path().join("c.iso");
    let o = glimpse(&["convert", "-O", "iso", s(&src), s(&bad)]);
    assert_eq!(code(&o), 2);
    assert!(!bad.exists());
    // A rejected source (declared qcow2) writes nothing, and exits 1 like check.
    let o = glimpse(&["convert", "-f", "qcow2", "-O", "raw", s(&src), s(&bad)]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("format.mismatch"), "{}", stderr(&o));
    assert!(!bad.exists());
}

#[test]
fn compare_exit_codes_and_offsets() {
    let d = tempfile::tempdir().unwrap();
    let a = mixed_raw(d.path(), "a.raw", 3, 0);
    let b = d.path().join("b.raw");
    std::fs::copy(&a, &b).unwrap();
    assert_eq!(code(&glimpse(&["compare", s(&a), s(&b)])), 0);

    let mut bytes = std::fs::read(&b).unwrap();
    bytes[2_500_000] ^= 1;
    std::fs::write(&b, &bytes).unwrap();
    let o = glimpse(&["compare", s(&a), s(&b)]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).contains("offset 2500000"), "{}", stdout(&o));

    // A zero tail is identical unless --strict; a non-zero tail differs.
    let c = d.path().join("c.raw");
    std::fs::copy(&a, &c).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&c).unwrap();
    f.set_len((3 << 20) + 65536).unwrap();
    assert_eq!(code(&glimpse(&["compare", s(&a), s(&c)])), 0);
    assert_eq!(code(&glimpse(&["compare", "--strict", s(&a), s(&c)])), 1);
    let mut bytes = std::fs::read(&c).unwrap();
    bytes[(3 << 20) + 100] = 9;
    std::fs::write(&c, &bytes).unwrap();
    let o = glimpse(&["compare", s(&c), s(&a)]);
    assert_eq!(code(&o), 1);
    assert!(
        stdout(&o).contains(&format!("offset {}", (3 << 20) + 100)),
        "{}",
        stdout(&o)
    );
    assert_eq!(code(&glimpse(&["compare", s(&a), "/nonexistent"])), 2);
}

fn tool_digest(tool: &str, p: &Path) -> String {
    let o = Command::new(tool)
        .arg(p)
        .output()
        .unwrap_or_else(|_| panic!("{tool} is required"));
    stdout(&o).split_whitespace().next().unwrap().to_string()
}

#[test]
fn checksum_matches_md5sum_and_sha512sum() {
    let d = tempfile::tempdir().unwrap();
    let p = mixed_raw(d.path(), "a.raw", 9, 123);
    let v = json(&glimpse(&["checksum", "--output", "json", s(&p)]));
    assert_eq!(v["md5"], tool_digest("md5sum", &p));
    assert_eq!(v["sha512"], tool_digest("sha512sum", &p));
    assert_eq!(v["size"], (9u64 << 20) + 123);
    let v = json(&glimpse(&[
        "checksum",
        "--algo",
        "sha1,sha256",
        "--output",
        "json",
        s(&p),
    ]));
    assert_eq!(v["sha1"], tool_digest("sha1sum", &p));
    assert_eq!(v["sha256"], tool_digest("sha256sum", &p));
    assert!(v.get("md5").is_none());
    // Human output: md5sum-style lines.
    let o = glimpse(&["checksum", s(&p)]);
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(
        lines[0],
        format!("{}  {}", tool_digest("md5sum", &p), s(&p))
    );
}

/// No digests of nothing: an empty file, or a pipe whose writer wrote nothing (a failed
/// `curl ... |`), is refused like every other command refuses a 0-byte input.
#[test]
fn checksum_of_an_empty_input_is_refused_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    let empty = d.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    // Refused: exit 1, nothing on stdout, the reason on stderr.
    let refused = |o: &std::process::Output| {
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(o.stdout.is_empty(), "{}", stdout(o));
        assert!(e.contains("empty"), "{e}");
    };
    refused(&glimpse(&["checksum", s(&empty)]));
    let o = glimpse(&["checksum", "--output", "json", s(&empty)]);
    assert_eq!(o.status.code(), Some(1));
    let v = json(&o);
    assert_eq!(v["error"]["code"], "raw.empty");
    assert!(v.get("md5").is_none());
    let bin = env!("CARGO_BIN_EXE_glimpse");
    refused(
        &Command::new("bash")
            .args(["-c", &format!("false | '{bin}' checksum -")])
            .output()
            .expect("bash is required"),
    );
    // --force prints what md5sum and sha512sum print.
    let v = json(&glimpse(&[
        "checksum",
        "--force",
        "--output",
        "json",
        s(&empty),
    ]));
    assert_eq!(v["md5"], tool_digest("md5sum", &empty));
    assert_eq!(v["sha512"], tool_digest("sha512sum", &empty));
    assert_eq!(v["size"], 0);
}

#[test]
fn content_digest_follows_the_documented_construction() {
    let d = tempfile::tempdir().unwrap();
    let p = mixed_raw(d.path(), "a.raw", 4, 1000);
    let ours = json(&glimpse(&[
        "checksum",
        "--content",
        "--output",
        "json",
        s(&p),
    ]));
    // The Python reference from docs/content-digest.md.
    let py = r#"
import hashlib, struct, sys
data = open(sys.argv[1], 'rb').read(); B = 65536
S = -(-len(data) // 512) * 512  # rounded up to a sector
data = data.ljust(S, b"\0")
outer = hashlib.sha256(b"glimpse-content-v1\0" + struct.pack("<QQ", S, B)); run = 0
for off in range(0, S, B):
    block = data[off:off + B].ljust(B, b"\0")
    if block.count(0) == B:
        run += 1; continue
    if run: outer.update(b"\0" + struct.pack("<Q", run)); run = 0
    outer.update(b"\1" + hashlib.sha256(block).digest())
if run: outer.update(b"\0" + struct.pack("<Q", run))
print(outer.hexdigest())
"#;
    let o = Command::new("python3")
        .args(["-c", py, s(&p)])
        .output()
        .expect("python3 is required");
    assert_eq!(ours["content"], stdout(&o).trim());
    // Holes and written zeros give the same digest.
    let dense = d.path().join("dense.raw");
    std::fs::write(&dense, std::fs::read(&p).unwrap()).unwrap();
    let v2 = json(&glimpse(&[
        "checksum",
        "--content",
        "--output",
        "json",
        s(&dense),
    ]));
    assert_eq!(ours["content"], v2["content"]);
}

#[test]
fn map_data_ranges_match_qemu_img_for_raw() {
    let d = tempfile::tempdir().unwrap();
    let p = mixed_raw(d.path(), "a.raw", 8, 0);
    let ours = json(&glimpse(&["map", "--output", "json", s(&p)]));
    let theirs: Value =
        serde_json::from_slice(&qemu_img(&["map", "--output=json", "-f", "raw", s(&p)]).stdout)
            .unwrap();
    let data = |v: &Value| -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for e in v.as_array().unwrap() {
            if e["data"] == true {
                let (st, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == st => last.1 += len,
                    _ => out.push((st, len)),
                }
            }
        }
        out
    };
    assert_eq!(data(&ours), data(&theirs));
    let total: u64 = ours
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 8 << 20);
}

#[test]
fn map_prints_every_run_of_a_table_many_entries_name_as_one_json_document() {
    // Two L1 entries naming one L2 table whose entries alternate unallocated and zero: 16,384
    // runs, printed as they are found (never collected), still one JSON array equal to the
    // runs, and the same runs in the human listing.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("shared.qcow2");
    support::shared_l2_qcow2(&p, 2);
    assert_eq!(code(&glimpse(&["check", s(&p)])), 0);
    let o = glimpse(&["map", "--output", "json", s(&p)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let got = json(&o);
    let cs = 1u64 << 16;
    let want: Vec<Value> = (0..16384u64)
        .map(|i| {
            serde_json::json!({
                "start": i * cs, "length": cs, "depth": 0, "present": i % 2 == 1,
                "zero": true, "data": false, "compressed": false,
            })
        })
        .collect();
    assert!(got == Value::Array(want), "the runs differ");
    support::schema::assert_valid("map.json", &got);
    let o = glimpse(&["map", s(&p)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let lines: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 1 + 16384);
    assert!(lines[1].starts_with("0x0 ") && lines[1].ends_with(" unallocated"));
    assert!(lines[2].starts_with("0x10000 ") && lines[2].ends_with(" zero"));
}

#[test]
fn measure_raw() {
    let d = tempfile::tempdir().unwrap();
    let p = mixed_raw(d.path(), "a.raw", 8, 0);
    let v = json(&glimpse(&[
        "measure",
        "-O",
        "raw",
        "--output",
        "json",
        s(&p),
    ]));
    assert_eq!(v["fully-allocated"], 8u64 << 20);
    // A raw output is as long as the disk, holes or not, as qemu-img measure says (report
    // writer-edge F2: only the data was once counted, below the file convert writes).
    assert_eq!(v["required"], 8u64 << 20);
    let o = qemu_img(&["measure", "-O", "raw", "--output=json", s(&p)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["required"], q["required"]);
    assert_eq!(v["fully-allocated"], q["fully-allocated"]);
}

/// Report F1: a qcow2 header size and a fixed VHD's current size that are not whole sectors
/// lose their partial sector, as in qemu: `info` and `convert` give qemu-img's size.
#[test]
fn convert_output_sizes_follow_qemu_for_partial_sectors() {
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("odd.qcow2");
    assert!(qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "1M"])
        .status
        .success());
    let mut b = std::fs::read(&q).unwrap();
    b[24..32].copy_from_slice(&1000u64.to_be_bytes());
    std::fs::write(&q, &b).unwrap();
    // A fixed VHD (creator "win ": qemu trusts the current size) of 64 KiB - 100 bytes.
    let v = d.path().join("odd.vhd");
    let mut f = vec![0u8; 512];
    f[..8].copy_from_slice(b"conectix");
    f[8..12].copy_from_slice(&2u32.to_be_bytes());
    f[12..16].copy_from_slice(&0x1_0000u32.to_be_bytes());
    f[16..24].copy_from_slice(&[0xff; 8]);
    f[28..32].copy_from_slice(b"win ");
    f[40..48].copy_from_slice(&(65536u64 - 100).to_be_bytes());
    f[48..56].copy_from_slice(&(65536u64 - 100).to_be_bytes());
    f[56..60].copy_from_slice(&[0xff, 0xff, 16, 255]);
    f[60..64].copy_from_slice(&2u32.to_be_bytes());
    let sum = f.iter().fold(0u32, |a, &x| a.wrapping_add(u32::from(x)));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
    let mut img = vec![3u8; 65536];
    img.extend(f);
    std::fs::write(&v, &img).unwrap();
    for (p, fmt, want) in [(&q, "qcow2", 512u64), (&v, "vpc", 65024)] {
        let info = json(&glimpse(&["info", "--output", "json", s(p)]));
        assert_eq!(info["virtual-size"], want, "{fmt}");
        let ours = d.path().join(format!("{fmt}.ours.raw"));
        let theirs = d.path().join(format!("{fmt}.qemu.raw"));
        let o = glimpse(&["convert", "-O", "raw", s(p), s(&ours)]);
        assert_eq!(code(&o), 0, "{fmt}: {}", stderr(&o));
        let q = qemu_img(&["convert", "-f", fmt, "-O", "raw", s(p), s(&theirs)]);
        assert!(q.status.success(), "{fmt}: {}", stderr(&q));
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(a.len() as u64, want, "{fmt}");
        assert!(a == b, "{fmt}: glimpse's output differs from qemu-img's");
    }
}

/// Every enumerated `-o` value that `convert --help` lists is one `convert` accepts: the help
/// once offered `adapter_type=pvscsi`, which the VMDK writer refuses (as qemu-img does).
#[test]
fn convert_help_lists_only_option_values_convert_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // A size whose CHS geometry is exact, so that force_size=off is a valid choice too.
    std::fs::File::create(&src)
        .unwrap()
        .set_len(10_514_432)
        .unwrap();
    let help = stdout(&glimpse(&["convert", "--help"]));
    let block = help
        .split("Output options (-o)")
        .nth(1)
        .expect("an output options section");
    let mut tried = 0;
    for line in block.lines() {
        let Some((fmt, rest)) = line.trim().split_once(':') else {
            continue;
        };
        if !["qcow2", "vmdk", "vhd", "vhdx", "vdi"].contains(&fmt) {
            continue;
        }
        for opt in rest.split([',', ' ']) {
            let Some((key, values)) = opt.split_once('=') else {
                continue;
            };
            if !values.contains('|') {
                continue;
            }
            for value in values.split('|') {
                let out = dir.path().join(format!("out.{fmt}"));
                let o = format!("{key}={value}");
                let mut args = vec!["convert", "-O", fmt, "-o", &o];
                if key == "compression_type" {
                    args.push("-c");
                }
                args.extend([s(&src), s(&out)]);
                let r = glimpse(&args);
                assert_eq!(code(&r), 0, "-O {fmt} -o {o}: {}", stderr(&r));
                tried += 1;
            }
        }
    }
    assert!(tried >= 15, "only {tried} option values found in the help");
}
