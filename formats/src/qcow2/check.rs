//! Structural check: recount every host cluster's references and compare them with the
//! stored refcounts, as `qemu-img check` does (refcount < references is a corruption,
//! refcount > references a leak), and compare every metadata structure's clusters with every
//! other's, as qemu's overlap checks (`QCOW2_OL_*`) do before each write.
//!
//! The work is linear in the metadata: each distinct L1 and L2 table is read once (shared
//! tables are counted once, `times` over), refcount blocks are read in one sequential pass at
//! the end that visits only the referenced clusters one by one (the others are settled by a
//! count of each distinct block's non-zero entries), and what the COPIED flags claim is
//! recorded per cluster and checked in that same pass. Memory is a page of counters per
//! touched run of clusters (see [`Counts`]), one record per distinct L2 table and per other
//! metadata structure, all charged to the image's budget.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::finding::{Finding, Findings};
use crate::io::read_vec;
use crate::limits::{Budget, Charge, Limits};
use crate::table::{check_table, read_entries, TableSpec};

use super::bitmap;
use super::counts::{Counts, COUNT_MAX, F_COPIED, F_SHARED};
use super::header::{self, BitmapsExt, MAX_SNAPSHOTS};
use super::refcount::{self, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use super::table::{
    self, be16, be32, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK,
    OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO, SECTOR,
};
use super::Qcow2Image;

/// qemu's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;

/// The spec: version 3 snapshot entries carry extra data at least up to byte 55
/// (`vm_state_size_large` and `disk_size`); qemu-img check calls a shorter one incomplete.
const MIN_V3_SNAPSHOT_EXTRA: u32 = 16;

/// Budget charged per metadata record and per distinct L2 table.
const RECORD_BYTES: u64 = 32;

/// What a metadata range holds: qemu's overlap classes, plus the bitmap structures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Header,
    ActiveL1,
    RefTable,
    RefBlock,
    SnapTable,
    SnapL1,
    L2,
    Crypto,
    BitmapDir,
    BitmapTable,
    BitmapData,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Header => "the header",
            Kind::ActiveL1 => "the active L1 table",
            Kind::RefTable => "the refcount table",
            Kind::RefBlock => "a refcount block",
            Kind::SnapTable => "the snapshot table",
            Kind::SnapL1 => "a snapshot L1 table",
            Kind::L2 => "an L2 table",
            Kind::Crypto => "the encryption header",
            Kind::BitmapDir => "the bitmap directory",
            Kind::BitmapTable => "a bitmap table",
            Kind::BitmapData => "a bitmap data cluster",
        }
    }
}

/// One metadata structure: host clusters `[start, end)`, its kind and its byte offset (the
/// two together name the structure: a table referenced twice is one structure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Meta {
    start: u64,
    end: u64,
    kind: Kind,
    off: u64,
}

/// One distinct L2 table.
#[derive(Debug, Clone, Copy)]
struct L2Ref {
    off: u64,
    times: u16,
    active: bool,
}

/// The state of one check.
struct Walk<'a> {
    img: &'a Qcow2Image,
    limits: &'a Limits,
    budget: &'a Budget,
    counts: Counts<'a>,
    rep: Findings,
    /// Budget held by the records below (metadata, L2 tables, runs, refcount blocks).
    held: Charge,
    metas: Vec<Meta>,
    /// L2 tables: `l2s[..l2s_sorted]` is sorted with one record per table, the rest as the L1
    /// walks queued them (see [`Walk::compact_l2s`]).
    l2s: Vec<L2Ref>,
    l2s_sorted: usize,
    /// Disjoint, sorted union of `metas` (L2 tables are looked up in `l2s`).
    meta_runs: Vec<(u64, u64)>,
    /// Stored refcount blocks by refcount-table index (0: none).
    blocks: Vec<u64>,
    skip_leaks: bool,
    /// False with an external data file: data clusters are not refcounted here.
    copied_checked: bool,
}

/// Runs the structural check, drawing on the image's budget (the one `open` used): every
/// table and record it holds is charged until dropped, so all of it comes back.
///
/// # Errors
/// `Io` on read errors; `LimitExceeded` when the metadata does not fit the budget.
pub fn check(img: &Qcow2Image, limits: &Limits) -> Result<Vec<Finding>> {
    let h = &img.header;
    let cs = img.geo.cluster_size();
    let clusters = img.file_size.div_ceil(cs);
    let mut w = Walk {
        img,
        limits,
        budget: &img.budget,
        counts: Counts::new(img.geo.cluster_bits, clusters, &img.budget),
        rep: Findings::new(),
        held: img.budget.charge(0, "check records")?,
        metas: Vec::new(),
        l2s: Vec::new(),
        l2s_sorted: 0,
        meta_runs: Vec::new(),
        blocks: Vec::new(),
        skip_leaks: false,
        copied_checked: h.incompatible_features & header::INCOMPAT_DATA_FILE == 0,
    };
    w.meta(Kind::Header, 0, cs, 1)?;
    w.meta(
        Kind::ActiveL1,
        h.l1_table_offset,
        u64::from(h.l1_size) * 8,
        1,
    )?;
    w.refcount_table()?;
    if let Some((off, len)) = img.ext.crypto {
        if !w.meta(Kind::Crypto, off, len, 1)? {
            w.rep.push(
                Finding::reject(
                    "table.out-of-bounds",
                    "the encryption header lies past the end of the file",
                )
                .at(off),
            );
        }
    }
    // When the bitmaps cannot be walked, their clusters would look leaked.
    if let Some(b) = img.ext.bitmaps {
        if let Err(f) = w.bitmaps(b)? {
            w.rep.push(f);
            w.skip_leaks = true;
        }
    }
    let l1 = &img.l1;
    w.walk_l1(h.l1_table_offset, l1.iter().copied(), 1, true)?;
    if h.nb_snapshots > 0 {
        let snaps = w.snapshots()?;
        w.snapshot_l1s(snaps)?;
    }
    w.compact_l2s()?;
    w.overlaps()?;
    w.walk_l2s()?;
    w.compare()?;
    Ok(w.rep.finish())
}

