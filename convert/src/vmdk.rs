//! VMDK writer: monolithicSparse (seekable file) and streamOptimized (strictly sequential,
//! footer form, so it can go to a pipe).
//!
//! Layout facts come from VMware's open-vmdk (`vmdk/vmware_vmdk.h`, `vmdk/sparse.c`) and
//! qemu's `block/vmdk.c`. Where the two writers differ, the streamOptimized output follows
//! VMware's `sparse.c`, and each such choice is noted where it is made.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};

use byteorder::{WriteBytesExt, LE};
use glimpse_formats::vmdk::header::{
    COMPRESS_DEFLATE, COMPRESS_NONE, FLAG_COMPRESSED, FLAG_MARKERS, FLAG_NEWLINE_DETECT,
    FLAG_REDUNDANT, GD_AT_END, MAGIC, SECTOR,
};
use glimpse_formats::vmdk::stream::{MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT};

use crate::{
    Chunk, Codec, Compressor, Error, Measure, Payload, Result, Target, WriteOptions, Writer,
};

/// Grain size in sectors: what both VMware and qemu write (64 KiB).
const GRAIN_SECTORS: u64 = 128;
/// Grain size in bytes.
const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
/// Entries per grain table: VMware's disklib supports only 512; qemu writes 512.
const GTES: u64 = 512;
/// Sectors of one grain table.
const GT_SECTORS: u64 = GTES * 4 / SECTOR;
/// Descriptor area in sectors, at sector 1: both writers reserve 20.
const DESC_SECTORS: u64 = 20;
/// Grain table sectors are stored as u32: nothing may live at or past 2^32 sectors (2 TiB).
const MAX_SECTOR: u64 = u32::MAX as u64;
/// The extent file name written into the descriptor when the output has no name (a pipe).
/// Readers that follow the name (libvmdk does, even for a single-file stream) need the real
/// one, so a named output file gets its own base name, as qemu-img writes.
const EXTENT_NAME: &str = "disk.vmdk";

/// Adapter types qemu-img accepts for `adapter_type`.
const ADAPTERS: [&str; 4] = ["ide", "buslogic", "lsilogic", "legacyESX"];

/// Sub-formats this writer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    MonolithicSparse,
    StreamOptimized,
}

/// Options after validation.
#[derive(Debug, Clone)]
struct Opts {
    sub: Sub,
    adapter: String,
    hwversion: String,
}

fn parse_opts(opts: &WriteOptions) -> Result<Opts> {
    opts.only(
        "vmdk",
        &["subformat", "adapter_type", "hwversion", "compat6"],
    )?;
    let sub = match opts.get("subformat") {
        None => Sub::MonolithicSparse,
        Some(s) if s.eq_ignore_ascii_case("monolithicSparse") => Sub::MonolithicSparse,
        Some(s) if s.eq_ignore_ascii_case("streamOptimized") => Sub::StreamOptimized,
        Some(s) => {
            return Err(Error::usage(format!(
                "vmdk subformat {s:?} is not supported (monolithicSparse or streamOptimized)"
            )))
        }
    };
    let adapter = match opts.get("adapter_type") {
        None => "ide".to_string(),
        Some(a) => ADAPTERS
            .iter()
            .find(|k| k.eq_ignore_ascii_case(a))
            .map(|k| (*k).to_string())
            .ok_or_else(|| {
                Error::usage(format!(
                    "adapter_type={a}: expected one of {}",
                    ADAPTERS.join(", ")
                ))
            })?,
    };
    let compat6 = opts.flag("compat6")?.unwrap_or(false);
    let hwversion = match (opts.get("hwversion"), compat6) {
        (Some(_), true) => {
            return Err(Error::usage("compat6 cannot be enabled with hwversion set"))
        }
        // Goes into a quoted descriptor value: digits only, so nothing can be injected.
        (Some(v), false)
            if !v.is_empty() && v.len() <= 3 && v.bytes().all(|b| b.is_ascii_digit()) =>
        {
            v.to_string()
        }
        (Some(v), false) => {
            return Err(Error::usage(format!(
                "hwversion={v}: expected a small number"
            )))
        }
        (None, true) => "6".to_string(),
        // Both VMware's sparse.c and qemu write 4.
        (None, false) => "4".to_string(),
    };
    Ok(Opts {
        sub,
        adapter,
        hwversion,
    })
}

