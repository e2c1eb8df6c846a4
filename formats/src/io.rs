//! Positional reads: the [`ReadAt`] trait and its implementations.
//!
//! Every parser reads through `ReadAt`, never through a cursor, so that parallel workers can
//! share one source (`&self`, `Sync`).

use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::limits::Budget;

/// A source of bytes that can be read at any offset from many threads at once.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`. Returns 0 at or past the end.
    ///
    /// # Errors
    /// Any I/O error of the underlying source.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// The source's length in bytes.
    ///
    /// # Errors
    /// Any I/O error of the underlying source.
    fn size(&self) -> io::Result<u64>;

    /// Host bytes actually allocated (for `actual-size`), when the source knows.
    fn allocated_size(&self) -> Option<u64> {
        None
    }

    /// The first offset at or after `offset` that may hold data (like `SEEK_DATA`), or `None`
    /// when only a hole follows. Sources that do not know about holes say `Some(offset)`.
    ///
    /// # Errors
    /// Any I/O error of the underlying source.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }

    /// The first offset at or after `offset` that starts a hole (like `SEEK_HOLE`); the size
    /// when there is none.
    ///
    /// # Errors
    /// Any I/O error of the underlying source.
    fn next_hole(&self, _offset: u64) -> io::Result<u64> {
        self.size()
    }

    /// The file that holds this source's bytes verbatim, and the file offset of the source's
    /// byte 0, when there is one: a file, or a window onto one. A converter then copies data
    /// file to file in the kernel (`copy_file_range`) instead of through a buffer. Sources
    /// that transform bytes (decryption, a network) say `None`, the default.
    fn backing_file(&self) -> Option<(&File, u64)> {
        None
    }

    /// Fills `buf` from `offset`, failing with `UnexpectedEof` if the source ends first.
    /// Short reads are retried, so implementations may return fewer bytes than asked.
    ///
    /// # Errors
    /// `UnexpectedEof` when the source is too short, or any I/O error.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "source ended early",
                    ))
                }
                Ok(n) => {
                    buf = buf.get_mut(n..).unwrap_or_default();
                    offset = offset.saturating_add(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A shared, thread-safe source.
pub type Source = Arc<dyn ReadAt>;

/// True when every byte is zero. Compares 16-byte words for speed (a byte loop is several
/// times slower, which shows on gigabytes).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let rem = words.remainder();
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0)
        && rem.iter().all(|&b| b == 0)
}

/// A file is read positionally. Its size comes from the device for a block device (`stat`
/// says 0 there), and holes are asked for only in regular files: everything else is data.
impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        std::os::unix::fs::FileExt::read_at(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        let m = self.metadata()?;
        match FileKind::of(&m.file_type()) {
            FileKind::BlockDevice => device_size(self),
            _ => Ok(m.len()),
        }
    }
    fn allocated_size(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let m = self.metadata().ok()?;
        m.is_file().then(|| m.blocks().saturating_mul(512))
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        if !self.metadata()?.is_file() {
            return Ok((offset < self.size()?).then_some(offset));
        }
        seek_hole_data(self, offset, libc::SEEK_DATA).map(|r| r.ok())
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        if !self.metadata()?.is_file() {
            return self.size();
        }
        match seek_hole_data(self, offset, libc::SEEK_HOLE)? {
            Ok(o) => Ok(o),
            Err(()) => self.size(),
        }
    }
    fn backing_file(&self) -> Option<(&File, u64)> {
        Some((self, 0))
    }
}

/// The size of a block device: where `SEEK_END` lands (`stat` says 0 for a device). The
/// file position is put back, although nothing in glimpse reads a source through it.
fn device_size(file: &File) -> io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a valid, open descriptor has no memory-safety preconditions.
    let cur = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
    if cur < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
    let err = io::Error::last_os_error();
    // SAFETY: as above; `cur` is a position the kernel just returned.
    unsafe { libc::lseek(fd, cur, libc::SEEK_SET) };
    u64::try_from(end).map_err(|_| err)
}

/// What kind of file a path names. Only regular files and block devices can be read at any
/// offset; pipes can be read once, front to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A block device (a disk, an LVM or Cinder volume, a loop device).
    BlockDevice,
    /// A pipe or FIFO (also a process substitution, or stdin from a pipe).
    Fifo,
    /// A character device (`/dev/zero`, a terminal).
    CharDevice,
    /// A directory.
    Directory,
    /// A socket.
    Socket,
    /// Anything else.
    Other,
}

