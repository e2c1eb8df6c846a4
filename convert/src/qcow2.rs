//! qcow2 writer.
//!
//! Layout, for chunks that arrive in guest order on a seekable file:
//!
//! ```text
//! cluster 0            header (+ end-of-extensions marker)
//! clusters 1..         L1 table (sized for the virtual size)
//! then                 refcount table, sized up front for the worst case
//! then, in order       data clusters, compressed streams packed back to back, and each L2
//!                      table as soon as the chunks move past its range
//! at finish            the refcount blocks covering everything (themselves included), then
//!                      the refcount table, L1 table and header are written in place
//! ```
//!
//! Every host cluster's refcount is counted as it is allocated, so `qemu-img check` finds no
//! leaks and no errors. Zero chunks stay unallocated.

use byteorder::{BigEndian, ByteOrder};
use glimpse_formats::qcow2::header::{
    DEFAULT_REFCOUNT_ORDER as REFCOUNT_ORDER, INCOMPAT_COMPRESSION, MAGIC, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS, V2_HEADER_LEN, V3_HEADER_LEN,
};
use glimpse_formats::qcow2::refcount::entries_per_block;
use glimpse_formats::qcow2::table::{Geometry, OFLAG_COMPRESSED, OFLAG_COPIED, SECTOR};

use crate::table::{write_pieces, Table};
use crate::{
    Chunk, Codec, Compressor, Error, Measure, Payload, Result, Target, WriteOptions, Writer,
};

/// Options this writer understands (qemu-img's names).
const OPTIONS: &[&str] = &["compat", "cluster_size", "compression_type"];

/// Parsed writer options.
#[derive(Debug, Clone, Copy)]
struct Opts {
    v3: bool,
    cluster_bits: u32,
    zstd: bool,
}

fn parse_opts(opts: &WriteOptions) -> Result<Opts> {
    opts.only("qcow2", OPTIONS)?;
    let v3 = match opts.get("compat") {
        None | Some("1.1") | Some("v3") => true,
        Some("0.10") | Some("v2") => false,
        Some(v) => return Err(Error::usage(format!("compat={v}: expected 0.10 or 1.1"))),
    };
    let cs = opts.size("cluster_size")?.unwrap_or(65536);
    let sizes = 1u64 << MIN_CLUSTER_BITS..=1u64 << MAX_CLUSTER_BITS;
    if !cs.is_power_of_two() || !sizes.contains(&cs) {
        return Err(Error::usage(format!(
            "cluster_size={cs}: must be a power of two from 512 to 2M"
        )));
    }
    let zstd = match opts.get("compression_type") {
        None | Some("zlib") => false,
        Some("zstd") => true,
        Some(v) => {
            return Err(Error::usage(format!(
                "compression_type={v}: expected zlib or zstd"
            )))
        }
    };
    if zstd && !v3 {
        return Err(Error::usage("compression_type=zstd needs compat=1.1"));
    }
    Ok(Opts {
        v3,
        cluster_bits: cs.trailing_zeros(),
        zstd,
    })
}

/// Metadata sizes for a virtual size.
#[derive(Debug, Clone, Copy)]
struct Layout {
    l1_entries: u64,
    l1_clusters: u64,
    rt_clusters: u64,
}

fn layout(cluster_bits: u32, virtual_size: u64) -> Result<Layout> {
    let cs = 1u64 << cluster_bits;
    let l2e = cs / 8;
    let data = virtual_size.div_ceil(cs);
    let l1_entries = data.div_ceil(l2e);
    let l1_bytes = l1_entries * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(Error::invalid(format!(
            "virtual size {virtual_size} needs an L1 table larger than 32 MiB with {cs}-byte clusters"
        )));
    }
    let l1_clusters = l1_bytes.div_ceil(cs);
    // Worst case: every guest cluster stored, every L2 table present, one cluster of slack
    // for a compressed stream's tail.
    let fixed = 1 + l1_clusters + data + l1_entries + 1;
    let epb = entries_per_block(cluster_bits, REFCOUNT_ORDER);
    let (mut blocks, mut rt) = (0u64, 0u64);
    loop {
        let nb = (fixed + blocks + rt).div_ceil(epb);
        let nrt = (nb * 8).div_ceil(cs).max(1);
        if nb == blocks && nrt == rt {
            break;
        }
        blocks = nb;
        rt = nrt;
    }
    if rt * cs > MAX_REFTABLE_BYTES {
        return Err(Error::invalid(format!(
            "virtual size {virtual_size} needs a refcount table larger than 8 MiB"
        )));
    }
    Ok(Layout {
        l1_entries,
        l1_clusters,
        rt_clusters: rt,
    })
}

