//! The text descriptor: embedded in a sparse file (sector 1 by convention) or a file of its
//! own (monolithicFlat, twoGbMaxExtent*, vmfs...).
//!
//! Parsed line by line. Every line must be a comment, blank, `key = value`, or an extent line
//! `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`; anything else is recorded as a syntax error so
//! that a line qemu or VMware might read differently never passes silently.

use std::collections::BTreeMap;

/// Largest descriptor accepted, in bytes. qemu reads at most 1 MiB - 1 of a descriptor file.
pub const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Most extent lines accepted. Real descriptors have one, or one per 2 GiB of disk.
pub const MAX_EXTENTS: usize = 4096;

/// `version` values VMware writes (qemu's probe accepts exactly these).
const VERSIONS: [&str; 3] = ["1", "2", "3"];

/// Extent types that name a file.
const FILE_TYPES: [&str; 7] = [
    "FLAT",
    "SPARSE",
    "VMFS",
    "VMFSSPARSE",
    "VMFSRDM",
    "VMFSRAW",
    "SESPARSE",
];
/// Extent types qemu opens (and counts in the virtual size).
const QEMU_TYPES: [&str; 5] = ["FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"];

/// One extent line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentLine {
    /// `RW`, `RDONLY` or `NOACCESS`.
    pub access: String,
    /// Size of the extent's guest data, in sectors.
    pub sectors: u64,
    /// Extent type (`SPARSE`, `FLAT`, `ZERO`, `VMFS`, ...).
    pub kind: String,
    /// The file it names (absent for `ZERO`).
    pub file: Option<String>,
    /// Start of the data in a flat file, in sectors.
    pub offset: Option<u64>,
    /// Byte offset of the line in the source.
    pub at: u64,
}

impl ExtentLine {
    /// True when qemu would open this extent and count its sectors in the virtual size.
    pub fn counted_by_qemu(&self) -> bool {
        self.access == "RW" && self.sectors > 0 && QEMU_TYPES.contains(&self.kind.as_str())
    }
}

/// A syntax problem: the line's byte offset and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// Byte offset of the line in the source.
    pub at: u64,
    /// Explanation.
    pub message: String,
}

/// A parsed descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// `version`.
    pub version: Option<String>,
    /// `CID`: content id of this link, 32-bit hex.
    pub cid: Option<u32>,
    /// `parentCID`: content id of the parent, `ffffffff` when there is none.
    pub parent_cid: Option<u32>,
    /// `createType`.
    pub create_type: Option<String>,
    /// `parentFileNameHint`: the parent's file name.
    pub parent_hint: Option<String>,
    /// Byte offset of the `parentFileNameHint` line.
    pub parent_hint_at: Option<u64>,
    /// Extent lines in order.
    pub extents: Vec<ExtentLine>,
    /// Every other `key = value` pair (`ddb.*`, `encoding`, ...), values unquoted.
    pub keys: BTreeMap<String, String>,
    /// Lines that could not be read.
    pub errors: Vec<SyntaxError>,
}

/// The descriptor text inside `area`: up to the first NUL, as every reader stops there.
pub fn text_of(area: &[u8]) -> &[u8] {
    let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    area.get(..end).unwrap_or_default()
}

/// Strips one pair of surrounding double quotes.
fn unquote(v: &str) -> Option<&str> {
    v.strip_prefix('"')?.strip_suffix('"')
}

/// Parses a 32-bit hex content id.
fn parse_cid(v: &str) -> Option<u32> {
    let v = v.trim();
    if v.is_empty() || v.len() > 8 {
        return None;
    }
    u32::from_str_radix(v, 16).ok()
}

