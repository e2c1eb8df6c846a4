//! VHDX writer: dynamic (default) or `subformat=fixed`, laid out as qemu-img lays it out.
//!
//! ```text
//! 0      64K      128K     192K     256K          1M         BAT          metadata      data
//! | id   | head 1 | head 2 | regi 1 | regi 2 | ... | log (empty) | BAT ... | 1 MiB ...  | payload blocks
//! ```
//!
//! Chunks are payload blocks. A dynamic image stores only blocks holding data, one after the
//! other, and marks the rest ZERO (qemu's `block_state_zero=on` default; `off` leaves them
//! NOT_PRESENT). A fixed image gives every block its place (`block i` at `data + i × block`)
//! and marks all FULLY_PRESENT; zero blocks stay holes in the file. The log is empty: its GUID
//! in the headers is zero, so no reader looks inside it.

use std::fs::File;
use std::os::unix::fs::FileExt;

use byteorder::{ByteOrder, LittleEndian as LE};
use glimpse_formats::vhdx::bat::{Geometry, FULLY_PRESENT, NOT_PRESENT, ZERO};
use glimpse_formats::vhdx::header::{
    self, Guid, HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SECTION_END, HEADER_SIZE,
};
use glimpse_formats::vhdx::metadata;
use glimpse_formats::vhdx::region::{self, REGION1_OFFSET, REGION2_OFFSET, REGION_TABLE_SIZE};

use crate::table::{write_pieces, Table};
use crate::{Chunk, Error, Measure, Payload, Result, Target, WriteOptions, Writer};

const MIB: u64 = 1 << 20;
/// The largest chunk the pipeline hands this writer: part of a block when blocks are larger.
const SUB_CHUNK: u64 = 4 * MIB;
/// "Image size too large; max of 64TB" (qemu, from the spec's limit).
const MAX_SIZE: u64 = 64 << 40;
/// The creator string in the file identifier.
const CREATOR: &str = "glimpse";

/// What the options and the size decide.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Virtual disk size: the guest size rounded up to a 512-byte sector, as qemu does.
    disk_size: u64,
    fixed: bool,
    zero_state: u64,
    log_size: u64,
    geo: Geometry,
    bat_offset: u64,
    bat_len: u64,
    md_offset: u64,
    data_start: u64,
}

/// The default block size qemu picks: "pretty arbitrary, and mainly designed to keep the BAT
/// size reasonable to load into RAM".
pub fn default_block_size(size: u64) -> u64 {
    if size > 32 << 40 {
        64 * MIB
    } else if size > 100 << 30 {
        32 * MIB
    } else if size > 1 << 30 {
        16 * MIB
    } else {
        8 * MIB
    }
}

fn round_up(x: u64, to: u64) -> Result<u64> {
    x.checked_next_multiple_of(to)
        .ok_or_else(|| Error::invalid("vhdx: size overflows"))
}

fn layout(opts: &WriteOptions, virtual_size: u64) -> Result<Layout> {
    opts.only(
        "vhdx",
        &["subformat", "block_size", "log_size", "block_state_zero"],
    )?;
    let fixed = match opts.get("subformat").unwrap_or("dynamic") {
        "dynamic" => false,
        "fixed" => true,
        other => {
            return Err(Error::usage(format!(
                "vhdx: subformat={other} (expected dynamic or fixed)"
            )))
        }
    };
    let disk_size = round_up(virtual_size, 512)?;
    if disk_size > MAX_SIZE {
        return Err(Error::invalid(format!(
            "vhdx: size {virtual_size} exceeds the format's 64 TiB"
        )));
    }
    let block_size = match opts.size("block_size")? {
        None | Some(0) => default_block_size(disk_size),
        Some(b) if (MIB..=256 * MIB).contains(&b) && b.is_power_of_two() => b,
        Some(b) => {
            return Err(Error::usage(format!(
                "vhdx: block_size={b} must be a power of two from 1M to 256M"
            )))
        }
    };
    let log_size = opts.size("log_size")?.unwrap_or(MIB);
    if log_size < MIB || log_size % MIB != 0 || log_size > u64::from(u32::MAX) {
        return Err(Error::usage(format!(
            "vhdx: log_size={log_size} must be a multiple of 1M, at least 1M, below 4G"
        )));
    }
    let zero_state = if opts.flag("block_state_zero")?.unwrap_or(true) {
        ZERO
    } else {
        NOT_PRESENT
    };
    let geo = Geometry::new(block_size, 512, disk_size, false);
    // qemu's only cap is the BAT region's 32-bit length, far above this: glimpse must read
    // back what it writes under its default limits.
    let limits = glimpse_formats::Limits::default();
    if limits.table_bytes(geo.entries, 8).is_none() {
        return Err(Error::invalid(format!(
            "vhdx: {disk_size} bytes in blocks of {block_size} need a BAT of more than {} bytes; use a larger block_size",
            limits.max_table_bytes
        )));
    }
    // qemu sizes the BAT region with 32-bit arithmetic that wraps for an empty disk and then
    // insists on a region that large when opening; give it one (it stays a hole).
    let region_entries = if geo.data_blocks == 0 {
        u64::from(u32::MAX >> geo.chunk_ratio.trailing_zeros())
    } else {
        geo.entries
    };
    let bat_offset = round_up(HEADER_SECTION_END + log_size, MIB)?;
    let bat_len = round_up(region_entries.saturating_mul(8), MIB)?;
    let md_offset = bat_offset
        .checked_add(bat_len)
        .ok_or_else(|| Error::invalid("vhdx: BAT too large"))?;
    let data_start = md_offset + MIB;
    Ok(Layout {
        disk_size,
        fixed,
        zero_state,
        log_size,
        geo,
        bat_offset,
        bat_len,
        md_offset,
        data_start,
    })
}