struct Qcow2Writer {
    file: crate::WriteCombiner,
    o: Opts,
    cs: u64,
    virtual_size: u64,
    compress: bool,
    lay: Layout,
    l1: Table<u64>,
    l1_off: u64,
    rt_off: u64,
    /// The L2 table being filled: its L1 index and entries.
    cur_l2: Option<(u64, Vec<u64>)>,
    /// End of the last allocation in bytes.
    end: u64,
    /// Where the next compressed stream may go (inside a partly used cluster).
    cfree: Option<u64>,
    /// Refcount of every host cluster so far. Not charged: it grows with the clusters
    /// written (2 bytes per cluster, 1/32768 of the output at 64 KiB clusters), not with
    /// anything the source claims.
    refs: Vec<u16>,
    next_guest: u64,
}

/// Creates a qcow2 writer.
///
/// # Errors
/// `Invalid` for bad options or a virtual size qemu could not address; `Unsupported` for a
/// stream target; `Io` on write errors.
pub fn create(target: Target, opts: &WriteOptions, virtual_size: u64) -> Result<Box<dyn Writer>> {
    let o = parse_opts(opts)?;
    let Target::File(file) = target else {
        return Err(Error::unsupported("qcow2 needs a seekable file"));
    };
    let lay = layout(o.cluster_bits, virtual_size)?;
    let cs = 1u64 << o.cluster_bits;
    let l1_off = cs;
    let rt_off = l1_off + lay.l1_clusters * cs;
    let first_free = rt_off + lay.rt_clusters * cs;
    let n = usize::try_from(first_free / cs).map_err(|_| Error::limit("too many clusters"))?;
    let refs = vec![1u16; n];
    let l1 = Table::new(opts, lay.l1_entries, 0u64, "L1 table")?;
    Ok(Box::new(Qcow2Writer {
        file: crate::WriteCombiner::new(file),
        o,
        cs,
        virtual_size,
        compress: opts.compress,
        lay,
        l1,
        l1_off,
        rt_off,
        cur_l2: None,
        end: first_free,
        cfree: None,
        refs,
        next_guest: 0,
    }))
}

impl Qcow2Writer {
    fn bump(&mut self, start: u64, len: u64) {
        let (a, b) = (start / self.cs, (start + len.max(1) - 1) / self.cs);
        let need = usize::try_from(b + 1).unwrap_or(usize::MAX);
        if self.refs.len() < need {
            self.refs.resize(need, 0);
        }
        for c in a..=b {
            if let Some(r) = self.refs.get_mut(usize::try_from(c).unwrap_or(usize::MAX)) {
                *r = r.saturating_add(1);
            }
        }
    }

    fn alloc_cluster(&mut self) -> u64 {
        let off = self.end.div_ceil(self.cs) * self.cs;
        self.end = off + self.cs;
        self.bump(off, self.cs);
        off
    }

    /// Compressed streams are packed byte by byte, like qemu's `qcow2_alloc_bytes`: a stream
    /// goes where the previous one ended when it fits in that cluster, or runs on into the
    /// next cluster when that is the last one allocated; otherwise it starts a new cluster.
    /// Each cluster a stream touches counts one more reference.
    fn alloc_bytes(&mut self, len: u64) -> u64 {
        let fresh = self.end.div_ceil(self.cs) * self.cs;
        let off = match self.cfree {
            Some(cur) => {
                let cl_end = (cur / self.cs + 1) * self.cs;
                let last_allocated = cl_end == fresh;
                if cur + len <= cl_end || last_allocated {
                    cur
                } else {
                    fresh
                }
            }
            None => fresh,
        };
        let stop = off + len;
        self.end = self.end.max(stop);
        self.cfree = (stop % self.cs != 0).then_some(stop);
        self.bump(off, len);
        off
    }

    fn flush_l2(&mut self) -> Result<()> {
        if let Some((idx, table)) = self.cur_l2.take() {
            let off = self.alloc_cluster();
            let mut buf = vec![0u8; table.len() * 8];
            BigEndian::write_u64_into(&table, &mut buf);
            self.file.write_all_at(&buf, off)?;
            if let Some(e) = self
                .l1
                .entries
                .get_mut(usize::try_from(idx).unwrap_or(usize::MAX))
            {
                *e = off | OFLAG_COPIED;
            }
        }
        Ok(())
    }

    fn set_entry(&mut self, cluster: u64, entry: u64) -> Result<()> {
        let l2e = self.cs / 8;
        let idx = cluster / l2e;
        if self.cur_l2.as_ref().is_some_and(|(i, _)| *i != idx) {
            self.flush_l2()?;
        }
        let n = usize::try_from(l2e).unwrap_or(0);
        let (_, t) = self.cur_l2.get_or_insert_with(|| (idx, vec![0u64; n]));
        if let Some(e) = t.get_mut(usize::try_from(cluster % l2e).unwrap_or(usize::MAX)) {
            *e = entry;
        }
        Ok(())
    }

