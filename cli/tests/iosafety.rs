//! Output safety and inputs that are not regular files: the same file as source and
//! destination, failed and interrupted conversions onto an existing file, pipes, FIFOs,
//! character devices, directories, a loop device, a terminal on stdout and a closed pipe.
//! Tests that compare with qemu-img or need losetup fail when the tool is missing.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{glimpse, json_of, s, unnamed_files_in, wait_for_unnamed_file};

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn tool(name: &str, args: &[&str]) -> Output {
    let out = Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} is required for these tests: {e}"));
    assert!(out.status.success(), "{name} {args:?}: {}", stderr(&out));
    out
}

/// The first word of a `md5sum`/`sha512sum` line.
fn digest_with(tool_name: &str, path: &Path) -> String {
    let o = tool(tool_name, &[s(path)]);
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Deterministic data: `mib` MiB alternating pseudo-random bytes, text and holes.
fn data_file(dir: &Path, name: &str, mib: u64) -> PathBuf {
    use std::io::{Seek, SeekFrom};
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..mib {
        let buf: Vec<u8> = match i % 4 {
            0 => (0..1 << 20)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect(),
            1 => b"glimpse iosafety text\n".repeat((1 << 20) / 22 + 1)[..1 << 20].to_vec(),
            _ => continue,
        };
        f.seek(SeekFrom::Start(i << 20)).unwrap();
        f.write_all(&buf).unwrap();
    }
    f.set_len(mib << 20).unwrap();
    p
}

/// A qcow2 of `mib` MiB of [`data_file`] data, made by qemu-img.
fn qcow2_file(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let raw = data_file(dir, &format!("{name}.src.raw"), mib);
    let p = dir.join(name);
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&p)],
    );
    std::fs::remove_file(raw).unwrap();
    p
}