const RECORDS: &str = "metadata list";

impl Walk<'_> {
    /// Records a metadata structure and counts its clusters `times`. False when it leaves
    /// the file.
    fn meta(&mut self, kind: Kind, off: u64, len: u64, times: u16) -> Result<bool> {
        // An empty structure (an L1 table of a 0-byte disk) occupies nothing: qemu counts no
        // refcount for it and leaves it out of its overlap checks.
        if len == 0 {
            return Ok(true);
        }
        let cb = self.img.geo.cluster_bits;
        let Some(last) = off.checked_add(len.saturating_sub(1)) else {
            return Ok(false);
        };
        if !self.counts.inc(off, len, times)? {
            return Ok(false);
        }
        self.held.grow(RECORD_BYTES, RECORDS)?;
        self.metas.push(Meta {
            start: off >> cb,
            end: (last >> cb).saturating_add(1),
            kind,
            off,
        });
        Ok(true)
    }

    fn reserved(&mut self, what: &str, entry: u64, mask: u64, at: u64) {
        if entry & mask != 0 {
            self.rep.push(
                Finding::reject(
                    "qcow2.reserved-bits",
                    format!(
                        "{what} {entry:#018x} has reserved bits {:#x} set",
                        entry & mask
                    ),
                )
                .at(at),
            );
        }
    }

    /// Reads the refcount table and records its blocks.
    fn refcount_table(&mut self) -> Result<()> {
        let h = &self.img.header;
        let cs = self.img.geo.cluster_size();
        let rt_off = h.refcount_table_offset;
        let rt_len = u64::from(h.refcount_table_clusters).saturating_mul(cs);
        self.meta(Kind::RefTable, rt_off, rt_len, 1)?;
        let spec = TableSpec {
            name: "refcount table",
            offset: rt_off,
            entries: rt_len / 8,
            entry_size: 8,
            align: cs,
        };
        let rt = read_entries(
            self.img.src.as_ref(),
            spec,
            self.img.file_size,
            self.limits,
            self.budget,
            |c| table::be64(c, 0),
        )?;
        self.held.grow(rt_len, RECORDS)?;
        self.blocks
            .try_reserve_exact(rt.len())
            .map_err(|_| Error::limit("refcount table: cannot allocate"))?;
        for (i, e) in (0u64..).zip(rt.iter().copied()) {
            let at = rt_off.saturating_add(i.saturating_mul(8));
            self.reserved("refcount table entry", e, REFT_RESERVED_MASK, at);
            let off = e & REFT_OFFSET_MASK;
            self.blocks.push(0);
            if off == 0 {
                continue;
            }
            if self.img.geo.in_cluster(off) != 0 {
                self.rep.push(
                    Finding::reject(
                        "table.misaligned",
                        format!("refcount block at {off:#x} is not cluster aligned"),
                    )
                    .at(at),
                );
                continue;
            }
            if !self.meta(Kind::RefBlock, off, cs, 1)? {
                self.rep.push(
                    Finding::reject(
                        "table.out-of-bounds",
                        format!("refcount block at {off:#x} lies past the end of the file"),
                    )
                    .at(at),
                );
                continue;
            }
            if let Some(last) = self.blocks.last_mut() {
                *last = off;
            }
        }
        Ok(())
    }

    /// Walks one L1 table's entries: counts each L2 table `times` and queues it.
    fn walk_l1(
        &mut self,
        l1_off: u64,
        l1: impl Iterator<Item = u64>,
        times: u16,
        active: bool,
    ) -> Result<()> {
        let cs = self.img.geo.cluster_size();
        let cb = self.img.geo.cluster_bits;
        for (i, e) in l1.enumerate() {
            let at = l1_off.saturating_add((i as u64).saturating_mul(8));
            self.reserved("L1 entry", e, L1E_RESERVED_MASK, at);
            let off = e & L1E_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let problem = if self.img.geo.in_cluster(off) != 0 {
                Some(("table.misaligned", "is not cluster aligned"))
            } else if !self.counts.inc(off, cs, times)? {
                Some(("table.out-of-bounds", "lies past the end of the file"))
            } else {
                None
            };
            if let Some((code, what)) = problem {
                self.rep
                    .push(Finding::reject(code, format!("L2 table at {off:#x} {what}")).at(at));
                continue;
            }
            if active && self.copied_checked {
                self.counts.flag(off >> cb, e & OFLAG_COPIED != 0)?;
            }
            self.held.grow(RECORD_BYTES, RECORDS)?;
            self.l2s.push(L2Ref { off, times, active });
        }
        // Sorting the whole list after every L1 table cost (L1 tables) x (distinct L2
        // tables): 65536 one-entry snapshot L1 tables, each naming one of 122880 L2 tables,
        // took 166 s. Compacting only once the queued records outnumber the sorted ones
        // costs O(records log records) in all, and holds at most twice the distinct tables
        // plus this table's entries.
        let queued = self.l2s.len().saturating_sub(self.l2s_sorted);
        if queued > self.l2s_sorted {
            self.compact_l2s()?;
        }
        Ok(())
    }

    /// Sorts the L2 list and merges its records to one per distinct table (the walks after
    /// the L1 tables need that).
    fn compact_l2s(&mut self) -> Result<()> {
        self.l2s.sort_unstable_by_key(|r| r.off);
        let before = self.l2s.len();
        self.l2s.dedup_by(|b, a| {
            if a.off == b.off {
                a.times = a.times.saturating_add(b.times);
                a.active |= b.active;
                true
            } else {
                false
            }
        });
        self.l2s_sorted = self.l2s.len();
        let dropped = before.saturating_sub(self.l2s.len()) as u64;
        self.release(dropped.saturating_mul(RECORD_BYTES))
    }

    /// Gives back `bytes` of the records' charge (the records were dropped).
    fn release(&mut self, bytes: u64) -> Result<()> {
        let keep = self.held.bytes().saturating_sub(bytes);
        // The old charge comes back as the new, empty one replaces it.
        self.held = self.budget.charge(0, RECORDS)?;
        self.held.grow(keep, RECORDS)
    }

    /// Compares every metadata structure's clusters with every other's.
    fn overlaps(&mut self) -> Result<()> {
        self.metas.sort_unstable();
        self.metas.dedup();
        let cb = self.img.geo.cluster_bits;
        let l2 = |r: &L2Ref| Meta {
            start: r.off >> cb,
            end: (r.off >> cb).saturating_add(1),
            kind: Kind::L2,
            off: r.off,
        };
        let (mut i, mut j) = (0usize, 0usize);
        let mut cur: Option<Meta> = None;
        let mut found = Vec::new();
        loop {
            let a = self.metas.get(i).copied();
            let b = self.l2s.get(j).map(l2);
            let m = match (a, b) {
                (Some(a), Some(b)) if a <= b => {
                    i = i.saturating_add(1);
                    a
                }
                (_, Some(b)) => {
                    j = j.saturating_add(1);
                    b
                }
                (Some(a), None) => {
                    i = i.saturating_add(1);
                    a
                }
                (None, None) => break,
            };
            match cur {
                Some(p) if m.start < p.end => {
                    if (p.kind, p.off) != (m.kind, m.off) {
                        found.push((p, m));
                    }
                    if m.end > p.end {
                        cur = Some(m);
                    }
                }
                _ => cur = Some(m),
            }
            if m.kind != Kind::L2 {
                match self.meta_runs.last_mut() {
                    Some(r) if m.start <= r.1 => r.1 = r.1.max(m.end),
                    _ => {
                        self.held.grow(16, RECORDS)?;
                        self.meta_runs.push((m.start, m.end));
                    }
                }
            }
        }
        for (p, m) in found {
            self.rep.push(
                Finding::reject(
                    "qcow2.metadata-overlap",
                    format!(
                        "{} at {:#x} overlaps {} at {:#x}",
                        capital(m.kind.name()),
                        m.off,
                        p.kind.name(),
                        p.off
                    ),
                )
                .at(m.off),
            );
        }
        Ok(())
    }

    /// True when host cluster `c` holds metadata.
    fn is_meta(&self, c: u64) -> bool {
        let k = self.meta_runs.partition_point(|r| r.1 <= c);
        let in_run = self.meta_runs.get(k).is_some_and(|r| r.0 <= c);
        let cb = self.img.geo.cluster_bits;
        in_run || self.l2s.binary_search_by_key(&c, |r| r.off >> cb).is_ok()
    }

    /// Reads each distinct L2 table once, in file order, and counts its data clusters.
    fn walk_l2s(&mut self) -> Result<()> {
        let geo = self.img.geo;
        let step = geo.l2_entry_size();
        for k in 0..self.l2s.len() {
            let Some(r) = self.l2s.get(k).copied() else {
                break;
            };
            let l2 = table::read_l2(self.img.src.as_ref(), &geo, r.off, self.budget)?;
            for (n, (entry, bitmap)) in (0u64..).zip(l2.iter().copied()) {
                let at = r.off.saturating_add(n.saturating_mul(step));
                if entry & OFLAG_COMPRESSED != 0 {
                    self.compressed(entry, bitmap, at, r.times)?;
                } else {
                    self.standard(entry, bitmap, at, r)?;
                }
            }
        }
        Ok(())
    }

    fn l2_problem(&mut self, code: &'static str, msg: String, at: u64) {
        self.rep.push(Finding::reject(code, msg).at(at));
    }

    /// Checks data clusters `[host, host+len)` against metadata.
    fn data_in_meta(&mut self, host: u64, len: u64, at: u64) {
        let cb = self.img.geo.cluster_bits;
        let last = host.saturating_add(len.saturating_sub(1));
        if (host >> cb..=last >> cb).any(|c| self.is_meta(c)) {
            self.l2_problem(
                "qcow2.entry-into-metadata",
                format!("guest data at {host:#x} overlaps image metadata"),
                at,
            );
        }
    }

    fn compressed(&mut self, entry: u64, bitmap: u64, at: u64, times: u16) -> Result<()> {
        // qemu-img check: both are corruptions.
        if entry & OFLAG_COPIED != 0 {
            self.l2_problem(
                "qcow2.copied-flag",
                "compressed cluster entry has the COPIED flag set".into(),
                at,
            );
        }
        if bitmap != 0 {
            self.l2_problem(
                "qcow2.reserved-bits",
                format!("compressed cluster entry has a non-zero subcluster bitmap {bitmap:#x}"),
                at,
            );
        }
        let (host, len) = self.img.geo.compressed(entry);
        // The stream's last sector may end past a file that ends inside it (qemu writes only
        // the compressed bytes), but no further.
        let limit = self.img.file_size.saturating_add(SECTOR - 1) & !(SECTOR - 1);
        if host.checked_add(len).is_none_or(|e| e > limit) {
            self.l2_problem(
                "qcow2.l2-entry-out-of-bounds",
                format!(
                    "compressed cluster at {host:#x} ({len} bytes) runs past the end of the file"
                ),
                at,
            );
            return Ok(());
        }
        self.data_in_meta(host, len, at);
        if !self.counts.inc(host, len, times)? {
            self.l2_problem(
                "qcow2.l2-entry-out-of-bounds",
                format!("compressed cluster at {host:#x} lies past the end of the file"),
                at,
            );
        }
        Ok(())
    }

    fn standard(&mut self, entry: u64, bitmap: u64, at: u64, r: L2Ref) -> Result<()> {
        let geo = self.img.geo;
        let cs = geo.cluster_size();
        self.reserved("L2 entry", entry, L2E_STD_RESERVED_MASK, at);
        // Version 2 reserves bit 0: qemu calls the image corrupt ("Zero cluster entry found
        // in pre-v3 image") and fails the read, where glimpse's reader would serve zeros.
        if self.img.header.version < 3 && entry & OFLAG_ZERO != 0 {
            self.l2_problem(
                "qcow2.reserved-bits",
                format!(
                    "L2 entry {entry:#018x} has the zero flag (bit 0) set, which version 2 reserves; qemu refuses to read the cluster"
                ),
                at,
            );
        }
        if let Err(err) = table::decode(&geo, entry, bitmap) {
            self.l2_problem(
                "qcow2.l2-entry-out-of-bounds",
                err.message().to_string(),
                at,
            );
        }
        let host = entry & L2E_OFFSET_MASK;
        // With an external data file, standard clusters live in that file and are not
        // refcounted here (the spec); it is never opened, so there is nothing to check.
        if host == 0 || !self.copied_checked {
            return Ok(());
        }
        if geo.in_cluster(host) != 0 {
            self.l2_problem(
                "qcow2.l2-entry-out-of-bounds",
                format!("data cluster {host:#x} is not cluster aligned"),
                at,
            );
            return Ok(());
        }
        // The readers need every allocated byte: the whole cluster, or with subclusters up
        // to the last allocated one (qemu ends the file there).
        let need = if geo.extended {
            let alloc = bitmap & 0xffff_ffff;
            64u64
                .saturating_sub(u64::from(alloc.leading_zeros()))
                .max(1)
                .saturating_mul(cs / 32)
        } else {
            cs
        };
        if host
            .checked_add(need)
            .is_none_or(|e| e > self.img.file_size)
        {
            self.l2_problem(
                "qcow2.l2-entry-out-of-bounds",
                format!("data cluster at {host:#x} ends past the end of the file"),
                at,
            );
            return Ok(());
        }
        self.data_in_meta(host, cs, at);
        self.counts.inc(host, cs, r.times)?;
        if r.active {
            self.counts
                .flag(host >> geo.cluster_bits, entry & OFLAG_COPIED != 0)?;
        }
        Ok(())
    }

    /// Compares stored refcounts with the counted references and the COPIED claims, in
    /// cluster order, one refcount block's range at a time.
    ///
    /// Only clusters with a counter word (a reference or a COPIED claim) are visited one by
    /// one. Every other cluster has no reference, so it is a leak exactly when its stored
    /// refcount is non-zero: a block's range is settled by its count of non-zero entries,
    /// taken once per distinct block. Walking every cluster under a block instead cost the
    /// file's apparent size: one block named by each of 1 Mi table entries, in a sparse file
    /// of 2 TiB with 8 MiB of data, took 51 s.
    fn compare(&mut self) -> Result<()> {
        let h = &self.img.header;
        let epb = refcount::entries_per_block(h.cluster_bits, h.refcount_order);
        let mut stored = Stored {
            img: self.img,
            budget: self.budget,
            blocks: &self.blocks,
            epb,
            cur: None,
            nonzero: HashMap::new(),
            held: self.budget.charge(0, "refcount blocks")?,
            singles: (u64::MAX, 0),
        };
        let n = self.counts.clusters();
        let mut visits = self.counts.nonzero().peekable();
        let mut present = (0u64..)
            .zip(self.blocks.iter())
            .filter(|(_, b)| **b != 0)
            .map(|(bi, _)| bi)
            .peekable();
        let (mut leaked, mut first_leak) = (0u64, None);
        loop {
            // The next range with a block or a counted cluster.
            let visit = visits.peek().and_then(|(c, _)| c.checked_div(epb));
            let Some(bi) = present.peek().copied().into_iter().chain(visit).min() else {
                break;
            };
            let lo = bi.saturating_mul(epb);
            if lo >= n {
                break;
            }
            let hi = lo.saturating_add(epb).min(n);
            let has_block = present.next_if_eq(&bi).is_some();
            let count_leaks = has_block && !self.skip_leaks;
            // First, so that the visits below find the block read whole.
            let nonzero = if count_leaks {
                stored.nonzero(bi, hi.saturating_sub(lo))?
            } else {
                0
            };
            let mut tally = Tally::default();
            while let Some((c, word)) = visits.next_if(|(c, _)| *c < hi) {
                let rc = stored.get(c)?;
                tally.visit(&mut self.rep, c << h.cluster_bits, rc, word);
            }
            if !count_leaks {
                continue;
            }
            // The unvisited clusters with a refcount are leaks, and so are the visited ones
            // with more refcount than references.
            let here = nonzero
                .saturating_sub(tally.nonzero)
                .saturating_add(tally.leaked);
            if here > 0 && first_leak.is_none() {
                first_leak = stored.first_leak(lo, hi, &self.counts)?;
            }
            leaked = leaked.saturating_add(here);
        }
        if leaked > 0 {
            let mut f = Finding::warn(
                "qcow2.leaked-clusters",
                format!("{leaked} clusters have a refcount but fewer references (leaked space)"),
            );
            f.offset = first_leak.map(|c| c << h.cluster_bits);
            self.rep.push(f);
        }
        Ok(())
    }
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// True when a cluster with stored refcount `rc` and counter word `word` is leaked space.
/// A saturated count matches any refcount at least as large.
fn is_leak(rc: u64, word: u16) -> bool {
    let counted = word & COUNT_MAX;
    counted != COUNT_MAX && rc > u64::from(counted)
}

