//! # glimpse-convert
//!
//! Writers for every output format and the parallel streaming pipeline that feeds them.
//!
//! The pipeline ([`pipeline::convert`]) walks the source image's extents, cuts them into
//! chunks of the writer's [`Writer::chunk_size`], and hands batches of chunks to rayon workers
//! that read guest data (positional reads on a shared source), detect all-zero chunks and
//! compress where the writer asks. A single writer then lays the chunks down in guest order.

#![warn(missing_docs)]

pub mod codec;
pub mod copy;
pub mod output;
pub mod pipeline;
pub mod stamp;
mod table;

pub mod ploop;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;

use glimpse_formats::image::Image;
use glimpse_formats::reader::ChunkPlanner;
pub use glimpse_formats::{Codec, Error, ErrorKind, Format, Result};

/// Where a writer puts its output.
pub enum Target {
    /// A regular file, opened for writing and empty. Seekable; may be made sparse.
    File(File),
    /// A strictly sequential stream (stdout). Only raw, streamOptimized VMDK and fixed VHD.
    Stream(Box<dyn Write + Send>),
}

/// Output options in qemu-img's spelling (`-o key=val,...`, `-c`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// `key=value` pairs from `-o`.
    pub opts: BTreeMap<String, String>,
    /// `-c`: compress (qcow2; streamOptimized VMDK always compresses).
    pub compress: bool,
    /// Base name of the output file, when it has one (VMDK names it in its descriptor).
    pub output_name: Option<String>,
    /// The command's memory budget (`Limits::budget`): the writer's tables whose size comes
    /// from the virtual size (block map, BAT, L1) are charged to it when the writer is
    /// created, and a writer whose tables it cannot hold is refused before anything is
    /// written. None charges nothing.
    pub budget: Option<glimpse_formats::limits::Budget>,
}

impl WriteOptions {
    /// Parses `a=b,c=d` (qemu-img's `-o` syntax; `,,` escapes a comma).
    ///
    /// # Errors
    /// `Usage` on an item without `=`.
    pub fn parse(s: &str, compress: bool) -> Result<Self> {
        let mut opts = BTreeMap::new();
        let mut items = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    items.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        items.push(cur);
        for item in items.into_iter().filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| Error::usage(format!("option {item:?} is not key=value")))?;
            opts.insert(k.trim().to_string(), v.trim().to_string());
        }
        Ok(WriteOptions {
            opts,
            compress,
            output_name: None,
            budget: None,
        })
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.opts.get(key).map(String::as_str)
    }

    /// A size option such as `cluster_size=64k`, if given.
    ///
    /// # Errors
    /// `Usage` when the value is not a size.
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| parse_size(v).ok_or_else(|| Error::usage(format!("{key}={v} is not a size"))))
            .transpose()
    }

    /// A boolean option (`on`/`off`, `true`/`false`), if given.
    ///
    /// # Errors
    /// `Usage` for any other value.
    pub fn flag(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| match v {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(Error::usage(format!("{key}={v}: expected on or off"))),
            })
            .transpose()
    }

    /// Fails when an option outside `known` was given, naming it.
    ///
    /// # Errors
    /// `Usage` naming the first unknown option.
    pub fn only(&self, format: &str, known: &[&str]) -> Result<()> {
        match self.opts.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(Error::usage(format!(
                "{format} does not support option {k:?} (supported: {})",
                known.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

/// Parses a size with an optional k/M/G/T suffix (powers of 1024), as qemu-img does.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 1u64 << 10),
        'm' | 'M' => (&s[..s.len() - 1], 1 << 20),
        'g' | 'G' => (&s[..s.len() - 1], 1 << 30),
        't' | 'T' => (&s[..s.len() - 1], 1 << 40),
        'b' | 'B' => (&s[..s.len() - 1], 1),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The data of one chunk, as the parallel stage prepared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Every byte is zero: the writer must make the range read as zeros without storing it
    /// (a hole, an unallocated cluster or grain).
    Zero,
    /// Uncompressed guest bytes; `len` bytes long.
    Data(Vec<u8>),
    /// The chunk compressed with the writer's [`Compressor`].
    Compressed(Vec<u8>),
    /// Guest bytes that lie verbatim in the source file, not all zero: the writer copies
    /// them file to file ([`copy::CopyMerger::put`]). Only sent to writers whose
    /// [`Writer::accepts_copy`] is true.
    Copy(copy::CopyFrom),
}

impl Payload {
    /// Writes a [`Payload::Data`] or [`Payload::Copy`] chunk at `off` of `file`. Copies go
    /// through `copies`, which joins those that continue each other: the writer calls
    /// [`copy::CopyMerger::flush`] before it finishes the file.
    ///
    /// # Errors
    /// Write or copy errors; `Invalid` for other payloads (the caller handles those).
    pub(crate) fn write_at(
        &self,
        file: &File,
        off: u64,
        copies: &mut copy::CopyMerger,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            Payload::Data(d) => file.write_all_at(d, off)?,
            Payload::Copy(c) => copies.put(file, c, off)?,
            Payload::Zero | Payload::Compressed(_) => {
                return Err(Error::invalid("only data chunks can be written in place"))
            }
        }
        Ok(())
    }
}

/// One chunk of guest data. Chunks arrive in guest order, aligned to the writer's chunk size;
/// only the last one may be shorter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// First guest byte.
    pub guest: u64,
    /// Length in guest bytes.
    pub len: u64,
    /// Content.
    pub payload: Payload,
}

/// What compression the parallel stage applies for a writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressor {
    /// Codec.
    pub codec: Codec,
    /// Level (zlib 0-9; zstd 1-22).
    pub level: i32,
    /// Compress every non-zero chunk even when it does not shrink (streamOptimized grains
    /// must all be compressed). When false, a chunk whose compressed form is not smaller than
    /// `max_len` is passed as [`Payload::Data`].
    pub always: bool,
    /// When `always` is false: the largest compressed length worth storing.
    pub max_len: usize,
}