/// Creates a VHDX writer.
///
/// # Errors
/// `Invalid` for bad options; `Unsupported` for a stream target (the BAT is written last).
pub fn create(target: Target, opts: &WriteOptions, virtual_size: u64) -> Result<Box<dyn Writer>> {
    let l = layout(opts, virtual_size)?;
    let Target::File(file) = target else {
        return Err(Error::unsupported("vhdx cannot be written to a pipe"));
    };
    let mut bat = Table::new(opts, l.geo.entries, 0u64, "BAT")?;
    // Every payload entry starts as the zero block it is until a data chunk allocates it.
    for block in 0..l.geo.data_blocks {
        if let Some(e) = usize::try_from(l.geo.payload_index(block))
            .ok()
            .and_then(|i| bat.entries.get_mut(i))
        {
            *e = if l.fixed {
                block
                    .saturating_mul(l.geo.block_size)
                    .saturating_add(l.data_start)
                    | FULLY_PRESENT
            } else {
                l.zero_state
            };
        }
    }
    Ok(Box::new(VhdxWriter {
        file,
        l,
        bat,
        pos: 0,
        next_host: l.data_start,
        copies: crate::copy::CopyMerger::default(),
    }))
}

/// Output size of a VHDX image.
///
/// # Errors
/// `Invalid` for bad options.
pub fn measure(opts: &WriteOptions, virtual_size: u64, data_bytes: u64) -> Result<Measure> {
    let l = layout(opts, virtual_size)?;
    let full = l
        .geo
        .data_blocks
        .saturating_mul(l.geo.block_size)
        .saturating_add(l.data_start);
    let used =
        round_up(data_bytes.min(l.disk_size), l.geo.block_size)?.saturating_add(l.data_start);
    Ok(Measure {
        required: if l.fixed { full } else { used.min(full) },
        fully_allocated: full,
    })
}

struct VhdxWriter {
    file: File,
    l: Layout,
    bat: Table<u64>,
    pos: u64,
    next_host: u64,
    /// Pending file-to-file copies.
    copies: crate::copy::CopyMerger,
}

impl VhdxWriter {
    /// The host offset of `block`, allocating it (and pointing its BAT entry at it) on its
    /// first data chunk.
    fn host_of(&mut self, block: u64) -> Result<u64> {
        let idx = usize::try_from(self.l.geo.payload_index(block))
            .map_err(|_| Error::invalid("vhdx: block index"))?;
        let slot = self
            .bat
            .entries
            .get_mut(idx)
            .ok_or_else(|| Error::invalid("vhdx writer: chunk past the disk"))?;
        // The state is in the low 3 bits, the host offset (a whole MiB) above bit 20.
        if *slot & 7 == FULLY_PRESENT {
            return Ok(*slot & !((1u64 << 20) - 1));
        }
        let host = if self.l.fixed {
            block
                .saturating_mul(self.l.geo.block_size)
                .saturating_add(self.l.data_start)
        } else {
            let h = self.next_host;
            self.next_host = h.saturating_add(self.l.geo.block_size);
            h
        };
        *slot = host | FULLY_PRESENT;
        Ok(host)
    }
}