/// What the visited clusters of one refcount block's range hold.
#[derive(Default)]
struct Tally {
    /// Clusters with a non-zero stored refcount.
    nonzero: u64,
    /// Clusters with more refcount than references.
    leaked: u64,
}

impl Tally {
    /// Checks one cluster with references or COPIED claims (`word`) at byte `offset`.
    fn visit(&mut self, rep: &mut Findings, offset: u64, rc: u64, word: u16) {
        let counted = word & COUNT_MAX;
        if word & F_COPIED != 0 && rc != 1 || word & F_SHARED != 0 && rc == 1 {
            rep.push(
                Finding::reject(
                    "qcow2.copied-flag",
                    format!(
                        "an active L1/L2 entry's COPIED flag for cluster {offset:#x} disagrees with its refcount {rc}"
                    ),
                )
                .at(offset),
            );
        }
        if rc < u64::from(counted) {
            rep.push(
                Finding::reject(
                    "refcount.mismatch",
                    format!("cluster {offset:#x} has refcount {rc} but {counted} references"),
                )
                .at(offset),
            );
        }
        if rc != 0 {
            self.nonzero = self.nonzero.saturating_add(1);
        }
        if is_leak(rc, word) {
            self.leaked = self.leaked.saturating_add(1);
        }
    }
}

