//! Guest bytes copied file to file, without passing through the converter's buffers.
//!
//! When the source's data extents are bytes of a file, verbatim (raw, and the uncompressed
//! clusters, grains and blocks of every format), the pipeline does not read them into memory:
//! it probes each chunk just far enough to know it is not all zero (usually its first 512
//! bytes) and hands the writer a [`Payload::Copy`](crate::Payload::Copy): where the bytes lie
//! in the source file. The writer then copies them with `copy_file_range(2)`, which is a
//! reflink on XFS and btrfs and an in-kernel copy with no user-space buffer elsewhere.
//!
//! Where the kernel refuses `copy_file_range` (`EXDEV`, `EINVAL`, `ENOSYS`, `EOPNOTSUPP`:
//! another file system, an old kernel, a special file), the copy goes through a pipe with
//! `splice(2)`, which works between file systems (an output on tmpfs or on another mount), and
//! where that is refused too, through one buffer with `pread`/`pwrite`, for the rest of the
//! conversion. The choice of what to copy is made before either method
//! runs, so both give the same output file, byte for byte.
//!
//! On ext4, which cannot share blocks, every copy is a copy of page-cache pages, made under the
//! output's inode lock, so copies into one file run one at a time. By default
//! ([`CopyMode::Auto`]) copies into ext4 are therefore not the kernel's: two threads `pread`
//! pieces into buffers of their own and `pwrite` them, one reading while the other holds the
//! lock ([`paired`]: 1 GiB raw -> raw in the page cache 160 -> 110-120 ms on an Intel Xeon).
//! The reservation of blocks below applies to them too, made by the thread that copies a
//! copy's first piece. With [`CopyMode::Kernel`], the
//! kernel's copy into ext4 is made cheaper by two things: each copy first reserves the blocks
//! it is about to fill (`fallocate`), which spares ext4's block-by-block delayed allocation,
//! and the bytes go through a 1 MiB pipe with `splice(2)` rather than `copy_file_range`, whose
//! internal pipe holds 64 KiB, so ext4 takes its locks and maps blocks for 16 times fewer,
//! larger writes.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

mod paired;

/// How data that lies verbatim in the source file reaches the output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CopyMode {
    /// The fastest copy for the output's file system: into ext4, which copies pages, two
    /// threads through buffers of their own ([`paired`]); elsewhere as [`CopyMode::Kernel`].
    #[default]
    Auto,
    /// `copy_file_range` (or `splice`), falling back to read/write where the kernel says no.
    Kernel,
    /// The same choice of bytes, moved with `pread`/`pwrite` (the fallback, forced).
    ReadWrite,
    /// No file-to-file copies: every chunk is read into memory by the workers, as for
    /// sources that are not files.
    Off,
}

/// The source file that copies read from, with counters of how the bytes moved.
#[derive(Debug)]
pub struct SourceFile {
    file: File,
    /// False once the kernel refused `copy_file_range` (or when read/write is forced).
    range: AtomicBool,
    kernel_bytes: AtomicU64,
    fallback_bytes: AtomicU64,
    /// Whether the output is on ext4 ([`copies_pages`]), decided at the first copy: a
    /// conversion copies into one output file.
    pages: OnceLock<bool>,
    /// False once `splice` was refused (or when read/write is forced).
    splice: AtomicBool,
    /// Whether copies into ext4 are [`paired`] ([`CopyMode::Auto`]).
    paired: bool,
    /// False once `cachestat` was refused ([`cached`]): [`SourceFile::will_need`] then
    /// always advises.
    cachestat: AtomicBool,
    /// The queue and second thread of paired copies, made at the first (`None` when the
    /// source's descriptor could not be duplicated: the copies are then the kernel's).
    copier: OnceLock<Option<paired::Copier>>,
}

