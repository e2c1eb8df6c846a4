//! Replays every input under `fixtures/regression/<format>/` (fuzzer finds named
//! `<kind>-<sha1>`, and the hand-made `sample-*` files) through the same paths the fuzz targets
//! take: detection, `open` under `Limits::tight()` for every detected format and for the
//! folder's format, a bounded walk of the whole mapping that asserts the `mapping` contract,
//! guest reads of every non-zero extent, `check`, and `policy::inspect`. Results may be errors;
//! a panic or a broken contract fails the test, naming the file.
//!
//! So CI guards against every fuzz finding on stable, without a fuzzer.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::{
    detect, open, validate_extent, ExtentKind, Format, Image, Limits, Severity, Source,
};

/// The same bounds as the fuzz `reader` target (fuzz/src/lib.rs `READER`).
const MAX_CALLS: u64 = 100_000;
const MAX_READ: u64 = 16 << 20;
const MAX_READ_PER_CALL: u64 = 1 << 20;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/regression")
}

/// Every replayable input, with the format its folder names. Folders must be format names;
/// files at the top level (README, the sample generator) are not inputs.
fn inputs() -> Vec<(Format, PathBuf)> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root())
        .expect("fixtures/regression exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for dir in dirs {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("UTF-8 folder name")
            .to_string();
        let format: Format = name
            .parse()
            .unwrap_or_else(|_| panic!("fixtures/regression/{name} is not named after a format"));
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .expect("readable folder")
            .map(|e| e.expect("readable entry").path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "fixtures/regression/{name} is empty: the replay would test nothing"
        );
        out.extend(files.into_iter().map(|f| (format, f)));
    }
    out
}

/// Asserts the `mapping` contract for one extent.
fn check_extent(image: &dyn Image, e: &glimpse_formats::Extent, guest: u64, max_len: u64) {
    let vsize = image.info().virtual_size;
    if let Err(err) = validate_extent(e, guest, max_len, vsize) {
        panic!("mapping contract broken: {err}");
    }
    if let ExtentKind::Compressed {
        skip, unit_size, ..
    } = e.kind
    {
        assert!(
            skip.checked_add(e.len).is_some_and(|end| end <= unit_size),
            "compressed extent passes its unit's end: {e:?}"
        );
    }
}

/// Walks the whole mapping (bounded) and reads every non-zero extent; then runs `check`.
fn walk(image: Arc<dyn Image>, limits: &Limits) {
    let vsize = image.info().virtual_size;
    serde_json::to_string(image.info()).expect("info serialises");
    assert!(
        image.mapping(vsize, 1).is_err(),
        "mapping at the virtual size must fail"
    );
    let reader = GuestReader::new(image.clone(), limits);
    let (mut pos, mut calls, mut read) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    while pos < vsize && calls < MAX_CALLS {
        let want = vsize - pos;
        let Ok(e) = image.mapping(pos, want) else {
            break;
        };
        calls += 1;
        check_extent(image.as_ref(), &e, pos, want);
        if !e.reads_as_zero() && read < MAX_READ {
            let n = e.len.min(MAX_READ_PER_CALL).min(MAX_READ - read);
            buf.clear();
            buf.resize(usize::try_from(n).expect("small read"), 0);
            let _ = reader.read_at(&mut buf, pos);
            read += n;
        }
        pos = e.end();
    }
    let _ = image.check(limits);
}

/// One input through every path the fuzz targets take.
fn replay(folder: Format, data: &[u8]) {
    let limits = Limits::tight();
    let src: Source = Arc::new(data.to_vec());
    let det = detect(src.as_ref()).expect("detection reads memory");
    let mut formats = det.matches.clone();
    if !formats.contains(&folder) {
        formats.push(folder);
    }
    for f in formats {
        if let Ok(img) = open(src.clone(), f, &limits) {
            walk(Arc::from(img), &limits);
        }
    }
    let report = inspect(src, &Policy::default(), &limits).expect("inspect reads memory");
    let rejects = report
        .findings
        .iter()
        .any(|f| f.severity == Severity::Reject);
    assert_eq!(report.verdict() == Verdict::Reject, rejects);
    if report.image.is_none() {
        assert!(rejects, "open failed without a rejecting finding");
    }
}

#[test]
fn every_format_folder_holds_inputs() {
    let inputs = inputs();
    for f in [
        Format::Qcow2,
        Format::Vmdk,
        Format::Vhd,
        Format::Vhdx,
        Format::Vdi,
        Format::Iso,
        Format::Ova,
        Format::Luks,
        Format::Raw,
    ] {
        assert!(
            inputs.iter().any(|(g, _)| *g == f),
            "no regression input for {f}"
        );
    }
}

#[test]
fn regression_inputs_replay_without_panics() {
    let mut failed = Vec::new();
    let inputs = inputs();
    for (format, path) in &inputs {
        let data = fs::read(path).expect("readable input");
        // The input, and two truncated prefixes of it: a find often sits right at a boundary.
        let lens = [data.len(), data.len() / 2, data.len().saturating_sub(1)];
        for len in lens {
            let prefix = &data[..len];
            if catch_unwind(AssertUnwindSafe(|| replay(*format, prefix))).is_err() {
                failed.push(format!("{} (first {len} bytes)", path.display()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} regression inputs panicked:\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
}