    fn codec(&self) -> Codec {
        if self.o.zstd {
            Codec::Zstd
        } else {
            Codec::Deflate
        }
    }

    fn header(&self) -> Vec<u8> {
        // The header, then 8 zero bytes: the end-of-extensions marker.
        let len = if self.o.v3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        };
        let mut h = vec![0u8; len as usize + 8];
        h[0..4].copy_from_slice(&MAGIC);
        BigEndian::write_u32(&mut h[4..8], if self.o.v3 { 3 } else { 2 });
        BigEndian::write_u32(&mut h[20..24], self.o.cluster_bits);
        // qemu reads the size in whole 512-byte sectors, rounding down, and qemu-img rounds
        // sizes up when it creates an image: store the rounded-up size so no byte is lost.
        BigEndian::write_u64(
            &mut h[24..32],
            self.virtual_size.div_ceil(512).saturating_mul(512),
        );
        BigEndian::write_u32(
            &mut h[36..40],
            u32::try_from(self.lay.l1_entries).unwrap_or(0),
        );
        BigEndian::write_u64(&mut h[40..48], self.l1_off);
        BigEndian::write_u64(&mut h[48..56], self.rt_off);
        BigEndian::write_u32(
            &mut h[56..60],
            u32::try_from(self.lay.rt_clusters).unwrap_or(0),
        );
        if self.o.v3 {
            let incompat = if self.o.zstd { INCOMPAT_COMPRESSION } else { 0 };
            BigEndian::write_u64(&mut h[72..80], incompat);
            BigEndian::write_u32(&mut h[96..100], REFCOUNT_ORDER);
            BigEndian::write_u32(&mut h[100..104], V3_HEADER_LEN);
            h[104] = u8::from(self.o.zstd);
        }
        h
    }
}

impl Writer for Qcow2Writer {
    fn chunk_size(&self) -> u64 {
        self.cs
    }

    fn accepts_copy(&self) -> bool {
        !self.compress
    }

    fn compressor(&self) -> Option<Compressor> {
        // qemu compresses into a buffer of cluster_size - 1 bytes and stores the cluster
        // uncompressed when that does not fit; zlib level 6 (Z_DEFAULT_COMPRESSION) and
        // zstd's default level 3.
        self.compress.then(|| Compressor {
            codec: self.codec(),
            level: if self.o.zstd { 3 } else { 6 },
            always: false,
            max_len: usize::try_from(self.cs).unwrap_or(usize::MAX),
        })
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        if chunk.guest != self.next_guest || chunk.guest % self.cs != 0 || chunk.len > self.cs {
            return Err(Error::invalid(format!(
                "qcow2 writer: chunk at {:#x} is out of order",
                chunk.guest
            )));
        }
        self.next_guest = chunk.guest + chunk.len;
        let cluster = chunk.guest / self.cs;
        match chunk.payload {
            Payload::Zero => {}
            p @ (Payload::Data(_) | Payload::Copy(_)) => {
                let off = self.alloc_cluster();
                self.file.put(&p, off)?;
                self.set_entry(cluster, off | OFLAG_COPIED)?;
            }
            Payload::Compressed(mut z) => {
                if chunk.len < self.cs {
                    // qemu decompresses a whole cluster: pad the last, short cluster.
                    let mut full = glimpse_formats::reader::decompress(
                        self.codec(),
                        &z,
                        chunk.len,
                        chunk.len,
                    )?;
                    full.resize(usize::try_from(self.cs).unwrap_or(0), 0);
                    let level = if self.o.zstd { 3 } else { 6 };
                    z = crate::codec::compress(self.codec(), level, &full)?;
                    if z.len() as u64 >= self.cs {
                        full.truncate(usize::try_from(chunk.len).unwrap_or(0));
                        let off = self.alloc_cluster();
                        self.file.write_all_at(&full, off)?;
                        return self.set_entry(cluster, off | OFLAG_COPIED);
                    }
                }
                let len = z.len() as u64;
                let off = self.alloc_bytes(len);
                self.file.write_all_at(&z, off)?;
                let shift = Geometry {
                    cluster_bits: self.o.cluster_bits,
                    extended: false,
                }
                .csize_shift();
                let extra = (off + len - 1) / SECTOR - off / SECTOR;
                self.set_entry(cluster, OFLAG_COMPRESSED | (extra << shift) | off)?;
            }
        }
        Ok(())
    }