impl SourceFile {
    /// Wraps `file` (a duplicate of the source's descriptor) for copies in `mode`.
    pub fn new(file: File, mode: CopyMode) -> Self {
        let kernel = matches!(mode, CopyMode::Auto | CopyMode::Kernel);
        SourceFile {
            file,
            range: AtomicBool::new(kernel),
            kernel_bytes: AtomicU64::new(0),
            fallback_bytes: AtomicU64::new(0),
            pages: OnceLock::new(),
            splice: AtomicBool::new(kernel),
            paired: mode == CopyMode::Auto,
            cachestat: AtomicBool::new(true),
            copier: OnceLock::new(),
        }
    }

    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Tells the kernel that `len` bytes at `from` will be read soon (`POSIX_FADV_WILLNEED`):
    /// it starts reading them in the background. Advice only: errors are ignored.
    ///
    /// Not when every page of the range is in the page cache already ([`cached`]): the advice
    /// would then only walk the cache page by page. 4 GiB raw -> qcow2 in the page cache spent
    /// 10-16 ms of the producer's CPU in it, which the copy threads' two cores pay for.
    /// Returns true then, and false when it advised (the range was not all there, or the
    /// kernel cannot tell).
    pub fn will_need(&self, from: u64, len: u64) -> bool {
        if self.cachestat.load(Ordering::Relaxed) {
            match cached(&self.file, from, len) {
                Some(true) => return true,
                Some(false) => {}
                None => self.cachestat.store(false, Ordering::Relaxed),
            }
        }
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(from), libc::off_t::try_from(len)) else {
            return false;
        };
        // SAFETY: advice on an open descriptor; no memory is passed.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED);
        }
        false
    }

    /// Bytes copied by the kernel so far.
    pub fn kernel_bytes(&self) -> u64 {
        self.kernel_bytes.load(Ordering::Relaxed)
    }

    /// Bytes copied through a buffer so far (forced, or after the kernel refused).
    pub fn fallback_bytes(&self) -> u64 {
        self.fallback_bytes.load(Ordering::Relaxed)
    }

    /// Bytes copied into ext4 by two threads through buffers so far ([`CopyMode::Auto`]).
    pub fn paired_bytes(&self) -> u64 {
        match self.copier.get() {
            Some(Some(c)) => c.copied(),
            _ => 0,
        }
    }

    /// The queue of paired copies, when copies into `dst` are paired.
    fn copier(&self, dst: &File) -> Option<&paired::Copier> {
        if !self.paired || !*self.pages.get_or_init(|| copies_pages(dst)) {
            return None;
        }
        self.copier
            .get_or_init(|| paired::Copier::new(&self.file).ok())
            .as_ref()
    }

    /// Copies `len` bytes from `from` in the source to `to` in `dst`, and returns when they
    /// are there.
    ///
    /// # Errors
    /// `UnexpectedEof` when the source ends first; any other I/O error of either file.
    pub fn copy_to(&self, dst: &File, from: u64, to: u64, len: u64) -> io::Result<()> {
        self.submit(dst, from, to, len)?;
        self.drain()
    }

    /// Copies `len` bytes from `from` in the source to `to` in `dst`, possibly still under way
    /// when it returns (paired copies): [`SourceFile::drain`] waits for them. Copies under way
    /// must be to parts of `dst` that nothing else writes.
    ///
    /// # Errors
    /// As [`SourceFile::copy_to`]; an error of a copy still under way is returned by a later
    /// call, or by [`SourceFile::drain`].
    pub fn submit(&self, dst: &File, from: u64, to: u64, len: u64) -> io::Result<()> {
        match self.copier(dst) {
            Some(c) => c.submit(dst, from, to, len),
            None => self.copy_now(dst, from, to, len),
        }
    }

    /// Hands a copy of `len` bytes from `from` in the source to `to` in `dst` to the second
    /// thread of paired copies ([`SourceFile::submit`], without copying any of it on this
    /// thread), and returns true; returns false and does nothing when copies into `dst` are
    /// not paired.
    ///
    /// # Errors
    /// An error of a copy still under way.
    pub fn hand_off(&self, dst: &File, from: u64, to: u64, len: u64) -> io::Result<bool> {
        let Some(c) = self.copier(dst) else {
            return Ok(false);
        };
        c.hand_off(dst, from, to, len)?;
        Ok(true)
    }

    /// Waits for the copies still under way.
    ///
    /// # Errors
    /// The first error of any of them.
    pub fn drain(&self) -> io::Result<()> {
        match self.copier.get() {
            Some(Some(c)) => c.drain(),
            _ => Ok(()),
        }
    }

    /// A kernel copy, or the read/write fallback.
    fn copy_now(&self, dst: &File, from: u64, to: u64, len: u64) -> io::Result<()> {
        let (mut from, mut to, mut left) = (from, to, len);
        let kernel = self.range.load(Ordering::Relaxed) || self.splice.load(Ordering::Relaxed);
        let pages = kernel && *self.pages.get_or_init(|| copies_pages(dst));
        if pages {
            reserve(dst, to, len);
        }
        while left > 0 {
            let range = self.range.load(Ordering::Relaxed);
            // A splice into ext4 (see `copies_pages`), and wherever `copy_file_range` was
            // refused: it is refused between two file systems (EXDEV: an output on tmpfs, on
            // another mount), where a splice still moves the source's pages without a buffer.
            let spliced = self.splice.load(Ordering::Relaxed) && (pages || !range);
            let step = if spliced {
                spliced_copy(&self.file, from, dst, to, left)
            } else if range {
                kernel_copy(&self.file, from, dst, to, left)
            } else {
                break;
            };
            match step {
                Ok(0) => return Err(ended_early()),
                Ok(n) => {
                    self.kernel_bytes.fetch_add(n, Ordering::Relaxed);
                    from = from.saturating_add(n);
                    to = to.saturating_add(n);
                    left = left.saturating_sub(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if refused(&e) && spliced => self.splice.store(false, Ordering::Relaxed),
                Err(e) if refused(&e) => self.range.store(false, Ordering::Relaxed),
                Err(e) => return Err(e),
            }
        }
        if left > 0 {
            buffered_copy(&self.file, from, dst, to, left)?;
            self.fallback_bytes.fetch_add(left, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// One run of a chunk's guest bytes: at `at` in the source file, or zeros when `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Source file offset of the run's first byte; `None` for zeros.
    pub at: Option<u64>,
    /// Length in bytes.
    pub len: u64,
}

/// A chunk's guest bytes as runs of the source file, in guest order.
#[derive(Debug, Clone)]
pub struct CopyFrom {
    /// The file the runs point into.
    pub src: Arc<SourceFile>,
    /// The runs; their lengths add up to the chunk's length.
    pub runs: Vec<Run>,
}

impl PartialEq for CopyFrom {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.src, &other.src) && self.runs == other.runs
    }
}

impl Eq for CopyFrom {}

impl CopyFrom {
    /// The data runs of the chunk written at `to`, as (source offset, output offset, length);
    /// zero runs are skipped but keep their place.
    fn placed(&self, to: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.runs
            .iter()
            .scan(to, |pos, r| {
                let at = *pos;
                *pos = pos.saturating_add(r.len);
                Some(r.at.map(|from| (from, at, r.len)))
            })
            .flatten()
    }

    /// True when every byte the runs name is zero. Reads each data run only until its first
    /// non-zero byte: [`FIRST_PROBE`] bytes first, then 64 KiB at a time, so a chunk of data
    /// usually costs one small read, and the chunk still goes to the writer as zeros exactly
    /// when a full read would have found it all zero.
    ///
    /// # Errors
    /// `UnexpectedEof` when the source ends first; other read errors.
    pub fn is_zero(&self) -> io::Result<bool> {
        PROBE.with(|b| {
            let mut buf = b.borrow_mut();
            for r in &self.runs {
                let Some(at) = r.at else { continue };
                let mut done = 0u64;
                let mut step = FIRST_PROBE;
                while done < r.len {
                    let n = step.min(r.len - done);
                    let piece = buf.get_mut(..n as usize).unwrap_or_default();
                    self.src
                        .file
                        .read_exact_at(piece, at.saturating_add(done))?;
                    if !crate::pipeline::is_zero(piece) {
                        return Ok(false);
                    }
                    done += n;
                    step = PROBE_BYTES as u64;
                }
            }
            Ok(true)
        })
    }
}

/// File-to-file copies into one file, where a copy that continues the pending one in both
/// files joins it: one kernel copy (and one reservation of blocks) for up to 64 MiB instead
/// of one per chunk.
#[derive(Debug, Default)]
pub struct CopyMerger {
    /// Source, source offset, output offset, length.
    pending: Option<(Arc<SourceFile>, u64, u64, u64)>,
    /// The sources of the copies made so far, whose copies may still be under way.
    sources: Vec<Arc<SourceFile>>,
}

/// The longest copy a [`CopyMerger`] makes of merged ones (it holds no memory for them).
const MAX_MERGED: u64 = 64 << 20;

impl CopyMerger {
    /// Copies the data runs of `c` to `dst` at `to`, possibly later (see [`CopyMerger::flush`]).
    /// Zero runs are left alone: every writer puts data chunks in a part of the file not
    /// written before, which reads as zeros.
    ///
    /// # Errors
    /// As [`SourceFile::copy_to`], for the copy this one could not join.
    pub fn put(&mut self, dst: &File, c: &CopyFrom, to: u64) -> io::Result<()> {
        for (from, at, len) in c.placed(to) {
            if let Some((s, f, t, l)) = &mut self.pending {
                if Arc::ptr_eq(s, &c.src)
                    && f.checked_add(*l) == Some(from)
                    && t.checked_add(*l) == Some(at)
                    && l.saturating_add(len) <= MAX_MERGED
                {
                    *l += len;
                    continue;
                }
            }
            self.submit(dst)?;
            self.pending = Some((c.src.clone(), from, at, len));
        }
        Ok(())
    }

    /// Starts the pending copy ([`SourceFile::submit`]), which may still be under way when
    /// this returns: a writer may go on writing other parts of `dst` meanwhile.
    ///
    /// # Errors
    /// As [`SourceFile::submit`].
    pub fn submit(&mut self, dst: &File) -> io::Result<()> {
        if let Some((src, from, to, len)) = self.pending.take() {
            src.submit(dst, from, to, len)?;
            self.note_source(src);
        }
        Ok(())
    }

    /// Hands the pending copy to the second thread of paired copies
    /// ([`SourceFile::hand_off`]) when copies into `dst` are paired; otherwise keeps it, to
    /// join the next. Writers call it (through [`crate::Writer::batch_end`]) before they wait
    /// for more chunks: what they held back is copied meanwhile.
    ///
    /// # Errors
    /// As [`SourceFile::hand_off`].
    pub fn hand_off(&mut self, dst: &File) -> io::Result<()> {
        let Some((src, from, to, len)) = self.pending.take() else {
            return Ok(());
        };
        if src.hand_off(dst, from, to, len)? {
            self.note_source(src);
        } else {
            self.pending = Some((src, from, to, len));
        }
        Ok(())
    }

    fn note_source(&mut self, src: Arc<SourceFile>) {
        if !self.sources.iter().any(|s| Arc::ptr_eq(s, &src)) {
            self.sources.push(src);
        }
    }

    /// Makes the pending copy and waits for every copy made so far.
    ///
    /// # Errors
    /// As [`SourceFile::copy_to`].
    pub fn flush(&mut self, dst: &File) -> io::Result<()> {
        self.submit(dst)?;
        self.sources.iter().try_for_each(|s| s.drain())
    }
}

impl Drop for CopyMerger {
    fn drop(&mut self) {
        // A writer dropped on an error: its copies under way must not outlive it.
        for s in &self.sources {
            let _ = s.drain();
        }
    }
}

/// The page size that writers align copied data to (VHD block data, VDI data), so that a
/// copy fills whole pages of the output and, on XFS and btrfs, can be a reflink.
pub(crate) const PAGE: u64 = 4096;

/// The first read of a zero probe. Smaller is cheaper only up to the cost of the system call:
/// the 16,384 probes of 1 GiB in 64 KiB clusters (page cache) took 14 ms of reads of 4 KiB,
/// 6-8 ms of 512 bytes and 4.5-6 ms of 64 bytes. Data rarely starts with 512 zero bytes, and
/// where it does the next read finds it.
const FIRST_PROBE: u64 = 512;
/// The largest piece a zero probe reads at once.
const PROBE_BYTES: usize = 64 << 10;
/// Bytes a read/write fallback copy moves at once.
const FALLBACK_BYTES: usize = 1 << 20;

thread_local! {
    static PROBE: RefCell<Vec<u8>> = RefCell::new(vec![0; PROBE_BYTES]);
    static FALLBACK: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

fn ended_early() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "source ended early")
}

/// Errors by which the kernel says it cannot copy between these files (rather than that
/// something went wrong): the caller falls back to read/write.
fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF)
    )
}

