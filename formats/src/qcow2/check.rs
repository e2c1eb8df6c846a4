//! Structural check: recount every host cluster's references and compare them with the
//! stored refcounts, as `qemu-img check` does (refcount < references is a corruption,
//! refcount > references a leak).
//!
//! Memory is one `u16` count and one metadata bit per host cluster of the file, charged to
//! the budget. Each distinct L2 table is read once (shared tables count once per
//! reference), so the work is bounded by the file's metadata, not the virtual size.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::io::read_vec;
use crate::limits::{Budget, Limits};
use crate::table::{check_table, TableSpec};

use super::header::{self, MAX_SNAPSHOTS};
use super::refcount::{self, REFT_OFFSET_MASK};
use super::table::{self, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use super::Qcow2Image;

/// Findings of one code reported individually before they are summarised.
const PER_CODE: usize = 8;

/// qemu's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;

struct Counts {
    cluster_bits: u32,
    /// References per host cluster (saturating).
    refs: Vec<u16>,
    /// Clusters holding metadata (header, tables).
    meta: Vec<u64>,
    findings: Vec<Finding>,
    per_code: BTreeMap<&'static str, u64>,
}

impl Counts {
    fn report(&mut self, f: Finding) {
        let n = self.per_code.entry(f.code).or_insert(0);
        *n += 1;
        if *n <= PER_CODE as u64 {
            self.findings.push(f);
        }
    }

    /// Adds `times` references to every cluster overlapping `[start, start+len)`. False when
    /// part of the range lies past the counted clusters.
    fn inc(&mut self, start: u64, len: u64, times: u16, meta: bool) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last) = start.checked_add(len - 1) else {
            return false;
        };
        let (a, b) = (start >> self.cluster_bits, last >> self.cluster_bits);
        if b >= self.refs.len() as u64 {
            return false;
        }
        for c in a..=b {
            let i = usize::try_from(c).unwrap_or(usize::MAX);
            if let Some(r) = self.refs.get_mut(i) {
                *r = r.saturating_add(times);
            }
            if meta {
                if let Some(w) = self.meta.get_mut(i / 64) {
                    *w |= 1 << (i % 64);
                }
            }
        }
        true
    }

    fn is_meta(&self, host: u64) -> bool {
        let i = usize::try_from(host >> self.cluster_bits).unwrap_or(usize::MAX);
        self.meta
            .get(i / 64)
            .is_some_and(|w| (w >> (i % 64)) & 1 == 1)
    }
}

/// Stored refcounts, read one refcount block at a time.
struct Stored<'a> {
    img: &'a Qcow2Image,
    budget: &'a Budget,
    blocks: &'a [u64],
    epb: u64,
    cur: Option<(u64, Vec<u8>)>,
}

impl Stored<'_> {
    fn get(&mut self, cluster: u64) -> Result<u64> {
        let block_off = usize::try_from(cluster / self.epb)
            .ok()
            .and_then(|i| self.blocks.get(i))
            .copied()
            .unwrap_or(0);
        if block_off == 0 {
            return Ok(0);
        }
        if self.cur.as_ref().is_none_or(|(o, _)| *o != block_off) {
            if let Some((_, old)) = self.cur.take() {
                self.budget.give_back(old.len() as u64);
            }
            let cs = self.img.geo.cluster_size();
            let b = read_vec(
                self.img.src.as_ref(),
                block_off,
                cs,
                self.budget,
                "refcount block",
            )?;
            self.cur = Some((block_off, b));
        }
        let order = self.img.header.refcount_order;
        Ok(self
            .cur
            .as_ref()
            .map(|(_, b)| refcount::get(b, cluster % self.epb, order))
            .unwrap_or(0))
    }
}

impl Drop for Stored<'_> {
    fn drop(&mut self) {
        if let Some((_, old)) = self.cur.take() {
            self.budget.give_back(old.len() as u64);
        }
    }
}

fn alloc<T: Clone>(n: u64, v: T, budget: &Budget, bytes_each: u64, what: &str) -> Result<Vec<T>> {
    budget.take(n.saturating_mul(bytes_each), what)?;
    let n = usize::try_from(n).map_err(|_| Error::limit(format!("{what}: too large")))?;
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| Error::limit(format!("{what}: cannot allocate")))?;
    out.resize(n, v);
    Ok(out)
}

