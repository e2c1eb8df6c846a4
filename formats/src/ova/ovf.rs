//! The OVF descriptor: an XML envelope naming files, disks and the virtual hardware.
//!
//! Parsed with roxmltree, which never expands external entities; DTDs are refused outright
//! (`allow_dtd = false`) and the node count is capped, so an entity bomb or a huge tree cannot
//! cost more than the bounded descriptor itself.

use serde::Serialize;

use crate::error::{Error, Result};

/// Largest descriptor accepted, in bytes.
pub const MAX_DESCRIPTOR: u64 = 16 << 20;
/// XML nodes (elements, text, comments) a descriptor may have. Real descriptors have a few
/// hundred to a few thousand; roxmltree holds about 70 bytes a node (1,000,000 `<a/>` took
/// 77 MB), so this bounds the tree to some 20 MB.
pub const MAX_NODES: u32 = 250_000;
/// Entries kept per list (files, systems).
const MAX_ITEMS: usize = 10_000;
/// Elements may nest this deep (real descriptors nest about 6 deep). roxmltree parses nested
/// elements by recursion, so a descriptor nested tens of thousands deep would overflow the
/// stack, which aborts the process: the depth is bounded before roxmltree sees the text.
pub const MAX_DEPTH: usize = 64;
/// Attributes one element may carry (real descriptors use fewer than ten). roxmltree compares
/// each with every earlier one of its element: 80,000 on one element took 10 s.
pub const MAX_ATTRIBUTES: usize = 64;
/// Namespace declarations a descriptor may make (real ones make about ten, on the Envelope).
/// roxmltree copies every namespace in scope into each element that declares one, checking
/// each copy against the list so far: cubic in the declarations (2,500 took 30-44 s).
pub const MAX_NAMESPACES: usize = 128;
/// Attributes (namespace declarations included) a whole descriptor may carry. Real ones
/// carry at most a few thousand; roxmltree holds about 70 bytes for each, which the node cap
/// does not count (63 attributes on each of 50,521 elements took 242 MB), so this bounds
/// them to some 7 MB.
pub const MAX_DOCUMENT_ATTRIBUTES: usize = 100_000;
/// `<` and `=` characters a descriptor may hold anywhere (comments, text and values included):
/// roxmltree reserves room for a node per `<` and an attribute per `=` before it parses.
pub const MAX_MARKS: usize = 1_000_000;
/// Disks a descriptor may list: each is opened and checked, so keep the work modest. Real
/// appliances have a handful.
pub const MAX_DISKS: usize = 256;

/// `References/File`: one file of the package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileRef {
    /// `ovf:id`.
    pub id: String,
    /// `ovf:href`: a URI, relative to the descriptor.
    pub href: String,
    /// `ovf:size`: the file's size as stored, in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// `ovf:compression`: `identity` (none) or `gzip`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// `ovf:chunkSize`: the file is split into parts of this many bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<u64>,
}

/// `DiskSection/Disk`: one virtual disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskDesc {
    /// `ovf:diskId`.
    pub disk_id: String,
    /// `ovf:fileRef`: the `File` id holding the disk; absent for a blank disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_ref: Option<String>,
    /// `ovf:capacity` as written (in `capacity_units`).
    pub capacity_raw: String,
    /// `ovf:capacityAllocationUnits`, e.g. `byte * 2^30`; bytes when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_units: Option<String>,
    /// The capacity in bytes, when it could be computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// `ovf:format`: a URL naming the disk format.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_url: Option<String>,
    /// `ovf:populatedSize`: bytes of the disk actually in use, an estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub populated_size: Option<u64>,
}

impl DiskDesc {
    /// A short name for the format URL: `vmdk streamOptimized`, `qcow2`, ... or the URL.
    pub fn format_name(&self) -> Option<String> {
        self.format_url.as_deref().map(format_name)
    }

    /// The glimpse format the URL names, when it names one.
    pub fn declared_format(&self) -> Option<crate::format::Format> {
        let url = self.format_url.as_deref()?.to_ascii_lowercase();
        if url.contains("vmdk") {
            Some(crate::format::Format::Vmdk)
        } else if url.contains("qcow") {
            Some(crate::format::Format::Qcow2)
        } else if url.contains("vhdx") {
            Some(crate::format::Format::Vhdx)
        } else if url.contains("vhd") {
            Some(crate::format::Format::Vhd)
        } else if url.contains("vdi") {
            Some(crate::format::Format::Vdi)
        } else {
            None
        }
    }
}

/// The short name of a disk format URL.
pub fn format_name(url: &str) -> String {
    let lower = url.to_ascii_lowercase();
    let frag = url.rsplit_once('#').map(|(_, f)| f);
    if lower.contains("vmdk") {
        match frag {
            Some(f) if !f.is_empty() => format!("vmdk {f}"),
            _ => "vmdk".to_string(),
        }
    } else if lower.contains("qcow") {
        "qcow2".to_string()
    } else {
        url.to_string()
    }
}