/// Geometry of the descriptor: qemu uses 16 heads for IDE and 255 otherwise; VMware's
/// sparse.c (which always says lsilogic) uses 255. Cylinders are rounded up and capped at
/// 65535 as sparse.c does (qemu rounds down).
fn geometry(capacity: u64, adapter: &str) -> (u64, u64) {
    let heads = if adapter == "ide" { 16 } else { 255 };
    (capacity.div_ceil(heads * 63).min(65535), heads)
}

/// A content id that is the same for the same disk parameters, so that converting the same
/// input twice (to a file or a pipe) gives identical bytes. A CID only links delta links to
/// their parent, which glimpse never creates. 0xFFFFFFFF and 0xFFFFFFFE are avoided as
/// sparse.c does: some software reads them as "no parent" or "all zeros".
fn content_ids(capacity: u64, sub: Sub) -> (u32, [u32; 3]) {
    let h = |salt: u32| {
        let mut c = crc32fast::Hasher::new();
        c.update(&salt.to_le_bytes());
        c.update(&capacity.to_le_bytes());
        c.update(&[sub as u8]);
        c.finalize()
    };
    let mut cid = h(0);
    if cid >= 0xFFFF_FFFE {
        cid = 0x1234_5678;
    }
    (cid, [h(1), h(2), h(3)])
}

/// The embedded descriptor, in the order and wording of VMware's sparse.c.
fn descriptor(capacity: u64, o: &Opts, name: &str) -> String {
    let (cid, long) = content_ids(capacity, o.sub);
    let create = match o.sub {
        Sub::MonolithicSparse => "monolithicSparse",
        Sub::StreamOptimized => "streamOptimized",
    };
    let (cyl, heads) = geometry(capacity, &o.adapter);
    // sparse.c writes `encoding`, `ddb.longContentID` and `ddb.toolsVersion`; qemu writes no
    // encoding or longContentID. Follow sparse.c.
    format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid:08x}\nparentCID=ffffffff\ncreateType=\"{create}\"\n\n\
         # Extent description\nRW {capacity} SPARSE \"{name}\"\n\n\
         # The Disk Data Base\n#DDB\n\n\
         ddb.longContentID = \"{:08x}{:08x}{:08x}{cid:08x}\"\n\
         ddb.virtualHWVersion = \"{}\"\n\
         ddb.geometry.cylinders = \"{cyl}\"\n\
         ddb.geometry.heads = \"{heads}\"\n\
         ddb.geometry.sectors = \"63\"\n\
         ddb.adapterType = \"{}\"\n\
         ddb.toolsVersion = \"2147483647\"\n",
        long[0], long[1], long[2], o.hwversion, o.adapter
    )
}

/// The output's base name as the caller gave it, if it can sit inside a quoted descriptor
/// value. A pipe has no name: the descriptor then names `disk.vmdk`, so stream output equals
/// file output written under that name.
fn output_name(opts: &WriteOptions) -> Option<String> {
    let name = opts.output_name.as_deref()?;
    let usable = !name.is_empty()
        && !name.contains('/')
        && !name.chars().any(|c| c == '"' || c.is_control());
    usable.then(|| name.to_string())
}

/// Header fields that differ between layouts.
struct HeaderFields {
    version: u32,
    flags: u32,
    capacity: u64,
    rgd: u64,
    gd: u64,
    overhead: u64,
    compress: u16,
}

fn header_bytes(h: &HeaderFields) -> Vec<u8> {
    let mut b = Vec::with_capacity(SECTOR as usize);
    // Writes to a Vec cannot fail.
    let _ = (|| -> std::io::Result<()> {
        b.write_u32::<LE>(MAGIC)?;
        b.write_u32::<LE>(h.version)?;
        b.write_u32::<LE>(h.flags)?;
        b.write_u64::<LE>(h.capacity)?;
        b.write_u64::<LE>(GRAIN_SECTORS)?;
        b.write_u64::<LE>(1)?; // descriptorOffset
        b.write_u64::<LE>(DESC_SECTORS)?;
        b.write_u32::<LE>(GTES as u32)?;
        b.write_u64::<LE>(h.rgd)?;
        b.write_u64::<LE>(h.gd)?;
        b.write_u64::<LE>(h.overhead)?;
        b.write_u8(0)?; // uncleanShutdown
        b.write_all(b"\n \r\n")?;
        b.write_u16::<LE>(h.compress)?;
        Ok(())
    })();
    b.resize(SECTOR as usize, 0);
    b
}

