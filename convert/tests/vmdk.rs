//! VMDK writer round trips, checked by qemu-img (which must be installed: these tests fail
//! without it) and by glimpse's own reader.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use glimpse_convert::pipeline::{convert, ConvertOptions};
use glimpse_convert::{create, measure, Target, WriteOptions};
use glimpse_formats::image::Image;
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{Format, Limits};

/// xorshift64*: deterministic test data without another dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Random runs of random bytes, repeated bytes and zeros, at unaligned offsets.
fn source(size: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let len = (r.below(200_000) as usize + 1).min(size - pos);
        match r.below(3) {
            0 => v[pos..pos + len]
                .iter_mut()
                .for_each(|b| *b = r.next() as u8),
            1 => v[pos..pos + len].fill(r.next() as u8 | 1),
            _ => {}
        }
        pos += len;
    }
    v
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed for these tests");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A `Write` whose bytes the test can take back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn open_raw(path: &Path) -> Arc<dyn Image> {
    let f = File::open(path).unwrap();
    Arc::from(glimpse_formats::open(Arc::new(f), Format::Raw, &Limits::default()).unwrap())
}

fn run(src: &Path, opts: &WriteOptions, target: Target) -> glimpse_convert::Result<()> {
    let img = open_raw(src);
    let reader = GuestReader::new(img.clone(), &Limits::default());
    let w = create(Format::Vmdk, opts, target, img.info().virtual_size)?;
    convert(img, w, &reader, &ConvertOptions::default()).map(|_| ())
}

fn read_back(path: &Path) -> (Vec<u8>, Arc<dyn Image>) {
    let f = File::open(path).unwrap();
    let img: Arc<dyn Image> =
        Arc::from(glimpse_formats::open(Arc::new(f), Format::Vmdk, &Limits::default()).unwrap());
    let r = GuestReader::new(img.clone(), &Limits::default());
    let mut buf = vec![0u8; r.virtual_size() as usize];
    r.read_at(&mut buf, 0).unwrap();
    (buf, img)
}

fn round_trip(size: usize, seed: u64, subformat: &str) {
    round_trip_data(source(size, seed), subformat);
}

fn round_trip_data(data: Vec<u8>, subformat: &str) {
    let size = data.len();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.raw");
    std::fs::write(&src, &data).unwrap();
    // Named as the writer names a pipe's extent, so that stream and file bytes can be equal.
    let out = dir.path().join("disk.vmdk");
    let opts = WriteOptions::parse(&format!("subformat={subformat}"), false).unwrap();
    run(&src, &opts, Target::File(File::create(&out).unwrap())).unwrap();
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());

    let (ok, text) = qemu_img(&["compare", "-f", "raw", "-F", "vmdk", s, o]);
    assert!(ok, "{subformat} {size}: qemu-img compare: {text}");
    assert!(text.contains("Images are identical"), "{text}");
    let (ok, text) = qemu_img(&["check", "-f", "vmdk", o]);
    assert!(ok, "{subformat} {size}: qemu-img check: {text}");
    assert!(text.contains("No errors were found"), "{text}");

    let (back, img) = read_back(&out);
    assert_eq!(img.info().virtual_size, (size as u64).div_ceil(512) * 512);
    assert_eq!(
        &back[..size],
        &data[..],
        "{subformat} {size}: read back differs"
    );
    assert!(back[size..].iter().all(|&b| b == 0));
    let mut findings: Vec<_> = img.findings().to_vec();
    findings.extend(img.check(&Limits::default()).unwrap());
    assert!(findings.is_empty(), "{subformat} {size}: {findings:?}");

    if subformat == "streamOptimized" {
        let sink = Shared::default();
        run(&src, &opts, Target::Stream(Box::new(sink.clone()))).unwrap();
        assert_eq!(
            *sink.0.lock().unwrap(),
            std::fs::read(&out).unwrap(),
            "stream and file outputs differ"
        );
    }

    // measure: exact for monolithicSparse, an upper bound for streams.
    let grains = data
        .chunks(65536)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count() as u64;
    let m = measure(Format::Vmdk, &opts, size as u64, grains * 65536).unwrap();
    let len = std::fs::metadata(&out).unwrap().len();
    if subformat == "monolithicSparse" {
        assert_eq!(m.required, len);
    } else {
        assert!(m.required >= len, "measure {} < {len}", m.required);
    }
    assert!(m.fully_allocated >= m.required);
}

