//! Parallels / ploop writer (`-O ploop`, alias `parallels`, qemu's `parallels`).
//!
//! Options (`-o key=value,...`):
//!
//! - `cluster_size=N`: bytes per cluster, a multiple of 512 (qemu-img's option; default
//!   1 MiB, qemu's default).
//!
//! The layout is qemu-img's: a `WithouFreSpacExt` header (version 2), the BAT right after it
//! (entries in clusters), padding to the first whole cluster, then the data clusters in guest
//! order. Only clusters that hold data are stored; the others stay unallocated (the format has
//! no zero marker, and an unallocated cluster reads as zeros). No format extension is written.
//! A virtual size that is not a whole number of sectors is rounded up to one, as qemu-img
//! does.

use std::fs::File;
use std::os::unix::fs::FileExt;

use byteorder::{LittleEndian, WriteBytesExt};
use glimpse_formats::parallels::header::{
    HEADER_LEN, INUSE_CLOSED, MAGIC_EXT, MAX_BAT_ENTRIES, MAX_TRACKS, SECTOR, VERSION,
};

use crate::table::{write_pieces, Table};
use crate::{
    check_chunk_at, write_zero_span, Chunk, Error, Measure, Payload, Result, Target, WriteOptions,
    Writer,
};

/// qemu-img's default cluster size.
pub const DEFAULT_CLUSTER: u64 = 1 << 20;
/// Geometry qemu-img writes (unused by readers).
const HEADS: u32 = 16;
const SECTORS_PER_TRACK: u64 = 32;

#[derive(Debug, Clone, Copy)]
struct Plan {
    cluster: u64,
    size: u64,
    entries: u32,
}

impl Plan {
    fn new(opts: &WriteOptions, virtual_size: u64) -> Result<Plan> {
        opts.only("ploop", &["cluster_size"])?;
        let cluster = opts.size("cluster_size")?.unwrap_or(DEFAULT_CLUSTER);
        if cluster == 0 || cluster % SECTOR != 0 || cluster / SECTOR > u64::from(MAX_TRACKS) {
            return Err(Error::usage(format!(
                "cluster_size={cluster}: a multiple of 512 up to {} bytes",
                u64::from(MAX_TRACKS) * SECTOR
            )));
        }
        let size = virtual_size
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| Error::invalid(format!("size {virtual_size} overflows")))?;
        let entries = u32::try_from(size.div_ceil(cluster))
            .ok()
            // qemu's cap, and a BAT glimpse itself reads under its default limits.
            .filter(|&n| {
                n <= MAX_BAT_ENTRIES
                    && glimpse_formats::Limits::default()
                        .table_bytes(u64::from(n), 4)
                        .is_some()
            })
            .ok_or_else(|| {
                Error::invalid(format!(
                    "a ploop image of {size} bytes needs too many {cluster}-byte clusters"
                ))
            })?;
        Ok(Plan {
            cluster,
            size,
            entries,
        })
    }

    /// The data area's start: the end of the BAT rounded up to a cluster (qemu-img's layout,
    /// required for `WithouFreSpacExt`).
    fn data_at(&self) -> u64 {
        (HEADER_LEN + u64::from(self.entries) * 4).div_ceil(self.cluster) * self.cluster
    }

    fn header(&self) -> Result<Vec<u8>> {
        let tracks = u32::try_from(self.cluster / SECTOR).map_err(|_| Error::invalid("tracks"))?;
        let cylinders = u32::try_from(self.size / SECTOR / u64::from(HEADS) / SECTORS_PER_TRACK)
            .unwrap_or(u32::MAX);
        let data_off =
            u32::try_from(self.data_at() / SECTOR).map_err(|_| Error::invalid("BAT too large"))?;
        let mut h = Vec::with_capacity(HEADER_LEN as usize);
        h.extend_from_slice(MAGIC_EXT);
        h.write_u32::<LittleEndian>(VERSION)?;
        h.write_u32::<LittleEndian>(HEADS)?;
        h.write_u32::<LittleEndian>(cylinders)?;
        h.write_u32::<LittleEndian>(tracks)?;
        h.write_u32::<LittleEndian>(self.entries)?;
        h.write_u64::<LittleEndian>(self.size / SECTOR)?;
        // Closed cleanly (qemu-img writes 0, which means the same to every reader).
        h.write_u32::<LittleEndian>(INUSE_CLOSED)?;
        h.write_u32::<LittleEndian>(data_off)?;
        h.write_u32::<LittleEndian>(0)?; // flags
        h.write_u64::<LittleEndian>(0)?; // no format extension
        Ok(h)
    }
}

