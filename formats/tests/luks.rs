//! LUKS1 volumes made by qemu-img, and byte-built LUKS2 headers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{detect, open, ErrorKind, Format, Limits, Source, Window};
use sha2::{Digest, Sha256};

fn qemu_luks(dir: &Path, size: &str) -> PathBuf {
    qemu_luks_with(dir, "v.luks", size, "")
}

/// A LUKS1 volume made by qemu-img, secret "abc", with extra `-o` options
/// (`cipher-alg=..,cipher-mode=..`, or "" for qemu's defaults: aes-256, xts-plain64, sha256).
fn qemu_luks_with(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let out = dir.join(name);
    let o = format!(
        "key-secret=sec0,iter-time=10{}{opts}",
        if opts.is_empty() { "" } else { "," }
    );
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            &o,
        ])
        .arg(&out)
        .arg(size)
        .status()
        .expect("qemu-img is required");
    assert!(st.success(), "qemu-img create -o {o}");
    out
}

/// Does `qemu-img info -f luks` open it? It reads the header only, with no key (NO_IO).
fn qemu_info_opens(path: &Path) -> bool {
    Command::new("qemu-img")
        .args(["info", "-f", "luks"])
        .arg(path)
        .output()
        .expect("qemu-img is required")
        .status
        .success()
}