/// Space an output of given content would take (what `measure` prints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// Bytes needed for this content.
    pub required: u64,
    /// Bytes needed if every guest byte were allocated.
    pub fully_allocated: u64,
}

/// Writes one output image from chunks in guest order.
pub trait Writer: Send {
    /// Chunk size in guest bytes: the cluster, grain or block size.
    fn chunk_size(&self) -> u64;

    /// Compression the parallel stage applies before [`Writer::write_chunk`], if any.
    fn compressor(&self) -> Option<Compressor> {
        None
    }

    /// True when the writer takes [`Payload::Copy`] chunks (it writes to a file and stores
    /// data chunks uncompressed).
    fn accepts_copy(&self) -> bool {
        false
    }

    /// Lays down the next chunk. Chunks arrive in guest order, with no gaps: zero ranges come
    /// as [`Payload::Zero`].
    ///
    /// # Errors
    /// `Io` on write errors; `Invalid` when a chunk is out of order.
    fn write_chunk(&mut self, chunk: Chunk) -> Result<()>;

    /// Makes the next `len` guest bytes from `guest` read as zeros. `guest` is where the next
    /// chunk would start; `len` is a whole number of chunks, or reaches the virtual size. The
    /// pipeline sends every zero range here, however long, so writers whose zero chunks cost
    /// nothing override it to take O(1) (raw, qcow2, VHD, VDI); the default passes one
    /// [`Payload::Zero`] chunk per chunk size.
    ///
    /// # Errors
    /// As [`Writer::write_chunk`].
    fn write_zeros(&mut self, guest: u64, len: u64) -> Result<()> {
        let chunk = self.chunk_size().max(1);
        let end = guest.saturating_add(len);
        let mut pos = guest;
        while pos < end {
            let n = chunk.min(end - pos);
            self.write_chunk(Chunk {
                guest: pos,
                len: n,
                payload: Payload::Zero,
            })?;
            pos += n;
        }
        Ok(())
    }

    /// Writes the remaining metadata (tables, footers) and flushes its buffers. Writers do not
    /// fsync: like `qemu-img convert`, whose default cache mode for the output is `unsafe`,
    /// they leave durability to the kernel's writeback (run `sync` when it matters).
    ///
    /// # Errors
    /// `Io` on write errors.
    fn finish(self: Box<Self>) -> Result<()>;