/// Creates a ploop writer for a guest disk of `virtual_size` bytes. See the module
/// documentation for the options.
///
/// # Errors
/// `Invalid` for bad options or a size the format cannot hold; `Unsupported` for a pipe (the
/// header and BAT are written last); `Io` on write errors.
pub fn create(target: Target, opts: &WriteOptions, virtual_size: u64) -> Result<Box<dyn Writer>> {
    let plan = Plan::new(opts, virtual_size)?;
    let Target::File(file) = target else {
        return Err(Error::unsupported(
            "a ploop image cannot be written to a pipe",
        ));
    };
    let bat = Table::new(opts, u64::from(plan.entries), 0u32, "BAT")?;
    Ok(Box::new(PloopWriter {
        file,
        plan,
        bat,
        allocated: 0,
        pos: 0,
        copies: crate::copy::CopyMerger::default(),
    }))
}

/// Output size of a ploop image with `opts`, given the virtual size and the guest bytes that
/// hold data (counted in whole clusters).
///
/// # Errors
/// `Invalid` for bad options.
pub fn measure(opts: &WriteOptions, virtual_size: u64, data_bytes: u64) -> Result<Measure> {
    let plan = Plan::new(opts, virtual_size)?;
    let clusters = u64::from(plan.entries);
    Ok(Measure {
        required: plan.data_at() + data_bytes.div_ceil(plan.cluster).min(clusters) * plan.cluster,
        fully_allocated: plan.data_at() + clusters * plan.cluster,
    })
}

/// The cluster size `opts` asks for (for `measure`'s data count).
///
/// # Errors
/// `Invalid` for a bad `cluster_size`.
pub fn cluster_size(opts: &WriteOptions) -> Result<u64> {
    Ok(opts.size("cluster_size")?.unwrap_or(DEFAULT_CLUSTER))
}

struct PloopWriter {
    file: File,
    plan: Plan,
    bat: Table<u32>,
    allocated: u64,
    pos: u64,
    /// Pending file-to-file copies.
    copies: crate::copy::CopyMerger,
}

impl Writer for PloopWriter {
    fn chunk_size(&self) -> u64 {
        self.plan.cluster
    }

    fn accepts_copy(&self) -> bool {
        true
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        let cs = self.plan.cluster;
        check_chunk_at("ploop", &chunk, self.pos, cs)?;
        let index = usize::try_from(chunk.guest / cs).map_err(|_| Error::invalid("chunk index"))?;
        match chunk.payload {
            Payload::Zero => {}
            p @ (Payload::Data(_) | Payload::Copy(_)) => {
                let at = self.plan.data_at() + self.allocated * cs;
                let slot = self
                    .bat
                    .entries
                    .get_mut(index)
                    .ok_or_else(|| Error::invalid("chunk past the virtual size"))?;
                *slot = u32::try_from(at / cs)
                    .map_err(|_| Error::invalid("ploop image too large for its BAT"))?;
                self.allocated += 1;
                p.write_at(&self.file, at, &mut self.copies)?;
            }
            Payload::Compressed(_) => {
                return Err(Error::invalid("ploop writer got a compressed chunk"))
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
        let header = self.plan.header()?;
        f.write_all_at(&header, 0)?;
        write_pieces(
            |b, at| f.write_all_at(b, at),
            header.len() as u64,
            self.bat.entries.iter().copied(),
            u32::to_le_bytes,
            (self.bat.entries.len() as u64).saturating_mul(4),
            0,
        )?;
        // The padding up to the data area, and every allocated cluster, are whole on disk (a
        // short last cluster would be "outside the image" to qemu-img check).
        f.set_len(self.plan.data_at() + self.allocated * self.plan.cluster)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_measure() {
        let o = WriteOptions::parse("cluster_size=64k", false).unwrap();
        let p = Plan::new(&o, 3 * 65536 + 1).unwrap();
        assert_eq!((p.cluster, p.entries, p.size), (65536, 4, 3 * 65536 + 512));
        assert_eq!(p.data_at(), 65536);
        for bad in ["cluster_size=1000", "cluster_size=0", "subformat=x"] {
            assert!(
                Plan::new(&WriteOptions::parse(bad, false).unwrap(), 1).is_err(),
                "{bad}"
            );
        }
        let m = measure(&WriteOptions::default(), 10 << 20, 3 << 20).unwrap();
        assert_eq!(
            (m.required, m.fully_allocated),
            ((1 << 20) + (3 << 20), (1 << 20) + (10 << 20))
        );
        let h = p.header().unwrap();
        assert_eq!(h.len(), 64);
        let parsed = glimpse_formats::parallels::Header::parse(&h).unwrap();
        assert_eq!((parsed.tracks, parsed.bat_entries), (128, 4));
        assert_eq!(parsed.min_data_off(), 128);
    }
}
