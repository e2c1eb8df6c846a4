//! The persistent bitmap directory (`docs/interop/qcow2.rst`, "Bitmaps extension"), held to
//! the constraints qemu applies when it loads the directory and its bitmaps
//! (`block/qcow2-bitmap.c`: `bitmap_list_load`, `check_dir_entry`, `load_bitmap_data`,
//! `bitmap_table_load`; `block/dirty-bitmap.c`: `bdrv_create_dirty_bitmap`). An image that
//! breaks one does not open in qemu, so the gate refuses it too, and it does so before any
//! bitmap table is read: the constraints also bound what a table may cost.

use std::collections::HashSet;

use crate::finding::Finding;

use super::table::{be16, be32, be64};

/// qemu's `BME_MAX_TABLE_SIZE`: entries of one bitmap table.
pub const MAX_TABLE_ENTRIES: u32 = 0x800_0000;
/// qemu's `BME_MAX_PHYS_SIZE`: bytes of bitmap data one bitmap may occupy (it keeps the
/// bitmap in RAM).
pub const MAX_PHYS_BYTES: u64 = 0x2000_0000;
/// qemu's `BME_MIN_GRANULARITY_BITS`: 512-byte granularity at least.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// qemu's `BME_MAX_GRANULARITY_BITS`: 2 GiB granularity at most.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// qemu's `BME_MAX_NAME_SIZE` (and `BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_NAME_BYTES: u16 = 1023;

/// Directory entry flag bit 0: the bitmap was in use when the image was last written; its
/// data is inconsistent and qemu does not load it.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1 ("auto"); every other bit is reserved (qemu's `BME_RESERVED_FLAGS`).
const FLAGS_KNOWN: u32 = FLAG_IN_USE | 1 << 1;
/// The only bitmap type: dirty tracking (qemu's `BT_DIRTY_TRACKING_BITMAP`).
const TYPE_DIRTY_TRACKING: u8 = 1;
/// The fixed part of a directory entry, in bytes.
const ENTRY_FIXED: usize = 24;

/// Bitmap table entry bits 9-55: the data cluster's offset (0: none).
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bits 1-8 and 56-63 are reserved (qemu's
/// `BME_TABLE_ENTRY_RESERVED_MASK`).
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry bit 0: with no data cluster, the whole range reads as ones; with one,
/// reserved.
pub const TABLE_ALL_ONES: u64 = 1;

/// One bitmap directory entry that met every constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Position in the directory (0-based).
    pub index: u32,
    /// File offset of the entry.
    pub at: u64,
    /// File offset of the bitmap table (non-zero, cluster aligned).
    pub table_offset: u64,
    /// Entries of the bitmap table (1..=[`MAX_TABLE_ENTRIES`]).
    pub table_size: u32,
}

/// The geometry the constraints depend on.
#[derive(Debug, Clone, Copy)]
pub struct Disk {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The disk length qemu uses (`bdrv_getlength`: whole sectors of the virtual size).
    pub len: u64,
}

fn bad(msg: String, at: u64) -> Finding {
    Finding::reject("qcow2.bitmaps", msg).at(at)
}

/// The bitmap table entries a bitmap of granularity `2^gbits` over `disk` needs: its bits
/// are stored in whole 64-bit words (qemu's `hbitmap_serialization_size`), the words in whole
/// clusters. A 0-byte disk needs none.
pub fn table_entries_needed(disk: Disk, gbits: u8) -> u64 {
    let bits = disk.len.div_ceil(1u64 << gbits.min(63));
    let bytes = bits.div_ceil(64).saturating_mul(8);
    bytes.div_ceil(1u64 << disk.cluster_bits.min(63))
}

