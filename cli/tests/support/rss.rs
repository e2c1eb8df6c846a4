//! Peak RSS of one glimpse run, from GNU time: the memory tests' measure of the 256 MiB
//! promise (docs/memory.md).

use std::process::{Command, Stdio};

/// The promise: peak RSS at most 256 MiB for any command on any input.
pub const CEILING_KIB: u64 = 256 * 1024;

/// What one measured run gave.
pub struct Run {
    /// The exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    /// Peak RSS in KiB.
    pub kib: u64,
    /// Its standard output (empty unless kept).
    pub stdout: String,
    /// Its standard error, without GNU time's line.
    pub stderr: String,
}

/// Runs glimpse with `args` under GNU time. Standard output is kept only when asked: a map
/// of millions of runs would otherwise be held by the test.
pub fn peak(args: &[&str], keep_stdout: bool) -> Run {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M"])
        .arg(env!("CARGO_BIN_EXE_glimpse"))
        .args(args)
        .stdout(if keep_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .output()
        .expect("GNU time (/usr/bin/time) must be installed");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let (stderr, last) = err.trim_end().rsplit_once('\n').unwrap_or(("", err.trim()));
    let kib = last
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no RSS from time: {err}"));
    Run {
        code: out.status.code(),
        kib,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: stderr.to_string(),
    }
}

/// Runs `args`: it must exit with one of `codes` and peak at most `max_kib` (and never past
/// [`CEILING_KIB`]).
pub fn within(args: &[&str], codes: &[i32], max_kib: u64, keep_stdout: bool) -> Run {
    let r = peak(args, keep_stdout);
    eprintln!("peak RSS {} KiB: {}", r.kib, args.join(" "));
    assert!(
        r.code.is_some_and(|c| codes.contains(&c)),
        "{args:?} exited {:?}: {}\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
    let max = max_kib.min(CEILING_KIB);
    assert!(r.kib <= max, "{args:?}: peak RSS {} KiB > {max} KiB", r.kib);
    r
}
