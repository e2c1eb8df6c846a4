//! VHD writer (qemu-img's `vpc`).
//!
//! Options (`-o key=value,...`):
//!
//! - `subformat=dynamic|fixed`: `dynamic` (the default) is sparse: a footer copy, a dynamic
//!   disk header, a Block Allocation Table, then one block (sector bitmap + data) per block of
//!   guest data that is not all zeros, then the footer. Each bitmap is placed so that its
//!   block's data starts on a 4 KiB boundary of the file (the BAT may point at any sector):
//!   copies into the file then fill whole pages, and on XFS and btrfs can be reflinks.
//!   `fixed` is the guest disk followed by the footer; it can be written to a pipe.
//! - `force_size=on|off`: `on` (the default) keeps the virtual size exact. The footer names
//!   creator application `qem2`, which every QEMU since 2.6 and Hyper-V/Azure size by the
//!   footer's current size; the CHS geometry is the spec's (rounded down, as the spec
//!   requires). `off` writes creator `qemu`, which QEMU and Virtual PC size by the CHS
//!   geometry; the size must then be one the geometry represents exactly, or the writer
//!   refuses (glimpse never changes the size silently).
//! - `azure=on`: what Azure requires of an uploaded disk: a fixed VHD whose virtual size is a
//!   whole number of MiB. The size is rounded up to the next MiB with zeros; `subformat`
//!   defaults to `fixed` and may not be `dynamic`.
//! - `block_size=SIZE` (dynamic only): guest bytes per block, a power of two from 4 KiB to
//!   256 MiB; 2 MiB by default, as Hyper-V and qemu-img write.
//!
//! A virtual size that is not a whole number of 512-byte sectors is rounded up to one, as
//! qemu-img rounds it: a VHD counts its size in sectors.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;

use byteorder::{BigEndian, WriteBytesExt};
use glimpse_formats::vhd::footer::{
    bitmap_len, checksum, geometry, COOKIE, DYN_CHECKSUM_AT, DYN_COOKIE, DYN_HEADER_LEN,
    FOOTER_CHECKSUM_AT, FOOTER_LEN, MAX_SECTORS, TYPE_DYNAMIC, TYPE_FIXED, VHD_EPOCH,
};

use crate::table::{write_pieces, Table};
use crate::{
    check_chunk_at, write_zero_span, Chunk, Error, Measure, Payload, Result, Target, WriteOptions,
    Writer,
};

/// Chunk size of fixed disks: big enough to amortise syscalls, small enough to find holes.
const FIXED_CHUNK: u64 = 1 << 20;
/// Default block size of dynamic disks.
const DEFAULT_BLOCK: u64 = 2 << 20;
/// The largest chunk the pipeline hands the dynamic writer: part of a block when blocks are
/// larger.
const SUB_CHUNK: u64 = 4 << 20;
/// Where the dynamic disk header goes (after the footer copy).
const HEADER_AT: u64 = 512;
/// Where the BAT goes (after the header), as qemu-img and Hyper-V put it.
const BAT_AT: u64 = 1536;
const MIB: u64 = 1 << 20;

/// What the options ask for.
#[derive(Debug, Clone, Copy)]
struct Plan {
    fixed: bool,
    /// Virtual size written (rounded up to a sector, or a MiB for Azure).
    size: u64,
    block: u64,
    app: [u8; 4],
    geometry: (u16, u8, u8),
}