/// Parses the directory `dir` (read from `dir_off`), which the extension says holds `nb`
/// bitmaps, and checks each entry as qemu does before it reads any table. The work is one
/// pass over the directory; the names are kept as borrowed slices.
///
/// # Errors
/// The first constraint an entry breaks, as a `qcow2.bitmaps` finding.
pub fn directory(dir: &[u8], dir_off: u64, nb: u32, disk: Disk) -> Result<Vec<Entry>, Finding> {
    let mut out = Vec::new();
    let mut names: HashSet<&[u8]> = HashSet::new();
    let mut pos = 0usize;
    let mut count = 0u32;
    while pos < dir.len() {
        let at = dir_off.saturating_add(pos as u64);
        let Some(e) = dir.get(pos..pos.saturating_add(ENTRY_FIXED)) else {
            return Err(bad(
                format!("bitmap directory entry {count} is cut off by the directory's end"),
                at,
            ));
        };
        if count >= nb {
            return Err(bad(
                format!("the bitmap directory holds more than the {nb} bitmaps the header says"),
                at,
            ));
        }
        let index = count;
        count = count.saturating_add(1);
        let table_offset = be64(e, 0);
        let table_size = be32(e, 8);
        let flags = be32(e, 12);
        let (typ, gbits) = (
            e.get(16).copied().unwrap_or(0),
            e.get(17).copied().unwrap_or(0),
        );
        let name_size = be16(e, 18);
        let extra = be32(e, 20);
        let len = ENTRY_FIXED
            .saturating_add(usize::try_from(extra).unwrap_or(usize::MAX))
            .saturating_add(usize::from(name_size));
        let next = pos.saturating_add(len.div_ceil(8).saturating_mul(8));
        if next > dir.len() {
            return Err(bad(
                format!("bitmap {index} runs past the bitmap directory's end"),
                at,
            ));
        }
        if extra != 0 {
            return Err(bad(
                format!("bitmap {index} has {extra} bytes of extra data (qemu supports none)"),
                at,
            ));
        }
        let problem = entry_problem(table_offset, table_size, flags, typ, gbits, name_size, disk);
        if let Some(why) = problem {
            return Err(bad(format!("bitmap {index} {why}"), at));
        }
        // The name as qemu keeps it (up to a NUL); qemu refuses a second bitmap of one
        // name, unless that one is in use, which it then skips. The gate refuses both: two
        // entries of one name leave the directory ambiguous.
        let name = dir
            .get(pos.saturating_add(ENTRY_FIXED)..pos.saturating_add(len))
            .unwrap_or_default();
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        if !names.insert(name) {
            return Err(bad(
                format!(
                    "bitmap {index} repeats the name {:?} of an earlier bitmap",
                    String::from_utf8_lossy(name)
                ),
                at,
            ));
        }
        out.push(Entry {
            index,
            at,
            table_offset,
            table_size,
        });
        pos = next;
    }
    if count != nb {
        return Err(bad(
            format!("the bitmap directory holds {count} bitmaps, the header says {nb}"),
            dir_off,
        ));
    }
    Ok(out)
}

/// What is wrong with one directory entry's fixed fields, as qemu's `check_dir_entry` and
/// `load_bitmap_data` see it.
fn entry_problem(
    table_offset: u64,
    table_size: u32,
    flags: u32,
    typ: u8,
    gbits: u8,
    name_size: u16,
    disk: Disk,
) -> Option<String> {
    let cs_mask = !(u64::MAX << disk.cluster_bits.min(63));
    if table_size == 0 || table_offset == 0 || table_offset & cs_mask != 0 {
        return Some(format!(
            "has an empty or misaligned bitmap table ({table_size} entries at {table_offset:#x})"
        ));
    }
    if table_size > MAX_TABLE_ENTRIES {
        return Some(format!(
            "has a table of {table_size} entries (qemu allows {MAX_TABLE_ENTRIES})"
        ));
    }
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&gbits) {
        return Some(format!(
            "has granularity 2^{gbits} (qemu allows 2^{MIN_GRANULARITY_BITS} to 2^{MAX_GRANULARITY_BITS})"
        ));
    }
    if flags & !FLAGS_KNOWN != 0 {
        return Some(format!("has reserved flags {:#x}", flags & !FLAGS_KNOWN));
    }
    if name_size > MAX_NAME_BYTES {
        return Some(format!(
            "has a name of {name_size} bytes (qemu allows {MAX_NAME_BYTES})"
        ));
    }
    if typ != TYPE_DIRTY_TRACKING {
        return Some(format!("has type {typ} (only 1, dirty tracking, exists)"));
    }
    let phys = u64::from(table_size).saturating_mul(1u64 << disk.cluster_bits.min(63));
    if phys > MAX_PHYS_BYTES {
        return Some(format!(
            "occupies {phys} bytes of bitmap data (qemu allows {MAX_PHYS_BYTES})"
        ));
    }
    // qemu does not load an in-use bitmap's data, so its table may have any size within the
    // limits above (a bitmap left inconsistent by a resize is allowed).
    if flags & FLAG_IN_USE != 0 {
        return None;
    }
    // check_dir_entry: the table must cover the disk; phys * 8 << 31 is below 2^64 here.
    let covered = phys.saturating_mul(8).checked_shl(u32::from(gbits));
    let needed = table_entries_needed(disk, gbits);
    if covered.is_none_or(|c| disk.len > c) || u64::from(table_size) != needed {
        return Some(format!(
            "has a table of {table_size} entries where the disk needs {needed} (qemu cannot load it)"
        ));
    }
    None
}