/// Stored refcounts, looked up in cluster order.
struct Stored<'a> {
    img: &'a Qcow2Image,
    budget: &'a Budget,
    blocks: &'a [u64],
    epb: u64,
    /// The block last read whole: (offset, bytes).
    cur: Option<(u64, Vec<u8>)>,
    /// Non-zero entries of each distinct block read whole, by offset: a block that many
    /// table entries name is counted once.
    nonzero: HashMap<u64, u64>,
    /// The charge for `nonzero`.
    held: Charge,
    /// Entries read one at a time in one block's range: (block index, reads).
    singles: (u64, u64),
}

/// Budget charged per distinct refcount block's count.
const BLOCK_COUNT_BYTES: u64 = 32;

impl Stored<'_> {
    /// The offset of block `bi` (0: none).
    fn block(&self, bi: u64) -> u64 {
        usize::try_from(bi)
            .ok()
            .and_then(|i| self.blocks.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// Makes the block at `off` the current one.
    fn load(&mut self, off: u64) -> Result<&[u8]> {
        if self.cur.as_ref().is_none_or(|(o, _)| *o != off) {
            if let Some((_, old)) = self.cur.take() {
                self.budget.give_back(old.len() as u64);
            }
            let cs = self.img.geo.cluster_size();
            let b = read_vec(
                self.img.src.as_ref(),
                off,
                cs,
                self.budget,
                "refcount block",
            )?;
            self.cur = Some((off, b));
        }
        Ok(self.cur.as_ref().map_or(&[][..], |(_, b)| &b[..]))
    }

    /// The stored refcount of `cluster`. When its block is not the current one, the first
    /// visits of a range read their entries alone (one per 4 KiB of block), and only more
    /// visits read the whole block: visits in ranges whose blocks alternate would otherwise
    /// read a whole block, up to 2 MiB, for each.
    fn get(&mut self, cluster: u64) -> Result<u64> {
        let bi = cluster.checked_div(self.epb).unwrap_or(0);
        let off = self.block(bi);
        if off == 0 {
            return Ok(0);
        }
        let index = cluster.checked_rem(self.epb).unwrap_or(0);
        let order = self.img.header.refcount_order;
        if self.cur.as_ref().is_none_or(|(o, _)| *o != off) {
            if self.singles.0 != bi {
                self.singles = (bi, 0);
            }
            if self.singles.1 < self.img.geo.cluster_size() >> 12 {
                self.singles.1 = self.singles.1.saturating_add(1);
                return self.entry(off, index);
            }
        }
        Ok(refcount::get(self.load(off)?, index, order))
    }

    /// Entry `index` of the block at `off`, read alone.
    fn entry(&self, off: u64, index: u64) -> Result<u64> {
        let order = self.img.header.refcount_order.min(6);
        let bits = 1u64 << order;
        let first_bit = index.saturating_mul(bits);
        let at = off.saturating_add(first_bit / 8);
        let mut buf = [0u8; 8];
        let len = usize::try_from(bits.div_ceil(8)).unwrap_or(1).min(8);
        let slot = buf.get_mut(..len).unwrap_or_default();
        self.img
            .src
            .read_exact_at(slot, at)
            .map_err(|e| Error::from(e).context("refcount block").at(at))?;
        Ok(refcount::get(slot, (first_bit % 8) >> order, order))
    }

    /// The non-zero entries among the first `entries` of block `bi`: counted once per
    /// distinct block when the whole block counts.
    fn nonzero(&mut self, bi: u64, entries: u64) -> Result<u64> {
        let off = self.block(bi);
        let whole = entries == self.epb;
        if let Some(k) = self.nonzero.get(&off).filter(|_| whole) {
            return Ok(*k);
        }
        let order = self.img.header.refcount_order;
        let k = refcount::nonzero(self.load(off)?, entries, order);
        if whole {
            self.held.grow(BLOCK_COUNT_BYTES, "refcount blocks")?;
            self.nonzero.insert(off, k);
        }
        Ok(k)
    }

    /// The first leaked cluster in `[lo, hi)`, one block's range (found once per check).
    fn first_leak(&mut self, lo: u64, hi: u64, counts: &Counts<'_>) -> Result<Option<u64>> {
        let off = self.block(lo.checked_div(self.epb).unwrap_or(0));
        let order = self.img.header.refcount_order;
        let block = self.load(off)?;
        Ok((lo..hi).zip(0u64..).find_map(|(c, i)| {
            let rc = refcount::get(block, i, order);
            (rc != 0 && is_leak(rc, counts.get(c))).then_some(c)
        }))
    }
}

impl Drop for Stored<'_> {
    fn drop(&mut self) {
        if let Some((_, old)) = self.cur.take() {
            self.budget.give_back(old.len() as u64);
        }
    }
}