impl Plan {
    fn new(opts: &WriteOptions, virtual_size: u64) -> Result<Plan> {
        opts.only("vhd", &["subformat", "force_size", "azure", "block_size"])?;
        let azure = opts.flag("azure")?.unwrap_or(false);
        let fixed = match opts.get("subformat") {
            None => azure,
            Some("fixed") => true,
            Some("dynamic") if azure => {
                return Err(Error::usage(
                    "azure=on needs a fixed VHD; drop subformat=dynamic",
                ))
            }
            Some("dynamic") => false,
            Some(other) => {
                return Err(Error::usage(format!(
                    "vhd subformat {other:?}: expected dynamic or fixed"
                )))
            }
        };
        let block = opts.size("block_size")?;
        if fixed && block.is_some() {
            return Err(Error::usage("block_size applies to dynamic VHDs only"));
        }
        let block = block.unwrap_or(DEFAULT_BLOCK);
        if !block.is_power_of_two() || !(4096..=256 * MIB).contains(&block) {
            return Err(Error::usage(format!(
                "block_size={block}: expected a power of two from 4 KiB to 256 MiB"
            )));
        }
        let mut size = round_up(virtual_size, 512)?;
        if azure {
            size = round_up(size, MIB)?;
        }
        if fixed && size == 0 {
            // The file would be the bare footer at offset 0, which qemu reads as the copy at the
            // head of a dynamic disk and then fails on ("Error reading dynamic VHD header").
            return Err(Error::invalid(
                "a fixed VHD cannot describe an empty disk (qemu cannot open a bare footer); use subformat=dynamic",
            ));
        }
        let sectors = size / 512;
        if sectors > MAX_SECTORS {
            return Err(Error::invalid(format!(
                "a VHD holds at most 2040 GiB; {size} bytes asked"
            )));
        }
        // glimpse must be able to read what it writes under its default limits (qemu's own
        // cap, INT_MAX / 4 entries, is higher than that).
        let limits = glimpse_formats::Limits::default();
        if !fixed && limits.table_bytes(size.div_ceil(block), 4).is_none() {
            return Err(Error::invalid(format!(
                "{size} bytes in blocks of {block} need a BAT of more than {} bytes; use a larger block_size",
                limits.max_table_bytes
            )));
        }
        let geometry = geometry(sectors);
        let chs = u64::from(geometry.0) * u64::from(geometry.1) * u64::from(geometry.2);
        let app = if opts.flag("force_size")?.unwrap_or(true) {
            *b"qem2"
        } else if chs == sectors {
            *b"qemu"
        } else {
            return Err(Error::usage(format!(
                "force_size=off: {size} bytes cannot be represented in CHS geometry (nearest below is {} bytes); use force_size=on",
                chs * 512
            )));
        };
        Ok(Plan {
            fixed,
            size,
            block,
            app,
            geometry,
        })
    }

    fn entries(&self) -> u64 {
        self.size.div_ceil(self.block)
    }

    fn bat_len(&self) -> u64 {
        (self.entries() * 4).div_ceil(512) * 512
    }

    /// The footer (512 bytes, checksum set).
    fn footer(&self, uuid: [u8; 16]) -> Result<Vec<u8>> {
        let mut f = Vec::with_capacity(FOOTER_LEN);
        f.extend_from_slice(COOKIE);
        f.write_u32::<BigEndian>(2)?; // features: the reserved bit is always set
        f.write_u32::<BigEndian>(0x0001_0000)?;
        f.write_u64::<BigEndian>(if self.fixed { u64::MAX } else { HEADER_AT })?;
        let now = crate::stamp::now_secs().max(VHD_EPOCH);
        f.write_u32::<BigEndian>(u32::try_from(now.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX))?;
        f.extend_from_slice(&self.app);
        // Creator version 5.3 (Virtual PC 2007), as qemu-img writes it.
        f.write_u16::<BigEndian>(5)?;
        f.write_u16::<BigEndian>(3)?;
        f.extend_from_slice(b"Wi2k");
        f.write_u64::<BigEndian>(self.size)?;
        f.write_u64::<BigEndian>(self.size)?;
        f.write_u16::<BigEndian>(self.geometry.0)?;
        f.write_u8(self.geometry.1)?;
        f.write_u8(self.geometry.2)?;
        f.write_u32::<BigEndian>(if self.fixed { TYPE_FIXED } else { TYPE_DYNAMIC })?;
        f.write_u32::<BigEndian>(0)?;
        f.extend_from_slice(&uuid);
        f.resize(FOOTER_LEN, 0);
        let c = checksum(&f, FOOTER_CHECKSUM_AT);
        f.get_mut(FOOTER_CHECKSUM_AT..FOOTER_CHECKSUM_AT + 4)
            .ok_or_else(|| Error::invalid("footer too short"))?
            .copy_from_slice(&c.to_be_bytes());
        Ok(f)
    }

