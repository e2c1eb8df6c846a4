//! Parallels / Virtuozzo ploop images (qemu's `parallels`, Glance's `ploop`).
//!
//! A 64-byte little-endian header, a BAT of u32 entries right after it (0 = unallocated, else
//! the cluster's offset in sectors for the old `WithoutFreeSpace` magic, in clusters for
//! `WithouFreSpacExt`), then the data area of clusters. An optional format extension cluster
//! (`ext_off`) holds features such as dirty bitmaps. Facts from qemu's
//! `docs/interop/parallels.txt`, `block/parallels.c` and `block/parallels-ext.c`; glimpse
//! refuses what qemu refuses (versions other than 2, a zero or huge cluster size, a BAT larger
//! than `INT_MAX` bytes) so that the two never read one image differently.
//!
//! A ploop directory holds `DiskDescriptor.xml` beside `root.hds`: the descriptor is never
//! read for file names to open; given as the input itself, it is detected and refused
//! (`parallels.descriptor`), naming the image files it lists.

pub mod check;
pub mod header;
mod prolog;

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::format::Format;
use crate::image::{Extent, ExtentKind, Image, ImageCore, ImageInfo};
use crate::io::{read_up_to, read_vec, Source};
use crate::limits::Limits;
use crate::probe::Probe;
use crate::table::{read_entries, Table, TableSpec};

pub use header::{DirtyBitmap, Header};
use header::{
    HEADER_LEN, INUSE_CLOSED, INUSE_OPEN, MAGIC_EXT, MAGIC_V1, MAX_BAT_ENTRIES, MAX_TRACKS, SECTOR,
    VERSION,
};

/// BAT entries one `mapping` call may walk over while coalescing.
const MAX_SCAN: u64 = 1 << 16;
/// Findings of one kind reported before they are summarised.
pub(crate) const MAX_REPORTED: usize = crate::finding::PER_CODE;
/// The root element of a ploop `DiskDescriptor.xml`.
const DESCRIPTOR_TAG: &[u8] = b"<Parallels_disk_image";
/// How far into the file the descriptor's root element is looked for: the probe's head.
const DESCRIPTOR_SEARCH: usize = crate::probe::HEAD_LEN;
/// File names a descriptor rejection lists at most.
const MAX_NAMES: usize = 16;

/// True when the probe windows start with a Parallels magic (any version: a file with the
/// magic is at best a broken Parallels image, never a raw disk), or hold a ploop
/// `DiskDescriptor.xml`.
pub fn probe(p: &Probe<'_>) -> bool {
    p.starts_with(&MAGIC_V1[..]) || p.starts_with(&MAGIC_EXT[..]) || is_descriptor(&p.head)
}

/// True when `head` is a ploop `DiskDescriptor.xml`: after a byte-order mark and any XML
/// prolog (declaration, comments, processing instructions, a document type declaration,
/// whitespace; UTF-8 or UTF-16), the root element is `<Parallels_disk_image>`. A head that
/// fills the whole search window and ends inside such a prolog counts too: libxml2 would read
/// on, and no disk starts with 64 KiB of XML prolog.
pub fn is_descriptor(head: &[u8]) -> bool {
    let window = head
        .get(..head.len().min(DESCRIPTOR_SEARCH))
        .unwrap_or_default();
    let full = window.len() >= DESCRIPTOR_SEARCH;
    match prolog::root_is(window, DESCRIPTOR_TAG, full) {
        prolog::Root::Descriptor => true,
        // Whitespace alone is no XML prolog (a file of spaces or newlines is raw, as qemu
        // says): an unfinished prolog needs markup.
        prolog::Root::Unfinished => prolog::text(window).contains(&b'<'),
        prolog::Root::Other => false,
    }
}

/// The `<File>` names a descriptor lists (at most [`MAX_NAMES`]), lossily decoded.
pub fn descriptor_files(text: &[u8]) -> Vec<String> {
    let text = prolog::text(text);
    let text = String::from_utf8_lossy(&text);
    let mut out = Vec::new();
    let mut rest: &str = &text;
    while out.len() < MAX_NAMES {
        let Some(a) = rest.find("<File>") else { break };
        let tail = rest.get(a.saturating_add(6)..).unwrap_or_default();
        let Some(b) = tail.find("</File>") else { break };
        out.push(tail.get(..b).unwrap_or_default().trim().to_string());
        rest = tail.get(b..).unwrap_or_default();
    }
    out
}