const SIZES: [usize; 4] = [
    7 * 512,
    5 * 1024 * 1024 + 3 * 512,
    (33 << 20) + 3 * 65536 + 1024,
    3000,
];

#[test]
fn monolithic_sparse_round_trips() {
    for (i, size) in SIZES.into_iter().enumerate() {
        round_trip(size, 11 + i as u64, "monolithicSparse");
    }
}

#[test]
fn stream_optimized_round_trips() {
    for (i, size) in SIZES.into_iter().enumerate() {
        round_trip(size, 21 + i as u64, "streamOptimized");
    }
}

#[test]
fn stream_is_the_footer_form_with_sparse_c_header() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.raw");
    std::fs::write(&src, source(1 << 20, 5)).unwrap();
    let out = dir.path().join("s.vmdk");
    let mut opts =
        WriteOptions::parse("subformat=streamOptimized,adapter_type=lsilogic", false).unwrap();
    opts.output_name = Some("s.vmdk".into());
    run(&src, &opts, Target::File(File::create(&out).unwrap())).unwrap();
    let b = std::fs::read(&out).unwrap();
    assert_eq!(&b[0..4], b"KDMV");
    assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 3);
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x30001);
    assert_eq!(u64::from_le_bytes(b[56..64].try_into().unwrap()), u64::MAX);
    let n = b.len();
    assert_eq!(
        u32::from_le_bytes(b[n - 1536 + 12..n - 1536 + 16].try_into().unwrap()),
        3
    );
    assert_eq!(&b[n - 1024..n - 1020], b"KDMV");
    assert!(b[n - 512..].iter().all(|&x| x == 0));
    let text = String::from_utf8_lossy(&b[512..512 * 21]);
    assert!(text.contains("createType=\"streamOptimized\""));
    // The extent names the output file itself (libvmdk opens the extent by name).
    assert!(text.contains("SPARSE \"s.vmdk\""), "{text}");
    assert!(text.contains("ddb.adapterType = \"lsilogic\""));
    assert!(text.contains("ddb.geometry.heads = \"255\""));
    let (ok, info) = qemu_img(&["info", "--output=json", out.to_str().unwrap()]);
    assert!(ok, "{info}");
    assert!(
        info.contains("\"create-type\": \"streamOptimized\""),
        "{info}"
    );
}

#[test]
fn options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let f = || Target::File(File::create(dir.path().join("x.vmdk")).unwrap());
    for bad in [
        "cluster_size=64k",
        "subformat=monolithicFlat",
        "adapter_type=pvscsi",
        "hwversion=6,compat6=on",
        "hwversion=4\"x",
    ] {
        let o = WriteOptions::parse(bad, false).unwrap();
        assert!(create(Format::Vmdk, &o, f(), 1 << 20).is_err(), "{bad}");
    }
    let o = WriteOptions::parse("compat6=on,adapter_type=buslogic", false).unwrap();
    assert!(create(Format::Vmdk, &o, f(), 1 << 20).is_ok());
    // qemu cannot open a zero-capacity VMDK (it takes it for a descriptor file).
    assert!(create(Format::Vmdk, &WriteOptions::default(), f(), 0).is_err());
    // monolithicSparse needs to seek.
    let pipe = Target::Stream(Box::new(Shared::default()));
    assert!(create(Format::Vmdk, &WriteOptions::default(), pipe, 1 << 20).is_err());
}

#[test]
fn a_whole_empty_grain_table_in_the_middle() {
    // 80 MiB + 512: data in the first and last MiB only, so the grain tables covering
    // 32..64 MiB are empty (left out of a stream, GD entry 0).
    let mut data = vec![0u8; (80 << 20) + 512];
    let n = data.len();
    data[..1 << 20].copy_from_slice(&source(1 << 20, 7));
    data[n - (1 << 20)..].copy_from_slice(&source(1 << 20, 8));
    for sub in ["monolithicSparse", "streamOptimized"] {
        round_trip_data(data.clone(), sub);
    }
}
