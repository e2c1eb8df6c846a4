//! The block allocation table: one 8-byte entry per payload block, with a sector bitmap
//! entry after every `chunk_ratio` payload entries.

use crate::error::{Error, Result};
use crate::finding::{Finding, Findings};
use crate::limits::{Budget, Charge};
use crate::ranges::{Region, RegionIndex};

/// "Block not present": reads as zeros (no parent) or from the parent.
pub const NOT_PRESENT: u64 = 0;
/// "Undefined": contents undefined; qemu reads zeros.
pub const UNDEFINED: u64 = 1;
/// "Zero": reads as zeros.
pub const ZERO: u64 = 2;
/// "Unmapped" (spec 1.0): reads as zeros in qemu.
pub const UNMAPPED: u64 = 3;
/// "Unmapped" as numbered in the 0.95 draft, which qemu still accepts as zeros.
pub const UNMAPPED_V095: u64 = 5;
/// "Fully present": the whole block is stored at the entry's file offset.
pub const FULLY_PRESENT: u64 = 6;
/// "Partially present": per-sector bitmap decides between this file and the parent.
pub const PARTIALLY_PRESENT: u64 = 7;
/// Sector bitmap entry: "present" (state 6), the bitmap block is stored.
pub const SB_PRESENT: u64 = 6;

/// "lower 3 bits are the state".
pub const STATE_MASK: u64 = 7;
/// "upper 44 bits are the file offset in 1MB units": bits 20..63, already a byte offset.
pub const OFFSET_MASK: u64 = !((1 << 20) - 1);
/// "per the spec": at most 2^23 sectors per chunk, which sets the chunk ratio.
pub const MAX_SECTORS_PER_BLOCK: u64 = 1 << 23;
/// A sector bitmap block is 1 MiB.
pub const BITMAP_BLOCK_SIZE: u64 = 1 << 20;

/// Sizes derived from the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Payload block size in bytes.
    pub block_size: u64,
    /// Payload blocks per sector bitmap block: (2^23 × logical sector size) / block size.
    pub chunk_ratio: u64,
    /// Payload blocks covering the virtual disk.
    pub data_blocks: u64,
    /// BAT entries the file must have.
    pub entries: u64,
    /// Whether the file is differencing.
    pub has_parent: bool,
}

impl Geometry {
    /// Computes the geometry as qemu does (`vhdx_calc_bat_entries`). The block size is a
    /// power of two in 1 MiB..=256 MiB and the sector size 512 or 4096, so the chunk ratio is
    /// a power of two of at least 16.
    pub fn new(
        block_size: u64,
        logical_sector_size: u64,
        disk_size: u64,
        has_parent: bool,
    ) -> Self {
        let chunk_ratio = MAX_SECTORS_PER_BLOCK
            .saturating_mul(logical_sector_size)
            .checked_div(block_size)
            .unwrap_or(1)
            .max(1);
        let data_blocks = disk_size.div_ceil(block_size.max(1));
        let bitmap_blocks = data_blocks.div_ceil(chunk_ratio);
        let entries = if has_parent {
            bitmap_blocks.saturating_mul(chunk_ratio.saturating_add(1))
        } else if data_blocks == 0 {
            // qemu computes (0 - 1) >> bits in 32 bits here and wants a huge BAT for an
            // empty disk; no entry is ever used, so glimpse asks for none.
            0
        } else {
            data_blocks.saturating_add(
                data_blocks
                    .saturating_sub(1)
                    .checked_div(chunk_ratio)
                    .unwrap_or(0),
            )
        };
        Geometry {
            block_size,
            chunk_ratio,
            data_blocks,
            entries,
            has_parent,
        }
    }

    /// BAT index of payload block `block`: payload entries are interleaved with one sector
    /// bitmap entry after every `chunk_ratio` of them.
    pub fn payload_index(&self, block: u64) -> u64 {
        block.saturating_add(block.checked_div(self.chunk_ratio).unwrap_or(0))
    }

    /// True when BAT index `i` is a sector bitmap entry.
    pub fn is_bitmap(&self, i: u64) -> bool {
        i.checked_rem(self.chunk_ratio.saturating_add(1)) == Some(self.chunk_ratio)
    }
}

/// A byte range the payload must not touch, with its name for messages.
#[derive(Debug, Clone, Copy)]
pub struct Reserved<'a> {
    /// Start offset.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it is.
    pub name: &'a str,
}