/// A sector-sized metadata marker (sparse.c's `writeSpecial`).
fn meta_marker(sectors: u64, kind: u32) -> Vec<u8> {
    let mut m = vec![0u8; SECTOR as usize];
    m[..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// Table sizes for a capacity.
fn counts(capacity: u64) -> (u64, u64, u64) {
    let grains = capacity.div_ceil(GRAIN_SECTORS);
    let gts = grains.div_ceil(GTES);
    let gd_sectors = (gts * 4).div_ceil(SECTOR);
    (grains, gts, gd_sectors)
}

fn capacity_of(virtual_size: u64) -> Result<u64> {
    if virtual_size == 0 {
        // qemu-img reads a sparse header of capacity 0 as a pointer to a descriptor file and
        // refuses the image; glimpse's reader rejects it for the same reason.
        return Err(Error::invalid(
            "a VMDK cannot describe an empty disk (qemu cannot open capacity 0)",
        ));
    }
    let capacity = virtual_size.div_ceil(SECTOR);
    if capacity > MAX_SECTOR {
        return Err(Error::invalid(format!(
            "{virtual_size} bytes: glimpse writes VMDK disks smaller than 2 TiB (2^32 sectors); \
             write qcow2, vhdx or raw for a larger disk"
        )));
    }
    Ok(capacity)
}

/// Creates a VMDK writer.
///
/// # Errors
/// `Invalid` for unknown or bad options, an empty disk or one over 2 TiB; `Unsupported`
/// for monolithicSparse to a pipe.
pub fn create(target: Target, opts: &WriteOptions, virtual_size: u64) -> Result<Box<dyn Writer>> {
    let o = parse_opts(opts)?;
    let capacity = capacity_of(virtual_size)?;
    let (_, gts, gd_sectors) = counts(capacity);
    let name = output_name(opts);
    let desc = descriptor(capacity, &o, name.as_deref().unwrap_or(EXTENT_NAME));
    match o.sub {
        Sub::MonolithicSparse => {
            let Target::File(file) = target else {
                return Err(Error::unsupported(
                    "monolithicSparse VMDK needs a seekable file, not a pipe",
                ));
            };
            // qemu's layout: header, descriptor, redundant GD and GTs, GD and GTs, then grains
            // from the next grain boundary.
            let rgd = 1 + DESC_SECTORS;
            let gd = rgd + gd_sectors + gts * GT_SECTORS;
            let overhead =
                (gd + gd_sectors + gts * GT_SECTORS).div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS;
            Ok(Box::new(SparseWriter {
                file,
                capacity,
                gts,
                gd_sectors,
                rgd,
                gd,
                overhead,
                next: overhead,
                pos: 0,
                cur: CurGt::new(),
                desc,
            }))
        }
        Sub::StreamOptimized => {
            let out: Box<dyn Write + Send> = match target {
                Target::File(f) => Box::new(std::io::BufWriter::with_capacity(1 << 20, f)),
                Target::Stream(w) => w,
            };
            let mut w = StreamWriter {
                out,
                capacity,
                gts,
                gd_sectors,
                sector: 0,
                pos: 0,
                cur: CurGt::new(),
                gd: Vec::new(),
                desc,
            };
            w.start()?;
            Ok(Box::new(w))
        }
    }
}

/// Output size of a VMDK image. For streamOptimized, `required` is an estimate: grains
/// are counted uncompressed (the real size depends on how well they compress);
/// `fully_allocated` is likewise an upper bound, not an exact size.
///
/// # Errors
/// `Invalid` for bad options.
pub fn measure(opts: &WriteOptions, virtual_size: u64, data_bytes: u64) -> Result<Measure> {
    let o = parse_opts(opts)?;
    let capacity = virtual_size.div_ceil(SECTOR);
    let (grains, gts, gd_sectors) = counts(capacity);
    let data_grains = data_bytes.div_ceil(GRAIN).min(grains);
    let sizes = |g: u64| match o.sub {
        Sub::MonolithicSparse => {
            let meta = 1 + DESC_SECTORS + 2 * (gd_sectors + gts * GT_SECTORS);
            (meta.div_ceil(GRAIN_SECTORS) * GRAIN_SECTORS + g * GRAIN_SECTORS) * SECTOR
        }
        Sub::StreamOptimized => {
            // Header, descriptor, each grain with its marker sector, every GT with its marker,
            // GD marker and GD, footer marker, footer, EOS.
            let s = 1
                + DESC_SECTORS
                + g * (GRAIN_SECTORS + 1)
                + gts * (GT_SECTORS + 1)
                + 1
                + gd_sectors
                + 3;
            s * SECTOR
        }
    };
    Ok(Measure {
        required: sizes(data_grains),
        fully_allocated: sizes(grains),
    })
}

/// The grain-table entries of one chunk's grain, checking order.
fn grain_index(chunk: &Chunk, pos: u64) -> Result<u64> {
    if chunk.guest != pos || chunk.guest % GRAIN != 0 || chunk.len == 0 || chunk.len > GRAIN {
        return Err(Error::invalid(format!(
            "vmdk writer: chunk {}+{} out of order (expected {pos})",
            chunk.guest, chunk.len
        )));
    }
    Ok(chunk.guest / GRAIN)
}

/// Grain table entry as stored: a sector that must fit in u32.
fn gte(sector: u64) -> Result<u32> {
    u32::try_from(sector)
        .map_err(|_| Error::invalid("VMDK output passes 2 TiB: grain sectors no longer fit"))
}

/// The grain table being filled. Chunks come in guest order, so only one table is held at a
/// time: memory stays at 2 KiB whatever the disk size.
struct CurGt {
    /// Which grain table (grain number / 512).
    index: u64,
    /// Grain sector per grain of this table (0: unallocated).
    entries: Vec<u32>,
}

impl CurGt {
    fn new() -> Self {
        CurGt {
            index: 0,
            entries: vec![0; GTES as usize],
        }
    }
    fn is_empty(&self) -> bool {
        self.entries.iter().all(|&e| e == 0)
    }
    fn set(&mut self, g: u64, sector: u64) -> Result<()> {
        let slot = self
            .entries
            .get_mut((g % GTES) as usize)
            .ok_or_else(|| Error::invalid("grain table slot out of range"))?;
        *slot = gte(sector)?;
        Ok(())
    }
    fn bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }
    /// Moves on to the next table.
    fn advance(&mut self) {
        self.index += 1;
        self.entries.fill(0);
    }
}

struct SparseWriter {
    file: File,
    capacity: u64,
    gts: u64,
    gd_sectors: u64,
    rgd: u64,
    gd: u64,
    overhead: u64,
    /// Next free grain sector.
    next: u64,
    /// Next guest byte expected.
    pos: u64,
    cur: CurGt,
    desc: String,
}

impl SparseWriter {
    /// Writes the current grain table to both its places (after the redundant directory and
    /// after the directory) and moves on. Empty tables stay holes: they read as zeros.
    fn flush_gt(&mut self) -> Result<()> {
        if !self.cur.is_empty() {
            let t = self.cur.bytes();
            for dir in [self.rgd, self.gd] {
                let at = dir + self.gd_sectors + self.cur.index * GT_SECTORS;
                self.file.seek(SeekFrom::Start(at * SECTOR))?;
                self.file.write_all(&t)?;
            }
        }
        self.cur.advance();
        Ok(())
    }

    /// Writes a directory at `dir` pointing at every table slot right after it, as qemu
    /// preallocates them.
    fn directory(&mut self, dir: u64) -> Result<()> {
        let first_gt = dir + self.gd_sectors;
        let mut d = Vec::with_capacity((self.gd_sectors * SECTOR) as usize);
        for i in 0..self.gts {
            d.write_u32::<LE>(gte(first_gt + i * GT_SECTORS)?)?;
        }
        d.resize((self.gd_sectors * SECTOR) as usize, 0);
        self.file.seek(SeekFrom::Start(dir * SECTOR))?;
        self.file.write_all(&d)?;
        Ok(())
    }
}

impl Writer for SparseWriter {
    fn chunk_size(&self) -> u64 {
        GRAIN
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        let g = grain_index(&chunk, self.pos)?;
        while self.cur.index < g / GTES {
            self.flush_gt()?;
        }
        match chunk.payload {
            // Zero grains stay unallocated: they read as zeros without a parent.
            Payload::Zero => {}
            Payload::Data(d) => {
                self.cur.set(g, self.next)?;
                self.file.seek(SeekFrom::Start(self.next * SECTOR))?;
                self.file.write_all(&d)?;
                self.next += GRAIN_SECTORS;
            }
            Payload::Compressed(_) | Payload::Copy(_) => {
                return Err(Error::invalid(
                    "monolithicSparse VMDK got a compressed chunk or a copy",
                ))
            }
        }
        self.pos = chunk.guest + chunk.len;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        // qemu's monolithicSparse header: version 1, newline detector and redundant GD.
        let h = HeaderFields {
            version: 1,
            flags: FLAG_NEWLINE_DETECT | FLAG_REDUNDANT,
            capacity: self.capacity,
            rgd: self.rgd,
            gd: self.gd,
            overhead: self.overhead,
            compress: COMPRESS_NONE,
        };
        self.file.seek(SeekFrom::Start(SECTOR))?;
        let mut desc = self.desc.clone().into_bytes();
        desc.resize((DESC_SECTORS * SECTOR) as usize, 0);
        self.file.write_all(&desc)?;
        while self.cur.index < self.gts {
            self.flush_gt()?;
        }
        self.directory(self.rgd)?;
        self.directory(self.gd)?;
        // Every grain whole, and the file at least as long as the metadata (qemu refuses a
        // file shorter than overHead).
        self.file.set_len(self.next * SECTOR)?;
        // The header last, so that a crash leaves no valid-looking image (sparse.c does so too).
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&header_bytes(&h))?;
        self.file.flush()?;
        Ok(())
    }
}

