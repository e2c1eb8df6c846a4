//! VMDK images: hosted sparse extents (monolithicSparse, streamOptimized in header or footer
//! form) and text descriptors (monolithicFlat, twoGbMaxExtent*, vmfs...).
//!
//! Facts come from VMware's `vmdk/vmware_vmdk.h` and `vmdk/sparse.c` (open-vmdk) and from
//! qemu's `block/vmdk.c`; where they differ this module reads as qemu does and says so, and
//! it refuses what either of them refuses.
//!
//! # Security
//! A descriptor can name any file on the host (`RW 0 FLAT "/etc/shadow" 0`). Extents other
//! than the sparse file itself are reported as [`Reference`]s and `vmdk.external-extent`
//! findings and never opened; mapping a descriptor-only image is refused with `Unsafe`.

mod check;
pub mod descriptor;
pub mod header;
pub mod stream;
pub mod table;

use crate::error::{Error, Result};
use crate::finding::Finding;
use crate::format::Format;
use crate::image::{Codec, Extent, ExtentKind, Image, ImageCore, ImageInfo, RefKind, Reference};
use crate::io::{read_up_to, Source};
use crate::limits::{Budget, Limits};
use crate::probe::Probe;
use crate::table::read_held;

use descriptor::{Descriptor, MAX_DESCRIPTOR};
use header::{SparseHeader, GD_AT_END, HEADER_LEN, MAGIC_BYTES, SECTOR};
use stream::GRAIN_MARKER_LEN;
use table::GtCache;

/// How far qemu looks for `CID`, `parentCID` and `parentFileNameHint` in a sparse file: 20
/// sectors from byte 512, whatever the header says (`DESC_SIZE` in `block/vmdk.c`).
const QEMU_DESC_WINDOW: usize = 20 * 512;
/// Grain table lookups one `mapping` call may do while coalescing a run.
const MAX_STEPS: u32 = 4096;
/// Findings of one code reported before the rest are summarised.
const MAX_PER_CODE: usize = crate::finding::PER_CODE;
/// `createType` values of a single self-contained sparse file.
const SELF_CONTAINED: [&str; 2] = ["monolithicSparse", "streamOptimized"];

/// An opened VMDK image.
pub struct VmdkImage {
    src: Source,
    info: ImageInfo,
    findings: Vec<Finding>,
    body: Body,
}

/// What backs the guest data.
enum Body {
    /// A hosted sparse extent in this file.
    Sparse(Box<Sparse>),
    /// Only a descriptor: every extent lives in another file.
    DescriptorOnly,
}

/// The parsed metadata of a sparse extent.
pub(crate) struct Sparse {
    /// The header in effect (the footer's in footer form).
    pub(crate) hdr: SparseHeader,
    /// Byte offset of the header in effect.
    pub(crate) hdr_at: u64,
    /// True when the head said `gdOffset = GD_AT_END`.
    pub(crate) footer_form: bool,
    /// Grain directory: one grain table sector per entry.
    pub(crate) gd: crate::table::Table<u32>,
    /// Source size.
    pub(crate) file_size: u64,
    /// Parsed grain tables.
    pub(crate) cache: GtCache,
}

/// What one grain table entry says about one grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    Unallocated,
    Zero,
    /// The grain's (or its marker's) sector.
    At(u64),
}

/// The magic of a VMDK3 (VMFS sparse, `COWD`) extent.
const COWD_MAGIC: &[u8; 4] = b"COWD";

/// True when the probe windows look like VMDK: the sparse magic (`KDMV` or VMDK3's `COWD`),
/// or a text descriptor.
///
/// Any version counts: qemu's probe claims every file with the magic, so a `KDMV` file with
/// an unknown version must be reported as a VMDK that fails to open (and be rejected), never
/// passed as raw.
pub fn probe(p: &Probe<'_>) -> bool {
    p.starts_with(MAGIC_BYTES)
        || p.starts_with(COWD_MAGIC)
        || descriptor::looks_like_descriptor(&p.head)
}