/// One `VirtualSystem`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VirtualSystem {
    /// `ovf:id`.
    pub id: String,
    /// The `Name` element, or the id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `OperatingSystemSection/@ovf:id`: the CIM operating system number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_id: Option<String>,
    /// The OS type: `vmw:osType`, else the section's `Description`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_type: Option<String>,
    /// Virtual CPUs: `VirtualQuantity` of the `ResourceType` 3 item.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u64>,
    /// Memory in bytes: `VirtualQuantity` × `AllocationUnits` of the `ResourceType` 4 item.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
}

/// What the descriptor says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Descriptor {
    /// `References/File`, in order.
    pub files: Vec<FileRef>,
    /// `DiskSection/Disk`, in order.
    pub disks: Vec<DiskDesc>,
    /// Every `VirtualSystem` (nested in a collection or not).
    pub systems: Vec<VirtualSystem>,
    /// Problems that do not stop parsing (unknown capacity units, ...): message only.
    #[serde(skip)]
    pub problems: Vec<String>,
}

impl Descriptor {
    /// The `File` with id `id`.
    pub fn file(&self, id: &str) -> Option<&FileRef> {
        self.files.iter().find(|f| f.id == id)
    }
}

fn attr<'a>(n: roxmltree::Node<'a, '_>, local: &str) -> Option<&'a str> {
    n.attributes()
        .find(|a| a.name() == local)
        .map(|a| a.value())
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, local: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == local)
}

fn node_text(n: roxmltree::Node<'_, '_>) -> Option<String> {
    n.text()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Multiplier of a DSP0004 programmatic unit such as `byte * 2^30`, `byte * 1024`,
/// `byte * 10^3`, or the older names VirtualBox writes (`MegaBytes`, `GigaBytes`).
pub fn unit_multiplier(units: &str) -> Option<u64> {
    let u: String = units.chars().filter(|c| !c.is_whitespace()).collect();
    let named = match u.to_ascii_lowercase().as_str() {
        "" | "byte" | "bytes" => Some(1),
        "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabytes" | "gb" | "gib" => Some(1 << 30),
        "terabytes" | "tb" | "tib" => Some(1u64 << 40),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let rest = u.strip_prefix("byte*")?;
    if let Some((base, exp)) = rest.split_once('^') {
        let base: u64 = base.parse().ok()?;
        let exp: u32 = exp.parse().ok()?;
        base.checked_pow(exp)
    } else {
        rest.parse().ok()
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// Parses a descriptor.
///
/// # Errors
/// `Invalid` (`ova.descriptor-malformed`) for text that is not UTF-8, not well-formed XML, has
/// a DTD, is not an OVF `Envelope`, or declares an unusable number; `LimitExceeded` when the
/// descriptor is larger than [`MAX_DESCRIPTOR`] or has too many nodes or entries.
///
/// # Security
/// No DTD, no entity expansion, bounded nodes and lists.
pub fn parse(bytes: &[u8]) -> Result<Descriptor> {
    if bytes.len() as u64 > MAX_DESCRIPTOR {
        return Err(Error::limit(format!(
            "descriptor of {} bytes exceeds {MAX_DESCRIPTOR}",
            bytes.len()
        ))
        .code("ova.descriptor-malformed"));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| malformed(format!("descriptor is not UTF-8: {e}")))?;
    let bounds = crate::xml::Bounds {
        depth: MAX_DEPTH,
        attributes: MAX_ATTRIBUTES,
        namespaces: MAX_NAMESPACES,
        total_attributes: MAX_DOCUMENT_ATTRIBUTES,
    };
    if let Some(excess) = crate::xml::exceeds(bytes, bounds) {
        use crate::xml::Excess;
        return Err(malformed(match excess {
            Excess::Depth => format!("descriptor elements nest deeper than {MAX_DEPTH}"),
            Excess::Attributes => {
                format!("a descriptor element has more than {MAX_ATTRIBUTES} attributes")
            }
            Excess::Namespaces => {
                format!("the descriptor declares more than {MAX_NAMESPACES} XML namespaces")
            }
            Excess::TotalAttributes => format!(
                "the descriptor carries more than {MAX_DOCUMENT_ATTRIBUTES} attributes in all"
            ),
        }));
    }
    // roxmltree reserves a node for every `<` of the text and an attribute for every `=`
    // (its guess of their number) before it parses: those in comments, text and values too.
    let marks = |c: u8| bytes.iter().filter(|b| **b == c).count();
    if marks(b'<') > MAX_MARKS || marks(b'=') > MAX_MARKS {
        return Err(malformed(format!(
            "the descriptor holds more than {MAX_MARKS} '<' or '=' characters"
        )));
    }
    let opts = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
    };
    let doc = roxmltree::Document::parse_with_options(text, opts)
        .map_err(|e| malformed(format!("descriptor is not well-formed XML: {e}")))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Envelope" {
        return Err(malformed(format!(
            "descriptor root is <{}>, not <Envelope>",
            root.tag_name().name()
        )));
    }
    let mut d = Descriptor {
        files: read_files(root)?,
        ..Descriptor::default()
    };
    d.disks = read_disks(root, &mut d.problems)?;
    for vs in elements(root.descendants(), "VirtualSystem") {
        if d.systems.len() >= MAX_ITEMS {
            return Err(too_many("virtual systems"));
        }
        d.systems.push(read_system(vs));
    }
    Ok(d)
}

/// Refuses an element that carries two attributes of one local name (`ovf:href` and
/// `x:href`): a reader that matches by local name and one that matches the OVF namespace
/// would take different values.
fn unique_attributes(n: roxmltree::Node<'_, '_>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for a in n.attributes() {
        if !seen.insert(a.name()) {
            return Err(malformed(format!(
                "<{}> has two {:?} attributes (in different namespaces)",
                n.tag_name().name(),
                a.name()
            )));
        }
    }
    Ok(())
}

fn malformed(m: String) -> Error {
    Error::invalid(m).code("ova.descriptor-malformed")
}

fn too_many(what: &str) -> Error {
    Error::limit(format!("descriptor lists more than {MAX_ITEMS} {what}"))
        .code("ova.descriptor-malformed")
}

/// The elements among `nodes` whose local name is `local`.
fn elements<'a, 'i: 'a>(
    nodes: impl Iterator<Item = roxmltree::Node<'a, 'i>>,
    local: &'a str,
) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    nodes.filter(move |n| n.is_element() && n.tag_name().name() == local)
}

