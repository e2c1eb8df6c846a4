//! A bounded walk over the headers of a tar archive, read in place.
//!
//! The `tar` crate's `Archive` reads GNU long names and pax extension records into memory
//! without a cap and skips member data by reading it, so glimpse walks the headers itself and
//! uses the crate's [`tar::Header`] only to decode fields. Each member's data stays in the
//! archive: callers read it through a [`crate::io::Window`].

use ::tar::{EntryType, Header};

use crate::error::{Error, Result};
use crate::io::ReadAt;
use crate::limits::Budget;

/// A tar block: every header and every member's padded data is a multiple of this.
pub const BLOCK: u64 = 512;
/// Members (not counting pax and GNU long-name headers) an archive may hold.
pub const MAX_MEMBERS: usize = 10_000;
/// Headers of any kind an archive may hold: members plus their extension headers.
pub const MAX_HEADERS: usize = 4 * MAX_MEMBERS;
/// Bytes of a member name or link target (a GNU long name or a pax `path`).
pub const MAX_NAME: u64 = 4096;
/// Bytes of one pax extended header's records.
pub const MAX_PAX: u64 = 64 * 1024;

/// What a tar member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberKind {
    /// A regular file (`0`, NUL or `7`).
    Regular,
    /// A directory (`5`).
    Directory,
    /// A symbolic link (`2`).
    Symlink,
    /// A hard link (`1`).
    HardLink,
    /// A character device (`3`).
    CharDevice,
    /// A block device (`4`).
    BlockDevice,
    /// A FIFO (`6`).
    Fifo,
    /// A GNU sparse file (`S`): its stored bytes are not its contents.
    Sparse,
    /// Any other type flag.
    Other,
}

impl MemberKind {
    fn from_type(t: EntryType) -> Self {
        match t {
            EntryType::Regular | EntryType::Continuous => MemberKind::Regular,
            EntryType::Directory => MemberKind::Directory,
            EntryType::Symlink => MemberKind::Symlink,
            EntryType::Link => MemberKind::HardLink,
            EntryType::Char => MemberKind::CharDevice,
            EntryType::Block => MemberKind::BlockDevice,
            EntryType::Fifo => MemberKind::Fifo,
            EntryType::GNUSparse => MemberKind::Sparse,
            _ => MemberKind::Other,
        }
    }

    /// A short lowercase name for messages and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberKind::Regular => "regular",
            MemberKind::Directory => "directory",
            MemberKind::Symlink => "symlink",
            MemberKind::HardLink => "hard-link",
            MemberKind::CharDevice => "char-device",
            MemberKind::BlockDevice => "block-device",
            MemberKind::Fifo => "fifo",
            MemberKind::Sparse => "sparse",
            MemberKind::Other => "other",
        }
    }
}

/// One member of the archive, as its headers declare it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Member {
    /// The name exactly as stored (pax `path`, GNU long name, or ustar prefix + name).
    #[serde(skip)]
    pub raw_name: Vec<u8>,
    /// The name, lossily decoded for display.
    pub name: String,
    /// The type.
    #[serde(rename = "type")]
    pub kind: MemberKind,
    /// The link target of a symlink or hard link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Archive offset of the member's own header (after any extension headers).
    pub header_offset: u64,
    /// Archive offset of the member's first data byte.
    pub offset: u64,
    /// Data bytes, in bytes (the pax `size` when present, else the header's).
    pub size: u64,
    /// The name Python's `tarfile` (Glance) gives the member, when it differs from `raw_name`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy")]
    pub tarfile_name: Option<Vec<u8>>,
    /// The name GNU tar gives the member, when it differs from `raw_name`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "lossy")]
    pub gnu_tar_name: Option<Vec<u8>>,
    /// Which GNU sparse form stores the member (its stored bytes are not its contents).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparse: Option<String>,
}

/// A name as lossily decoded text, for JSON.
fn lossy<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_str(&String::from_utf8_lossy(b)),
        None => s.serialize_none(),
    }
}

/// The extension headers seen before a member's own header.
#[derive(Default)]
struct Ext {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
    /// True when the pax header came before the GNU long name (or there is no long name).
    pax_first: bool,
    /// Extension headers since the last member, pax global ones included.
    headers: usize,
}