/// Parses an extent line; `None` when the line does not start with an access word.
fn parse_extent(line: &str, at: u64) -> Option<Result<ExtentLine, String>> {
    let (access, rest) = line.split_once(char::is_whitespace)?;
    if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
        return None;
    }
    Some((|| {
        let rest = rest.trim_start();
        let (sectors, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let sectors: u64 = sectors
            .parse()
            .map_err(|_| format!("extent size {sectors:?} is not a number"))?;
        let rest = rest.trim_start();
        let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!("extent type {kind:?} is not valid"));
        }
        let rest = rest.trim();
        let (file, offset) = if rest.is_empty() {
            (None, None)
        } else {
            let body = rest
                .strip_prefix('"')
                .ok_or("extent file name is not quoted")?;
            let close = body.find('"').ok_or("extent file name is not closed")?;
            let name = body.get(..close).unwrap_or_default();
            let tail = body
                .get(close.saturating_add(1)..)
                .unwrap_or_default()
                .trim();
            let offset = if tail.is_empty() {
                None
            } else {
                Some(
                    tail.parse::<u64>()
                        .map_err(|_| format!("extent offset {tail:?} is not a number"))?,
                )
            };
            (Some(name.to_string()), offset)
        };
        if kind == "ZERO" {
            if file.is_some() {
                return Err("a ZERO extent names no file".into());
            }
        } else if FILE_TYPES.contains(&kind) {
            if file.is_none() {
                return Err(format!("a {kind} extent must name a file"));
            }
            // qemu insists on an offset for FLAT and refuses one elsewhere except VMFS=0.
            if kind == "FLAT" && offset.is_none() {
                return Err("a FLAT extent needs an offset".into());
            }
            if kind != "FLAT" && offset.is_some() {
                return Err(format!("a {kind} extent takes no offset"));
            }
        } else {
            return Err(format!("unknown extent type {kind:?}"));
        }
        Ok(ExtentLine {
            access: access.to_string(),
            sectors,
            kind: kind.to_string(),
            file,
            offset,
            at,
        })
    })())
}

/// Parses descriptor `text` found at byte `base` of the source.
///
/// Never fails: problems are collected in [`Descriptor::errors`].
pub fn parse(text: &[u8], base: u64) -> Descriptor {
    let mut d = Descriptor::default();
    let mut pos = 0u64;
    for raw in text.split(|&b| b == b'\n') {
        let at = base.saturating_add(pos);
        pos = pos.saturating_add(raw.len() as u64).saturating_add(1);
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if let Err(message) = parse_line(&mut d, raw, at) {
            d.errors.push(SyntaxError { at, message });
        }
    }
    required_keys(&mut d, base);
    d
}

/// One line at byte `at`: blank, a comment, an extent or a `key = value` pair.
fn parse_line(d: &mut Descriptor, raw: &[u8], at: u64) -> Result<(), String> {
    let line = std::str::from_utf8(raw).map_err(|_| "line is not UTF-8 text".to_string())?;
    if line.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err("line holds control characters".into());
    }
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(());
    }
    if let Some(ext) = parse_extent(line, at) {
        return match ext {
            Ok(e) if d.extents.len() < MAX_EXTENTS => {
                d.extents.push(e);
                Ok(())
            }
            Ok(_) => Err(format!("more than {MAX_EXTENTS} extents")),
            Err(m) => Err(format!("bad extent line {line:?}: {m}")),
        };
    }
    let (k, value) = key_value(line)?;
    set_key(d, k, value, at)
}

/// Splits `key = value`, checking the key's characters and the value's quotes.
fn key_value(line: &str) -> Result<(&str, &str), String> {
    let Some((k, v)) = line.split_once('=') else {
        return Err(format!("unrecognised line {line:?}"));
    };
    let (k, v) = (k.trim(), v.trim());
    if k.is_empty()
        || !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!("bad key {k:?}"));
    }
    match unquote(v) {
        Some(inner) if !inner.contains('"') => Ok((k, inner)),
        Some(_) => Err(format!("value of {k} has stray quotes")),
        None if v.contains('"') => Err(format!("value of {k} has unbalanced quotes")),
        None => Ok((k, v)),
    }
}

/// Records key `k` (at byte `at`); a key given twice is an error (a known key keeps its
/// first value).
fn set_key(d: &mut Descriptor, k: &str, value: &str, at: u64) -> Result<(), String> {
    let dup = || Err(format!("{k} is given twice"));
    match k {
        "version" => {
            if d.version.is_some() {
                return dup();
            }
            if !VERSIONS.contains(&value) {
                return Err(format!("descriptor version {value:?}"));
            }
            d.version = Some(value.to_string());
        }
        "CID" | "parentCID" => {
            let cid = parse_cid(value)
                .ok_or_else(|| format!("{k} {value:?} is not a 32-bit hex number"))?;
            let slot = if k == "CID" {
                &mut d.cid
            } else {
                &mut d.parent_cid
            };
            if slot.is_some() {
                return dup();
            }
            *slot = Some(cid);
        }
        "createType" => {
            if d.create_type.is_some() {
                return dup();
            }
            d.create_type = Some(value.to_string());
        }
        "parentFileNameHint" => {
            if d.parent_hint.is_some() {
                return dup();
            }
            d.parent_hint = Some(value.to_string());
            d.parent_hint_at = Some(at);
        }
        _ => {
            if d.keys.insert(k.to_string(), value.to_string()).is_some() {
                return dup();
            }
        }
    }
    Ok(())
}

