//! Refcount tables and blocks.
//!
//! A refcount block is one cluster of `cluster_size * 8 / refcount_bits` entries. Entries of
//! 8 bits and more are big-endian; narrower ones are packed with bit 0 the least significant
//! bit of the first byte (the spec: "bit 0 means the least significant bit").

/// Refcount table entry bits 9-63: offset of the refcount block (bits 0-8 reserved).
pub const REFT_OFFSET_MASK: u64 = !0x1ff;
/// Refcount table entry bits 0-8, which must be zero (qemu's `REFT_RESERVED_MASK`).
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Entries per refcount block.
pub fn entries_per_block(cluster_bits: u32, refcount_order: u32) -> u64 {
    (1u64 << cluster_bits.saturating_add(3)) >> refcount_order.min(6)
}

/// The refcount at `index` of `block` (0 when `index` lies outside it).
pub fn get(block: &[u8], index: u64, refcount_order: u32) -> u64 {
    let order = refcount_order.min(6);
    let bits = 1u64 << order;
    if bits < 8 {
        // `1 << per_byte` entries per byte.
        let per_byte = 3u32.saturating_sub(order);
        let Some(byte) = usize::try_from(index >> per_byte)
            .ok()
            .and_then(|i| block.get(i))
        else {
            return 0;
        };
        let shift = (index & !(u64::MAX << per_byte)) << order;
        return (u64::from(*byte) >> shift) & !(u64::MAX << bits);
    }
    let width = bits / 8;
    let Some(start) = index
        .checked_mul(width)
        .and_then(|s| usize::try_from(s).ok())
    else {
        return 0;
    };
    let Some(bytes) = block.get(start..start.saturating_add(usize::try_from(width).unwrap_or(0)))
    else {
        return 0;
    };
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// How many of the first `entries` entries of `block` are non-zero, a byte or an entry at a
/// time rather than one decode per entry.
pub fn nonzero(block: &[u8], entries: u64, refcount_order: u32) -> u64 {
    let order = refcount_order.min(6);
    let bits = 1u32 << order;
    if bits >= 8 {
        let width = usize::try_from(bits / 8).unwrap_or(1);
        let n = usize::try_from(entries).unwrap_or(usize::MAX);
        return block
            .chunks_exact(width)
            .take(n)
            .filter(|e| e.iter().any(|b| *b != 0))
            .count() as u64;
    }
    // Whole bytes (`1 << per_byte` entries each): fold each entry's bits onto its lowest,
    // then count those.
    let per_byte = 3u32.saturating_sub(order);
    let lowest = (0..1u32 << per_byte).fold(0u8, |m, i| m | 1 << (i << order));
    let whole = entries >> per_byte;
    let full = block
        .iter()
        .take(usize::try_from(whole).unwrap_or(usize::MAX))
        .map(|b| {
            let folded = (1..bits).fold(*b, |x, s| x | b >> s);
            u64::from((folded & lowest).count_ones())
        })
        .sum::<u64>();
    let first = whole << per_byte;
    let rest = (first..entries)
        .filter(|i| get(block, *i, refcount_order) != 0)
        .count() as u64;
    full.saturating_add(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        let b = [0b1011_0001u8, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde];
        assert_eq!(get(&b, 0, 0), 1);
        assert_eq!(get(&b, 4, 0), 1);
        assert_eq!(get(&b, 1, 0), 0);
        assert_eq!(get(&b, 0, 1), 1);
        assert_eq!(get(&b, 3, 1), 2);
        assert_eq!(get(&b, 1, 2), 0xb);
        assert_eq!(get(&b, 1, 3), 0x12);
        assert_eq!(get(&b, 1, 4), 0x3456);
        assert_eq!(get(&b, 1, 5), 0x789a_bcde);
        assert_eq!(get(&b, 0, 6), 0xb112_3456_789a_bcde);
        assert_eq!(get(&b, 100, 4), 0);
        assert_eq!(entries_per_block(16, 4), 32768);
    }

    #[test]
    fn nonzero_counts_agree_with_get() {
        let b = [0b1011_0001u8, 0x12, 0x00, 0x56, 0x00, 0x00, 0x40, 0xde];
        for order in 0..=6 {
            let epb = 64 >> order;
            for entries in 0..=epb + 1 {
                let one_by_one = (0..entries).filter(|i| get(&b, *i, order) != 0).count();
                assert_eq!(
                    nonzero(&b, entries, order),
                    one_by_one as u64,
                    "{order} {entries}"
                );
            }
        }
    }
}