/// Extension headers that may precede one member. Python's `tarfile` recurses once per
/// extension header and fails past about a thousand in a row; real archives use one or two.
pub const MAX_EXTENSIONS_IN_A_ROW: usize = 16;

impl Ext {
    /// True when no extension header is waiting for its member: not even a pax global one,
    /// which `tarfile` fails on at the end of the archive ("end of file header").
    fn is_empty(&self) -> bool {
        self.headers == 0
    }
}

/// `bytes` up to the first NUL, as tar readers read a header field.
fn field(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    bytes.get(..end).unwrap_or_default()
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.push(b'/');
    v.extend_from_slice(name);
    v
}

/// The names the header alone gives, as (Python's `tarfile`, GNU tar). `tarfile` joins any
/// non-empty bytes at the ustar prefix offset (345) to the name, whatever the magic, except
/// for GNU types `L`, `K`, `S` (`TarInfo.frombuf`); GNU tar joins the prefix only under the
/// POSIX magic `ustar\0` (`read_header`); the `tar` crate also needs version `00`.
fn header_names(block: &[u8; 512]) -> (Vec<u8>, Vec<u8>) {
    let name = field(block.get(..100).unwrap_or_default());
    let prefix = field(block.get(345..500).unwrap_or_default());
    let gnu_type = matches!(block.get(156), Some(b'L' | b'K' | b'S'));
    let tarfile = if !prefix.is_empty() && !gnu_type {
        join(prefix, name)
    } else {
        name.to_vec()
    };
    let posix_magic = block.get(257..263) == Some(b"ustar\0");
    let gnu = if !prefix.is_empty() && posix_magic {
        join(prefix, name)
    } else {
        name.to_vec()
    };
    (tarfile, gnu)
}

/// Which GNU sparse form a member's pax records declare, if any.
fn pax_sparse(recs: &[u8], at: u64) -> Result<Option<String>> {
    let any = pax_records(recs, at)?
        .iter()
        .any(|(k, _)| k.starts_with(b"GNU.sparse."));
    if !any {
        return Ok(None);
    }
    let form = match (
        pax_value(recs, "GNU.sparse.major", at)?,
        pax_value(recs, "GNU.sparse.minor", at)?,
    ) {
        (Some(major), minor) => format!("pax {major}.{}", minor.unwrap_or("?")),
        _ if pax_value(recs, "GNU.sparse.map", at)?.is_some() => "pax 0.1".into(),
        _ => "pax 0.0".into(),
    };
    Ok(Some(format!("GNU sparse ({form})")))
}

/// Walk options: probing stops early; listing reads everything.
#[derive(Debug, Clone, Copy)]
pub struct WalkOptions {
    /// Stop (without error) after this many members.
    pub max_members: usize,
    /// Stop (without error) after this many headers of any kind.
    pub max_headers: usize,
    /// Treat a member limit overrun as an error (listing) instead of a quiet stop (probing).
    pub strict: bool,
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions {
            max_members: MAX_MEMBERS,
            max_headers: MAX_HEADERS,
            strict: true,
        }
    }
}

fn malformed(msg: impl Into<String>, at: u64) -> Error {
    Error::invalid(msg).at(at).code("ova.tar-malformed")
}

/// True when `block` is a tar header whose checksum is right and written in plain octal (see
/// [`numeric`]). The sum is taken as unsigned bytes, as POSIX and the `tar` crate do.
pub fn header_checksum_ok(block: &[u8; 512]) -> bool {
    let Some(declared) = block.get(148..156).and_then(|f| numeric(f, false)) else {
        return false;
    };
    let sum: u32 = block
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(*b)
            }
        })
        .sum();
    u64::from(sum) == declared
}

