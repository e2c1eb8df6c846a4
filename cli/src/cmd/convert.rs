//! `glimpse convert`. (Stub.)

/// Arguments of `glimpse convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Image files.
    files: Vec<std::path::PathBuf>,
}

/// Runs the command; returns the exit code.
pub fn run(_args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("convert is not implemented yet")
}
