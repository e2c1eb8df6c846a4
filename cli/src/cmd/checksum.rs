//! `glimpse checksum`: file digests in one pass, and the content digest.

use std::path::{Path, PathBuf};

use glimpse_formats::digest::{content_digest, file_digests, stream_digests, Algo};
use glimpse_formats::reader::GuestReader;
use glimpse_formats::ReadAt;
use serde_json::{json, Map, Value};

use crate::common::{failed, load, name, print_json, InputOpts, OutputFormat, Rejected};
use crate::source::open_stream;

/// Arguments of `glimpse checksum`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// Algorithms, comma-separated: md5, sha1, sha256, sha512. The default, md5 and sha512,
    /// gives Glance's `checksum` and `os_hash_value` (os_hash_algo=sha512).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "md5,sha512",
        conflicts_with = "content"
    )]
    algo: Vec<Algo>,
    /// Digest the guest-visible content instead of the file: the same disk gives the same
    /// value in every format and compression (docs/content-digest.md).
    #[arg(long)]
    content: bool,
    #[command(flatten)]
    input: InputOpts,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Files, `-` (stdin), or URLs (http(s)://, glance://ID; docs/remote.md). A URL's server
    /// must say the object's size (Content-Length or Content-Range), at most 1 TiB (Glance's
    /// default image_size_cap): a body of unknown length could be cut short unseen, so it is
    /// refused. The digest is always of one version of the object: with an ETag or
    /// Last-Modified, several ranged GETs pinned to it (any change fails the command); without
    /// either, one GET, whose single response is the version digested.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// Runs `glimpse checksum`.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    let mut items = Vec::new();
    let mut code = 0;
    let mut algos = args.algo.clone();
    algos.sort();
    algos.dedup();
    for path in &args.files {
        let fname = name(path);
        let result = (|| -> anyhow::Result<Value> {
            if args.input.disk.is_some() && !args.content {
                // File digests cover the whole OVA: a disk number would be silently ignored.
                // Said for each file, so that --output json still prints a document.
                return Err(crate::common::usage(
                    "--disk selects a disk for --content only",
                ));
            }
            let mut m = Map::new();
            m.insert("filename".into(), json!(fname));
            if args.content {
                let loaded = load(path, None, &args.input)?;
                m.insert(
                    "virtual-size".into(),
                    json!(loaded.image.info().virtual_size),
                );
                let reader = GuestReader::new(loaded.image, &crate::common::limits());
                let d = content_digest(&reader, &|_, _| {})?;
                m.insert("content".into(), json!(d));
            } else {
                let (size, digests) = digest_file(path, &algos)?;
                if size == 0 && !args.input.force {
                    // An empty file, or a pipe whose writer failed before writing: the
                    // digests of no bytes would read as a result.
                    return Err(Rejected {
                        code: "raw.empty",
                        message: "the input is empty (0 bytes): no digests of nothing are \
                                  printed (use --force to print them)"
                            .into(),
                    }
                    .into());
                }
                m.insert("size".into(), json!(size));
                for (algo, hex) in digests {
                    m.insert(algo.name().into(), json!(hex));
                }
            }
            Ok(Value::Object(m))
        })();
        let result = crate::source::settled(path, result);
        match result {
            Ok(v) => {
                if args.output == OutputFormat::Human {
                    if args.content {
                        outln!("{}  {fname}", v["content"].as_str().unwrap_or_default());
                    } else {
                        for a in &algos {
                            outln!("{}  {fname}", v[a.name()].as_str().unwrap_or_default());
                        }
                    }
                }
                items.push(v);
            }
            Err(e) => {
                let (v, status) = failed(&fname, &e);
                items.push(v);
                code = code.max(status);
            }
        }
    }
    if args.output == OutputFormat::Json {
        print_json(items);
    }
    Ok(code)
}

/// File digests of `path`: read in parallel blocks from a file or block device (whose size
/// comes from the device), or front to back from a pipe, FIFO or stdin (`-`).
fn digest_file(path: &Path, algos: &[Algo]) -> anyhow::Result<(u64, Vec<(Algo, String)>)> {
    if let Some(url) = crate::source::remote_input(path) {
        // The body is read once, front to back, whether or not the server answers ranges: in
        // ranged GETs pinned to the object's validators, or (no validator, no ranges) in one
        // GET. Its size is known (an object of unknown size is refused when opened), and a
        // body that ends before it is an error, never a digest.
        let src = crate::remote::open(url)?;
        let mut body = src.sequential()?;
        let (size, digests) = stream_digests(&mut body, algos, &|_| {})?;
        if src.size_hint().is_some_and(|s| s != size) {
            anyhow::bail!(
                "the server sent {size} bytes for an object of {} bytes",
                src.size_hint().unwrap_or(0)
            );
        }
        return Ok((size, digests));
    }
    let (mut file, kind) = open_stream(path)?;
    if kind.is_random_access() {
        let size = ReadAt::size(&file)?;
        return Ok((size, file_digests(&file, algos, &|_| {})?));
    }
    Ok(stream_digests(&mut file, algos, &|_| {})?)
}