/// A numeric header field, read only in the form every tar reader reads alike: optional
/// leading spaces, octal digits, then nothing but NULs and spaces to the end of the field; or,
/// where `base256` allows, GNU's base-256 form (lead byte 0x80) of a value below 2^63. `None`
/// for anything else. The `tar` crate is more lenient than Python's `tarfile` and GNU tar, and
/// each leniency is a way to frame members differently from them: it takes a `+` (GNU tar
/// reads a `+` as obsolete base-64 and, failing, skips to the next block, reading the member's
/// data as headers), drops the high bytes and the sign of a base-256 value (both other readers
/// refuse it), and reads a checksum the same way.
fn numeric(f: &[u8], base256: bool) -> Option<u64> {
    if f.first().is_some_and(|b| b & 0x80 != 0) {
        if !base256 || f.first() != Some(&0x80) {
            return None;
        }
        let (high, low) = f.split_at(f.len().checked_sub(8)?);
        if high.iter().skip(1).any(|b| *b != 0) {
            return None;
        }
        let v = u64::from_be_bytes(low.try_into().ok()?);
        return (v <= i64::MAX as u64).then_some(v);
    }
    let start = f.iter().position(|b| *b != b' ')?;
    let rest = f.get(start..)?;
    let digits = rest
        .iter()
        .take_while(|b| (b'0'..=b'7').contains(*b))
        .count();
    let (d, tail) = rest.split_at(digits);
    if d.is_empty() || tail.iter().any(|b| *b != 0 && *b != b' ') {
        return None;
    }
    d.iter().try_fold(0u64, |v, b| {
        v.checked_mul(8)?
            .checked_add(u64::from(b.saturating_sub(b'0')))
    })
}

/// The numeric fields glimpse does not otherwise use (mode, uid, gid, mtime, devmajor,
/// devminor), as (offset, length).
const OTHER_NUMERIC_FIELDS: [(usize, usize); 6] =
    [(100, 8), (108, 8), (116, 8), (136, 12), (329, 8), (337, 8)];

/// True when a numeric field glimpse does not use reads the same in every tar reader: empty
/// (NULs or spaces, which `tarfile` reads as 0), plain octal as [`numeric`] reads it, or
/// base-256 (lead byte 0x80, or 0xff for a negative value such as an mtime before 1970).
/// `tarfile` fails on anything else (`InvalidHeaderError`) and then ends the archive there
/// without an error, so the members after it (a disk that was checked) vanish for it.
fn other_numeric_ok(f: &[u8]) -> bool {
    matches!(f.first(), Some(0x80 | 0xff))
        || field(f).iter().all(|b| *b == b' ')
        || numeric(f, false).is_some()
}

/// ASCII decimal digits only (no sign, no spaces), at most 19 of them: a pax length or `size`
/// as `tarfile` (`\d+` on bytes) and GNU tar read it.
fn decimal(d: &[u8]) -> Option<u64> {
    if d.is_empty() || d.len() > 19 || !d.iter().all(u8::is_ascii_digit) {
        return None;
    }
    d.iter()
        .try_fold(0u64, |v, b| {
            v.checked_mul(10)?
                .checked_add(u64::from(b.saturating_sub(b'0')))
        })
        .filter(|v| *v <= i64::MAX as u64)
}

/// The records of a pax extended header as (key, value), each stored as `LEN KEY=VALUE\n`
/// where LEN, in ASCII decimal digits, counts the whole record. Reading stops, as in `tarfile`
/// and GNU tar, at a NUL where a record would start; anything after it must be NULs too. Every
/// other shape is an error: in particular a length with a `+`, which Rust's integer parsing
/// (and so the `tar` crate) takes and both other readers do not, so that they would size the
/// member differently.
fn pax_records(recs: &[u8], at: u64) -> Result<Vec<(&[u8], &[u8])>> {
    let bad = |what: &str| malformed(format!("pax header: {what}"), at);
    let mut out = Vec::new();
    let mut rest = recs;
    while let Some(first) = rest.first() {
        if *first == 0 {
            if rest.iter().any(|b| *b != 0) {
                return Err(bad("bytes after the NUL that ends the records"));
            }
            break;
        }
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let len = rest
            .get(..digits)
            .and_then(decimal)
            .filter(|_| rest.get(digits) == Some(&b' '))
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("a record does not start with its length in decimal digits"))?;
        let body = rest
            .get(..len)
            .filter(|r| r.last() == Some(&b'\n'))
            .and_then(|r| r.get(digits.saturating_add(1)..len.saturating_sub(1)))
            .ok_or_else(|| bad("a record's length does not end it at a newline"))?;
        let eq = body
            .iter()
            .position(|b| *b == b'=')
            .filter(|e| *e > 0)
            .ok_or_else(|| bad("a record has no key"))?;
        // GNU tar skips blanks between the length and the key, where `tarfile` and glimpse
        // keep them in the key: `NN  size=0` sets a size for GNU tar only. No real key holds
        // a blank or a control byte.
        if body
            .get(..eq)
            .unwrap_or_default()
            .iter()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad("a record's key holds a blank or a control byte"));
        }
        out.push((
            body.get(..eq).unwrap_or_default(),
            body.get(eq.saturating_add(1)..).unwrap_or_default(),
        ));
        rest = rest.get(len..).unwrap_or_default();
    }
    Ok(out)
}