/// Whether every page of `len` bytes at `from` in `file` is in the page cache, asked with
/// `cachestat(2)` (Linux 6.5); `None` where the kernel refuses it (older kernels, a seccomp
/// filter) or this architecture's number for it is not known here. It counts cached pages
/// without reading or touching them, a folio at a time.
fn cached(file: &File, from: u64, len: u64) -> Option<bool> {
    #[cfg(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    ))]
    {
        /// `__NR_cachestat`: one number on these architectures (the common table).
        const SYS_CACHESTAT: libc::c_long = 451;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        if len == 0 {
            // A length of 0 asks about the rest of the file.
            return Some(true);
        }
        let range = Range { off: from, len };
        let mut st = Stat::default();
        // SAFETY: the descriptor is open; `range` and `st` are live, properly laid out
        // `struct cachestat_range` and `struct cachestat`, read and written by the kernel
        // during the call only.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut Stat,
                0u32,
            )
        };
        if r != 0 {
            return None;
        }
        // SAFETY: sysconf has no memory arguments.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&p| p > 0)?;
        let first = from.checked_div(page)?;
        let end = from.saturating_add(len).div_ceil(page);
        Some(st.nr_cache >= end.saturating_sub(first))
    }
    #[cfg(not(any(
        target_arch = "x86_64",
        target_arch = "aarch64",
        target_arch = "riscv64"
    )))]
    {
        let _ = (file, from, len);
        None
    }
}

