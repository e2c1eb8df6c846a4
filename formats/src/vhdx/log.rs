//! The metadata log: glimpse only decides whether it holds entries.
//!
//! A log with entries means the last writer did not finish: the BAT and metadata on disk may
//! be older than what the log says. qemu replays the log when it opens a file read-write and
//! refuses a read-only open. glimpse never writes to its input, so it cannot replay, and it
//! will not read guest data through metadata the log says is stale.

use super::header::{Guid, Header, NIL_GUID};
use crate::error::Result;
use crate::io::{read_vec, ReadAt};
use crate::limits::Budget;

/// "loge": log entry signature.
pub const LOG_SIGNATURE: &[u8; 4] = b"loge";
/// Log entries start on 4 KiB boundaries inside the log.
pub const LOG_SECTOR: u64 = 4096;
/// [`LOG_SECTOR`] as a slice length.
const LOG_SECTOR_BYTES: usize = 4096;
/// Bytes of the log read at a time.
const PIECE: u64 = 1 << 20;
/// Logs larger than this are not scanned; with a non-zero log GUID they count as non-empty.
const MAX_SCAN: u64 = 64 << 20;

/// True when the log may hold entries: the header names a log GUID and some 4 KiB sector of
/// the log starts an entry header ("loge") carrying that GUID. This is stricter than qemu,
/// which also checks each entry's checksum and sequence: any entry-looking sector counts.
///
/// # Errors
/// `Truncated` when the log passes the end of the file (the caller checked it is inside);
/// `LimitExceeded` when the budget is spent; `Io` on read errors.
pub fn non_empty(src: &dyn ReadAt, h: &Header, budget: &Budget) -> Result<bool> {
    if h.log_guid == NIL_GUID || h.log_length == 0 {
        return Ok(false);
    }
    let len = u64::from(h.log_length);
    if len > MAX_SCAN {
        return Ok(true);
    }
    let mut pos = 0u64;
    while pos < len {
        let n = PIECE.min(len.saturating_sub(pos));
        let buf = read_vec(src, h.log_offset.saturating_add(pos), n, budget, "log")?;
        budget.give_back(n);
        if has_entry(&buf, &h.log_guid) {
            return Ok(true);
        }
        pos = pos.saturating_add(n);
    }
    Ok(false)
}

fn has_entry(buf: &[u8], guid: &Guid) -> bool {
    buf.chunks(LOG_SECTOR_BYTES)
        .any(|s| s.get(..4) == Some(&LOG_SIGNATURE[..]) && s.get(32..48) == Some(&guid[..]))
}