/// Strips the NUL terminator GNU long names carry.
fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(p) = v.iter().position(|b| *b == 0) {
        v.truncate(p);
    }
    v
}

/// Walks the archive's headers from offset 0 and returns its members, in order.
///
/// # Errors
/// `Invalid` (`ova.tar-malformed`) for a bad checksum, a malformed pax record, an orphaned
/// extension header or an over-long name; `Truncated` when a header or member data passes the
/// end of the source; `LimitExceeded` (`ova.too-many-members`) past [`MAX_MEMBERS`] in strict
/// mode; `Io`.
///
/// # Security
/// Reads only headers and extension records (each bounded, charged to `budget`); never member
/// data. Work is bounded by `opts`.
pub fn walk(src: &dyn ReadAt, budget: &Budget, opts: WalkOptions) -> Result<Vec<Member>> {
    let mut members = Vec::new();
    walk_into(src, budget, opts, &mut members)?;
    Ok(members)
}

/// [`walk`], appending to `members` as it goes, so that a caller (the probe) keeps the
/// members seen before an error.
///
/// # Errors
/// As [`walk`].
pub fn walk_into(
    src: &dyn ReadAt,
    budget: &Budget,
    opts: WalkOptions,
    members: &mut Vec<Member>,
) -> Result<()> {
    let size = src.size()?;
    let mut pos = 0u64;
    let mut headers = 0usize;
    let mut ext = Ext::default();
    // No end-of-archive blocks (pos == size): GNU tar accepts this too (with a warning).
    while pos != size {
        let Some(block) = next_header(src, pos, &mut headers, members.len(), opts)? else {
            // (Past a cap, a strict walk has failed; a probe stops quietly.)
            if opts.strict {
                only_zeros_after(src, pos, size)?;
            }
            break;
        };
        let mut h = Header::new_old();
        h.as_mut_bytes().copy_from_slice(&block);
        let span = member_span(src, &h, &ext, pos, size, &mut headers, opts)?;
        check_other_numeric(&block, pos)?;
        if is_extension(h.entry_type()) {
            ext.headers = ext.headers.saturating_add(1);
            if ext.headers > MAX_EXTENSIONS_IN_A_ROW {
                return Err(malformed(
                    format!("more than {MAX_EXTENSIONS_IN_A_ROW} extension headers in a row"),
                    pos,
                ));
            }
            read_extension(src, budget, h.entry_type(), &span, pos, &mut ext)?;
        } else {
            let m = make_member(
                &block,
                &h,
                std::mem::take(&mut ext),
                pos,
                span.data,
                span.len,
            )?;
            if m.size != 0
                && !matches!(
                    m.kind,
                    MemberKind::Regular | MemberKind::Sparse | MemberKind::Other
                )
            {
                // tarfile and GNU tar skip the data of regular members only: they would read
                // these bytes as the next headers, members glimpse never sees.
                return Err(malformed(
                    format!("a {} member with {} bytes of data", m.kind.as_str(), m.size),
                    pos,
                ));
            }
            members.push(m);
        }
        pos = span.next;
        if pos > size {
            // tarfile ("unexpected end of data") and GNU tar ("Unexpected EOF", writing the
            // member empty) both fail here.
            return Err(
                Error::truncated("the archive ends inside the padding of its last member")
                    .at(size)
                    .code("ova.truncated"),
            );
        }
    }
    if opts.strict && !ext.is_empty() {
        return Err(malformed(
            "extension header without a following member",
            pos,
        ));
    }
    Ok(())
}

