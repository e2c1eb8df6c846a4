//! What a reference name makes qemu open: the local paths a backing file, data file or extent
//! name resolves to, the way qemu's block layer resolves them (`block.c`: `bdrv_fill_options`,
//! `bdrv_find_protocol`, `path_has_protocol`, `bdrv_make_absolute_filename`; the drivers'
//! `bdrv_parse_filename`; `parse_json_filename` with qemu's JSON dialect).
//!
//! A name stored in an image is not always the path qemu opens:
//!
//! * qemu reads it as a C string: it ends at the first NUL (a qcow2 `backing_file_size` that
//!   runs past the name reads NUL padding, which ends it too);
//! * a name with a `:` before any `/` names a protocol: `file:`, `host_device:` and
//!   `host_cdrom:` are stripped, `blkdebug:[config]:image` and `blkverify:raw:image` name
//!   two files each (the image part resolved again), `fat:[opts:]dir` names a directory;
//!   network protocols name no local file; an unknown protocol is qemu's error;
//! * `json:{...}` is parsed as JSON (qemu's dialect: single-quoted strings too) and every
//!   `filename`, `dir`, `config`, `path`, `x-image` or `x-raw` string at any depth (dotted
//!   keys such as `file.filename`, quorum children) is a path qemu may open.
//!
//! A plain relative name is relative to the image's directory (qemu makes backing names
//! absolute against it); the paths inside a protocol name or `json:` are taken by qemu as
//! they are, so relative to its working directory, and are reported as relative to either.
//!
//! What cannot be resolved with confidence (an unknown protocol, a `json:` qemu's parser may
//! read differently, nesting past [`MAX_DEPTH`]) is [`Resolved::certain`] `false`: a caller
//! that must not hit the file has to assume it may be any file.
//!
//! Pure string work, linear in the name (bounded nesting); nothing is opened.

use crate::image::RefKind;

/// Nesting (JSON objects and arrays, protocol prefixes within protocol prefixes) followed at
/// most; deeper is not resolved.
pub const MAX_DEPTH: usize = 16;
/// Paths collected from one name at most; more is not resolved.
pub const MAX_PATHS: usize = 64;

/// What a relative [`LocalPath`] is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Base {
    /// The directory of the image that holds the name (qemu's plain backing names).
    Image,
    /// The working directory of the process that opens the image, or the image's directory:
    /// names inside protocol prefixes and `json:` (qemu takes them as they are).
    Either,
}

/// One local path qemu may open for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPath {
    /// The path, as qemu would pass it to `open`.
    pub path: String,
    /// What it is relative to, when it is relative.
    pub base: Base,
}

/// The local paths a reference name makes qemu open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Every local path qemu may open for the name (none for an empty or network name).
    pub paths: Vec<LocalPath>,
    /// False when the name could not be resolved with confidence: qemu may open a file not
    /// listed.
    pub certain: bool,
}

/// The name as qemu reads it: up to the first NUL.
pub fn c_string(name: &str) -> &str {
    name.split('\0').next().unwrap_or_default()
}

/// qemu's `path_has_protocol` (POSIX): a `:` before any `/`.
pub fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes().get(i) == Some(&b':'))
}

/// Protocols whose drivers take no local file (network block devices, null devices).
const NETWORK: &[&str] = &[
    "nbd",
    "nbd+tcp",
    "http",
    "https",
    "ftp",
    "ftps",
    "ssh",
    "iscsi",
    "nfs",
    "rbd",
    "gluster",
    "gluster+tcp",
    "gluster+rdma",
    "null-co",
    "null-aio",
];

/// JSON keys whose string values qemu opens as local paths (the last component of a dotted
/// key).
const PATH_KEYS: &[&str] = &["filename", "dir", "config", "path", "x-image", "x-raw"];