/// Names in `dir`, sorted: proves no temporary file is left behind.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs glimpse in `dir`.
fn glimpse_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
fn convert_onto_its_own_source_is_refused_through_every_spelling() {
    let d = tempfile::tempdir().unwrap();
    let src = qcow2_file(d.path(), "a.qcow2", 4);
    let before = std::fs::read(&src).unwrap();
    std::os::unix::fs::symlink("a.qcow2", d.path().join("link.qcow2")).unwrap();
    std::fs::hard_link(&src, d.path().join("hard.qcow2")).unwrap();
    let listing = names(d.path());
    // The same file through its directory's parent, too.
    let parent = format!(
        "../{}/a.qcow2",
        d.path().file_name().unwrap().to_str().unwrap()
    );
    for (from, to) in [
        ("a.qcow2", "a.qcow2"),
        ("a.qcow2", "./a.qcow2"),
        ("./a.qcow2", "link.qcow2"),
        ("link.qcow2", "a.qcow2"),
        ("a.qcow2", "hard.qcow2"),
        ("a.qcow2", parent.as_str()),
    ] {
        let o = glimpse_in(d.path(), &["convert", "-O", "qcow2", from, to]);
        assert_eq!(code(&o), 2, "{from} -> {to}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("output.same-as-source") && e.contains("is the source"),
            "{from} -> {to}: {e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
        assert_eq!(std::fs::read(&src).unwrap(), before, "{from} -> {to}");
        assert_eq!(names(d.path()), listing, "{from} -> {to}");
    }
    // stdin that is the destination file.
    let o = tool_any(
        "bash",
        &[
            "-c",
            &format!(
                "'{}' convert -O qcow2 - '{}' < '{}'",
                env!("CARGO_BIN_EXE_glimpse"),
                s(&src),
                s(&src)
            ),
        ],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("output.same-as-source"));
    assert_eq!(std::fs::read(&src).unwrap(), before);
    assert_eq!(names(d.path()), listing);
    // stdout redirected onto the source: opened read-write in place, or appended to (both
    // rewrote the qcow2, as `cat f >> f` would, before this was refused).
    for redirect in ["1<>", ">>"] {
        let o = tool_any(
            "bash",
            &[
                "-c",
                &format!(
                    "'{}' convert -O raw '{}' - {redirect} '{}'",
                    env!("CARGO_BIN_EXE_glimpse"),
                    s(&src),
                    s(&src)
                ),
            ],
        );
        assert_eq!(code(&o), 2, "{redirect}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("output.same-as-source"),
            "{}",
            stderr(&o)
        );
        assert_eq!(std::fs::read(&src).unwrap(), before, "{redirect}");
        assert_eq!(names(d.path()), listing);
    }
    // stdout onto another file is a conversion like any other.
    let other = d.path().join("other.raw");
    let o = tool_any(
        "bash",
        &[
            "-c",
            &format!(
                "'{}' convert -O raw '{}' - > '{}'",
                env!("CARGO_BIN_EXE_glimpse"),
                s(&src),
                s(&other)
            ),
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&other).unwrap().len(), 4 << 20);
    std::fs::remove_file(&other).unwrap();
    // The source is still the image it was.
    let o = glimpse(&["check", s(&src)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn a_failed_convert_leaves_an_existing_destination_byte_identical() {
    let d = tempfile::tempdir().unwrap();
    let src = qcow2_file(d.path(), "a.qcow2", 8);
    let dst = d.path().join("precious.raw");
    std::fs::write(&dst, b"precious bytes that must survive\n").unwrap();
    let listing = names(d.path());
    // An option the writer refuses: the failure comes after the output was set up.
    let o = glimpse(&["convert", "-O", "raw", "-o", "bogus=1", s(&src), s(&dst)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    // A source whose last data cluster is cut off: read with --force, it fails mid-way.
    let cut = d.path().join("cut.qcow2");
    let mut bytes = std::fs::read(&src).unwrap();
    bytes.truncate(bytes.len() - 65536 - 1000);
    std::fs::write(&cut, &bytes).unwrap();
    let o = glimpse(&["convert", "--force", "-O", "raw", s(&cut), s(&dst)]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    std::fs::remove_file(&cut).unwrap();
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        b"precious bytes that must survive\n"
    );
    assert_eq!(names(d.path()), listing);
    // A successful one replaces it, and keeps its mode.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = glimpse(&["convert", "--fsync", "-O", "raw", s(&src), s(&dst)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let q = tool("qemu-img", &["compare", "-F", "raw", s(&src), s(&dst)]);
    assert!(q.status.success());
    let mode = std::fs::metadata(&dst).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(names(d.path()), listing);
}

/// A compressing convert of `src` to `dst` started in a child, once its first progress line
/// arrived (so its temporary file exists); the rest of its stderr.
fn converting(
    src: &Path,
    dst: &Path,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStderr>>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["convert", "--progress", "json", "-c", "-O", "qcow2"])
        .args([src, dst])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("\"progress\""), "{first}");
    (child, lines)
}

/// SIGINT, and SIGHUP (a closed terminal or ssh session) alike: the temporary file goes, the
/// old output stays.
#[test]
fn an_interrupted_convert_removes_only_its_temporary_file() {
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGHUP, "SIGHUP")] {
        let d = tempfile::tempdir().unwrap();
        let src = data_file(d.path(), "big.raw", 512);
        let dst = d.path().join("out.qcow2");
        std::fs::write(&dst, b"old output\n").unwrap();
        let listing = names(d.path());
        let (mut child, lines) = converting(&src, &dst);
        // The output being written has no name (O_TMPFILE): nothing new in the directory.
        assert!(unnamed_files_in(child.id(), d.path()) > 0);
        assert_eq!(leftovers(d.path(), &listing), Vec::<String>::new());
        // SAFETY: sending a signal to our own child process.
        assert_eq!(
            unsafe { libc::kill(i32::try_from(child.id()).unwrap(), sig) },
            0
        );
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(2), "{name}: {rest:?}");
        assert!(
            rest.iter()
                .any(|l| l.contains(&format!("interrupted by {name}"))),
            "{rest:?}"
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"old output\n");
        assert_eq!(names(d.path()), listing);
    }
}

/// SIGKILL cannot be caught (the OOM killer, a container's stop timeout): the output being
/// written has no name, so the kernel frees it and the directory is as it was.
#[test]
fn a_killed_convert_leaves_nothing_behind() {
    let d = tempfile::tempdir().unwrap();
    let src = data_file(d.path(), "big.raw", 512);
    let dst = d.path().join("out.qcow2");
    std::fs::write(&dst, b"old output\n").unwrap();
    let listing = names(d.path());
    let (mut child, _lines) = converting(&src, &dst);
    wait_for_unnamed_file(child.id(), d.path());
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read(&dst).unwrap(), b"old output\n");
    assert_eq!(names(d.path()), listing);
}

#[test]
fn a_second_signal_does_not_wait_and_still_removes_the_temporary_file() {
    let d = tempfile::tempdir().unwrap();
    let src = data_file(d.path(), "big.raw", 512);
    let dst = d.path().join("out.qcow2");
    let listing = names(d.path());
    let (mut child, lines) = converting(&src, &dst);
    let pid = i32::try_from(child.id()).unwrap();
    for _ in 0..2 {
        // SAFETY: sending SIGTERM to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    // Either the handler exited at once (128 + SIGTERM) or the first signal's cleanup won.
    assert!(
        matches!(status.code(), Some(143) | Some(2)),
        "{status:?} {rest:?}"
    );
    assert!(!dst.exists());
    assert_eq!(names(d.path()), listing);
}

#[test]
fn checksum_reads_pipes_stdin_and_fifos_as_streams() {
    let d = tempfile::tempdir().unwrap();
    let src = data_file(d.path(), "a.raw", 9);
    let md5 = digest_with("md5sum", &src);
    let sha = digest_with("sha512sum", &src);
    let check = |o: &Output, what: &str| {
        assert_eq!(code(o), 0, "{what}: {}", stderr(o));
        let v = json_of(o);
        assert_eq!(v["md5"], md5.as_str(), "{what}");
        assert_eq!(v["sha512"], sha.as_str(), "{what}");
        assert_eq!(v["size"], 9u64 << 20, "{what}");
    };
    let bin = env!("CARGO_BIN_EXE_glimpse");
    let f = s(&src);
    for (what, script) in [
        ("-", format!("cat '{f}' | '{bin}' checksum --output json -")),
        (
            "/dev/stdin",
            format!("cat '{f}' | '{bin}' checksum --output json /dev/stdin"),
        ),
        (
            "<(...)",
            format!("'{bin}' checksum --output json <(cat '{f}')"),
        ),
        (
            "- < file",
            format!("'{bin}' checksum --output json - < '{f}'"),
        ),
    ] {
        check(&tool_any("bash", &["-c", &script]), what);
    }
    // A named FIFO, written by another process.
    let fifo = d.path().join("fifo");
    tool("mkfifo", &[s(&fifo)]);
    let mut writer = Command::new("sh")
        .args(["-c", &format!("cat '{f}' > '{}'", s(&fifo))])
        .spawn()
        .unwrap();
    check(
        &glimpse(&["checksum", "--output", "json", s(&fifo)]),
        "fifo",
    );
    assert!(writer.wait().unwrap().success());
    // Human output names stdin `-`, as md5sum does.
    let o = tool_any(
        "bash",
        &["-c", &format!("'{bin}' checksum --algo md5 - < '{f}'")],
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), format!("{md5}  -\n"));
}