/// Refuses anything but NULs after the end-of-archive block at `from`: `tar -i`
/// (`--ignore-zeros`) and `tarfile.open(ignore_zeros=True)` read on past it, and would find
/// members glimpse never saw. Writers pad the end with NULs only.
fn only_zeros_after(src: &dyn ReadAt, from: u64, size: u64) -> Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = from;
    while at < size {
        // Holes read as zeros: skip them.
        let Some(data) = src.next_data(at)? else {
            return Ok(());
        };
        at = data;
        let n = usize::try_from(size.saturating_sub(at))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let chunk = buf.get_mut(..n).unwrap_or_default();
        let got = src.read_at(chunk, at)?;
        if got == 0 {
            return Ok(());
        }
        if !crate::io::is_zero(chunk.get(..got).unwrap_or_default()) {
            return Err(malformed(
                "bytes other than NUL after the end-of-archive block (tar --ignore-zeros \
                 reads them as members)",
                at,
            ));
        }
        at = at.saturating_add(got as u64);
    }
    Ok(())
}

/// Refuses a header whose mode, uid, gid, mtime or device numbers `tarfile` cannot read
/// ([`other_numeric_ok`]).
fn check_other_numeric(block: &[u8; 512], pos: u64) -> Result<()> {
    for (at, len) in OTHER_NUMERIC_FIELDS {
        let f = block.get(at..at.saturating_add(len)).unwrap_or_default();
        if !other_numeric_ok(f) {
            return Err(malformed(
                format!(
                    "a numeric header field at byte {at} is not octal: tarfile would end the \
                     archive there"
                ),
                pos,
            ));
        }
    }
    Ok(())
}

/// The header block at `pos`, counted against the walk's caps; `None` at the end-of-archive
/// block or, when probing, past a cap.
fn next_header(
    src: &dyn ReadAt,
    pos: u64,
    headers: &mut usize,
    members: usize,
    opts: WalkOptions,
) -> Result<Option<[u8; 512]>> {
    let mut block = [0u8; 512];
    src.read_exact_at(&mut block, pos)
        .map_err(|e| Error::from(e).context("reading a tar header").at(pos))?;
    if block.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    *headers = headers.saturating_add(1);
    if *headers > opts.max_headers || members >= opts.max_members {
        if opts.strict {
            return Err(Error::limit(format!(
                "the archive has more than {} members or {} headers",
                opts.max_members, opts.max_headers
            ))
            .at(pos)
            .code("ova.too-many-members"));
        }
        return Ok(None);
    }
    if !header_checksum_ok(&block) {
        return Err(malformed("tar header checksum mismatch", pos));
    }
    Ok(Some(block))
}

/// GNU long names and links, and pax local and global records: headers that describe the
/// next member (or all of them) rather than being one.
fn is_extension(etype: tar::EntryType) -> bool {
    etype.is_gnu_longname()
        || etype.is_gnu_longlink()
        || etype.is_pax_local_extensions()
        || etype.is_pax_global_extensions()
}

/// Where a header's data lies.
struct Span {
    /// Offset of the data.
    data: u64,
    /// Its length (a pax `size` record wins over the header's field).
    len: u64,
    /// Offset of the next header (the data padded to a block).
    next: u64,
}

/// The span of the data of the header at `pos`, checked against the archive's `size`.
fn member_span(
    src: &dyn ReadAt,
    h: &Header,
    ext: &Ext,
    pos: u64,
    size: u64,
    headers: &mut usize,
    opts: WalkOptions,
) -> Result<Span> {
    let header_size = h
        .as_bytes()
        .get(124..136)
        .and_then(|f| numeric(f, true))
        .ok_or_else(|| malformed("tar size field is not plain octal or base-256", pos))?;
    let etype = h.entry_type();
    let mut len = header_size;
    if !is_extension(etype) {
        if let Some(p) = &ext.pax {
            if let Some(v) = pax_value(p, "size", pos)? {
                len = decimal(v.as_bytes()).ok_or_else(|| {
                    malformed(format!("pax size {v:?} is not a decimal number"), pos)
                })?;
            }
        }
    }
    let mut data = pos
        .checked_add(BLOCK)
        .ok_or_else(|| malformed("offset overflows", pos))?;
    if etype.is_gnu_sparse() && h.as_bytes().get(482).is_some_and(|b| *b != 0) {
        data = skip_sparse_extensions(src, data, headers, opts)?;
    }
    let end = data
        .checked_add(len)
        .ok_or_else(|| malformed("member size overflows", pos))?;
    if end > size {
        return Err(Error::truncated(format!(
            "tar member of {len} bytes at {data:#x} passes the end of the archive ({size} bytes)"
        ))
        .at(pos)
        .code("ova.truncated"));
    }
    let padded = len
        .checked_add(BLOCK - 1)
        .map(|s| s & !(BLOCK - 1))
        .ok_or_else(|| malformed("member size overflows", pos))?;
    let next = data
        .checked_add(padded)
        .ok_or_else(|| malformed("member size overflows", pos))?;
    Ok(Span { data, len, next })
}