/// Does qemu open it with its key (secret "abc") and read its first sector?
fn qemu_opens_with_key(path: &Path) -> bool {
    let opts = format!(
        "driver=luks,key-secret=sec0,file.filename={}",
        path.display()
    );
    Command::new("qemu-io")
        .args(["--object", "secret,id=sec0,data=abc", "--image-opts", &opts])
        .args(["-c", "read 0 512"])
        .output()
        .expect("qemu-io is required (qemu-utils)")
        .status
        .success()
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

/// qemu-img's own LUKS1 volumes open, whatever the cipher, mode, IV generator and hashes.
#[test]
fn luks1_made_by_qemu_with_each_algorithm_opens() {
    let dir = tempfile::tempdir().unwrap();
    for (k, opts) in [
        "cipher-alg=aes-128,hash-alg=sha512",
        "cipher-alg=aes-192,ivgen-alg=essiv,ivgen-hash-alg=sm3",
        "cipher-alg=serpent-192,ivgen-alg=plain,hash-alg=sha1",
        "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=essiv,hash-alg=sha224",
        "cipher-alg=twofish-256,cipher-mode=ctr,hash-alg=ripemd160",
        "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5,hash-alg=sha384",
        "cipher-mode=ecb,ivgen-alg=plain64,ivgen-hash-alg=sha1,hash-alg=md5",
    ]
    .into_iter()
    .enumerate()
    {
        let p = qemu_luks_with(dir.path(), &format!("v{k}.luks"), "1M", opts);
        let q = qemu_info(&p);
        let s: Source = Arc::new(std::fs::File::open(&p).unwrap());
        let img =
            open(s, Format::Luks, &Limits::default()).unwrap_or_else(|e| panic!("{opts}: {e}"));
        let qd = &q["format-specific"]["data"];
        assert_eq!(
            img.info().details["payload-offset"],
            qd["payload-offset"],
            "{opts}"
        );
        assert_eq!(img.info().details["hash"], qd["hash-alg"], "{opts}");
    }
}

/// Each header below is a qemu-made one with one field changed. qemu refuses every one
/// (crypto/block-luks.c `qcrypto_block_luks_check_header` and `..._parse_header`), mostly
/// already in `qemu-img info`, which reads no key; the last few only when it opens the volume
/// with its key. glimpse refuses them all: `luks.header`, Invalid, at the field at fault.
#[test]
fn luks1_headers_qemu_refuses_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Default aes-256-xts-plain64 (64 key bytes, key material every 504 sectors from 8, payload
    // at 4040); aes-256-cbc (32 bytes, every 256 sectors); aes-128-xts (32 bytes).
    let xts256 = std::fs::read(qemu_luks_with(d, "xts256.luks", "1M", "")).unwrap();
    let cbc = std::fs::read(qemu_luks_with(d, "cbc.luks", "1M", "cipher-mode=cbc")).unwrap();
    let xts128 =
        std::fs::read(qemu_luks_with(d, "xts128.luks", "1M", "cipher-alg=aes-128")).unwrap();
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let name = |b: &mut Vec<u8>, at: usize, v: &[u8]| {
        b[at..at + 32].fill(0);
        b[at..at + v.len()].copy_from_slice(v);
    };
    let slot = |k: usize, field: usize| 208 + 48 * k + field;
    type Mutation<'a> = &'a dyn Fn(&mut Vec<u8>);
    // (what, base, mutation, offset of the field glimpse names, refused by qemu-img info)
    #[rustfmt::skip]
    let cases: &[(&str, &Vec<u8>, Mutation, usize, bool)] = &[
        ("slot 0 state", &xts256, &|b| put32(b, slot(0, 0), 0x00AC_71F4), slot(0, 0), true),
        ("slot 5 state zero", &xts256, &|b| put32(b, slot(5, 0), 0), slot(5, 0), true),
        ("slot 3 stripes", &xts256, &|b| put32(b, slot(3, 44), 3999), slot(3, 44), true),
        ("slot 0 stripes", &xts256, &|b| put32(b, slot(0, 44), 7), slot(0, 44), true),
        ("enabled slot iterations", &xts256, &|b| put32(b, slot(0, 4), 0), slot(0, 4), true),
        ("master key iterations", &xts256, &|b| put32(b, 164, 0), 164, true),
        ("key material in the header", &xts256, &|b| put32(b, slot(0, 40), 7), slot(0, 40), true),
        ("key material in the payload", &xts256, &|b| put32(b, slot(7, 40), 4000), slot(7, 40), true),
        ("key material of two slots", &xts256, &|b| put32(b, slot(2, 40), 8 + 504), slot(2, 40), true),
        ("payload under the header", &xts256, &|b| put32(b, 104, 7), 104, true),
        ("payload over slot 6", &xts256, &|b| put32(b, 104, 0xdc8), slot(6, 40), true),
        ("key bytes +1 overlaps", &xts256, &|b| put32(b, 108, 65), slot(1, 40), true),
        ("key bytes odd", &xts256, &|b| put32(b, 108, 63), 108, true),
        ("key bytes zero", &xts256, &|b| put32(b, 108, 0), 108, true),
        ("key bytes 20", &cbc, &|b| put32(b, 108, 20), 108, true),
        ("cipher name case", &xts256, &|b| name(b, 8, b"AES"), 8, true),
        ("cipher name byte", &xts256, &|b| b[8] = 0xc2, 8, true),
        ("cipher name unknown", &xts256, &|b| name(b, 8, b"sm4"), 8, true),
        ("cipher name trailing space", &xts256, &|b| name(b, 8, b"aes "), 8, true),
        ("cipher name unterminated", &xts256, &|b| b[8..40].fill(b'a'), 8, true),
        ("cast5 with a 32-byte key", &xts256, &|b| name(b, 8, b"cast5"), 108, true),
        ("cipher mode", &xts256, &|b| name(b, 40, b"wts-plain64"), 40, true),
        ("cipher mode case", &xts256, &|b| name(b, 40, b"XTS-plain64"), 40, true),
        ("no iv generator", &xts256, &|b| name(b, 40, b"xtsplain64"), 40, true),
        ("iv generator", &xts256, &|b| b[40 + 8] = 9, 40, true),
        ("iv generator empty", &xts256, &|b| name(b, 40, b"xts-"), 40, true),
        ("iv hash unknown", &xts256, &|b| name(b, 40, b"xts-plain64:sha257"), 40, true),
        ("essiv without a hash", &cbc, &|b| name(b, 40, b"cbc-essiv"), 40, true),
        ("essiv digest no aes key", &cbc, &|b| name(b, 40, b"cbc-essiv:sha1"), 40, true),
        ("cipher mode unterminated", &xts256, &|b| b[40..72].fill(b'x'), 40, true),
        ("hash spec byte", &xts256, &|b| b[72] = b'9', 72, true),
        ("hash spec case", &xts256, &|b| name(b, 72, b"SHA256"), 72, true),
        ("hash spec unterminated", &xts256, &|b| b[72..104].fill(b's'), 72, true),
        // qemu-img info opens these; qemu cannot open them with their key.
        ("xts key of 49 bytes", &xts256, &|b| put32(b, 108, 49), 108, false),
        ("cast5 in xts mode", &xts128, &|b| name(b, 8, b"cast5"), 40, false),
        ("24-byte key outside xts", &cbc, &|b| put32(b, 108, 24), 108, false),
    ];
    for &(what, base, mutate, at, info_refuses) in cases {
        let mut b = base.clone();
        mutate(&mut b);
        let p = d.join("m.luks");
        std::fs::write(&p, &b).unwrap();
        if info_refuses {
            assert!(!qemu_info_opens(&p), "{what}: qemu-img info opened it");
        } else {
            assert!(qemu_info_opens(&p), "{what}: qemu-img info refused it");
            assert!(
                !qemu_opens_with_key(&p),
                "{what}: qemu opened it with its key"
            );
        }
        let e = open(Arc::new(b), Format::Luks, &Limits::default())
            .err()
            .unwrap_or_else(|| panic!("{what}: glimpse opened it"));
        assert_eq!(
            (e.kind(), e.finding_code(), e.offset()),
            (ErrorKind::Invalid, "luks.header", Some(at as u64)),
            "{what}: {e}"
        );
    }
    for base in [&xts256, &cbc, &xts128] {
        let p = d.join("m.luks");
        std::fs::write(&p, base).unwrap();
        assert!(qemu_opens_with_key(&p));
        assert!(open(Arc::new(base.clone()), Format::Luks, &Limits::default()).is_ok());
    }
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

/// The JSON area is read for its segment, digest hash and key-slot count only, everything
/// else skipped unread (a `serde_json::Value` of a 4 MiB area took 105 MB), and it reads what
/// the `Value` did: segment "0", else the least key; members of another type as absent; of
/// a repeated key, the last; a key slot named twice counted once.
#[test]
fn luks2_json_reads_only_what_it_reports() {
    let seg = |off: &str| {
        format!(
            r#"{{"type":"crypt","offset":{off},"size":"dynamic","encryption":"aes-xts-plain64"}}"#
        )
    };
    let details = |json: &str| {
        let img = open(
            Arc::new(luks2(json, 16384, 17 << 20)),
            Format::Luks,
            &Limits::default(),
        )?;
        Ok::<_, glimpse_formats::Error>(img.info().details.clone())
    };
    let json = format!(
        r#"{{"segments":{{"1":{},"0":{}}},"keyslots":{{"3":{{}},"1":[],"3":7}},"digests":{{"b":{{"hash":"sha1"}},"a":{{"hash":"sha512"}}}}}}"#,
        seg(r#""16785408""#),
        seg(r#""16777216""#)
    );
    let d = details(&json).unwrap();
    assert_eq!(d["payload-offset"], 16_777_216);
    assert_eq!(d["key-slots"], 2);
    assert_eq!(d["hash"], "sha512");
    let json = format!(
        r#"{{"segments":{{"b":{},"a":{}}},"digests":[1]}}"#,
        seg(r#""16785408""#),
        seg(r#""16777216""#)
    );
    let d = details(&json).unwrap();
    assert_eq!(d["payload-offset"], 16_777_216);
    assert_eq!(d["key-slots"], 0);
    assert!(d.get("hash").is_none());
    // Of a repeated member, the last; one of another type is as if absent.
    let d =
        details(r#"{"segments":{"0":{"offset":"1","encryption":{"x":1},"offset":"16777216"}}}"#)
            .unwrap();
    assert_eq!(d["payload-offset"], 16_777_216);
    assert!(d.get("cipher").is_none());
    for (json, says) in [
        (seg("16777216"), "no numeric offset"),
        (r#"[1,2]"#.into(), "no segment"),
        (
            r#"{"segments":[{"offset":"16777216"}]}"#.into(),
            "no segment",
        ),
        (r#"{"segments":{}}"#.into(), "no segment"),
        (
            r#"{"segments":{"0":{"offset":"16777216"}}} x"#.into(),
            "does not parse",
        ),
    ] {
        let json = if json.starts_with(r#"{"type""#) {
            format!(r#"{{"segments":{{"0":{json}}}}}"#)
        } else {
            json
        };
        let e = details(&json).err().unwrap();
        assert_eq!(e.finding_code(), "luks.header", "{json}");
        assert!(e.message().contains(says), "{json}: {}", e.message());
    }
    // A 4 MiB area, nearly all one array of numbers, reads like a small one.
    let mut json = String::from(r#"{"segments":{"0":{"offset":"16777216"}},"x":["#);
    while json.len() < (4 << 20) - 4200 {
        json.push_str("0,");
    }
    json.push_str("0]}");
    let img = open(
        Arc::new(luks2(&json, 4 << 20, 17 << 20)),
        Format::Luks,
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(img.info().details["payload-offset"], 16_777_216);
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
