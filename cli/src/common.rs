//! Helpers shared by the subcommands: opening images under the policy, and rendering.

use std::path::Path;
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Report, Verdict};
use glimpse_formats::{Format, Image, ImageInfo, Limits, Source};
use serde_json::{json, Map, Value};

/// `--output human|json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A readable Field/Value table.
    #[default]
    Human,
    /// Machine-readable JSON.
    Json,
}

/// Opens `path` read-only as a shared positional source (a pipe or device without a size is
/// refused: see `source.rs`). Open errors name the file themselves; [`failed`] names it once.
pub fn open_source(path: &Path) -> anyhow::Result<Source> {
    crate::source::open_random(path)
}

/// A refusal by the safety policy: exit status 1 in every command.
#[derive(Debug)]
pub struct Rejected {
    /// The first rejecting finding's code.
    pub code: &'static str,
    /// What was rejected and why, on one line.
    pub message: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejected {}

/// A usage error found after parsing (conflicting options, a `--disk` the input lacks):
/// exit status 2.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(glimpse_formats::Error::usage(message))
}

/// The exit status for an error: 1 for a policy rejection, 2 for anything else.
pub fn exit_status(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<Rejected>()) {
        1
    } else {
        2
    }
}

/// The `{filename, error: {kind, code, message, offset}}` JSON object for a file that could
/// not be handled (docs/json/error.json).
pub fn error_json(filename: &str, e: &anyhow::Error) -> Value {
    let (mut kind, mut code, mut offset) = ("error", "error", None);
    for c in e.chain() {
        if let Some(r) = c.downcast_ref::<Rejected>() {
            (kind, code) = ("rejected", r.code);
            break;
        }
        if let Some(f) = c.downcast_ref::<glimpse_formats::Error>() {
            (kind, code, offset) = (f.kind().as_str(), f.finding_code(), f.offset());
            break;
        }
        if c.is::<std::io::Error>() {
            (kind, code) = ("io", "io.error");
            break;
        }
    }
    json!({
        "filename": filename,
        "error": {"kind": kind, "code": code, "message": format!("{e:#}"), "offset": offset},
    })
}

/// Reports a file that could not be handled: one line on stderr naming it once, and its
/// JSON object and exit status.
pub fn failed(filename: &str, e: &anyhow::Error) -> (Value, u8) {
    let msg = format!("{e:#}");
    // As `main` prints an error: a message may quote a server or an image.
    if msg.starts_with(&format!("{filename}:")) {
        errln!("glimpse: {}", printable(&msg));
    } else {
        errln!("glimpse: {}: {}", printable(filename), printable(&msg));
    }
    (error_json(filename, e), exit_status(e))
}

/// Parses a size such as `10G`, `512M` or `1099511627776` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    glimpse_convert::parse_size(s).ok_or_else(|| {
        format!("{s:?} is not a size (use a number with an optional k, M, G or T suffix)")
    })
}

/// Parses a format name (Glance's names; `vpc` is an alias of `vhd`).
pub fn parse_format(s: &str) -> Result<Format, String> {
    s.parse::<Format>().map_err(|e| e.to_string())
}

/// Options that say how an input image is opened by commands that read guest data.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct InputOpts {
    /// Proceed even when the safety policy rejects the image. A referenced file (an overlay's
    /// backing file) is still never opened, and encrypted guest data is never read.
    #[arg(long)]
    pub force: bool,
    /// With an OVA holding several disks: the disk to use (0-based).
    #[arg(long, value_name = "N")]
    pub disk: Option<usize>,
}

/// An image opened for reading guest data, with the policy report that allowed it.
pub struct Loaded {
    /// The image.
    pub image: Arc<dyn Image>,
}

/// The limits of this command: one process runs one command, so every image it opens, every
/// reader cache and the conversion buffers charge one shared budget (`Limits::per_command`),
/// which is what bounds the command's memory as a whole.
pub fn limits() -> Limits {
    static LIMITS: std::sync::OnceLock<Limits> = std::sync::OnceLock::new();
    LIMITS
        .get_or_init(|| Limits::default().per_command())
        .clone()
}