struct StreamWriter {
    out: Box<dyn Write + Send>,
    capacity: u64,
    gts: u64,
    gd_sectors: u64,
    /// Sectors written so far.
    sector: u64,
    /// Next guest byte expected.
    pos: u64,
    cur: CurGt,
    /// Grain directory entries of the tables handled so far.
    gd: Vec<u32>,
    desc: String,
}

impl StreamWriter {
    /// The header fields, with `gd` as given. sparse.c's stream header: version 3, flags
    /// newline detector + compressed + markers (no redundant GD: qemu sets that bit, VMware
    /// does not, and a stream has none), deflate.
    fn fields(&self, gd: u64) -> HeaderFields {
        HeaderFields {
            version: 3,
            flags: FLAG_NEWLINE_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity: self.capacity,
            rgd: 0,
            gd,
            // Sectors before the first grain: header and descriptor. sparse.c counts its GD
            // and GTs here too, but a stream writes them after the grains.
            overhead: 1 + DESC_SECTORS,
            compress: COMPRESS_DEFLATE,
        }
    }

    fn emit(&mut self, bytes: &[u8]) -> Result<()> {
        debug_assert!(bytes.len() as u64 % SECTOR == 0);
        self.out.write_all(bytes)?;
        self.sector += bytes.len() as u64 / SECTOR;
        Ok(())
    }