/// Reads an extension header's records into `ext` (or, for pax global records, refuses the
/// keys that would change how later members read).
fn read_extension(
    src: &dyn ReadAt,
    budget: &Budget,
    etype: tar::EntryType,
    span: &Span,
    pos: u64,
    ext: &mut Ext,
) -> Result<()> {
    let read_ext = |cap: u64, what: &str| -> Result<Vec<u8>> {
        if span.len > cap {
            return Err(
                Error::limit(format!("{what} of {} bytes exceeds {cap}", span.len))
                    .at(pos)
                    .code("ova.tar-malformed"),
            );
        }
        // `tarfile` parses a pax header's records, and both `tarfile` and GNU tar read a GNU
        // long name, over the whole padded block: bytes after the declared length would be
        // records or name to them (a hidden `size`, a longer name), and nothing to glimpse.
        // The padding must be NUL.
        let data = span.data.saturating_add(span.len);
        let pad = span.next.saturating_sub(data).min(BLOCK);
        let mut padding = [0u8; 512];
        let padding = padding
            .get_mut(..usize::try_from(pad).unwrap_or(0))
            .unwrap_or_default();
        let got = src.read_at(padding, data)?;
        if padding
            .get(..got)
            .unwrap_or_default()
            .iter()
            .any(|b| *b != 0)
        {
            return Err(malformed(
                format!("the padding after a {what} is not NUL (other tar readers read it)"),
                pos,
            ));
        }
        crate::io::read_vec(src, span.data, span.len, budget, what)
    };
    if etype.is_gnu_longname() {
        if ext.long_name.is_some() {
            return Err(malformed("two GNU long names for one member", pos));
        }
        ext.long_name = Some(trim_nul(read_ext(MAX_NAME, "GNU long name")?));
    } else if etype.is_gnu_longlink() {
        if ext.long_link.is_some() {
            return Err(malformed("two GNU long link names for one member", pos));
        }
        ext.long_link = Some(trim_nul(read_ext(MAX_NAME, "GNU long link name")?));
    } else if etype.is_pax_local_extensions() {
        if ext.pax.is_some() {
            return Err(malformed("two pax headers for one member", pos));
        }
        let recs = read_ext(MAX_PAX, "pax header")?;
        // Validate every record now so that a malformed one fails at its header.
        pax_records(&recs, pos)?;
        ext.pax_first = ext.long_name.is_none();
        ext.pax = Some(recs);
    } else if etype.is_pax_global_extensions() {
        // Global records would silently change how later members read (a `path` or `size`
        // for all of them): a differential between tar readers. Refuse those keys.
        let recs = read_ext(MAX_PAX, "pax global header")?;
        for k in ["path", "linkpath", "size"] {
            if pax_value(&recs, k, pos)?.is_some() {
                return Err(malformed(format!("pax global header sets {k:?}"), pos));
            }
        }
        if pax_sparse(&recs, pos)?.is_some() {
            return Err(
                malformed("pax global header sets GNU.sparse keys", pos).code("ova.sparse-member")
            );
        }
    }
    Ok(())
}

/// Skips the extension blocks of an old GNU sparse header (each holds 21 more map entries and
/// an "is extended" flag at byte 504), as GNU tar and `tarfile` do, and returns where the
/// member's data starts. Each block counts as a header.
fn skip_sparse_extensions(
    src: &dyn ReadAt,
    mut at: u64,
    headers: &mut usize,
    opts: WalkOptions,
) -> Result<u64> {
    loop {
        *headers = headers.saturating_add(1);
        if *headers > opts.max_headers {
            return Err(Error::limit("too many GNU sparse extension headers")
                .at(at)
                .code("ova.too-many-members"));
        }
        let mut block = [0u8; 512];
        src.read_exact_at(&mut block, at)
            .map_err(|e| Error::from(e).context("reading a GNU sparse header").at(at))?;
        at = at
            .checked_add(BLOCK)
            .ok_or_else(|| malformed("offset overflows", at))?;
        if block.get(504).is_some_and(|b| *b == 0) {
            return Ok(at);
        }
    }
}

