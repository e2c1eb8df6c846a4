//! Finding a ploop `DiskDescriptor.xml`'s root element after any XML prolog.
//!
//! ploop reads the descriptor with libxml2, which accepts a byte-order mark, UTF-16, an XML
//! declaration, comments, processing instructions, a document type declaration (with an
//! internal subset) and any amount of whitespace before the root element. Detection skips
//! exactly those (XML 1.0 `prolog ::= XMLDecl? Misc* (doctypedecl Misc*)?`), lexically: no
//! DTD is processed and no entity expanded. The work is one pass over a bounded window.

use crate::xml::past;

/// What the bytes before the root element say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Root {
    /// The prolog ends at `<` + the root element's name and this is it.
    Descriptor,
    /// The prolog ends at another root element, or the text is not an XML prolog.
    Other,
    /// The window ends inside the prolog: a longer file may still be a descriptor.
    Unfinished,
}

/// The window as single-byte text: UTF-8 (a BOM dropped) as is, UTF-16 (with a BOM, or
/// without one when it starts with an ASCII character and a NUL) with each code unit above 0x7f replaced
/// by 0xff. Markup is ASCII in both, so the prolog reads the same.
fn as_bytes(window: &[u8]) -> Vec<u8> {
    let utf16 = |rest: &[u8], big: bool| -> Vec<u8> {
        rest.chunks_exact(2)
            .map(|c| {
                let (hi, lo) = match c {
                    [a, b] if big => (*a, *b),
                    [a, b] => (*b, *a),
                    _ => (0xff, 0xff),
                };
                if hi == 0 && lo < 0x80 {
                    lo
                } else {
                    0xff
                }
            })
            .collect()
    };
    match window {
        [0xff, 0xfe, rest @ ..] => utf16(rest, false),
        [0xfe, 0xff, rest @ ..] => utf16(rest, true),
        // No BOM: an ASCII character then a NUL (or the reverse) is UTF-16; UTF-8 markup has
        // no NUL.
        [a, 0, ..] if *a != 0 && a.is_ascii() => utf16(window, false),
        [0, b, ..] if *b != 0 && b.is_ascii() => utf16(window, true),
        _ => window
            .strip_prefix(b"\xEF\xBB\xBF")
            .unwrap_or(window)
            .to_vec(),
    }
}

/// The position just past a document type declaration starting at `from` (`<!DOCTYPE`):
/// quoted literals, comments and processing instructions are skipped whole, an internal
/// subset `[...]` is skipped to its closing bracket, and the declaration ends at `>`.
fn past_doctype(text: &[u8], from: usize) -> Option<usize> {
    let mut i = from.checked_add(b"<!DOCTYPE".len())?;
    let mut in_subset = false;
    loop {
        let c = *text.get(i)?;
        let rest = text.get(i..)?;
        i = if rest.starts_with(b"<!--") {
            past(text, i, b"-->")?
        } else if rest.starts_with(b"<?") {
            past(text, i, b"?>")?
        } else if c == b'"' || c == b'\'' {
            past(text, i.checked_add(1)?, &[c])?
        } else if c == b'[' && !in_subset {
            in_subset = true;
            i.checked_add(1)?
        } else if c == b']' && in_subset {
            in_subset = false;
            i.checked_add(1)?
        } else if c == b'>' && !in_subset {
            return i.checked_add(1);
        } else if c == b'<' && in_subset {
            // A markup declaration (<!ELEMENT ...>, <!ENTITY ...>): skip to its end,
            // honouring quoted literals inside it.
            past_declaration(text, i)?
        } else {
            i.checked_add(1)?
        };
    }
}

/// The position just past a markup declaration in an internal subset (`<!ENTITY a "b>">`).
fn past_declaration(text: &[u8], from: usize) -> Option<usize> {
    let mut i = from.checked_add(1)?;
    loop {
        let c = *text.get(i)?;
        i = match c {
            b'"' | b'\'' => past(text, i.checked_add(1)?, &[c])?,
            b'>' => return i.checked_add(1),
            _ => i.checked_add(1)?,
        };
    }
}

