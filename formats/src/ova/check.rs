//! The archive-level rules of `ova check`: member names and types, the descriptor's place,
//! hrefs and sizes. Each rule yields findings; none reads member data.

use unicode_normalization::UnicodeNormalization;

use crate::finding::Finding;

use super::tar::{Member, MemberKind};

/// Longest member name accepted: one file-name component on Linux.
pub const MAX_COMPONENT: usize = 255;

/// `raw` with leading `./` components removed (GNU tar writes `./disk.vmdk` when archiving
/// `.`), and a directory's trailing `/` removed. `None` when not UTF-8.
pub fn normalize(raw: &[u8], kind: MemberKind) -> Option<&str> {
    let mut n = std::str::from_utf8(raw).ok()?;
    while let Some(rest) = n.strip_prefix("./") {
        n = rest;
    }
    if kind == MemberKind::Directory {
        n = n.trim_end_matches('/');
    }
    Some(n)
}

/// The member name (glimpse's reading) normalized as [`normalize`] does.
pub fn normalized_name(m: &Member) -> Option<&str> {
    normalize(&m.raw_name, m.kind)
}

/// The name under each reader: glimpse (the `tar` crate's rules), Python's `tarfile`, GNU tar.
pub fn readings(m: &Member) -> [(&'static str, &[u8]); 3] {
    [
        ("glimpse", &m.raw_name),
        (
            "Python's tarfile",
            m.tarfile_name.as_deref().unwrap_or(&m.raw_name),
        ),
        ("GNU tar", m.gnu_tar_name.as_deref().unwrap_or(&m.raw_name)),
    ]
}

/// Why a member name is unsafe or unusable, if it is. OVA members are flat files: a name must
/// be a single plain path component, so that extraction can only ever create `DIR/name`.
/// Every reader's name is judged: a traversal that only `tarfile` sees is still a traversal.
pub fn name_problem(m: &Member) -> Option<&'static str> {
    readings(m)
        .into_iter()
        .find_map(|(_, raw)| raw_problem(raw, m.kind))
}

fn raw_problem(raw: &[u8], kind: MemberKind) -> Option<&'static str> {
    let Some(n) = normalize(raw, kind) else {
        return Some("is not UTF-8");
    };
    if raw.starts_with(b"/") {
        return Some("is an absolute path");
    }
    if n.split(['/', '\\']).any(|c| c == "..") {
        return Some("contains a `..` component");
    }
    if n.is_empty() || n == "." {
        return Some("is empty");
    }
    if n.contains('\\') {
        return Some("contains a backslash");
    }
    if n.chars().any(|c| c.is_control()) {
        return Some("contains a control character");
    }
    if n.chars().any(invisible) {
        return Some("contains an invisible or text-direction character");
    }
    if n.contains('/') {
        return Some("names a file in a subdirectory (OVA members must be flat)");
    }
    if n.len() > MAX_COMPONENT {
        return Some("is longer than 255 bytes");
    }
    None
}

/// Characters that print as nothing or reorder the text around them (Unicode format
/// characters: bidirectional overrides and isolates, zero-width characters, the BOM, tags):
/// a name holding one does not read, in a listing, as the name it is (`evil\u{202e}gnp.vmdk`
/// shows as `evilkmdv.png`).
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

/// How the readers disagree on a member's name, if they do (trailing `/` aside: `tarfile`
/// strips it from directories).
fn ambiguity(m: &Member) -> Option<String> {
    let [(_, ours), ..] = readings(m);
    let trim = |n: &[u8]| {
        let end = n
            .iter()
            .rposition(|b| *b != b'/')
            .map_or(0, |p| p.saturating_add(1));
        n.get(..end).unwrap_or_default().to_vec()
    };
    let differ = readings(m).iter().any(|(_, n)| trim(n) != trim(ours));
    differ.then(|| {
        let seen: Vec<String> = readings(m)
            .iter()
            .map(|(who, n)| format!("{who} reads {:?}", String::from_utf8_lossy(n)))
            .collect();
        seen.join(", ")
    })
}

/// `ova.member-name`, `ova.member-ambiguous`, `ova.sparse-member` and `ova.member-type`
/// findings for every member.
pub fn member_findings(members: &[Member]) -> Vec<Finding> {
    let mut out = Vec::new();
    for m in members {
        if let Some(why) = name_problem(m) {
            out.push(
                Finding::reject("ova.member-name", format!("member name {:?} {why}", m.name))
                    .at(m.header_offset),
            );
        }
        if let Some(how) = ambiguity(m) {
            out.push(
                Finding::reject(
                    "ova.member-ambiguous",
                    format!(
                        "tar readers disagree on the name of member {:?}: {how}",
                        m.name
                    ),
                )
                .at(m.header_offset),
            );
        }
        out.extend(type_finding(m));
    }
    out.extend(duplicate_findings(members));
    out
}