/// The member a header describes, with the names each reader gives it and its sparse form.
fn make_member(
    block: &[u8; 512],
    h: &Header,
    ext: Ext,
    pos: u64,
    data: u64,
    data_size: u64,
) -> Result<Member> {
    let (mut tarfile, mut gnu) = header_names(block);
    // `tarfile` turns type NUL with a header name ending in `/` into a directory, before a
    // pax path or a GNU long name renames it, and then reads its data as the next headers.
    if block.get(156) == Some(&0) && field(block.get(..100).unwrap_or_default()).ends_with(b"/") {
        return Err(malformed(
            "a member of type NUL whose header name ends in '/': tarfile reads it as a directory",
            pos,
        ));
    }
    let mut raw_name = h.path_bytes().into_owned();
    let mut link = h.link_name_bytes().map(|c| c.into_owned());
    let mut kind = MemberKind::from_type(h.entry_type());
    let mut sparse = (kind == MemberKind::Sparse).then(|| "GNU sparse (old GNU type S)".into());
    let pax = ext.pax.as_deref().unwrap_or_default();
    let pax_path = pax_value(pax, "path", pos)?.map(|v| v.as_bytes().to_vec());
    if let Some(n) = &ext.long_name {
        raw_name.clone_from(n);
        gnu.clone_from(n);
        // tarfile applies the outermost extension header last: the first one wins.
        if pax_path.is_none() || !ext.pax_first {
            tarfile.clone_from(n);
        }
    }
    if let Some(l) = ext.long_link {
        link = Some(l);
    }
    if let Some(p) = pax_path {
        if ext.long_name.is_none() || ext.pax_first {
            tarfile.clone_from(&p);
        }
        gnu.clone_from(&p);
        raw_name = p;
    }
    if let Some(v) = pax_value(pax, "linkpath", pos)? {
        link = Some(v.as_bytes().to_vec());
    }
    if let Some(form) = pax_sparse(pax, pos)? {
        kind = MemberKind::Sparse;
        sparse = Some(form);
        // Both tarfile and GNU tar name a sparse member by its GNU.sparse.name.
        if let Some(n) = pax_value(pax, "GNU.sparse.name", pos)? {
            tarfile = n.as_bytes().to_vec();
            gnu = n.as_bytes().to_vec();
        }
    }
    if [&raw_name, &tarfile, &gnu]
        .iter()
        .any(|n| n.len() as u64 > MAX_NAME)
    {
        return Err(malformed("member name too long", pos));
    }
    let link = match kind {
        MemberKind::Symlink | MemberKind::HardLink => {
            link.map(|l| String::from_utf8_lossy(&l).into_owned())
        }
        _ => None,
    };
    Ok(Member {
        name: String::from_utf8_lossy(&raw_name).into_owned(),
        tarfile_name: (tarfile != raw_name).then_some(tarfile),
        gnu_tar_name: (gnu != raw_name).then_some(gnu),
        raw_name,
        kind,
        link,
        header_offset: pos,
        offset: data,
        size: data_size,
        sparse,
    })
}

