//! Stored data that lies in holes of the source file (a fixed VHD, a static VDI, a qcow2 with
//! preallocated metadata, each made on a sparse file) reads as zeros without being read by the
//! content readers: the content digest, `first_difference` (compare) and the chunk planner
//! (convert). Report sparse-huge F1: a 2040 GiB sparse fixed VHD and a 1 TiB static VDI took
//! more than 70 s in `checksum --content`, `compare` and `convert`, reading every hole.
//!
//! Each image holds 64 KiB of data at its start and at its end and is 256 MiB large; a counting
//! source proves that each reader reads a few MiB at most (metadata, the two data chunks), and
//! the digests and comparisons must still be what qemu-img's raw conversion gives. qemu-img
//! and qemu-io are required: the test fails without them.

mod support;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use glimpse_formats::compare::first_difference;
use glimpse_formats::digest::content_digest;
use glimpse_formats::reader::{ChunkPlanner, GuestReader};
use glimpse_formats::{open, Format, Image, Limits, ReadAt, Source};
use support::{qemu_img, qemu_to_raw};

const SIZE: u64 = 256 << 20;
/// What a reader may read of a 256 MiB image with 128 KiB of data: metadata and the chunks
/// that hold the data, not the holes.
const MOST: u64 = 8 << 20;

/// A file that counts the bytes read from it, and answers hole queries as the file does.
struct Counting {
    file: File,
    read: AtomicU64,
}

impl ReadAt for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = self.file.read_at(buf, offset)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.file.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.file.next_hole(offset)
    }
}

fn counting(path: &Path) -> Arc<Counting> {
    Arc::new(Counting {
        file: File::open(path).unwrap(),
        read: AtomicU64::new(0),
    })
}

/// `qemu-img create -f fmt -o opts`, then 64 KiB of 0x5a at the start and at the end.
fn sparse_image(dir: &Path, name: &str, fmt: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    let s = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", fmt, "-o", opts, s, &SIZE.to_string()]);
    let last = SIZE - (64 << 10);
    let out = Command::new("qemu-io")
        .args(["-f", fmt, "-c", "write -P 0x5a 0 64k"])
        .args(["-c", &format!("write -P 0x5a {last} 64k"), s])
        .output()
        .expect("qemu-io is required (apt-get install qemu-utils)");
    assert!(out.status.success(), "qemu-io: {out:?}");
    p
}

fn cases(dir: &Path) -> Vec<(PathBuf, Format, &'static str)> {
    vec![
        (
            sparse_image(dir, "fixed.vhd", "vpc", "subformat=fixed"),
            Format::Vhd,
            "vpc",
        ),
        (
            sparse_image(dir, "static.vdi", "vdi", "static=on"),
            Format::Vdi,
            "vdi",
        ),
        (
            sparse_image(dir, "meta.qcow2", "qcow2", "preallocation=metadata"),
            Format::Qcow2,
            "qcow2",
        ),
    ]
}

fn reader(src: &Arc<Counting>, format: Format) -> GuestReader {
    let source: Source = src.clone();
    let img: Arc<dyn Image> = Arc::from(open(source, format, &Limits::default()).unwrap());
    GuestReader::new(img, &Limits::default())
}

#[test]
fn content_readers_do_not_read_the_holes_under_stored_data() {
    let dir = tempfile::tempdir().unwrap();
    for (path, format, qfmt) in cases(dir.path()) {
        let name = path.display().to_string();
        // every case really is stored data in holes: the file is mostly hole
        let meta = std::fs::metadata(&path).unwrap();
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        assert!(
            meta.len() >= SIZE && allocated < MOST,
            "{name}: {allocated} of {}",
            meta.len()
        );
        let raw = dir.path().join("guest.raw");
        qemu_to_raw(&path, qfmt, &raw);

        // the content digest, against the raw conversion's
        let src = counting(&path);
        let ours = content_digest(&reader(&src, format), &|_, _| {}).unwrap();
        let read = src.read.load(Ordering::Relaxed);
        assert!(read < MOST, "{name}: the digest read {read} bytes");
        let raw_src = counting(&raw);
        let theirs = content_digest(&reader(&raw_src, Format::Raw), &|_, _| {}).unwrap();
        assert_eq!(ours, theirs, "{name}");

        // compare: the image against itself and against the raw conversion
        let (a, b) = (counting(&path), counting(&path));
        let d = first_difference(&reader(&a, format), &reader(&b, format), SIZE).unwrap();
        assert_eq!(d, None, "{name}");
        let read = a.read.load(Ordering::Relaxed) + b.read.load(Ordering::Relaxed);
        assert!(read < 2 * MOST, "{name}: compare read {read} bytes");
        let r = counting(&raw);
        let d = first_difference(&reader(&a, format), &reader(&r, Format::Raw), SIZE).unwrap();
        assert_eq!(d, None, "{name}");

        // the chunk planner (convert): only the chunks with data are read
        let src = counting(&path);
        let r = reader(&src, format);
        let read_plans: u64 = ChunkPlanner::new(r.image().as_ref(), 1 << 20)
            .map(|p| p.unwrap())
            .filter(|p| p.read)
            .map(|p| p.len)
            .sum();
        assert!(read_plans <= 2 << 20, "{name}: {read_plans} bytes to read");
        std::fs::remove_file(&raw).unwrap();
    }
}