/// Bytes BAT entry `i` (`state`) claims in the file, `Ok(None)` when it claims none, or
/// `Err` with the message of a `vhdx.bat-state` finding for a state not valid for that entry.
fn entry_len(
    geo: &Geometry,
    i: u64,
    state: u64,
    virtual_size: u64,
) -> std::result::Result<Option<u64>, String> {
    if geo.is_bitmap(i) {
        return match state {
            NOT_PRESENT => Ok(None),
            // qemu ignores bitmap entries of non-differencing files; a present one is still
            // held to the file's bounds and kept apart from everything else.
            SB_PRESENT => Ok(Some(BITMAP_BLOCK_SIZE)),
            _ => Err(format!(
                "BAT entry {i}: sector bitmap state {state} is not valid here"
            )),
        };
    }
    match state {
        NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED | UNMAPPED_V095 => return Ok(None),
        FULLY_PRESENT => {}
        PARTIALLY_PRESENT if geo.has_parent => {}
        _ => {
            return Err(format!(
                "BAT entry {i}: payload state {state} is not valid{}",
                if state == PARTIALLY_PRESENT {
                    " without a parent"
                } else {
                    ""
                }
            ))
        }
    }
    // qemu lets the last block end at the end of the virtual disk rather than a whole block
    // later ("QEMU created images with partial last blocks in the past").
    let block = i.saturating_sub(
        i.checked_div(geo.chunk_ratio.saturating_add(1))
            .unwrap_or(0),
    );
    let start = block.saturating_mul(geo.block_size);
    Ok(Some(
        geo.block_size
            .min(virtual_size.saturating_sub(start))
            .max(1),
    ))
}

/// Bytes charged per bad entry recorded: an index and a code.
const BAD_ENTRY_BYTES: u64 = 24;

/// What [`validate`] found: the findings for bad BAT entries and which entries they are.
/// `open` keeps it; `check` reports the findings and `mapping` refuses the entries.
#[derive(Debug)]
pub struct Validation {
    /// Rejecting findings in the order found (entries in BAT order, then shared blocks),
    /// capped per code by [`Findings`].
    pub findings: Vec<Finding>,
    /// Bad entries as (BAT index, code), sorted by index, one per index.
    bad: Vec<(u64, &'static str)>,
    /// File offset of the BAT, for the offset of an entry.
    bat_offset: u64,
    /// Budget held for `bad` as long as it lives.
    _held: Option<Charge>,
}

impl Validation {
    /// The error `mapping` gives for BAT entry `i` (payload block `block`), when it is bad:
    /// `Corrupt` with the code of the finding that rejects the entry, at the entry.
    pub fn refuse(&self, i: u64, block: u64) -> Result<()> {
        match self.bad_code(i) {
            None => Ok(()),
            Some(code) => Err(Error::corrupt(format!(
                "payload block {block} (BAT entry {i}) is rejected by check ({code})"
            ))
            .at(self.bat_offset.saturating_add(i.saturating_mul(8)))
            .code(code)),
        }
    }

    /// The code of the finding that rejects BAT entry `i`, when it is bad.
    pub fn bad_code(&self, i: u64) -> Option<&'static str> {
        self.bad
            .binary_search_by_key(&i, |&(j, _)| j)
            .ok()
            .and_then(|k| self.bad.get(k))
            .map(|&(_, code)| code)
    }

    /// True when every entry is good.
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty()
    }

    /// No bad entries (tests building an image without a file).
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Validation {
            findings: Vec::new(),
            bad: Vec::new(),
            bat_offset: 0,
            _held: None,
        }
    }
}

/// Collects the findings and bad entries of one [`validate`] run.
struct Collector {
    out: Findings,
    bad: Vec<(u64, &'static str)>,
    held: Charge,
}

impl Collector {
    /// Records a rejecting finding `code` at `at` for entry `i`.
    fn reject(&mut self, i: u64, code: &'static str, msg: String, at: u64) -> Result<()> {
        self.out.push(Finding::reject(code, msg).at(at));
        self.mark(i, code)
    }