/// Resolves a reference name of `kind` as qemu would (see the module documentation). Parent
/// locators and hrefs, which qemu never follows, are their name as stored (up to a NUL), with
/// a leading `file:` stripped and Windows separators also read as `/`.
pub fn resolve(kind: RefKind, name: &str) -> Resolved {
    let mut r = Resolved {
        paths: Vec::new(),
        certain: true,
    };
    let name = c_string(name);
    match kind {
        RefKind::ParentLocator | RefKind::Href => {
            let t = name.strip_prefix("file:").unwrap_or(name);
            if !t.is_empty() && !t.contains("://") && !t.starts_with("json:") {
                r.push(t, Base::Image);
                if t.contains('\\') {
                    r.push(&t.replace('\\', "/"), Base::Image);
                }
            }
        }
        RefKind::Extent => {
            // qemu's `path_combine` joins the name to the descriptor's path as it is: with a
            // directory that is a plain path; with none, the name as given.
            if !name.is_empty() {
                r.push(name, Base::Image);
            }
            if has_protocol(name) || name.starts_with("json:") {
                r.name(name, Base::Either, 0);
            }
        }
        RefKind::BackingFile => r.name(name, Base::Image, 0),
        RefKind::DataFile => r.name(name, Base::Either, 0),
    }
    r
}

impl Resolved {
    fn push(&mut self, path: &str, base: Base) {
        let path = c_string(path);
        if path.is_empty() {
            return;
        }
        if self.paths.len() >= MAX_PATHS {
            self.certain = false;
            return;
        }
        let p = LocalPath {
            path: path.to_string(),
            base,
        };
        if !self.paths.contains(&p) {
            self.paths.push(p);
        }
    }

    /// A name as `bdrv_open` takes it: `json:`, a protocol prefix, or a plain path (relative
    /// to `plain`).
    fn name(&mut self, name: &str, plain: Base, depth: usize) {
        let name = c_string(name);
        if depth > MAX_DEPTH {
            self.certain = false;
            return;
        }
        if name.is_empty() {
            return;
        }
        if let Some(json) = name.strip_prefix("json:") {
            match json::parse(json) {
                Some(v @ json::Value::Object(_)) => self.json(&v, "", depth),
                _ => self.certain = false,
            }
            return;
        }
        if !has_protocol(name) {
            self.push(name, plain);
            return;
        }
        let (proto, rest) = name.split_once(':').unwrap_or((name, ""));
        let next = depth.saturating_add(1);
        match proto {
            "file" | "host_device" | "host_cdrom" => self.push(rest, Base::Either),
            "blkdebug" => {
                // blkdebug:[config]:image; without the second colon qemu opens nothing.
                if let Some((config, image)) = rest.split_once(':') {
                    self.push(config, Base::Either);
                    self.name(image, Base::Either, next);
                }
            }
            "blkverify" => {
                if let Some((raw, image)) = rest.split_once(':') {
                    self.name(raw, Base::Either, next);
                    self.name(image, Base::Either, next);
                }
            }
            "fat" => {
                // vvfat: the directory follows the last colon (or is a DOS drive `X:...`).
                if let Some(i) = name.rfind(':') {
                    let b = name.as_bytes();
                    let dos = i.checked_sub(2).and_then(|d| b.get(d)) == Some(&b':')
                        && i.checked_sub(1)
                            .and_then(|d| b.get(d))
                            .is_some_and(u8::is_ascii_alphabetic);
                    let from = if dos {
                        i.saturating_sub(1)
                    } else {
                        i.saturating_add(1)
                    };
                    self.push(name.get(from..).unwrap_or_default(), Base::Either);
                }
            }
            "nbd" if rest.starts_with("unix:") => {
                self.push(rest.trim_start_matches("unix:"), Base::Either);
                self.certain = false;
            }
            p if NETWORK.contains(&p) => {}
            _ => self.certain = false,
        }
    }

