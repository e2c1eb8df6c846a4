//! VDI writer (VirtualBox Disk Image 1.1).
//!
//! Options (`-o key=value,...`):
//!
//! - `static=on|off`: `off` (the default) writes a dynamic image: only 1 MiB blocks that hold
//!   data are stored, zero blocks stay unallocated. `on` writes a static (preallocated) image:
//!   every block is mapped in order; zero blocks are left as holes in the file.
//!
//! The layout is qemu-img's: the 512-byte header, the block map from offset 512, then the data
//! blocks, except that the data starts on the next 4 KiB boundary after the map (the header
//! names where; qemu-img starts it right after the map, 512 bytes past a page). A virtual size
//! that is not a whole number of 512-byte sectors is rounded up to one (QEMU rounds the size it
//! reads up the same way, so storing it rounded keeps every reader in agreement).

use std::fs::File;
use std::os::unix::fs::FileExt;

use byteorder::{LittleEndian, WriteBytesExt};
use glimpse_formats::vdi::{
    BLOCK_SIZE, MAX_BLOCKS, SECTOR_SIZE, SIGNATURE, TYPE_DYNAMIC, TYPE_STATIC, UNALLOCATED,
    VERSION_1_1,
};

use crate::table::{write_pieces, Table};
use crate::{
    check_chunk_at, write_zero_span, Chunk, Error, Measure, Payload, Result, Target, WriteOptions,
    Writer,
};

const BLOCK: u64 = BLOCK_SIZE as u64;
/// The text line VirtualBox writes before the signature.
const TEXT: &[u8] = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
const BMAP_AT: u64 = 512;

#[derive(Debug, Clone, Copy)]
struct Plan {
    is_static: bool,
    size: u64,
    blocks: u32,
}

impl Plan {
    fn new(opts: &WriteOptions, virtual_size: u64) -> Result<Plan> {
        opts.only("vdi", &["static"])?;
        let is_static = opts.flag("static")?.unwrap_or(false);
        let size = virtual_size
            .checked_next_multiple_of(512)
            .ok_or_else(|| Error::invalid(format!("size {virtual_size} overflows")))?;
        let blocks = u32::try_from(size.div_ceil(BLOCK))
            .ok()
            // QEMU's cap, and a block map glimpse itself reads under its default limits
            // (32 TiB at 128 MiB of map).
            .filter(|&b| {
                b <= MAX_BLOCKS
                    && glimpse_formats::Limits::default()
                        .table_bytes(u64::from(b), 4)
                        .is_some()
            })
            .ok_or_else(|| {
                Error::invalid(format!(
                    "a VDI of {size} bytes needs a block map larger than the {} bytes glimpse reads back",
                    glimpse_formats::Limits::default().max_table_bytes
                ))
            })?;
        Ok(Plan {
            is_static,
            size,
            blocks,
        })
    }

    fn bmap_len(&self) -> u64 {
        (u64::from(self.blocks) * 4).div_ceil(512) * 512
    }

    /// Where the data blocks start: after the block map, on a 4 KiB boundary, so that copies
    /// into blocks fill whole pages (and can be reflinks on XFS and btrfs).
    fn data_at(&self) -> u64 {
        // Blocks are 1 MiB, so aligning the first aligns them all.
        (BMAP_AT + self.bmap_len()).div_ceil(crate::copy::PAGE) * crate::copy::PAGE
    }

    fn header(&self, allocated: u32) -> Result<Vec<u8>> {
        let mut h = Vec::with_capacity(512);
        h.extend_from_slice(TEXT);
        h.resize(64, 0);
        h.write_u32::<LittleEndian>(SIGNATURE)?;
        h.write_u32::<LittleEndian>(VERSION_1_1)?;
        h.write_u32::<LittleEndian>(0x180)?; // header size, as qemu-img writes it
        h.write_u32::<LittleEndian>(if self.is_static {
            TYPE_STATIC
        } else {
            TYPE_DYNAMIC
        })?;
        h.write_u32::<LittleEndian>(0)?; // flags
        h.resize(h.len() + 256, 0); // comment
        h.write_u32::<LittleEndian>(BMAP_AT as u32)?;
        h.write_u32::<LittleEndian>(
            u32::try_from(self.data_at()).map_err(|_| Error::invalid("block map too large"))?,
        )?;
        h.write_u32::<LittleEndian>(0)?; // legacy geometry: unused
        h.write_u32::<LittleEndian>(0)?;
        h.write_u32::<LittleEndian>(0)?;
        h.write_u32::<LittleEndian>(SECTOR_SIZE)?;
        h.write_u32::<LittleEndian>(0)?;
        h.write_u64::<LittleEndian>(self.size)?;
        h.write_u32::<LittleEndian>(BLOCK_SIZE)?;
        h.write_u32::<LittleEndian>(0)?; // no extra data per block
        h.write_u32::<LittleEndian>(self.blocks)?;
        h.write_u32::<LittleEndian>(allocated)?;
        h.extend_from_slice(&crate::vhd::random_uuid()); // image
        h.extend_from_slice(&crate::vhd::random_uuid()); // last modification
        h.resize(512, 0); // no parent: null link and parent UUIDs
        Ok(h)
    }
}