/// `References`: one entry per `File`. Glance reads the last `References` element at any
/// depth, every child of it, and the last `File` with an id, all by local name; glimpse reads
/// the one `References` of the `Envelope`. So that both read the same files, a second
/// `References` anywhere (in any namespace), one elsewhere than under the `Envelope`, a child
/// that is not a `File`, and two `File`s with one id are refused.
fn read_files(root: roxmltree::Node<'_, '_>) -> Result<Vec<FileRef>> {
    let mut files = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut sections = elements(root.descendants(), "References");
    let Some(refs) = sections.next() else {
        return Ok(files);
    };
    if sections.next().is_some() {
        return Err(malformed(
            "the descriptor has two References sections (Glance reads the last one)".into(),
        ));
    }
    if refs.parent() != Some(root) {
        return Err(malformed(
            "the References section is not a child of the Envelope".into(),
        ));
    }
    for f in refs.children().filter(|c| c.is_element()) {
        if f.tag_name().name() != "File" {
            return Err(malformed(format!(
                "References holds a <{}>, not only File elements",
                f.tag_name().name()
            )));
        }
        if files.len() >= MAX_ITEMS {
            return Err(too_many("files"));
        }
        unique_attributes(f)?;
        let num = |k: &str| -> Result<Option<u64>> {
            attr(f, k)
                .map(|v| {
                    parse_u64(v).ok_or_else(|| malformed(format!("File {k} {v:?} is not a number")))
                })
                .transpose()
        };
        let id = attr(f, "id").unwrap_or_default().to_string();
        if !ids.insert(id.clone()) {
            return Err(malformed(format!(
                "two File elements have the id {id:?} (Glance takes the last)"
            )));
        }
        files.push(FileRef {
            id,
            href: attr(f, "href")
                .ok_or_else(|| malformed("a File has no href".into()))?
                .to_string(),
            size: num("size")?,
            compression: attr(f, "compression").map(str::to_string),
            chunk_size: num("chunkSize")?,
        });
    }
    Ok(files)
}

