//! The guest reader: guest bytes at any offset, on top of the `mapping` entry point of [`Image`].

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{Codec, Extent, ExtentKind, Image};
use crate::limits::{Charge, Limits};
use crate::lru::Lru;

/// Largest compressed unit accepted: no format compresses more than 64 MiB as one unit
/// (qcow2 clusters are at most 2 MiB; VMDK grains are far smaller).
pub const MAX_UNIT: u64 = 64 << 20;

/// Decompresses one unit (cluster or grain) into at most `unit_size` bytes, as qemu reads it.
///
/// - qcow2's clusters (raw deflate, zstd) must fill the whole cluster, even the last one of a
///   disk that ends inside it: qemu decompresses whole clusters and fails unless its buffer is
///   full. A deflate stream may run on past the cluster (qemu stops there too); a zstd frame
///   may not (qemu fails unless the frame ends where the cluster does), but a cluster may be
///   several frames one after another, which qemu reads on through.
/// - A VMDK grain's zlib stream must end within `unit_size`, and yield at least `min_len`
///   bytes (the part of the grain that is read).
///
/// A stream that is not valid for `codec` is an error.
///
/// # Errors
/// `Corrupt` for garbage or truncated streams; `LimitExceeded` for an absurd `unit_size`.
pub fn decompress(codec: Codec, input: &[u8], unit_size: u64, min_len: u64) -> Result<Vec<u8>> {
    // No unit of any format is larger than 2 MiB (qcow2's largest cluster) except VMDK grains
    // and VHDX blocks, which are never compressed beyond 64 MiB; refuse more.
    if unit_size > MAX_UNIT {
        return Err(Error::limit(format!(
            "compressed unit of {unit_size} bytes is too large"
        )));
    }
    let cap = usize::try_from(unit_size).map_err(|_| Error::limit("unit too large"))?;
    let min_len = match codec {
        Codec::Deflate | Codec::Zstd => unit_size,
        Codec::Zlib => min_len,
    };
    let mut out = vec![0u8; cap];
    let produced = match codec {
        Codec::Deflate | Codec::Zlib => {
            let mut d = flate2::Decompress::new(codec == Codec::Zlib);
            let mut inp = input;
            let (now, ended) = inflate_into(&mut d, &mut inp, &mut out, codec)?;
            // qemu reads a VMDK grain with zlib's `uncompress`, which fails unless the
            // stream ends (Adler-32 checked) within the grain: a stream that inflates past
            // it, or stops short of its end, is a read error there and here. qcow2's raw
            // deflate clusters may run on: qemu stops at the cluster size too.
            if codec == Codec::Zlib && !ended {
                let mut probe = [0u8; 1];
                let (more, ended) = inflate_into(&mut d, &mut inp, &mut probe, codec)?;
                if more > 0 {
                    return Err(Error::corrupt(format!(
                        "zlib stream inflates past the {cap}-byte unit"
                    )));
                }
                if !ended {
                    return Err(Error::corrupt(
                        "zlib stream ends without its end marker and checksum",
                    ));
                }
            }
            now
        }
        Codec::Zstd => zstd_into(input, &mut out)?,
    };
    if (produced as u64) < min_len {
        return Err(Error::corrupt(format!(
            "compressed stream ended after {produced} of {min_len} bytes"
        )));
    }
    out.truncate(produced);
    Ok(out)
}

/// Decodes zstd frames from `input` into `out` until it is full, as qemu's
/// `qcow2_zstd_decompress` does: frame after frame, and an error when the frame being decoded
/// when `out` fills does not end there (it would inflate past the cluster). Returns the bytes
/// written; fewer than `out.len()` when the input ends or stops making progress.
fn zstd_into(input: &[u8], out: &mut [u8]) -> Result<usize> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let bad = |e: std::io::Error| Error::corrupt(format!("invalid zstd stream: {e}"));
    let mut dec = Decoder::new().map_err(bad)?;
    let mut inb = InBuffer::around(input);
    let cap = out.len();
    let mut outb = OutBuffer::around(out);
    // What the last step said is left of its frame (0: the frame ended).
    let mut left = 0;
    while outb.pos() < cap {
        let (was_in, was_out) = (inb.pos(), outb.pos());
        left = dec.run(&mut inb, &mut outb).map_err(bad)?;
        if inb.pos() == was_in && outb.pos() == was_out {
            break;
        }
    }
    if outb.pos() == cap && left > 0 {
        return Err(Error::corrupt(format!(
            "zstd frame inflates past the {cap}-byte unit"
        )));
    }
    Ok(outb.pos())
}