    fn start(&mut self) -> Result<()> {
        // Footer form: gdOffset = GD_AT_END, the real one is in the footer (as VMware's
        // streaming writers do; qemu instead preallocates the tables at the front).
        let h = header_bytes(&self.fields(GD_AT_END));
        self.emit(&h)?;
        let mut desc = self.desc.clone().into_bytes();
        desc.resize((DESC_SECTORS * SECTOR) as usize, 0);
        self.emit(&desc)
    }

    /// Writes grain tables up to (not including) `upto` that hold any grain: GT marker, then
    /// the table. Empty ones are left out (GD entry 0), as nothing in them is allocated.
    fn flush_tables(&mut self, upto: u64) -> Result<()> {
        while self.cur.index < upto.min(self.gts) {
            if self.cur.is_empty() {
                self.gd.push(0);
            } else {
                self.emit(&meta_marker(GT_SECTORS, MARKER_GT))?;
                let at = gte(self.sector)?;
                self.gd.push(at);
                let t = self.cur.bytes();
                self.emit(&t)?;
            }
            self.cur.advance();
        }
        Ok(())
    }
}

/// Recompresses a short final grain padded with zeros to a whole sector: qemu reads whole
/// sectors and refuses a grain that inflates to less.
fn pad_compressed(z: &[u8], len: u64) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(z)
        .take(GRAIN)
        .read_to_end(&mut raw)?;
    raw.resize(len.div_ceil(SECTOR) as usize * SECTOR as usize, 0);
    crate::codec::compress(Codec::Zlib, LEVEL, &raw)
}