/// Opens a VMDK image.
///
/// # Errors
/// `Truncated`, `Invalid`, `Unsupported`, `Corrupt` or `LimitExceeded` when the metadata
/// cannot be used safely (each with a `vmdk.*` or `table.*` code); `Io`.
///
/// # Security
/// Reads only `src`. Extents in other files and parents are reported, never opened.
pub fn open(src: Source, limits: &Limits) -> Result<VmdkImage> {
    let size = src.size()?;
    let head = read_up_to(src.as_ref(), 0, HEADER_LEN)?;
    if head.starts_with(MAGIC_BYTES) {
        return open_sparse(src, size, &head, limits);
    }
    if head.starts_with(COWD_MAGIC) {
        return open_cowd(src, size, &head);
    }
    // qemu reads at most 1 MiB - 1 of a descriptor file, up to the first NUL.
    let budget = limits.budget();
    let len = size.min(MAX_DESCRIPTOR - 1);
    let (text, _held) = read_held(src.as_ref(), 0, len, &budget, "VMDK descriptor")?;
    if !descriptor::looks_like_descriptor(&text) {
        return Err(Error::invalid(
            "neither a VMDK sparse header nor a VMDK descriptor",
        ));
    }
    let body = descriptor::text_of(&text);
    let desc = descriptor::parse(body, 0);
    let loose = descriptor::loose_extents(body, 0, &desc.extents);
    let mut findings = vec![Finding::reject(
        "vmdk.descriptor-only",
        "the file is only a VMDK descriptor: its data lives in other files",
    )];
    if size > len {
        findings.push(Finding::reject(
            "vmdk.descriptor-size",
            format!("a {size}-byte descriptor file: qemu reads only its first {len} bytes"),
        ));
    }
    if text.contains(&0) {
        findings.push(Finding::reject(
            "vmdk.descriptor-syntax",
            "the descriptor file holds NUL bytes",
        ));
    }
    let mut refs = Vec::new();
    hidden_parent(&text, 0, Some(&desc), &mut findings, &mut refs);
    descriptor_only(src, desc, loose, findings, refs)
}

/// A VMDK3 (`COWD`, VMFS sparse) extent: glimpse does not read its tables, but reports its
/// size and the parent qemu would open (qemu looks for `parentFileNameHint` in the 10 KiB
/// from byte 512, as for a `KDMV` file).
fn open_cowd(src: Source, size: u64, head: &[u8]) -> Result<VmdkImage> {
    // VMDK3 header after the magic, little-endian u32s: version, flags, disk sectors, ...
    let sectors = head
        .get(12..16)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| {
            Error::truncated(format!(
                "a {size}-byte file is too short for a VMDK3 header"
            ))
            .code("vmdk.header")
        })?;
    let mut findings = vec![Finding::reject(
        "vmdk.header",
        "VMDK3 (COWD, VMFS sparse) extents: glimpse does not read this format",
    )];
    let mut refs = Vec::new();
    let window = read_up_to(src.as_ref(), SECTOR, QEMU_DESC_WINDOW)?;
    hidden_parent(&window, SECTOR, None, &mut findings, &mut refs);
    let mut info = ImageInfo::new(Format::Vmdk, u64::from(sectors).saturating_mul(SECTOR));
    info.actual_size = src.allocated_size();
    info.detail("create-type", "vmfsSparse");
    info.references = refs;
    Ok(VmdkImage {
        src,
        info,
        findings,
        body: Body::DescriptorOnly,
    })
}

/// An image whose guest data lives entirely in files the descriptor names.
fn descriptor_only(
    src: Source,
    desc: Descriptor,
    loose: Vec<descriptor::LooseExtent>,
    mut findings: Vec<Finding>,
    mut refs: Vec<Reference>,
) -> Result<VmdkImage> {
    syntax_findings(&desc, &mut findings);
    loose_findings(&loose, &mut findings, &mut refs);
    let mut sectors = 0u64;
    let mut extents = Vec::new();
    for e in &desc.extents {
        // The virtual size counts what qemu opens: RW extents of the types it knows.
        if e.counted_by_qemu() {
            sectors = sectors.checked_add(e.sectors).ok_or_else(|| {
                Error::invalid("VMDK extent sizes overflow")
                    .at(e.at)
                    .code("vmdk.descriptor-syntax")
            })?;
        }
        external_extent(e, &mut findings, &mut refs);
        let mut m = serde_json::Map::new();
        m.insert(
            "virtual-size".into(),
            e.sectors.saturating_mul(SECTOR).into(),
        );
        m.insert("filename".into(), e.file.clone().unwrap_or_default().into());
        m.insert("format".into(), e.kind.clone().into());
        extents.push(serde_json::Value::Object(m));
    }
    let vsize = sectors.checked_mul(SECTOR).ok_or_else(|| {
        Error::invalid("VMDK virtual size overflows").code("vmdk.descriptor-syntax")
    })?;
    create_type_finding(&desc, None, &mut findings);
    parent_findings(&desc, &mut findings, &mut refs);
    let mut info = ImageInfo::new(Format::Vmdk, vsize);
    info.actual_size = src.allocated_size();
    common_details(
        &mut info,
        &desc,
        desc.create_type.clone().unwrap_or_default(),
    );
    info.detail("extents", extents);
    info.references = refs;
    Ok(VmdkImage {
        src,
        info,
        findings,
        body: Body::DescriptorOnly,
    })
}

