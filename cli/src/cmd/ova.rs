//! `glimpse ova {list,check,extract}`: OVA appliances (and standalone `.ovf` descriptors for
//! `list` and `check`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use glimpse_formats::finding::{Finding, Severity};
use glimpse_formats::ova::{self, Appliance};
use glimpse_formats::Limits;
use serde_json::{json, Value};

use crate::common::{open_source, printable, short_size, OutputFormat};

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
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// The OVA (or a standalone .ovf descriptor).
    file: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

#[derive(clap::Args)]
struct ExtractArgs {
    #[command(flatten)]
    remote: crate::remote::Opts,
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
    let limits = crate::common::limits();
    let (file, output) = match &args.command {
        Command::List(a) | Command::Check(a) => {
            a.remote.apply();
            (a.file.clone(), a.output)
        }
        Command::Extract(a) => {
            a.remote.apply();
            (a.file.clone(), a.output)
        }
    };
    let result = match args.command {
        Command::List(a) => list(&a, &limits),
        Command::Check(a) => check(&a, &limits),
        Command::Extract(a) => extract(&a, &limits),
    };
    // --output json: one document whatever happens (the error also goes to stderr).
    if let (Err(e), OutputFormat::Json) = (&result, output) {
        let v = crate::common::error_json(&crate::common::name(&file), e);
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    result
}

/// Reads the input: a `.ovf` path as a descriptor with siblings, anything else as an archive.
/// An input that cannot be read is a rejection (`Ok(Err(finding))`), an I/O failure an error.
fn open_input(path: &Path, limits: &Limits) -> anyhow::Result<Result<Appliance, Finding>> {
    let read = if ova::is_ovf_path(path) {
        ova::read_dir(path, limits)
    } else {
        let src = open_source(path).map_err(|e| crate::common::named(e, path))?;
        ova::read_archive(src, limits)
    };
    ova::or_rejection(read).map_err(|e| anyhow::anyhow!("{}: {e}", crate::common::name(path)))
}

fn opt_size(v: &Value) -> String {
    v.as_u64().map(short_size).unwrap_or_else(|| "-".into())
}

/// `ova list` of a file that is no tar at all says so, instead of listing nothing or
/// reporting a tar error (`ova check` rejects it with `ova.tar-malformed`).
fn ensure_tar(path: &Path) -> anyhow::Result<()> {
    if ova::is_ovf_path(path) {
        return Ok(());
    }
    let src = open_source(path).map_err(|e| crate::common::named(e, path))?;
    if let Some(looks) =
        ova::not_a_tar(src.as_ref()).map_err(|e| crate::common::named(e.into(), path))?
    {
        anyhow::bail!(
            "{}: not an OVA (no tar archive; the file looks like {looks})",
            crate::common::name(path)
        );
    }
    Ok(())
}

fn list(a: &FileArgs, limits: &Limits) -> anyhow::Result<u8> {
    ensure_tar(&a.file)?;
    let input = match open_input(&a.file, limits)? {
        Ok(i) => i,
        Err(f) => anyhow::bail!("{}: {}", crate::common::name(&a.file), f.message),
    };
    let doc = input.listing(&crate::common::name(&a.file).to_string(), limits);
    crate::source::unchanged(&a.file).map_err(|e| crate::common::named(e.into(), &a.file))?;
    if a.output == OutputFormat::Json {
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(0);
    }
    outln!("{}", crate::common::name(&a.file));
    print_members(&doc);
    if matches!(input, Appliance::Dir(_)) {
        print_references(&doc);
    }
    print_disks(&doc);
    print_systems_and_manifest(&doc);
    Ok(0)
}

fn print_members(doc: &Value) {
    let Some(ms) = doc["members"].as_array() else {
        return;
    };
    outln!("Members:");
    outln!("  {:>3}  {:<12} {:>12}  NAME", "#", "TYPE", "SIZE");
    for m in ms {
        outln!(
            "  {:>3}  {:<12} {:>12}  {}{}",
            m["index"].as_u64().unwrap_or(0),
            m["type"].as_str().unwrap_or("?"),
            m["size"].as_u64().unwrap_or(0),
            printable(m["name"].as_str().unwrap_or("?")),
            m["link"]
                .as_str()
                .map(|l| format!(" -> {}", printable(l)))
                .unwrap_or_default()
        );
    }
}

fn print_references(doc: &Value) {
    let Some(rs) = doc["references"].as_array() else {
        return;
    };
    outln!("References:");
    for r in rs {
        let state = if r["openable"].as_bool() == Some(true) {
            "beside the descriptor"
        } else {
            "not opened"
        };
        outln!(
            "  {}  ({state})",
            printable(r["href"].as_str().unwrap_or("?"))
        );
    }
}

fn print_disks(doc: &Value) {
    outln!("Disks:");
    outln!(
        "  {:>3}  {:<24} {:<24} {:>12} {:>12} {:>12}",
        "#",
        "HREF",
        "FORMAT",
        "CAPACITY",
        "VIRTUAL",
        "POPULATED"
    );
    for d in doc["disks"].as_array().into_iter().flatten() {
        let fmt = match (d["format"].as_str(), d["detected-format"].as_str()) {
            (Some(f), _) => f.to_string(),
            (None, Some(f)) => f.to_string(),
            _ => "-".into(),
        };
        outln!(
            "  {:>3}  {:<24} {:<24} {:>12} {:>12} {:>12}",
            d["index"].as_u64().unwrap_or(0),
            printable(d["href"].as_str().unwrap_or("-")),
            printable(&fmt),
            opt_size(&d["capacity"]),
            opt_size(&d["virtual-size"]),
            opt_size(&d["populated-size"]),
        );
        if let Some(e) = d["error"].as_str() {
            outln!("       error: {}", printable(e));
        }
    }
}

fn print_systems_and_manifest(doc: &Value) {
    for s in doc["virtual-systems"].as_array().into_iter().flatten() {
        outln!(
            "Virtual system {}: name {}, OS {}, {} CPUs, memory {}",
            printable(s["id"].as_str().unwrap_or("?")),
            printable(s["name"].as_str().unwrap_or("-")),
            printable(s["os-type"].as_str().unwrap_or("-")),
            s["cpus"]
                .as_u64()
                .map(|c| c.to_string())
                .unwrap_or_else(|| "?".into()),
            opt_size(&s["memory"]),
        );
    }
    if let Some(m) = doc["manifest"].as_object() {
        outln!(
            "Manifest: {} ({} entries, {})",
            printable(m["name"].as_str().unwrap_or("?")),
            m["entries"],
            m["algorithms"]
        );
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
            "filename": crate::common::name(file).to_string(),
            "format": "ova",
            "verdict": ova::verdict(findings),
            "findings": findings,
        });
        if let (Some(d), Some(e)) = (doc.as_object_mut(), extra.as_object()) {
            d.extend(e.clone());
        }
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    outln!("{}: {}", crate::common::name(file), ova::verdict(findings));
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
        outln!("  {sev:<6} {:<30} {}{at}", f.code, printable(&f.message));
    }
    Ok(())
}

