//! Reference counts per host cluster, kept in pages allocated on first touch.
//!
//! A sparse file (a 2 TiB apparent size, or 512-byte clusters over 100 GiB) holds few
//! referenced clusters: only the pages that a reference touches are allocated, so memory
//! follows the metadata, not the file's apparent size. Each cluster is one `u16`: a 14-bit
//! saturating count and two flags recording what the active tables' COPIED bits claim,
//! checked against the stored refcount in one sequential pass (no random refcount reads).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::limits::{Budget, Charge};

/// Clusters per page (log2).
const PAGE_BITS: u32 = 12;
const PAGE: usize = 1 << PAGE_BITS;
/// A cluster's index inside its page.
const PAGE_MASK: u64 = !(u64::MAX << PAGE_BITS);
/// Bytes of one page, charged to the budget.
const PAGE_BYTES: u64 = (PAGE * 2) as u64;
/// Counting stops growing here (a larger stored refcount then matches).
pub const COUNT_MAX: u16 = 0x3fff;
/// An active L1/L2 entry names this cluster with COPIED set (it claims refcount 1).
pub const F_COPIED: u16 = 1 << 15;
/// An active L1/L2 entry names this cluster with COPIED clear (it claims refcount != 1).
pub const F_SHARED: u16 = 1 << 14;
/// The most page memory one check may hold: 128 MiB counts 64 Mi clusters (4 TiB of 64 KiB
/// clusters), far above any real image's allocated clusters.
const MAX_PAGE_BYTES: u64 = 128 << 20;

/// Paged per-cluster counters over `clusters` host clusters.
pub struct Counts<'a> {
    cluster_bits: u32,
    clusters: u64,
    /// Page number -> index into `store`.
    pages: BTreeMap<u64, usize>,
    store: Vec<Box<[u16]>>,
    /// The last page used (page number, index): runs of references mostly stay in a page.
    last: Option<(u64, usize)>,
    budget: &'a Budget,
    /// The pages' bytes, held until the counters are dropped.
    held: Option<Charge>,
}

impl<'a> Counts<'a> {
    /// Counters for `clusters` host clusters of `1 << cluster_bits` bytes.
    pub fn new(cluster_bits: u32, clusters: u64, budget: &'a Budget) -> Self {
        Counts {
            cluster_bits,
            clusters,
            pages: BTreeMap::new(),
            store: Vec::new(),
            last: None,
            budget,
            held: None,
        }
    }

    /// Host clusters covered.
    pub fn clusters(&self) -> u64 {
        self.clusters
    }

    fn page_mut(&mut self, cluster: u64) -> Result<Option<&mut u16>> {
        if cluster >= self.clusters {
            return Ok(None);
        }
        let p = cluster >> PAGE_BITS;
        let i = usize::try_from(cluster & PAGE_MASK).unwrap_or(0);
        if let Some((lp, k)) = self.last {
            if lp == p {
                return Ok(self.store.get_mut(k).and_then(|pg| pg.get_mut(i)));
            }
        }
        if !self.pages.contains_key(&p) {
            let held = self.held.as_ref().map_or(0, Charge::bytes);
            if held.saturating_add(PAGE_BYTES) > MAX_PAGE_BYTES {
                return Err(Error::limit(format!(
                    "refcount check: the referenced clusters need more than {} MiB of counters",
                    MAX_PAGE_BYTES >> 20
                ))
                .code("table.too-large"));
            }
            match self.held.as_mut() {
                Some(c) => c.grow(PAGE_BYTES, "refcount check")?,
                None => self.held = Some(self.budget.charge(PAGE_BYTES, "refcount check")?),
            }
            let mut v = Vec::new();
            v.try_reserve_exact(PAGE)
                .map_err(|_| Error::limit("refcount check: cannot allocate"))?;
            v.resize(PAGE, 0u16);
            self.store.push(v.into_boxed_slice());
            self.pages.insert(p, self.store.len().saturating_sub(1));
        }
        let k = self.pages.get(&p).copied().unwrap_or(usize::MAX);
        self.last = Some((p, k));
        Ok(self.store.get_mut(k).and_then(|pg| pg.get_mut(i)))
    }

    /// Adds `times` references to every cluster overlapping `[start, start+len)`. `Ok(false)`
    /// when part of the range lies past the counted clusters (nothing is counted then).
    ///
    /// # Errors
    /// `LimitExceeded` when the pages would pass their cap or the budget.
    pub fn inc(&mut self, start: u64, len: u64, times: u16) -> Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        let Some(last) = start.checked_add(len.saturating_sub(1)) else {
            return Ok(false);
        };
        let (a, b) = (start >> self.cluster_bits, last >> self.cluster_bits);
        if b >= self.clusters {
            return Ok(false);
        }
        for c in a..=b {
            if let Some(v) = self.page_mut(c)? {
                let n = (*v & COUNT_MAX).saturating_add(times).min(COUNT_MAX);
                *v = (*v & !COUNT_MAX) | n;
            }
        }
        Ok(true)
    }

    /// Records what an active entry's COPIED bit claims about `cluster`.
    ///
    /// # Errors
    /// As [`Counts::inc`].
    pub fn flag(&mut self, cluster: u64, copied: bool) -> Result<()> {
        if let Some(v) = self.page_mut(cluster)? {
            *v |= if copied { F_COPIED } else { F_SHARED };
        }
        Ok(())
    }

    /// The counter word of `cluster` (0 when its page was never touched).
    pub fn get(&self, cluster: u64) -> u16 {
        let i = usize::try_from(cluster & PAGE_MASK).unwrap_or(0);
        self.pages
            .get(&(cluster >> PAGE_BITS))
            .and_then(|k| self.store.get(*k))
            .and_then(|p| p.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The clusters with a non-zero counter word (a reference or a COPIED claim), in order,
    /// with their words. The work is the pages made, not the clusters covered.
    pub fn nonzero(&self) -> impl Iterator<Item = (u64, u16)> + '_ {
        self.pages.iter().flat_map(move |(p, k)| {
            let page = self.store.get(*k).map_or(&[][..], |pg| &pg[..]);
            (p << PAGE_BITS..)
                .zip(page.iter().copied())
                .filter(|(_, w)| *w != 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_made_on_touch_and_counts_saturate() {
        let b = Budget::new(1 << 20);
        let mut c = Counts::new(9, 1 << 30, &b);
        assert!(c.inc(512 * 5000, 1024, 3).unwrap());
        assert_eq!(c.get(5000) & COUNT_MAX, 3);
        assert_eq!(c.get(5001) & COUNT_MAX, 3);
        c.flag(5000, true).unwrap();
        assert_eq!(c.get(5000) & F_COPIED, F_COPIED);
        c.inc(0, 1, u16::MAX).unwrap();
        assert_eq!(c.get(0) & COUNT_MAX, COUNT_MAX);
        let words: Vec<_> = c.nonzero().collect();
        assert_eq!(words, [(0, COUNT_MAX), (5000, F_COPIED | 3), (5001, 3)]);
        assert!(!c.inc(512 << 30, 1, 1).unwrap());
        assert_eq!(b.left(), (1 << 20) - 2 * PAGE_BYTES);
        drop(c);
        assert_eq!(b.left(), 1 << 20);
    }
}