impl Writer for VhdxWriter {
    /// A block, or [`SUB_CHUNK`] of one: blocks reach 256 MiB, and the pipeline holds three
    /// batches of chunks, so whole blocks would break the command's memory ceiling.
    fn chunk_size(&self) -> u64 {
        self.l.geo.block_size.min(SUB_CHUNK)
    }

    fn accepts_copy(&self) -> bool {
        true
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        if chunk.guest != self.pos || chunk.guest % self.chunk_size() != 0 {
            return Err(Error::invalid(format!(
                "vhdx writer: chunk at {} but expected {}",
                chunk.guest, self.pos
            )));
        }
        let bs = self.l.geo.block_size;
        let block = chunk.guest / bs;
        match chunk.payload {
            p @ (Payload::Data(_) | Payload::Copy(_)) => {
                let host = self.host_of(block)?;
                let at = host.saturating_add(chunk.guest % bs);
                p.write_at(&self.file, at, &mut self.copies)?;
            }
            // Every entry starts as a zero block (see `create`); a block allocated by an
            // earlier chunk reads its zero chunks from the file's hole.
            Payload::Zero => {}
            Payload::Compressed(_) => {
                return Err(Error::invalid("vhdx writer got a compressed chunk"))
            }
        }
        self.pos = chunk.guest.saturating_add(chunk.len);
        Ok(())
    }

    fn write_zeros(&mut self, guest: u64, len: u64) -> Result<()> {
        // Zero spans only move the position: their blocks keep their zero entries.
        if guest != self.pos {
            return Err(Error::invalid(format!(
                "vhdx writer: zeros at {guest} but expected {}",
                self.pos
            )));
        }
        self.pos = guest.saturating_add(len);
        Ok(())
    }

    fn batch_end(&mut self) -> Result<()> {
        Ok(self.copies.hand_off(&self.file)?)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let VhdxWriter {
            file,
            l,
            bat,
            pos: _,
            next_host,
            mut copies,
        } = *self;
        copies.flush(&file)?;
        let mut buf = vec![0u8; 8 + 512];
        buf[..8].copy_from_slice(header::FILE_SIGNATURE);
        for (i, u) in CREATOR.encode_utf16().enumerate() {
            LE::write_u16(&mut buf[8 + 2 * i..], u);
        }
        file.write_all_at(&buf, 0)?;

        let file_guid = random_guid(1);
        let data_guid = random_guid(2);
        for (seq, off) in [(1u64, HEADER1_OFFSET), (2, HEADER2_OFFSET)] {
            let mut h = vec![0u8; HEADER_SIZE];
            h[..4].copy_from_slice(b"head");
            LE::write_u64(&mut h[8..], seq);
            h[16..32].copy_from_slice(&file_guid);
            h[32..48].copy_from_slice(&data_guid);
            // log GUID (48..64) zero: no log entries. Log version 0, file version 1.
            LE::write_u16(&mut h[66..], 1);
            LE::write_u32(&mut h[68..], u32::try_from(l.log_size).unwrap_or(u32::MAX));
            LE::write_u64(&mut h[72..], HEADER_SECTION_END);
            let c = header::checksum(&h, 4);
            LE::write_u32(&mut h[4..], c);
            file.write_all_at(&h, off)?;
        }

        let mut rt = vec![0u8; REGION_TABLE_SIZE];
        rt[..4].copy_from_slice(b"regi");
        LE::write_u32(&mut rt[8..], 2);
        for (i, (g, off, len)) in [
            (region::BAT_GUID, l.bat_offset, l.bat_len),
            (region::METADATA_GUID, l.md_offset, MIB),
        ]
        .into_iter()
        .enumerate()
        {
            let e = 16 + 32 * i;
            rt[e..e + 16].copy_from_slice(&g);
            LE::write_u64(&mut rt[e + 16..], off);
            LE::write_u32(
                &mut rt[e + 24..],
                u32::try_from(len).map_err(|_| Error::invalid("vhdx: BAT region too large"))?,
            );
            LE::write_u32(&mut rt[e + 28..], region::REGION_REQUIRED);
        }
        let c = header::checksum(&rt, 4);
        LE::write_u32(&mut rt[4..], c);
        file.write_all_at(&rt, REGION1_OFFSET)?;
        file.write_all_at(&rt, REGION2_OFFSET)?;

        let bat_bytes = (bat.entries.len() as u64).saturating_mul(8);
        write_pieces(
            |b, at| file.write_all_at(b, at),
            l.bat_offset,
            bat.entries.iter().copied(),
            u64::to_le_bytes,
            bat_bytes,
            0,
        )?;
        drop(bat);

        file.write_all_at(&metadata_region(&l), l.md_offset)?;

        let end = if l.fixed {
            l.data_start
                .saturating_add(l.geo.data_blocks.saturating_mul(l.geo.block_size))
        } else {
            next_host
        };
        file.set_len(end)?;
        Ok(())
    }
}