/// Reports the extent lines a lenient reader would open that [`descriptor::parse`] refused.
fn loose_findings(
    loose: &[descriptor::LooseExtent],
    findings: &mut Vec<Finding>,
    refs: &mut Vec<Reference>,
) {
    for e in loose {
        findings.push(
            Finding::reject(
                "vmdk.external-extent",
                format!(
                    "{} extent line naming {:?}: qemu or VMware may read another file",
                    e.access, e.file
                ),
            )
            .at(e.at),
        );
        refs.push(Reference {
            kind: RefKind::Extent,
            target: e.file.clone(),
            format: None,
            offset: Some(e.at),
        });
    }
}

/// The parent name qemu takes from a descriptor window: after the first
/// `parentFileNameHint` anywhere in the text up to a NUL, it skips two bytes (`="`) and reads
/// up to the next quote (qemu fails to open when there is none; the rest is reported then).
fn qemu_parent_hint(text: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"parentFileNameHint";
    let at = text.windows(KEY.len()).position(|w| w == KEY)?;
    let name = text
        .get(at.checked_add(KEY.len())?.checked_add(2)?..)
        .unwrap_or_default();
    let end = name.iter().position(|&b| b == b'"').unwrap_or(name.len());
    let name = name.get(..end.min(1024)).unwrap_or_default();
    Some(String::from_utf8_lossy(name).into_owned())
}

/// qemu finds `parentFileNameHint` by searching the raw descriptor window (10 KiB, up to a
/// NUL), so a hint in a comment, or past the declared descriptor, still makes it open a
/// parent. Report one when the line parser found none.
fn hidden_parent(
    window: &[u8],
    at: u64,
    desc: Option<&Descriptor>,
    findings: &mut Vec<Finding>,
    refs: &mut Vec<Reference>,
) {
    let text = descriptor::text_of(
        window
            .get(..window.len().min(QEMU_DESC_WINDOW))
            .unwrap_or_default(),
    );
    let parsed = desc.is_some_and(|d| d.parent_hint.is_some());
    if parsed {
        return;
    }
    if let Some(name) = qemu_parent_hint(text) {
        findings.push(
            Finding::reject(
                "vmdk.parent",
                format!("qemu finds parentFileNameHint {name:?} in the descriptor text"),
            )
            .at(at),
        );
        refs.push(Reference {
            kind: RefKind::BackingFile,
            target: name,
            format: Some("vmdk".into()),
            offset: Some(at),
        });
    }
}

/// Reports one descriptor syntax error per bad line.
fn syntax_findings(desc: &Descriptor, findings: &mut Vec<Finding>) {
    for e in desc.errors.iter().take(MAX_PER_CODE) {
        findings.push(Finding::reject("vmdk.descriptor-syntax", e.message.clone()).at(e.at));
    }
    if desc.errors.len() > MAX_PER_CODE {
        findings.push(Finding::reject(
            "vmdk.descriptor-syntax",
            format!(
                "{} more descriptor syntax errors",
                desc.errors.len().saturating_sub(MAX_PER_CODE)
            ),
        ));
    }
}

/// Reports an extent stored outside this file.
fn external_extent(
    e: &descriptor::ExtentLine,
    findings: &mut Vec<Finding>,
    refs: &mut Vec<Reference>,
) {
    let name = e.file.clone().unwrap_or_default();
    findings.push(
        Finding::reject(
            "vmdk.external-extent",
            format!(
                "{} {} extent of {} sectors in {name:?}: another file would be read",
                e.access, e.kind, e.sectors
            ),
        )
        .at(e.at),
    );
    if e.file.is_some() {
        refs.push(Reference {
            kind: RefKind::Extent,
            target: name,
            format: Some(e.kind.clone()),
            offset: Some(e.at),
        });
    }
}

/// Rejects create types that are not one self-contained file, and (for a sparse file) a
/// create type that contradicts the header's compression.
fn create_type_finding(desc: &Descriptor, compressed: Option<bool>, findings: &mut Vec<Finding>) {
    match desc.create_type.as_deref() {
        None => findings.push(Finding::reject("vmdk.create-type", "the descriptor has no createType")),
        Some(ct) if !SELF_CONTAINED.contains(&ct) => findings.push(Finding::reject(
            "vmdk.create-type",
            format!("createType {ct:?} is not a single self-contained file (monolithicSparse or streamOptimized)"),
        )),
        Some(ct) => {
            if let Some(c) = compressed {
                if c != (ct == "streamOptimized") {
                    findings.push(Finding::reject(
                        "vmdk.create-type",
                        format!("createType {ct:?} contradicts the header (compressed grains: {c})"),
                    ));
                }
            }
        }
    }
}

