//! The hostile-fixture runner.
//!
//! Each `fixtures/hostile/<folder>/` holds an `expected-codes` file: one line per fixture,
//! `file-name code [code ...]`, listing the finding codes `glimpse check` reports for it, in
//! order (a fixture with no code checks clean); `#` starts a comment. Every fixture of the
//! folder has exactly one line and every line names a fixture: the runner asserts both, so a
//! new fixture cannot go untested and a removed one cannot leave a stale line.
//!
//! When a change moves a code on purpose, `GLIMPSE_BLESS=1` rewrites the lines that differ
//! (and adds lines for fixtures that have none) instead of failing; review the diff.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use glimpse_formats::policy::{inspect, Policy, Report};
use glimpse_formats::{Limits, Source};

/// The name of the file in each hostile folder that lists the codes.
pub const EXPECTED: &str = "expected-codes";

/// One fixture and the codes its `expected-codes` line lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixture {
    /// The file name inside the folder.
    pub name: String,
    /// The file's path.
    pub path: PathBuf,
    /// The finding codes `check` must report, in order. Empty: the fixture checks clean.
    pub codes: Vec<String>,
}

/// `fixtures/hostile/<folder>`.
pub fn dir(folder: &str) -> PathBuf {
    crate::fixtures_dir().join("hostile").join(folder)
}

/// True for the files of a hostile folder that are not fixtures: the README, the
/// `expected-codes` list and the scripts that made the fixtures.
pub fn is_not_a_fixture(name: &str) -> bool {
    name == EXPECTED || [".md", ".py", ".sh"].iter().any(|ext| name.ends_with(ext))
}

/// The fixture files of a hostile folder, sorted by name.
pub fn fixture_files(folder: &str) -> Vec<String> {
    let d = dir(folder);
    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
        .map(|e| e.expect("a readable folder entry"))
        .filter(|e| e.path().is_file())
        .map(|e| {
            e.file_name()
                .into_string()
                .expect("fixture names are UTF-8")
        })
        .filter(|n| !is_not_a_fixture(n))
        .collect();
    names.sort();
    names
}

fn bless() -> bool {
    std::env::var_os("GLIMPSE_BLESS").is_some_and(|v| v == "1")
}

/// Parses `text` (an `expected-codes` file) into `(name, codes)` lines, in file order.
///
/// # Panics
/// On a line naming a fixture twice.
pub fn parse(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace().map(str::to_string);
        let Some(name) = words.next() else { continue };
        assert!(
            out.iter().all(|(n, _)| *n != name),
            "{EXPECTED}: {name} is listed twice"
        );
        out.push((name, words.collect()));
    }
    out
}

/// The fixtures of `fixtures/hostile/<folder>` with their expected codes, in the order of the
/// `expected-codes` file.
///
/// # Panics
/// When the file is missing, names a file that is not there, or leaves out a fixture (unless
/// blessing: then a left-out fixture comes back with no codes, for the run to fill in).
pub fn expected(folder: &str) -> Vec<Fixture> {
    let d = dir(folder);
    let list = d.join(EXPECTED);
    let text = fs::read_to_string(&list).unwrap_or_else(|e| panic!("{}: {e}", list.display()));
    let lines = parse(&text);
    let files = fixture_files(folder);
    let listed: BTreeSet<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
    let stale: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|n| !files.iter().any(|f| f == n))
        .collect();
    assert!(
        stale.is_empty(),
        "{} lists files that are not fixtures there: {stale:?}",
        list.display()
    );
    let missing: Vec<&String> = files
        .iter()
        .filter(|f| !listed.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty() || bless(),
        "{} has no line for {missing:?}: add `name code ...` (GLIMPSE_BLESS=1 writes it)",
        list.display()
    );
    let mut out: Vec<Fixture> = lines
        .into_iter()
        .map(|(name, codes)| Fixture {
            path: d.join(&name),
            name,
            codes,
        })
        .collect();
    out.extend(missing.into_iter().map(|name| Fixture {
        path: d.join(name),
        name: name.clone(),
        codes: Vec::new(),
    }));
    out
}

/// Runs `codes_of` on every fixture of `fixtures/hostile/<folder>` and asserts that it gives
/// exactly the codes the fixture's `expected-codes` line lists, in order. Every mismatch is
/// reported at once. Returns the fixtures, for callers that assert more about each.
///
/// # Panics
/// On any mismatch, and as [`expected`].
pub fn assert_codes(
    folder: &str,
    mut codes_of: impl FnMut(&Fixture) -> Vec<String>,
) -> Vec<Fixture> {
    let fixtures = expected(folder);
    let mut wrong = Vec::new();
    let mut blessed = Vec::new();
    for f in &fixtures {
        let got = codes_of(f);
        if got != f.codes {
            wrong.push(format!(
                "{}: expected {:?}, got {:?}\n    line: {} {}",
                f.name,
                f.codes,
                got,
                f.name,
                got.join(" ")
            ));
        }
        blessed.push((f.name.clone(), got));
    }
    if bless() && !wrong.is_empty() {
        rewrite(folder, &blessed);
        return fixtures;
    }
    assert!(
        wrong.is_empty(),
        "fixtures/hostile/{folder}/{EXPECTED}: {} of {} fixtures differ:\n{}",
        wrong.len(),
        fixtures.len(),
        wrong.join("\n")
    );
    fixtures
}