/// Inflates from `inp` into `out` until `out` is full, the stream ends, or no progress is
/// made. Returns the bytes written and whether the stream ended (for zlib, with its Adler-32
/// verified).
fn inflate_into(
    d: &mut flate2::Decompress,
    inp: &mut &[u8],
    out: &mut [u8],
    codec: Codec,
) -> Result<(usize, bool)> {
    let start = d.total_out();
    let cap = out.len();
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let done = usize::try_from(before_out.saturating_sub(start)).unwrap_or(cap);
        let Some(dst) = out.get_mut(done..) else {
            return Ok((done, false));
        };
        if dst.is_empty() {
            return Ok((done, false));
        }
        let status = d
            .decompress(inp, dst, flate2::FlushDecompress::None)
            .map_err(|e| Error::corrupt(format!("invalid {codec:?} stream: {e}")))?;
        let used = usize::try_from(d.total_in().saturating_sub(before_in)).unwrap_or(0);
        *inp = inp.get(used..).unwrap_or_default();
        let now = usize::try_from(d.total_out().saturating_sub(start)).unwrap_or(cap);
        if status == flate2::Status::StreamEnd {
            return Ok((now, true));
        }
        if d.total_in() == before_in && d.total_out() == before_out {
            return Ok((now, false));
        }
    }
}

/// Reads guest bytes of an image at any offset. `Sync`: share it between workers.
pub struct GuestReader {
    image: Arc<dyn Image>,
    /// Decompressed units keyed by host offset.
    /// Decompressed units by host offset and stored length: two entries may name the same
    /// host offset with different lengths, and each must read as qemu reads it, from its own
    /// bytes (a short one fails where a longer one succeeds).
    cache: Lru<(u64, u64), Arc<Vec<u8>>>,
    /// The cache's bytes, held from the command's budget for the reader's life.
    _charge: Option<Charge>,
}

impl GuestReader {
    /// A reader over `image` with a cache of at most `limits.max_cache_bytes`, and at most half
    /// of what the budget has left: the cache is charged to the budget for the reader's life,
    /// so that with a per-command budget metadata, caches and buffers share one bound.
    pub fn new(image: Arc<dyn Image>, limits: &Limits) -> Self {
        let budget = limits.budget();
        let cap = limits.max_cache_bytes.min(budget.left() / 2);
        let charge = budget.charge(cap, "reader cache").ok();
        let cap = if charge.is_some() { cap } else { 0 };
        GuestReader {
            image,
            cache: Lru::new(cap, usize::MAX),
            _charge: charge,
        }
    }

    /// The image.
    pub fn image(&self) -> &Arc<dyn Image> {
        &self.image
    }

    /// The guest disk size.
    pub fn virtual_size(&self) -> u64 {
        self.image.info().virtual_size
    }