/// Whether kernel copies into `dst` copy pages, and so should reserve their blocks first and
/// go through [`spliced_copy`]: on ext4, which cannot share blocks and otherwise allocates them
/// block by block as the copy dirties its pages (delayed allocation). Measured on 1 GiB
/// raw -> raw in the page cache (62% data): `copy_file_range` 166 ms, with reservation 141 ms
/// (another day 161 ms), with reservation and splice 142 ms that day. Not elsewhere: on XFS
/// and btrfs `copy_file_range` is a reflink that would only free blocks reserved first, on
/// NFS it is a server-side copy, and on tmpfs reserving means zeroing pages that the copy then
/// overwrites.
fn copies_pages(dst: &File) -> bool {
    on_file_system(dst, libc::EXT4_SUPER_MAGIC)
}

/// Whether `file` lies on the file system whose `statfs` magic is `magic`.
fn on_file_system(file: &File, magic: impl Into<i128>) -> bool {
    // SAFETY: `st` is a properly sized, writable statfs that the kernel fills; the descriptor
    // is open.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut st) == 0 && i128::from(st.f_type) == magic.into()
    }
}

/// Reserves the blocks of `len` bytes at `to` of `dst`, exactly the range a copy writes next,
/// so the output's size and holes do not change. Best effort: a refusal (no space, an ext2/3
/// file without extents) is left for the copy itself to meet.
fn reserve(dst: &File, to: u64, len: u64) {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(to), libc::off_t::try_from(len)) else {
        return;
    };
    if len > 0 {
        // SAFETY: a request about an open descriptor; no memory is passed.
        unsafe {
            libc::fallocate(dst.as_raw_fd(), 0, off, len);
        }
    }
}