fn l1_entries(raw: &[u8]) -> impl Iterator<Item = (u64, u64)> + '_ {
    raw.chunks_exact(8)
        .enumerate()
        .map(|(i, c)| (i as u64 * 8, table::be64(c, 0)))
}

/// Runs the structural check.
///
/// # Errors
/// `Io` on read errors; `LimitExceeded` when the metadata does not fit the budget.
pub fn check(img: &Qcow2Image, limits: &Limits) -> Result<Vec<Finding>> {
    let h = &img.header;
    let src = img.src.as_ref();
    let budget = limits.budget();
    let cs = img.geo.cluster_size();
    let cb = img.geo.cluster_bits;
    let file_size = img.file_size;
    // Two clusters of slack: the last compressed cluster's final sector may lie past the
    // end of the file while its cluster is still refcounted.
    let nb = file_size.div_ceil(cs).saturating_add(2);
    let refs = alloc(nb, 0u16, &budget, 2, "refcount check")?;
    let meta = alloc(nb.div_ceil(64), 0u64, &budget, 8, "refcount check")?;
    let mut c = Counts {
        cluster_bits: cb,
        refs,
        meta,
        findings: Vec::new(),
        per_code: BTreeMap::new(),
    };
    let mut skip_leaks = false;

    c.inc(0, cs, 1, true);
    // Active L1.
    let l1_len = u64::from(h.l1_size) * 8;
    c.inc(h.l1_table_offset, l1_len, 1, true);
    // Refcount table.
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    c.inc(h.refcount_table_offset, rt_len, 1, true);
    let rt = read_vec(
        src,
        h.refcount_table_offset,
        rt_len,
        &budget,
        "refcount table",
    )?;
    let mut blocks: Vec<u64> = Vec::new();
    for (i, e) in l1_entries(&rt) {
        let off = e & REFT_OFFSET_MASK;
        blocks.push(0);
        if off == 0 {
            continue;
        }
        let at = h.refcount_table_offset.saturating_add(i);
        if off % cs != 0 {
            c.report(
                Finding::reject(
                    "table.misaligned",
                    format!("refcount block at {off:#x} is not cluster aligned"),
                )
                .at(at),
            );
            continue;
        }
        if off.checked_add(cs).is_none_or(|e| e > file_size) || !c.inc(off, cs, 1, true) {
            c.report(
                Finding::reject(
                    "table.out-of-bounds",
                    format!("refcount block at {off:#x} lies past the end of the file"),
                )
                .at(at),
            );
            continue;
        }
        if let Some(last) = blocks.last_mut() {
            *last = off;
        }
    }

    let epb = refcount::entries_per_block(h.cluster_bits, h.refcount_order);
    let mut stored = Stored {
        img,
        budget: &budget,
        blocks: &blocks,
        epb,
        cur: None,
    };
    // qemu's check_oflag_copied: bit 63 of active L1/L2 entries must say "refcount is 1".
    let copied_checked = h.incompatible_features & super::header::INCOMPAT_DATA_FILE == 0;

    // Encryption header clusters.
    if let Some((off, len)) = img.ext.crypto {
        if !c.inc(off, len, 1, true) {
            c.report(
                Finding::reject(
                    "table.out-of-bounds",
                    "the encryption header lies past the end of the file",
                )
                .at(off),
            );
        }
    }
    // Persistent bitmaps: the directory, each bitmap table and its data clusters. When they
    // cannot be walked, their clusters would look leaked, so leaks are not reported.
    if let Some((nb, dir_size, dir_off)) = img.ext.bitmaps {
        if let Err(f) = bitmaps(img, limits, &budget, &mut c, nb, dir_size, dir_off)? {
            c.report(f);
            skip_leaks = true;
        }
    }

    // L1 tables: the active one and every snapshot's.
    let mut l1s: Vec<(u64, Vec<u8>)> = Vec::new();
    l1s.push((
        h.l1_table_offset,
        read_vec(src, h.l1_table_offset, l1_len, &budget, "L1 table")?,
    ));
    if h.nb_snapshots > 0 {
        snapshots(img, limits, &budget, &mut c, &mut l1s)?;
    }

    // Pass 1: L2 tables (metadata), counted once per referencing L1 entry.
    let mut l2s: BTreeMap<u64, u16> = BTreeMap::new();
    let mut active = BTreeSet::new();
    for (n, (l1_off, raw)) in l1s.iter().enumerate() {
        for (i, e) in l1_entries(raw) {
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let at = l1_off.saturating_add(i);
            if off % cs != 0 {
                c.report(
                    Finding::reject(
                        "table.misaligned",
                        format!("L2 table at {off:#x} is not cluster aligned"),
                    )
                    .at(at),
                );
                continue;
            }
            if off.checked_add(cs).is_none_or(|e| e > file_size) {
                c.report(
                    Finding::reject(
                        "table.out-of-bounds",
                        format!("L2 table at {off:#x} lies past the end of the file"),
                    )
                    .at(at),
                );
                continue;
            }
            if !l2s.contains_key(&off) {
                budget.take(32, "list of L2 tables")?;
            }
            let m = l2s.entry(off).or_insert(0);
            *m = m.saturating_add(1);
            c.inc(off, cs, 1, true);
            if n == 0 {
                active.insert(off);
                let rc = stored.get(off >> cb)?;
                if copied_checked && (rc == 1) != (e & OFLAG_COPIED != 0) {
                    c.report(
                        Finding::reject(
                            "qcow2.copied-flag",
                            format!(
                                "L1 entry for L2 table {off:#x} disagrees with its refcount {rc}"
                            ),
                        )
                        .at(at),
                    );
                }
            }
        }
    }

    // Pass 2: data clusters, each distinct L2 table read once.
    // Each distinct L2 table lies in its own cluster of the file, so this reads at most the
    // file once.
    for (&l2_off, &times) in &l2s {
        let raw = read_vec(src, l2_off, cs, &budget, "L2 table")?;
        budget.give_back(cs);
        let is_active = active.contains(&l2_off);
        let step = usize::try_from(img.geo.l2_entry_size()).unwrap_or(8);
        for (k, e) in raw.chunks_exact(step).enumerate() {
            let entry = table::be64(e, 0);
            let bitmap = if img.geo.extended {
                table::be64(e, 8)
            } else {
                0
            };
            let at = l2_off.saturating_add((k * step) as u64);
            let (host, len) = if entry & OFLAG_COMPRESSED != 0 {
                let (host, stored) = img.geo.compressed(entry);
                (host, stored)
            } else {
                if let Err(err) = table::decode(&img.geo, entry, bitmap) {
                    c.report(
                        Finding::reject("qcow2.l2-entry-out-of-bounds", err.message().to_string())
                            .at(at),
                    );
                }
                (entry & L2E_OFFSET_MASK, cs)
            };
            let compressed = entry & OFLAG_COMPRESSED != 0;
            // With an external data file, standard clusters live in that file and are not
            // refcounted here (the spec); it is never opened, so there is nothing to check.
            if host == 0 || (!copied_checked && !compressed) {
                continue;
            }
            if !compressed && host % cs != 0 {
                c.report(
                    Finding::reject(
                        "qcow2.l2-entry-out-of-bounds",
                        format!("data cluster {host:#x} is not cluster aligned"),
                    )
                    .at(at),
                );
                continue;
            }
            if host >= file_size {
                c.report(
                    Finding::reject(
                        "qcow2.l2-entry-out-of-bounds",
                        format!(
                            "{} cluster at {host:#x} lies past the end of the file",
                            if compressed { "compressed" } else { "data" }
                        ),
                    )
                    .at(at),
                );
                continue;
            }
            if is_active && copied_checked && !compressed {
                let rc = stored.get(host >> cb)?;
                if (rc == 1) != (entry & OFLAG_COPIED != 0) {
                    c.report(
                        Finding::reject(
                            "qcow2.copied-flag",
                            format!("L2 entry for data cluster {host:#x} disagrees with its refcount {rc}"),
                        )
                        .at(at),
                    );
                }
            }
            let last = host.saturating_add(len.max(1) - 1);
            if c.is_meta(host) || c.is_meta(last) {
                c.report(
                    Finding::reject(
                        "qcow2.entry-into-metadata",
                        format!("guest data at {host:#x} overlaps image metadata"),
                    )
                    .at(at),
                );
            }
            // Compressed streams count every cluster up to the end of their last sector.
            let len = if compressed { len } else { cs };
            if !c.inc(host, len, times, false) {
                c.report(
                    Finding::reject(
                        "qcow2.l2-entry-out-of-bounds",
                        format!("cluster at {host:#x} lies past the end of the file"),
                    )
                    .at(at),
                );
            }
        }
    }

    compare(img, &mut stored, &mut c, skip_leaks)?;

    for (code, n) in &c.per_code {
        if *n > PER_CODE as u64 {
            let sev = c
                .findings
                .iter()
                .find(|f| f.code == *code)
                .map(|f| f.severity);
            let msg = format!("{} more like this ({n} in all)", n - PER_CODE as u64);
            let f = match sev {
                Some(crate::finding::Severity::Warn) => Finding::warn(code, msg),
                _ => Finding::reject(code, msg),
            };
            c.findings.push(f);
        }
    }
    Ok(c.findings)
}