    /// Fills `buf` with guest bytes from `guest`. The range must lie inside the disk.
    ///
    /// # Errors
    /// `Invalid` for a range outside the disk; `Corrupt` for bad compressed data or a mapping
    /// that points outside the file (the message names the guest offset); `Io`.
    pub fn read_at(&self, buf: &mut [u8], guest: u64) -> Result<()> {
        let vsize = self.virtual_size();
        let end = guest
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= vsize)
            .ok_or_else(|| {
                Error::invalid(format!(
                    "read of {} bytes at {guest:#x} passes the disk end",
                    buf.len()
                ))
            })?;
        let mut pos = guest;
        while pos < end {
            let e = self.image.content_mapping(pos, end.saturating_sub(pos))?;
            let from = usize::try_from(pos.saturating_sub(guest))
                .map_err(|_| Error::limit("read too large"))?;
            let to = usize::try_from(e.end().saturating_sub(guest))
                .map_err(|_| Error::limit("read too large"))?;
            let dst = buf
                .get_mut(from..to)
                .ok_or_else(|| Error::corrupt("extent outside buffer"))?;
            self.read_extent(&e, dst)?;
            pos = e.end();
        }
        Ok(())
    }

    /// Fills `dst` (exactly `e.len` bytes) with the guest bytes of extent `e`.
    ///
    /// # Errors
    /// As [`GuestReader::read_at`].
    pub fn read_extent(&self, e: &Extent, dst: &mut [u8]) -> Result<()> {
        match e.kind {
            ExtentKind::Zero | ExtentKind::Unallocated => dst.fill(0),
            ExtentKind::Data { host } => {
                self.image
                    .source()
                    .read_exact_at(dst, host)
                    .map_err(|err| {
                        Error::from(err)
                            .context(format!("reading guest offset {:#x}", e.start))
                            .at(host)
                    })?;
            }
            ExtentKind::Compressed {
                codec,
                host,
                stored_len,
                unit_size,
                skip,
            } => {
                let unit = self.unit(
                    codec,
                    host,
                    stored_len,
                    unit_size,
                    skip.saturating_add(e.len),
                    e.start,
                )?;
                let from = usize::try_from(skip).map_err(|_| Error::limit("skip too large"))?;
                let src = from
                    .checked_add(dst.len())
                    .and_then(|to| unit.get(from..to))
                    .ok_or_else(|| {
                        Error::corrupt(format!("compressed unit at guest {:#x} is short", e.start))
                    })?;
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }

    fn unit(
        &self,
        codec: Codec,
        host: u64,
        stored_len: u64,
        unit_size: u64,
        need: u64,
        guest: u64,
    ) -> Result<Arc<Vec<u8>>> {
        if let Some(v) = self.cache.get((host, stored_len))? {
            if v.len() as u64 >= need {
                return Ok(v);
            }
        }
        let size = self.image.source().size()?;
        // Refuse an absurd unit before allocating or reading anything for it.
        if unit_size > MAX_UNIT {
            return Err(
                Error::limit(format!("compressed unit of {unit_size} bytes is too large")).at(host),
            );
        }
        // The stored length may be an upper bound that runs past the file end (qcow2).
        let avail = size.saturating_sub(host).min(stored_len);
        if avail == 0 || stored_len > unit_size.saturating_mul(2).saturating_add(1 << 16) {
            return Err(Error::corrupt(format!(
                "compressed data for guest offset {guest:#x} lies outside the file"
            ))
            .at(host));
        }
        let mut raw = vec![
            0u8;
            usize::try_from(avail)
                .map_err(|_| Error::limit("compressed unit too large"))?
        ];
        self.image.source().read_exact_at(&mut raw, host)?;
        let out = decompress(codec, &raw, unit_size, need)
            .map_err(|err| err.context(format!("guest offset {guest:#x}")).at(host))?;
        let out = Arc::new(out);
        self.cache
            .put((host, stored_len), out.clone(), out.len() as u64)?;
        Ok(out)
    }
}

/// One chunk of the guest disk, or one span of chunks that reads as zeros, and whether any of
/// it must be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    /// First guest byte (a multiple of the chunk size).
    pub guest: u64,
    /// Length: the chunk size, or less for the last chunk; when `read` is false it may be
    /// any number of whole chunks (plus the short last one), a zero span.
    pub len: u64,
    /// False when the whole range is zero or unallocated by the mapping, so it reads as zeros
    /// without reading.
    pub read: bool,
}

/// Cuts the guest disk into aligned chunks in order, classifying each from the mapping. Each
/// extent is looked up once however many chunks it spans, and the whole chunks inside one
/// zero or unallocated extent come out as a single zero span, so an empty 1 PiB disk is a few
/// plans rather than billions.
pub struct ChunkPlanner<'a> {
    image: &'a dyn Image,
    chunk: u64,
    pos: u64,
    size: u64,
    /// The current extent's end and whether it reads as zero.
    cur: Option<(u64, bool)>,
    /// Stored data in holes of the source file reads as zero without being read.
    holes: crate::extents::HoleSplit,
}

impl<'a> ChunkPlanner<'a> {
    /// A planner over `image` in chunks of `chunk` bytes (at least 1).
    pub fn new(image: &'a dyn Image, chunk: u64) -> Self {
        ChunkPlanner {
            image,
            chunk: chunk.max(1),
            pos: 0,
            size: image.info().virtual_size,
            cur: None,
            holes: crate::extents::HoleSplit::default(),
        }
    }