/// Detects, opens and checks `path` under the default policy (plus `expect`; not as an
/// image-service gate: [`Policy::image_service`] is off), refusing a
/// rejected image unless `--force`, and an encrypted one always. Errors do not name the path.
pub fn load(path: &Path, expect: Option<Format>, opts: &InputOpts) -> anyhow::Result<Loaded> {
    let src = open_source(path)?;
    let remote = path.to_str().is_some_and(crate::remote::is_remote);
    let policy = Policy {
        expect_format: expect,
        disk: opts.disk,
        // A streamOptimized VMDK's check reads every grain's marker: over HTTP the whole
        // file, which the commands that load an image then read again. Their readers check
        // each grain's marker and bounds as they read it.
        skip_data_walk: remote,
        // Reading an image is not uploading it: what only an image service refuses (a
        // qcow2 with extended L2 entries, an MBR Glance's inspector finds odd) stays a
        // warning, and needs no --force.
        image_service: false,
        ..Policy::default()
    };
    let report = inspect(src, &policy, &limits())?;
    let verdict = report.verdict();
    let Report {
        image, findings, ..
    } = report;
    let rejecting: Vec<&glimpse_formats::Finding> = findings
        .iter()
        .filter(|f| f.severity == glimpse_formats::Severity::Reject)
        .collect();
    let reasons: Vec<String> = rejecting
        .iter()
        .map(|f| format!("{} ({})", f.message, f.code))
        .collect();
    let reasons = reasons.join("; ");
    let code = rejecting.first().map_or("policy.reject", |f| f.code);
    let Some(image) = image else {
        if opts.force {
            anyhow::bail!("cannot be opened: {reasons}");
        }
        return Err(Rejected {
            code,
            message: format!("rejected by the safety policy: {reasons}"),
        }
        .into());
    };
    if image.info().encrypted {
        // --force cannot help: without the key there is no guest data to read.
        if !opts.force {
            return Err(Rejected {
                code,
                message: format!("rejected by the safety policy: {reasons}"),
            }
            .into());
        }
        anyhow::bail!("guest data is encrypted: glimpse cannot read it, even with --force");
    }
    if verdict == Verdict::Reject {
        if !opts.force {
            return Err(Rejected {
                code,
                message: format!(
                    "rejected by the safety policy: {reasons} (use --force to read it anyway)"
                ),
            }
            .into());
        }
        errln!(
            "glimpse: warning: {}: reading despite: {reasons}",
            name(path)
        );
    }
    if let Some(b) = image.info().backing_file() {
        errln!(
            "glimpse: warning: {}: the backing file {:?} is not read, so what is read here is \
             only this overlay's data, not the guest disk",
            name(path),
            b.target
        );
    }
    Ok(Loaded {
        image: Arc::from(image),
    })
}

/// Opens `src` for metadata only (no policy), as `info` does: an OVA's `disk` (or its
/// default disk); `disk` on any other format is a usage error.
pub fn open_image(
    src: Source,
    det: &glimpse_formats::Detection,
    disk: Option<usize>,
    limits: &Limits,
) -> anyhow::Result<Box<dyn Image>> {
    let format = det.format();
    if format == Format::Ova {
        return Ok(glimpse_formats::ova::open_disk(src, limits, disk)?);
    }
    if let Some(d) = disk {
        return Err(usage(format!(
            "--disk {d} applies to an OVA only, and this is a {format} image"
        )));
    }
    Ok(glimpse_formats::open(src, format, limits)?)
}

/// The qemu-img-style JSON object for an image's info.
pub fn info_json(filename: &str, info: &ImageInfo) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!(info.format.name()));
    m.insert("virtual-size".into(), json!(info.virtual_size));
    if let Some(a) = info.actual_size {
        m.insert("actual-size".into(), json!(a));
    }
    if let Some(c) = info.cluster_size {
        m.insert("cluster-size".into(), json!(c));
    }
    if let Some(d) = info.dirty {
        m.insert("dirty-flag".into(), json!(d));
    }
    if info.encrypted {
        m.insert("encrypted".into(), json!(true));
    }
    if let Some(b) = info.backing_file() {
        m.insert("backing-filename".into(), json!(b.target));
        if let Some(f) = &b.format {
            m.insert("backing-filename-format".into(), json!(f));
        }
    }
    if !info.details.is_empty() {
        m.insert(
            "format-specific".into(),
            json!({"type": info.format.qemu_name(), "data": info.details}),
        );
    }
    m.insert(
        "references".into(),
        serde_json::to_value(&info.references).unwrap_or(Value::Null),
    );
    m
}

