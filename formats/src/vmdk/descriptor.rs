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
        let Ok(line) = std::str::from_utf8(raw) else {
            d.errors.push(SyntaxError {
                at,
                message: "line is not UTF-8 text".into(),
            });
            continue;
        };
        if line.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            d.errors.push(SyntaxError {
                at,
                message: "line holds control characters".into(),
            });
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(ext) = parse_extent(line, at) {
            match ext {
                Ok(e) if d.extents.len() < MAX_EXTENTS => d.extents.push(e),
                Ok(_) => d.errors.push(SyntaxError {
                    at,
                    message: format!("more than {MAX_EXTENTS} extents"),
                }),
                Err(m) => d.errors.push(SyntaxError {
                    at,
                    message: format!("bad extent line {line:?}: {m}"),
                }),
            }
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            d.errors.push(SyntaxError {
                at,
                message: format!("unrecognised line {line:?}"),
            });
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty()
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            d.errors.push(SyntaxError {
                at,
                message: format!("bad key {k:?}"),
            });
            continue;
        }
        let value = match unquote(v) {
            Some(inner) if !inner.contains('"') => inner,
            Some(_) => {
                d.errors.push(SyntaxError {
                    at,
                    message: format!("value of {k} has stray quotes"),
                });
                continue;
            }
            None if v.contains('"') => {
                d.errors.push(SyntaxError {
                    at,
                    message: format!("value of {k} has unbalanced quotes"),
                });
                continue;
            }
            None => v,
        };
        let dup = |d: &mut Descriptor| {
            d.errors.push(SyntaxError {
                at,
                message: format!("{k} is given twice"),
            })
        };
        match k {
            "version" => {
                if d.version.is_some() {
                    dup(&mut d);
                } else if !VERSIONS.contains(&value) {
                    d.errors.push(SyntaxError {
                        at,
                        message: format!("descriptor version {value:?}"),
                    });
                } else {
                    d.version = Some(value.to_string());
                }
            }
            "CID" | "parentCID" => {
                let Some(cid) = parse_cid(value) else {
                    d.errors.push(SyntaxError {
                        at,
                        message: format!("{k} {value:?} is not a 32-bit hex number"),
                    });
                    continue;
                };
                let slot = if k == "CID" {
                    &mut d.cid
                } else {
                    &mut d.parent_cid
                };
                if slot.is_some() {
                    dup(&mut d);
                } else {
                    *slot = Some(cid);
                }
            }
            "createType" => {
                if d.create_type.is_some() {
                    dup(&mut d);
                } else {
                    d.create_type = Some(value.to_string());
                }
            }
            "parentFileNameHint" => {
                if d.parent_hint.is_some() {
                    dup(&mut d);
                } else {
                    d.parent_hint = Some(value.to_string());
                    d.parent_hint_at = Some(at);
                }
            }
            _ => {
                if d.keys.insert(k.to_string(), value.to_string()).is_some() {
                    dup(&mut d);
                }
            }
        }
    }
    if d.version.is_none() {
        d.errors.push(SyntaxError {
            at: base,
            message: "descriptor has no version line".into(),
        });
    }
    // qemu refuses to open a descriptor without CID and parentCID.
    if d.cid.is_none() {
        d.errors.push(SyntaxError {
            at: base,
            message: "descriptor has no CID".into(),
        });
    }
    if d.parent_cid.is_none() {
        d.errors.push(SyntaxError {
            at: base,
            message: "descriptor has no parentCID".into(),
        });
    }
    d
}

/// True when `head` looks like a text descriptor: text only, and either the customary first
/// line or a `createType=` line among its first lines, with a `version=` line (what qemu's
/// probe keys on).
pub fn looks_like_descriptor(head: &[u8]) -> bool {
    let window = head.get(..head.len().min(4096)).unwrap_or_default();
    // qemu-img pads a descriptor file with NUL bytes to a whole sector: the text ends at the
    // first NUL, and only NULs may follow it.
    let text_end = window.iter().position(|&b| b == 0).unwrap_or(window.len());
    let (window, pad) = window.split_at(text_end);
    if pad.iter().any(|&b| b != 0) {
        return false;
    }
    if window.is_empty()
        || window
            .iter()
            .any(|&b| b == 0 || (b.is_ascii_control() && !b"\r\n\t".contains(&b)))
    {
        return false;
    }
    if window.starts_with(b"# Disk DescriptorFile") {
        return true;
    }
    let mut create = false;
    let mut version = false;
    for line in window.split(|&b| b == b'\n').take(64) {
        let l = line.trim_ascii();
        let key = l
            .split(|&b| b == b'=')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        create |= key == b"createType" && l.contains(&b'=');
        version |= key == b"version" && l.contains(&b'=');
    }
    create && version
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