fn check(a: &FileArgs, limits: &Limits) -> anyhow::Result<u8> {
    let findings = match open_input(&a.file, limits)? {
        Ok(input) => input
            .check(limits)
            .map_err(|e| crate::common::named(e.into(), &a.file))?,
        Err(f) => vec![f],
    };
    crate::source::unchanged(&a.file).map_err(|e| crate::common::named(e.into(), &a.file))?;
    print_findings(&a.file, &findings, a.output, Value::Null)?;
    Ok(if ova::verdict(&findings) == "reject" {
        1
    } else {
        0
    })
}

fn extract(a: &ExtractArgs, limits: &Limits) -> anyhow::Result<u8> {
    if ova::is_ovf_path(&a.file) {
        anyhow::bail!(
            "{}: extract takes an OVA archive, not a descriptor",
            crate::common::name(&a.file)
        );
    }
    let o = match open_input(&a.file, limits)? {
        Ok(Appliance::Archive(o)) => o,
        Ok(Appliance::Dir(_)) => {
            anyhow::bail!("{}: not an OVA archive", crate::common::name(&a.file))
        }
        Err(f) => {
            print_findings(&a.file, &[f], a.output, json!({"written": []}))?;
            errln!(
                "glimpse: {}: rejected; nothing was extracted",
                crate::common::name(&a.file)
            );
            return Ok(1);
        }
    };
    crate::interrupt::install(crate::interrupt::Again::Exits);
    let register = |p: &Path| -> Box<dyn std::any::Any> { Box::new(crate::interrupt::register(p)) };
    let hooks = ova::ExtractHooks {
        cancel: Some(crate::interrupt::flag()),
        temp: Some(&register),
        before_commit: Some(&|| crate::source::unchanged(&a.file)),
    };
    let x = match o.extract_with(&a.dir, limits, &hooks) {
        // A signal wins over the error it caused: the temporary files are gone.
        Err(_) if crate::interrupt::cancelled() => anyhow::bail!(
            "{}: interrupted by {}; nothing was extracted",
            crate::common::name(&a.file),
            crate::interrupt::signal_name()
        ),
        r => r.with_context(|| {
            format!(
                "extracting {} into {}",
                crate::common::name(&a.file),
                a.dir.display()
            )
        })?,
    };
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
            outln!("{w}");
        }
    }
    if x.rejected {
        errln!(
            "glimpse: {}: rejected; nothing was extracted",
            crate::common::name(&a.file)
        );
        return Ok(1);
    }
    Ok(0)
}
