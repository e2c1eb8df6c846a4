//! `glimpse check`. (Stub.)

/// Arguments of `glimpse check`.
#[derive(clap::Args)]
pub struct Args {
    /// Image files.
    files: Vec<std::path::PathBuf>,
}

/// Runs the command; returns the exit code.
pub fn run(_args: Args) -> anyhow::Result<u8> {
    anyhow::bail!("check is not implemented yet")
}