fn descriptor_error(src: &Source) -> Result<Error> {
    let head = read_up_to(src.as_ref(), 0, crate::detect::HEAD_LEN)?;
    let files = descriptor_files(&head);
    let names = if files.is_empty() {
        "no image file".to_string()
    } else {
        files.join(", ")
    };
    Ok(Error::unsafe_(format!(
        "a ploop DiskDescriptor.xml, not a disk image: its data lives in {names}, which glimpse never opens; give the image file (root.hds) instead"
    ))
    .at(0)
    .code("parallels.descriptor"))
}

/// A dirty bitmap found in the format extension, for `info` and `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap as stored.
    pub bitmap: DirtyBitmap,
    /// Offset of its feature data in the file.
    pub offset: u64,
}

/// An opened Parallels image.
pub struct ParallelsImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    header: Header,
    bat: Table<u32>,
    cluster: u64,
    /// Start of the data area, bytes.
    data_start: u64,
    /// The format extension cluster (offset in bytes), when `ext_off` is set.
    ext: Option<u64>,
    bitmaps: Vec<BitmapInfo>,
    file_size: u64,
}

impl ParallelsImage {
    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }
    /// The BAT as stored.
    pub fn bat(&self) -> &[u32] {
        &self.bat
    }
    /// Dirty bitmaps of the format extension.
    pub fn bitmaps(&self) -> &[BitmapInfo] {
        &self.bitmaps
    }
    /// Host byte offset of BAT entry `e` (not 0).
    fn host_of(&self, e: u32) -> u64 {
        u64::from(e)
            .saturating_mul(self.header.off_multiplier())
            .saturating_mul(SECTOR)
    }
}

fn hdr_err(msg: String, at: u64) -> Error {
    Error::unsupported(msg).at(at).code("parallels.header")
}

/// Refuses what qemu's `parallels_open` refuses, and returns the cluster size in bytes.
fn validate(h: &Header) -> Result<u64> {
    if h.version != VERSION {
        return Err(hdr_err(
            format!("Parallels version {} (qemu reads only 2)", h.version),
            16,
        ));
    }
    if h.tracks == 0 || h.tracks > MAX_TRACKS {
        return Err(Error::unsupported(format!(
            "cluster size of {} sectors is out of range (1 to {MAX_TRACKS}, as qemu)",
            h.tracks
        ))
        .at(28)
        .code("parallels.cluster-size"));
    }
    if h.bat_entries > MAX_BAT_ENTRIES {
        return Err(Error::limit(format!(
            "BAT of {} entries exceeds qemu's {MAX_BAT_ENTRIES}",
            h.bat_entries
        ))
        .at(32)
        .code("table.too-large"));
    }
    Ok(u64::from(h.tracks).saturating_mul(SECTOR))
}