/// Whether the root element of the XML document starting `window` is `tag` (given as
/// `<Name`). `full` says the window is only a prefix of a longer file.
pub(super) fn root_is(window: &[u8], tag: &[u8], full: bool) -> Root {
    let text = as_bytes(window);
    let unfinished = if full { Root::Unfinished } else { Root::Other };
    let mut i = 0usize;
    // Each step advances `i` by at least one byte, so the loop ends within the window.
    loop {
        let Some(rest) = text.get(i..) else {
            return unfinished;
        };
        let step = match rest {
            [] => return unfinished,
            [b' ' | b'\t' | b'\r' | b'\n', ..] => i.checked_add(1),
            [b'<', b'?', ..] => past(&text, i, b"?>"),
            _ if rest.starts_with(b"<!--") => past(&text, i, b"-->"),
            _ if rest.starts_with(b"<!DOCTYPE") => past_doctype(&text, i),
            _ if rest.starts_with(tag) => {
                return match rest.get(tag.len()) {
                    Some(b' ' | b'\t' | b'\r' | b'\n' | b'>' | b'/') => Root::Descriptor,
                    Some(_) => Root::Other,
                    None => unfinished,
                };
            }
            _ if tag.starts_with(rest) => return unfinished,
            _ => return Root::Other,
        };
        match step {
            Some(next) if next > i => i = next,
            Some(_) => return Root::Other,
            None => return unfinished,
        }
    }
}

/// The descriptor's text as single-byte text (for the `<File>` names), whatever its encoding.
pub(super) fn text(window: &[u8]) -> Vec<u8> {
    as_bytes(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAG: &[u8] = b"<Parallels_disk_image";
    const BODY: &str =
        "<Parallels_disk_image Version=\"1.0\"><File>/etc/passwd</File></Parallels_disk_image>";

    fn root(s: &[u8]) -> Root {
        root_is(s, TAG, false)
    }

    #[test]
    fn every_prolog_an_xml_parser_accepts_is_skipped() {
        let decl = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
        for prolog in [
            String::new(),
            decl.to_string(),
            format!("{decl}<!-- generated -->\n"),
            format!("{decl}<!DOCTYPE Parallels_disk_image>\n"),
            format!("{decl}<!DOCTYPE Parallels_disk_image SYSTEM \"a>b\">"),
            format!("{decl}<!DOCTYPE P [ <!ENTITY e \"]>\"> <!-- ]> --> <?p ]>?> ]>\n"),
            format!("{decl}<?xml-stylesheet href=\"a\"?>\n"),
            format!("{decl}<!--{}-->\n", "x".repeat(2000)),
            format!("{decl}{}", " ".repeat(1100)),
            format!("\t\r\n{decl}<!-- a --><?b?>\n<!-- c -->"),
        ] {
            let doc = format!("{prolog}{BODY}");
            assert_eq!(root(doc.as_bytes()), Root::Descriptor, "{prolog:?}");
            let mut bom = b"\xEF\xBB\xBF".to_vec();
            bom.extend(doc.as_bytes());
            assert_eq!(root(&bom), Root::Descriptor, "BOM {prolog:?}");
            for (big, with_bom) in [(false, true), (true, true), (false, false), (true, false)] {
                let mut u: Vec<u8> = Vec::new();
                if with_bom {
                    u.extend(if big { [0xfe, 0xff] } else { [0xff, 0xfe] });
                }
                for c in doc.encode_utf16() {
                    u.extend(if big {
                        c.to_be_bytes()
                    } else {
                        c.to_le_bytes()
                    });
                }
                assert_eq!(
                    root(&u),
                    Root::Descriptor,
                    "UTF-16 {big} {with_bom} {prolog:?}"
                );
            }
        }
    }

    #[test]
    fn other_documents_and_text_are_not_descriptors() {
        for doc in [
            "hello <Parallels_disk_image>",
            "<?xml version='1.0'?><a><Parallels_disk_image/></a>",
            "<Parallels_disk_imageX>",
            "<!-- <Parallels_disk_image> -->",
            "<!DOCTYPE a [ <Parallels_disk_image> ]><a/>",
            "",
        ] {
            assert_eq!(root(doc.as_bytes()), Root::Other, "{doc:?}");
        }
        // A prolog cut off by the window: unfinished only when the file goes on.
        let cut = b"<?xml version='1.0'?><!-- a long comment";
        assert_eq!(root(cut), Root::Other);
        assert_eq!(root_is(cut, TAG, true), Root::Unfinished);
        assert_eq!(root_is(b"<Parallels_di", TAG, true), Root::Unfinished);
    }

    #[test]
    fn names_are_read_from_utf16() {
        let u: Vec<u8> = BODY.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let t = text(&u);
        assert!(t.windows(11).any(|w| w == b"/etc/passwd"));
    }
}