/// The keys a descriptor must have: qemu refuses to open one without CID and parentCID.
fn required_keys(d: &mut Descriptor, base: u64) {
    for (missing, message) in [
        (d.version.is_none(), "descriptor has no version line"),
        (d.cid.is_none(), "descriptor has no CID"),
        (d.parent_cid.is_none(), "descriptor has no parentCID"),
    ] {
        if missing {
            d.errors.push(SyntaxError {
                at: base,
                message: message.into(),
            });
        }
    }
}

/// C's `isspace`: what `sscanf` skips between conversions.
fn c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// qemu's `vmdk_probe` on a text file: skipping `#` comment lines (whatever bytes they
/// hold) and lines of spaces, the first other line is `version=1|2|3` ended by `\n` or
/// `\r\n`. Linear in `buf`.
pub fn qemu_probe(buf: &[u8]) -> bool {
    let mut rest = buf;
    loop {
        match rest.first() {
            None => return false,
            Some(b'#') => match rest.iter().position(|&b| b == b'\n') {
                Some(nl) => rest = rest.get(nl.saturating_add(1)..).unwrap_or_default(),
                None => return false,
            },
            Some(b' ') => {
                let spaces = rest.iter().take_while(|&&b| b == b' ').count();
                let after = rest.get(spaces..).unwrap_or_default();
                let after = after.strip_prefix(b"\r").unwrap_or(after);
                match after.strip_prefix(b"\n") {
                    Some(next) => rest = next,
                    None => return false,
                }
            }
            Some(_) => {
                return VERSIONS.iter().any(|v| {
                    let line = rest
                        .strip_prefix(b"version=")
                        .and_then(|r| r.strip_prefix(v.as_bytes()));
                    line.is_some_and(|r| r.starts_with(b"\n") || r.starts_with(b"\r\n"))
                })
            }
        }
    }
}

/// True when `head` looks like a text descriptor: what qemu's probe claims
/// ([`qemu_probe`]), or, in the text up to the first NUL, the customary first line or both
/// a `createType` and a `version` key on lines of their own.
///
/// A superset of qemu's probe: control characters, binary bytes after a NUL and long runs
/// of comments do not hide a descriptor. Linear in `head`, which the caller bounds.
pub fn looks_like_descriptor(head: &[u8]) -> bool {
    if qemu_probe(head) {
        return true;
    }
    let text = text_of(head);
    if text.is_empty() {
        return false;
    }
    if text.starts_with(b"# Disk DescriptorFile") {
        return true;
    }
    let mut create = false;
    let mut version = false;
    for line in text.split(|&b| b == b'\n') {
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            continue;
        };
        let key = line.get(..eq).unwrap_or_default().trim_ascii();
        create |= key == b"createType";
        version |= key == b"version";
        if create && version {
            return true;
        }
    }
    false
}

/// An extent line as a lenient reader (qemu's `sscanf`, VMware) could take it, whether or
/// not [`parse`] accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LooseExtent {
    /// Byte offset of the line in the source.
    pub at: u64,
    /// The access word (`RW`, `RDONLY`, `NOACCESS`, in any case).
    pub access: String,
    /// The file name between the first quote and the next quote, CR or end of line.
    pub file: String,
}

/// Reads `line` as qemu's `vmdk_parse_extents` does, loosely: an access word after any C
/// whitespace, and a quoted file name somewhere after it.
fn loose_extent(line: &[u8], at: u64) -> Option<LooseExtent> {
    let start = line.iter().position(|&b| !c_space(b))?;
    let rest = line.get(start..)?;
    let end = rest.iter().position(|&b| c_space(b)).unwrap_or(rest.len());
    let access = rest.get(..end)?;
    if !["RW", "RDONLY", "NOACCESS"]
        .iter()
        .any(|a| access.eq_ignore_ascii_case(a.as_bytes()))
    {
        return None;
    }
    let quote = rest.iter().position(|&b| b == b'"')?;
    let name = rest.get(quote.checked_add(1)?..)?;
    let close = name
        .iter()
        .position(|&b| matches!(b, b'"' | b'\r'))
        .unwrap_or(name.len());
    Some(LooseExtent {
        at,
        access: String::from_utf8_lossy(access).into_owned(),
        file: String::from_utf8_lossy(name.get(..close)?).into_owned(),
    })
}

