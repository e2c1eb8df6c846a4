//! The destination is refused when it is another name for the source's storage: a second
//! device node of the same device, a loop device over the source file, the file a loop device
//! source reads, two loop devices over one file; and stdin or stdout identified from their
//! descriptors, not from a path.
//!
//! The loop-device tests attach a loop device to a file under a temporary directory with
//! `losetup` (root, a free loop device), make their second device node with `mknod` in the
//! same directory, and detach the device whatever happens. They fail, never skip, where
//! `losetup` cannot attach one.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use glimpse_convert::output::{
    check_not_referenced, check_not_source, OutputFile, OutputOptions, Storage,
};
use glimpse_formats::{RefKind, Reference};

/// A loop device attached to a file, detached when dropped.
struct Loop(PathBuf);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup must be installed for this test");
        assert!(
            out.status.success(),
            "losetup -f --show {} failed (these tests need root and a free loop device): {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "{dev:?}");
        Loop(PathBuf::from(dev))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A second block-device node for `dev`, at `at`.
fn second_node(dev: &Path, at: &Path) {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).unwrap().rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let st = Command::new("mknod")
        .arg(at)
        .arg("b")
        .arg(major.to_string())
        .arg(minor.to_string())
        .status()
        .unwrap();
    assert!(st.success(), "mknod {} b {major} {minor}", at.display());
    assert!(std::fs::metadata(at).unwrap().file_type().is_block_device());
}

fn at(p: &Path) -> Storage {
    Storage::at(p).unwrap()
}

fn assert_same(source: &Storage, dest: &Storage, how: &str) {
    let e = check_not_source(source, dest).expect_err(how);
    assert_eq!(e.finding_code(), "output.same-as-source", "{how}");
    assert!(e.to_string().contains(how), "{e}");
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![0x5a; 1 << 20]).unwrap();
    p
}

#[test]
fn a_second_node_of_the_source_device_is_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = image(dir.path(), "q.img");
    let lo = Loop::attach(&file);
    let node = dir.path().join("node");
    second_node(&lo.0, &node);
    let how = "the same device, through another device node";
    assert_same(&at(&lo.0), &at(&node), how);
    assert_same(&at(&node), &at(&lo.0), how);
    // stdout opened on the second node (`- 1<>node`), identified from its descriptor.
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&node)
        .unwrap();
    assert_same(
        &at(&lo.0),
        &Storage::of_fd(out.as_fd(), "stdout").unwrap(),
        how,
    );
    assert_eq!(std::fs::read(&file).unwrap(), vec![0x5a; 1 << 20]);
}

#[test]
fn a_loop_device_and_the_file_it_reads_are_one_storage() {
    let dir = tempfile::tempdir().unwrap();
    let file = image(dir.path(), "q.img");
    let lo = Loop::attach(&file);
    let how = "a loop device and the file it reads";
    // The source file written through a loop device over it (`- 1<>/dev/loopN`).
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lo.0)
        .unwrap();
    assert_same(
        &at(&file),
        &Storage::of_fd(out.as_fd(), "stdout").unwrap(),
        how,
    );
    assert_same(&at(&file), &at(&lo.0), how);
    // The loop device read, its backing file as DST (also through a hard link and a symlink).
    assert_same(&at(&lo.0), &at(&file), how);
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&file, &hard).unwrap();
    std::os::unix::fs::symlink(&file, dir.path().join("sym.img")).unwrap();
    assert_same(&at(&lo.0), &at(&hard), how);
    assert_same(&at(&lo.0), &at(&dir.path().join("sym.img")), how);
    let e = OutputFile::create(&file, Some(&at(&lo.0)), OutputOptions::default()).unwrap_err();
    assert_eq!(e.finding_code(), "output.same-as-source");
    // Another file, and a loop device over another file, are not the source.
    let other = image(dir.path(), "other.img");
    assert!(check_not_source(&at(&lo.0), &at(&other)).is_ok());
    let lo2 = Loop::attach(&other);
    assert!(check_not_source(&at(&lo.0), &at(&lo2.0)).is_ok());
    assert!(check_not_source(&at(&file), &at(&lo2.0)).is_ok());
    // Two loop devices over one file are one storage.
    let lo3 = Loop::attach(&file);
    assert_same(&at(&lo.0), &at(&lo3.0), "two loop devices over one file");
    assert_eq!(std::fs::read(&file).unwrap(), vec![0x5a; 1 << 20]);
}

#[test]
fn a_loop_device_over_a_referenced_file_is_that_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "ov.qcow2");
    let base = image(dir.path(), "base.raw");
    let lo = Loop::attach(&base);
    let refs = [Reference {
        kind: RefKind::BackingFile,
        target: "base.raw".into(),
        format: None,
        offset: None,
    }];
    // stdout on a loop device over the backing file.
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&lo.0)
        .unwrap();
    let e = check_not_referenced(
        Some(&src),
        &refs,
        &Storage::of_fd(out.as_fd(), "stdout").unwrap(),
    )
    .unwrap_err();
    assert_eq!(e.finding_code(), "output.source-reference");
    let e = check_not_referenced(Some(&src), &refs, &at(&lo.0)).unwrap_err();
    assert_eq!(e.finding_code(), "output.source-reference");
}

/// The identity of a descriptor comes from the descriptor: a file with no name left at all
/// (unlinked while open) is still recognised through it, which a path such as /dev/stdin or
/// /proc/self/fd/N (a link that needs /proc) could not promise.
#[test]
fn a_descriptor_is_identified_without_any_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = image(dir.path(), "a.img");
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&file, &hard).unwrap();
    let open = File::open(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    let fd = Storage::of_fd(open.as_fd(), "stdin").unwrap();
    assert!(fd.exists() && fd.is_file_or_block_device());
    assert_same(&fd, &at(&hard), "the same file on disk");
    assert!(check_not_source(&fd, &at(&image(dir.path(), "b.img"))).is_ok());
    // A destination that does not exist is not the source; a source that cannot be
    // identified refuses every destination.
    assert!(check_not_source(&fd, &at(&dir.path().join("new.img"))).is_ok());
    let gone = at(&dir.path().join("gone.img"));
    assert!(!gone.exists());
    let e = check_not_source(&gone, &at(&hard)).unwrap_err();
    assert_eq!(e.finding_code(), "output.same-as-source");
}