/// Creates a VDI writer for a guest disk of `virtual_size` bytes. See the module
/// documentation for the options.
///
/// # Errors
/// `Invalid` for bad options or a size VDI cannot hold; `Unsupported` for a pipe (the header
/// and block map are written last); `Io` on write errors.
pub fn create(target: Target, opts: &WriteOptions, virtual_size: u64) -> Result<Box<dyn Writer>> {
    let plan = Plan::new(opts, virtual_size)?;
    let Target::File(file) = target else {
        return Err(Error::unsupported("a VDI cannot be written to a pipe"));
    };
    let mut bmap = Table::new(opts, u64::from(plan.blocks), UNALLOCATED, "block map")?;
    if plan.is_static {
        for (slot, b) in bmap.entries.iter_mut().zip(0..plan.blocks) {
            *slot = b;
        }
    }
    let allocated = if plan.is_static { plan.blocks } else { 0 };
    Ok(Box::new(VdiWriter {
        file,
        plan,
        bmap,
        allocated,
        pos: 0,
        copies: crate::copy::CopyMerger::default(),
    }))
}

/// Output size of a VDI with `opts`, given the virtual size and the guest bytes that hold
/// data (counted in 1 MiB chunks).
///
/// # Errors
/// `Invalid` for bad options.
pub fn measure(opts: &WriteOptions, virtual_size: u64, data_bytes: u64) -> Result<Measure> {
    let plan = Plan::new(opts, virtual_size)?;
    let full = plan.data_at() + u64::from(plan.blocks) * BLOCK;
    let required = if plan.is_static {
        full
    } else {
        plan.data_at() + data_bytes.div_ceil(BLOCK).min(u64::from(plan.blocks)) * BLOCK
    };
    Ok(Measure {
        required,
        fully_allocated: full,
    })
}

struct VdiWriter {
    file: File,
    plan: Plan,
    bmap: Table<u32>,
    allocated: u32,
    pos: u64,
    /// Pending file-to-file copies.
    copies: crate::copy::CopyMerger,
}

impl Writer for VdiWriter {
    fn chunk_size(&self) -> u64 {
        BLOCK
    }

    fn accepts_copy(&self) -> bool {
        true
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        check_chunk_at("vdi", &chunk, self.pos, BLOCK)?;
        let index =
            usize::try_from(chunk.guest / BLOCK).map_err(|_| Error::invalid("chunk index"))?;
        match chunk.payload {
            Payload::Zero => {}
            p @ (Payload::Data(_) | Payload::Copy(_)) => {
                let slot = self
                    .bmap
                    .entries
                    .get_mut(index)
                    .ok_or_else(|| Error::invalid("chunk past the virtual size"))?;
                if !self.plan.is_static {
                    *slot = self.allocated;
                    self.allocated += 1;
                }
                let at = self.plan.data_at() + u64::from(*slot) * BLOCK;
                p.write_at(&self.file, at, &mut self.copies)?;
            }
            Payload::Compressed(_) => {
                return Err(Error::invalid("vdi writer got a compressed chunk"))
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
        f.write_all_at(&self.plan.header(self.allocated)?, 0)?;
        write_pieces(
            |b, at| f.write_all_at(b, at),
            BMAP_AT,
            self.bmap.entries.iter().copied(),
            u32::to_le_bytes,
            self.plan.bmap_len(),
            0,
        )?;
        // Every allocated block is whole on disk, the last one included.
        f.set_len(self.plan.data_at() + u64::from(self.allocated) * BLOCK)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_measure() {
        let o = WriteOptions::parse("static=on", false).unwrap();
        let p = Plan::new(&o, 3 * BLOCK + 1).unwrap();
        assert!(p.is_static && p.blocks == 4 && p.size == 3 * BLOCK + 512);
        assert!(Plan::new(&WriteOptions::parse("static=maybe", false).unwrap(), 1).is_err());
        assert!(Plan::new(&WriteOptions::parse("subformat=x", false).unwrap(), 1).is_err());
        // Header and block map end at 1024; the data starts on the next page.
        let m = measure(&WriteOptions::default(), 10 * BLOCK, 3 * BLOCK).unwrap();
        assert_eq!(
            (m.required, m.fully_allocated),
            (4096 + 3 * BLOCK, 4096 + 10 * BLOCK)
        );
        let m = measure(&o, 10 * BLOCK, 0).unwrap();
        assert_eq!(m.required, 4096 + 10 * BLOCK);
        // A block map that fills 4 KiB exactly (1,024 blocks from 512) still rounds up.
        let p = Plan::new(&WriteOptions::default(), 1024 * BLOCK).unwrap();
        assert_eq!(p.data_at(), 8192);
    }
}