impl FileKind {
    /// The kind of a file type (from `stat`, following symbolic links).
    pub fn of(ft: &std::fs::FileType) -> Self {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_file() {
            FileKind::Regular
        } else if ft.is_block_device() {
            FileKind::BlockDevice
        } else if ft.is_fifo() {
            FileKind::Fifo
        } else if ft.is_char_device() {
            FileKind::CharDevice
        } else if ft.is_dir() {
            FileKind::Directory
        } else if ft.is_socket() {
            FileKind::Socket
        } else {
            FileKind::Other
        }
    }

    /// "a regular file", "a pipe", ... for messages.
    pub fn describe(self) -> &'static str {
        match self {
            FileKind::Regular => "a regular file",
            FileKind::BlockDevice => "a block device",
            FileKind::Fifo => "a pipe",
            FileKind::CharDevice => "a character device",
            FileKind::Directory => "a directory",
            FileKind::Socket => "a socket",
            FileKind::Other => "not a regular file",
        }
    }

    /// True when the file can be read at any offset and has a size.
    pub fn is_random_access(self) -> bool {
        matches!(self, FileKind::Regular | FileKind::BlockDevice)
    }

    /// True when the file can be read front to back to its end.
    pub fn is_streamable(self) -> bool {
        matches!(
            self,
            FileKind::Regular | FileKind::BlockDevice | FileKind::Fifo | FileKind::Socket
        )
    }
}

/// How a caller will read a file it opens with [`open_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// At any offset, with a known size: every command that parses an image.
    Random,
    /// Once, front to back, to the end: file digests.
    Stream,
}

/// A file opened by [`open_path`] and what kind it is.
#[derive(Debug)]
pub struct Opened {
    /// The open file.
    pub file: File,
    /// Its kind, from `fstat` of the open descriptor.
    pub kind: FileKind,
}

/// Opens `path` read-only for `access`, after checking what kind of file it is, so that no
/// open or read ever blocks on a FIFO nobody writes to, and a device without a size is never
/// read as an empty disk.
///
/// - `Random`: regular files and block devices. A pipe or character device (`/dev/zero`) is
///   refused before it is opened (`source.not-seekable`), a directory too (`source.directory`).
///   The open itself is non-blocking, and the descriptor is checked again with `fstat`, so a
///   file swapped for a FIFO after the check is refused as well.
/// - `Stream`: also pipes and FIFOs; a FIFO is opened the way `cat` opens it (waiting for a
///   writer), because a non-blocking read before the writer arrives would look like an empty
///   stream.
///
/// # Errors
/// `Io` when the path cannot be opened; `Unsupported` (`source.not-seekable`) or `Invalid`
/// (`source.directory`) for a file of the wrong kind. Messages name the path.
pub fn open_path(path: &std::path::Path, access: Access) -> Result<Opened> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| open_error(&shown, &e))?;
    check_kind(FileKind::of(&meta.file_type()), access).map_err(|e| e.context(&shown))?;
    if FileKind::of(&meta.file_type()) == FileKind::Socket {
        // A socket can be read as stdin, but a socket in the file system cannot be opened
        // (ENXIO): say what it is rather than report an I/O error.
        return Err(Error::unsupported(
            "is a socket: it cannot be opened as a file; connect to it with a client and pipe \
             the data to `-`",
        )
        .code("source.not-seekable")
        .context(&shown));
    }
    let nonblock = access == Access::Random || FileKind::of(&meta.file_type()) != FileKind::Fifo;
    let flags = libc::O_NOCTTY | if nonblock { libc::O_NONBLOCK } else { 0 };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| open_error(&shown, &e))?;
    let opened = opened(file, access).map_err(|e| e.context(&shown))?;
    if nonblock {
        clear_nonblock(&opened.file).map_err(|e| open_error(&shown, &e))?;
    }
    Ok(opened)
}

/// An `Io` error for a file that cannot be opened, in one line: the OS error is part of the
/// message rather than a source, so that a chain printer does not repeat it.
fn open_error(shown: &dyn std::fmt::Display, e: &io::Error) -> Error {
    Error::new(
        crate::error::ErrorKind::Io,
        format!("{shown}: cannot open: {}", os_message(e)),
    )
}

