//! The test kit glimpse's suites share, so that each helper exists once:
//!
//! - [`qemu`]: qemu-img as the referee (run, `info` JSON, `convert`, `compare`, `check`,
//!   `map`). A missing qemu-img fails the test loudly; nothing here ever skips.
//! - [`hostile`]: the hostile-fixture runner. Each `fixtures/hostile/<format>/` folder holds an
//!   `expected-codes` file (one line per fixture: `file-name code [code ...]`), and one call
//!   checks every fixture of a folder against it.
//! - [`walk`]: the harness that opens an image, walks its whole mapping asserting the
//!   `mapping` contract on every extent, and reads what it maps. The fuzz targets and the
//!   regression replay (`formats/tests/regression.rs`) both run it.
//!
//! Everything here panics on a failure: it is test code, and a panic is how a test (or
//! libFuzzer) learns that something broke.

pub mod hostile;
pub mod qemu;
pub mod walk;

use std::path::{Path, PathBuf};

/// The workspace's `fixtures/` folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}
