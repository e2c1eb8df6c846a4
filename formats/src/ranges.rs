//! Placement of metadata: do any two of an image's structures (headers, tables, footers) share
//! bytes? Checking every table's entries is not enough: a table placed over a header passes
//! every entry check, and the first write through it (qemu's, or the guest's) destroys the
//! header. Each format lists its structures as [`Region`]s and asks [`overlap_finding`].

use crate::finding::Finding;

/// One named byte range of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region<'a> {
    /// What lives there ("the BAT", "the dynamic disk header").
    pub name: &'a str,
    /// First byte.
    pub start: u64,
    /// Length in bytes; an empty region overlaps nothing.
    pub len: u64,
}

impl<'a> Region<'a> {
    /// A region of `len` bytes at `start`.
    pub fn new(name: &'a str, start: u64, len: u64) -> Self {
        Region { name, start, len }
    }

    /// One past the last byte (saturating: a region cannot wrap around).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }
}

/// The first pair of regions that share a byte, in file order (the earlier-starting one
/// first), or `None`. Sorts `regions`; O(n log n).
pub fn first_overlap<'a>(regions: &mut [Region<'a>]) -> Option<(Region<'a>, Region<'a>)> {
    overlaps(regions, 1).into_iter().next()
}

/// The `code` finding (reject) for the first overlap among `regions`: both names and byte
/// ranges, what the overlap would cost, at the later-starting region.
pub fn overlap_finding(
    code: &'static str,
    regions: &mut [Region<'_>],
    cost: &str,
) -> Option<Finding> {
    let (a, b) = first_overlap(regions)?;
    let message = format!(
        "{} ({:#x}..{:#x}) overlaps {} ({:#x}..{:#x}): {cost}",
        b.name,
        b.start,
        b.end(),
        a.name,
        a.start,
        a.end()
    );
    Some(Finding::reject(code, message).at(b.start))
}

/// Every overlapping pair's message, at most `max` of them, for a finding each. Sorts
/// `regions`; O(n log n + n × max).
pub fn overlaps<'a>(regions: &mut [Region<'a>], max: usize) -> Vec<(Region<'a>, Region<'a>)> {
    regions.sort_unstable_by_key(|r| (r.start, r.len));
    let mut out = Vec::new();
    let mut reach: Option<Region<'a>> = None;
    for r in regions.iter().filter(|r| r.len > 0) {
        if let Some(prev) = reach {
            if r.start < prev.end() {
                if out.len() >= max {
                    break;
                }
                out.push((prev, *r));
            }
        }
        if reach.is_none_or(|p| r.end() > p.end()) {
            reach = Some(*r);
        }
    }
    out
}

/// Regions sorted for "what does this range overlap?" queries: one or two binary searches each.
/// Every format's check asks this of each table entry (does this block, grain or cluster land
/// on metadata?), so a query must not walk the regions: one long region followed by many short
/// ones that end early made a backward scan visit all of them for every entry (quadratic in the
/// file: a 16 MiB VMDK took 30 s).
#[derive(Debug, Clone, Default)]
pub struct RegionIndex<'a> {
    regions: Vec<Region<'a>>,
    /// Which region contains a point: `(from, owner)`, ascending by `from`. From `from` to the
    /// next pair's, the latest-starting region containing the point is `regions[owner]`, or
    /// none when `owner` is [`NO_REGION`]; before the first pair, none. At most two pairs per
    /// region (a pair only where the answer changes, and it changes only at a region's start
    /// or end).
    owners: Vec<(u64, usize)>,
}

/// The `owner` of points in no region.
const NO_REGION: usize = usize::MAX;

impl<'a> RegionIndex<'a> {
    /// An index of `regions` (empty regions dropped). O(n log n).
    pub fn new(mut regions: Vec<Region<'a>>) -> Self {
        regions.retain(|r| r.len > 0);
        regions.sort_unstable_by_key(|r| (r.start, r.len));
        let owners = owners(&regions);
        RegionIndex { regions, owners }
    }