/// The extent lines qemu's `vmdk_parse_extents` reads with
/// `sscanf(p, "%10s %ld %10s \"%511[^\n\r\"]\"")` from each line start of `text` (a C
/// string: up to its first NUL): access `RW`, a type that names a file, a non-empty name.
/// `sscanf` skips whitespace across line breaks, so an extent may be split over lines.
/// Returns (offset of the line holding the access word, file name), at most `max`. Whitespace runs skipped
/// from a line start are remembered, so each byte is scanned a bounded number of times.
pub fn qemu_rw_extents(text: &[u8], max: usize) -> Vec<(usize, &[u8])> {
    let text = text.split(|&b| b == 0).next().unwrap_or_default();
    let skip = |mut i: usize| {
        while text.get(i).copied().is_some_and(c_space) {
            i = i.saturating_add(1);
        }
        i
    };
    // A run of at most `max` non-space bytes from `i`.
    let token = |i: usize, max: usize| {
        let mut j = i;
        while j.saturating_sub(i) < max && text.get(j).is_some_and(|&b| !c_space(b)) {
            j = j.saturating_add(1);
        }
        j
    };
    let mut out = Vec::new();
    let mut skipped_to: Option<usize> = None;
    let mut start = 0usize;
    while start < text.len() && out.len() < max {
        let line = start;
        start = text
            .get(line..)
            .and_then(|t| t.iter().position(|&b| b == b'\n'))
            .map_or(text.len(), |nl| line.saturating_add(nl).saturating_add(1));
        if skipped_to.is_some_and(|s| line <= s) {
            continue; // an earlier line start already skipped to the same token
        }
        let a = skip(line);
        skipped_to = Some(a);
        let a_end = token(a, 10);
        if text.get(a..a_end) != Some(&b"RW"[..]) {
            continue;
        }
        let mut n = skip(a_end);
        if matches!(text.get(n), Some(b'+' | b'-')) {
            n = n.saturating_add(1);
        }
        let digits = text
            .get(n..)
            .unwrap_or_default()
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            continue;
        }
        let t = skip(n.saturating_add(digits));
        let t_end = token(t, 10);
        let kind = text.get(t..t_end).unwrap_or_default();
        if !matches!(
            kind,
            b"FLAT" | b"SPARSE" | b"VMFS" | b"VMFSSPARSE" | b"SESPARSE"
        ) {
            continue;
        }
        let q = skip(t_end);
        if text.get(q) != Some(&b'"') {
            continue;
        }
        let name = text.get(q.saturating_add(1)..).unwrap_or_default();
        let len = name
            .iter()
            .take(511)
            .take_while(|&&b| !matches!(b, b'\n' | b'\r' | b'"'))
            .count();
        if let Some(file) = name.get(..len).filter(|f| !f.is_empty()) {
            // Reported at the line the access word is on (a blank line before it is
            // read through by the same sscanf).
            let on = text
                .get(..a)
                .and_then(|t| t.iter().rposition(|&b| b == b'\n'))
                .map_or(0, |nl| nl.saturating_add(1));
            out.push((on, file));
        }
    }
    out
}