/// What is wrong with one bitmap table entry, as qemu's `check_table_entry` sees it.
pub fn table_entry_problem(entry: u64, cluster_bits: u32) -> Option<&'static str> {
    if entry & TABLE_RESERVED_MASK != 0 {
        return Some("has reserved bits set");
    }
    let off = entry & TABLE_OFFSET_MASK;
    if off != 0 && entry & TABLE_ALL_ONES != 0 {
        return Some("has both a data cluster and the all-ones bit");
    }
    if off & !(u64::MAX << cluster_bits.min(63)) != 0 {
        return Some("names a misaligned data cluster");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(off: u64, size: u32, flags: u32, typ: u8, gbits: u8, name: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        e.extend_from_slice(&off.to_be_bytes());
        e.extend_from_slice(&size.to_be_bytes());
        e.extend_from_slice(&flags.to_be_bytes());
        e.extend_from_slice(&[typ, gbits]);
        e.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        e.extend_from_slice(&0u32.to_be_bytes());
        e.extend_from_slice(name);
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    const DISK: Disk = Disk {
        cluster_bits: 16,
        len: 1 << 30,
    };

    #[test]
    fn table_size_follows_qemus_serialization() {
        // 1 GiB at 64 KiB granularity: 16 Ki bits, 2 KiB, one cluster.
        assert_eq!(table_entries_needed(DISK, 16), 1);
        // 2 TiB at 512 bytes: 2^32 bits, 512 MiB, 8192 clusters of 64 KiB.
        let big = Disk {
            cluster_bits: 16,
            len: 2 << 40,
        };
        assert_eq!(table_entries_needed(big, 9), 8192);
        // 64 bits are stored as one word: 8 bytes of a 512-byte cluster.
        let small = Disk {
            cluster_bits: 9,
            len: 1,
        };
        assert_eq!(table_entries_needed(small, 9), 1);
        assert_eq!(table_entries_needed(Disk { len: 0, ..small }, 9), 0);
    }

    #[test]
    fn each_constraint_is_a_finding() {
        let ok = entry(0x10000, 1, 2, 1, 16, b"a");
        assert_eq!(directory(&ok, 0, 1, DISK).unwrap().len(), 1);
        let cases: Vec<(Vec<u8>, u32)> = vec![
            (entry(0x10000, 5, 0, 1, 16, b"a"), 1), // wrong table size
            (entry(0x10000, 1, 0, 1, 40, b"a"), 1), // granularity
            (entry(0x10000, 1, 0, 1, 8, b"a"), 1),  // granularity
            (entry(0x10000, 1, 4, 1, 16, b"a"), 1), // reserved flag
            (entry(0x10000, 1, 0, 2, 16, b"a"), 1), // type
            (entry(0x10001, 1, 0, 1, 16, b"a"), 1), // misaligned table
            (entry(0, 1, 0, 1, 16, b"a"), 1),       // no table
            (entry(0x10000, 0, 0, 1, 16, b"a"), 1), // empty table
            (entry(0x10000, 1 << 14, 1, 1, 16, b"a"), 1), // 1 GiB of data
            (entry(0x10000, 1, 0, 1, 16, &[b'a'; 1024]), 1), // name
            (entry(0x10000, 1, 0, 1, 16, b"a"), 2), // fewer than the header says
            ([ok.clone(), ok.clone()].concat(), 2), // duplicate name
            ([ok.clone(), ok.clone()].concat(), 1), // more than the header says
            (ok[..20].to_vec(), 1),                 // cut off
        ];
        for (n, (dir, nb)) in cases.into_iter().enumerate() {
            let f = directory(&dir, 0, nb, DISK).expect_err(&format!("case {n}"));
            assert_eq!(f.code, "qcow2.bitmaps", "case {n}");
        }
        let mut extra = entry(0x10000, 1, 0, 1, 16, b"a");
        extra[20..24].copy_from_slice(&8u32.to_be_bytes());
        extra.extend_from_slice(&[0; 8]);
        assert!(directory(&extra, 0, 1, DISK).is_err());
        // In use: the table size is not checked against the disk.
        let in_use = entry(0x10000, 5, 1, 1, 16, b"a");
        assert!(directory(&in_use, 0, 1, DISK).is_ok());
    }

    #[test]
    fn table_entries_are_checked_as_qemu_does() {
        assert_eq!(table_entry_problem(0, 16), None);
        assert_eq!(table_entry_problem(1, 16), None);
        assert_eq!(table_entry_problem(0x10000, 16), None);
        assert!(table_entry_problem(0x10001, 16).is_some());
        assert!(table_entry_problem(0x10200, 16).is_some());
        assert!(table_entry_problem(2, 16).is_some());
        assert!(table_entry_problem(1 << 63, 16).is_some());
    }
}