/// `No such file or directory`, without Rust's ` (os error 2)` suffix.
fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s.get(..i).unwrap_or(&s).to_string(),
        None => s,
    }
}

/// Checks the kind of an already open file (stdin, say) for `access`.
///
/// # Errors
/// As [`open_path`], without the path in the message.
pub fn opened(file: File, access: Access) -> Result<Opened> {
    let kind = FileKind::of(&file.metadata()?.file_type());
    check_kind(kind, access)?;
    Ok(Opened { file, kind })
}

/// Refuses a kind of file that cannot be read with `access`, saying why and what to do.
fn check_kind(kind: FileKind, access: Access) -> Result<()> {
    let ok = match access {
        Access::Random => kind.is_random_access(),
        Access::Stream => kind.is_streamable(),
    };
    if ok {
        return Ok(());
    }
    if kind == FileKind::Directory {
        return Err(Error::invalid("is a directory, not a disk image").code("source.directory"));
    }
    let why = match (kind, access) {
        (FileKind::CharDevice, _) => "is a character device: it has no size and no fixed \
             content, so it is not read as a disk image; save the data to a file first"
            .to_string(),
        (_, Access::Random) => format!(
            "is {}: reading a disk image needs random access; save it to a file first \
             (only `checksum` without --content reads a stream)",
            kind.describe()
        ),
        (_, Access::Stream) => format!("is {}: it cannot be read", kind.describe()),
    };
    Err(Error::unsupported(why).code("source.not-seekable"))
}

/// Puts a descriptor opened with `O_NONBLOCK` back into blocking mode, so that reads of a
/// block device behave as usual.
fn clear_nonblock(file: &File) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl F_GETFL/F_SETFL on a valid, open descriptor only reads and sets its
    // status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `lseek` with `SEEK_DATA`/`SEEK_HOLE`. `Ok(Err(()))` means ENXIO (no more data/holes).
/// Filesystems without support behave as if the whole file were data.
fn seek_hole_data(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Result<u64, ()>> {
    use std::os::unix::io::AsRawFd;
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Ok(Err(()));
    };
    // SAFETY: lseek on a valid, open descriptor has no memory-safety preconditions. The file
    // position it moves is never used: every read in this crate is positional (pread).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(Err(())),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                if whence == libc::SEEK_DATA {
                    Ok(Ok(offset))
                } else {
                    Ok(Err(()))
                }
            }
            _ => Err(err),
        };
    }
    Ok(Ok(u64::try_from(r).unwrap_or(0)))
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(avail) = self.get(start..) else {
            return Ok(0);
        };
        let n = avail.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        Ok(n)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn allocated_size(&self) -> Option<u64> {
        (**self).allocated_size()
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        (**self).next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        (**self).next_hole(offset)
    }
    fn backing_file(&self) -> Option<(&File, u64)> {
        (**self).backing_file()
    }
}

/// A window onto `len` bytes of another source starting at `start` (an OVA member, say).
pub struct Window<R: ?Sized> {
    start: u64,
    len: u64,
    inner: Arc<R>,
}

impl<R: ReadAt + ?Sized> Window<R> {
    /// A window of `len` bytes at `start` of `inner`.
    ///
    /// # Errors
    /// `Truncated` if the window extends past the end of `inner`.
    pub fn new(inner: Arc<R>, start: u64, len: u64) -> Result<Self> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| Error::invalid("window overflows"))?;
        if end > inner.size()? {
            return Err(Error::truncated("window extends past the end of the source").at(start));
        }
        Ok(Window { start, len, inner })
    }
}

impl<R: ReadAt + ?Sized> ReadAt for Window<R> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let avail = usize::try_from(self.len.saturating_sub(offset)).unwrap_or(usize::MAX);
        let n = avail.min(buf.len());
        let Some(abs) = self.start.checked_add(offset) else {
            return Ok(0);
        };
        self.inner
            .read_at(buf.get_mut(..n).unwrap_or_default(), abs)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn allocated_size(&self) -> Option<u64> {
        Some(self.len)
    }
    fn backing_file(&self) -> Option<(&File, u64)> {
        let (f, base) = self.inner.backing_file()?;
        Some((f, base.checked_add(self.start)?))
    }
}