/// Every line of `text` (found at byte `base`) that a lenient reader could take as an
/// extent naming a file but [`parse`] did not turn into an [`ExtentLine`]: each is another
/// file qemu or VMware may open. At most [`MAX_EXTENTS`] are returned.
pub fn loose_extents(text: &[u8], base: u64, parsed: &[ExtentLine]) -> Vec<LooseExtent> {
    let known: std::collections::BTreeSet<u64> = parsed.iter().map(|e| e.at).collect();
    let mut out = Vec::new();
    let mut pos = 0u64;
    for raw in text.split(|&b| b == b'\n') {
        let at = base.saturating_add(pos);
        pos = pos.saturating_add(raw.len() as u64).saturating_add(1);
        if known.contains(&at) {
            continue;
        }
        if let Some(e) = loose_extent(raw, at) {
            if out.len() >= MAX_EXTENTS {
                break;
            }
            out.push(e);
        }
    }
    // An extent qemu's sscanf reads across line breaks (`RW\n2048\nFLAT\n"f"`).
    for (line, file) in qemu_rw_extents(text, MAX_EXTENTS) {
        let at = base.saturating_add(line as u64);
        if out.len() >= MAX_EXTENTS {
            break;
        }
        if known.contains(&at) || out.iter().any(|e| e.at == at) {
            continue;
        }
        out.push(LooseExtent {
            at,
            access: "RW".to_string(),
            file: String::from_utf8_lossy(file).into_owned(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: &str = "# Disk DescriptorFile\nversion=1\nCID=3b74be4f\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\n\n# Extent description\nRW 10240 SPARSE \"s.vmdk\"\n\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n";

    #[test]
    fn parses_qemu_descriptor() {
        let d = parse(QEMU.as_bytes(), 512);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.cid, Some(0x3b74be4f));
        assert_eq!(d.parent_cid, Some(0xffffffff));
        assert_eq!(d.create_type.as_deref(), Some("monolithicSparse"));
        assert_eq!(d.extents.len(), 1);
        assert_eq!(d.extents[0].file.as_deref(), Some("s.vmdk"));
        assert_eq!(d.extents[0].sectors, 10240);
        assert_eq!(
            d.keys.get("ddb.adapterType").map(String::as_str),
            Some("ide")
        );
        assert!(looks_like_descriptor(QEMU.as_bytes()));
        assert!(!looks_like_descriptor(b"hello world\n"));
    }

    #[test]
    fn probe_is_a_superset_of_qemus() {
        let comments = "# comment\n".repeat(500);
        for yes in [
            "version=1\n".to_string(),
            "version=3\r\n".to_string(),
            format!("# a\x01b\x00c\n   \n  \r\n{comments}version=2\nRW 1 FLAT \"/x\" 0\n"),
            format!("version=1\n{comments}createType=\"monolithicFlat\"\n"),
            "x=1\ncreateType = \"vmfs\"\n\x01\nversion = 1\n\0\x01\x02binary".to_string(),
        ] {
            assert!(looks_like_descriptor(yes.as_bytes()), "{yes:?}");
        }
        assert!(qemu_probe(b"# c\n  \nversion=1\n"));
        for no in [
            "version=4\n",
            "\nversion=1\n",
            "\tversion=1\n",
            "# only a comment",
            "version=1",
        ] {
            assert!(!qemu_probe(no.as_bytes()), "{no:?}");
        }
        assert!(!looks_like_descriptor(b"createType=\"x\"\n\0version=1\n"));
    }

    #[test]
    fn extents_split_over_lines_are_read_as_qemu_reads_them() {
        // report refs-diff F4: qemu's sscanf skips whitespace across line breaks.
        let text = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW\n2048\nFLAT\n\"/v/base.raw\"\n0\n";
        let d = parse(text, 0);
        let loose = loose_extents(text, 0, &d.extents);
        assert!(
            loose
                .iter()
                .any(|e| e.file == "/v/base.raw" && e.access == "RW"),
            "{loose:?}"
        );
        assert_eq!(
            qemu_rw_extents(b"RW 1 FLAT \"a\" 0\n\0RW 1 FLAT \"b\"", 9),
            [(0, &b"a"[..])]
        );
        assert!(
            qemu_rw_extents(b"RW 1 ZERO \"a\"\nRDONLY 1 FLAT \"b\"\nRW 1 FLAT \"\"", 9).is_empty()
        );
        // Linear: a MiB of line breaks after RW tokens.
        let mut big = b"RW".to_vec();
        big.extend(vec![b'\n'; 1 << 20]);
        assert!(qemu_rw_extents(&big, 9).is_empty());
    }

    #[test]
    fn loose_extents_catch_what_parse_refuses() {
        let text = b"version=1\nRW 10 FLAT \"/etc/passwd\" 0 trailing\n\x0bRW 5 FLAT\"/a\" 0\nrdonly 1 SPARSE \"b\r\nRW 1 FLAT \"ok\" 0\nRW 1 ZERO\n";
        let d = parse(text, 100);
        let loose = loose_extents(text, 100, &d.extents);
        let files: Vec<&str> = loose.iter().map(|e| e.file.as_str()).collect();
        assert_eq!(files, ["/etc/passwd", "/a", "b"]);
        assert_eq!(loose[0].at, 110);
        assert_eq!(d.extents.len(), 2);
    }

    #[test]
    fn records_syntax_errors() {
        for bad in [
            "RW ten SPARSE \"a\"",
            "RW 10 FLAT \"a\"",
            "RW 10 SPARSE \"a",
            "RW 10 BOGUS \"a\"",
            "garbage line",
            "CID=xyz",
            "createType=\"a\"b\"",
            "version=1",
        ] {
            let text = format!("version=1\nCID=1\nparentCID=ffffffff\n{bad}\n");
            assert!(!parse(text.as_bytes(), 0).errors.is_empty(), "{bad}");
        }
        let d = parse(b"version=1\nCID=1\nparentCID=ffffffff\nRW 6144 FLAT \"f-flat.vmdk\" 0\nRDONLY 5 ZERO\n", 0);
        assert!(d.errors.is_empty(), "{:?}", d.errors);
        assert_eq!(d.extents[0].offset, Some(0));
        assert!(d.extents[0].counted_by_qemu() && !d.extents[1].counted_by_qemu());
    }
}
