//! The finding-code registry (`glimpse_formats::codes::ALL`) against the sources and the docs:
//!
//! (a) every code string in formats/src, convert/src and cli/src is registered;
//! (b) every registered code is documented in docs/findings.md or docs/findings/*.md;
//! (c) every registered code is used somewhere in those sources.
//!
//! A code string is a string literal `namespace.kebab-name` whose namespace is a registered
//! one or a format name (so that a new format's first code is caught too). The scanner is a
//! small tokenizer, not a regex: it skips comments, character literals and lifetimes, and reads
//! plain and raw string literals. A literal passed to `starts_with(` is a prefix, not a code.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use glimpse_formats::codes::ALL;
use glimpse_formats::Format;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a readable entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The string literals of Rust source `text`, each with the code just before it (for the
/// `starts_with(` test). Escapes are kept as written: a code never holds one.
fn literals(text: &str) -> Vec<(String, String)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            i += rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
        } else if rest.starts_with(b"/*") {
            i += rest
                .windows(2)
                .position(|w| w == b"*/")
                .map_or(rest.len(), |p| p + 2);
        } else if b[i] == b'\'' {
            // A character literal ('"', '\'', '\u{7f}') or a lifetime ('a).
            if rest.get(1) == Some(&b'\\') {
                i += 3 + rest[3..].iter().position(|&c| c == b'\'').unwrap_or(0) + 1;
            } else if rest.get(2) == Some(&b'\'') {
                i += 3;
            } else {
                i += 1;
            }
        } else if raw_string_start(b, i).is_some() {
            let (open, hashes) = raw_string_start(b, i).unwrap_or_default();
            let body = open + 1;
            let mut close = b"\"".to_vec();
            close.extend(std::iter::repeat_n(b'#', hashes));
            let len = b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .unwrap_or(b.len() - body);
            out.push((lossy(&b[body..body + len]), lossy(&b[..i])));
            i = body + len + close.len();
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            out.push((lossy(&b[i + 1..j.min(b.len())]), lossy(&b[..i])));
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// At `i`, the start of a raw string (`r"`, `r#"`, `br"` ...): the index of its opening
/// quote and its number of hashes.
fn raw_string_start(b: &[u8], i: usize) -> Option<(usize, usize)> {
    let ident_before = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
    if b[i] != b'r' || ident_before {
        return None;
    }
    let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
    (b.get(i + 1 + hashes) == Some(&b'"')).then_some((i + 1 + hashes, hashes))
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The namespaces a code may have: the registry's, and every format's names.
fn namespaces() -> BTreeSet<String> {
    let mut ns: BTreeSet<String> = ALL
        .iter()
        .filter_map(|c| c.split_once('.'))
        .map(|(n, _)| n.to_string())
        .collect();
    for f in Format::ALL {
        ns.insert(f.name().to_string());
        ns.insert(f.qemu_name().to_string());
    }
    ns
}

/// True when `s` has the shape of a code in one of `ns`.
fn is_code(s: &str, ns: &BTreeSet<String>) -> bool {
    let Some((n, name)) = s.split_once('.') else {
        return false;
    };
    ns.contains(n)
        && !name.is_empty()
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Every code string in formats/src, convert/src and cli/src, with the files using it.
fn used_codes() -> BTreeMap<String, BTreeSet<String>> {
    let ns = namespaces();
    let mut files = Vec::new();
    for dir in ["formats/src", "convert/src", "cli/src"] {
        rust_files(&root().join(dir), &mut files);
    }
    // The registry itself lists every code: it is what the sources are checked against.
    let registry = root().join("formats/src/codes.rs");
    files.retain(|f| *f != registry);
    assert!(files.len() > 50, "only {} source files found", files.len());
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for (lit, before) in literals(&text) {
            if is_code(&lit, &ns) && !before.trim_end().ends_with("starts_with(") {
                let rel = f.strip_prefix(root()).unwrap_or(f).display().to_string();
                used.entry(lit).or_default().insert(rel);
            }
        }
    }
    used
}

#[test]
fn the_scanner_reads_literals_and_skips_the_rest() {
    let src = r####"
        // Finding::reject("comment.code")
        /* "block.comment" */
        let q = '"'; let e = '\''; fn f<'a>(x: &'a str) {}
        Finding::warn("qcow2.one", "it's \"quoted\"");
        let raw = r#"vmdk.two"#; let c = x.starts_with("ova.prefix");
    "####;
    let got: Vec<String> = literals(src).into_iter().map(|(l, _)| l).collect();
    assert_eq!(
        got,
        ["qcow2.one", r#"it's \"quoted\""#, "vmdk.two", "ova.prefix"]
    );
    let ns: BTreeSet<String> = ["qcow2".to_string()].into();
    assert!(is_code("qcow2.l2-entry-out-of-bounds", &ns));
    assert!(!is_code("qcow2.Bad", &ns) && !is_code("disk.img", &ns) && !is_code("qcow2.", &ns));
}

#[test]
fn the_registry_has_no_duplicates() {
    let set: BTreeSet<&str> = ALL.iter().copied().collect();
    assert_eq!(set.len(), ALL.len(), "a code is listed twice");
}

#[test]
fn every_code_in_the_sources_is_registered() {
    let missing: Vec<String> = used_codes()
        .into_iter()
        .filter(|(c, _)| !ALL.contains(&c.as_str()))
        .map(|(c, files)| {
            format!(
                "{c} (in {})",
                files.into_iter().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "codes not in formats/src/codes.rs ALL:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_registered_code_is_used() {
    let used = used_codes();
    let unused: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|c| !used.contains_key(*c))
        .collect();
    assert!(
        unused.is_empty(),
        "registered codes no source uses (remove them from formats/src/codes.rs): {unused:?}"
    );
}

#[test]
fn every_registered_code_is_documented() {
    let docs = root().join("docs");
    let mut text = fs::read_to_string(docs.join("findings.md")).expect("docs/findings.md");
    let mut pages: Vec<PathBuf> = fs::read_dir(docs.join("findings"))
        .expect("docs/findings/")
        .map(|e| e.expect("a readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    for p in pages {
        text += &fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let undocumented: Vec<&str> = ALL
        .iter()
        .copied()
        .filter(|c| !text.contains(&format!("`{c}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "codes missing from docs/findings.md and docs/findings/*.md: {undocumented:?}"
    );
}