/// Reports a parent link: a parent CID other than `ffffffff` or a parent file name.
fn parent_findings(desc: &Descriptor, findings: &mut Vec<Finding>, refs: &mut Vec<Reference>) {
    let cid_parent = desc.parent_cid.is_some_and(|p| p != u32::MAX);
    if desc.parent_hint.is_none() && !cid_parent {
        return;
    }
    let target = desc
        .parent_hint
        .clone()
        .unwrap_or_else(|| format!("parentCID={:08x}", desc.parent_cid.unwrap_or_default()));
    let mut f = Finding::reject(
        "vmdk.parent",
        format!("the image is a delta of parent {target:?}"),
    );
    if let Some(at) = desc.parent_hint_at {
        f = f.at(at);
    }
    findings.push(f);
    refs.push(Reference {
        kind: RefKind::BackingFile,
        target,
        format: Some("vmdk".into()),
        offset: desc.parent_hint_at,
    });
}

/// `cid`, `parent-cid`, `create-type` as qemu-img's format-specific data names them.
fn common_details(info: &mut ImageInfo, desc: &Descriptor, create_type: String) {
    if let Some(c) = desc.cid {
        info.detail("cid", c);
    }
    if let Some(c) = desc.parent_cid {
        info.detail("parent-cid", c);
    }
    info.detail("create-type", create_type);
    // vSphere VM encryption keeps the wrapped data key in the descriptor: the grains are
    // ciphertext, whatever the extents say.
    if ["encryption.keySafe", "encryption.data"]
        .iter()
        .any(|k| desc.keys.contains_key(*k))
    {
        info.encrypted = true;
        let mut m = serde_json::Map::new();
        m.insert("format".into(), "vmware".into());
        info.detail("encrypt", serde_json::Value::Object(m));
    }
}

fn open_sparse(src: Source, size: u64, head: &[u8], limits: &Limits) -> Result<VmdkImage> {
    let budget = limits.budget();
    let h = SparseHeader::parse(head, 0)?;
    h.validate(0)?;
    let mut findings = Vec::new();
    let mut refs = Vec::new();
    let (desc, desc_at) = read_embedded(&src, &h, &budget)?;

    // What qemu sees: it reads CID, parentCID and parentFileNameHint from byte 512 whatever
    // the header says.
    let window = read_up_to(src.as_ref(), SECTOR, QEMU_DESC_WINDOW)?;
    hidden_parent(&window, SECTOR, desc.as_ref(), &mut findings, &mut refs);

    // A sparse header with no capacity and a descriptor is read by qemu as a descriptor file
    // whose extents it opens: a classic way to smuggle an extent path. Treat it as one.
    if h.capacity == 0 && desc.is_some() {
        findings.push(Finding::reject(
            "vmdk.descriptor-only",
            "a sparse header of capacity 0 wraps a descriptor: qemu reads its extents from other files",
        ));
        return wrapped_descriptor(src, size, desc_at, &budget, findings, refs);
    }

    if h.descriptor_offset != 1 {
        findings.push(
            Finding::reject(
                "vmdk.descriptor-offset",
                format!(
                    "the embedded descriptor is at sector {}, not 1; qemu reads sector 1 whatever the header says",
                    h.descriptor_offset
                ),
            )
            .at(28),
        );
    }
    // Footer form: the real header is the footer's.
    let footer_form = h.gd_offset == GD_AT_END;
    let (hdr, hdr_at) = if footer_form {
        let f = stream::read_footer(src.as_ref(), size, &h)?;
        let at = size.saturating_sub(2 * SECTOR);
        f.validate(at)?;
        (f, at)
    } else {
        (h, 0)
    };
    // qemu refuses a file shorter than the header's grain offset ("File truncated, expecting
    // at least N bytes"), whether or not any grain lies there.
    let grains_at = hdr.overhead.saturating_mul(SECTOR);
    if size < grains_at {
        return Err(Error::truncated(format!(
            "the header puts the first grain at sector {} (byte {grains_at}), past the end of the {size} byte file; qemu refuses to open it",
            hdr.overhead
        ))
        .at(hdr_at.saturating_add(64))
        .code("vmdk.header"));
    }

    let self_name = if let Some(desc) = &desc {
        syntax_findings(desc, &mut findings);
        create_type_finding(desc, Some(hdr.compressed()), &mut findings);
        parent_findings(desc, &mut findings, &mut refs);
        own_extent(desc, &hdr, desc_at, &mut findings, &mut refs)
    } else {
        findings.push(Finding::reject(
            "vmdk.descriptor-syntax",
            "the sparse file has no embedded descriptor",
        ));
        String::new()
    };
    let gd = read_directories(&src, &hdr, size, limits, &budget)?;
    if hdr.unclean_shutdown != 0 {
        findings.push(
            Finding::warn("vmdk.unclean-shutdown", "the extent was not closed cleanly").at(72),
        );
    }
    let info = sparse_info(&src, &hdr, desc.as_ref(), self_name, refs);
    let cache = GtCache::new(hdr.gtes_per_gt, size, limits.clone());
    let sparse = Sparse {
        hdr,
        hdr_at,
        footer_form,
        gd,
        file_size: size,
        cache,
    };
    Ok(VmdkImage {
        src,
        info,
        findings,
        body: Body::Sparse(Box::new(sparse)),
    })
}

