//! Temporary files that leave nothing behind, even when the process is killed.
//!
//! An output is written into a temporary file beside its destination and named only once it
//! is complete. A named temporary file survives a SIGKILL (the OOM killer, a container's
//! stop timeout): a hidden file as large as everything written so far stays in the user's
//! directory. So the file is made with `O_TMPFILE` where the file system allows it (ext4, XFS,
//! btrfs, tmpfs): it has no name at all until [`Temp::persist_noclobber`] or
//! [`Temp::into_named`] links it into the directory, and the kernel frees it with the last
//! descriptor, however the process ends. Where `O_TMPFILE` is refused (NFS, FUSE, an old
//! kernel) or the finished file could not be linked (no `/proc`), it is an ordinary named
//! temporary file, as before, which the caller's signal handler removes ([`Temp::path`]).

use std::ffi::CString;
use std::fs::{File, Permissions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A temporary file in a directory: unnamed where the kernel allows, named otherwise.
#[derive(Debug)]
pub struct Temp {
    inner: Inner,
    prefix: String,
    suffix: String,
}

#[derive(Debug)]
enum Inner {
    /// An `O_TMPFILE` file and the directory it belongs to.
    Unnamed {
        file: File,
        dir: PathBuf,
    },
    Named(tempfile::NamedTempFile),
}

impl Temp {
    /// Creates a temporary file in `dir` with permission bits `mode` (less the umask). A name,
    /// when it needs one, is `prefix`, random characters and `suffix`.
    ///
    /// # Errors
    /// As creating a file in `dir`.
    pub fn create_in(dir: &Path, prefix: &str, suffix: &str, mode: u32) -> io::Result<Temp> {
        Self::create(dir, prefix, suffix, mode, true)
    }

    /// [`Temp::create_in`] that always makes a named file (the fallback, for tests).
    ///
    /// # Errors
    /// As creating a file in `dir`.
    pub fn create_named_in(dir: &Path, prefix: &str, suffix: &str, mode: u32) -> io::Result<Temp> {
        Self::create(dir, prefix, suffix, mode, false)
    }

    fn create(
        dir: &Path,
        prefix: &str,
        suffix: &str,
        mode: u32,
        unnamed: bool,
    ) -> io::Result<Temp> {
        let unnamed = if unnamed {
            open_unnamed(dir, mode)?
        } else {
            None
        };
        let inner = match unnamed {
            Some(file) => Inner::Unnamed {
                file,
                dir: dir.to_path_buf(),
            },
            None => Inner::Named(
                tempfile::Builder::new()
                    .prefix(prefix)
                    .suffix(suffix)
                    .permissions(Permissions::from_mode(mode))
                    .tempfile_in(dir)?,
            ),
        };
        Ok(Temp {
            inner,
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        })
    }

    /// The open file.
    pub fn as_file(&self) -> &File {
        match &self.inner {
            Inner::Unnamed { file, .. } => file,
            Inner::Named(t) => t.as_file(),
        }
    }

    /// The open file, to write through.
    pub fn as_file_mut(&mut self) -> &mut File {
        match &mut self.inner {
            Inner::Unnamed { file, .. } => file,
            Inner::Named(t) => t.as_file_mut(),
        }
    }

    /// The file's name while it has one: `None` for an unnamed file, which nothing needs to
    /// remove.
    pub fn path(&self) -> Option<&Path> {
        match &self.inner {
            Inner::Unnamed { .. } => None,
            Inner::Named(t) => Some(t.path()),
        }
    }

    /// Names the file `dest`, which must not exist: nothing is ever replaced. Afterwards the
    /// file is the caller's, no longer temporary.
    ///
    /// # Errors
    /// `AlreadyExists` when `dest` exists, or as `link(2)`/`rename(2)`; the temporary file
    /// comes back with the error.
    pub fn persist_noclobber(self, dest: &Path) -> Result<File, (io::Error, Temp)> {
        let Temp {
            inner,
            prefix,
            suffix,
        } = self;
        let back = |inner| Temp {
            inner,
            prefix: prefix.clone(),
            suffix: suffix.clone(),
        };
        match inner {
            Inner::Unnamed { file, dir } => match link(&file, dest) {
                Ok(()) => Ok(file),
                Err(e) => Err((e, back(Inner::Unnamed { file, dir }))),
            },
            Inner::Named(t) => t
                .persist_noclobber(dest)
                .map_err(|e| (e.error, back(Inner::Named(e.file)))),
        }
    }

    /// The file under a random name in its directory (`prefix`, random characters, `suffix`),
    /// for a caller that renames it itself; a named file keeps its name.
    ///
    /// # Errors
    /// As `link(2)`.
    pub fn into_named(self) -> io::Result<tempfile::NamedTempFile> {
        match self.inner {
            Inner::Named(t) => Ok(t),
            Inner::Unnamed { file, dir } => tempfile::Builder::new()
                .prefix(&self.prefix)
                .suffix(&self.suffix)
                .make_in(&dir, |p| {
                    link(&file, p)?;
                    file.try_clone()
                }),
        }
    }
}

/// `O_TMPFILE` in `dir`, when the file system takes it and the file can be linked later
/// (through `/proc/self/fd`); `None` otherwise. An error that a named file would meet as well
/// (no such directory, no permission, a read-only or full file system) is returned as it is,
/// so that it is reported without a temporary name in it.
fn open_unnamed(dir: &Path, mode: u32) -> io::Result<Option<File>> {
    let Ok(c) = c_path(dir) else {
        return Ok(None);
    };
    // SAFETY: a valid C string; the flags and mode are plain integers.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            libc::c_uint::from(mode & 0o7777),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(
                libc::ENOENT
                | libc::ENOTDIR
                | libc::EACCES
                | libc::EPERM
                | libc::EROFS
                | libc::ENOSPC
                | libc::EDQUOT,
            ) => Err(e),
            _ => Ok(None),
        };
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    Ok(std::fs::metadata(proc_fd(&file)).is_ok().then_some(file))
}

