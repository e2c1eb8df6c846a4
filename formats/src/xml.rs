//! Lexical scans of XML text that run before (or instead of) a parser: bounded, one pass, no
//! DTD processed and no entity expanded. Used by the OVF descriptor (a nesting bound before
//! roxmltree, which recurses) and by ploop descriptor detection (the prolog before the root).

/// The position just past the first `needle` at or after `from`.
pub(crate) fn past(text: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let rest = text.get(from..)?;
    let at = rest.windows(needle.len()).position(|w| w == needle)?;
    from.checked_add(at)?.checked_add(needle.len())
}

/// True when elements in `text` nest deeper than `max`. The scan skips comments, CDATA,
/// processing instructions and declarations, and reads a start tag to its `>` outside quoted
/// values; on text that is not well-formed it may count more than a parser would, never
/// fewer before the parser's own error.
pub(crate) fn nests_deeper_than(text: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
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
            let mut quote = None;
            let close = rest.iter().enumerate().skip(1).find_map(|(j, b)| {
                match (quote, *b) {
                    (None, b'"' | b'\'') => quote = Some(*b),
                    (Some(q), c) if c == q => quote = None,
                    (None, b'>') => return Some(j),
                    _ => {}
                }
                None
            });
            if let Some(j) = close {
                if rest.get(j.saturating_sub(1)) != Some(&b'/') {
                    depth = depth.saturating_add(1);
                    if depth > max {
                        return true;
                    }
                }
            }
            close.map(|j| at.saturating_add(j).saturating_add(1))
        };
        // Unterminated: the parser fails there, at no greater depth.
        let Some(next) = end else {
            return false;
        };
        i = next;
    }
    false
}