/// The embedded descriptor the header names (bounded), parsed, and its byte offset.
fn read_embedded(
    src: &Source,
    h: &SparseHeader,
    budget: &Budget,
) -> Result<(Option<Descriptor>, u64)> {
    let desc_len = h
        .descriptor_size
        .checked_mul(SECTOR)
        .filter(|l| *l <= MAX_DESCRIPTOR)
        .ok_or_else(|| {
            Error::limit(format!(
                "embedded VMDK descriptor of {} sectors is too large",
                h.descriptor_size
            ))
            .at(36)
            .code("vmdk.descriptor-size")
        })?;
    let desc_at = table::sector_offset(h.descriptor_offset, "VMDK descriptor")?;
    let desc = if h.descriptor_offset == 0 {
        None
    } else {
        let (area, _held) = read_held(
            src.as_ref(),
            desc_at,
            desc_len,
            budget,
            "embedded VMDK descriptor",
        )
        .map_err(|e| {
            if e.kind() == crate::error::ErrorKind::Truncated {
                e.code("vmdk.descriptor-offset")
            } else {
                e
            }
        })?;
        Some(descriptor::parse(descriptor::text_of(&area), desc_at))
    };
    Ok((desc, desc_at))
}

/// A capacity-0 sparse file wrapping a descriptor: read as qemu reads it, a descriptor file.
fn wrapped_descriptor(
    src: Source,
    size: u64,
    desc_at: u64,
    budget: &Budget,
    findings: Vec<Finding>,
    refs: Vec<Reference>,
) -> Result<VmdkImage> {
    // qemu reads that descriptor up to 1 MiB - 1 from its offset, past the declared size,
    // up to a NUL: parse what it parses so that every extent it would open is reported.
    let len = size.saturating_sub(desc_at).min(MAX_DESCRIPTOR - 1);
    let (text, _held) = read_held(
        src.as_ref(),
        desc_at,
        len,
        budget,
        "embedded VMDK descriptor",
    )?;
    let body = descriptor::text_of(&text);
    let desc = descriptor::parse(body, desc_at);
    let loose = descriptor::loose_extents(body, desc_at, &desc.extents);
    descriptor_only(src, desc, loose, findings, refs)
}

/// The extents of an embedded descriptor: the first SPARSE one is this file (its name is
/// returned); every other is reported as another file's.
fn own_extent(
    desc: &Descriptor,
    hdr: &SparseHeader,
    desc_at: u64,
    findings: &mut Vec<Finding>,
    refs: &mut Vec<Reference>,
) -> String {
    let mut self_name = String::new();
    // As qemu does for an embedded descriptor, the first SPARSE extent is this file
    // itself, whatever name it gives. Anything else would be read from another file.
    let mut own = false;
    for e in &desc.extents {
        if !own && e.kind == "SPARSE" {
            own = true;
            self_name = e.file.clone().unwrap_or_default();
            if e.sectors != hdr.capacity {
                findings.push(
                    Finding::warn(
                        "vmdk.extent-size",
                        format!(
                            "the descriptor says {} sectors, the header {}",
                            e.sectors, hdr.capacity
                        ),
                    )
                    .at(e.at),
                );
            }
            continue;
        }
        external_extent(e, findings, refs);
    }
    if !own {
        findings.push(
            Finding::reject(
                "vmdk.descriptor-syntax",
                "the embedded descriptor does not describe this file",
            )
            .at(desc_at),
        );
    }
    self_name
}