/// One `copy_file_range` call of at most 1 GiB; returns the bytes copied (0 at the source's
/// end).
fn kernel_copy(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<u64> {
    let mut off_in = libc::loff_t::try_from(from).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut off_out = libc::loff_t::try_from(to).map_err(|_| io::ErrorKind::InvalidInput)?;
    let n = usize::try_from(len.min(1 << 30)).unwrap_or(1 << 30);
    // SAFETY: both descriptors are open for the call's duration and the offsets point at
    // live locals; the kernel reads and writes only the files.
    let r = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            n,
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(r).unwrap_or(0))
}

/// The capacity asked for the pipe of [`spliced_copy`]: the default `/proc/sys/fs/pipe-max-size`,
/// so no privilege is needed. Measured as above: a 64 KiB pipe 163 ms, 256 KiB to 1 MiB
/// 141-142 ms.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// A pipe of this thread's, for [`spliced_copy`]: (read end, write end, capacity).
struct Pipe(OwnedFd, OwnedFd, u64);

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a writable array of two descriptors, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on an open descriptor, with an integer argument. A refusal (a lower
        // pipe-max-size, the user's pipe quota) leaves the default capacity, read back below.
        let cap = unsafe {
            libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES);
            libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let cap = u64::try_from(cap).ok().filter(|&c| c > 0).unwrap_or(4096);
        Ok(Pipe(r, w, cap))
    }
}

/// One `splice` of at most the pipe's capacity from `src` at `from` into this thread's pipe,
/// then out of it into `dst` at `to`; returns the bytes copied (0 at the source's end). Like
/// `copy_file_range`, whose in-kernel path is the same, but through a pipe 16 times larger.
/// The piece ends at the next multiple of the capacity in `dst`: ext4 gives a write a folio as
/// large as the write and the alignment of its offset allow, and a copy into a packed output
/// (qcow2 data from 192 KiB) otherwise wrote every piece across folio boundaries. Measured on
/// 1 GiB raw -> qcow2 in the page cache: 118 -> 116 ms and 115 -> 112 ms in two runs; raw -> vdi
/// 121 -> 115 ms.
/// A pipe that an error leaves holding bytes is dropped, so the next copy starts empty; the
/// caller, which keeps the offsets, may retry the same range another way.
fn spliced_copy(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<u64> {
    PIPE.with(|p| {
        let mut slot = p.borrow_mut();
        if slot.is_none() {
            *slot = Some(Pipe::new()?);
        }
        let Some(Pipe(r, w, cap)) = slot.as_ref() else {
            return Err(io::ErrorKind::Other.into());
        };
        let mut off_in = libc::loff_t::try_from(from).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut off_out = libc::loff_t::try_from(to).map_err(|_| io::ErrorKind::InvalidInput)?;
        // Less than a page short of the boundary means the pipe could not take a whole
        // capacity (the files' offsets differ within a page, so every page of the source costs
        // a pipe slot and a part): then a whole capacity, not a sliver.
        let room = *cap - to % *cap;
        let room = if room < PAGE { *cap } else { room };
        let n = usize::try_from(len.min(room)).unwrap_or(4096);
        // SAFETY: both descriptors are open for the call's duration and the offset points at a
        // live local; the kernel moves page references from the file into the pipe.
        let got = unsafe {
            libc::splice(
                src.as_raw_fd(),
                &mut off_in,
                w.as_raw_fd(),
                std::ptr::null_mut(),
                n,
                0,
            )
        };
        let got = usize::try_from(got).map_err(|_| io::Error::last_os_error())?;
        let mut left = got;
        while left > 0 {
            // SAFETY: as above; the kernel copies the pipe's pages into the output file.
            let put = unsafe {
                libc::splice(
                    r.as_raw_fd(),
                    std::ptr::null_mut(),
                    dst.as_raw_fd(),
                    &mut off_out,
                    left,
                    0,
                )
            };
            match usize::try_from(put) {
                Ok(0) => {
                    *slot = None;
                    return Err(io::ErrorKind::WriteZero.into());
                }
                Ok(k) => left = left.saturating_sub(k),
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        *slot = None;
                        return Err(e);
                    }
                }
            }
        }
        Ok(got as u64)
    })
}