/// `s` safe to print to a terminal: control characters (C0, DEL, C1: escape sequences, line
/// breaks, carriage returns) and the bidirectional overrides and isolates are written as
/// escapes (`\u{1b}`, `\n`), so that a string from an image (a volume label, a creator
/// field, a file name inside an archive) can neither drive the terminal nor add a line that
/// looks like glimpse's own. JSON output escapes them by itself.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    }
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A table's key column is padded to its widest key of at most this many characters.
const KEY_PAD_MAX: usize = 48;
/// A table's value column is padded to its widest value of at most this many characters. A
/// longer cell is written as it is, running past the column's edge, instead of widening every
/// row: padding each row to the widest value made a table rows × widest value bytes (an OVA of
/// 51 KB printed 299 MB), and a width past 65,535 made Rust's formatter panic.
const VALUE_PAD_MAX: usize = 80;
/// A cell longer than this many characters is shown shortened, with how many were left out;
/// JSON output keeps it whole.
const CELL_SHOW_MAX: usize = 4096;

/// One table cell: `s` cut to [`CELL_SHOW_MAX`] characters (with a note of how many more
/// there were), then made [`printable`]; and its width in characters.
fn cell(s: &str) -> (String, usize) {
    let (kept, note) = match s.char_indices().nth(CELL_SHOW_MAX) {
        Some((at, _)) => {
            let (kept, rest) = s.split_at(at);
            (
                kept,
                format!(" ... ({} more characters)", rest.chars().count()),
            )
        }
        None => (s, String::new()),
    };
    let mut text = printable(kept).into_owned();
    text.push_str(&note);
    let width = text.chars().count();
    (text, width)
}

/// The widest of `widths` that is at most `max` (at least 5, the headers' width).
fn column_width(widths: impl Iterator<Item = usize>, max: usize) -> usize {
    widths.filter(|&w| w <= max).max().unwrap_or(0).max(5)
}

/// Appends `| key | value |` and a line break, each cell padded to its column by hand (a
/// computed width in a format string panics past 65,535); a cell wider than its column is
/// not padded.
fn table_row(out: &mut String, key: (&str, usize), value: (&str, usize), w1: usize, w2: usize) {
    out.push_str("| ");
    out.push_str(key.0);
    out.extend(std::iter::repeat_n(' ', w1.saturating_sub(key.1)));
    out.push_str(" | ");
    out.push_str(value.0);
    out.extend(std::iter::repeat_n(' ', w2.saturating_sub(value.1)));
    out.push_str(" |\n");
}

/// Renders a Field/Value table like `glance image-show` prints. Every key and value is one
/// line, made [`printable`]. Its size is linear in the text of the rows: a column is as wide
/// as its widest cell of at most [`VALUE_PAD_MAX`] characters ([`KEY_PAD_MAX`] for keys), a
/// wider cell runs past the column's edge, and one longer than [`CELL_SHOW_MAX`] is shortened.
pub fn table(rows: &[(String, String)]) -> String {
    let cells: Vec<((String, usize), (String, usize))> =
        rows.iter().map(|(k, v)| (cell(k), cell(v))).collect();
    let w1 = column_width(cells.iter().map(|(k, _)| k.1), KEY_PAD_MAX);
    let w2 = column_width(cells.iter().map(|(_, v)| v.1), VALUE_PAD_MAX);
    let mut sep = String::from("+-");
    sep.extend(std::iter::repeat_n('-', w1));
    sep.push_str("-+-");
    sep.extend(std::iter::repeat_n('-', w2));
    sep.push_str("-+\n");
    let mut out = String::new();
    out.push_str(&sep);
    table_row(&mut out, ("Field", 5), ("Value", 5), w1, w2);
    out.push_str(&sep);
    for ((k, kw), (v, vw)) in &cells {
        table_row(&mut out, (k, *kw), (v, *vw), w1, w2);
    }
    out.push_str(&sep);
    out
}

/// Binary units above bytes, for [`scaled`].
const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];

/// `n` in the largest binary unit it reaches: `None` below 1 KiB.
fn scaled(n: u64) -> Option<(f64, &'static str)> {
    let mut v = n as f64;
    let mut unit = None;
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = Some(u);
    }
    unit.map(|u| (v, u))
}

/// A human-readable byte count with the exact value: `1 GiB (1073741824 bytes)`.
pub fn human_size(n: u64) -> String {
    match scaled(n) {
        None => format!("{n} bytes"),
        Some((v, u)) => format!("{v:.3} {u} ({n} bytes)").replace(".000 ", " "),
    }
}

