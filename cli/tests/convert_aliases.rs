//! `convert` refuses a destination that is another name for its source's storage: stdin or
//! stdout redirected to the source (identified from descriptors 0 and 1, not through
//! /dev/stdin or /dev/stdout, which need /proc), a loop device over the source file or the
//! file a loop device source reads. The source is left byte for byte as it was.
//!
//! The loop-device test attaches a loop device with `losetup` to a file under a temporary
//! directory and detaches it whatever happens; it fails, never skips, where that is not
//! possible.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn glimpse(args: &[&str], stdin: Stdio, stdout: Stdio) -> Output {
    Command::new(env!("CARGO_BIN_EXE_glimpse"))
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const CONTENT: [u8; 4] = *b"data";

fn source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("a.raw");
    let data: Vec<u8> = CONTENT.iter().copied().cycle().take(1 << 20).collect();
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

fn assert_refused(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{what}: {err}");
    assert!(err.contains("output.same-as-source"), "{what}: {err}");
}

fn read_write(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(p).unwrap()
}

#[test]
fn stdin_and_stdout_redirected_to_the_source_are_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = source(dir.path());
    let hard = dir.path().join("hard.raw");
    std::fs::hard_link(&src, &hard).unwrap();
    // `convert - a.raw < a.raw`, and through a hard link.
    for dst in [&src, &hard] {
        let o = glimpse(
            &["convert", "-O", "raw", "-", s(dst)],
            File::open(&src).unwrap().into(),
            Stdio::piped(),
        );
        assert_refused(&o, &format!("- {} < a.raw", dst.display()));
    }
    // `convert a.raw - 1<>a.raw`, `- >>a.raw`, `- 1<>hard.raw`.
    for (what, out) in [
        ("1<>", read_write(&src)),
        (">>", OpenOptions::new().append(true).open(&src).unwrap()),
        ("1<> hard link", read_write(&hard)),
    ] {
        let o = glimpse(
            &["convert", "-O", "raw", s(&src), "-"],
            Stdio::null(),
            out.into(),
        );
        assert_refused(&o, what);
    }
    // `convert - - < a.raw 1<>a.raw`: both ends are descriptors.
    let o = glimpse(
        &["convert", "-O", "raw", "-", "-"],
        File::open(&src).unwrap().into(),
        read_write(&src).into(),
    );
    assert_refused(&o, "- - < a.raw 1<> a.raw");
    assert_eq!(std::fs::read(&src).unwrap(), data);
    // Another file on stdout is written.
    let other = dir.path().join("out.raw");
    let o = glimpse(
        &["convert", "-O", "raw", "-", "-"],
        File::open(&src).unwrap().into(),
        File::create(&other).unwrap().into(),
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(&other).unwrap(), data);
}

/// A loop device attached to a file, detached when dropped.
struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_loop_device_over_the_source_and_its_backing_file_are_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let (src, data) = source(dir.path());
    let out = Command::new("losetup")
        .args(["-f", "--show", s(&src)])
        .output()
        .expect("losetup must be installed for this test");
    assert!(
        out.status.success(),
        "losetup failed (this test needs root and a free loop device): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lo = Loop(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()));
    // The file read, stdout on the loop device over it.
    let o = glimpse(
        &["convert", "-O", "raw", s(&src), "-"],
        Stdio::null(),
        read_write(&lo.0).into(),
    );
    assert_refused(&o, "a.raw - 1<>loop");
    // The loop device read, DST its backing file.
    let o = glimpse(
        &["convert", "-O", "raw", s(&lo.0), s(&src)],
        Stdio::null(),
        Stdio::piped(),
    );
    assert_refused(&o, "loop a.raw");
    assert_eq!(std::fs::read(&src).unwrap(), data);
}

/// `convert --force` of a standalone OVF descriptor (read as raw) refuses to write any file
/// the descriptor names: its disks are the files `ova list` reads beside it.
#[test]
fn a_file_a_standalone_descriptor_names_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let xml = r#"<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">
 <References><File ovf:href="disk1.vmdk" ovf:id="f1"/><File ovf:href="later.vmdk" ovf:id="f2"/></References>
 <DiskSection><Info>d</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="1"/></DiskSection>
</Envelope>
"#;
    std::fs::write(d.join("x.ovf"), xml).unwrap();
    // The same descriptor under a name that does not say so.
    std::fs::write(d.join("desc.xml"), xml).unwrap();
    let disk = d.join("disk1.vmdk");
    std::fs::write(&disk, b"the appliance's disk").unwrap();
    std::fs::hard_link(&disk, d.join("hard.vmdk")).unwrap();
    for src in ["x.ovf", "desc.xml"] {
        // An existing disk (also through a hard link), and a named file not yet there.
        for dst in ["disk1.vmdk", "hard.vmdk", "later.vmdk"] {
            let o = glimpse(
                &[
                    "convert",
                    "--force",
                    "-O",
                    "raw",
                    s(&d.join(src)),
                    s(&d.join(dst)),
                ],
                Stdio::null(),
                Stdio::piped(),
            );
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{src} -> {dst}: {err}");
            assert!(
                err.contains("output.source-reference"),
                "{src} -> {dst}: {err}"
            );
        }
        // stdout redirected to the disk.
        let o = glimpse(
            &["convert", "--force", "-O", "raw", s(&d.join(src)), "-"],
            Stdio::null(),
            read_write(&disk).into(),
        );
        assert_eq!(o.status.code(), Some(2), "{src} - 1<>disk1.vmdk");
        // Any other destination is written (the descriptor's bytes, as raw).
        let out = d.join(format!("{src}.raw"));
        let o = glimpse(
            &["convert", "--force", "-O", "raw", s(&d.join(src)), s(&out)],
            Stdio::null(),
            Stdio::piped(),
        );
        assert_eq!(
            o.status.code(),
            Some(0),
            "{src}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(std::fs::read(&out).unwrap(), xml.as_bytes());
    }
    assert_eq!(std::fs::read(&disk).unwrap(), b"the appliance's disk");
    assert!(!d.join("later.vmdk").exists());
}