/// Opens a Parallels image.
///
/// # Errors
/// `Invalid` for a missing magic; `Unsafe` (`parallels.descriptor`) for a ploop
/// `DiskDescriptor.xml`; `Unsupported` (`parallels.header`, `parallels.cluster-size`) for what
/// qemu refuses; table codes for the BAT.
///
/// # Security
/// Reads only from `src`, within `limits`; never opens a file a descriptor names.
pub fn open(src: Source, limits: &Limits) -> Result<ParallelsImage> {
    let size = src.size()?;
    let budget = limits.budget();
    let head = read_up_to(src.as_ref(), 0, 16)?;
    if head.as_slice() != &MAGIC_V1[..] && head.as_slice() != &MAGIC_EXT[..] {
        if is_descriptor(&read_up_to(src.as_ref(), 0, DESCRIPTOR_SEARCH)?) {
            return Err(descriptor_error(&src)?);
        }
        return Err(Error::invalid("no Parallels magic at byte 0").at(0));
    }
    if size < HEADER_LEN {
        return Err(Error::truncated(format!(
            "a Parallels header needs 64 bytes; the file has {size}"
        )));
    }
    let buf = read_vec(src.as_ref(), 0, HEADER_LEN, &budget, "Parallels header")?;
    let h = Header::parse(&buf);
    drop(buf);
    budget.give_back(HEADER_LEN);
    let h = h?;
    let cluster = validate(&h)?;
    let spec = TableSpec {
        name: "Parallels BAT",
        offset: HEADER_LEN,
        entries: u64::from(h.bat_entries),
        entry_size: 4,
        align: 1,
    };
    let bat = read_entries(src.as_ref(), spec, size, limits, &budget, |c| {
        c.try_into().map(u32::from_le_bytes).unwrap_or(0)
    })?;

    let mut findings = header_findings(&h, size);
    let data_start = data_start(&h, size).saturating_mul(SECTOR);
    let virtual_size = h.sectors().saturating_mul(SECTOR);
    let mut info = ImageInfo::new(Format::Parallels, virtual_size);
    info.actual_size = src.allocated_size();
    info.cluster_size = Some(cluster);
    info.dirty = Some(h.inuse == INUSE_OPEN);
    info.detail(
        "subformat",
        if h.old_magic() {
            "WithoutFreeSpace"
        } else {
            "WithouFreSpacExt"
        },
    );
    info.detail("bat-entries", h.bat_entries);
    info.detail("data-offset", data_start);
    let mut img = ParallelsImage {
        src,
        info,
        findings: Vec::new(),
        header: h,
        bat,
        cluster,
        data_start,
        ext: None,
        bitmaps: Vec::new(),
        file_size: size,
    };
    img.read_extension(&budget, &mut findings)?;
    findings.extend(img.eof_findings());
    img.findings = findings;
    Ok(img)
}

/// The data area's start in sectors, as qemu computes it (the minimum when `data_off` is 0
/// for the old magic, or out of range).
fn data_start(h: &Header, size: u64) -> u64 {
    let min = h.min_data_off();
    let off = u64::from(h.data_off);
    if off == 0 || off < min || off > size / SECTOR {
        min
    } else {
        off
    }
}

/// Findings from the header alone: the in-use flag and the data offset qemu-img check
/// reports.
fn header_findings(h: &Header, size: u64) -> Vec<Finding> {
    let mut out = Vec::new();
    if h.inuse == INUSE_OPEN {
        out.push(
            Finding::reject(
                "parallels.dirty",
                "the image is marked in use (not closed cleanly): its BAT may not describe the data written last; qemu-img check reports it as a corruption",
            )
            .at(44),
        );
    } else if h.inuse != 0 && h.inuse != INUSE_CLOSED {
        out.push(
            Finding::warn(
                "parallels.header",
                format!(
                    "in-use field {:#010x} is none of the values the format allows",
                    h.inuse
                ),
            )
            .at(44),
        );
    }
    let off = u64::from(h.data_off);
    let min = h.min_data_off();
    let zero_ok = off == 0 && h.old_magic();
    if !zero_ok && (off < min || off > size / SECTOR) {
        out.push(
            Finding::reject(
                "parallels.data-offset",
                format!(
                    "data offset of {off} sectors is out of range ({min} to the file's {} sectors): it overlaps the header and BAT or lies past the end",
                    size / SECTOR
                ),
            )
            .at(48),
        );
    }
    out
}

impl ParallelsImage {
    /// Reads the format extension cluster, as qemu does on a read-only open, and turns what
    /// qemu would refuse into findings.
    fn read_extension(
        &mut self,
        budget: &crate::limits::Budget,
        out: &mut Vec<Finding>,
    ) -> Result<()> {
        if self.header.ext_off == 0 {
            return Ok(());
        }
        let at = self.header.ext_off.saturating_mul(SECTOR);
        let fits = at
            .checked_add(self.cluster)
            .is_some_and(|end| end <= self.file_size);
        if !fits {
            out.push(
                Finding::reject(
                    "parallels.extension",
                    format!(
                        "format extension cluster at {at:#x} passes the end of the file ({} bytes)",
                        self.file_size
                    ),
                )
                .at(56),
            );
            return Ok(());
        }
        self.ext = Some(at);
        let cluster = read_vec(
            self.src.as_ref(),
            at,
            self.cluster,
            budget,
            "Parallels format extension",
        )?;
        let parsed = check::parse_extension(&cluster, at, self.header.sectors());
        drop(cluster);
        budget.give_back(self.cluster);
        match parsed {
            Ok((bitmaps, mut f)) => {
                self.info.detail("dirty-bitmaps", bitmaps.len());
                self.bitmaps = bitmaps;
                out.append(&mut f);
            }
            Err(e) => out.push(Finding::from_error(&e)),
        }
        Ok(())
    }