/// A short byte count for table columns: `512 B`, `4.0 KiB`.
pub fn short_size(n: u64) -> String {
    match scaled(n) {
        None => format!("{n} B"),
        Some((v, u)) => format!("{v:.1} {u}"),
    }
}

/// Rows of the human info table.
pub fn info_rows(filename: &str, info: &ImageInfo) -> Vec<(String, String)> {
    let mut rows = vec![
        ("filename".to_string(), filename.to_string()),
        ("format".to_string(), info.format.name().to_string()),
        ("virtual size".to_string(), human_size(info.virtual_size)),
    ];
    if let Some(a) = info.actual_size {
        rows.push(("actual size".into(), human_size(a)));
    }
    if let Some(c) = info.cluster_size {
        rows.push(("cluster size".into(), c.to_string()));
    }
    if let Some(d) = info.dirty {
        rows.push(("dirty flag".into(), d.to_string()));
    }
    if info.encrypted {
        rows.push(("encrypted".into(), "yes".into()));
    }
    for (k, v) in &info.details {
        let text = match v {
            Value::String(s) => s.clone(),
            other => serde_json::to_string(other).unwrap_or_default(),
        };
        rows.push((k.clone(), text));
    }
    for r in &info.references {
        let kind = serde_json::to_value(r.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let fmt = r
            .format
            .as_deref()
            .map(|f| format!(" (format {f})"))
            .unwrap_or_default();
        rows.push((format!("reference: {kind}"), format!("{}{fmt}", r.target)));
    }
    rows
}

/// The first error met writing to stdout, after which nothing more is written.
static STDOUT_ERROR: std::sync::Mutex<Option<std::io::Error>> = std::sync::Mutex::new(None);

/// Writes to stdout (`outln!`, `out!`) and flushes, so that a failure is seen at once. The
/// first failure is kept for [`stdout_error`]; output after it is dropped.
pub fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut failed = STDOUT_ERROR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if failed.is_some() {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        *failed = Some(e);
    }
}

/// True once a write to stdout failed: a command that streams its output stops producing it.
pub fn stdout_failed() -> bool {
    STDOUT_ERROR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .is_some()
}

