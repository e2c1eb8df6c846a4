//! Replays every input under `fixtures/regression/<format>/` (fuzzer finds named
//! `<kind>-<sha1>`, and the hand-made `sample-*` files) through the same paths the fuzz targets
//! take: detection, `open` under `Limits::tight()` for every detected format and for the
//! folder's format, a bounded walk of the whole mapping that asserts the `mapping` contract,
//! guest reads of every non-zero extent, `check`, and `policy::inspect`. Results may be errors;
//! a panic or a broken contract fails the test, naming the file. The walk is the fuzz
//! targets' own harness (`glimpse_testkit::walk`), with the `reader` target's bounds.
//!
//! So CI guards against every fuzz finding on stable, without a fuzzer.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use glimpse_formats::Format;
use glimpse_testkit::walk::replay;

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