/// Runs a tool and returns its output whatever its status.
fn tool_any(name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name} is required for these tests: {e}"))
}

#[test]
fn content_checksum_of_a_pipe_is_refused_with_advice() {
    let bin = env!("CARGO_BIN_EXE_glimpse");
    let o = tool_any(
        "bash",
        &[
            "-c",
            &format!("head -c 4096 /dev/urandom | '{bin}' checksum --content -"),
        ],
    );
    assert_eq!(code(&o), 2);
    let e = stderr(&o);
    assert!(
        e.contains("is a pipe") && e.contains("save it to a file first"),
        "{e}"
    );
    assert!(!e.contains("d41d8cd98f00b204e9800998ecf8427e"));
    assert!(o.stdout.is_empty());
}

#[test]
fn random_access_commands_refuse_a_fifo_without_blocking() {
    let d = tempfile::tempdir().unwrap();
    let fifo = d.path().join("fifo");
    tool("mkfifo", &[s(&fifo)]);
    let never = d.path().join("never-written.raw");
    for cmd in [
        &["check", s(&fifo)][..],
        &["info", s(&fifo)],
        &["map", s(&fifo)],
        &["convert", "-O", "raw", s(&fifo), s(&never)],
    ] {
        let started = Instant::now();
        let o = tool_any(
            "timeout",
            &[&["20", env!("CARGO_BIN_EXE_glimpse")][..], cmd].concat(),
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{cmd:?} blocked"
        );
        assert_eq!(code(&o), 2, "{cmd:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("is a pipe") && e.contains("save it to a file first"),
            "{cmd:?}: {e}"
        );
    }
    assert!(!never.exists());
}

#[test]
fn character_devices_and_directories_are_refused() {
    for cmd in [
        &["check", "/dev/zero"][..],
        &["info", "/dev/zero"],
        &["checksum", "/dev/zero"],
        &["checksum", "--content", "/dev/zero"],
        &["compare", "/dev/zero", "/dev/zero"],
    ] {
        let o = tool_any(
            "timeout",
            &[&["20", env!("CARGO_BIN_EXE_glimpse")][..], cmd].concat(),
        );
        assert_eq!(code(&o), 2, "{cmd:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("is a character device"),
            "{cmd:?}: {}",
            stderr(&o)
        );
    }
    let d = tempfile::tempdir().unwrap();
    for cmd in ["check", "info", "checksum", "map"] {
        let o = glimpse(&[cmd, s(d.path())]);
        assert_eq!(code(&o), 2, "{cmd}");
        let e = stderr(&o);
        assert!(e.contains("is a directory"), "{cmd}: {e}");
        assert_eq!(e.lines().count(), 1, "{cmd}: {e}");
    }
    let o = glimpse(&["checksum", s(d.path())]);
    assert_eq!(stderr(&o).matches(s(d.path())).count(), 1, "{}", stderr(&o));
    // Writing onto a directory or device is refused too, before anything is written.
    let src = data_file(d.path(), "a.raw", 1);
    for dst in [s(d.path()), "/dev/null"] {
        let o = glimpse(&["convert", "-O", "raw", s(&src), dst]);
        assert_eq!(code(&o), 2, "{dst}");
        assert!(stderr(&o).contains("output.not-regular"), "{}", stderr(&o));
    }
}

