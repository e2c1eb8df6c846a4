//! Helpers shared by the subcommands.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use glimpse_formats::Source;

/// `--output human|json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A readable Field/Value table.
    #[default]
    Human,
    /// Machine-readable JSON.
    Json,
}

/// Opens `path` read-only as a shared positional source.
pub fn open_source(path: &Path) -> anyhow::Result<Source> {
    let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    Ok(Arc::new(f))
}

/// Parses a size such as `10G`, `512M` or `1099511627776` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    glimpse_convert::parse_size(s).ok_or_else(|| format!("{s:?} is not a size (use a number with an optional k, M, G or T suffix)"))
}