    /// Skips to `pos` (aligned down to the chunk size).
    pub fn seek(&mut self, pos: u64) {
        self.pos = pos.saturating_sub(pos.checked_rem(self.chunk).unwrap_or(0));
    }

    /// The end of the extent holding `p` and whether it reads as zero (cached).
    fn extent_at(&mut self, p: u64) -> Result<(u64, bool)> {
        if let Some((e, z)) = self.cur.filter(|(e, _)| *e > p) {
            return Ok((e, z));
        }
        // Ask for a long run so that one lookup covers many chunks.
        let e = self.image.content_mapping(p, self.size.saturating_sub(p))?;
        let e = self.holes.content(self.image.source(), &e)?;
        self.cur = Some((e.end(), e.reads_as_zero()));
        Ok((e.end(), e.reads_as_zero()))
    }

    fn plan(&mut self) -> Result<ChunkPlan> {
        let start = self.pos;
        let end = start
            .checked_div(self.chunk)
            .unwrap_or(start)
            .saturating_add(1)
            .saturating_mul(self.chunk)
            .min(self.size);
        let (ext_end, zero) = self.extent_at(start)?;
        if zero && ext_end >= end {
            // Every whole chunk inside the zero extent, in one plan.
            let span_end = if ext_end >= self.size {
                self.size
            } else {
                ext_end.saturating_sub(ext_end.checked_rem(self.chunk).unwrap_or(0))
            };
            return Ok(ChunkPlan {
                guest: start,
                len: span_end.max(end).saturating_sub(start),
                read: false,
            });
        }
        let mut read = !zero;
        let mut p = ext_end.min(end);
        while p < end && !read {
            let (ext_end, zero) = self.extent_at(p)?;
            read |= !zero;
            p = ext_end.min(end);
        }
        Ok(ChunkPlan {
            guest: start,
            len: end.saturating_sub(start),
            read,
        })
    }
}