    /// Every path-like string in a parsed `json:` value. `key` is the (last component of the)
    /// key the value is stored under.
    fn json(&mut self, v: &json::Value, key: &str, depth: usize) {
        if depth > MAX_DEPTH {
            self.certain = false;
            return;
        }
        let next = depth.saturating_add(1);
        match v {
            json::Value::Object(members) => {
                for (k, v) in members {
                    let last = k.rsplit('.').next().unwrap_or_default();
                    self.json(v, last, next);
                }
            }
            json::Value::Array(items) => {
                for v in items {
                    self.json(v, key, next);
                }
            }
            json::Value::String(s) if PATH_KEYS.contains(&key) => {
                // A `filename` option is opened as it is; the legacy `x-image`/`x-raw`
                // options are filenames qemu parses again. Both readings are kept.
                self.push(s, Base::Either);
                let mut inner = Resolved {
                    paths: Vec::new(),
                    certain: true,
                };
                inner.name(s, Base::Either, next);
                if key.starts_with("x-") {
                    self.certain &= inner.certain;
                }
                for p in inner.paths {
                    self.push(&p.path, p.base);
                }
            }
            _ => {}
        }
    }
}

/// Why a backing or parent name is no plain file name, or `None` for a plain one: qemu's
/// protocol syntax (`path_has_protocol`, `json:`), NUL or control bytes, or a path under
/// `/dev`, `/proc` or `/sys`. No legitimate overlay names such a base.
pub fn unsafe_backing_name(name: &str) -> Option<&'static str> {
    if name.contains('\0') {
        return Some("it holds a NUL byte (qemu reads up to the first one)");
    }
    if name.chars().any(char::is_control) {
        return Some("it holds control characters");
    }
    if name.starts_with("json:") {
        return Some("it is a qemu json: specification");
    }
    if has_protocol(name) {
        return Some("it names a qemu protocol (a ':' before any '/')");
    }
    if name.starts_with('/') {
        let mut parts: Vec<&str> = Vec::new();
        for c in name.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                c => parts.push(c),
            }
        }
        if matches!(parts.first(), Some(&("dev" | "proc" | "sys"))) {
            return Some("it is under /dev, /proc or /sys");
        }
    }
    None
}

/// qemu's JSON dialect (`qobject/json-lexer.c`, `json-parser.c`): RFC 8259 plus
/// single-quoted strings and `\'`. Interpolation (`%`) is an error, as in
/// `parse_json_filename`.
mod json {
    use super::MAX_DEPTH;

    /// A parsed value (numbers and literals are not kept).
    #[derive(Debug, Clone, PartialEq)]
    pub enum Value {
        Object(Vec<(String, Value)>),
        Array(Vec<Value>),
        String(String),
        Other,
    }