/// Compares stored refcounts with the counted references.
fn compare(
    img: &Qcow2Image,
    stored: &mut Stored<'_>,
    c: &mut Counts,
    skip_leaks: bool,
) -> Result<()> {
    let h = &img.header;
    let n = c.refs.len() as u64;
    let mut leaked = 0u64;
    let mut first_leak = None;
    for cluster in 0..n {
        let stored = stored.get(cluster)?;
        let counted = c
            .refs
            .get(usize::try_from(cluster).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0);
        if counted == u16::MAX && stored >= u64::from(counted) {
            continue;
        }
        let offset = cluster << h.cluster_bits;
        if stored < u64::from(counted) {
            c.report(
                Finding::reject(
                    "refcount.mismatch",
                    format!("cluster {offset:#x} has refcount {stored} but {counted} references"),
                )
                .at(offset),
            );
        } else if stored > u64::from(counted) && !skip_leaks {
            leaked += 1;
            first_leak.get_or_insert(offset);
        }
    }
    if leaked > 0 {
        let mut f = Finding::warn(
            "qcow2.leaked-clusters",
            format!("{leaked} clusters have a refcount but fewer references (leaked space)"),
        );
        f.offset = first_leak;
        c.findings.push(f);
    }
    Ok(())
}

/// Walks the snapshot table: counts its clusters and each snapshot's L1 table, and queues
/// those L1 tables for the L2 walk.
fn snapshots(
    img: &Qcow2Image,
    limits: &Limits,
    budget: &Budget,
    c: &mut Counts,
    l1s: &mut Vec<(u64, Vec<u8>)>,
) -> Result<()> {
    let h = &img.header;
    let src = img.src.as_ref();
    let cs = img.geo.cluster_size();
    let mut off = h.snapshots_offset;
    let bad = |msg: String, at: u64| Finding::reject("qcow2.snapshot-table", msg).at(at);
    for i in 0..h.nb_snapshots.min(MAX_SNAPSHOTS) {
        // Entries start 8-byte aligned; the table ends right after the last one (qemu).
        off = off.saturating_add(7) & !7;
        let Ok(fixed) = read_vec(src, off, 40, budget, "snapshot entry") else {
            c.report(bad(
                format!("snapshot {i} lies past the end of the file"),
                off,
            ));
            return Ok(());
        };
        budget.give_back(40);
        let l1_off = table::be64(&fixed, 0);
        let be32 = |at: usize| {
            fixed
                .get(at..at + 4)
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
                .map(u32::from_be_bytes)
                .unwrap_or(0)
        };
        let be16 = |at: usize| {
            fixed
                .get(at..at + 2)
                .and_then(|s| <[u8; 2]>::try_from(s).ok())
                .map(u16::from_be_bytes)
                .unwrap_or(0)
        };
        let l1_size = be32(8);
        let (id_len, name_len) = (be16(12), be16(14));
        let extra = be32(36);
        if extra > MAX_SNAPSHOT_EXTRA {
            c.report(bad(
                format!("snapshot {i} has {extra} bytes of extra data (qemu allows 1024)"),
                off,
            ));
            return Ok(());
        }
        let len = 40 + u64::from(extra) + u64::from(id_len) + u64::from(name_len);
        let entry_at = off;
        off = off.saturating_add(len);
        if off > img.file_size {
            c.report(bad(
                format!("snapshot {i} lies past the end of the file"),
                entry_at,
            ));
            return Ok(());
        }
        let spec = TableSpec {
            name: "snapshot L1 table",
            offset: l1_off,
            entries: u64::from(l1_size),
            entry_size: 8,
            align: cs,
        };
        match check_table(spec, img.file_size, limits) {
            Ok(bytes) if u64::from(l1_size) * 8 <= header::MAX_L1_BYTES => {
                c.inc(l1_off, bytes, 1, true);
                l1s.push((
                    l1_off,
                    read_vec(src, l1_off, bytes, budget, "snapshot L1 table")?,
                ));
            }
            Ok(_) => c.report(bad(
                format!("snapshot {i}'s L1 table is larger than 32 MiB"),
                entry_at,
            )),
            Err(e) => c.report(bad(format!("snapshot {i}: {}", e.message()), entry_at)),
        }
    }
    let total = off.saturating_sub(h.snapshots_offset);
    if !c.inc(h.snapshots_offset, total, 1, true) {
        c.report(bad(
            "the snapshot table lies past the end of the file".into(),
            h.snapshots_offset,
        ));
    }
    Ok(())
}