fn buffered_copy(src: &File, from: u64, dst: &File, to: u64, len: u64) -> io::Result<()> {
    FALLBACK.with(|b| {
        let mut buf = b.borrow_mut();
        if buf.len() < FALLBACK_BYTES {
            buf.resize(FALLBACK_BYTES, 0);
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(FALLBACK_BYTES as u64) as usize;
            let piece = buf.get_mut(..n).unwrap_or_default();
            src.read_exact_at(piece, from.saturating_add(done))?;
            dst.write_all_at(piece, to.saturating_add(done))?;
            done += n as u64;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    /// A chunk of one data run: 1 MiB at `from` in `src`.
    fn mib_at(src: &Arc<SourceFile>, from: u64) -> CopyFrom {
        CopyFrom {
            src: src.clone(),
            runs: vec![Run {
                at: Some(from),
                len: 1 << 20,
            }],
        }
    }

    #[test]
    fn kernel_and_fallback_copies_give_the_same_file() {
        let data: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let mut outs = Vec::new();
        // The third: the kernel copy after `copy_file_range` was refused (as between two file
        // systems), which splices. The fourth: paired copies into ext4, the kernel's
        // elsewhere.
        for (mode, range) in [
            (CopyMode::Kernel, true),
            (CopyMode::ReadWrite, false),
            (CopyMode::Kernel, false),
            (CopyMode::Auto, true),
        ] {
            let src = Arc::new(SourceFile::new(file_with(&data), mode));
            src.range.store(range, Ordering::Relaxed);
            let c = CopyFrom {
                src: src.clone(),
                runs: vec![
                    Run {
                        at: Some(5),
                        len: 1 << 20,
                    },
                    Run { at: None, len: 700 },
                    Run {
                        at: Some(2 << 20),
                        len: 4096,
                    },
                ],
            };
            let out = tempfile::tempfile().unwrap();
            let mut m = CopyMerger::default();
            m.put(&out, &c, 100).unwrap();
            m.flush(&out).unwrap();
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut &out, &mut got).unwrap();
            let moved = src.kernel_bytes() + src.fallback_bytes() + src.paired_bytes();
            assert_eq!(moved, (1 << 20) + 4096);
            if mode == CopyMode::ReadWrite {
                assert_eq!(src.kernel_bytes(), 0);
            } else if mode == CopyMode::Auto && copies_pages(&out) {
                assert_eq!(src.paired_bytes(), moved);
            } else {
                assert_eq!(src.paired_bytes(), 0);
                // ext4, XFS, btrfs and tmpfs all copy in the kernel on Linux >= 5.3.
                assert_eq!(src.fallback_bytes(), 0, "the kernel refused the copy");
            }
            outs.push(got);
        }
        assert_eq!(outs[0], outs[1]);
        assert_eq!(outs[0], outs[2]);
        assert_eq!(outs[0], outs[3]);
        let o = &outs[0];
        assert_eq!(&o[100..100 + (1 << 20)], &data[5..5 + (1 << 20)]);
        assert!(o[100 + (1 << 20)..100 + (1 << 20) + 700]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(&o[o.len() - 4096..], &data[2 << 20..(2 << 20) + 4096]);
    }

    #[test]
    fn a_copy_between_two_file_systems_stays_in_the_kernel() {
        // The source on tmpfs (/dev/shm), the output in the temporary directory, on another
        // file system: `copy_file_range` says EXDEV there (Linux >= 5.19), and the copy splices
        // instead of reading into a buffer.
        let data: Vec<u8> = (0..(3 << 20) + 333).map(|i| (i * 13 % 253) as u8).collect();
        let mut shm = tempfile::tempfile_in("/dev/shm").expect("a file on /dev/shm");
        std::io::Write::write_all(&mut shm, &data).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("out"))
            .unwrap();
        let src = SourceFile::new(shm, CopyMode::Kernel);
        src.copy_to(&out, 0, 4096, data.len() as u64).unwrap();
        assert_eq!(
            (src.kernel_bytes(), src.fallback_bytes()),
            (data.len() as u64, 0)
        );
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut &out, &mut got).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0));
        assert_eq!(&got[4096..], &data[..]);
    }

    #[test]
    fn reserving_blocks_for_a_copy_keeps_the_outputs_holes_and_size() {
        // On ext4 (where the tests' temporary files usually live) the copy reserves its blocks
        // first; elsewhere it does not. Either way, only the copied range may be allocated.
        let data = vec![7u8; 64 << 10];
        let src = SourceFile::new(file_with(&data), CopyMode::Kernel);
        let out = tempfile::tempfile().unwrap();
        out.set_len(8 << 20).unwrap();
        src.copy_to(&out, 0, 1 << 20, 64 << 10).unwrap();
        let meta = out.metadata().unwrap();
        assert_eq!(meta.len(), 8 << 20);
        let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
        assert!(
            allocated <= 128 << 10,
            "{allocated} bytes allocated for a 64 KiB copy"
        );
        let mut got = vec![0u8; 8 << 20];
        out.read_exact_at(&mut got, 0).unwrap();
        assert!(got[..1 << 20].iter().all(|&b| b == 0));
        assert_eq!(&got[1 << 20..(1 << 20) + (64 << 10)], &data[..]);
        assert!(got[(1 << 20) + (64 << 10)..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_spliced_copy_moves_at_most_a_pipe_to_an_aligned_end_and_the_right_bytes() {
        let data: Vec<u8> = (0..(5 << 20) + 333).map(|i| (i * 13 % 241) as u8).collect();
        let src = file_with(&data);
        let cap = Pipe::new().unwrap().2;
        assert!(cap >= 4096);
        // A length of several pipes, then the source's end; offsets unaligned in both files,
        // then page-aligned as in a packed output (qcow2 data from 192 KiB).
        for (start, at) in [(7u64, 4099u64), (64 << 10, 192 << 10)] {
            let out = tempfile::tempfile().unwrap();
            let len = (4u64 << 20) + 1001;
            let (mut from, mut to, mut left) = (start, at, len);
            let mut pieces = Vec::new();
            while left > 0 {
                let n = spliced_copy(&src, from, &out, to, left).unwrap();
                assert!(
                    n > 0 && n <= left.min(cap),
                    "{n} bytes of {left}, pipe {cap}"
                );
                pieces.push(n);
                (from, to, left) = (from + n, to + n, left - n);
            }
            if start % 4096 != 0 {
                // Every piece is nearly a whole pipe: no slivers to reach an alignment that a
                // pipe of partial pages cannot keep.
                assert!(pieces[..pieces.len() - 1].iter().all(|&n| n + 8192 > cap));
            } else {
                // Whole pages fill the pipe: after the first piece, whole aligned pipes.
                assert_eq!(pieces[0], cap - at % cap);
                assert!(pieces[1..pieces.len() - 1].iter().all(|&n| n == cap));
            }
            let mut got = vec![0u8; len as usize];
            out.read_exact_at(&mut got, at).unwrap();
            assert_eq!(&got[..], &data[start as usize..(start + len) as usize]);
            let mut head = vec![1u8; at as usize];
            out.read_exact_at(&mut head, 0).unwrap();
            assert!(head.iter().all(|&b| b == 0));
        }
        let out = tempfile::tempfile().unwrap();
        let end = data.len() as u64;
        assert_eq!(spliced_copy(&src, end, &out, 0, 100).unwrap(), 0);
        assert_eq!(spliced_copy(&src, end - 10, &out, 0, 100).unwrap(), 10);
    }

    #[test]
    fn a_spliced_copy_into_a_file_it_cannot_write_leaves_the_next_copy_clean() {
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 199) as u8).collect();
        let src = file_with(&data);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        std::fs::write(&path, b"").unwrap();
        let read_only = File::open(&path).unwrap();
        // The bytes reach the pipe, the write is refused: the pipe must not keep them.
        assert!(spliced_copy(&src, 0, &read_only, 0, 64 << 10).is_err());
        let out = tempfile::tempfile().unwrap();
        let n = spliced_copy(&src, 4096, &out, 0, 8192).unwrap();
        assert_eq!(n, 8192);
        let mut got = vec![0u8; 8192];
        out.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got[..], &data[4096..4096 + 8192]);
        assert_eq!(out.metadata().unwrap().len(), 8192);
    }

    #[test]
    fn copies_that_continue_each_other_are_made_as_one() {
        let data: Vec<u8> = (0..4 << 20).map(|i| (i % 253) as u8).collect();
        let src = Arc::new(SourceFile::new(file_with(&data), CopyMode::Kernel));
        let chunk = |from: u64| mib_at(&src, from);
        let out = tempfile::tempfile().unwrap();
        let mut m = CopyMerger::default();
        m.put(&out, &chunk(0), 0).unwrap();
        m.put(&out, &chunk(1 << 20), 1 << 20).unwrap();
        // Both chunks are still one pending copy: nothing was written.
        assert_eq!(src.kernel_bytes() + src.fallback_bytes(), 0);
        // A chunk that does not continue it (another output place) makes the pending copy.
        m.put(&out, &chunk(2 << 20), 3 << 20).unwrap();
        assert_eq!(src.kernel_bytes() + src.fallback_bytes(), 2 << 20);
        m.flush(&out).unwrap();
        let mut got = vec![0u8; 4 << 20];
        out.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got[..2 << 20], &data[..2 << 20]);
        assert!(got[2 << 20..3 << 20].iter().all(|&b| b == 0));
        assert_eq!(&got[3 << 20..], &data[2 << 20..3 << 20]);
    }

    #[test]
    fn the_page_cache_is_asked_whether_a_range_is_in_it_before_advising_a_read() {
        let data = vec![3u8; 1 << 20];
        let f = file_with(&data);
        let Some(now) = cached(&f, 0, 1 << 20) else {
            // Only where the kernel refuses the call (before Linux 6.5, or a seccomp filter).
            let e = io::Error::last_os_error().raw_os_error();
            assert!(matches!(e, Some(libc::ENOSYS | libc::EPERM)), "{e:?}");
            return;
        };
        // Just written: every page is in the cache, and so is any part of it.
        assert!(now);
        assert_eq!(cached(&f, 4097, 100_000), Some(true));
        // Past the end nothing is.
        assert_eq!(cached(&f, 1 << 20, 4096), Some(false));
        // Written out and dropped, the pages are gone: clean pages go on the advice, except on
        // tmpfs, whose pages are the file.
        f.sync_all().unwrap();
        // SAFETY: advice on an open descriptor; no memory is passed.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let tmpfs = on_file_system(&f, libc::TMPFS_MAGIC);
        assert_eq!(cached(&f, 0, 1 << 20), Some(tmpfs));
        // Read back, they are there again, and the advice is skipped.
        let mut back = vec![0u8; 1 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(cached(&f, 0, 1 << 20), Some(true));
        let src = SourceFile::new(f, CopyMode::Auto);
        assert!(src.will_need(0, 1 << 20));
        assert!(src.cachestat.load(Ordering::Relaxed));
        assert!(!src.will_need(1 << 20, 4096));
    }

    #[test]
    fn a_held_back_copy_is_handed_off_only_when_copies_are_paired() {
        // Before a writer waits for chunks: kernel copies keep the held-back copy to join the
        // next; paired ones (into ext4) hand it to the second thread, so the next is separate.
        let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        for mode in [CopyMode::Kernel, CopyMode::Auto] {
            let src = Arc::new(SourceFile::new(file_with(&data), mode));
            let chunk = |from: u64| mib_at(&src, from);
            let out = tempfile::tempfile().unwrap();
            let paired = mode == CopyMode::Auto && copies_pages(&out);
            let mut m = CopyMerger::default();
            m.put(&out, &chunk(0), 0).unwrap();
            m.hand_off(&out).unwrap();
            assert_eq!(m.pending.is_none(), paired, "{mode:?}");
            m.put(&out, &chunk(1 << 20), 1 << 20).unwrap();
            // Joined to the kept copy, or pending on its own after the one handed off.
            let want = if paired {
                (1 << 20, 1 << 20)
            } else {
                (0, 2 << 20)
            };
            assert_eq!(m.pending.as_ref().map(|p| (p.2, p.3)), Some(want));
            m.put(&out, &chunk(2 << 20), 2 << 20).unwrap();
            m.flush(&out).unwrap();
            assert!(m.sources.iter().all(|s| Arc::ptr_eq(s, &src)));
            let moved = src.kernel_bytes() + src.fallback_bytes() + src.paired_bytes();
            assert_eq!(moved, 3 << 20, "{mode:?}");
            assert_eq!(src.paired_bytes() > 0, paired, "{mode:?}");
            let mut got = vec![0u8; 3 << 20];
            out.read_exact_at(&mut got, 0).unwrap();
            assert!(got == data, "{mode:?}: the output differs");
        }
    }

    #[test]
    fn a_merger_dropped_without_a_flush_leaves_no_copy_under_way() {
        // A writer dropped on an error: nothing may write to its output afterwards.
        let data: Vec<u8> = (0..4 << 20).map(|i| (i % 239) as u8).collect();
        let src = Arc::new(SourceFile::new(file_with(&data), CopyMode::Auto));
        let out = tempfile::tempfile().unwrap();
        {
            let mut m = CopyMerger::default();
            let c = CopyFrom {
                src: src.clone(),
                runs: vec![Run {
                    at: Some(0),
                    len: 4 << 20,
                }],
            };
            m.put(&out, &c, 0).unwrap();
            m.submit(&out).unwrap();
        }
        let moved = src.kernel_bytes() + src.fallback_bytes() + src.paired_bytes();
        assert_eq!(moved, 4 << 20);
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut &out, &mut got).unwrap();
        assert!(got == data);
    }

    #[test]
    fn a_copy_past_the_source_end_fails_in_every_mode() {
        for mode in [CopyMode::Kernel, CopyMode::ReadWrite, CopyMode::Auto] {
            let src = SourceFile::new(file_with(&[1u8; 1000]), mode);
            let out = tempfile::tempfile().unwrap();
            let e = src.copy_to(&out, 500, 0, 1000).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{mode:?}");
        }
    }

    #[test]
    fn the_zero_probe_finds_late_data_and_reads_little_of_early_data() {
        let mut data = vec![0u8; 1 << 20];
        let src = Arc::new(SourceFile::new(file_with(&data), CopyMode::Kernel));
        let runs = vec![Run {
            at: Some(0),
            len: 1 << 20,
        }];
        let c = CopyFrom {
            src,
            runs: runs.clone(),
        };
        assert!(c.is_zero().unwrap());
        data[(1 << 20) - 1] = 1;
        let c = CopyFrom {
            src: Arc::new(SourceFile::new(file_with(&data), CopyMode::Kernel)),
            runs: runs.clone(),
        };
        assert!(!c.is_zero().unwrap());
        // Data just past the first, small read.
        let mut early = vec![0u8; 1 << 20];
        early[FIRST_PROBE as usize] = 1;
        let c = CopyFrom {
            src: Arc::new(SourceFile::new(file_with(&early), CopyMode::Kernel)),
            runs,
        };
        assert!(!c.is_zero().unwrap());
    }
}
