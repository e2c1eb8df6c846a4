//! The metadata log: glimpse only decides whether it holds entries.
//!
//! A log with entries means the last writer did not finish: the BAT and metadata on disk may
//! be older than what the log says. qemu replays the log when it opens a file read-write and
//! refuses a read-only open. glimpse never writes to its input, so it cannot replay, and it
//! will not read guest data through metadata the log says is stale.

use super::header::{Guid, Header, NIL_GUID};
use crate::error::{Error, Result};
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
    check_fields(h)?;
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

/// A log's length is a whole number of these (block/vhdx.h, `VHDX_LOG_MIN_SIZE`).
const LOG_LENGTH_UNIT: u64 = 1 << 20;

/// The current header's log fields as qemu checks them before it opens the file at all
/// (block/vhdx-log.c, `vhdx_parse_log`): the log version must be 0, and a log that a GUID
/// names must be a whole number of MiB long. (Its offset is placed with the regions.)
///
/// # Errors
/// `Invalid` (`vhdx.log`) at the field.
fn check_fields(h: &Header) -> Result<()> {
    let bad = |m: String, at: u64| {
        Err(Error::invalid(m)
            .at(h.offset.saturating_add(at))
            .code("vhdx.log"))
    };
    if h.log_version != 0 {
        return bad(
            format!(
                "log version {} (only 0 exists): qemu refuses to open the file",
                h.log_version
            ),
            64,
        );
    }
    if h.log_guid != NIL_GUID && u64::from(h.log_length) % LOG_LENGTH_UNIT != 0 {
        return bad(
            format!(
                "a log of {} bytes is not a whole number of MiB: qemu refuses to open the file",
                h.log_length
            ),
            68,
        );
    }
    Ok(())
}

fn has_entry(buf: &[u8], guid: &Guid) -> bool {
    buf.chunks(LOG_SECTOR_BYTES)
        .any(|s| s.get(..4) == Some(&LOG_SIGNATURE[..]) && s.get(32..48) == Some(&guid[..]))
}