/// Distinct snapshot L1 tables: (offset, bytes) -> snapshots naming it.
type SnapL1s = BTreeMap<(u64, u64), u16>;

impl Walk<'_> {
    /// Walks the snapshot table: records it and each snapshot's L1 table, and returns the
    /// distinct L1 tables for the L2 walk.
    fn snapshots(&mut self) -> Result<SnapL1s> {
        let img = self.img;
        let h = &img.header;
        let cs = img.geo.cluster_size();
        let mut l1s = SnapL1s::new();
        let mut off = h.snapshots_offset;
        let bad = |msg: String, at: u64| Finding::reject("qcow2.snapshot-table", msg).at(at);
        for i in 0..h.nb_snapshots.min(MAX_SNAPSHOTS) {
            // Entries start 8-byte aligned; the table ends right after the last one (qemu).
            off = off.saturating_add(7) & !7;
            let Ok(fixed) = read_vec(img.src.as_ref(), off, 40, self.budget, "snapshot entry")
            else {
                self.rep.push(bad(
                    format!("snapshot {i} lies past the end of the file"),
                    off,
                ));
                return self.claim_snapshot_l1s(l1s);
            };
            self.budget.give_back(40);
            let l1_off = table::be64(&fixed, 0);
            let l1_size = be32(&fixed, 8);
            let (id_len, name_len) = (be16(&fixed, 12), be16(&fixed, 14));
            let extra = be32(&fixed, 36);
            if extra > MAX_SNAPSHOT_EXTRA {
                self.rep.push(bad(
                    format!("snapshot {i} has {extra} bytes of extra data (qemu allows 1024)"),
                    off,
                ));
                return self.claim_snapshot_l1s(l1s);
            }
            if h.version >= 3 && extra < MIN_V3_SNAPSHOT_EXTRA {
                self.rep.push(bad(
                    format!("snapshot table entry {i} is incomplete: {extra} bytes of extra data, version 3 needs 16"),
                    off,
                ));
            }
            let len = [u64::from(extra), u64::from(id_len), u64::from(name_len)]
                .iter()
                .fold(40u64, |a, b| a.saturating_add(*b));
            let entry_at = off;
            off = off.saturating_add(len);
            if off > img.file_size {
                self.rep.push(bad(
                    format!("snapshot {i} lies past the end of the file"),
                    entry_at,
                ));
                return self.claim_snapshot_l1s(l1s);
            }
            let spec = TableSpec {
                name: "snapshot L1 table",
                offset: l1_off,
                entries: u64::from(l1_size),
                entry_size: 8,
                align: cs,
            };
            // qemu's QCOW_MAX_L1_SIZE first, as for the active L1 table: it is below any
            // byte cap of `Limits::default()`.
            if u64::from(l1_size).saturating_mul(8) > header::MAX_L1_BYTES {
                self.rep.push(bad(
                    format!("snapshot {i}'s L1 table is larger than 32 MiB"),
                    entry_at,
                ));
                continue;
            }
            match check_table(spec, img.file_size, self.limits) {
                Ok(bytes) => {
                    let n = l1s.entry((l1_off, bytes)).or_insert(0);
                    *n = n.saturating_add(1);
                }
                Err(e) => self
                    .rep
                    .push(bad(format!("snapshot {i}: {}", e.message()), entry_at)),
            }
        }
        let total = off.saturating_sub(h.snapshots_offset);
        if !self.meta(Kind::SnapTable, h.snapshots_offset, total, 1)? {
            self.rep.push(bad(
                "the snapshot table lies past the end of the file".into(),
                h.snapshots_offset,
            ));
        }
        self.claim_snapshot_l1s(l1s)
    }

    /// Records each distinct snapshot L1 table and counts its clusters once per snapshot
    /// naming it, in one call: counting per snapshot cost (snapshots) x (the table's
    /// clusters), 65536 x 65536 for 512-byte clusters. Distinct tables that together exceed
    /// the file overlap; claiming stops there, so the clusters counted and the tables walked
    /// later stay within the file. Returns the tables claimed.
    fn claim_snapshot_l1s(&mut self, l1s: SnapL1s) -> Result<SnapL1s> {
        let mut claimed = SnapL1s::new();
        let mut total = 0u64;
        for ((off, bytes), times) in l1s {
            total = total.saturating_add(bytes);
            if total > self.img.file_size {
                self.rep.push(
                    Finding::reject(
                        "qcow2.snapshot-table",
                        "the snapshot L1 tables together are larger than the file: they overlap",
                    )
                    .at(off),
                );
                self.skip_leaks = true;
                break;
            }
            // In the file (`check_table` said so): `meta` records it.
            self.meta(Kind::SnapL1, off, bytes, times)?;
            claimed.insert((off, bytes), times);
        }
        Ok(claimed)
    }

    /// Walks each distinct snapshot L1 table once, counting its L2 tables once per
    /// snapshot naming it. The tables were claimed by [`Walk::claim_snapshot_l1s`]: together
    /// they fit in the file, so the work does too.
    fn snapshot_l1s(&mut self, l1s: SnapL1s) -> Result<()> {
        for ((off, bytes), times) in l1s {
            let spec = TableSpec {
                name: "snapshot L1 table",
                offset: off,
                entries: bytes / 8,
                entry_size: 8,
                align: self.img.geo.cluster_size(),
            };
            let l1 = read_entries(
                self.img.src.as_ref(),
                spec,
                self.img.file_size,
                self.limits,
                self.budget,
                |c| table::be64(c, 0),
            )?;
            self.walk_l1(off, l1.iter().copied(), times, false)?;
        }
        Ok(())
    }

    /// Records the bitmap directory, tables and data clusters, as qemu's
    /// `qcow2_check_bitmaps_refcounts` counts them. `Ok(Err(finding))` when malformed.
    ///
    /// The directory is held to qemu's constraints before any table is read. Each distinct
    /// table is then claimed (recorded and counted once per bitmap naming it) before it is
    /// read, and read once; as in [`Walk::snapshot_l1s`], distinct tables that together
    /// exceed the file overlap, and the walk stops there. So the work is bounded by the
    /// directory and the file, however many bitmaps name one table.
    fn bitmaps(&mut self, ext: BitmapsExt) -> Result<Result<(), Finding>> {
        let img = self.img;
        let cs = img.geo.cluster_size();
        let cb = img.geo.cluster_bits;
        let (nb, dir_size, dir_off) = (ext.nb_bitmaps, ext.directory_size, ext.directory_offset);
        let bad = |msg: String, at: u64| Finding::reject("qcow2.bitmaps", msg).at(at);
        if dir_size > header::MAX_BITMAP_DIRECTORY_BYTES {
            return Ok(Err(Finding::reject(
                "table.too-large",
                format!("bitmap directory of {dir_size} bytes exceeds qemu's limit"),
            )
            .at(dir_off)));
        }
        // qemu refuses these at open (qcow2_read_extensions, bitmap_list_load).
        if ext.reserved != 0 || nb == 0 || dir_size == 0 {
            return Ok(Err(bad(
                format!(
                    "the bitmaps extension is malformed ({nb} bitmaps, {dir_size}-byte directory, reserved field {:#x})",
                    ext.reserved
                ),
                dir_off,
            )));
        }
        let spec = TableSpec {
            name: "bitmap directory",
            offset: dir_off,
            entries: dir_size,
            entry_size: 1,
            align: cs,
        };
        let unlimited = Limits {
            max_table_bytes: u64::MAX,
            ..self.limits.clone()
        };
        if let Err(e) = check_table(spec, img.file_size, &unlimited) {
            return Ok(Err(bad(e.message().to_string(), dir_off)));
        }
        if !self.meta(Kind::BitmapDir, dir_off, dir_size, 1)? {
            return Ok(Err(bad(
                "the bitmap directory lies past the end of the file".into(),
                dir_off,
            )));
        }
        let entries = {
            // Entries have variable lengths: the directory stays bytes, held by one charge
            // (the range was checked above; the read's own budget is only its scratch
            // count). The entry list and the name set are charged per declared bitmap.
            let _held = self.budget.charge(dir_size, "bitmap directory")?;
            let _list = self
                .budget
                .charge(u64::from(nb).saturating_mul(BITMAP_BYTES), "bitmap list")?;
            let dir = read_vec(
                img.src.as_ref(),
                dir_off,
                dir_size,
                &Budget::new(dir_size),
                "bitmap directory",
            )?;
            let disk = bitmap::Disk {
                cluster_bits: cb,
                len: img.header.size & !511,
            };
            match bitmap::directory(&dir, dir_off, nb, disk) {
                Ok(v) => v,
                Err(f) => return Ok(Err(f)),
            }
        };
        // Distinct tables by offset: how many bitmaps name each, and the first of them.
        let mut tables: BTreeMap<u64, BitmapTable> = BTreeMap::new();
        for e in &entries {
            let spec = TableSpec {
                name: "bitmap table",
                offset: e.table_offset,
                entries: u64::from(e.table_size),
                entry_size: 8,
                align: cs,
            };
            let bytes = match check_table(spec, img.file_size, self.limits) {
                Ok(b) => b,
                Err(err) => {
                    return Ok(Err(bad(
                        format!("bitmap {}: {}", e.index, err.message()),
                        e.at,
                    )))
                }
            };
            let t = tables.entry(e.table_offset).or_insert(BitmapTable {
                bytes,
                times: 0,
                first: e.index,
            });
            if t.bytes != bytes {
                self.rep.push(bad(
                    format!(
                        "bitmaps {} and {} name tables of different sizes at {:#x}",
                        t.first, e.index, e.table_offset
                    ),
                    e.at,
                ));
                t.bytes = t.bytes.max(bytes);
            }
            t.times = t.times.saturating_add(1);
        }
        drop(entries);
        // Claim every table before reading any: a shared table is one finding, and a table
        // over other metadata is found by `overlaps` without being read again. Distinct
        // tables that together pass the file overlap one another: claiming (which counts
        // every cluster of a table) stops there, as for snapshot L1 tables, so that tables a
        // few bytes apart cannot make the count (tables) x (their clusters).
        let mut total = 0u64;
        let mut claimed = BTreeMap::new();
        for (off, t) in tables {
            total = total.saturating_add(t.bytes);
            if total > img.file_size {
                self.rep.push(bad(
                    "the bitmap tables together are larger than the file: they overlap".into(),
                    off,
                ));
                self.skip_leaks = true;
                break;
            }
            if t.times > 1 {
                self.rep.push(bad(
                    format!(
                        "{} bitmaps (bitmap {} and later ones) share the bitmap table at {off:#x}",
                        t.times, t.first
                    ),
                    off,
                ));
            }
            if !self.meta(Kind::BitmapTable, off, t.bytes, t.times)? {
                return Ok(Err(bad(
                    format!(
                        "bitmap {}: its table lies past the end of the file",
                        t.first
                    ),
                    off,
                )));
            }
            claimed.insert(off, t);
        }
        // Data clusters by offset, with the bitmaps naming them: one record each.
        let mut data: HashMap<u64, u16> = HashMap::new();
        for (off, t) in claimed {
            let spec = TableSpec {
                name: "bitmap table",
                offset: off,
                entries: t.bytes / 8,
                entry_size: 8,
                align: cs,
            };
            let bt = read_entries(
                img.src.as_ref(),
                spec,
                img.file_size,
                self.limits,
                self.budget,
                |c| table::be64(c, 0),
            )?;
            for (k, v) in (0u64..).zip(bt.iter().copied()) {
                let at = off.saturating_add(k.saturating_mul(8));
                if let Some(why) = bitmap::table_entry_problem(v, cb) {
                    return Ok(Err(bad(
                        format!("bitmap {}: table entry {v:#018x} {why}", t.first),
                        at,
                    )));
                }
                let d = v & bitmap::TABLE_OFFSET_MASK;
                if d == 0 {
                    continue;
                }
                if d.checked_add(cs).is_none_or(|e| e > img.file_size) {
                    return Ok(Err(bad(
                        format!(
                            "bitmap {}: data cluster {d:#x} lies past the end of the file",
                            t.first
                        ),
                        at,
                    )));
                }
                match data.entry(d) {
                    Entry::Occupied(mut o) => {
                        let n = o.get_mut();
                        *n = n.saturating_add(t.times);
                    }
                    Entry::Vacant(slot) => {
                        self.held.grow(RECORD_BYTES, RECORDS)?;
                        slot.insert(t.times);
                    }
                }
            }
        }
        for (d, times) in data {
            // In the file (checked above): `meta` records it.
            self.meta(Kind::BitmapData, d, cs, times)?;
        }
        Ok(Ok(()))
    }
}

/// One distinct bitmap table: its bytes, how many bitmaps name it, the first of them.
struct BitmapTable {
    bytes: u64,
    times: u16,
    first: u32,
}

/// Budget charged per declared bitmap while the directory is checked: its entry and its
/// name in the set of names.
const BITMAP_BYTES: u64 = 64;