/// A loop device attached to a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let o = tool("losetup", &["--find", "--show", "--read-only", s(file)]);
        Loop(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_qcow2_on_a_loop_device_is_a_qcow2() {
    let d = tempfile::tempdir().unwrap();
    let img = qcow2_file(d.path(), "a.qcow2", 6);
    let dev = Loop::attach(&img);
    let info = json_of(&glimpse(&["info", "--output", "json", &dev.0]));
    let theirs: Value = serde_json::from_slice(
        &tool(
            "qemu-img",
            &["info", "--output=json", "-f", "qcow2", s(&img)],
        )
        .stdout,
    )
    .unwrap();
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], theirs["virtual-size"]);
    let o = glimpse(&["check", &dev.0]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    // File digests of the device equal sha512sum's, and its size is the device's.
    let v = json_of(&glimpse(&["checksum", "--output", "json", &dev.0]));
    assert_eq!(
        v["sha512"],
        digest_with("sha512sum", Path::new(&dev.0)).as_str()
    );
    assert_eq!(v["size"], std::fs::metadata(&img).unwrap().len());
    // The content digest is the file's, and convert gives what qemu-img gives.
    let c1 = json_of(&glimpse(&[
        "checksum",
        "--content",
        "--output",
        "json",
        &dev.0,
    ]));
    let c2 = json_of(&glimpse(&[
        "checksum",
        "--content",
        "--output",
        "json",
        s(&img),
    ]));
    assert_eq!(c1["content"], c2["content"]);
    let ours = d.path().join("ours.raw");
    let theirs = d.path().join("theirs.raw");
    let o = glimpse(&["convert", "-O", "raw", &dev.0, s(&ours)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", &dev.0, s(&theirs)],
    );
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    let o = glimpse(&["compare", &dev.0, s(&img)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

#[test]
fn image_data_is_not_written_to_a_terminal() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("small.raw");
    std::fs::write(&src, vec![7u8; 65536]).unwrap();
    let (master, slave) = pty();
    let slave2 = slave.try_clone().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["convert", "-O", "raw", s(&src), "-"])
        .stdout(Stdio::from(slave))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    let e = stderr(&o);
    assert!(e.contains("terminal") && e.contains("--force-tty"), "{e}");
    // Forced, it writes (a thread drains the terminal so the writer never blocks).
    let mut reader = master.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut n = 0usize;
        let mut buf = [0u8; 8192];
        while n < 65536 {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        n
    });
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["convert", "--force-tty", "-O", "raw", s(&src), "-"])
        .stdout(Stdio::from(slave2))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(drain.join().unwrap() >= 65536);
    drop(master);
}

/// A pseudo-terminal pair: (master, slave).
fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut sl) = (0, 0);
    // SAFETY: openpty writes two descriptors into the given integers; the other pointers may
    // be null.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut sl,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(m),
            std::fs::File::from_raw_fd(sl),
        )
    }
}

#[test]
fn a_closed_pipe_on_stdout_ends_quietly_with_141() {
    let d = tempfile::tempdir().unwrap();
    let src = data_file(d.path(), "a.raw", 32);
    let mut child = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["convert", "-O", "raw", s(&src), "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut head = vec![0u8; 1000];
    out.read_exact(&mut head).unwrap();
    drop(out);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(141), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
    assert_eq!(head, std::fs::read(&src).unwrap()[..1000]);
}

#[test]
fn printing_commands_end_quietly_when_stdout_closes() {
    let d = tempfile::tempdir().unwrap();
    let src = data_file(d.path(), "a.raw", 1);
    let bin = env!("CARGO_BIN_EXE_glimpse");
    let f = s(&src);
    for cmd in ["checksum", "info", "check"] {
        // Many files, so that the output outlasts the pipe's reader.
        let args = vec![f; 200].join(" ");
        let o = tool_any(
            "bash",
            &[
                "-c",
                &format!("'{bin}' {cmd} {args} | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}"),
            ],
        );
        let status = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(status, "141", "{cmd}: {}", stderr(&o));
        assert_eq!(stderr(&o), "", "{cmd}");
    }
}

/// Names in `dir` that [`names`] did not list before: the temporary files left behind.
fn leftovers(dir: &Path, before: &[String]) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect()
}