/// Every `DiskSection`'s `Disk`s. A capacity that is not a byte count is a problem, not an
/// error, so that the rest of the descriptor is still reported.
fn read_disks(root: roxmltree::Node<'_, '_>, problems: &mut Vec<String>) -> Result<Vec<DiskDesc>> {
    let mut disks = Vec::new();
    for sec in elements(root.descendants(), "DiskSection") {
        for disk in elements(sec.children(), "Disk") {
            if disks.len() >= MAX_DISKS {
                return Err(
                    Error::limit(format!("descriptor lists more than {MAX_DISKS} disks"))
                        .code("ova.descriptor-malformed"),
                );
            }
            unique_attributes(disk)?;
            let capacity_raw = attr(disk, "capacity").unwrap_or_default().to_string();
            let capacity_units = attr(disk, "capacityAllocationUnits").map(str::to_string);
            let mult = unit_multiplier(capacity_units.as_deref().unwrap_or("byte"));
            let capacity = match (parse_u64(&capacity_raw), mult) {
                (Some(c), Some(m)) => c.checked_mul(m),
                _ => None,
            };
            let disk_id = attr(disk, "diskId").unwrap_or_default().to_string();
            if capacity.is_none() {
                problems.push(format!(
                    "disk {disk_id:?}: capacity {capacity_raw:?} in units {:?} is not a byte count",
                    capacity_units.as_deref().unwrap_or("byte")
                ));
            }
            let populated_size = match attr(disk, "populatedSize") {
                Some(v) => Some(
                    parse_u64(v)
                        .ok_or_else(|| malformed(format!("populatedSize {v:?} is not a number")))?,
                ),
                None => None,
            };
            disks.push(DiskDesc {
                disk_id,
                file_ref: attr(disk, "fileRef").map(str::to_string),
                capacity_raw,
                capacity_units,
                capacity,
                format_url: attr(disk, "format").map(str::to_string),
                populated_size,
            });
        }
    }
    Ok(disks)
}

/// A `VirtualSystem`: name, operating system, and the first CPU and memory items.
fn read_system(vs: roxmltree::Node<'_, '_>) -> VirtualSystem {
    let mut s = VirtualSystem {
        id: attr(vs, "id").unwrap_or_default().to_string(),
        name: child(vs, "Name").and_then(node_text),
        ..VirtualSystem::default()
    };
    if let Some(os) = child(vs, "OperatingSystemSection") {
        s.os_id = attr(os, "id").map(str::to_string);
        s.os_type = attr(os, "osType")
            .map(str::to_string)
            .or_else(|| child(os, "Description").and_then(node_text));
    }
    let Some(hw) = child(vs, "VirtualHardwareSection") else {
        return s;
    };
    for item in elements(hw.children(), "Item") {
        let rtype = child(item, "ResourceType").and_then(node_text);
        let qty = child(item, "VirtualQuantity")
            .and_then(node_text)
            .and_then(|q| parse_u64(&q));
        match rtype.as_deref() {
            Some("3") if s.cpus.is_none() => s.cpus = qty,
            Some("4") if s.memory.is_none() => {
                // DSP0004: AllocationUnits defaults to bytes when absent.
                let units = child(item, "AllocationUnits").and_then(node_text);
                let mult = unit_multiplier(units.as_deref().unwrap_or("byte"));
                s.memory = qty.zip(mult).and_then(|(q, m)| q.checked_mul(m));
            }
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const OVF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References><File ovf:id="file1" ovf:href="disk.vmdk" ovf:size="4096"/></References>
  <DiskSection><Info>d</Info>
    <Disk ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:capacity="2" ovf:capacityAllocationUnits="byte * 2^30"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized" ovf:populatedSize="1024"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm1"><Name>photon</Name>
    <OperatingSystemSection ovf:id="36" vmw:osType="other3xLinux64Guest"><Info>os</Info></OperatingSystemSection>
    <VirtualHardwareSection>
      <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>1024</rasd:VirtualQuantity></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;

    #[test]
    fn reads_files_disks_and_system() {
        let d = parse(OVF.as_bytes()).unwrap();
        assert_eq!(d.files[0].href, "disk.vmdk");
        assert_eq!(d.files[0].size, Some(4096));
        assert_eq!(d.disks[0].capacity, Some(2 << 30));
        assert_eq!(
            d.disks[0].format_name().as_deref(),
            Some("vmdk streamOptimized")
        );
        assert_eq!(d.disks[0].populated_size, Some(1024));
        let s = &d.systems[0];
        assert_eq!(s.name.as_deref(), Some("photon"));
        assert_eq!(s.os_type.as_deref(), Some("other3xLinux64Guest"));
        assert_eq!((s.cpus, s.memory), (Some(2), Some(1 << 30)));
    }

    #[test]
    fn refuses_dtd_and_garbage() {
        let bomb =
            r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope>&a;</Envelope>"#;
        assert_eq!(
            parse(bomb.as_bytes()).unwrap_err().finding_code(),
            "ova.descriptor-malformed"
        );
        assert!(parse(b"<Envelope").is_err());
        assert!(parse(b"<Other/>").is_err());
        assert!(parse(&[0xff, 0xfe]).is_err());
        for n in 0..OVF.len() {
            let _ = parse(&OVF.as_bytes()[..n]);
        }
    }

    #[test]
    fn units() {
        assert_eq!(unit_multiplier("byte * 2^30"), Some(1 << 30));
        assert_eq!(unit_multiplier("byte*1024"), Some(1024));
        assert_eq!(unit_multiplier("MegaBytes"), Some(1 << 20));
        assert_eq!(unit_multiplier("byte * 2^99"), None);
        assert_eq!(unit_multiplier("furlong"), None);
    }
}