/// Members that resolve to the same name under any one reader: extraction would let the
/// later replace the earlier, and which one a consumer reads depends on the reader. Names
/// that differ only in case or in Unicode normalisation (`é` as one code point or as `e` and
/// a combining accent) count as the same: on a case-insensitive or normalising file system
/// (macOS, Windows) they are one file, and in a listing they read the same.
fn duplicate_findings(members: &[Member]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut seen: [std::collections::HashSet<&str>; 3] = Default::default();
    let mut folded = std::collections::HashSet::new();
    for m in members {
        let mut dup = None;
        for (set, (who, raw)) in seen.iter_mut().zip(readings(m)) {
            if let Some(n) = normalize(raw, m.kind) {
                if !set.insert(n) && dup.is_none() {
                    dup = Some(format!("{n:?} appears more than once (as {who} reads it)"));
                }
            }
        }
        if let Some(n) = normalize(&m.raw_name, m.kind) {
            let key: String = n.nfc().collect::<String>().to_lowercase().nfc().collect();
            if !folded.insert(key) && dup.is_none() {
                dup = Some(format!(
                    "{n:?} differs from an earlier member's only in case or Unicode normalisation"
                ));
            }
        }
        if let Some(why) = dup {
            out.push(
                Finding::reject("ova.member-name", format!("member name {why}"))
                    .at(m.header_offset),
            );
        }
    }
    out
}

fn type_finding(m: &Member) -> Option<Finding> {
    let f = match m.kind {
        MemberKind::Regular | MemberKind::Directory => return None,
        MemberKind::Sparse => Finding::reject(
            "ova.sparse-member",
            format!(
                "member {:?} is stored as {}: its stored bytes are not its contents",
                m.name,
                m.sparse.as_deref().unwrap_or("GNU sparse")
            ),
        ),
        k => {
            let link = m
                .link
                .as_deref()
                .map(|l| format!(" to {l:?}"))
                .unwrap_or_default();
            Finding::reject(
                "ova.member-type",
                format!(
                    "member {:?} is a {}{link}; only regular files are allowed",
                    m.name,
                    k.as_str()
                ),
            )
        }
    };
    Some(f.at(m.header_offset))
}

/// How an `href` is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HrefKind {
    /// A plain file name: the only kind glimpse resolves.
    Name,
    /// A URL with a scheme (`http:`, `file:`, ...).
    Url,
    /// A path with directory components, or `.`/`..`/empty.
    Path,
}

/// Classifies an href.
pub fn href_kind(href: &str) -> HrefKind {
    // RFC 3986 scheme: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." ) ":".
    if let Some((scheme, _)) = href.split_once(':') {
        let mut cs = scheme.chars();
        if cs.next().is_some_and(|c| c.is_ascii_alphabetic())
            && cs.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        {
            return HrefKind::Url;
        }
    }
    if href.is_empty()
        || href == "."
        || href == ".."
        || href.contains(['/', '\\', '\0'])
        || href.chars().any(|c| c.is_control())
        || href.contains('%')
    {
        return HrefKind::Path;
    }
    HrefKind::Name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, kind: MemberKind) -> Member {
        Member {
            raw_name: name.as_bytes().to_vec(),
            name: name.into(),
            kind,
            link: None,
            header_offset: 0,
            offset: 512,
            size: 0,
            tarfile_name: None,
            gnu_tar_name: None,
            sparse: None,
        }
    }

    #[test]
    fn names() {
        assert_eq!(name_problem(&m("a.ovf", MemberKind::Regular)), None);
        assert_eq!(name_problem(&m("./a.ovf", MemberKind::Regular)), None);
        assert_eq!(name_problem(&m("dir/", MemberKind::Directory)), None);
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/b",
            "a\\b",
            "",
            ".",
            "a\nb",
        ] {
            assert!(
                name_problem(&m(bad, MemberKind::Regular)).is_some(),
                "{bad:?}"
            );
        }
        let f = member_findings(&[m("a", MemberKind::Regular), m("./a", MemberKind::Regular)]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].code, "ova.member-name");
    }

    #[test]
    fn hrefs() {
        assert_eq!(href_kind("disk1.vmdk"), HrefKind::Name);
        assert_eq!(href_kind("http://x/disk.vmdk"), HrefKind::Url);
        assert_eq!(href_kind("file:disk.vmdk"), HrefKind::Url);
        assert_eq!(href_kind("../disk.vmdk"), HrefKind::Path);
        assert_eq!(href_kind("/etc/shadow"), HrefKind::Path);
        assert_eq!(href_kind("a/b.vmdk"), HrefKind::Path);
        assert_eq!(href_kind("a%2fb"), HrefKind::Path);
    }
}
