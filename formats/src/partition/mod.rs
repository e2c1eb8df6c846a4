//! Partition-table and boot-sector facts (MBR, GPT, FAT), reported as details of raw and
//! hybrid ISO images. (Stub: filled in by the raw/ISO work.)

use crate::finding::Finding;

/// Bytes of the head that [`describe`] looks at: the MBR, the GPT header and the first
/// GPT entries.
pub const HEAD_LEN: usize = 64 * 1024;

/// Describes the partition tables found in `head` (the first bytes of a disk of `size`
/// bytes). Returns details for `format-specific.data` and informational findings.
pub fn describe(
    _head: &[u8],
    _size: u64,
) -> (serde_json::Map<String, serde_json::Value>, Vec<Finding>) {
    (serde_json::Map::new(), Vec::new())
}