    /// Parses one value filling `text` (whitespace around it allowed); `None` when it is
    /// not qemu JSON or nests deeper than [`MAX_DEPTH`].
    pub fn parse(text: &str) -> Option<Value> {
        let mut p = Parser {
            s: text.as_bytes(),
            i: 0,
        };
        let v = p.value(0)?;
        p.ws();
        (p.i == p.s.len()).then_some(v)
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Parser<'_> {
        fn peek(&self) -> Option<u8> {
            self.s.get(self.i).copied()
        }
        fn bump(&mut self) -> Option<u8> {
            let b = self.peek()?;
            self.i = self.i.saturating_add(1);
            Some(b)
        }
        fn ws(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
                self.bump();
            }
        }
        fn eat(&mut self, b: u8) -> Option<()> {
            self.ws();
            (self.bump()? == b).then_some(())
        }
        fn value(&mut self, depth: usize) -> Option<Value> {
            if depth > MAX_DEPTH {
                return None;
            }
            self.ws();
            match self.peek()? {
                b'{' => {
                    self.bump();
                    let mut members = Vec::new();
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.bump();
                        return Some(Value::Object(members));
                    }
                    loop {
                        self.ws();
                        let k = self.string()?;
                        self.eat(b':')?;
                        let v = self.value(depth.saturating_add(1))?;
                        members.push((k, v));
                        self.ws();
                        match self.bump()? {
                            b',' => {}
                            b'}' => return Some(Value::Object(members)),
                            _ => return None,
                        }
                    }
                }
                b'[' => {
                    self.bump();
                    let mut items = Vec::new();
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.bump();
                        return Some(Value::Array(items));
                    }
                    loop {
                        items.push(self.value(depth.saturating_add(1))?);
                        self.ws();
                        match self.bump()? {
                            b',' => {}
                            b']' => return Some(Value::Array(items)),
                            _ => return None,
                        }
                    }
                }
                b'"' | b'\'' => self.string().map(Value::String),
                b't' | b'f' | b'n' => {
                    for word in [&b"true"[..], b"false", b"null"] {
                        if self.s.get(self.i..)?.starts_with(word) {
                            self.i = self.i.saturating_add(word.len());
                            return Some(Value::Other);
                        }
                    }
                    None
                }
                b'-' | b'0'..=b'9' => {
                    let start = self.i;
                    while matches!(
                        self.peek(),
                        Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    ) {
                        self.bump();
                    }
                    let n = std::str::from_utf8(self.s.get(start..self.i)?).ok()?;
                    n.parse::<f64>().ok().map(|_| Value::Other)
                }
                _ => None,
            }
        }
        /// A string in double or single quotes.
        fn string(&mut self) -> Option<String> {
            let quote = self.bump()?;
            if quote != b'"' && quote != b'\'' {
                return None;
            }
            let mut out: Vec<u8> = Vec::new();
            loop {
                let b = self.bump()?;
                match b {
                    _ if b == quote => break,
                    b'\\' => match self.bump()? {
                        e @ (b'"' | b'\'' | b'\\' | b'/') => out.push(e),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i.checked_add(4)?)?;
                            let hex = std::str::from_utf8(hex).ok()?;
                            let code = u32::from_str_radix(hex, 16).ok()?;
                            self.i = self.i.saturating_add(4);
                            let c = char::from_u32(code).unwrap_or('\u{fffd}');
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return None,
                    },
                    b if b < 0x20 => return None,
                    b => out.push(b),
                }
            }
            Some(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(kind: RefKind, name: &str) -> (Vec<String>, bool) {
        let r = resolve(kind, name);
        (r.paths.into_iter().map(|p| p.path).collect(), r.certain)
    }

    #[test]
    fn names_resolve_as_qemu_resolves_them() {
        let b = RefKind::BackingFile;
        let one = |s: &str| (vec![s.to_string()], true);
        assert_eq!(paths(b, "/v/base.raw"), one("/v/base.raw"));
        assert_eq!(paths(b, "base.raw"), one("base.raw"));
        assert_eq!(paths(b, "/v/base.raw\0junk"), one("/v/base.raw"));
        assert_eq!(paths(b, "/v/base.raw\0\0\0\0"), one("/v/base.raw"));
        assert_eq!(paths(b, "sub/x:y"), one("sub/x:y"));
        assert_eq!(paths(b, "file:/v/b"), one("/v/b"));
        assert_eq!(paths(b, "host_device:/v/b"), one("/v/b"));
        assert_eq!(paths(b, "host_cdrom:/v/b"), one("/v/b"));
        assert_eq!(paths(b, "blkdebug::/v/b"), one("/v/b"));
        assert_eq!(
            paths(b, "blkdebug:/v/cfg:file:/v/b"),
            (vec!["/v/cfg".to_string(), "/v/b".to_string()], true)
        );
        assert_eq!(
            paths(b, "blkverify:/v/a:blkdebug::/v/b"),
            (vec!["/v/a".to_string(), "/v/b".to_string()], true)
        );
        assert_eq!(paths(b, "fat:rw:/v/dir"), one("/v/dir"));
        assert_eq!(paths(b, "fat:rw:c:/v/dir"), one("c:/v/dir"));
        assert_eq!(paths(b, "json:{\"file.filename\":\"/v/b\"}"), one("/v/b"));
        assert_eq!(
            paths(
                b,
                "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"file\",\"filename\":\"/v/b\"}}"
            ),
            one("/v/b")
        );
        assert_eq!(paths(b, "json:{'file.filename':'/v/b'}"), one("/v/b"));
        assert_eq!(
            paths(b, "json:{'file':{'filename':'/v/\\u0062'}}"),
            one("/v/b")
        );
        assert_eq!(
            paths(
                b,
                "json:{\"driver\":\"quorum\",\"children\":[{\"file.filename\":\"/v/a\"},\
                 {\"driver\":\"vvfat\",\"dir\":\"/v/d\"}]}"
            ),
            (vec!["/v/a".to_string(), "/v/d".to_string()], true)
        );
        // A filename inside json: is opened as it is, and its protocol reading is kept too.
        assert_eq!(
            paths(b, "json:{\"file.filename\":\"file:/v/b\"}"),
            (vec!["file:/v/b".to_string(), "/v/b".to_string()], true)
        );
        // Network names: no local file, certain. Unknown or unparseable: uncertain.
        assert_eq!(paths(b, "nbd:127.0.0.1:1"), (vec![], true));
        assert_eq!(paths(b, "http://h/x"), (vec![], true));
        assert_eq!(paths(b, "json:{}"), (vec![], true));
        assert_eq!(paths(b, ""), (vec![], true));
        assert_eq!(paths(b, "\0/v/b"), (vec![], true));
        assert!(!paths(b, "weird:/v/b").1);
        assert!(!paths(b, "JSON:{\"file.filename\":\"/v/b\"}").1);
        assert!(!paths(b, " json:{}").1);
        assert!(!paths(b, "json:{\"file.filename\":\"/v/b\"").1);
        assert!(!paths(b, "json:{\"a\":%s}").1);
        assert!(!paths(b, "json:[\"/v/b\"]").1);
        assert!(!paths(b, "nbd:unix:/v/sock").1);
        let deep = format!(
            "json:{}{}",
            "{\"a\":".repeat(40),
            "1".to_string() + &"}".repeat(40)
        );
        assert!(!paths(b, &deep).1);
        // Extents: the name joined to the descriptor's directory, and its protocol reading.
        assert_eq!(
            paths(RefKind::Extent, "file:/v/b"),
            (vec!["file:/v/b".to_string(), "/v/b".to_string()], true)
        );
        // Parent locators: as stored, and with Windows separators.
        assert_eq!(
            paths(RefKind::ParentLocator, ".\\b.vhd"),
            (vec![".\\b.vhd".to_string(), "./b.vhd".to_string()], true)
        );
    }

    #[test]
    fn unsafe_backing_names_are_named() {
        for bad in [
            "a\0b",
            "a\nb",
            "json:{}",
            "file:/x",
            "nbd:h:1",
            "fat:rw:/x",
            "/dev/fd/3",
            "//dev/sda",
            "/x/../proc/self/environ",
            "/./sys/x",
        ] {
            assert!(unsafe_backing_name(bad).is_some(), "{bad:?}");
        }
        for ok in [
            "base.qcow2",
            "../base.qcow2",
            "/srv/img/base.qcow2",
            "sub/x:y",
            "/devices/x",
        ] {
            assert_eq!(unsafe_backing_name(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn the_json_reader_is_bounded_and_total() {
        for s in [
            "", "{", "{'a'", "{'a':", "'\\u12'", "\"\\x\"", "[1,]", "{,}", "-", "tru",
        ] {
            assert_eq!(json::parse(s), None, "{s:?}");
        }
        let nested = "[".repeat(10_000);
        assert_eq!(json::parse(&nested), None);
        assert_eq!(
            json::parse(" { 'a' : [ 1 , -2.5e3 , true , null ] } "),
            Some(json::Value::Object(vec![(
                "a".into(),
                json::Value::Array(vec![json::Value::Other; 4])
            )]))
        );
    }
}
