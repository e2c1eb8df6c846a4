//! Partition-table and boot-sector facts (MBR, GPT, FAT), reported as details of raw and
//! hybrid ISO images.
//!
//! Everything here works on a head that was already read in full (at most [`HEAD_LEN`] bytes).
//! Nothing is read beyond it: a GPT entry array that continues past the head is described only
//! as far as the head reaches, and its checksum is then not verified.

use nom::bytes::complete::take;
use nom::number::complete::{le_u16, le_u32, le_u64, le_u8};
use nom::IResult;
use serde_json::{json, Map, Value};

use crate::finding::Finding;
use crate::limits::Limits;
use crate::table::{check_table, TableSpec};

/// Bytes of the head that [`describe`] looks at: the MBR, the GPT header and the first
/// GPT entries.
pub const HEAD_LEN: usize = 64 * 1024;

/// The logical sector size assumed for MBR addresses, and tried first for GPT. Like qemu and
/// the kernel's default for image files, tables are read with 512-byte sectors.
const SECTOR: u64 = 512;
/// The other logical sector size a GPT is looked for with (4Kn disks put the header at byte
/// 4096, LBA 1 of 4096-byte sectors).
const SECTOR_4K: u64 = 4096;
/// MBR boot signature at offset 510: bytes 0x55 0xAA.
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xAA];
/// Offset of the four 16-byte MBR partition entries.
const MBR_ENTRIES: usize = 446;
/// MBR partition type of a protective MBR guarding a GPT.
const MBR_TYPE_PROTECTIVE: u8 = 0xEE;
/// GPT header signature at LBA 1.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// Smallest GPT header (UEFI 2.x: 92 bytes); the header CRC covers `header_size` bytes.
const GPT_HEADER_MIN: u32 = 92;
/// Smallest GPT partition entry (UEFI: 128 bytes, a multiple of 8 beyond that).
const GPT_ENTRY_MIN: u32 = 128;
/// Largest entry size we describe; real tables use 128.
const GPT_ENTRY_MAX: u32 = 4096;
/// At most this many partitions are listed, whatever the table declares.
const MAX_LISTED: usize = 128;

/// One MBR partition entry (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MbrEntry {
    /// Boot indicator: 0x80 marks the active (bootable) partition.
    status: u8,
    /// Start address in CHS form (head, sector and cylinder bits, cylinder).
    chs_first: [u8; 3],
    /// Partition type byte (0 = unused entry).
    kind: u8,
    /// First sector, in 512-byte LBA units.
    lba_start: u32,
    /// Length, in 512-byte sectors.
    sectors: u32,
}

fn mbr_entry(i: &[u8]) -> IResult<&[u8], MbrEntry> {
    let (i, status) = le_u8(i)?;
    let (i, chs_first) = take(3usize)(i)?;
    let (i, kind) = le_u8(i)?;
    let (i, _chs_last) = take(3usize)(i)?;
    let (i, lba_start) = le_u32(i)?;
    let (i, sectors) = le_u32(i)?;
    let chs_first = <[u8; 3]>::try_from(chs_first).unwrap_or_default();
    Ok((
        i,
        MbrEntry {
            status,
            chs_first,
            kind,
            lba_start,
            sectors,
        },
    ))
}

/// The fields of a GPT header that we use.
#[derive(Debug, Clone, Copy)]
struct GptHeader {
    /// Size of the header in bytes, covered by `header_crc`.
    header_size: u32,
    /// CRC32 of the header's first `header_size` bytes, computed with this field zeroed.
    header_crc: u32,
    /// LBA of this header (1 for the primary).
    my_lba: u64,
    /// Disk GUID.
    disk_guid: [u8; 16],
    /// Starting LBA of the partition entry array.
    entries_lba: u64,
    /// Number of entries in the array.
    entries_count: u32,
    /// Size of one entry in bytes.
    entry_size: u32,
    /// CRC32 of the whole entry array (`entries_count * entry_size` bytes).
    entries_crc: u32,
}

fn gpt_header(i: &[u8]) -> IResult<&[u8], GptHeader> {
    let (i, _sig) = take(8usize)(i)?;
    let (i, _revision) = le_u32(i)?;
    let (i, header_size) = le_u32(i)?;
    let (i, header_crc) = le_u32(i)?;
    let (i, _reserved) = le_u32(i)?;
    let (i, my_lba) = le_u64(i)?;
    let (i, _alternate_lba) = le_u64(i)?;
    let (i, _first_usable) = le_u64(i)?;
    let (i, _last_usable) = le_u64(i)?;
    let (i, guid) = take(16usize)(i)?;
    let (i, entries_lba) = le_u64(i)?;
    let (i, entries_count) = le_u32(i)?;
    let (i, entry_size) = le_u32(i)?;
    let (i, entries_crc) = le_u32(i)?;
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(guid);
    Ok((
        i,
        GptHeader {
            header_size,
            header_crc,
            my_lba,
            disk_guid,
            entries_lba,
            entries_count,
            entry_size,
            entries_crc,
        },
    ))
}