/// Counts the bitmap directory, tables and data clusters, as qemu's
/// `qcow2_check_bitmaps_refcounts` does. `Ok(Err(finding))` when they are malformed.
fn bitmaps(
    img: &Qcow2Image,
    limits: &Limits,
    budget: &Budget,
    c: &mut Counts,
    nb: u32,
    dir_size: u64,
    dir_off: u64,
) -> Result<Result<(), Finding>> {
    let cs = img.geo.cluster_size();
    let src = img.src.as_ref();
    let bad = |msg: String, at: u64| Finding::reject("qcow2.bitmaps", msg).at(at);
    let spec = TableSpec {
        name: "bitmap directory",
        offset: dir_off,
        entries: dir_size,
        entry_size: 1,
        align: cs,
    };
    if let Err(e) = check_table(
        spec,
        img.file_size,
        &Limits {
            max_table_entries: u64::MAX,
            ..*limits
        },
    ) {
        return Ok(Err(bad(e.message().to_string(), dir_off)));
    }
    let dir = read_vec(src, dir_off, dir_size, budget, "bitmap directory")?;
    c.inc(dir_off, dir_size, 1, true);
    let mut pos = 0usize;
    for i in 0..nb {
        let at = dir_off.saturating_add(pos as u64);
        let Some(e) = dir.get(pos..pos.saturating_add(24)) else {
            return Ok(Err(bad(
                format!("bitmap {i} lies past the directory's end"),
                at,
            )));
        };
        let table_off = table::be64(e, 0);
        let be32 = |k: usize| {
            e.get(k..k + 4)
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
                .map(u32::from_be_bytes)
        };
        let table_size = be32(8).unwrap_or(0);
        let name_size = e
            .get(18..20)
            .and_then(|s| <[u8; 2]>::try_from(s).ok())
            .map(u16::from_be_bytes)
            .unwrap_or(0);
        let extra = be32(20).unwrap_or(0);
        let len = 24usize
            .saturating_add(usize::try_from(extra).unwrap_or(usize::MAX))
            .saturating_add(usize::from(name_size));
        pos = pos.saturating_add(len.div_ceil(8).saturating_mul(8));
        let spec = TableSpec {
            name: "bitmap table",
            offset: table_off,
            entries: u64::from(table_size),
            entry_size: 8,
            align: cs,
        };
        let bytes = match check_table(spec, img.file_size, limits) {
            Ok(b) => b,
            Err(err) => return Ok(Err(bad(format!("bitmap {i}: {}", err.message()), at))),
        };
        let raw = read_vec(src, table_off, bytes, budget, "bitmap table")?;
        c.inc(table_off, bytes, 1, true);
        for (k, v) in l1_entries(&raw) {
            let off = v & L1E_OFFSET_MASK;
            if off != 0 && (off % cs != 0 || !c.inc(off, cs, 1, true)) {
                return Ok(Err(bad(
                    format!("bitmap {i}: data cluster {off:#x} is invalid"),
                    table_off.saturating_add(k),
                )));
            }
        }
        budget.give_back(bytes);
    }
    budget.give_back(dir_size);
    Ok(Ok(()))
}