    /// The dynamic disk header (1024 bytes, checksum set).
    fn header(&self) -> Result<Vec<u8>> {
        let mut h = Vec::with_capacity(DYN_HEADER_LEN);
        h.extend_from_slice(DYN_COOKIE);
        // The spec says 0xFFFFFFFF; Microsoft's tools expect all 64 bits set.
        h.write_u64::<BigEndian>(u64::MAX)?;
        h.write_u64::<BigEndian>(BAT_AT)?;
        h.write_u32::<BigEndian>(0x0001_0000)?;
        h.write_u32::<BigEndian>(
            u32::try_from(self.entries()).map_err(|_| Error::invalid("too many blocks"))?,
        )?;
        h.write_u32::<BigEndian>(
            u32::try_from(self.block).map_err(|_| Error::invalid("block too large"))?,
        )?;
        h.write_u32::<BigEndian>(0)?;
        h.resize(DYN_HEADER_LEN, 0);
        let c = checksum(&h, DYN_CHECKSUM_AT);
        h.get_mut(DYN_CHECKSUM_AT..DYN_CHECKSUM_AT + 4)
            .ok_or_else(|| Error::invalid("header too short"))?
            .copy_from_slice(&c.to_be_bytes());
        Ok(h)
    }
}

fn round_up(n: u64, to: u64) -> Result<u64> {
    n.checked_next_multiple_of(to)
        .ok_or_else(|| Error::invalid(format!("size {n} overflows")))
}