    /// Records entry `i` as bad with `code`, charged to the budget.
    fn mark(&mut self, i: u64, code: &'static str) -> Result<()> {
        self.held.grow(BAD_ENTRY_BYTES, "VHDX bad BAT entries")?;
        self.bad
            .try_reserve(1)
            .map_err(|_| Error::limit("BAT: cannot allocate the bad-entry list"))?;
        self.bad.push((i, code));
        Ok(())
    }
}

/// Checks every BAT entry: states, file offsets against the file size and the metadata
/// structures, and that no two blocks share host bytes. A bad entry is not an error: it is
/// a finding (`vhdx.bat-state`, `vhdx.bat-entry-out-of-bounds`, `vhdx.entry-into-metadata`,
/// `vhdx.duplicate-block`, each at the entry's offset) and a mark on the entry.
///
/// # Errors
/// `LimitExceeded` when the offset or bad-entry lists cannot be allocated or `budget` cannot
/// hold them.
pub fn validate(
    bat: &[u64],
    geo: &Geometry,
    bat_offset: u64,
    virtual_size: u64,
    file_size: u64,
    reserved: &[Reserved<'_>],
    budget: &Budget,
) -> Result<Validation> {
    let reserved = RegionIndex::new(
        reserved
            .iter()
            .map(|r| Region::new(r.name, r.start, r.len))
            .collect(),
    );
    let mut c = Collector {
        out: Findings::new(),
        bad: Vec::new(),
        held: budget.charge(0, "VHDX bad BAT entries")?,
    };
    let mut used: Vec<(u64, u64, u64)> = Vec::new();
    let mut held = budget.charge(0, "BAT offset list")?;
    for (i, &entry) in bat.iter().enumerate() {
        let i = i as u64;
        let at = bat_offset.saturating_add(i.saturating_mul(8));
        let host = entry & OFFSET_MASK;
        let len = match entry_len(geo, i, entry & STATE_MASK, virtual_size) {
            Ok(Some(len)) => len,
            Ok(None) => continue,
            Err(msg) => {
                c.reject(i, "vhdx.bat-state", msg, at)?;
                continue;
            }
        };
        if host.checked_add(len).is_none_or(|end| end > file_size) {
            let msg = format!(
                "BAT entry {i}: block of {len} bytes at {host:#x} passes the end of the file ({file_size} bytes)"
            );
            c.reject(i, "vhdx.bat-entry-out-of-bounds", msg, at)?;
            continue;
        }
        // qemu checks overlap with the whole block size, even for a short last block.
        let span = if geo.is_bitmap(i) {
            len
        } else {
            geo.block_size
        };
        if let Some(r) = reserved.hit(host, host.saturating_add(span)) {
            let msg = format!(
                "BAT entry {i}: block at {host:#x} overlaps the {} at {:#x}",
                r.name, r.start
            );
            c.reject(i, "vhdx.entry-into-metadata", msg, at)?;
            continue;
        }
        held.grow(24, "BAT offset list")?;
        used.try_reserve(1)
            .map_err(|_| Error::limit("BAT: cannot allocate the offset list"))?;
        used.push((host, len, i));
    }
    shared_blocks(&mut used, bat_offset, &mut c)?;
    drop((used, held));
    let Collector { out, mut bad, held } = c;
    // Stable: an entry's own code comes before any sharing code, and is the one kept.
    bad.sort_by_key(|&(i, _)| i);
    bad.dedup_by_key(|&mut (i, _)| i);
    Ok(Validation {
        findings: out.finish(),
        bad,
        bat_offset,
        _held: Some(held),
    })
}

/// Reports every pair of the `(host, len, index)` blocks that share host bytes: a finding
/// (`vhdx.duplicate-block`) at the later entry's offset, and both entries marked bad.
fn shared_blocks(used: &mut [(u64, u64, u64)], bat_offset: u64, c: &mut Collector) -> Result<()> {
    used.sort_unstable();
    // The block reaching furthest so far: a long block can cover several later ones.
    let mut reach: Option<(u64, u64)> = None;
    for &(b, blen, bi) in used.iter() {
        let end = b.saturating_add(blen);
        match reach {
            Some((a_end, ai)) if b < a_end => {
                let msg = format!("BAT entries {ai} and {bi} share host bytes at {b:#x}");
                let at = bat_offset.saturating_add(bi.saturating_mul(8));
                c.reject(bi, "vhdx.duplicate-block", msg, at)?;
                c.mark(ai, "vhdx.duplicate-block")?;
                if end > a_end {
                    reach = Some((end, bi));
                }
            }
            _ => reach = Some((end, bi)),
        }
    }
    Ok(())
}