    /// BAT entries whose cluster is not wholly inside the file.
    fn eof_findings(&self) -> Vec<Finding> {
        let mut out = Vec::new();
        let (mut past, mut short) = (0usize, 0usize);
        for (i, &e) in self.bat.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let host = self.host_of(e);
            let end = host.saturating_add(self.cluster);
            if end <= self.file_size {
                continue;
            }
            let at = HEADER_LEN.saturating_add((i as u64).saturating_mul(4));
            let (code, n, msg) = if host >= self.file_size {
                past = past.saturating_add(1);
                (
                    "parallels.cluster-past-eof",
                    past,
                    format!("BAT entry {i} points at {host:#x}, at or past the end of the file ({} bytes)", self.file_size),
                )
            } else {
                short = short.saturating_add(1);
                (
                    "parallels.truncated",
                    short,
                    format!("the cluster of BAT entry {i} ({host:#x}..{end:#x}) is cut short by the end of the file ({} bytes)", self.file_size),
                )
            };
            if n <= MAX_REPORTED {
                out.push(Finding::reject(code, msg).at(at));
            }
        }
        for (code, n) in [
            ("parallels.cluster-past-eof", past),
            ("parallels.truncated", short),
        ] {
            if n > MAX_REPORTED {
                out.push(Finding::reject(
                    code,
                    format!("{n} BAT entries in all point outside the file"),
                ));
            }
        }
        out
    }

    fn entry(&self, index: u64) -> u32 {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.bat.get(i))
            .copied()
            .unwrap_or(0)
    }
}

impl Image for ParallelsImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }

    fn check(&self, limits: &Limits) -> Result<Vec<Finding>> {
        check::check(self, limits)
    }

    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        let end = guest.saturating_add(span);
        let cs = self.cluster;
        // The cluster size is at least one sector (checked at open).
        let idx = guest
            .checked_div(cs)
            .ok_or_else(|| Error::corrupt("zero cluster size"))?;
        let first = self.entry(idx);
        if first != 0 {
            let host = self.host_of(first);
            if host.saturating_add(cs) > self.file_size {
                return Err(Error::corrupt(format!(
                    "BAT entry {idx} points at {host:#x}, outside the file ({} bytes)",
                    self.file_size
                ))
                .at(HEADER_LEN.saturating_add(idx.saturating_mul(4)))
                .code("parallels.cluster-past-eof"));
            }
        }
        let mut next = idx.saturating_add(1);
        let mut n = 0;
        while next.saturating_mul(cs) < end && n < MAX_SCAN {
            if first == 0 && next >= self.bat.len() as u64 {
                // Past the BAT every cluster is unallocated: one step to the span's end, not
                // one per cluster (a 64 KiB BAT under a 464 GiB disk once cost seconds).
                next = end.div_ceil(cs);
                break;
            }
            let e = self.entry(next);
            let contiguous = if first == 0 {
                e == 0
            } else {
                e != 0
                    && self.host_of(e)
                        == self
                            .host_of(first)
                            .saturating_add(next.saturating_sub(idx).saturating_mul(cs))
                    && self.host_of(e).saturating_add(cs) <= self.file_size
            };
            if !contiguous {
                break;
            }
            next = next.saturating_add(1);
            n = n.saturating_add(1);
        }
        let len = next.saturating_mul(cs).min(end).saturating_sub(guest);
        let kind = if first == 0 {
            ExtentKind::Unallocated
        } else {
            ExtentKind::Data {
                host: self
                    .host_of(first)
                    .saturating_add(guest.checked_rem(cs).unwrap_or(0)),
            }
        };
        Ok(Extent {
            start: guest,
            len,
            kind,
        })
    }
}

#[cfg(test)]
mod tests;