/// The grain directory, and the placement of the redundant one when the header uses it
/// (qemu reads both; `check` compares them).
fn read_directories(
    src: &Source,
    hdr: &SparseHeader,
    size: u64,
    limits: &Limits,
    budget: &Budget,
) -> Result<crate::table::Table<u32>> {
    let gd_entries = hdr.gd_entries();
    let gd = table::read_directory(
        src.as_ref(),
        "grain directory",
        hdr.gd_offset,
        gd_entries,
        size,
        limits,
        budget,
    )
    .map_err(|e| e.context("VMDK"))?;
    if hdr.flags & header::FLAG_REDUNDANT != 0 && hdr.rgd_offset != 0 {
        let offset = table::sector_offset(hdr.rgd_offset, "redundant grain directory")?;
        crate::table::check_table(
            crate::table::TableSpec {
                name: "redundant grain directory",
                offset,
                entries: gd_entries,
                entry_size: 4,
                align: SECTOR,
            },
            size,
            limits,
        )?;
    }
    Ok(gd)
}

/// What `info` says about a sparse file.
fn sparse_info(
    src: &Source,
    hdr: &SparseHeader,
    desc: Option<&Descriptor>,
    self_name: String,
    refs: Vec<Reference>,
) -> ImageInfo {
    let compressed = hdr.compressed();
    let vsize = hdr.capacity.saturating_mul(SECTOR);
    let grain = hdr.grain_bytes();
    let mut info = ImageInfo::new(Format::Vmdk, vsize);
    info.actual_size = src.allocated_size();
    info.cluster_size = Some(grain);
    let empty = Descriptor::default();
    // qemu names the create type of a sparse file from its header, not its descriptor.
    let ct = if compressed {
        "streamOptimized"
    } else {
        "monolithicSparse"
    };
    common_details(&mut info, desc.unwrap_or(&empty), ct.to_string());
    let mut ext = serde_json::Map::new();
    if compressed {
        ext.insert("compressed".into(), true.into());
    }
    ext.insert("virtual-size".into(), vsize.into());
    ext.insert("filename".into(), self_name.into());
    ext.insert("cluster-size".into(), grain.into());
    ext.insert("format".into(), "".into());
    info.detail("extents", vec![serde_json::Value::Object(ext)]);
    info.references = refs;
    info
}

impl Sparse {
    /// What backs grain number `g`, as `(first, last, end)`: the grain's entry, the entry of
    /// the last grain of the uniform run it starts inside its grain table (the same kind;
    /// for data, host-contiguous grains), and the guest end of that run. A missing grain
    /// table is one run. Work is bounded by one table (at most 512 entries). With `join`,
    /// zero and unallocated grains continue each other's runs ([`Image::content_extent_at`]).
    fn grain(
        &self,
        src: &dyn crate::io::ReadAt,
        g: u64,
        join: bool,
    ) -> Result<(Grain, Grain, u64)> {
        let per = u64::from(self.hdr.gtes_per_gt);
        let gb = self.hdr.grain_bytes();
        // `per` is at least 1 (the header is validated at open).
        let overflow = || Error::corrupt("grain index overflows");
        let gd_index = g.checked_div(per).ok_or_else(overflow)?;
        let gdi = usize::try_from(gd_index).map_err(|_| overflow())?;
        let gt_sector = self
            .gd
            .get(gdi)
            .copied()
            .ok_or_else(|| Error::corrupt(format!("grain {g} has no grain directory entry")))?;
        if gt_sector == 0 {
            let end = gd_index
                .saturating_add(1)
                .saturating_mul(per)
                .saturating_mul(gb);
            return Ok((Grain::Unallocated, Grain::Unallocated, end));
        }
        let gt = self.cache.get(src, u64::from(gt_sector))?;
        let gti = g
            .checked_rem(per)
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(overflow)?;
        let kind = |e: u32| match e {
            0 => Grain::Unallocated,
            1 if self.hdr.zero_grain() => Grain::Zero,
            s => Grain::At(u64::from(s)),
        };
        let first = kind(gt.get(gti).copied().unwrap_or(0));
        let mut last = first;
        let mut n = 1u64;
        // Compressed grains are one unit each: never a run.
        if !(self.hdr.compressed() && matches!(first, Grain::At(_))) {
            for &e in gt.iter().skip(gti.saturating_add(1)) {
                let next = kind(e);
                if !continues(last, next, self.hdr.grain_size, join) {
                    break;
                }
                last = next;
                n = n.saturating_add(1);
            }
        }
        Ok((first, last, g.saturating_add(n).saturating_mul(gb)))
    }