/// 16 bytes shaped as a version-4 UUID (see [`crate::stamp::id_bytes`]).
pub(crate) fn random_uuid() -> [u8; 16] {
    let mut u = crate::stamp::id_bytes();
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Creates a VHD writer for a guest disk of `virtual_size` bytes. See the module
/// documentation for the options.
///
/// # Errors
/// `Invalid` for bad options or a size VHD cannot hold; `Unsupported` for a dynamic VHD to a
/// pipe; `Io` on write errors.
pub fn create(target: Target, opts: &WriteOptions, virtual_size: u64) -> Result<Box<dyn Writer>> {
    let plan = Plan::new(opts, virtual_size)?;
    let footer = plan.footer(random_uuid())?;
    if plan.fixed {
        return Ok(Box::new(FixedWriter {
            target,
            pos: 0,
            plan,
            footer,
            copies: crate::copy::CopyMerger::default(),
        }));
    }
    let Target::File(file) = target else {
        return Err(Error::unsupported(
            "a dynamic VHD cannot be written to a pipe; use subformat=fixed",
        ));
    };
    let bat = Table::new(opts, plan.entries(), u32::MAX, "BAT")?;
    let next = BAT_AT + plan.bat_len();
    Ok(Box::new(DynamicWriter {
        file,
        plan,
        footer,
        bat,
        next,
        pos: 0,
        bitmap: vec![0xFF; bitmap_len(plan.block) as usize],
        copies: crate::copy::CopyMerger::default(),
    }))
}

/// Output size of a VHD with `opts`, given the virtual size and the guest bytes that hold
/// data. For a dynamic disk `data_bytes` is taken as whole blocks (a lower bound when it was
/// counted at a finer granularity).
///
/// # Errors
/// `Invalid` for bad options.
pub fn measure(opts: &WriteOptions, virtual_size: u64, data_bytes: u64) -> Result<Measure> {
    let plan = Plan::new(opts, virtual_size)?;
    if plan.fixed {
        let n = plan.size + FOOTER_LEN as u64;
        return Ok(Measure {
            required: n,
            fully_allocated: n,
        });
    }
    let bitmap = bitmap_len(plan.block);
    let first = block_at(BAT_AT + plan.bat_len(), bitmap);
    // From one block's bitmap to the next: the data ends on a 4 KiB boundary (blocks are
    // whole multiples of it), so the stride is the same for every block.
    let stride = block_at(first + bitmap + plan.block, bitmap) - first;
    let size = |blocks: u64| match blocks {
        0 => BAT_AT + plan.bat_len() + FOOTER_LEN as u64,
        n => first
            .saturating_add((n - 1).saturating_mul(stride))
            .saturating_add(bitmap + plan.block + FOOTER_LEN as u64),
    };
    let blocks = data_bytes.div_ceil(plan.block).min(plan.entries());
    Ok(Measure {
        required: size(blocks),
        fully_allocated: size(plan.entries()),
    })
}

/// Where a block allocated at the file's first free byte `next` puts its sector bitmap: late
/// enough that the data after it starts on a 4 KiB boundary.
fn block_at(next: u64, bitmap_len: u64) -> u64 {
    next.saturating_add(bitmap_len)
        .div_ceil(crate::copy::PAGE)
        .saturating_mul(crate::copy::PAGE)
        .saturating_sub(bitmap_len)
}

struct FixedWriter {
    target: Target,
    pos: u64,
    plan: Plan,
    footer: Vec<u8>,
    /// Pending file-to-file copies.
    copies: crate::copy::CopyMerger,
}

impl Writer for FixedWriter {
    fn chunk_size(&self) -> u64 {
        FIXED_CHUNK
    }

    fn accepts_copy(&self) -> bool {
        matches!(self.target, Target::File(_))
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        check_chunk_at("vhd", &chunk, self.pos, 1)?;
        match (&mut self.target, chunk.payload) {
            (Target::File(f), p @ (Payload::Data(_) | Payload::Copy(_))) => {
                p.write_at(f, chunk.guest, &mut self.copies)?
            }
            (Target::Stream(w), Payload::Data(d)) => w.write_all(&d)?,
            (Target::Stream(_), Payload::Copy(_)) => {
                return Err(Error::invalid("vhd writer got a copy for a stream"))
            }
            (Target::File(_), Payload::Zero) => {}
            (Target::Stream(w), Payload::Zero) => crate::raw::write_zeros(w.as_mut(), chunk.len)?,
            (_, Payload::Compressed(_)) => {
                return Err(Error::invalid("vhd writer got a compressed chunk"))
            }
        }
        self.pos = chunk.guest.saturating_add(chunk.len);
        Ok(())
    }

    fn write_zeros(&mut self, guest: u64, len: u64) -> Result<()> {
        write_zero_span(self, guest, len)
    }

    fn batch_end(&mut self) -> Result<()> {
        if let Target::File(f) = &self.target {
            self.copies.hand_off(f)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let size = self.plan.size;
        if self.pos > size {
            return Err(Error::invalid("vhd writer: data past the virtual size"));
        }
        match self.target {
            Target::File(f) => {
                let mut copies = self.copies;
                copies.flush(&f)?;
                f.set_len(size)?;
                f.write_all_at(&self.footer, size)?;
                Ok(())
            }
            Target::Stream(mut w) => {
                crate::raw::write_zeros(w.as_mut(), size - self.pos)?;
                w.write_all(&self.footer)?;
                w.flush()?;
                Ok(())
            }
        }
    }
}

struct DynamicWriter {
    file: File,
    plan: Plan,
    footer: Vec<u8>,
    bat: Table<u32>,
    /// Next free byte in the file.
    next: u64,
    pos: u64,
    /// A full sector bitmap: QEMU marks every sector of an allocated block present, and so
    /// does glimpse (the block's data is whole, zeros included).
    bitmap: Vec<u8>,
    /// Pending file-to-file copies.
    copies: crate::copy::CopyMerger,
}

impl DynamicWriter {
    /// Where `block`'s data starts in the file, allocating the block (bitmap, then data) and
    /// pointing its BAT entry at it on its first data chunk.
    fn data_of(&mut self, block: u64) -> Result<u64> {
        let index = usize::try_from(block).map_err(|_| Error::invalid("chunk index"))?;
        let bitmap_len = self.bitmap.len() as u64;
        let slot = self
            .bat
            .entries
            .get_mut(index)
            .ok_or_else(|| Error::invalid("chunk past the virtual size"))?;
        if *slot != u32::MAX {
            return Ok(u64::from(*slot)
                .saturating_mul(512)
                .saturating_add(bitmap_len));
        }
        self.next = block_at(self.next, bitmap_len);
        let sector = u32::try_from(self.next / 512)
            .map_err(|_| Error::invalid("dynamic VHD grows past the 2 TiB its BAT can address"))?;
        *slot = sector;
        self.file.write_all_at(&self.bitmap, self.next)?;
        let data_at = self.next.saturating_add(bitmap_len);
        // Every block is whole on disk (QEMU checks that the last one fits the file).
        self.next = data_at.saturating_add(self.plan.block);
        Ok(data_at)
    }
}

impl Writer for DynamicWriter {
    /// A block, or [`SUB_CHUNK`] of one: blocks reach 256 MiB, and the pipeline holds three
    /// batches of chunks, so whole blocks would break the command's memory ceiling.
    fn chunk_size(&self) -> u64 {
        self.plan.block.min(SUB_CHUNK)
    }

    fn accepts_copy(&self) -> bool {
        true
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        check_chunk_at("vhd", &chunk, self.pos, self.chunk_size())?;
        match chunk.payload {
            // A zero chunk of an allocated block reads from the file's hole.
            Payload::Zero => {}
            p @ (Payload::Data(_) | Payload::Copy(_)) => {
                let data_at = self.data_of(chunk.guest / self.plan.block)?;
                let at = data_at.saturating_add(chunk.guest % self.plan.block);
                p.write_at(&self.file, at, &mut self.copies)?;
            }
            Payload::Compressed(_) => {
                return Err(Error::invalid("vhd writer got a compressed chunk"))
            }
        }
        self.pos = chunk.guest.saturating_add(chunk.len);
        Ok(())
    }

    fn write_zeros(&mut self, guest: u64, len: u64) -> Result<()> {
        write_zero_span(self, guest, len)
    }

    fn batch_end(&mut self) -> Result<()> {
        Ok(self.copies.hand_off(&self.file)?)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.copies.flush(&self.file)?;
        let f = &self.file;
        f.write_all_at(&self.footer, 0)?;
        f.write_all_at(&self.plan.header()?, HEADER_AT)?;
        write_pieces(
            |b, at| f.write_all_at(b, at),
            BAT_AT,
            self.bat.entries.iter().copied(),
            u32::to_be_bytes,
            self.plan.bat_len(),
            0xFF,
        )?;
        f.set_len(self.next)?;
        f.write_all_at(&self.footer, self.next)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> WriteOptions {
        WriteOptions::parse(s, false).unwrap()
    }

    #[test]
    fn options() {
        let p = Plan::new(&opts(""), 1000).unwrap();
        assert!(!p.fixed && p.size == 1024 && &p.app == b"qem2" && p.block == 2 << 20);
        let p = Plan::new(&opts("azure=on"), 5 * MIB + 1).unwrap();
        assert!(p.fixed && p.size == 6 * MIB);
        assert!(Plan::new(&opts("azure=on,subformat=dynamic"), MIB).is_err());
        assert!(Plan::new(&opts("subformat=fixed,block_size=1M"), MIB).is_err());
        assert!(Plan::new(&opts("block_size=3000"), MIB).is_err());
        assert!(Plan::new(&opts("subformat=sparse"), MIB).is_err());
        assert!(Plan::new(&opts("cluster_size=64k"), MIB).is_err());
        assert!(Plan::new(&opts(""), 3 << 40).is_err());
        // 16 Mi entries (64 MiB of BAT) are read back; 40 Mi (160 MiB) are not.
        assert!(Plan::new(&opts("block_size=4k"), 64 << 30).is_ok());
        assert!(Plan::new(&opts("block_size=4k"), 160 << 30).is_err());
        // force_size=off only for sizes the geometry holds exactly.
        assert_eq!(
            &Plan::new(&opts("force_size=off"), 10_514_432).unwrap().app,
            b"qemu"
        );
        assert!(Plan::new(&opts("force_size=off"), 10 * MIB).is_err());
    }

    #[test]
    fn every_blocks_data_starts_on_a_page() {
        assert_eq!(block_at(2048, 512), 3584);
        assert_eq!(block_at(3584, 512), 3584);
        for (next, bitmap) in [(2048, 512), (5000 * 512, 4096), (7 * 512, 65536)] {
            let at = block_at(next, bitmap);
            assert!(at >= next && at % 512 == 0 && (at + bitmap) % 4096 == 0);
            assert!(at - next < 4096);
        }
    }

    #[test]
    fn measure_counts_blocks() {
        // Footer copy and header (1536), BAT (512), then blocks whose bitmap sits 512 bytes
        // before a 4 KiB boundary: the first at 3584 (data at 4096), then one every
        // 4096 + 2 MiB; the footer last.
        let m = measure(&opts(""), 10 * MIB, 3 * MIB).unwrap();
        assert_eq!(m.required, 4096 + (4096 + (2 << 20)) + (2 << 20) + 512);
        assert_eq!(
            m.fully_allocated,
            4096 + 4 * (4096 + (2 << 20)) + (2 << 20) + 512
        );
        let m = measure(&opts("subformat=fixed"), 10 * MIB, 0).unwrap();
        assert_eq!(m.required, 10 * MIB + 512);
    }
}