/// One GPT partition entry (first 128 bytes).
struct GptEntry {
    /// Partition type GUID (all zeros = unused entry).
    type_guid: [u8; 16],
    /// First LBA (inclusive).
    first_lba: u64,
    /// Last LBA (inclusive).
    last_lba: u64,
    /// Partition name, 36 UTF-16LE code units.
    name: String,
}

fn gpt_entry(i: &[u8]) -> IResult<&[u8], GptEntry> {
    let (i, t) = take(16usize)(i)?;
    let (i, _unique) = take(16usize)(i)?;
    let (i, first_lba) = le_u64(i)?;
    let (i, last_lba) = le_u64(i)?;
    let (i, _attributes) = le_u64(i)?;
    let mut i = i;
    let mut units = Vec::with_capacity(36);
    for _ in 0..36 {
        let (rest, u) = le_u16(i)?;
        i = rest;
        if u == 0 {
            break;
        }
        units.push(u);
    }
    let name = String::from_utf16_lossy(&units);
    let mut type_guid = [0u8; 16];
    type_guid.copy_from_slice(t);
    Ok((
        i,
        GptEntry {
            type_guid,
            first_lba,
            last_lba,
            name,
        },
    ))
}

/// Formats a GUID stored in the mixed-endian EFI layout (first three fields little-endian).
fn guid_string(g: &[u8; 16]) -> String {
    let [a0, a1, a2, a3, b0, b1, c0, c1, d @ ..] = *g;
    let mut s = format!("{a3:02x}{a2:02x}{a1:02x}{a0:02x}-{b1:02x}{b0:02x}-{c1:02x}{c0:02x}-");
    for (k, byte) in d.iter().enumerate() {
        if k == 2 {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

/// Byte of a FAT BIOS parameter block holding the number of FATs.
const BPB_NUM_FATS: usize = 0x10;
/// Byte of a FAT BIOS parameter block holding the media descriptor.
const BPB_MEDIA: usize = 0x15;
/// Media descriptor of a fixed disk.
const MEDIA_FIXED_DISK: u8 = 0xF8;

/// True when the first sector(s) of a file, `head`, read as a partition table to some
/// consumer that reads the file as a raw disk: the sector ends in the MBR signature and is
/// not a FAT volume boot record by every reader's test (see [`fat_boot_record_only`]).
/// Detection uses it to find containers that also carry a partition table
/// ([`crate::detect::Detection::partition_table`]). Pass the whole head: the GPT header of a
/// 4Kn disk is looked for at byte 4096.
///
/// # Security
/// Deliberately a superset of Glance's inspector (which calls any 0x55AA sector `gpt` unless
/// bytes 0x10 and 0x15 are 2 and 0xF8) and of the Linux kernel's msdos parser (which reads
/// the entries whenever every boot indicator is 0x00 or 0x80): those two bytes alone are
/// what an attacker sets to hide a table from a weaker test.
pub fn table_signature(head: &[u8]) -> bool {
    head.get(510..512) == Some(&MBR_SIGNATURE[..]) && !fat_boot_record_only(head)
}

/// True when a 0x55AA sector is a FAT volume boot record to every reader, so that none of
/// them sees a partition table in it:
/// - glimpse's own BPB test ([`fat_kind`]: jump, sector size, FAT label);
/// - Glance's test (two FATs, the fixed-disk media byte), without which it reports `gpt`;
/// - the Linux kernel's msdos parser, which takes the sector for a table unless some boot
///   indicator is neither 0x00 nor 0x80 (`block/partitions/msdos.c`);
/// - no entry of protective type 0xEE and no `EFI PART` header at byte 512 or 4096: the
///   kernel's and firmware's GPT readers need only those, whatever the rest of the sector
///   holds.
fn fat_boot_record_only(head: &[u8]) -> bool {
    let glance_fat =
        head.get(BPB_NUM_FATS) == Some(&2) && head.get(BPB_MEDIA) == Some(&MEDIA_FIXED_DISK);
    let status_invalid = (0..4usize).any(|k| {
        let at = MBR_ENTRIES.saturating_add(k.saturating_mul(16));
        head.get(at).is_some_and(|s| !matches!(s, 0x00 | 0x80))
    });
    let protective = mbr_entries(head)
        .iter()
        .any(|(_, e)| e.kind == MBR_TYPE_PROTECTIVE);
    fat_kind(head).is_some()
        && glance_fat
        && status_invalid
        && !protective
        && !gpt_signature_at(head, SECTOR)
        && !gpt_signature_at(head, SECTOR_4K)
}

/// True when `head` starts with a FAT boot sector (BIOS parameter block).
fn fat_kind(head: &[u8]) -> Option<(&'static str, u16)> {
    let jump = head.first().copied()?;
    let jump_ok = match jump {
        0xEB => head.get(2) == Some(&0x90),
        0xE9 => true,
        _ => false,
    };
    if !jump_ok {
        return None;
    }
    let bps_bytes = head.get(11..13)?;
    let (_, bytes_per_sector) = le_u16::<_, nom::error::Error<&[u8]>>(bps_bytes).ok()?;
    // Microsoft's FAT specification allows 512, 1024, 2048 and 4096 bytes per sector.
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) {
        return None;
    }
    // The file-system type label is informational in the spec, but every formatter writes it
    // and it is what tells FAT12/16 (offset 54) from FAT32 (offset 82).
    let kind = match (head.get(54..62), head.get(82..90)) {
        (Some(b"FAT12   "), _) => "fat12",
        (Some(b"FAT16   "), _) => "fat16",
        (_, Some(b"FAT32   ")) => "fat32",
        _ => return None,
    };
    Some((kind, bytes_per_sector))
}

/// Byte offset of the end of a partition, or `None` when the LBA arithmetic overflows.
fn end_bytes(first_lba: u64, sectors: u64, sector: u64) -> Option<u64> {
    first_lba.checked_add(sectors)?.checked_mul(sector)
}

/// True when a GPT header signature stands at LBA 1 for `sector`-byte sectors.
fn gpt_signature_at(head: &[u8], sector: u64) -> bool {
    let Ok(at) = usize::try_from(sector) else {
        return false;
    };
    head.get(at..at.saturating_add(8)) == Some(&GPT_SIGNATURE[..])
}

/// A described GPT: partitions, disk GUID, logical sector size.
type Gpt = (Vec<Value>, String, u64);

/// Reads the primary GPT with 512-byte sectors, or failing that with 4096-byte ones.
fn find_gpt(head: &[u8], size: u64, limits: &Limits, findings: &mut Vec<Finding>) -> Option<Gpt> {
    if gpt_signature_at(head, SECTOR) {
        describe_gpt(head, size, SECTOR, limits, findings)
    } else if gpt_signature_at(head, SECTOR_4K) {
        describe_gpt(head, size, SECTOR_4K, limits, findings)
    } else {
        None
    }
}

/// Describes the partition tables found in `head` (the first bytes of a disk of `size`
/// bytes) under the default [`Limits`]: [`describe_with`] for a caller without limits of
/// its own.
pub fn describe(head: &[u8], size: u64) -> (Map<String, Value>, Vec<Finding>) {
    describe_with(head, size, &Limits::default())
}

/// Describes the partition tables found in `head` (the first bytes of a disk of `size`
/// bytes). Returns details for `format-specific.data` and informational findings. The GPT
/// entry array is range-checked under the caller's `limits`.
///
/// # Security
/// Works only on `head`; all offsets come from constants or are checked with `get`, and at
/// most `MAX_LISTED` partitions are listed.
pub fn describe_with(
    head: &[u8],
    size: u64,
    limits: &Limits,
) -> (Map<String, Value>, Vec<Finding>) {
    let mut details = Map::new();
    let mut findings = Vec::new();

    let fat = fat_kind(head);
    if let Some((kind, bps)) = fat {
        details.insert("boot-sector".into(), json!(kind));
        details.insert("bytes-per-sector".into(), json!(bps));
    }

    let has_signature = head.get(510..512) == Some(&MBR_SIGNATURE[..]);
    // A FAT volume boot record also ends in 0x55AA; its "entries" are boot code, not a table.
    let (table, partitions) = if has_signature && fat.is_none() {
        let entries = mbr_entries(head);
        let protective = entries.iter().any(|(_, e)| e.kind == MBR_TYPE_PROTECTIVE);
        match find_gpt(head, size, limits, &mut findings) {
            Some(gpt) => ("gpt", gpt_details(&mut details, gpt, protective)),
            None => ("mbr", mbr_partitions(entries, size, &mut findings)),
        }
    } else if let Some(gpt) = find_gpt(head, size, limits, &mut findings) {
        // A GPT without a protective MBR still is a GPT.
        ("gpt", gpt_details(&mut details, gpt, false))
    } else {
        ("none", Vec::new())
    };

    details.insert("partition-table".into(), json!(table));
    if table != "none" {
        details.insert("partitions".into(), Value::Array(partitions));
    }
    findings.extend(image_service_mbr(head));
    (details, findings)
}

/// MBR type byte of an unused entry.
const MBR_TYPE_UNUSED: u8 = 0;
/// The start CHS a protective MBR entry must carry: head 0, sector 2, cylinder 0 (LBA 1).
const PROTECTIVE_START_CHS: [u8; 3] = [0x00, 0x02, 0x00];

/// `raw.mbr-invalid` (a warning; the image-service gate rejects it, see
/// [`crate::policy::Policy::image_service`]) when the first sector fails the boot-sector rules
/// of OpenStack Glance's format inspector, which then refuses a raw upload: the sector ends in
/// 0x55AA and is not a FAT boot record by Glance's test (two FATs and the fixed-disk media
/// byte), and
/// - a boot indicator is neither 0x00 nor 0x80 (in any of the four slots, used or not); or
/// - a protective (0xEE) entry does not start at CHS 0/2/0 and LBA 1; or
/// - a protective entry is not the only entry in use, or not in the first slot; or
/// - no entry is in use.
///
/// These are stricter than qemu, the kernel and firmware (a converter loses nothing by
/// ignoring them), so they are not the reader's business: only a gate for an image service
/// acts on them. Checked whatever else the head holds (a GPT header, a hybrid ISO's system
/// area), as Glance checks it.
///
/// # Security
/// Reads only `head[..512]`, through `get`.
fn image_service_mbr(head: &[u8]) -> Option<Finding> {
    let sector = head.get(..512)?;
    if sector.get(510..512) != Some(&MBR_SIGNATURE[..]) {
        return None;
    }
    if sector.get(BPB_NUM_FATS) == Some(&2) && sector.get(BPB_MEDIA) == Some(&MEDIA_FIXED_DISK) {
        return None;
    }
    let invalid = |at: usize, why: String| {
        Some(
            Finding::warn(
                "raw.mbr-invalid",
                format!("{why}: OpenStack Glance's format inspector refuses such a raw disk"),
            )
            .at(at as u64),
        )
    };
    let mut used = Vec::new();
    let mut protective = false;
    for k in 0..4usize {
        let at = MBR_ENTRIES.saturating_add(k.saturating_mul(16));
        let (_, e) = sector.get(at..).and_then(|b| mbr_entry(b).ok())?;
        let slot = k.saturating_add(1);
        if !matches!(e.status, 0x00 | 0x80) {
            return invalid(
                at,
                format!(
                    "MBR entry {slot} has boot indicator {:#04x} (only 0x00 and 0x80 are valid)",
                    e.status
                ),
            );
        }
        if e.kind != MBR_TYPE_UNUSED {
            used.push(k);
        }
        if e.kind == MBR_TYPE_PROTECTIVE {
            protective = true;
            if e.chs_first != PROTECTIVE_START_CHS {
                let [a, b, c] = e.chs_first;
                return invalid(
                    at,
                    format!(
                        "the protective MBR entry {slot} starts at CHS {a:02x} {b:02x} {c:02x}, not 00 02 00"
                    ),
                );
            }
            if e.lba_start != 1 {
                return invalid(
                    at,
                    format!(
                        "the protective MBR entry {slot} starts at LBA {}, not 1",
                        e.lba_start
                    ),
                );
            }
        }
    }
    if protective && used != [0] {
        return invalid(
            MBR_ENTRIES,
            "a protective MBR must hold its 0xEE entry in slot 1 and no other entry".to_string(),
        );
    }
    if used.is_empty() {
        return invalid(
            MBR_ENTRIES,
            "the boot sector ends in 0x55AA but defines no partition".to_string(),
        );
    }
    None
}

/// The four MBR entries that are in use, with their slot.
fn mbr_entries(head: &[u8]) -> Vec<(usize, MbrEntry)> {
    let mut entries = Vec::new();
    for k in 0..4usize {
        let off = MBR_ENTRIES.saturating_add(k.saturating_mul(16));
        if let Some((_, e)) = head.get(off..).and_then(|b| mbr_entry(b).ok()) {
            if e.kind != 0 {
                entries.push((k, e));
            }
        }
    }
    entries
}

/// The GPT's details; returns its partitions.
fn gpt_details(details: &mut Map<String, Value>, gpt: Gpt, protective: bool) -> Vec<Value> {
    let (parts, guid, sector) = gpt;
    details.insert("disk-guid".into(), json!(guid));
    details.insert("protective-mbr".into(), json!(protective));
    details.insert("logical-sector-size".into(), json!(sector));
    parts
}

/// The MBR's partitions, each checked against the disk's end.
fn mbr_partitions(
    entries: Vec<(usize, MbrEntry)>,
    size: u64,
    findings: &mut Vec<Finding>,
) -> Vec<Value> {
    if entries.is_empty() {
        findings.push(
            Finding::warn(
                "raw.mbr-no-partitions",
                "the MBR has a boot signature but no partition entries",
            )
            .at(MBR_ENTRIES as u64),
        );
    }
    let mut partitions = Vec::new();
    for (k, e) in entries {
        let end = end_bytes(u64::from(e.lba_start), u64::from(e.sectors), SECTOR);
        if end.is_none_or(|end| end > size) {
            findings.push(
                Finding::warn(
                    "raw.partition-out-of-bounds",
                    format!(
                        "MBR partition {} (sectors {}+{}) ends past the end of the disk ({size} bytes)",
                        k.saturating_add(1),
                        e.lba_start,
                        e.sectors
                    ),
                )
                .at(MBR_ENTRIES.saturating_add(k.saturating_mul(16)) as u64),
            );
        }
        partitions.push(json!({
            "index": k.saturating_add(1),
            "type": format!("0x{:02x}", e.kind),
            "bootable": e.status == 0x80,
            "start": u64::from(e.lba_start).saturating_mul(SECTOR),
            "length": u64::from(e.sectors).saturating_mul(SECTOR),
        }));
    }
    partitions
}

/// Reads the primary GPT at LBA 1 of `sector`-byte sectors. `None` when there is no usable
/// GPT header there.
fn describe_gpt(
    head: &[u8],
    size: u64,
    sector: u64,
    limits: &Limits,
    findings: &mut Vec<Finding>,
) -> Option<Gpt> {
    let at = usize::try_from(sector).ok()?;
    let hdr_bytes = head.get(at..at.checked_add(512)?)?;
    if hdr_bytes.get(..8) != Some(&GPT_SIGNATURE[..]) {
        return None;
    }
    let (_, h) = gpt_header(hdr_bytes).ok()?;
    gpt_header_findings(hdr_bytes, &h, sector, findings)?;
    let guid = guid_string(&h.disk_guid);
    if !(GPT_ENTRY_MIN..=GPT_ENTRY_MAX).contains(&h.entry_size) || h.entry_size % 8 != 0 {
        findings.push(
            Finding::warn(
                "raw.gpt-checksum",
                format!("GPT entry size {} is not valid", h.entry_size),
            )
            .at(sector),
        );
        return Some((Vec::new(), guid, sector));
    }
    let start = gpt_array_findings(head, &h, size, sector, limits, findings)?;
    let Some(start) = start else {
        return Some((Vec::new(), guid, sector));
    };
    let parts = gpt_partitions(head, &h, start, size, sector, findings)?;
    Some((parts, guid, sector))
}

/// The header's own CRC32 and its claimed place.
fn gpt_header_findings(
    hdr_bytes: &[u8],
    h: &GptHeader,
    sector: u64,
    findings: &mut Vec<Finding>,
) -> Option<()> {
    let hsize = usize::try_from(h.header_size).ok()?;
    let crc_ok = match hdr_bytes.get(..hsize) {
        Some(covered) if h.header_size >= GPT_HEADER_MIN => {
            let mut copy = covered.to_vec();
            if let Some(field) = copy.get_mut(16..20) {
                field.fill(0);
            }
            crc32fast::hash(&copy) == h.header_crc
        }
        _ => false,
    };
    if !crc_ok {
        findings.push(
            Finding::warn(
                "raw.gpt-checksum",
                format!(
                    "the GPT header CRC32 does not match (header size {})",
                    h.header_size
                ),
            )
            .at(sector),
        );
    }
    if h.my_lba != 1 {
        findings.push(
            Finding::warn(
                "raw.gpt-checksum",
                format!("the primary GPT header says it lives at LBA {}", h.my_lba),
            )
            .at(sector),
        );
    }
    Some(())
}

/// The entry array's range (a metadata table like any other: inside the disk, under the
/// table cap) and, when it lies wholly in the head, its CRC32. Returns where the array starts
/// in the head, if that is addressable.
fn gpt_array_findings(
    head: &[u8],
    h: &GptHeader,
    size: u64,
    sector: u64,
    limits: &Limits,
    findings: &mut Vec<Finding>,
) -> Option<Option<usize>> {
    // Only what lies inside the head is described either way.
    let spec = TableSpec {
        name: "GPT partition entry array",
        offset: h.entries_lba.saturating_mul(sector),
        entries: u64::from(h.entries_count),
        entry_size: u64::from(h.entry_size),
        align: sector,
    };
    if let Err(e) = check_table(spec, size, limits) {
        findings.push(Finding::warn("raw.gpt-checksum", e.message().to_string()).at(sector));
    }
    let esize = usize::try_from(h.entry_size).ok()?;
    let start = h
        .entries_lba
        .checked_mul(sector)
        .and_then(|s| usize::try_from(s).ok());
    let total = usize::try_from(h.entries_count)
        .ok()
        .and_then(|c| c.checked_mul(esize));
    if let (Some(start), Some(total)) = (start, total) {
        if let Some(array) = start
            .checked_add(total)
            .and_then(|end| head.get(start..end))
        {
            if crc32fast::hash(array) != h.entries_crc {
                findings.push(
                    Finding::warn(
                        "raw.gpt-checksum",
                        "the GPT partition entry array CRC32 does not match",
                    )
                    .at(start as u64),
                );
            }
        }
    }
    Some(start)
}

/// The used GPT entries that lie in the head (at most [`MAX_LISTED`]), each checked against
/// the disk's end.
fn gpt_partitions(
    head: &[u8],
    h: &GptHeader,
    start: usize,
    size: u64,
    sector: u64,
    findings: &mut Vec<Finding>,
) -> Option<Vec<Value>> {
    let esize = usize::try_from(h.entry_size).ok()?;
    let mut parts = Vec::new();
    let count = usize::try_from(h.entries_count).unwrap_or(usize::MAX);
    for k in 0..count {
        if parts.len() >= MAX_LISTED {
            break;
        }
        let Some(off) = k.checked_mul(esize).and_then(|o| o.checked_add(start)) else {
            break;
        };
        let Some(bytes) = off.checked_add(esize).and_then(|end| head.get(off..end)) else {
            break;
        };
        let Ok((_, e)) = gpt_entry(bytes) else { break };
        if e.type_guid == [0u8; 16] {
            continue;
        }
        let sectors = e
            .last_lba
            .checked_sub(e.first_lba)
            .and_then(|d| d.checked_add(1));
        let end = sectors.and_then(|s| end_bytes(e.first_lba, s, sector));
        if end.is_none_or(|end| end > size) {
            findings.push(
                Finding::warn(
                    "raw.partition-out-of-bounds",
                    format!(
                        "GPT partition {} (LBA {}..={}) ends past the end of the disk ({size} bytes)",
                        k.saturating_add(1),
                        e.first_lba,
                        e.last_lba
                    ),
                )
                .at(off as u64),
            );
        }
        parts.push(json!({
            "index": k.saturating_add(1),
            "type-guid": guid_string(&e.type_guid),
            "name": e.name,
            "first-lba": e.first_lba,
            "last-lba": e.last_lba,
            "start": e.first_lba.saturating_mul(sector),
            "length": sectors.unwrap_or(0).saturating_mul(sector),
        }));
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        for (k, (t, s, n)) in entries.iter().enumerate() {
            let o = 446 + 16 * k;
            if *t == MBR_TYPE_PROTECTIVE {
                // start CHS 0/2/0, as partitioning tools write it (and Glance requires)
                b[o + 2] = 2;
            }
            b[o + 4] = *t;
            b[o + 8..o + 12].copy_from_slice(&s.to_le_bytes());
            b[o + 12..o + 16].copy_from_slice(&n.to_le_bytes());
        }
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    #[test]
    fn mbr_entries_and_findings() {
        let (d, f) = describe(&mbr(&[(0x83, 2048, 2048)]), 2 << 20);
        assert_eq!(d["partition-table"], "mbr");
        assert_eq!(d["partitions"][0]["start"], 1 << 20);
        assert!(f.is_empty(), "{f:?}");
        let (_, f) = describe(&mbr(&[(0x83, 2048, 4096)]), 2 << 20);
        assert_eq!(f[0].code, "raw.partition-out-of-bounds");
        let (_, f) = describe(&mbr(&[(0x83, u32::MAX, u32::MAX)]), 2 << 20);
        assert_eq!(f[0].code, "raw.partition-out-of-bounds");
        let (_, f) = describe(&mbr(&[]), 2 << 20);
        assert_eq!(f[0].code, "raw.mbr-no-partitions");
    }

    #[test]
    fn nothing_in_zeros_or_short_heads() {
        for n in [0usize, 1, 100, 511, 512, 1024] {
            let (d, f) = describe(&vec![0u8; n], n as u64);
            assert_eq!(d["partition-table"], "none");
            assert!(f.is_empty());
        }
    }

    #[test]
    fn gpt_entry_array_outside_the_disk_is_flagged() {
        let mut b = vec![0u8; 8192];
        b[446 + 2] = 2;
        b[446 + 4] = MBR_TYPE_PROTECTIVE;
        b[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        b[446 + 12..446 + 16].copy_from_slice(&15u32.to_le_bytes());
        b[510] = 0x55;
        b[511] = 0xAA;
        let h = &mut b[512..604];
        h[..8].copy_from_slice(GPT_SIGNATURE);
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        // 2^32 - 1 entries at LBA 2^40: far outside an 8 KiB disk.
        h[72..80].copy_from_slice(&(1u64 << 40).to_le_bytes());
        h[80..84].copy_from_slice(&u32::MAX.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        let crc = crc32fast::hash(&b[512..604]);
        b[528..532].copy_from_slice(&crc.to_le_bytes());
        let (d, f) = describe(&b, 8192);
        assert_eq!(d["partition-table"], "gpt");
        assert_eq!(d["partitions"].as_array().unwrap().len(), 0);
        let codes: Vec<_> = f.iter().map(|f| f.code).collect();
        assert_eq!(codes, ["raw.gpt-checksum"]);
    }

    /// A 4Kn disk image: protective MBR, GPT header at byte 4096 (LBA 1), 128 entries at LBA 2
    /// with one partition at LBAs 6..=`last`, valid CRCs.
    fn gpt_4k(last: u64) -> Vec<u8> {
        let mut b = mbr(&[(MBR_TYPE_PROTECTIVE, 1, u32::MAX)]);
        b.resize(64 * 1024, 0);
        let e = 8192;
        b[e..e + 16].copy_from_slice(&[0xaf; 16]);
        b[e + 16..e + 32].copy_from_slice(&[0x11; 16]);
        b[e + 32..e + 40].copy_from_slice(&6u64.to_le_bytes());
        b[e + 40..e + 48].copy_from_slice(&last.to_le_bytes());
        b[e + 56..e + 58].copy_from_slice(&u16::from(b'r').to_le_bytes());
        let entries_crc = crc32fast::hash(&b[e..e + 128 * 128]);
        let h = &mut b[4096..4096 + 92];
        h[..8].copy_from_slice(GPT_SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[56..72].copy_from_slice(&[0x42; 16]);
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[4096..4096 + 92]);
        b[4096 + 16..4096 + 20].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// One sector with `entries` (slot, boot indicator, start CHS, type, start LBA) and the
    /// boot signature.
    fn sector(entries: &[(usize, u8, [u8; 3], u8, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        for &(k, status, chs, kind, lba) in entries {
            let e = MBR_ENTRIES + 16 * k;
            b[e] = status;
            b[e + 1..e + 4].copy_from_slice(&chs);
            b[e + 4] = kind;
            b[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
            b[e + 12..e + 16].copy_from_slice(&2048u32.to_le_bytes());
        }
        b[510..512].copy_from_slice(&MBR_SIGNATURE);
        b
    }

    #[test]
    fn glance_mbr_rules() {
        let invalid = |b: &[u8]| {
            let (_, f) = describe(b, 1 << 22);
            f.iter()
                .filter(|f| f.code == "raw.mbr-invalid")
                .inspect(|f| assert_eq!(f.severity, crate::finding::Severity::Warn))
                .count()
        };
        let pmbr = (0, 0, [0, 2, 0], 0xEE, 1);
        // What Glance accepts.
        assert_eq!(invalid(&sector(&[pmbr])), 0);
        assert_eq!(invalid(&sector(&[(0, 0x80, [0; 3], 0x83, 2048)])), 0);
        assert_eq!(invalid(&sector(&[(3, 0, [0; 3], 0x83, 2048)])), 0);
        assert_eq!(invalid(&[0u8; 4096]), 0);
        assert_eq!(invalid(&sector(&[(0, 0, [0; 3], 0x83, 2048)])[..511]), 0);
        // Glance's FAT test: two FATs and the fixed-disk media byte hide the sector.
        let mut fat = sector(&[(0, 0x29, [0; 3], 0, 0)]);
        fat[BPB_NUM_FATS] = 2;
        fat[BPB_MEDIA] = MEDIA_FIXED_DISK;
        assert_eq!(invalid(&fat), 0);
        fat[BPB_MEDIA] = 0xF0;
        assert_eq!(invalid(&fat), 1);
        // What it refuses, one rule each.
        for bad in [
            sector(&[(0, 0x01, [0; 3], 0x83, 2048)]),
            sector(&[(0, 0x7f, [0; 3], 0x83, 2048)]),
            sector(&[(0, 0, [0; 3], 0x83, 2048), (2, 0x81, [0; 3], 0, 0)]),
            sector(&[(0, 0, [0, 0, 0], 0xEE, 1)]),
            sector(&[(0, 0, [0, 2, 0], 0xEE, 2)]),
            sector(&[pmbr, (1, 0, [0; 3], 0x83, 2048)]),
            sector(&[(1, 0, [0, 2, 0], 0xEE, 1)]),
            sector(&[]),
        ] {
            assert_eq!(invalid(&bad), 1, "{:?}", &bad[446..512]);
        }
    }

    #[test]
    fn the_entry_array_is_capped_by_the_callers_limits() {
        // 128 entries of 128 bytes pass the default cap but not a caller's cap of 64 such
        // entries per table.
        let (_, f) = describe(&gpt_4k(250), 1 << 20);
        assert!(f.is_empty(), "{f:?}");
        let tight = Limits {
            max_table_bytes: 64 * 128,
            ..Limits::default()
        };
        let (d, f) = describe_with(&gpt_4k(250), 1 << 20, &tight);
        let codes: Vec<_> = f.iter().map(|f| f.code).collect();
        assert_eq!(codes, ["raw.gpt-checksum"]);
        assert_eq!(d["partitions"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn gpt_on_4096_byte_sectors() {
        // 1 MiB disk: LBAs 0..=255 of 4 KiB.
        let (d, f) = describe(&gpt_4k(250), 1 << 20);
        assert!(f.is_empty(), "{f:?}");
        assert_eq!(d["partition-table"], "gpt");
        assert_eq!(d["logical-sector-size"], 4096);
        assert_eq!(d["protective-mbr"], true);
        let p = &d["partitions"][0];
        assert_eq!(p["name"], "r");
        assert_eq!(p["start"], 6 * 4096);
        assert_eq!(p["length"], 245 * 4096);
        // The same table on a disk too small for it: the bound uses 4 KiB sectors too.
        let (_, f) = describe(&gpt_4k(250), 512 * 1024);
        let codes: Vec<_> = f.iter().map(|f| f.code).collect();
        assert_eq!(codes, ["raw.partition-out-of-bounds"]);
        // A broken header CRC is reported at the 4 KiB header.
        let mut b = gpt_4k(250);
        b[4096 + 40] ^= 1;
        let (d, f) = describe(&b, 1 << 20);
        assert_eq!(d["partition-table"], "gpt");
        assert_eq!((f[0].code, f[0].offset), ("raw.gpt-checksum", Some(4096)));
    }

    /// Sector 0 of `mkfs.vfat -F 16`: jump, 512-byte sectors, two FATs, fixed-disk media,
    /// the FAT16 label, zeros where MBR entries would be, 0x55AA.
    fn fat16_boot_sector() -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[..3].copy_from_slice(&[0xEB, 0x3C, 0x90]);
        b[11..13].copy_from_slice(&512u16.to_le_bytes());
        b[BPB_NUM_FATS] = 2;
        b[BPB_MEDIA] = MEDIA_FIXED_DISK;
        b[54..62].copy_from_slice(b"FAT16   ");
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    /// Report red2 F2: a 0x55AA sector is a FAT boot record, not a partition table, only when
    /// glimpse's BPB test, Glance's two bytes and the kernel's boot-indicator test all say so,
    /// and no GPT (0xEE entry, `EFI PART` at 512 or 4096) stands behind it.
    #[test]
    fn table_signature_is_a_superset_of_glance_and_the_kernel() {
        // Glance's two bytes alone (report F2): no jump, no BPB, no label.
        let mut b = mbr(&[(0x83, 2048, 4096)]);
        b[BPB_NUM_FATS] = 2;
        b[BPB_MEDIA] = MEDIA_FIXED_DISK;
        assert!(table_signature(&b));
        // A real FAT16 boot sector whose entries are all zero: the kernel reads an (empty)
        // table there.
        let fat = fat16_boot_sector();
        assert!(fat_kind(&fat).is_some());
        assert!(table_signature(&fat));
        // Boot code over a status byte: a FAT boot record to everyone.
        let mut vbr = fat.clone();
        vbr[446 + 16] = 0x0E;
        assert!(!table_signature(&vbr));
        // ... unless Glance's test does not call it FAT (a floppy's media byte).
        let mut floppy = vbr.clone();
        floppy[BPB_MEDIA] = 0xF0;
        assert!(table_signature(&floppy));
        // ... or a GPT stands behind it, at 512- or 4096-byte sectors, or it has an 0xEE
        // entry (the kernel's GPT parser looks only for that, then at the GPT headers).
        for at in [512usize, 4096] {
            let mut g = vbr.clone();
            g[at..at + 8].copy_from_slice(GPT_SIGNATURE);
            assert!(table_signature(&g), "{at}");
        }
        let mut pmbr = vbr.clone();
        pmbr[446 + 4] = MBR_TYPE_PROTECTIVE;
        assert!(table_signature(&pmbr));
        // No 0x55AA, no table signature; the head may be shorter than a sector.
        let mut none = vbr.clone();
        none[510] = 0;
        assert!(!table_signature(&none));
        assert!(!table_signature(&vbr[..511]));
        // Raw disks keep their description: a FAT volume, no partition table.
        let (d, f) = describe(&fat, 8192);
        assert_eq!(d["boot-sector"], "fat16");
        assert_eq!(d["partition-table"], "none");
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn guid_formatting() {
        // EFI System Partition type GUID as stored on disk.
        let g = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid_string(&g), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    }
}