    /// What backs guest bytes from `guest`, for at most `span` bytes (already clamped to the
    /// capacity by the mapping entry point). With `join`, as [`Sparse::grain`].
    fn extent_at(
        &self,
        src: &dyn crate::io::ReadAt,
        guest: u64,
        span: u64,
        join: bool,
    ) -> Result<Extent> {
        let end = guest.saturating_add(span);
        let gb = self.hdr.grain_bytes();
        // The grain size is at least one sector (checked at open).
        let grain_of = |g: u64| {
            g.checked_div(gb)
                .ok_or_else(|| Error::corrupt("zero grain size").code("vmdk.header"))
        };
        let (first, mut last, mut run_end) = self.grain(src, grain_of(guest)?, join)?;
        if let Grain::At(sector) = first {
            if self.hdr.compressed() {
                return self.compressed(src, guest, end, sector);
            }
        }
        // Extend the run into the next grain tables while they continue it, within a bounded
        // number of table lookups.
        let mut steps = 0u32;
        while run_end < end && steps < MAX_STEPS {
            steps = steps.saturating_add(1);
            let (next, next_last, next_end) = self.grain(src, grain_of(run_end)?, join)?;
            if !continues(last, next, self.hdr.grain_size, join) {
                break;
            }
            last = next_last;
            run_end = next_end;
        }
        let len = run_end.min(end).saturating_sub(guest);
        let kind = match first {
            Grain::Unallocated => ExtentKind::Unallocated,
            Grain::Zero => ExtentKind::Zero,
            Grain::At(sector) => {
                let host = sector
                    .checked_mul(SECTOR)
                    .and_then(|h| h.checked_add(guest.checked_rem(gb)?))
                    .ok_or_else(|| {
                        Error::corrupt("grain offset overflows").code("vmdk.gt-entry-out-of-bounds")
                    })?;
                if host.checked_add(len).is_none_or(|e| e > self.file_size) {
                    return Err(Error::corrupt(format!(
                        "grain for guest offset {guest:#x} at host {host:#x} passes the end of the file"
                    ))
                    .at(host)
                    .code("vmdk.gt-entry-out-of-bounds"));
                }
                ExtentKind::Data { host }
            }
        };
        Ok(Extent {
            start: guest,
            len,
            kind,
        })
    }

    /// A compressed grain: read its marker for the stored length.
    fn compressed(
        &self,
        src: &dyn crate::io::ReadAt,
        guest: u64,
        end: u64,
        sector: u64,
    ) -> Result<Extent> {
        let gb = self.hdr.grain_bytes();
        let g = guest
            .checked_div(gb)
            .ok_or_else(|| Error::corrupt("VMDK grain size is zero"))?;
        let (stored, host) = grain_marker(src, &self.hdr, self.file_size, g, sector)?;
        let grain_end = g.saturating_add(1).saturating_mul(gb);
        Ok(Extent {
            start: guest,
            len: grain_end.min(end).saturating_sub(guest),
            kind: ExtentKind::Compressed {
                codec: Codec::Zlib,
                host,
                stored_len: stored,
                unit_size: gb,
                skip: guest.checked_rem(gb).unwrap_or(0),
            },
        })
    }
}

/// True when grain entry `next` extends a run ending in `last`: both unallocated, both zero,
/// or data stored right after; with `join`, zero and unallocated continue each other too.
fn continues(last: Grain, next: Grain, grain_sectors: u64, join: bool) -> bool {
    match (last, next) {
        (Grain::At(a), Grain::At(b)) => Some(b) == a.checked_add(grain_sectors),
        (Grain::At(_), _) | (_, Grain::At(_)) => false,
        (a, b) => join || a == b,
    }
}

/// Reads and checks the marker of compressed grain `g` at `sector`; returns the compressed
/// length and the offset of the compressed bytes.
///
/// # Errors
/// `Corrupt` (`vmdk.gt-entry-out-of-bounds`) when the grain passes the end of the file,
/// (`vmdk.grain-marker`) when the marker is not this grain's.
pub(crate) fn grain_marker(
    src: &dyn crate::io::ReadAt,
    hdr: &SparseHeader,
    file_size: u64,
    g: u64,
    sector: u64,
) -> Result<(u64, u64)> {
    let at =
        marker_offset(file_size, sector).ok_or_else(|| MarkerFault::Outside.error(g, sector))?;
    let m = read_marker(src, file_size, at)?;
    marker_span(hdr, file_size, g, at, m).map_err(|f| f.error(g, sector))
}

/// Why a compressed grain's marker does not fit its grain. A fault holds no message: `check`
/// meets one per grain-table entry, and every entry of every table may name the same bad
/// marker, so the message is made only for a finding that is kept ([`MarkerFault::error`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MarkerFault {
    /// The marker is not inside the file.
    Outside,
    /// A metadata marker of this type, not a grain's.
    Metadata(u32),
    /// Another grain's marker: the LBA it names.
    Lba(u64),
    /// More compressed bytes than qemu accepts.
    TooLong(u32),
    /// The compressed bytes pass the end of the file.
    PastEnd,
}

