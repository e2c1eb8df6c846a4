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

/// Regions sorted for "what does this range overlap?" queries: O(log n) to find the candidates,
/// then a scan back over the ones that reach far enough. Every format's check asks this of each
/// table entry (does this block, grain or cluster land on metadata?).
#[derive(Debug, Clone, Default)]
pub struct RegionIndex<'a> {
    regions: Vec<Region<'a>>,
    /// Running maximum of region ends, by sorted position.
    reach: Vec<u64>,
}

impl<'a> RegionIndex<'a> {
    /// An index of `regions` (empty regions dropped).
    pub fn new(mut regions: Vec<Region<'a>>) -> Self {
        regions.retain(|r| r.len > 0);
        regions.sort_unstable_by_key(|r| (r.start, r.len));
        let mut m = 0u64;
        let reach = regions
            .iter()
            .map(|r| {
                m = m.max(r.end());
                m
            })
            .collect();
        RegionIndex { regions, reach }
    }

    /// A region that `[start, end)` shares a byte with, if any (the latest-starting one).
    pub fn hit(&self, start: u64, end: u64) -> Option<&Region<'a>> {
        if end <= start {
            return None;
        }
        let n = self.regions.partition_point(|r| r.start < end);
        let last = n.checked_sub(1)?;
        if self.reach.get(last).copied().unwrap_or(0) <= start {
            return None;
        }
        self.regions
            .get(..n)?
            .iter()
            .rev()
            .find(|r| r.end() > start)
    }

    /// The regions, sorted by start.
    pub fn regions(&self) -> &[Region<'a>] {
        &self.regions
    }
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

    #[test]
    fn regions_at_the_end_of_the_address_space_saturate() {
        let mut r = [
            Region::new("a", u64::MAX - 1, 10),
            Region::new("b", u64::MAX - 1, 1),
        ];
        assert!(first_overlap(&mut r).is_some());
    }
}
