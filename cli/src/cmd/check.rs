//! `glimpse check`: the safety policy and structural checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, RwLock};

use glimpse_formats::policy::{self, inspect, Policy, Report, Verdict};
use glimpse_formats::{Format, Limits, Severity};
use serde_json::{json, Map, Value};

use crate::common::{
    failed, info_json, info_rows, name, open_source, parse_format, parse_size, table, JsonItems,
    OutputFormat,
};

/// Arguments of `glimpse check`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    remote: crate::remote::Opts,
    /// The declared format: a different detected format is a rejection (a qcow2 declared raw,
    /// or a raw declared qcow2). Glance's names; vpc is accepted for vhd.
    #[arg(long, value_parser = parse_format, value_name = "FORMAT")]
    expect_format: Option<Format>,
    /// Reject images whose virtual size exceeds this (k, M, G, T suffixes). No default;
    /// Glance's default image_size_cap is 1 TiB.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    max_virtual_size: Option<u64>,
    /// Accept a qcow2 backing file (it is still never opened).
    #[arg(long)]
    allow_backing_file: bool,
    /// Accept an image whose guest data is encrypted (`image.encrypted` becomes a warning):
    /// for an upload where the consumer holds the key. Its content is still never read.
    #[arg(long)]
    allow_encrypted: bool,
    /// With an OVA holding several disks: check only this disk (0-based). By default every
    /// disk is checked.
    #[arg(long, value_name = "N")]
    disk: Option<usize>,
    /// Output format: with json, one object for one file, an array for several; a file that
    /// could not be checked is an object with `filename` and `error`.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Image files; several are checked in parallel, each printed in order as soon as it and
    /// every one before it are done.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

/// One file's result: what is printed for it (the JSON object or the human table, whichever
/// is asked), or why it could not be checked.
enum Outcome {
    Checked { printed: Printed, verdict: Verdict },
    Failed(String, anyhow::Error),
}

/// A checked file's rendering in the output format asked for: the other one is never built.
enum Printed {
    Json(Value),
    Human(String),
}

/// Runs `glimpse check`: exit 0 when every file passes, 1 when any is rejected, 2 when any
/// could not be checked.
pub fn run(args: Args) -> anyhow::Result<u8> {
    args.remote.apply();
    let policy = Policy {
        expect_format: args.expect_format,
        max_virtual_size: args.max_virtual_size,
        allow_backing_file: args.allow_backing_file,
        disk: args.disk,
        allow_encrypted: args.allow_encrypted,
        ..Policy::default()
    };
    let limits = crate::common::limits();
    let human = args.output == OutputFormat::Human;
    let files = &args.files;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let workers = cores.clamp(1, files.len().max(1));
    let printer = Printer {
        state: Mutex::new(Emitted {
            claimed: 0,
            next: 0,
            held: BTreeMap::new(),
            json: (!human).then(|| JsonItems::new(files.len())),
            code: 0,
        }),
        turn: Condvar::new(),
        // Results done before an earlier one are held until it is printed: at most this many.
        window: workers.saturating_mul(4),
    };
    // Checks share the command's budget and run together; a check run alone holds `gate`
    // exclusively, so that nothing else charges the budget meanwhile.
    let gate = RwLock::new(());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                while let Some(i) = printer.claim(files.len()) {
                    let Some(path) = files.get(i) else { break };
                    let outcome = check_fairly(path, files.len(), &gate, &policy, &limits, human);
                    printer.done(i, outcome);
                }
            });
        }
    });
    let state = printer
        .state
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(json) = state.json {
        json.finish();
    }
    Ok(state.code)
}

/// Checks `path` with the others in flight, under the command's one budget; when the result
/// is a rejection and the budget refused a charge meanwhile (the refusal may have been only
/// because other files held budget), checks it again alone, with the whole budget, so that
/// no file's verdict depends on the other files on the command line (docs/memory.md).
fn check_fairly(
    path: &Path,
    files: usize,
    gate: &RwLock<()>,
    policy: &Policy,
    limits: &Limits,
    human: bool,
) -> Outcome {
    let budget = limits.budget();
    let (outcome, contended) = {
        let _shared = gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let refused = budget.refusals();
        let outcome = check_one(path, policy, limits, human);
        (outcome, budget.refusals() != refused)
    };
    let rejected = matches!(
        outcome,
        Outcome::Checked {
            verdict: Verdict::Reject,
            ..
        }
    );
    if files > 1 && contended && rejected {
        drop(outcome);
        let _alone = gate
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        return check_one(path, policy, limits, human);
    }
    outcome
}

/// Prints the files' results in command-line order, each as soon as it and every one before
/// it are done.
struct Printer {
    state: Mutex<Emitted>,
    /// Signalled when a result is printed: a worker may claim the next file.
    turn: Condvar,
    window: usize,
}