impl MarkerFault {
    /// The finding code of [`MarkerFault::error`].
    pub(crate) fn code(self) -> &'static str {
        match self {
            MarkerFault::Outside | MarkerFault::PastEnd => "vmdk.gt-entry-out-of-bounds",
            MarkerFault::Metadata(_) | MarkerFault::Lba(_) | MarkerFault::TooLong(_) => {
                "vmdk.grain-marker"
            }
        }
    }

    /// The error for grain `g` whose entry names the marker at `sector`.
    pub(crate) fn error(self, g: u64, sector: u64) -> Error {
        let at = sector.saturating_mul(SECTOR);
        let e = match self {
            MarkerFault::Outside => {
                return Error::corrupt(format!(
                    "compressed grain {g} at sector {sector} lies outside the file"
                ))
                .code(self.code())
            }
            MarkerFault::Metadata(kind) => Error::corrupt(format!(
                "grain {g} points at a metadata marker (type {kind})"
            )),
            MarkerFault::Lba(lba) => Error::corrupt(format!("grain {g}'s marker says LBA {lba}")),
            MarkerFault::TooLong(size) => {
                Error::corrupt(format!("grain {g} claims {size} compressed bytes"))
            }
            MarkerFault::PastEnd => {
                Error::corrupt(format!("compressed grain {g} passes the end of the file"))
            }
        };
        e.at(at).code(self.code())
    }
}

/// The byte offset of the marker at `sector`, when the marker lies inside the file.
pub(crate) fn marker_offset(file_size: u64, sector: u64) -> Option<u64> {
    sector
        .checked_mul(SECTOR)
        .filter(|a| a.saturating_add(GRAIN_MARKER_LEN) <= file_size)
}

/// Reads the marker at byte `at` ([`marker_offset`]).
///
/// # Errors
/// `Io`.
pub(crate) fn read_marker(
    src: &dyn crate::io::ReadAt,
    file_size: u64,
    at: u64,
) -> Result<stream::Marker> {
    let mut buf = [0u8; 16];
    let n = usize::try_from(file_size.saturating_sub(at).min(16)).unwrap_or(16);
    src.read_exact_at(buf.get_mut(..n).unwrap_or_default(), at)?;
    stream::parse_marker(&buf, at)
}

/// What marker `m`, read at byte `at`, says of compressed grain `g`: the compressed length and
/// the offset of the compressed bytes, or why it is not this grain's.
pub(crate) fn marker_span(
    hdr: &SparseHeader,
    file_size: u64,
    g: u64,
    at: u64,
    m: stream::Marker,
) -> std::result::Result<(u64, u64), MarkerFault> {
    if m.size == 0 {
        return Err(MarkerFault::Metadata(m.kind));
    }
    // VMware's reader checks the marker's LBA; qemu does not. A mismatch means two grains
    // were swapped or a table was forged: refuse it.
    if Some(m.val) != g.checked_mul(hdr.grain_size) {
        return Err(MarkerFault::Lba(m.val));
    }
    // qemu refuses a compressed grain longer than two grains.
    if u64::from(m.size) > hdr.grain_bytes().saturating_mul(2) {
        return Err(MarkerFault::TooLong(m.size));
    }
    let host = at.saturating_add(GRAIN_MARKER_LEN);
    if host.saturating_add(u64::from(m.size)) > file_size {
        return Err(MarkerFault::PastEnd);
    }
    Ok((u64::from(m.size), host))
}

impl Image for VmdkImage {
    fn core(&self) -> ImageCore<'_> {
        ImageCore::new(&self.info, &self.findings, &self.src)
    }
    fn check(&self, limits: &Limits) -> Result<Vec<Finding>> {
        match &self.body {
            Body::Sparse(s) => check::check(s, self.src.as_ref(), limits),
            Body::DescriptorOnly => Ok(Vec::new()),
        }
    }
    fn check_reads_every_unit(&self) -> bool {
        matches!(&self.body, Body::Sparse(s) if s.hdr.compressed())
    }
    fn extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        self.walk(guest, span, false)
    }
    fn content_extent_at(&self, guest: u64, span: u64) -> Result<Extent> {
        self.walk(guest, span, true)
    }
}

impl VmdkImage {
    fn walk(&self, guest: u64, span: u64, join: bool) -> Result<Extent> {
        match &self.body {
            Body::Sparse(s) => s.extent_at(self.src.as_ref(), guest, span, join),
            Body::DescriptorOnly => Err(Error::unsafe_(
                "the VMDK data lives in extent files named by the descriptor; they are never opened",
            )
            .code("vmdk.external-extent")),
        }
    }
}

#[cfg(test)]
mod tests;