/// Writes to stderr (`errln!`, `errp!`), dropping what cannot be written.
pub fn write_err(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// The error that stopped output to stdout, if any: the command then exits 2, or 141 when
/// the reader went away.
pub fn stdout_error() -> Option<std::io::Error> {
    write_out(format_args!(""));
    STDOUT_ERROR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

/// Prints JSON: one object for one file, an array for several.
pub fn print_json(items: Vec<Value>) {
    let mut v = if items.len() == 1 {
        items.into_iter().next().unwrap_or(Value::Null)
    } else {
        Value::Array(items)
    };
    crate::remote::annotate(&mut v);
    outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

/// Prints the JSON objects of a command's files one by one, as each is done: the object alone
/// for one file, an array for several, in the same bytes [`print_json`] prints for them all
/// at once, without holding them all.
pub struct JsonItems {
    /// How many objects the command prints.
    count: usize,
    /// How many were printed.
    printed: usize,
}

impl JsonItems {
    /// A printer of `count` objects.
    pub fn new(count: usize) -> Self {
        JsonItems { count, printed: 0 }
    }

    /// Prints the next object.
    pub fn item(&mut self, mut v: Value) {
        crate::remote::annotate(&mut v);
        let text = self.render(&v);
        out!("{text}");
    }

    /// The text of the next object, as the whole output would hold it.
    fn render(&mut self, v: &Value) -> String {
        let text = serde_json::to_string_pretty(v).unwrap_or_default();
        let first = self.printed == 0;
        self.printed = self.printed.saturating_add(1);
        if self.count == 1 {
            return text + "\n";
        }
        // An array's items are its members pretty-printed one level deeper: every line
        // indented by two more spaces (a string's line breaks are escaped).
        let mut out = String::with_capacity(text.len().saturating_add(256));
        out.push_str(if first { "[\n" } else { ",\n" });
        for (i, line) in text.lines().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str("  ");
            out.push_str(line);
        }
        out
    }

    /// Ends the array.
    pub fn finish(self) {
        out!("{}", self.end());
    }

    /// What ends the output.
    fn end(&self) -> &'static str {
        match (self.count, self.printed) {
            (1, _) => "",
            (_, 0) => "[]\n",
            _ => "\n]\n",
        }
    }
}

/// `e` naming the file `path` once: errors of opening a file already start with its name.
pub fn named(e: anyhow::Error, path: &Path) -> anyhow::Error {
    let n = name(path);
    if format!("{e:#}").starts_with(&format!("{n}:")) {
        e
    } else {
        e.context(n)
    }
}

/// The display name of a path (a URL without its credentials or query).
pub fn name(path: &Path) -> String {
    match crate::source::remote_input(path) {
        Some(url) => crate::remote::display(url),
        None => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table as it was rendered before its columns were capped (format strings with a
    /// computed width): what it still is for values of at most 80 characters.
    fn old_table(rows: &[(&str, &str)]) -> String {
        let w1 = rows
            .iter()
            .map(|r| r.0.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let w2 = rows
            .iter()
            .map(|r| r.1.chars().count())
            .max()
            .unwrap_or(0)
            .max(5);
        let sep = format!("+-{}-+-{}-+\n", "-".repeat(w1), "-".repeat(w2));
        let mut out = sep.clone();
        out += &format!("| {:<w1$} | {:<w2$} |\n", "Field", "Value");
        out += &sep;
        for (k, v) in rows {
            out += &format!("| {k:<w1$} | {v:<w2$} |\n");
        }
        out + &sep
    }

    fn owned(rows: &[(&str, &str)]) -> Vec<(String, String)> {
        rows.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn short_values_render_as_before() {
        for rows in [
            vec![],
            vec![("a", "b")],
            vec![
                ("verdict", "PASS"),
                ("virtual size", "1 GiB (1073741824 bytes)"),
            ],
            vec![
                (
                    "reject: qcow2.unknown-incompatible-feature",
                    &"x".repeat(80)[..],
                ),
                ("é", "ü"),
            ],
        ] {
            assert_eq!(table(&owned(&rows)), old_table(&rows));
        }
    }

    #[test]
    fn long_values_neither_panic_nor_widen_the_table() {
        let long = "v".repeat(70_000);
        let wide = "w".repeat(81);
        let rows = owned(&[
            ("short", "1"),
            ("long", &long),
            ("wide", &wide),
            (&"k".repeat(49), "2"),
        ]);
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        // Columns of 5 and 5 characters: nothing short enough widened them.
        assert_eq!(lines[0], "+-------+-------+");
        assert_eq!(lines[3], "| short | 1     |");
        assert_eq!(
            lines[4],
            format!(
                "| long  | {} ... (65904 more characters) |",
                "v".repeat(4096)
            )
        );
        assert_eq!(lines[5], format!("| wide  | {wide} |"));
        assert_eq!(lines[6], format!("| {} | 2     |", "k".repeat(49)));
        assert_eq!(lines.len(), 8);
        // Linear: many rows of long values cost their text, not rows × the widest.
        let rows: Vec<(String, String)> = (0..1000)
            .map(|i| (format!("k{i}"), "x".repeat(i * 10)))
            .collect();
        let text: usize = rows
            .iter()
            .map(|(k, v)| k.len() + v.len().min(4096 + 40))
            .sum();
        assert!(table(&rows).len() < text + 1000 * 100);
    }

    #[test]
    fn a_shortened_cell_is_cut_on_a_character_and_stays_printable() {
        let v = format!("{}\u{1b}[31m", "é".repeat(5000));
        let t = table(&owned(&[("k", &v)]));
        assert!(t.contains(&format!(
            "| k     | {} ... (909 more characters) |",
            "é".repeat(4096)
        )));
        let v = format!("{}\u{1b}", "a".repeat(4095));
        let t = table(&owned(&[("k", &v)]));
        assert!(
            t.contains(&format!("{}\\u{{1b}} |", "a".repeat(4095))),
            "{t}"
        );
    }

    #[test]
    fn json_items_print_what_print_json_prints() {
        let items = [
            serde_json::json!({"a": 1, "b": [1, {"c": "x\ny"}], "d": {}, "e": []}),
            serde_json::json!({"filename": "f", "error": {"kind": "io"}}),
            serde_json::json!([]),
        ];
        for n in 1..=items.len() {
            let mut j = JsonItems::new(n);
            let mut out = String::new();
            for v in &items[..n] {
                out += &j.render(v);
            }
            out += j.end();
            let whole = if n == 1 {
                items[0].clone()
            } else {
                Value::Array(items[..n].to_vec())
            };
            assert_eq!(out, serde_json::to_string_pretty(&whole).unwrap() + "\n");
        }
    }
}