    /// Called after each batch of chunks, before the writer waits for the next. A writer that
    /// holds back a copy to join it with the next chunk's ([`copy::CopyMerger`]) hands it to
    /// the copy threads here ([`copy::CopyMerger::hand_off`]), so that it is copied while the
    /// writer waits: waking the pipeline's producer often takes the writer's core for as long
    /// as the producer prepares a batch (0.3-0.5 ms at 32 MiB), and that copy was all the
    /// second copy thread had.
    ///
    /// # Errors
    /// An error of a copy under way.
    fn batch_end(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Refuses a chunk that does not start where the `kind` writer stands (`pos`) or, when `align`
/// is above 1, that does not start on a multiple of it.
pub(crate) fn check_chunk_at(kind: &str, chunk: &Chunk, pos: u64, align: u64) -> Result<()> {
    if chunk.guest != pos || chunk.guest % align.max(1) != 0 {
        return Err(Error::invalid(format!(
            "{kind} writer: chunk at {} but expected {pos}",
            chunk.guest
        )));
    }
    Ok(())
}

/// [`Writer::write_zeros`] for writers whose zero chunks are only a position check: one
/// [`Payload::Zero`] chunk for the whole span.
pub(crate) fn write_zero_span<W: Writer + ?Sized>(w: &mut W, guest: u64, len: u64) -> Result<()> {
    w.write_chunk(Chunk {
        guest,
        len,
        payload: Payload::Zero,
    })
}

/// One configuration of each writer variant, as `(format, -o options, -c)`: the set that
/// round-trip tests and the `convert_roundtrip` fuzz target run every input through.
pub const WRITER_VARIANTS: &[(Format, &str, bool)] = &[
    (Format::Raw, "", false),
    (Format::Qcow2, "", false),
    (Format::Qcow2, "compression_type=zlib", true),
    (Format::Qcow2, "compression_type=zstd", true),
    (Format::Vmdk, "subformat=monolithicSparse", false),
    (Format::Vmdk, "subformat=streamOptimized", false),
    (Format::Vhd, "subformat=dynamic", false),
    (Format::Vhd, "subformat=fixed", false),
    (Format::Vhdx, "", false),
    (Format::Vdi, "", false),
    (Format::Parallels, "cluster_size=64k", false),
];

/// True when `format` (with `opts`) can be written to a pipe.
pub fn can_stream(format: Format, opts: &WriteOptions) -> bool {
    match format {
        Format::Raw => true,
        Format::Vmdk => opts
            .get("subformat")
            .is_some_and(|s| s.eq_ignore_ascii_case("streamOptimized")),
        Format::Vhd => {
            opts.get("subformat") == Some("fixed")
                || (opts.get("subformat").is_none()
                    && opts.flag("azure").ok().flatten() == Some(true))
        }
        _ => false,
    }
}

/// Creates a writer for `format` with `opts`, for a guest disk of `virtual_size` bytes.
///
/// # Errors
/// `Invalid` for bad options; `Unsupported` for formats glimpse cannot write or a stream
/// target for a format that needs seeking; `Io` on write errors.
pub fn create(
    format: Format,
    opts: &WriteOptions,
    target: Target,
    virtual_size: u64,
) -> Result<Box<dyn Writer>> {
    if opts.compress && !matches!(format, Format::Qcow2 | Format::Vmdk) {
        return Err(Error::invalid(format!(
            "-c (compression) is not supported for {format}"
        )));
    }
    if matches!(target, Target::Stream(_)) && !can_stream(format, opts) {
        return Err(Error::unsupported(format!(
            "{format} with these options cannot be written to a pipe (raw, vmdk subformat=streamOptimized and vhd subformat=fixed can)"
        )));
    }
    match format {
        Format::Raw => raw::create(target, opts, virtual_size),
        Format::Qcow2 => qcow2::create(target, opts, virtual_size),
        Format::Vmdk => vmdk::create(target, opts, virtual_size),
        Format::Vhd => vhd::create(target, opts, virtual_size),
        Format::Vhdx => vhdx::create(target, opts, virtual_size),
        Format::Vdi => vdi::create(target, opts, virtual_size),
        Format::Parallels => ploop::create(target, opts, virtual_size),
        other => Err(Error::unsupported(format!("cannot write {other} images"))),
    }
}

/// Output size for `format` with `opts`, given the virtual size and the guest bytes that hold
/// data (non-zero chunks, counted at the writer's chunk size).
///
/// # Errors
/// `Invalid` for bad options; `Unsupported` for formats glimpse cannot write.
pub fn measure(
    format: Format,
    opts: &WriteOptions,
    virtual_size: u64,
    data_bytes: u64,
) -> Result<Measure> {
    match format {
        // A raw output is as long as the disk, holes or not: qemu-img measure says the same
        // (report writer-edge F2: `required` once counted only the data, below the file).
        Format::Raw => Ok(Measure {
            required: virtual_size,
            fully_allocated: virtual_size,
        }),
        Format::Qcow2 => qcow2::measure(opts, virtual_size, data_bytes),
        Format::Vmdk => vmdk::measure(opts, virtual_size, data_bytes),
        Format::Vhd => vhd::measure(opts, virtual_size, data_bytes),
        Format::Vhdx => vhdx::measure(opts, virtual_size, data_bytes),
        Format::Vdi => vdi::measure(opts, virtual_size, data_bytes),
        Format::Parallels => ploop::measure(opts, virtual_size, data_bytes),
        other => Err(Error::unsupported(format!("cannot write {other} images"))),
    }
}

/// Output size for `format` with `opts` of a copy of `image`: the guest bytes that hold data
/// are counted at the writer's chunk size ([`measure_granularity`]) with a [`ChunkPlanner`],
/// then passed to [`measure`]. The planner is the converter's own: it calls a chunk zero when
/// the mapping does, or when its stored bytes lie in holes of the source file (a preallocated
/// qcow2, a static VDI, a fixed VHD, made sparse), and `convert` writes no zero chunk, so such
/// ranges need no space, as in `qemu-img measure`. The result stays an upper bound of what
/// `convert` writes.
///
/// # Errors
/// `Invalid` for bad options; `Unsupported` for formats glimpse cannot write; the image's
/// mapping errors and `Io` from the hole queries.
pub fn measure_image(format: Format, opts: &WriteOptions, image: &dyn Image) -> Result<Measure> {
    let virtual_size = image.info().virtual_size;
    let chunk = measure_granularity(format, opts, virtual_size)?;
    let mut data = 0u64;
    for plan in ChunkPlanner::new(image, chunk) {
        let plan = plan?;
        if plan.read {
            data = data.saturating_add(plan.len);
        }
    }
    measure(format, opts, virtual_size, data)
}

/// Chunk size used to count data bytes for [`measure`] of `format`.
///
/// # Errors
/// `Invalid` for bad options.
pub fn measure_granularity(format: Format, opts: &WriteOptions, virtual_size: u64) -> Result<u64> {
    Ok(match format {
        Format::Qcow2 => opts.size("cluster_size")?.unwrap_or(65536),
        Format::Vmdk => 65536,
        Format::Vdi => 1 << 20,
        Format::Parallels => ploop::cluster_size(opts)?,
        // A dynamic VHD allocates whole blocks; fixed ones (and azure=on) are fully allocated.
        Format::Vhd
            if opts.get("subformat") == Some("fixed") || opts.flag("azure")?.unwrap_or(false) =>
        {
            1 << 20
        }
        Format::Vhd => opts.size("block_size")?.unwrap_or(2 << 20),
        Format::Vhdx => opts
            .size("block_size")?
            .unwrap_or_else(|| vhdx::default_block_size(virtual_size)),
        _ => 4096,
    })
}

/// Positional writes to a file with adjacent writes combined into one system call. Writers
/// that lay down many small clusters in sequence (qcow2's 64 KiB) use it so that a data run
/// costs one `pwrite` per few MiB instead of one per cluster.
pub struct WriteCombiner {
    file: File,
    buf: Vec<u8>,
    at: u64,
    /// File-to-file copies not yet made.
    copies: copy::CopyMerger,
}

/// Bytes a [`WriteCombiner`] holds before it writes.
const COMBINE: usize = 4 << 20;

impl WriteCombiner {
    /// Wraps `file`.
    pub fn new(file: File) -> Self {
        WriteCombiner {
            file,
            buf: Vec::new(),
            at: 0,
            copies: copy::CopyMerger::default(),
        }
    }

    /// Writes a [`Payload::Data`] or [`Payload::Copy`] chunk at `off`, combined with the
    /// writes and copies next to it.
    ///
    /// # Errors
    /// Write or copy errors; `Invalid` for other payloads.
    pub fn put(&mut self, payload: &Payload, off: u64) -> Result<()> {
        match payload {
            Payload::Data(d) => self.write_all_at(d, off)?,
            Payload::Copy(c) => {
                self.flush_buf()?;
                self.copies.put(&self.file, c, off)?;
            }
            Payload::Zero | Payload::Compressed(_) => {
                return Err(Error::invalid("only data chunks can be written in place"))
            }
        }
        Ok(())
    }

    /// Writes `data` at `off` (possibly later: call [`WriteCombiner::flush`] before relying
    /// on the file's contents). Writes are applied in call order.
    ///
    /// # Errors
    /// Write errors of the file.
    pub fn write_all_at(&mut self, data: &[u8], off: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        // Copies write parts of the file that nothing else does (a chunk's clusters): they
        // may go on while the tables are written.
        self.copies.submit(&self.file)?;
        let contiguous = self.at.checked_add(self.buf.len() as u64) == Some(off);
        if !(contiguous && self.buf.len() + data.len() <= COMBINE) {
            self.flush_buf()?;
            if data.len() >= COMBINE {
                return self.file.write_all_at(data, off);
            }
            self.at = off;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// Hands the copy held back to the copy threads ([`copy::CopyMerger::hand_off`]).
    ///
    /// # Errors
    /// An error of a copy under way.
    pub fn hand_off(&mut self) -> std::io::Result<()> {
        self.copies.hand_off(&self.file)
    }

    /// Writes what is pending.
    ///
    /// # Errors
    /// Write errors of the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.copies.flush(&self.file)?;
        self.flush_buf()
    }

    fn flush_buf(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if !self.buf.is_empty() {
            self.file.write_all_at(&self.buf, self.at)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Flushes and returns the file (for `set_len`, `sync_data`).
    ///
    /// # Errors
    /// Write errors of the file.
    pub fn file(&mut self) -> std::io::Result<&File> {
        self.flush()?;
        Ok(&self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glimpse_formats::image::{Extent, ExtentKind, ImageCore, ImageInfo};
    use glimpse_formats::Source;
    use std::sync::Arc;

    /// A 16 KiB disk whose only data is guest bytes 5000..6000.
    struct OneRun {
        info: ImageInfo,
        src: Source,
    }
    impl Image for OneRun {
        fn core(&self) -> ImageCore<'_> {
            ImageCore {
                info: &self.info,
                findings: &[],
                source: &self.src,
            }
        }
        fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
            let (kind, end) = match guest {
                0..5000 => (ExtentKind::Unallocated, 5000),
                5000..6000 => (ExtentKind::Data { host: guest }, 6000),
                _ => (ExtentKind::Unallocated, 16384),
            };
            Ok(Extent {
                start: guest,
                len: span.min(end - guest),
                kind,
            })
        }
    }

    #[test]
    fn measure_image_counts_data_at_the_writer_chunk_size() {
        let image = OneRun {
            info: ImageInfo::new(Format::Raw, 16384),
            src: Arc::new(vec![0u8; 16384]),
        };
        let opts = WriteOptions::parse("cluster_size=4096", false).unwrap();
        // 4 KiB clusters: the run lies inside cluster 4096..8192.
        let m = measure_image(Format::Qcow2, &opts, &image).unwrap();
        assert_eq!(m, measure(Format::Qcow2, &opts, 16384, 4096).unwrap());
        assert_ne!(m, measure(Format::Qcow2, &opts, 16384, 8192).unwrap());
        // A raw output is as long as the disk, whatever its data.
        let m = measure_image(Format::Raw, &WriteOptions::default(), &image).unwrap();
        assert_eq!((m.required, m.fully_allocated), (16384, 16384));
        assert!(measure_image(Format::Iso, &opts, &image).is_err());
    }

    #[test]
    fn options_parse_like_qemu_img() {
        let o =
            WriteOptions::parse("subformat=streamOptimized,cluster_size=2M,a=b,,c", false).unwrap();
        assert_eq!(o.get("subformat"), Some("streamOptimized"));
        assert_eq!(o.size("cluster_size").unwrap(), Some(2 << 20));
        assert_eq!(o.get("a"), Some("b,c"));
        assert!(WriteOptions::parse("novalue", false).is_err());
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("x"), None);
    }
}