/// The metadata table and its five items (qemu's set: file parameters, virtual disk size,
/// page 83 data, logical and physical sector size, all 512-byte sectors).
fn metadata_region(l: &Layout) -> Vec<u8> {
    let items_at = metadata::TABLE_SIZE as usize;
    let mut md = vec![0u8; items_at + 40];
    md[..8].copy_from_slice(b"metadata");
    LE::write_u16(&mut md[10..], 5);
    let req = metadata::FLAG_REQUIRED;
    let vdisk = 2; // "virtual disk metadata if set, otherwise file metadata"
    let items: [(Guid, usize, u32); 5] = [
        (metadata::FILE_PARAMETERS, 8, req),
        (metadata::VIRTUAL_DISK_SIZE, 8, req | vdisk),
        (metadata::PAGE83_DATA, 16, req | vdisk),
        (metadata::LOGICAL_SECTOR_SIZE, 4, req | vdisk),
        (metadata::PHYSICAL_SECTOR_SIZE, 4, req | vdisk),
    ];
    let mut off = items_at;
    for (i, (g, len, flags)) in items.into_iter().enumerate() {
        let e = 32 + 32 * i;
        md[e..e + 16].copy_from_slice(&g);
        LE::write_u32(&mut md[e + 16..], off as u32);
        LE::write_u32(&mut md[e + 20..], len as u32);
        LE::write_u32(&mut md[e + 24..], flags);
        off += len;
    }
    let p = items_at;
    LE::write_u32(&mut md[p..], u32::try_from(l.geo.block_size).unwrap_or(0));
    let flags = if l.fixed {
        metadata::LEAVE_BLOCKS_ALLOCATED
    } else {
        0
    };
    LE::write_u32(&mut md[p + 4..], flags);
    LE::write_u64(&mut md[p + 8..], l.disk_size);
    md[p + 16..p + 32].copy_from_slice(&random_guid(3));
    LE::write_u32(&mut md[p + 32..], 512);
    LE::write_u32(&mut md[p + 36..], 512);
    md
}

/// A version-4 GUID (see [`crate::stamp::id_bytes`]; `salt` is kept for call-site clarity).
fn random_guid(_salt: u64) -> Guid {
    let mut g = crate::stamp::id_bytes();
    g[7] = (g[7] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let o = |s: &str| WriteOptions::parse(s, false).unwrap();
        assert_eq!(layout(&o(""), 100 << 20).unwrap().geo.block_size, 8 * MIB);
        assert_eq!(layout(&o(""), 200 << 30).unwrap().geo.block_size, 32 * MIB);
        assert_eq!(layout(&o("block_size=1M"), 5).unwrap().geo.block_size, MIB);
        for bad in [
            "block_size=3M",
            "block_size=512k",
            "block_size=512M",
            "subformat=diff",
            "log_size=1536k",
            "x=1",
        ] {
            assert!(layout(&o(bad), 1 << 20).is_err(), "{bad}");
        }
        let l = layout(&o("log_size=4M"), 1 << 20).unwrap();
        assert_eq!(
            (l.bat_offset, l.md_offset, l.data_start),
            (5 * MIB, 6 * MIB, 7 * MIB)
        );
        assert_eq!(l.disk_size, 1 << 20);
        assert_eq!(layout(&o(""), 1000).unwrap().disk_size, 1024);
    }

    #[test]
    fn measure_counts_blocks() {
        let o = |s: &str| WriteOptions::parse(s, false).unwrap();
        let m = measure(&o("block_size=1M"), 10 << 20, 3 << 20).unwrap();
        assert_eq!(
            m,
            Measure {
                required: 4 * MIB + 3 * MIB,
                fully_allocated: 4 * MIB + 10 * MIB
            }
        );
        let m = measure(&o("block_size=1M,subformat=fixed"), 10 << 20, 0).unwrap();
        assert_eq!(m.required, m.fully_allocated);
    }
}