    fn write_zeros(&mut self, guest: u64, len: u64) -> Result<()> {
        // Unallocated clusters need no entry: the whole span is a position check.
        if guest != self.next_guest || guest % self.cs != 0 {
            return Err(Error::invalid(format!(
                "qcow2 writer: zeros at {guest:#x} are out of order"
            )));
        }
        self.next_guest = guest.saturating_add(len);
        Ok(())
    }

    fn batch_end(&mut self) -> Result<()> {
        Ok(self.file.hand_off()?)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if self.next_guest != self.virtual_size {
            return Err(Error::invalid(format!(
                "qcow2 writer: got {} of {} guest bytes",
                self.next_guest, self.virtual_size
            )));
        }
        self.flush_l2()?;
        let cs = self.cs;
        let epb = entries_per_block(self.o.cluster_bits, REFCOUNT_ORDER);
        let first_block = self.end.div_ceil(cs);
        let mut blocks = 0u64;
        loop {
            let nb = (first_block + blocks).div_ceil(epb);
            if nb == blocks {
                break;
            }
            blocks = nb;
        }
        if blocks * 8 > self.lay.rt_clusters * cs {
            return Err(Error::invalid(
                "qcow2 writer: refcount table too small (internal error)",
            ));
        }
        let total =
            usize::try_from(first_block + blocks).map_err(|_| Error::limit("too many clusters"))?;
        self.refs
            .resize(usize::try_from(first_block).unwrap_or(0), 0);
        self.refs.resize(total, 1);
        // One refcount block buffer, reused; the refcount table (the blocks' offsets, one
        // after another) and the L1 table are written in pieces, never copied whole.
        let per = usize::try_from(epb).unwrap_or(1);
        let mut blk = vec![0u8; usize::try_from(cs).unwrap_or(0)];
        for (b, counts) in self.refs.chunks(per).enumerate() {
            let off = (first_block + b as u64) * cs;
            blk.fill(0);
            for (i, r) in counts.iter().enumerate() {
                BigEndian::write_u16(&mut blk[i * 2..i * 2 + 2], *r);
            }
            self.file.write_all_at(&blk, off)?;
        }
        let file = &mut self.file;
        write_pieces(
            |b, at| file.write_all_at(b, at),
            self.rt_off,
            (0..blocks).map(|b| first_block.saturating_add(b).saturating_mul(cs)),
            u64::to_be_bytes,
            self.lay.rt_clusters.saturating_mul(cs),
            0,
        )?;
        write_pieces(
            |b, at| file.write_all_at(b, at),
            self.l1_off,
            self.l1.entries.iter().copied(),
            u64::to_be_bytes,
            (self.l1.entries.len() as u64).saturating_mul(8),
            0,
        )?;
        self.file.write_all_at(&self.header(), 0)?;
        self.file.flush()?;
        Ok(())
    }
}

/// qemu's `qcow2_refcount_metadata_size`: refcount blocks and table for `clusters` clusters.
fn refcount_metadata_size(clusters: u64, cs: u64) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = entries_per_block(cs.trailing_zeros(), REFCOUNT_ORDER);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cs
}

/// Output size of a qcow2 image, as `qemu-img measure -O qcow2` computes it: the fully
/// allocated size (`qcow2_calc_prealloc_size`), and that minus the clusters holding no data.
///
/// Exact against `qemu-img measure --size` (tested). With content, qemu-img counts the
/// source's allocated ranges while `data_bytes` counts non-zero chunks, so `required` agrees
/// within a cluster or two.
///
/// # Errors
/// `Invalid` for bad options.
pub fn measure(opts: &WriteOptions, virtual_size: u64, data_bytes: u64) -> Result<Measure> {
    let o = parse_opts(opts)?;
    let cs = 1u64 << o.cluster_bits;
    let aligned = virtual_size.div_ceil(cs).saturating_mul(cs);
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl2e * 8;
    let nl1e = (nl2e * 8 / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs);
    let fully = meta + aligned;
    let data = data_bytes.div_ceil(cs).saturating_mul(cs).min(aligned);
    Ok(Measure {
        required: fully - aligned + data,
        fully_allocated: fully,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let o = |s: &str| WriteOptions::parse(s, false).unwrap();
        assert!(parse_opts(&o("compat=0.10,compression_type=zstd")).is_err());
        assert!(parse_opts(&o("cluster_size=3000")).is_err());
        assert!(parse_opts(&o("cluster_size=4M")).is_err());
        assert!(parse_opts(&o("preallocation=full")).is_err());
        let p = parse_opts(&o("cluster_size=2M,compression_type=zstd")).unwrap();
        assert_eq!((p.v3, p.cluster_bits, p.zstd), (true, 21, true));
    }
}