/// The extent of a linearly mapped source (raw, ISO, a fixed disk) at `guest`, ending no
/// later than `end`: data up to the next hole, or zero up to the next data. Holes read as
/// zeros without being read (SEEK_DATA/SEEK_HOLE); they are reported as zero, not
/// unallocated, as qemu-img map does for raw files.
///
/// # Errors
/// `Io` from the hole queries.
pub fn linear_extent(src: &dyn ReadAt, guest: u64, end: u64) -> Result<crate::image::Extent> {
    use crate::image::ExtentKind;
    let end = end.max(guest.saturating_add(1));
    let (len, kind) = match src.next_data(guest)? {
        None => (end.saturating_sub(guest), ExtentKind::Zero),
        Some(d) if d > guest => (d.min(end).saturating_sub(guest), ExtentKind::Zero),
        Some(_) => {
            let hole = src.next_hole(guest)?.clamp(guest.saturating_add(1), end);
            (hole.saturating_sub(guest), ExtentKind::Data { host: guest })
        }
    };
    Ok(crate::image::Extent {
        start: guest,
        len,
        kind,
    })
}

/// Remembers the last few runs [`linear_extent`] found, so that reads inside a run already
/// looked up cost no `SEEK_DATA`/`SEEK_HOLE` system calls (they are slow on some
/// filesystems, and the pipeline asks once per chunk).
#[derive(Default)]
pub struct LinearMap {
    recent: std::sync::Mutex<Vec<crate::image::Extent>>,
}

impl LinearMap {
    /// Runs remembered.
    const KEEP: usize = 8;

    /// As [`linear_extent`] for `guest..end`, where the source's mapped part ends at `limit`.
    ///
    /// # Errors
    /// `Io` from the hole queries.
    pub fn extent(
        &self,
        src: &dyn ReadAt,
        guest: u64,
        end: u64,
        limit: u64,
    ) -> Result<crate::image::Extent> {
        use crate::image::ExtentKind;
        let clip = |e: &crate::image::Extent| {
            let len = e.end().min(end).saturating_sub(guest).max(1);
            let kind = match e.kind {
                ExtentKind::Data { host } => ExtentKind::Data {
                    host: host.saturating_add(guest.saturating_sub(e.start)),
                },
                k => k,
            };
            crate::image::Extent {
                start: guest,
                len,
                kind,
            }
        };
        if let Ok(recent) = self.recent.lock() {
            if let Some(e) = recent.iter().find(|e| e.start <= guest && guest < e.end()) {
                return Ok(clip(e));
            }
        }
        let full = linear_extent(src, guest, limit.max(end))?;
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() >= Self::KEEP {
                recent.remove(0);
            }
            recent.push(full);
        }
        Ok(clip(&full))
    }
}

/// Reads exactly `len` bytes at `offset` into a new buffer, after checking the range against
/// the source size and charging `budget`. The caller gives the `len` bytes back when it drops
/// the buffer; on an error nothing stays charged.
///
/// # Errors
/// `Truncated` when the range passes the end of the source; `LimitExceeded` when the budget is
/// spent; `Io` on read errors.
pub fn read_vec(
    src: &dyn ReadAt,
    offset: u64,
    len: u64,
    budget: &Budget,
    what: &str,
) -> Result<Vec<u8>> {
    let size = src.size()?;
    let end = offset
        .checked_add(len)
        .ok_or_else(|| Error::invalid(format!("{what}: offset + length overflows")).at(offset))?;
    if end > size {
        return Err(Error::truncated(format!(
            "{what}: {len} bytes at {offset:#x} pass the end of the file ({size} bytes)"
        ))
        .at(offset)
        .code("table.out-of-bounds"));
    }
    let n = usize::try_from(len).map_err(|_| Error::limit(format!("{what}: too large")))?;
    budget.take(len, what)?;
    let mut v = Vec::new();
    let read = v
        .try_reserve_exact(n)
        .map_err(|_| Error::limit(format!("{what}: cannot allocate {n} bytes")))
        .and_then(|()| {
            v.resize(n, 0);
            src.read_exact_at(&mut v, offset)
                .map_err(|e| Error::from(e).context(what).at(offset))
        });
    match read {
        Ok(()) => Ok(v),
        Err(e) => {
            // Nothing is held: the charge comes back, so that a shared budget does not leak.
            budget.give_back(len);
            Err(e)
        }
    }
}