/// Rewrites the `expected-codes` lines of `folder` with `got`, keeping comments and order and
/// appending lines for fixtures that had none.
fn rewrite(folder: &str, got: &[(String, Vec<String>)]) {
    let list = dir(folder).join(EXPECTED);
    let text = fs::read_to_string(&list).unwrap_or_default();
    let line_of = |name: &str, codes: &[String]| {
        let mut l = name.to_string();
        for c in codes {
            l.push(' ');
            l.push_str(c);
        }
        l
    };
    let mut done = BTreeSet::new();
    let mut out = String::new();
    for line in text.lines() {
        let name = line
            .split('#')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .next();
        match name.and_then(|n| got.iter().find(|(g, _)| g == n)) {
            Some((n, codes)) => {
                out += &line_of(n, codes);
                done.insert(n.clone());
            }
            None => out += line,
        }
        out.push('\n');
    }
    for (n, codes) in got.iter().filter(|(n, _)| !done.contains(n)) {
        out += &line_of(n, codes);
        out.push('\n');
    }
    fs::write(&list, out).unwrap_or_else(|e| panic!("{}: {e}", list.display()));
}

/// Opens a fixture as a source.
pub fn source(path: &Path) -> Source {
    Arc::new(File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// What `glimpse check` runs on one file: `policy::inspect` with `policy` and the default
/// limits.
pub fn inspect_with(path: &Path, policy: &Policy) -> Report {
    inspect(source(path), policy, &Limits::default())
        .unwrap_or_else(|e| panic!("{}: inspect failed: {e}", path.display()))
}

/// The codes of a report, in order.
pub fn codes(report: &Report) -> Vec<String> {
    report.findings.iter().map(|f| f.code.to_string()).collect()
}

/// Checks every fixture of `fixtures/hostile/<folder>` with `policy::inspect` (the default
/// policy and limits, as `glimpse check FILE`) and asserts its codes, as [`assert_codes`].
/// Returns each fixture with its report, for callers that assert more.
pub fn check_dir(folder: &str) -> Vec<(Fixture, Report)> {
    check_dir_with(folder, &Policy::default())
}

/// [`check_dir`] under `policy` (for example a declared format, as `--expect-format`).
pub fn check_dir_with(folder: &str, policy: &Policy) -> Vec<(Fixture, Report)> {
    let mut reports = Vec::new();
    let fixtures = assert_codes(folder, |f| {
        let r = inspect_with(&f.path, policy);
        let c = codes(&r);
        reports.push(r);
        c
    });
    fixtures.into_iter().zip(reports).collect()
}

/// The fixture `name` of `fixtures/hostile/<folder>`, with its expected codes.
///
/// # Panics
/// When `expected-codes` has no line for it, and as [`expected`].
pub fn fixture(folder: &str, name: &str) -> Fixture {
    expected(folder)
        .into_iter()
        .find(|f| f.name == name)
        .unwrap_or_else(|| panic!("fixtures/hostile/{folder}/{EXPECTED} has no line for {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_names_codes_and_comments() {
        let text = "# header\n\nclean.qcow2\nbad.qcow2 a.b c.d-e  # why\n  # indented comment\n";
        assert_eq!(
            parse(text),
            [
                ("clean.qcow2".to_string(), vec![]),
                (
                    "bad.qcow2".to_string(),
                    vec!["a.b".to_string(), "c.d-e".to_string()]
                ),
            ]
        );
    }

    #[test]
    #[should_panic(expected = "listed twice")]
    fn parse_refuses_a_name_twice() {
        parse("x.vhd vhd.checksum\nx.vhd vhd.block-size\n");
    }

    #[test]
    fn scripts_readmes_and_the_list_are_not_fixtures() {
        for n in [
            "README.md",
            "make.py",
            "make-shared-gt.py",
            "gen.sh",
            EXPECTED,
        ] {
            assert!(is_not_a_fixture(n), "{n}");
        }
        for n in ["clean.qcow2", "sparse-pax-1.0.ova", "udif-zero.dmg"] {
            assert!(!is_not_a_fixture(n), "{n}");
        }
    }

    #[test]
    fn every_hostile_folder_lists_its_fixtures() {
        let root = crate::fixtures_dir().join("hostile");
        for e in fs::read_dir(&root).expect("fixtures/hostile") {
            let e = e.expect("a readable entry");
            if e.path().is_dir() {
                let folder = e.file_name().into_string().expect("a UTF-8 name");
                assert!(!expected(&folder).is_empty(), "{folder}");
            }
        }
    }
}