/// The value of pax record `key`, the last one winning as in POSIX.
fn pax_value<'a>(recs: &'a [u8], key: &str, at: u64) -> Result<Option<&'a str>> {
    let mut found = None;
    for (k, v) in pax_records(recs, at)? {
        if k == key.as_bytes() {
            let v = std::str::from_utf8(v)
                .map_err(|_| malformed(format!("pax {key} is not UTF-8"), at))?;
            found = Some(v);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, EntryType, &[u8])]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, t, data) in entries {
            let mut h = Header::new_gnu();
            h.set_entry_type(*t);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            if *t == EntryType::Symlink || *t == EntryType::Link {
                h.set_size(0);
                b.append_link(&mut h, name, "target").unwrap();
            } else {
                b.append_data(&mut h, name, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn walks_names_types_and_offsets() {
        let long = format!("{}.vmdk", "x".repeat(200));
        let a = archive(&[
            ("a.ovf", EntryType::Regular, b"<x/>"),
            (&long, EntryType::Regular, &[7u8; 1000]),
            ("l", EntryType::Symlink, b""),
        ]);
        let m = walk(&a, &Budget::new(1 << 20), WalkOptions::default()).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].name, "a.ovf");
        assert_eq!(m[0].offset, 512);
        assert_eq!(m[1].name, long);
        assert_eq!(m[1].size, 1000);
        assert_eq!(&a[m[1].offset as usize..][..1000], &[7u8; 1000][..]);
        assert_eq!(m[2].kind, MemberKind::Symlink);
        assert_eq!(m[2].link.as_deref(), Some("target"));
    }

    #[test]
    fn bad_checksum_and_truncation_fail() {
        let mut a = archive(&[("a.ovf", EntryType::Regular, &[1u8; 600])]);
        let good = a.clone();
        for n in 0..good.len() {
            let _ = walk(
                &good[..n].to_vec(),
                &Budget::new(1 << 20),
                WalkOptions::default(),
            );
        }
        assert_eq!(
            walk(
                &good[..700].to_vec(),
                &Budget::new(1 << 20),
                WalkOptions::default()
            )
            .unwrap_err()
            .kind(),
            crate::error::ErrorKind::Truncated
        );
        a[0] ^= 1;
        let e = walk(&a, &Budget::new(1 << 20), WalkOptions::default()).unwrap_err();
        assert_eq!(e.finding_code(), "ova.tar-malformed");
    }

    /// An old GNU sparse header followed by `ext` extension blocks, then 512 data bytes.
    fn old_sparse(ext: usize) -> Vec<u8> {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::GNUSparse);
        h.set_size(512);
        h.set_mode(0o644);
        h.as_mut_bytes()[..8].copy_from_slice(b"disk.img");
        h.as_mut_bytes()[482] = u8::from(ext > 0);
        h.set_cksum();
        let mut v = h.as_bytes().to_vec();
        for i in 0..ext {
            let mut b = [0u8; 512];
            b[504] = u8::from(i + 1 < ext);
            v.extend_from_slice(&b);
        }
        v.extend_from_slice(&[7u8; 512]);
        v.extend_from_slice(&[0u8; 1024]);
        v
    }

    #[test]
    fn old_gnu_sparse_extension_blocks_are_skipped_and_bounded() {
        for ext in [0, 1, 20] {
            let a = old_sparse(ext);
            let m = walk(&a, &Budget::new(1 << 20), WalkOptions::default()).unwrap();
            assert_eq!(m.len(), 1);
            assert_eq!(m[0].kind, MemberKind::Sparse);
            assert_eq!(m[0].offset, 512 * (1 + ext as u64), "{ext}");
            assert!(m[0].sparse.is_some());
        }
        let opts = WalkOptions {
            max_members: 10,
            max_headers: 10,
            strict: true,
        };
        let e = walk(&old_sparse(20), &Budget::new(1 << 20), opts).unwrap_err();
        assert_eq!(e.finding_code(), "ova.too-many-members");
        // Cut inside the extension blocks: an error, not a panic.
        let a = old_sparse(20);
        let e = walk(
            &a[..512 * 5].to_vec(),
            &Budget::new(1 << 20),
            WalkOptions::default(),
        );
        assert!(e.is_err());
    }

    #[test]
    fn member_cap() {
        let files: Vec<(String, EntryType, &[u8])> = (0..20)
            .map(|i| (format!("f{i}"), EntryType::Regular, &b""[..]))
            .collect();
        let refs: Vec<(&str, EntryType, &[u8])> =
            files.iter().map(|(n, t, d)| (n.as_str(), *t, *d)).collect();
        let a = archive(&refs);
        let opts = WalkOptions {
            max_members: 10,
            max_headers: 100,
            strict: true,
        };
        assert_eq!(
            walk(&a, &Budget::new(1 << 20), opts)
                .unwrap_err()
                .finding_code(),
            "ova.too-many-members"
        );
        let opts = WalkOptions {
            strict: false,
            ..opts
        };
        assert_eq!(walk(&a, &Budget::new(1 << 20), opts).unwrap().len(), 10);
    }
}