#[test]
fn convert_onto_a_file_the_source_refers_to_is_refused_even_with_force() {
    let d = tempfile::tempdir().unwrap();
    let sub = d.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let base = data_file(&sub, "base.raw", 4);
    let base_md5 = digest_with("md5sum", &base);
    // An overlay whose backing file is named relative to the overlay's directory.
    let ov = sub.join("ov.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&ov),
        ],
    );
    tool("qemu-io", &["-c", "write -P 0x55 0 64k", s(&ov)]);
    // An external data file, a VMDK flat extent and a backing file that does not exist yet.
    // qemu-img create makes the data file relative to its current directory.
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .args(["data_file=data.raw,data_file_raw=on", "ext.qcow2", "4M"])
        .current_dir(&sub)
        .status()
        .expect("qemu-img is required for these tests");
    assert!(made.success());
    let flat = sub.join("flat.vmdk");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            s(&flat),
            "4M",
        ],
    );
    let orphan = sub.join("orphan.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.raw",
            "-F",
            "raw",
            s(&orphan),
            "4M",
        ],
    );
    std::os::unix::fs::symlink("sub/base.raw", d.path().join("link.raw")).unwrap();
    std::fs::hard_link(&base, d.path().join("hard.raw")).unwrap();
    let before: Vec<(PathBuf, String)> = [sub.join("data.raw"), sub.join("flat-flat.vmdk")]
        .into_iter()
        .map(|p| {
            let m = digest_with("md5sum", &p);
            (p, m)
        })
        .collect();
    let listing = names(d.path());
    let sub_listing = names(&sub);
    // Run from the parent directory: the reference resolves against the source's directory.
    for (src, dst, kind) in [
        ("sub/ov.qcow2", "sub/base.raw", "the backing file"),
        ("sub/ov.qcow2", "link.raw", "the backing file"),
        ("sub/ov.qcow2", "hard.raw", "the backing file"),
        (
            "./sub/../sub/ov.qcow2",
            "./sub/base.raw",
            "the backing file",
        ),
        ("sub/ext.qcow2", "sub/data.raw", "the external data file"),
        ("sub/flat.vmdk", "sub/flat-flat.vmdk", "an extent file"),
        ("sub/orphan.qcow2", "sub/gone.raw", "the backing file"),
    ] {
        for force in [true, false] {
            let mut args = vec!["convert", "-O", "raw", src, dst];
            if force {
                args.insert(1, "--force");
            }
            let o = glimpse_in(d.path(), &args);
            let e = stderr(&o);
            // Without --force the policy refuses the image first (exit 1, nothing written).
            assert_eq!(code(&o), if force { 2 } else { 1 }, "{args:?}: {e}");
            if force {
                assert!(
                    e.contains("output.source-reference") && e.contains(kind),
                    "{args:?}: {e}"
                );
            } else {
                assert!(e.contains("rejected by the safety policy"), "{args:?}: {e}");
            }
            assert_eq!(digest_with("md5sum", &base), base_md5, "{args:?}");
            for (p, m) in &before {
                assert_eq!(&digest_with("md5sum", p), m, "{args:?}");
            }
            assert_eq!(names(d.path()), listing, "{args:?}");
            assert_eq!(names(&sub), sub_listing, "{args:?}");
        }
    }
    // The overlay still converts to any other name, in the current directory too.
    let o = glimpse_in(
        d.path(),
        &[
            "convert",
            "--force",
            "-O",
            "raw",
            "sub/ov.qcow2",
            "base.raw",
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(d.path().join("base.raw")).unwrap().len(),
        4 << 20
    );
}

#[test]
fn the_file_size_limit_fails_the_write_and_names_the_output() {
    let d = tempfile::tempdir().unwrap();
    let src = qcow2_file(d.path(), "a.qcow2", 8);
    let bin = env!("CARGO_BIN_EXE_glimpse");
    // raw sets its length first; qcow2 grows as it writes (the writer thread's error path).
    for fmt in ["raw", "qcow2", "vmdk"] {
        let dst = d.path().join(format!("old.{fmt}"));
        std::fs::write(&dst, b"OLD\n").unwrap();
        let listing = names(d.path());
        let o = tool_any(
            "sh",
            &[
                "-c",
                &format!(
                    "ulimit -f 1024; exec '{bin}' convert -O {fmt} '{}' '{}'",
                    s(&src),
                    s(&dst)
                ),
            ],
        );
        let e = stderr(&o);
        // Not killed by SIGXFSZ (status 153 in a shell): an ordinary error.
        assert_eq!(o.status.code(), Some(2), "{fmt}: {:?} {e}", o.status);
        assert!(
            e.starts_with(&format!("glimpse: {}: ", s(&dst))),
            "{fmt}: the error names the output: {e}"
        );
        assert!(e.contains("File too large"), "{fmt}: {e}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"OLD\n", "{fmt}");
        assert_eq!(names(d.path()), listing, "{fmt}");
    }
}

/// A small tmpfs mounted on a directory, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        tool(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                s(dir),
            ],
        );
        SmallFs(dir.to_path_buf())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_reported_on_the_output_not_the_input() {
    let d = tempfile::tempdir().unwrap();
    let src = qcow2_file(d.path(), "a.qcow2", 8);
    let small = d.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let _fs = SmallFs::mount(&small, "2m");
    for fmt in ["raw", "qcow2"] {
        let dst = small.join(format!("out.{fmt}"));
        std::fs::write(&dst, b"OLD\n").unwrap();
        let listing = names(&small);
        let o = glimpse(&["convert", "-O", fmt, s(&src), s(&dst)]);
        let e = stderr(&o);
        assert_eq!(code(&o), 2, "{fmt}: {e}");
        assert!(
            e.starts_with(&format!("glimpse: {}: cannot write: ", s(&dst)))
                && e.contains("No space left on device"),
            "{fmt}: {e}"
        );
        assert!(
            !e.contains("cannot read") && !e.contains(s(&src)),
            "{fmt}: {e}"
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"OLD\n", "{fmt}");
        assert_eq!(names(&small), listing, "{fmt}");
    }
}

