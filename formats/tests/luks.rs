//! LUKS1 volumes made by qemu-img, and byte-built LUKS2 headers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{detect, open, ErrorKind, Format, Limits, Source, Window};
use sha2::{Digest, Sha256};

fn qemu_luks(dir: &Path, size: &str) -> PathBuf {
    let out = dir.join("v.luks");
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "key-secret=sec0,iter-time=10",
        ])
        .arg(&out)
        .arg(size)
        .status()
        .expect("qemu-img is required");
    assert!(st.success());
    out
}

/// `qemu-img info --output=json -f luks`: the header is readable without the secret.
fn qemu_info(path: &Path) -> serde_json::Value {
    glimpse_testkit::qemu::info(path, Some("luks"))
}

#[test]
fn luks1_matches_qemu_img_info() {
    let dir = tempfile::tempdir().unwrap();
    // Not a whole MiB: the payload size must still match qemu exactly.
    let path = qemu_luks(dir.path(), "1536K");
    let q = qemu_info(&path);
    let s: Source = Arc::new(std::fs::File::open(&path).unwrap());
    assert_eq!(detect(s.as_ref()).unwrap().matches, vec![Format::Luks]);
    let img = open(s.clone(), Format::Luks, &Limits::default()).unwrap();
    let info = img.info();
    let qd = &q["format-specific"]["data"];
    assert_eq!(info.virtual_size, q["virtual-size"].as_u64().unwrap());
    assert!(info.encrypted);
    assert_eq!(info.details["version"], 1);
    assert_eq!(info.details["uuid"], qd["uuid"]);
    assert_eq!(info.details["payload-offset"], qd["payload-offset"]);
    assert_eq!(info.details["hash"], qd["hash-alg"]);
    assert_eq!(info.details["cipher"], "aes-xts-plain64");
    let active = qd["slots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["active"] == true)
        .count();
    assert_eq!(info.details["key-slots"], active);
    assert_eq!(
        img.mapping(0, 512).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    let r = inspect(s, &Policy::default(), &Limits::default()).unwrap();
    assert_eq!(r.verdict(), Verdict::Reject);
    assert!(r.findings.iter().any(|f| f.code == "format.unsupported"));
}

#[test]
fn luks1_truncated_prefixes_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_luks(dir.path(), "1M");
    let full: Arc<Vec<u8>> = Arc::new(std::fs::read(&path).unwrap());
    let img = open(full.clone(), Format::Luks, &Limits::default()).unwrap();
    let payload = img.info().details["payload-offset"].as_u64().unwrap();
    let lens = (0..1200u64)
        .chain((1200..full.len() as u64).step_by(4093))
        .chain([payload - 1, payload]);
    for len in lens {
        let s: Source = Arc::new(Window::new(full.clone(), 0, len).unwrap());
        match open(s, Format::Luks, &Limits::tight()) {
            Ok(img) => {
                assert!(len >= payload, "prefix {len} opened");
                assert_eq!(img.info().virtual_size, len - payload);
            }
            Err(e) => {
                assert!(len < payload);
                assert!(
                    matches!(e.finding_code(), "luks.truncated" | "luks.header"),
                    "{len}: {e}"
                );
            }
        }
    }
}

const JSON: &str = r#"{"keyslots":{"0":{"type":"luks2"},"1":{"type":"luks2"}},"tokens":{},"segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":512}},"digests":{"0":{"type":"pbkdf2","keyslots":["0","1"],"segments":["0"],"hash":"sha256"}},"config":{"json_size":"12288","keyslots_size":"16744448"}}"#;

/// A LUKS2 header as cryptsetup lays it out: 4 KiB binary header, JSON area, checksum over both.
fn luks2(json: &str, hdr_size: u64, total: usize) -> Vec<u8> {
    let mut b = vec![0u8; total];
    b[..6].copy_from_slice(b"LUKS\xba\xbe");
    b[6..8].copy_from_slice(&2u16.to_be_bytes());
    b[8..16].copy_from_slice(&hdr_size.to_be_bytes());
    b[16..24].copy_from_slice(&3u64.to_be_bytes());
    b[24..30].copy_from_slice(b"secret");
    b[72..78].copy_from_slice(b"sha256");
    b[168..204].copy_from_slice(b"0b6a3bd6-7d0b-4f6e-8e4c-2f4f7b1f0d11");
    b[4096..4096 + json.len()].copy_from_slice(json.as_bytes());
    let sum = Sha256::digest(&b[..(hdr_size as usize).min(total)]);
    b[448..480].copy_from_slice(&sum);
    b
}

#[test]
fn luks2_header_details_and_payload_size() {
    let b = luks2(JSON, 16384, 17 << 20);
    let s: Source = Arc::new(b);
    assert_eq!(detect(s.as_ref()).unwrap().matches, vec![Format::Luks]);
    let img = open(s, Format::Luks, &Limits::default()).unwrap();
    let d = &img.info().details;
    assert_eq!(img.info().virtual_size, (17 << 20) - 16_777_216);
    assert_eq!(d["version"], 2);
    assert_eq!(d["cipher"], "aes-xts-plain64");
    assert_eq!(d["hash"], "sha256");
    assert_eq!(d["label"], "secret");
    assert_eq!(d["uuid"], "0b6a3bd6-7d0b-4f6e-8e4c-2f4f7b1f0d11");
    assert_eq!(d["key-slots"], 2);
    assert_eq!(d["sequence-id"], 3);
    assert_eq!(d["payload-offset"], 16_777_216);
    assert!(img.findings().is_empty(), "{:?}", img.findings());
}

#[test]
fn luks2_findings_and_errors() {
    // luks.checksum: one byte of the JSON area changed after the checksum was computed.
    let mut b = luks2(JSON, 16384, 17 << 20);
    b[4096 + 2] = b'K';
    let img = open(Arc::new(b), Format::Luks, &Limits::default()).unwrap();
    assert_eq!(img.findings()[0].code, "luks.checksum");
    // luks.header: JSON that does not parse.
    let b = luks2("{not json", 16384, 17 << 20);
    let e = open(Arc::new(b), Format::Luks, &Limits::default())
        .err()
        .unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::Invalid, "luks.header")
    );
    // luks.header: a header size outside 16 KiB..4 MiB.
    let b = luks2(JSON, 1 << 40, 17 << 20);
    assert_eq!(
        open(Arc::new(b), Format::Luks, &Limits::default())
            .err()
            .unwrap()
            .finding_code(),
        "luks.header"
    );
    // luks.truncated: the payload offset lies past the end of the file.
    let b = luks2(JSON, 16384, 1 << 20);
    let e = open(Arc::new(b), Format::Luks, &Limits::default())
        .err()
        .unwrap();
    assert_eq!(
        (e.kind(), e.finding_code()),
        (ErrorKind::Truncated, "luks.truncated")
    );
}