fn proc_fd(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Gives `file` (an `O_TMPFILE` file) the name `to`, which must not exist.
fn link(file: &File, to: &Path) -> io::Result<()> {
    let from = c_path(&proc_fd(file))?;
    let to = c_path(to)?;
    // SAFETY: valid C strings relative to the working directory.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::AlreadyExists {
        return Err(e);
    }
    // The descriptor itself (a privileged process may, without /proc).
    // SAFETY: an open descriptor, an empty C string and a valid C string.
    let r = unsafe {
        libc::linkat(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(e)
    }
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Whether `dir`'s file system takes `O_TMPFILE`, asked directly.
    fn takes_o_tmpfile(dir: &Path) -> bool {
        let c = c_path(dir).unwrap();
        // SAFETY: as in open_unnamed.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
        // SAFETY: closing the descriptor just opened.
        (fd >= 0) && unsafe { libc::close(fd) } == 0
    }

    /// The process's umask, as /proc reports it (setting it would race other tests).
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
    }

    #[test]
    fn an_unnamed_file_has_no_name_until_it_is_persisted() {
        let d = tempfile::tempdir().unwrap();
        assert!(
            takes_o_tmpfile(d.path()),
            "the test directory is on ext4 or tmpfs"
        );
        let mut t = Temp::create_in(d.path(), ".x.", ".tmp", 0o640).unwrap();
        assert!(t.path().is_none());
        t.as_file_mut().write_all(b"data").unwrap();
        assert!(names(d.path()).is_empty(), "nothing to see while writing");
        let dest = d.path().join("out");
        let mut f = t.persist_noclobber(&dest).unwrap();
        assert_eq!(names(d.path()), ["out"]);
        assert_eq!(std::fs::read(&dest).unwrap(), b"data");
        // The returned descriptor is the file now named.
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "data");
    }

    #[test]
    fn a_dropped_unnamed_file_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Temp::create_in(d.path(), ".x.", ".tmp", 0o600).unwrap();
        t.as_file_mut().write_all(&[7u8; 4096]).unwrap();
        drop(t);
        assert!(names(d.path()).is_empty());
    }

    #[test]
    fn persisting_never_replaces_a_file_both_ways() {
        for unnamed in [true, false] {
            let d = tempfile::tempdir().unwrap();
            let dest = d.path().join("out");
            std::fs::write(&dest, b"keep").unwrap();
            let mut t = Temp::create(d.path(), ".x.", ".tmp", 0o600, unnamed).unwrap();
            assert_eq!(t.path().is_none(), unnamed);
            t.as_file_mut().write_all(b"new").unwrap();
            let (e, t) = t.persist_noclobber(&dest).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{unnamed}");
            assert_eq!(std::fs::read(&dest).unwrap(), b"keep");
            // The file came back and can still be named elsewhere.
            let other = d.path().join("other");
            t.persist_noclobber(&other).unwrap();
            assert_eq!(std::fs::read(&other).unwrap(), b"new");
            assert_eq!(names(d.path()), ["other", "out"]);
        }
    }

    #[test]
    fn into_named_gives_a_name_with_prefix_and_suffix_and_the_mode() {
        let d = tempfile::tempdir().unwrap();
        let t = Temp::create_in(d.path(), ".out.", ".glimpse-tmp", 0o640).unwrap();
        let named = t.into_named().unwrap();
        let name = named
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with(".out.") && name.ends_with(".glimpse-tmp"),
            "{name}"
        );
        let mode = std::fs::metadata(named.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640 & !umask());
        let path = named.path().to_path_buf();
        drop(named);
        assert!(
            !path.exists(),
            "a named temporary file is still removed on drop"
        );
    }
}