#[test]
fn a_replaced_output_keeps_its_owner_and_mode_and_its_other_links_are_named() {
    use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
    let d = tempfile::tempdir().unwrap();
    let src = qcow2_file(d.path(), "a.qcow2", 4);
    let dst = d.path().join("shared.raw");
    std::fs::write(&dst, b"OLD-DATA\n").unwrap();
    let link = d.path().join("shared-link.raw");
    std::fs::hard_link(&dst, &link).unwrap();
    // Root converting another user's file gives it back to that user.
    // SAFETY: geteuid has no preconditions.
    let (uid, gid) = if unsafe { libc::geteuid() } == 0 {
        (65534, 65534)
    } else {
        let m = std::fs::metadata(&dst).unwrap();
        (m.uid(), m.gid())
    };
    chown(&dst, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = glimpse(&["convert", "-O", "raw", s(&src), s(&dst)]);
    let e = stderr(&o);
    assert_eq!(code(&o), 0, "{e}");
    assert!(
        e.contains("shared.raw: has 1 other hard link") && e.contains("keep the old content"),
        "{e}"
    );
    let m = std::fs::metadata(&dst).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid, gid, 0o640));
    let q = tool("qemu-img", &["compare", "-F", "raw", s(&src), s(&dst)]);
    assert!(q.status.success());
    // The atomic replacement leaves the other link on the old inode, as the warning says.
    assert_eq!(std::fs::read(&link).unwrap(), b"OLD-DATA\n");
    // No warning for a file with one link.
    let o = glimpse(&["convert", "-O", "raw", s(&src), s(&dst)]);
    assert_eq!((code(&o), stderr(&o)), (0, String::new()));
}

#[test]
fn long_names_and_dangling_links_as_destination() {
    let d = tempfile::tempdir().unwrap();
    let src = qcow2_file(d.path(), "a.qcow2", 4);
    let listing = names(d.path());
    // Any name the file system allows (NAME_MAX is 255 bytes).
    for len in [240, 251] {
        let name = format!("{}.raw", "a".repeat(len));
        let o = glimpse_in(d.path(), &["convert", "-O", "raw", "a.qcow2", &name]);
        assert_eq!(code(&o), 0, "{len}: {}", stderr(&o));
        let q = tool(
            "qemu-img",
            &["compare", "-F", "raw", s(&src), s(&d.path().join(&name))],
        );
        assert!(q.status.success());
        std::fs::remove_file(d.path().join(&name)).unwrap();
    }
    assert_eq!(names(d.path()), listing);
    // A symbolic link to nothing: refused, clearly, and nothing is created through it.
    std::os::unix::fs::symlink("nonexist.raw", d.path().join("dang.raw")).unwrap();
    let listing = names(d.path());
    let o = glimpse_in(d.path(), &["convert", "-O", "raw", "a.qcow2", "dang.raw"]);
    let e = stderr(&o);
    assert_eq!(code(&o), 2, "{e}");
    assert_eq!(
        e.trim_end(),
        "glimpse: dang.raw: is a symbolic link to \"nonexist.raw\", which does not exist; \
         refusing to create a file through a dangling link: give the path of the file to \
         write (output.dangling-link)"
    );
    assert_eq!(names(d.path()), listing);
}

/// Runs glimpse with stdout on `/dev/full`: every write to it fails with ENOSPC.
fn glimpse_onto_full_stdout(args: &[&str]) -> Output {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(args)
        .stdout(full)
        .output()
        .unwrap()
}