    /// A region that `[start, end)` shares a byte with, if any (the latest-starting one: the
    /// last in `(start, len)` order). One binary search, two when a region starts inside the
    /// range.
    ///
    /// The regions sharing a byte with the range are the ones containing `start` and the ones
    /// starting inside it, which start later and so come later in the order.
    pub fn hit(&self, start: u64, end: u64) -> Option<&Region<'a>> {
        if end <= start {
            return None;
        }
        let k = self.owners.partition_point(|&(from, _)| from <= start);
        let here = k
            .checked_sub(1)
            .and_then(|k| self.owners.get(k))
            .map_or(NO_REGION, |&(_, owner)| owner);
        // Every region start changes the owner (the region is the latest-starting one there):
        // with no change inside the range, no region starts inside it.
        if self.owners.get(k).is_none_or(|&(from, _)| from >= end) {
            return self.regions.get(here);
        }
        let n = self.regions.partition_point(|r| r.start < end);
        match self.regions.get(n.checked_sub(1)?) {
            Some(last) if last.start > start => Some(last),
            _ => self.regions.get(here),
        }
    }

    /// The regions, sorted by start.
    pub fn regions(&self) -> &[Region<'a>] {
        &self.regions
    }
}

/// [`RegionIndex::owners`] of `regions` (sorted, none empty): one sweep over their starts and
/// ends in order, keeping the regions that have started on a stack, latest-starting on top.
/// Regions that have ended are dropped when they reach the top: below a region that has not
/// ended they change no answer, and an ended region stays ended. Each region is pushed and
/// popped once.
fn owners(regions: &[Region<'_>]) -> Vec<(u64, usize)> {
    let mut points: Vec<u64> = regions.iter().flat_map(|r| [r.start, r.end()]).collect();
    points.sort_unstable();
    points.dedup();
    let mut owners: Vec<(u64, usize)> = Vec::new();
    let mut started: Vec<usize> = Vec::new();
    let mut next = 0usize;
    for &p in &points {
        while regions.get(next).is_some_and(|r| r.start <= p) {
            started.push(next);
            next = next.saturating_add(1);
        }
        while started
            .last()
            .and_then(|&i| regions.get(i))
            .is_some_and(|r| r.end() <= p)
        {
            started.pop();
        }
        let owner = started.last().copied().unwrap_or(NO_REGION);
        if owners.last().map(|&(_, o)| o) != Some(owner) {
            owners.push((p, owner));
        }
    }
    owners
}

#[cfg(test)]
mod tests {
    #[test]
    fn region_index_finds_what_a_range_hits() {
        let idx = super::RegionIndex::new(vec![
            Region::new("big", 0, 100),
            Region::new("b", 200, 10),
            Region::new("empty", 150, 0),
        ]);
        assert_eq!(idx.hit(50, 60).map(|r| r.name), Some("big"));
        assert_eq!(idx.hit(100, 200), None);
        assert_eq!(idx.hit(150, 151), None);
        assert_eq!(idx.hit(205, 300).map(|r| r.name), Some("b"));
        assert_eq!(idx.hit(5, 5), None);
        assert_eq!(idx.regions().len(), 2);
    }

    use super::*;

    #[test]
    fn disjoint_and_touching_regions_do_not_overlap() {
        let mut r = [
            Region::new("c", 1024, 512),
            Region::new("a", 0, 512),
            Region::new("b", 512, 512),
            Region::new("empty", 100, 0),
        ];
        assert_eq!(first_overlap(&mut r), None);
        assert!(overlaps(&mut r, 8).is_empty());
    }

    #[test]
    fn the_first_overlap_in_file_order_is_found() {
        let mut r = [
            Region::new("bat", 0x208, 4),
            Region::new("header", 0x200, 1024),
            Region::new("footer", 0, 512),
        ];
        let (a, b) = first_overlap(&mut r).unwrap();
        assert_eq!((a.name, b.name), ("header", "bat"));
    }

    #[test]
    fn a_region_inside_a_long_one_after_a_short_one_is_found() {
        // long covers 0..1000; short 10..20 ends early; inner at 500 still overlaps long.
        let mut r = [
            Region::new("long", 0, 1000),
            Region::new("short", 10, 10),
            Region::new("inner", 500, 1),
        ];
        let all = overlaps(&mut r, 8);
        assert_eq!(all.len(), 2);
        assert_eq!((all[1].0.name, all[1].1.name), ("long", "inner"));
        assert_eq!(overlaps(&mut r, 1).len(), 1);
    }

    /// What `hit` must return, by brute force over the sorted regions: the last one before
    /// `end` that ends after `start`.
    fn hit_by_scan<'a>(idx: &'a RegionIndex<'_>, start: u64, end: u64) -> Option<&'a Region<'a>> {
        if end <= start {
            return None;
        }
        idx.regions()
            .iter()
            .rev()
            .find(|r| r.start < end && r.end() > start)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        #[test]
        fn region_index_hits_what_a_scan_hits(
            spans in proptest::collection::vec((0u64..200, 0u64..80), 0..60),
            short in proptest::collection::vec((0u64..300, 0u64..8), 1..40),
            long in proptest::collection::vec((0u64..300, 0u64..300), 1..10),
        ) {
            let idx = RegionIndex::new(
                spans.iter().map(|&(s, l)| Region::new("r", s, l)).collect(),
            );
            for (start, len) in short.into_iter().chain(long) {
                let got = idx.hit(start, start + len);
                let want = hit_by_scan(&idx, start, start + len);
                // The same position of the sorted list, not only an equal region.
                proptest::prop_assert_eq!(got.map(|r| r as *const Region<'_>), want.map(|r| r as *const Region<'_>));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]
        #[test]
        fn region_index_hits_what_a_scan_hits_for_every_range(
            spans in proptest::collection::vec((0u64..40, 0u64..12), 0..12),
        ) {
            let idx = RegionIndex::new(
                spans.iter().map(|&(s, l)| Region::new("r", s, l)).collect(),
            );
            for start in 0..54 {
                for end in start..56 {
                    let got = idx.hit(start, end).map(|r| r as *const Region<'_>);
                    let want = hit_by_scan(&idx, start, end).map(|r| r as *const Region<'_>);
                    proptest::prop_assert_eq!(got, want, "{}..{}", start, end);
                }
            }
        }
    }

    #[test]
    fn a_region_ending_where_the_range_starts_is_no_hit() {
        // "long" contains the start and ends inside the range; "short" ends at its start and
        // is the last region starting before its end.
        let idx =
            super::RegionIndex::new(vec![Region::new("long", 0, 20), Region::new("short", 9, 1)]);
        assert_eq!(idx.hit(10, 30).map(|r| r.name), Some("long"));
        assert_eq!(idx.hit(9, 30).map(|r| r.name), Some("short"));
        assert_eq!(idx.hit(20, 30).map(|r| r.name), None);
    }

    #[test]
    fn many_short_regions_inside_a_long_one_are_skipped() {
        // The layout that made the backward scan quadratic: each query lands past the short
        // regions but inside the long one.
        let mut regions = vec![Region::new("long", 0, 1 << 40)];
        regions.extend((0..10_000u64).map(|i| Region::new("short", 10 + i * 4, 2)));
        let idx = RegionIndex::new(regions);
        for i in 0..10_000u64 {
            let start = 10 + i * 4 + 2;
            assert_eq!(idx.hit(start, start + 1).map(|r| r.name), Some("long"));
            assert_eq!(idx.hit(start - 1, start).map(|r| r.name), Some("short"));
        }
        assert_eq!(idx.hit(1 << 40, u64::MAX), None);
    }

    #[test]
    fn regions_at_the_end_of_the_address_space_saturate() {
        let mut r = [
            Region::new("a", u64::MAX - 1, 10),
            Region::new("b", u64::MAX - 1, 1),
        ];
        assert!(first_overlap(&mut r).is_some());
    }
}
