//! Fuzz target `check`: the whole policy, `policy::inspect` (detect, open, findings, `check`,
//! the verdict) with the default `Policy` and `Limits::tight()`, then the JSON that
//! `glimpse check --output json` would print.
//!
//! Seed corpus: `fuzz/seeds.sh` writes it to `fuzz/corpus/check/`: the union of the seed
//! corpora of every per-format target (the small images and their cut-down copies), plus raw
//! disks with an MBR and a GPT.

#![no_main]

use glimpse_formats::policy::{inspect, Policy, Verdict};
use glimpse_formats::{Limits, Severity};
use glimpse_fuzz::source;
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    let report = match inspect(source(data), &Policy::default(), &Limits::tight()) {
        Ok(r) => r,
        // Only I/O errors escape `inspect`, and memory cannot fail to read.
        Err(e) => panic!("inspect on memory failed: {e}"),
    };
    let rejects = report
        .findings
        .iter()
        .any(|f| f.severity == Severity::Reject);
    assert_eq!(report.verdict() == Verdict::Reject, rejects);
    // An image that could not be opened must say why, as a rejecting finding.
    if report.image.is_none() {
        assert!(rejects, "open failed without a rejecting finding");
    }
    serde_json::to_string(&report.findings).expect("findings serialise");
    if let Some(info) = report.info() {
        serde_json::to_string(info).expect("info serialises");
    }
    Corpus::Keep
});