#[test]
fn output_that_cannot_reach_stdout_is_an_error_never_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let q = qcow2_file(d.path(), "a.qcow2", 2);
    let q = s(&q);
    let commands: Vec<Vec<&str>> = vec![
        vec!["info", q],
        vec!["check", q],
        vec!["map", q],
        vec!["checksum", q],
        vec!["measure", "-O", "qcow2", q],
        vec!["compare", q, q],
    ];
    for args in commands {
        for json in [false, true] {
            let mut a = args.clone();
            if json && args[0] != "compare" {
                a.extend(["--output", "json"]);
            }
            let o = glimpse_onto_full_stdout(&a);
            let e = stderr(&o);
            assert_eq!(code(&o), 2, "{a:?}: {e}");
            assert!(
                e.contains("glimpse: stdout: cannot write: No space left on device"),
                "{a:?}: {e}"
            );
            assert!(!e.contains("panicked"), "{a:?}: {e}");
        }
    }
    // Progress that cannot be shown on stderr does not stop the conversion.
    let out = d.path().join("out.raw");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["convert", "--progress", "json", "-O", "raw", q, s(&out)])
        .stderr(full)
        .output()
        .unwrap();
    assert_eq!(code(&o), 0);
    let o = glimpse(&["compare", q, s(&out)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
}

/// Rewrites the first 4 KiB of `path` in place, with the bytes it holds, until the returned
/// flag is set: the content never changes, the modification time keeps moving.
fn keep_rewriting(
    path: &Path,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut head = vec![0u8; 4096];
    f.read_exact_at(&mut head, 0).unwrap();
    let flag = stop.clone();
    let t = std::thread::spawn(move || {
        while !flag.load(Ordering::SeqCst) {
            f.write_all_at(&head, 0).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    (stop, t)
}

#[test]
fn a_file_written_to_while_it_is_read_gives_no_result() {
    // The commands that read every byte: they take long enough to see the times move (a
    // command that reads only metadata checks the same way, in less time than a tick).
    let d = tempfile::tempdir().unwrap();
    let raw = data_file(d.path(), "a.raw", 64);
    let listing = names(d.path());
    let (stop, writer) = keep_rewriting(&raw);
    let mut runs: Vec<(Vec<&str>, bool)> = vec![
        (vec!["checksum", "--output", "json", s(&raw)], true),
        (
            vec!["checksum", "--content", "--output", "json", s(&raw)],
            true,
        ),
    ];
    let out = d.path().join("out.qcow2");
    runs.push((vec!["convert", "-O", "qcow2", s(&raw), s(&out)], false));
    runs.push((vec!["compare", s(&raw), s(&raw)], false));
    for (args, json) in &runs {
        let o = glimpse(args);
        let e = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {e}");
        assert!(
            e.contains("was written to while it was read"),
            "{args:?}: {e}"
        );
        if *json {
            let v = json_of(&o);
            assert_eq!(v["error"]["code"], "source.changed", "{args:?}: {v}");
        }
        assert_eq!(names(d.path()), listing, "{args:?}: nothing left behind");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    // Left alone, the same file gives its results.
    for (args, _) in &runs {
        let o = glimpse(args);
        assert_eq!(code(&o), 0, "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn a_map_whose_file_changes_after_output_started_is_left_unterminated() {
    // map prints runs as it finds them: an error after the first one cannot become the
    // {filename, error} object, so the array is left without its `]` (no pipeline takes it
    // for a whole map), the error goes to stderr, and the exit status is 2, as qemu-img map's.
    let d = tempfile::tempdir().unwrap();
    let q = d.path().join("runs.qcow2");
    support::shared_l2_qcow2(&q, 16);
    let (stop, writer) = keep_rewriting(&q);
    for json in [true, false] {
        let mut args = vec!["map", s(&q)];
        if json {
            args.extend(["--output", "json"]);
        }
        let o = glimpse(&args);
        let e = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {e}");
        assert!(
            e.contains("was written to while it was read"),
            "{args:?}: {e}"
        );
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if json {
            assert!(
                out.starts_with("[\n  {"),
                "{args:?}: {}",
                &out[..out.len().min(80)]
            );
            assert!(
                !out.trim_end().ends_with(']'),
                "{args:?}: the array was closed"
            );
            assert!(serde_json::from_str::<Value>(&out).is_err(), "{args:?}");
        } else {
            assert!(out.lines().count() > 1, "{args:?}");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    let o = glimpse(&["map", "--output", "json", s(&q)]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(json_of(&o).as_array().map(Vec::len), Some(16 * 8192));
}

#[test]
fn usage_errors_found_after_parsing_still_print_one_json_document() {
    let d = tempfile::tempdir().unwrap();
    let q = qcow2_file(d.path(), "a.qcow2", 1);
    for args in [
        vec!["checksum", "--disk", "0", "--output", "json", s(&q)],
        vec![
            "measure",
            "-O",
            "qcow2",
            "-o",
            "bogus=1",
            "--output",
            "json",
            s(&q),
        ],
        vec![
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=3",
            "--output",
            "json",
            s(&q),
        ],
        vec![
            "measure",
            "-O",
            "vhd",
            "-o",
            "subformat=x",
            "--output",
            "json",
            s(&q),
        ],
    ] {
        let o = glimpse(&args);
        assert_eq!(code(&o), 2, "{args:?}");
        let v = json_of(&o);
        assert_eq!(v["error"]["kind"], "usage", "{args:?}: {v}");
        assert_eq!(v["error"]["code"], "usage.invalid", "{args:?}: {v}");
    }
}

#[test]
fn image_data_is_not_written_to_the_null_device() {
    let d = tempfile::tempdir().unwrap();
    let q = qcow2_file(d.path(), "a.qcow2", 1);
    // `>&-` too: the runtime reopens a closed stdout on /dev/null.
    let o = Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(["convert", "-O", "raw", s(&q), "-"])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("stdout is /dev/null"), "{}", stderr(&o));
}

#[test]
fn errors_name_the_file_once() {
    let d = tempfile::tempdir().unwrap();
    let q = qcow2_file(d.path(), "a.qcow2", 1);
    let missing = d.path().join("missing.img");
    let m = s(&missing);
    let out = d.path().join("out.raw");
    for args in [
        vec!["compare", m, s(&q)],
        vec!["compare", s(&q), m],
        vec!["convert", "-O", "raw", m, s(&out)],
        vec!["ova", "list", m],
        vec!["ova", "check", m],
        vec!["info", m],
        vec!["checksum", m],
    ] {
        let o = glimpse(&args);
        let e = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {e}");
        assert_eq!(e.matches(m).count(), 1, "{args:?}: {e}");
    }
    // A destination directory that does not exist is named, not a temporary file in it.
    let nowhere = d.path().join("no-such-dir").join("out.raw");
    let o = glimpse(&["convert", "-O", "raw", s(&q), s(&nowhere)]);
    let e = stderr(&o);
    assert_eq!(code(&o), 2, "{e}");
    assert!(
        e.contains(s(&nowhere)) && e.contains("No such file or directory"),
        "{e}"
    );
    assert!(!e.contains("glimpse-tmp") && !e.contains(".out.raw"), "{e}");
}

#[test]
fn a_socket_in_the_file_system_is_refused_for_what_it_is() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("s.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    for args in [
        vec!["checksum", "--output", "json", s(&sock)],
        vec!["info", "--output", "json", s(&sock)],
    ] {
        let o = glimpse(&args);
        assert_eq!(code(&o), 2, "{args:?}");
        let v = json_of(&o);
        assert_eq!(v["error"]["code"], "source.not-seekable", "{args:?}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("socket"),
            "{v}"
        );
    }
}

#[test]
fn every_subcommand_answers_version() {
    for cmd in [
        "info", "check", "map", "compare", "checksum", "convert", "measure", "ova", "upload",
        "audit",
    ] {
        let o = glimpse(&[cmd, "--version"]);
        assert_eq!(code(&o), 0, "{cmd}: {}", stderr(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")),
            "{cmd}"
        );
    }
}

#[test]
fn many_files_that_fail_hold_no_descriptor_past_their_turn() {
    let d = tempfile::tempdir().unwrap();
    // A qcow2 header cut short: detected, then refused when opened.
    let mut head = vec![0u8; 72];
    head[..4].copy_from_slice(b"QFI\xfb");
    head[4..8].copy_from_slice(&3u32.to_be_bytes());
    let files: Vec<String> = (0..300)
        .map(|i| {
            let p = d.path().join(format!("t{i}.qcow2"));
            std::fs::write(&p, &head).unwrap();
            s(&p).to_string()
        })
        .collect();
    for cmd in [
        "info --output json",
        "check --output json",
        "checksum --content --output json",
    ] {
        let script = format!(
            "ulimit -n 64 && exec {} {cmd} {}",
            env!("CARGO_BIN_EXE_glimpse"),
            files.join(" ")
        );
        let o = Command::new("sh").args(["-c", &script]).output().unwrap();
        let v = json_of(&o);
        let items = v.as_array().unwrap();
        assert_eq!(items.len(), files.len(), "{cmd}");
        for item in items {
            let text = item.to_string();
            assert!(!text.contains("Too many open files"), "{cmd}: {text}");
        }
    }
}

/// Report refs-diff F1: backing names qemu resolves to the destination though they are not
/// its path as stored (a NUL inside, json:, protocol prefixes) still refuse it, with
/// --force, and `info` reports the path qemu opens. Every file is in the test's tempdir.
#[test]
fn convert_refuses_a_destination_qemu_resolves_a_backing_name_to() {
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim.raw");
    let content = vec![7u8; 4096];
    std::fs::write(&victim, &content).unwrap();
    let v = s(&victim);
    let padded = format!("{v}XXXXX");
    let names = [
        padded.clone(),
        format!("json:{{\"file.filename\":\"{v}\"}}"),
        format!("json:{{'driver':'raw','file':{{'driver':'file','filename':'{v}'}}}}"),
        format!("blkdebug::{v}"),
        format!("host_device:{v}"),
        format!("file:{v}"),
        format!("unknownproto:{d}/other.raw", d = s(d.path())),
    ];
    for (i, name) in names.iter().enumerate() {
        let ov = d.path().join(format!("ov{i}.qcow2"));
        tool(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                name,
                "-F",
                "raw",
                s(&ov),
                "1M",
            ],
        );
        if name == &padded {
            // The name as stored: the victim, a NUL, junk (qemu reads up to the NUL).
            let mut b = std::fs::read(&ov).unwrap();
            let at = b
                .windows(padded.len())
                .position(|w| w == padded.as_bytes())
                .unwrap();
            let tail = at + v.len();
            b[tail..tail + 5].copy_from_slice(b"\0junk");
            std::fs::write(&ov, &b).unwrap();
            // qemu's own reading of the name is the victim's path.
            let q = tool(
                "qemu-img",
                &["info", "--output=json", "-f", "qcow2", s(&ov)],
            );
            let q: Value = serde_json::from_slice(&q.stdout).unwrap();
            assert_eq!(q["backing-filename"], v, "{q}");
            let info = json_of(&glimpse(&["info", "--output", "json", s(&ov)]));
            let r = &info["references"][0];
            assert_eq!(r["target"], format!("{v}\0junk"), "{info}");
            assert_eq!(r["resolved"], serde_json::json!([v]), "{info}");
        }
        let o = glimpse_in(d.path(), &["convert", "--force", "-O", "raw", s(&ov), v]);
        let e = stderr(&o);
        assert_eq!(code(&o), 2, "{name:?}: {e}");
        assert!(e.contains("output.source-reference"), "{name:?}: {e}");
        assert_eq!(std::fs::read(&victim).unwrap(), content, "{name:?}");
        // Another destination is written (except for the name glimpse cannot resolve).
        let out = d.path().join(format!("out{i}.raw"));
        let o = glimpse_in(
            d.path(),
            &["convert", "--force", "-O", "raw", s(&ov), s(&out)],
        );
        let expect = if name.starts_with("unknownproto:") {
            2
        } else {
            0
        };
        assert_eq!(code(&o), expect, "{name:?}: {}", stderr(&o));
    }
    let info = json_of(&glimpse(&[
        "info",
        "--output",
        "json",
        s(&d.path().join("ov6.qcow2")),
    ]));
    assert_eq!(info["references"][0]["unresolved"], true, "{info}");
}
