//! The bounded windows of a source that format detectors look at.
//!
//! Every format's `probe` takes a [`Probe`]; [`crate::detect`] builds one and calls every
//! format. Keeping `Probe` here, apart from `detect`, means the formats depend on this small
//! module and not on the detector that depends on them.

use crate::error::Result;
use crate::io::{read_up_to, ReadAt};

/// Bytes read from the start of the source.
pub const HEAD_LEN: usize = 64 * 1024;
/// Bytes read from the end of the source.
pub const TAIL_LEN: usize = 512;
/// Bytes read from the end of the source for trailers searched near the end (DMG).
pub const TRAILER_LEN: usize = 1024;
/// The start of the file as qemu's probes see it (`BLOCK_PROBE_BUF_SIZE` is 512; 2 KiB covers
/// every qemu version): read with zeros past the end of a shorter file, because qemu's file
/// driver returns zeros for a read past EOF. [`Probe::starts_with`] and [`Probe::head_at`]
/// compare magic numbers within it exactly as `bdrv_probe_all` does, so a 3-byte file `QED`
/// is QED to both (report wild-diff F2).
pub const QEMU_PROBE_LEN: usize = 2048;

/// The bounded windows a detector may look at.
pub struct Probe<'a> {
    /// The first `HEAD_LEN` bytes (fewer for short files).
    pub head: Vec<u8>,
    /// The last `TAIL_LEN` bytes (fewer for short files; empty for empty files).
    pub tail: Vec<u8>,
    /// The last `TRAILER_LEN` bytes (fewer for short files).
    pub trailer: Vec<u8>,
    /// The source's size.
    pub size: u64,
    /// The source, for detectors that must walk a bounded chain of headers (tar).
    pub src: &'a dyn ReadAt,
    /// The first [`QEMU_PROBE_LEN`] bytes, zero-padded past the end of a shorter file.
    padded: Vec<u8>,
}

impl<'a> Probe<'a> {
    /// Reads the windows.
    ///
    /// # Errors
    /// `Io` when the source cannot be read.
    pub fn new(src: &'a dyn ReadAt) -> Result<Self> {
        let size = src.size()?;
        let head = read_up_to(src, 0, HEAD_LEN)?;
        let tail_len = usize::try_from(size.min(TAIL_LEN as u64)).unwrap_or(TAIL_LEN);
        let trailer_len = usize::try_from(size.min(TRAILER_LEN as u64)).unwrap_or(TRAILER_LEN);
        let trailer = read_up_to(src, size.saturating_sub(trailer_len as u64), trailer_len)?;
        let tail = trailer
            .get(trailer.len().saturating_sub(tail_len)..)
            .unwrap_or_default()
            .to_vec();
        let mut padded = head.get(..QEMU_PROBE_LEN).unwrap_or(&head).to_vec();
        padded.resize(QEMU_PROBE_LEN, 0);
        Ok(Probe {
            head,
            tail,
            trailer,
            size,
            src,
            padded,
        })
    }

    /// `len` bytes of the head at `offset`: within the first [`QEMU_PROBE_LEN`] bytes as qemu
    /// sees them (zeros past the end of the file), past them if the head has them.
    pub fn head_at(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end <= QEMU_PROBE_LEN {
            return self.padded.get(offset..end);
        }
        self.head.get(offset..end)
    }

    /// True when the head starts with `magic`, compared as qemu compares it: a file shorter
    /// than `magic` whose missing bytes are NULs in `magic` matches.
    pub fn starts_with(&self, magic: &[u8]) -> bool {
        if magic.len() <= QEMU_PROBE_LEN {
            return self.padded.starts_with(magic);
        }
        self.head.starts_with(magic)
    }
}
