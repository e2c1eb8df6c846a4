//! `glimpse ova {list,check,extract}`: OVA appliances (and standalone `.ovf` descriptors for
//! `list` and `check`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use glimpse_formats::finding::{Finding, Severity};
use glimpse_formats::ova::{self, Ova, OvfDir};
use glimpse_formats::{ErrorKind, Limits};
use serde_json::{json, Value};

use crate::common::{open_source, short_size, OutputFormat};

/// Arguments of `glimpse ova`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// List the members (with sizes), the disks (format, capacity, virtual size) and the
    /// virtual system.
    List(FileArgs),
    /// Apply the whole OVA policy: member names and types, descriptor, hrefs, sizes, manifest
    /// digests, and every disk's own check (exit 0 pass, 1 reject, 2 error).
    Check(FileArgs),
    /// Extract the regular-file members into DIR, only if the archive passes `ova check`
    /// (exit 0 extracted, 1 rejected and nothing written, 2 error).
    Extract(ExtractArgs),
}

#[derive(clap::Args)]
struct FileArgs {
    /// The OVA (or a standalone .ovf descriptor).
    file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

#[derive(clap::Args)]
struct ExtractArgs {
    /// The OVA.
    file: PathBuf,
    /// The directory to extract into (created if missing; existing files are never
    /// overwritten).
    dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// Runs the command; returns the exit code.
pub fn run(args: Args) -> anyhow::Result<u8> {
    let limits = Limits::default();
    let (file, output) = match &args.command {
        Command::List(a) | Command::Check(a) => (a.file.clone(), a.output),
        Command::Extract(a) => (a.file.clone(), a.output),
    };
    let result = match args.command {
        Command::List(a) => list(&a, &limits),
        Command::Check(a) => check(&a, &limits),
        Command::Extract(a) => extract(&a, &limits),
    };
    // --output json: one document whatever happens (the error also goes to stderr).
    if let (Err(e), OutputFormat::Json) = (&result, output) {
        let v = crate::common::error_json(&file.display().to_string(), e);
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    result
}

/// An opened input: an archive, or a descriptor with siblings.
enum Input {
    Ova(Ova),
    Dir(OvfDir),
}

fn is_ovf_path(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ovf"))
}

/// Opens the input. A tar that cannot be walked is a rejection (`Ok(Err(finding))`), an I/O
/// failure an error.
fn open_input(path: &Path, limits: &Limits) -> anyhow::Result<Result<Input, Finding>> {
    if is_ovf_path(path) {
        return match ova::read_ovf_dir(path, limits) {
            Ok(d) => Ok(Ok(Input::Dir(d))),
            Err(e) if e.kind() == ErrorKind::Io => Err(anyhow::anyhow!("{}: {e}", path.display())),
            Err(e) => Ok(Err(Finding::from_error(&e))),
        };
    }
    let src = open_source(path).with_context(|| path.display().to_string())?;
    match ova::read_ova(src, limits) {
        Ok(o) => Ok(Ok(Input::Ova(o))),
        Err(e) if e.kind() == ErrorKind::Io => Err(anyhow::anyhow!("{}: {e}", path.display())),
        Err(e) => Ok(Err(Finding::from_error(&e))),
    }
}

fn opt_size(v: &Value) -> String {
    v.as_u64().map(short_size).unwrap_or_else(|| "-".into())
}

/// The disk rows of `list`: the descriptor's facts plus what opening each disk shows.
fn disk_rows<I: std::ops::Deref<Target = dyn glimpse_formats::Image>>(
    disks: &[ova::DiskEntry],
    open: impl Fn(usize) -> glimpse_formats::Result<I>,
) -> Vec<Value> {
    disks
        .iter()
        .map(|d| {
            let mut v = serde_json::to_value(d).unwrap_or_default();
            if let Some(fmt) = d.desc.format_name() {
                v["format"] = fmt.into();
            }
            if d.href.is_some() {
                match open(d.index) {
                    Ok(img) => {
                        v["detected-format"] = img.info().format.name().into();
                        v["virtual-size"] = img.info().virtual_size.into();
                    }
                    Err(e) => v["error"] = e.to_string().into(),
                }
            }
            v
        })
        .collect()
}

/// The manifest's distinct algorithms, in first-seen order.
fn algorithms(m: &ova::Manifest) -> Vec<Value> {
    let mut v: Vec<Value> = Vec::new();
    for e in &m.entries {
        let a = serde_json::to_value(e.algo).unwrap_or_default();
        if !v.contains(&a) {
            v.push(a);
        }
    }
    v
}

/// `ova list` of a file that is no tar at all says so, instead of listing nothing or
/// reporting a tar error (`ova check` rejects it with `ova.tar-malformed`).
fn ensure_tar(path: &Path) -> anyhow::Result<()> {
    if is_ovf_path(path) {
        return Ok(());
    }
    let src = open_source(path).with_context(|| path.display().to_string())?;
    let det = glimpse_formats::detect(src.as_ref()).with_context(|| path.display().to_string())?;
    let mut magic = [0u8; 5];
    let ustar = src.read_exact_at(&mut magic, 257).is_ok() && &magic == b"ustar";
    if !ustar && !det.matches.contains(&glimpse_formats::Format::Ova) {
        anyhow::bail!(
            "{}: not an OVA (no tar archive; the file looks like {})",
            path.display(),
            det.format()
        );
    }
    Ok(())
}

fn list(a: &FileArgs, limits: &Limits) -> anyhow::Result<u8> {
    ensure_tar(&a.file)?;
    let input = match open_input(&a.file, limits)? {
        Ok(i) => i,
        Err(f) => anyhow::bail!("{}: {}", a.file.display(), f.message),
    };
    let doc = match &input {
        Input::Ova(o) => {
            let members: Vec<Value> = o
                .members
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut v = serde_json::to_value(m).unwrap_or_default();
                    v["index"] = i.into();
                    v
                })
                .collect();
            json!({
                "filename": a.file.display().to_string(),
                "members": members,
                "descriptor": o.descriptor_member.and_then(|i| o.members.get(i)).map(|m| m.name.clone()),
                "manifest": o.manifest.as_ref().map(|m| json!({
                    "name": m.name,
                    "algorithms": algorithms(m),
                    "entries": m.entries.len(),
                })),
                "disks": disk_rows(&o.disks, |i| o.open_inner(i, limits)),
                "references": o.descriptor.as_ref().map(|d| d.files.clone()).unwrap_or_default(),
                "virtual-systems": o.descriptor.as_ref().map(|d| d.systems.clone()).unwrap_or_default(),
            })
        }
        Input::Dir(d) => {
            let disks = d.disks();
            json!({
                "filename": a.file.display().to_string(),
                "references": d.references,
                "disks": disk_rows(&disks, |i| d.open_disk(i, limits)),
                "virtual-systems": d.descriptor.systems,
            })
        }
    };
    if a.output == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    println!("{}", a.file.display());
    if let Some(ms) = doc["members"].as_array() {
        println!("Members:");
        println!("  {:>3}  {:<12} {:>12}  NAME", "#", "TYPE", "SIZE");
        for m in ms {
            println!(
                "  {:>3}  {:<12} {:>12}  {}{}",
                m["index"].as_u64().unwrap_or(0),
                m["type"].as_str().unwrap_or("?"),
                m["size"].as_u64().unwrap_or(0),
                m["name"].as_str().unwrap_or("?"),
                m["link"]
                    .as_str()
                    .map(|l| format!(" -> {l}"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(rs) = doc["references"]
        .as_array()
        .filter(|_| matches!(input, Input::Dir(_)))
    {
        println!("References:");
        for r in rs {
            let state = if r["openable"].as_bool() == Some(true) {
                "beside the descriptor"
            } else {
                "not opened"
            };
            println!("  {}  ({state})", r["href"].as_str().unwrap_or("?"));
        }
    }
    println!("Disks:");
    println!(
        "  {:>3}  {:<24} {:<24} {:>12} {:>12} {:>12}",
        "#", "HREF", "FORMAT", "CAPACITY", "VIRTUAL", "POPULATED"
    );
    for d in doc["disks"].as_array().into_iter().flatten() {
        let fmt = match (d["format"].as_str(), d["detected-format"].as_str()) {
            (Some(f), _) => f.to_string(),
            (None, Some(f)) => f.to_string(),
            _ => "-".into(),
        };
        println!(
            "  {:>3}  {:<24} {:<24} {:>12} {:>12} {:>12}",
            d["index"].as_u64().unwrap_or(0),
            d["href"].as_str().unwrap_or("-"),
            fmt,
            opt_size(&d["capacity"]),
            opt_size(&d["virtual-size"]),
            opt_size(&d["populated-size"]),
        );
        if let Some(e) = d["error"].as_str() {
            println!("       error: {e}");
        }
    }
    for s in doc["virtual-systems"].as_array().into_iter().flatten() {
        println!(
            "Virtual system {}: name {}, OS {}, {} CPUs, memory {}",
            s["id"].as_str().unwrap_or("?"),
            s["name"].as_str().unwrap_or("-"),
            s["os-type"].as_str().unwrap_or("-"),
            s["cpus"]
                .as_u64()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "?".into()),
            opt_size(&s["memory"]),
        );
    }
    if let Some(m) = doc["manifest"].as_object() {
        println!(
            "Manifest: {} ({} entries, {})",
            m["name"].as_str().unwrap_or("?"),
            m["entries"],
            m["algorithms"]
        );
    }
    Ok(0)
}

/// Every `ova check` finding for `input`.
fn findings_of(input: &Input, limits: &Limits) -> anyhow::Result<Vec<Finding>> {
    match input {
        Input::Ova(o) => Ok(o.check_all(limits)?),
        Input::Dir(d) => {
            let mut out = d.findings.clone();
            for (i, r) in d.descriptor.disks.iter().enumerate() {
                let openable = r
                    .file_ref
                    .as_deref()
                    .and_then(|id| d.references.iter().find(|s| s.file.id == id))
                    .is_some_and(|s| s.openable);
                if !openable {
                    continue; // reported as ova.href
                }
                match d.open_disk(i, limits) {
                    Ok(img) => {
                        out.extend(img.findings().iter().cloned());
                        out.extend(img.check(limits)?);
                        if let Some(cap) = r.capacity.filter(|c| *c != img.info().virtual_size) {
                            out.push(Finding::reject(
                                "ova.capacity-mismatch",
                                format!(
                                    "disk {i}: capacity {cap} but virtual size {}",
                                    img.info().virtual_size
                                ),
                            ));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Io => return Err(e.into()),
                    Err(e) => out.push(Finding::from_error(&e)),
                }
            }
            out.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.offset.cmp(&b.offset)));
            Ok(out)
        }
    }
}

fn verdict(f: &[Finding]) -> &'static str {
    if f.iter().any(|f| f.severity == Severity::Reject) {
        "reject"
    } else {
        "pass"
    }
}

fn print_findings(
    file: &Path,
    findings: &[Finding],
    output: OutputFormat,
    extra: Value,
) -> anyhow::Result<()> {
    if output == OutputFormat::Json {
        let mut doc = json!({
            "filename": file.display().to_string(),
            "format": "ova",
            "verdict": verdict(findings),
            "findings": findings,
        });
        if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("{}: {}", file.display(), verdict(findings));
    for f in findings {
        let sev = match f.severity {
            Severity::Reject => "reject",
            Severity::Warn => "warn",
            Severity::Info => "info",
        };
        let at = f
            .offset
            .map(|o| format!(" (at offset {o:#x})"))
            .unwrap_or_default();
        println!("  {sev:<6} {:<30} {}{at}", f.code, f.message);
    }
    Ok(())
}

fn check(a: &FileArgs, limits: &Limits) -> anyhow::Result<u8> {
    let findings = match open_input(&a.file, limits)? {
        Ok(input) => findings_of(&input, limits).with_context(|| a.file.display().to_string())?,
        Err(f) => vec![f],
    };
    print_findings(&a.file, &findings, a.output, Value::Null)?;
    Ok(if verdict(&findings) == "reject" { 1 } else { 0 })
}

fn extract(a: &ExtractArgs, limits: &Limits) -> anyhow::Result<u8> {
    if is_ovf_path(&a.file) {
        anyhow::bail!(
            "{}: extract takes an OVA archive, not a descriptor",
            a.file.display()
        );
    }
    let o = match open_input(&a.file, limits)? {
        Ok(Input::Ova(o)) => o,
        Ok(Input::Dir(_)) => anyhow::bail!("{}: not an OVA archive", a.file.display()),
        Err(f) => {
            print_findings(&a.file, &[f], a.output, json!({"written": []}))?;
            eprintln!(
                "glimpse: {}: rejected; nothing was extracted",
                a.file.display()
            );
            return Ok(1);
        }
    };
    let x = o
        .extract(&a.dir, limits)
        .with_context(|| format!("extracting {} into {}", a.file.display(), a.dir.display()))?;
    let written: Vec<String> = x.written.iter().map(|p| p.display().to_string()).collect();
    if a.output == OutputFormat::Json {
        print_findings(
            &a.file,
            &x.findings,
            a.output,
            json!({ "written": written }),
        )?;
    } else if x.rejected {
        print_findings(&a.file, &x.findings, a.output, Value::Null)?;
    } else {
        for w in &written {
            println!("{w}");
        }
    }
    if x.rejected {
        eprintln!(
            "glimpse: {}: rejected; nothing was extracted",
            a.file.display()
        );
        return Ok(1);
    }
    Ok(0)
}
