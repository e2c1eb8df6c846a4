//! Lexical scans of XML text that run before (or instead of) a parser: bounded, one pass, no
//! DTD processed and no entity expanded. Used by the OVF descriptor (a nesting bound before
//! roxmltree, which recurses) and by ploop descriptor detection (the prolog before the root).

/// The position just past the first `needle` at or after `from`.
pub(crate) fn past(text: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let rest = text.get(from..)?;
    let at = rest.windows(needle.len()).position(|w| w == needle)?;
    from.checked_add(at)?.checked_add(needle.len())
}

/// Bounds on the shape of an XML document, checked before a parser sees it: roxmltree
/// recurses once per nesting level, compares each attribute with every earlier one of its
/// element and each namespace declaration with every earlier one, and copies every namespace
/// in scope into each element that declares one (cubic in the declarations: 2,500 of them in
/// an 80 KiB descriptor took 30-44 s).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bounds {
    /// Deepest element nesting.
    pub depth: usize,
    /// Most attributes (namespace declarations included) on one element.
    pub attributes: usize,
    /// Most namespace declarations (`xmlns`, `xmlns:p`) in the whole document.
    pub namespaces: usize,
    /// Most attributes (namespace declarations included) in the whole document: a parser
    /// holds a record for each (roxmltree about 70 bytes), which no per-element bound limits.
    pub total_attributes: usize,
}

/// Which bound a document exceeds first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Excess {
    Depth,
    Attributes,
    Namespaces,
    TotalAttributes,
}

/// The first bound `text` exceeds, if any. One pass: it skips comments, CDATA, processing
/// instructions and declarations, and reads each start tag to its `>` outside quoted values,
/// counting its attributes by their `=` and its namespace declarations by their names. On
/// text that is not well-formed it may count more than a parser would, never fewer before the
/// parser's own error.
pub(crate) fn exceeds(text: &[u8], bounds: Bounds) -> Option<Excess> {
    let mut depth = 0usize;
    let mut namespaces = 0usize;
    let mut attributes = 0usize;
    let mut i = 0usize;
    while let Some(at) = text
        .get(i..)
        .and_then(|t| t.iter().position(|b| *b == b'<'))
        .map(|p| i.saturating_add(p))
    {
        let rest = text.get(at..).unwrap_or_default();
        let end = if rest.starts_with(b"<!--") {
            past(text, at.saturating_add(4), b"-->")
        } else if rest.starts_with(b"<![CDATA[") {
            past(text, at.saturating_add(9), b"]]>")
        } else if rest.starts_with(b"<?") {
            past(text, at.saturating_add(2), b"?>")
        } else if rest.starts_with(b"<!") {
            past(text, at.saturating_add(2), b">")
        } else if rest.starts_with(b"</") {
            depth = depth.saturating_sub(1);
            past(text, at.saturating_add(2), b">")
        } else {
            let tag = start_tag(rest);
            if tag.attributes > bounds.attributes {
                return Some(Excess::Attributes);
            }
            namespaces = namespaces.saturating_add(tag.namespaces);
            if namespaces > bounds.namespaces {
                return Some(Excess::Namespaces);
            }
            attributes = attributes.saturating_add(tag.attributes);
            if attributes > bounds.total_attributes {
                return Some(Excess::TotalAttributes);
            }
            if let Some(j) = tag.close {
                if rest.get(j.saturating_sub(1)) != Some(&b'/') {
                    depth = depth.saturating_add(1);
                    if depth > bounds.depth {
                        return Some(Excess::Depth);
                    }
                }
            }
            tag.close.map(|j| at.saturating_add(j).saturating_add(1))
        };
        // Unterminated: the parser fails there, with nothing more to count.
        i = end?;
    }
    None
}

/// What one start tag holds, read from its `<`.
struct StartTag {
    /// The index of its `>` (outside quoted values), if it has one.
    close: Option<usize>,
    attributes: usize,
    namespaces: usize,
}

/// Reads the start tag at the beginning of `tag`: an attribute is an `=` outside quotes, and
/// a namespace declaration one whose name (the last word before the `=`) is `xmlns` or starts
/// with `xmlns:`.
fn start_tag(tag: &[u8]) -> StartTag {
    let mut t = StartTag {
        close: None,
        attributes: 0,
        namespaces: 0,
    };
    let mut quote = None;
    // Where the last word outside quotes began, and whether the previous byte ended one.
    let mut word = 1usize;
    let mut between = false;
    for (j, &b) in tag.iter().enumerate().skip(1) {
        match (quote, b) {
            (Some(q), c) if c == q => {
                quote = None;
                between = true;
            }
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(b),
            (None, b'>') => {
                t.close = Some(j);
                break;
            }
            (None, b'=') => {
                t.attributes = t.attributes.saturating_add(1);
                let name = tag.get(word..j).unwrap_or_default().trim_ascii_end();
                if name == b"xmlns" || name.starts_with(b"xmlns:") {
                    t.namespaces = t.namespaces.saturating_add(1);
                }
                between = true;
            }
            (None, c) if c.is_ascii_whitespace() => between = true,
            (None, _) => {
                if between {
                    word = j;
                    between = false;
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        depth: 3,
        attributes: 4,
        namespaces: 3,
        total_attributes: 8,
    };

    #[test]
    fn shapes_within_and_beyond_each_bound() {
        let ok = br#"<?xml version="1.0"?><!-- <a><a><a><a> --><E xmlns="u" xmlns:o="v" o:x='a>b'><F a="1" b = "2"/><G><H/></G></E>"#;
        assert_eq!(exceeds(ok, B), None);
        assert_eq!(exceeds(b"<a><b><c><d/></c></b></a>", B), None);
        assert_eq!(
            exceeds(b"<a><b><c><d></d></c></b></a>", B),
            Some(Excess::Depth)
        );
        assert_eq!(
            exceeds(br#"<a p="1" q="2" r="3" s="=" t="5"/>"#, B),
            Some(Excess::Attributes)
        );
        // Declarations count across the document, spaced or not around the `=`.
        assert_eq!(
            exceeds(
                br#"<a xmlns:p="1"><b xmlns:q ="2"/><c xmlns = "3"/><d xmlns:r="4"/></a>"#,
                B
            ),
            Some(Excess::Namespaces)
        );
        // An attribute merely named like one is not a declaration.
        assert_eq!(
            exceeds(br#"<a xmlnsx="1" p:xmlns="2" v="xmlns:q=1"/>"#, B),
            None
        );
        // Sibling closes undo depth.
        assert_eq!(exceeds(b"<a><b></b><b></b><b><c/></b></a>", B), None);
        // Unterminated: nothing more to count.
        assert_eq!(exceeds(b"<a><b><c", B), None);
        // Attributes count across the document too, declarations included.
        let eight = br#"<a xmlns="u" p="1" q="2"><b r="3" s="4"/><b t="5" u="6" v="7"/></a>"#;
        assert_eq!(exceeds(eight, B), None);
        assert_eq!(
            exceeds(
                br#"<a xmlns="u" p="1" q="2"><b r="3" s="4"/><b t="5" u="6" v="7" w="8"/></a>"#,
                B
            ),
            Some(Excess::TotalAttributes)
        );
    }
}