#[test]
fn luks2_truncated_prefixes_error() {
    let full: Arc<Vec<u8>> = Arc::new(luks2(JSON, 16384, 17 << 20));
    for len in (0..20_000u64).step_by(3).chain([16_777_215]) {
        let s: Source = Arc::new(Window::new(full.clone(), 0, len).unwrap());
        assert!(
            open(s, Format::Luks, &Limits::tight()).is_err(),
            "prefix {len} opened"
        );
    }
}

/// The committed hostile files (fixtures/hostile/luks/README.md) give the codes their
/// `expected-codes` lines list; `open` alone gives the last of them, the parser's own.
#[test]
fn hostile_fixtures() {
    for fx in glimpse_testkit::hostile::check_dir("luks")
        .into_iter()
        .map(|(fx, _)| fx)
    {
        let name = &fx.name;
        let code = fx.codes.last().expect("a hostile file has a code").as_str();
        let s: Source = Arc::new(std::fs::File::open(&fx.path).unwrap());
        assert_eq!(
            detect(s.as_ref()).unwrap().matches,
            vec![Format::Luks],
            "{name}"
        );
        let codes: Vec<&str> = match open(s, Format::Luks, &Limits::default()) {
            Ok(img) => img.findings().iter().map(|f| f.code).collect(),
            Err(e) => vec![e.finding_code()],
        };
        assert_eq!(codes, [code], "{name}");
    }
}