/// Reads the whole source front to back through one 1 MiB buffer, handing each chunk and its
/// offset to `f`.
///
/// # Errors
/// `Io` / `Truncated` (with the chunk's offset) when the source cannot be read in full;
/// whatever `f` returns.
pub fn for_each_chunk(src: &dyn ReadAt, mut f: impl FnMut(&[u8], u64) -> Result<()>) -> Result<()> {
    let size = src.size()?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        let n = usize::try_from(size.saturating_sub(pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let chunk = buf.get_mut(..n).unwrap_or_default();
        src.read_exact_at(chunk, pos)
            .map_err(|e| Error::from(e).at(pos))?;
        f(chunk, pos)?;
        pos = pos.saturating_add(n as u64);
    }
    Ok(())
}

/// Reads up to `len` bytes at `offset` (fewer if the source ends first). For probing heads and
/// tails where a short file is not an error.
///
/// # Errors
/// `Io` on read errors.
pub fn read_up_to(src: &dyn ReadAt, offset: u64, len: usize) -> Result<Vec<u8>> {
    let size = src.size()?;
    let avail = size.saturating_sub(offset);
    let n = usize::try_from(avail).unwrap_or(usize::MAX).min(len);
    let mut v = vec![0u8; n];
    src.read_exact_at(&mut v, offset)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns at most 3 bytes per call, to prove callers never assume a full read.
    struct Short(Vec<u8>);
    impl ReadAt for Short {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let n = buf.len().min(3);
            self.0.read_at(&mut buf[..n], offset)
        }
        fn size(&self) -> io::Result<u64> {
            Ok(self.0.len() as u64)
        }
    }

    #[test]
    fn read_exact_at_survives_short_reads() {
        let s = Short((0u8..100).collect());
        let mut buf = [0u8; 10];
        s.read_exact_at(&mut buf, 50).unwrap();
        assert_eq!(buf, [50, 51, 52, 53, 54, 55, 56, 57, 58, 59]);
        assert!(s.read_exact_at(&mut buf, 95).is_err());
    }

    #[test]
    fn window_bounds() {
        let inner: Arc<Vec<u8>> = Arc::new((0u8..100).collect());
        let w = Window::new(inner.clone(), 10, 20).unwrap();
        let mut buf = [0u8; 5];
        w.read_exact_at(&mut buf, 18).err().unwrap();
        w.read_exact_at(&mut buf, 15).unwrap();
        assert_eq!(buf, [25, 26, 27, 28, 29]);
        assert!(Window::new(inner, 90, 20).is_err());
    }

    #[test]
    fn open_path_refuses_what_cannot_be_read_at_random_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_path(&fifo, Access::Random).unwrap_err();
        assert_eq!(e.finding_code(), "source.not-seekable");
        assert!(e.message().contains("save it to a file first"), "{e}");
        let e = open_path(std::path::Path::new("/dev/zero"), Access::Random).unwrap_err();
        assert_eq!(e.finding_code(), "source.not-seekable");
        let e = open_path(std::path::Path::new("/dev/zero"), Access::Stream).unwrap_err();
        assert_eq!(e.finding_code(), "source.not-seekable");
        let e = open_path(dir.path(), Access::Random).unwrap_err();
        assert_eq!(e.finding_code(), "source.directory");
        let e = open_path(&dir.path().join("missing"), Access::Random).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::Io);
        assert_eq!(e.to_string().matches("missing").count(), 1, "{e}");
        assert!(!e.to_string().contains("os error"), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"abc").unwrap();
        let o = open_path(&file, Access::Random).unwrap();
        assert_eq!(o.kind, FileKind::Regular);
        assert_eq!(ReadAt::size(&o.file).unwrap(), 3);
        assert_eq!(o.file.next_data(0).unwrap(), Some(0));
    }

    #[test]
    fn read_vec_checks_range_and_budget() {
        let data: Vec<u8> = vec![7; 64];
        let b = Budget::new(32);
        assert_eq!(read_vec(&data, 0, 16, &b, "t").unwrap(), vec![7; 16]);
        assert_eq!(
            read_vec(&data, 60, 16, &b, "t").unwrap_err().kind(),
            crate::error::ErrorKind::Truncated
        );
        assert_eq!(
            read_vec(&data, 0, 32, &b, "t").unwrap_err().kind(),
            crate::error::ErrorKind::LimitExceeded
        );
    }
}
