//! `glimpse map`: the extents backing the guest disk, as `qemu-img map` prints them.

use std::path::PathBuf;

use glimpse_formats::{Extent, ExtentKind};
use serde_json::{json, Value};

use crate::common::{failed, load, name, print_json, InputOpts, OutputFormat};

/// Arguments of `glimpse map`.
#[derive(clap::Args)]
pub struct Args {
    /// Output format: with json, an array of extents, or an object with `filename` and
    /// `error` when the image cannot be mapped.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    #[command(flatten)]
    input: InputOpts,
    /// Image file.
    file: PathBuf,
}

/// One merged entry.
struct Entry {
    start: u64,
    len: u64,
    data: bool,
    zero: bool,
    present: bool,
    compressed: bool,
    offset: Option<u64>,
}

impl Entry {
    fn from_extent(e: &Extent) -> Self {
        let (data, zero, present, compressed, offset) = match e.kind {
            ExtentKind::Data { host } => (true, false, true, false, Some(host)),
            ExtentKind::Compressed { .. } => (true, false, true, true, None),
            ExtentKind::Zero => (false, true, true, false, None),
            ExtentKind::Unallocated => (false, true, false, false, None),
        };
        Entry {
            start: e.start,
            len: e.len,
            data,
            zero,
            present,
            compressed,
            offset,
        }
    }

    /// Merges `next` into `self` when it continues it with the same kind (and, for data, the
    /// next host offset).
    fn merge(&mut self, next: &Entry) -> bool {
        let same = self.data == next.data
            && self.zero == next.zero
            && self.present == next.present
            && self.compressed == next.compressed;
        let contiguous = match (self.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(self.len) == Some(b),
            (None, None) => true,
            _ => false,
        };
        if same && contiguous && self.start + self.len == next.start {
            self.len += next.len;
            true
        } else {
            false
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "start": self.start, "length": self.len, "depth": 0, "present": self.present,
            "zero": self.zero, "data": self.data, "compressed": self.compressed,
        });
        if let (Some(o), Some(m)) = (self.offset, v.as_object_mut()) {
            m.insert("offset".into(), json!(o));
        }
        v
    }
}

/// Runs `glimpse map`: exit 0, 1 when the policy refuses the image, 2 when it cannot be read.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let entries = match extents(&args) {
        Ok(e) => e,
        Err(e) => {
            let (v, status) = failed(&name(&args.file), &e);
            if args.output == OutputFormat::Json {
                print_json(vec![v]);
            }
            return Ok(status);
        }
    };
    match args.output {
        OutputFormat::Json => {
            let v: Vec<Value> = entries.iter().map(Entry::json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            println!("{:<20} {:<20} {:<20} kind", "Offset", "Length", "Mapped to");
            for e in &entries {
                let kind = match (e.data, e.compressed, e.zero, e.present) {
                    (true, true, _, _) => "compressed",
                    (true, false, _, _) => "data",
                    (false, _, true, true) => "zero",
                    _ => "unallocated",
                };
                let mapped = e
                    .offset
                    .map(|o| format!("{o:#x}"))
                    .unwrap_or_else(|| "-".into());
                println!("{:<#20x} {:<#20x} {:<20} {kind}", e.start, e.len, mapped);
            }
        }
    }
    Ok(0)
}

/// The merged extents of the image.
fn extents(args: &Args) -> anyhow::Result<Vec<Entry>> {
    let image = load(&args.file, None, &args.input)?.image;
    let size = image.info().virtual_size;
    let mut entries: Vec<Entry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let e = image.mapping(pos, size - pos)?;
        let entry = Entry::from_extent(&e);
        let merged = entries.last_mut().is_some_and(|last| last.merge(&entry));
        if !merged {
            entries.push(entry);
        }
        pos = e.end();
    }
    Ok(entries)
}