impl Iterator for ChunkPlanner<'_> {
    type Item = Result<ChunkPlan>;

    fn next(&mut self) -> Option<Result<ChunkPlan>> {
        if self.pos >= self.size {
            return None;
        }
        match self.plan() {
            Ok(plan) => {
                self.pos = plan.guest.saturating_add(plan.len);
                Some(Ok(plan))
            }
            Err(err) => {
                self.pos = self.size;
                Some(Err(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// An image whose one extent is a compressed unit of absurd size.
    struct Absurd {
        src: crate::io::Source,
        info: crate::image::ImageInfo,
    }
    impl Image for Absurd {
        fn core(&self) -> crate::ImageCore<'_> {
            crate::ImageCore::new(&self.info, &[], &self.src)
        }
        fn extent_at(&self, guest: u64, len: u64) -> Result<Extent> {
            let kind = ExtentKind::Compressed {
                codec: Codec::Deflate,
                host: 0,
                stored_len: u64::MAX,
                unit_size: u64::MAX,
                skip: guest,
            };
            Ok(Extent {
                start: guest,
                len,
                kind,
            })
        }
    }

    #[test]
    fn an_absurd_compressed_unit_is_a_limit_error_not_a_panic_or_allocation() {
        let img = Absurd {
            src: Arc::new(vec![0u8; 4096]),
            info: crate::image::ImageInfo::new(crate::format::Format::Qcow2, 1 << 20),
        };
        let r = GuestReader::new(Arc::new(img), &Limits::default());
        let mut buf = [0u8; 512];
        let e = r.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::LimitExceeded);
    }

    /// As qemu reads qcow2 clusters (the content campaign's F2, F3, F4): a zstd frame that
    /// runs past the cluster fails, several frames that fill it read, trailing bytes after
    /// the frame that fills it are ignored, and a stream of either qcow2 codec that stops
    /// short of the cluster fails even when less is asked for (the last cluster of a disk
    /// that ends inside it). A VMDK grain (zlib) yields what is asked for.
    #[test]
    fn qcow2_clusters_decompress_as_qemu_reads_them() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let frame = |d: &[u8]| zstd::bulk::compress(d, 3).unwrap();
        // One frame of 128 KiB for a 64 KiB cluster.
        let long: Vec<u8> = data.iter().chain(data.iter()).copied().collect();
        let e = decompress(Codec::Zstd, &frame(&long), 65536, 4096).unwrap_err();
        assert!(e.to_string().contains("past the 65536-byte unit"), "{e}");
        // Two frames of 32 KiB each.
        let mut two = frame(&data[..32768]);
        two.extend(frame(&data[32768..]));
        assert_eq!(decompress(Codec::Zstd, &two, 65536, 65536).unwrap(), data);
        // One frame, then padding.
        let mut padded = frame(&data);
        padded.extend([0x55u8; 300]);
        assert_eq!(
            decompress(Codec::Zstd, &padded, 65536, 65536).unwrap(),
            data
        );
        // Half a cluster, though only half is needed.
        let half = frame(&data[..32768]);
        assert!(decompress(Codec::Zstd, &half, 65536, 32768).is_err());
        let mut c = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut c, &data[..32768]).unwrap();
        let half = c.finish().unwrap();
        assert!(decompress(Codec::Deflate, &half, 65536, 32768).is_err());
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut z, &data[..32768]).unwrap();
        let half = z.finish().unwrap();
        assert_eq!(
            decompress(Codec::Zlib, &half, 65536, 32768).unwrap(),
            data[..32768]
        );
    }

    #[test]
    fn decompress_bounds_and_errors() {
        let data = vec![7u8; 65536];
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let c = e.finish().unwrap();
        let mut padded = c.clone();
        padded.extend_from_slice(&[0xAB; 300]);
        assert_eq!(
            decompress(Codec::Deflate, &padded, 65536, 65536).unwrap(),
            data
        );
        // Cut at a smaller unit: never inflates beyond the unit.
        assert_eq!(
            decompress(Codec::Deflate, &c, 4096, 4096).unwrap().len(),
            4096
        );
        assert!(decompress(Codec::Deflate, &c[..c.len() / 2], 65536, 65536).is_err());
        assert!(decompress(Codec::Zlib, &[1, 2, 3, 4], 512, 512).is_err());
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let mut zp = z.clone();
        zp.extend_from_slice(&[0; 100]);
        assert_eq!(decompress(Codec::Zstd, &zp, 65536, 65536).unwrap(), data);
        assert!(decompress(Codec::Zstd, &[0x28, 0xb5, 0x2f, 0xfd, 9, 9], 512, 512).is_err());
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Report F5: a VMDK grain's zlib stream must end within the grain, as qemu's
    /// `uncompress` requires; raw deflate (qcow2) keeps stopping at the unit, as qemu does.
    #[test]
    fn a_zlib_stream_must_end_within_the_unit() {
        let grain = vec![5u8; 65536];
        let exact = zlib(&grain);
        assert_eq!(
            decompress(Codec::Zlib, &exact, 65536, 65536).unwrap(),
            grain
        );
        // Trailing bytes after the stream's end are ignored, as zlib ignores them.
        let mut padded = exact.clone();
        padded.extend_from_slice(&[0; 64]);
        assert_eq!(
            decompress(Codec::Zlib, &padded, 65536, 65536).unwrap(),
            grain
        );
        // A short stream still serves the bytes it has.
        assert_eq!(
            decompress(Codec::Zlib, &zlib(&grain[..4096]), 65536, 512)
                .unwrap()
                .len(),
            4096
        );
        let over = zlib(&[grain.clone(), vec![9u8; 8192]].concat());
        let e = decompress(Codec::Zlib, &over, 65536, 65536).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Corrupt);
        // Over by the Adler-32 alone: the stream has no end within the unit.
        assert!(decompress(Codec::Zlib, &exact[..exact.len() - 4], 65536, 65536).is_err());
        let mut bad_sum = exact.clone();
        let n = bad_sum.len();
        bad_sum[n - 1] ^= 1;
        assert!(decompress(Codec::Zlib, &bad_sum, 65536, 65536).is_err());
        let deflate = {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&[grain.clone(), vec![9u8; 8192]].concat())
                .unwrap();
            e.finish().unwrap()
        };
        assert_eq!(
            decompress(Codec::Deflate, &deflate, 65536, 65536).unwrap(),
            grain
        );
    }
}