/// zlib level for grains. sparse.c uses 9 (Z_BEST_COMPRESSION), qemu 6 (zlib's default).
/// Level 9 costs two to three times the CPU for about 1% less output on disk images; the
/// format does not care, so take qemu's level.
const LEVEL: i32 = 6;

impl Writer for StreamWriter {
    fn chunk_size(&self) -> u64 {
        GRAIN
    }

    fn compressor(&self) -> Option<Compressor> {
        // Every grain of a stream is compressed, even when it does not shrink.
        Some(Compressor {
            codec: Codec::Zlib,
            level: LEVEL,
            always: true,
            max_len: usize::MAX,
        })
    }

    fn write_chunk(&mut self, chunk: Chunk) -> Result<()> {
        let g = grain_index(&chunk, self.pos)?;
        // Tables of GTs that are complete go out before the next GT's grains.
        self.flush_tables(g / GTES)?;
        let z = match chunk.payload {
            Payload::Zero => None,
            Payload::Compressed(z) if chunk.len % SECTOR != 0 => {
                Some(pad_compressed(&z, chunk.len)?)
            }
            Payload::Compressed(z) => Some(z),
            Payload::Copy(_) => return Err(Error::invalid("streamOptimized VMDK got a copy")),
            Payload::Data(d) => {
                let mut d = d;
                d.resize(chunk.len.div_ceil(SECTOR) as usize * SECTOR as usize, 0);
                Some(crate::codec::compress(Codec::Zlib, LEVEL, &d)?)
            }
        };
        if let Some(z) = z {
            self.cur.set(g, self.sector)?;
            // Grain marker: first guest sector, compressed length; then the data, padded to a
            // sector as sparse.c does.
            let size =
                u32::try_from(z.len()).map_err(|_| Error::invalid("compressed grain too large"))?;
            let mut b = Vec::with_capacity(z.len() + 12 + SECTOR as usize);
            b.write_u64::<LE>(g * GRAIN_SECTORS)?;
            b.write_u32::<LE>(size)?;
            b.extend_from_slice(&z);
            b.resize(b.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
            self.emit(&b)?;
        }
        self.pos = chunk.guest + chunk.len;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if self.pos.div_ceil(SECTOR) != self.capacity {
            return Err(Error::invalid(
                "vmdk writer: stream ended before the virtual size",
            ));
        }
        self.flush_tables(self.gts)?;
        let gd = std::mem::take(&mut self.gd);
        // GD marker and GD.
        self.emit(&meta_marker(self.gd_sectors, MARKER_GD))?;
        let gd_sector = self.sector;
        let mut d = Vec::with_capacity((self.gd_sectors * SECTOR) as usize);
        for e in &gd {
            d.write_u32::<LE>(*e)?;
        }
        d.resize((self.gd_sectors * SECTOR) as usize, 0);
        self.emit(&d)?;
        // Footer marker, footer (the header with the real gdOffset), end-of-stream marker.
        self.emit(&meta_marker(1, MARKER_FOOTER))?;
        let f = header_bytes(&self.fields(gd_sector));
        self.emit(&f)?;
        self.emit(&meta_marker(0, MARKER_EOS))?;
        self.out.flush()?;
        Ok(())
    }
}