struct Emitted {
    /// Files claimed by a worker so far (the next to claim).
    claimed: usize,
    /// The next file to print.
    next: usize,
    /// Results of files after `next`, done before it.
    held: BTreeMap<usize, Outcome>,
    /// The JSON printer, with `--output json`.
    json: Option<JsonItems>,
    /// The exit status so far.
    code: u8,
}

impl Printer {
    /// The next file to check, once fewer than `window` files are done or in flight ahead
    /// of the next to print; `None` when every file is claimed.
    fn claim(&self, files: usize) -> Option<usize> {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while s.claimed < files && s.claimed >= s.next.saturating_add(self.window) {
            s = self
                .turn
                .wait(s)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if s.claimed >= files {
            return None;
        }
        let i = s.claimed;
        s.claimed = i.saturating_add(1);
        Some(i)
    }

    /// File `i`'s result: printed now, with every held one after it, if every file before it
    /// is printed; held otherwise.
    fn done(&self, i: usize, outcome: Outcome) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.held.insert(i, outcome);
        loop {
            let next = s.next;
            let Some(o) = s.held.remove(&next) else { break };
            s.emit(o);
            s.next = next.saturating_add(1);
        }
        drop(s);
        self.turn.notify_all();
    }
}

impl Emitted {
    fn emit(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Checked { printed, verdict } => {
                if verdict == Verdict::Reject {
                    self.code = self.code.max(1);
                }
                match (printed, &mut self.json) {
                    (Printed::Json(v), Some(json)) => json.item(v),
                    (Printed::Human(text), _) => out!("{text}"),
                    (Printed::Json(_), None) => {}
                }
            }
            Outcome::Failed(fname, e) => {
                let (v, _) = failed(&fname, &e);
                if let Some(json) = &mut self.json {
                    json.item(v);
                }
                self.code = 2;
            }
        }
    }
}

/// Checks one file, rendering its result as `human` asks: the human table or the JSON object.
fn check_one(path: &Path, policy: &Policy, limits: &Limits, human: bool) -> Outcome {
    let fname = name(path);
    let src = match open_source(path) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(fname, e),
    };
    // An OVA checked without `--disk`: a gate checks every disk, not only the first
    // (`policy::every_disk`, on the archive `inspect` already read). The per-disk verdicts
    // and findings go to the JSON `disks` array.
    let checked = inspect(src, policy, limits)
        .map_err(anyhow::Error::from)
        .map(|mut report| {
            let disks = policy::every_disk(&mut report, policy, limits);
            (report, disks)
        });
    let (report, disks) = match crate::source::settled(path, checked) {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(fname, e),
    };
    let verdict = report.verdict();
    let printed = if human {
        Printed::Human(table(&human_rows(&fname, &report, verdict)))
    } else {
        let disks = disks.and_then(|d| serde_json::to_value(d).ok());
        Printed::Json(json_object(&fname, &report, verdict, disks))
    };
    Outcome::Checked { printed, verdict }
}

/// A checked file's JSON object (docs/json).
fn json_object(fname: &str, report: &Report, verdict: Verdict, disks: Option<Value>) -> Value {
    let mut obj = match report.info() {
        Some(info) => info_json(fname, info),
        None => {
            let mut m = Map::new();
            m.insert("filename".into(), json!(fname));
            m.insert("format".into(), json!(report.format().name()));
            m
        }
    };
    let detected: Vec<&str> = report.detection.matches.iter().map(|f| f.name()).collect();
    obj.insert("detected-formats".into(), json!(detected));
    obj.insert("verdict".into(), json!(verdict));
    obj.insert(
        "findings".into(),
        serde_json::to_value(&report.findings).unwrap_or(Value::Null),
    );
    if let Some(d) = disks {
        obj.insert("disks".into(), d);
    }
    Value::Object(obj)
}

/// A checked file's rows of the human table: the verdict, the info, then each finding.
fn human_rows(fname: &str, report: &Report, verdict: Verdict) -> Vec<(String, String)> {
    let mut rows = vec![(
        "verdict".to_string(),
        if verdict == Verdict::Pass {
            "PASS"
        } else {
            "REJECT"
        }
        .to_string(),
    )];
    match report.info() {
        Some(info) => rows.extend(info_rows(fname, info)),
        None => rows.extend([
            ("filename".into(), fname.to_string()),
            ("format".into(), report.format().name().into()),
        ]),
    }
    for f in &report.findings {
        let sev = match f.severity {
            Severity::Reject => "reject",
            Severity::Warn => "warn",
            Severity::Info => "info",
        };
        let at = f.offset.map(|o| format!(" @ {o:#x}")).unwrap_or_default();
        rows.push((format!("{sev}: {}", f.code), format!("{}{at}", f.message)));
    }
    rows
}
