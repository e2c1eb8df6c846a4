//! Opening inputs by kind: regular files and block devices are read at any offset; pipes,
//! FIFOs and stdin only as streams (file digests), and nothing else.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use glimpse_formats::io::{open_path, opened, Access, FileKind, Opened};
use glimpse_formats::Source;

/// True when `path` is `-`, which means stdin.
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Opens `path` (or stdin for `-`) for `access`, refusing kinds of files that cannot be read
/// that way with a one-line message that names the file and says what to do. A regular file
/// is watched for writes until [`unchanged`] is asked about `path`.
pub fn open_input(path: &Path, access: Access) -> anyhow::Result<Opened> {
    let opened = if is_stdin(path) {
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| anyhow::anyhow!("stdin: cannot open: {e}"))?;
        opened(File::from(fd), access).map_err(|e| e.context("stdin"))?
    } else {
        open_path(path, access)?
    };
    if opened.kind == FileKind::Regular {
        let file = opened.file.try_clone().context("cannot open")?;
        let stamp = Stamp::of(&file)?;
        WATCHED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((path.to_path_buf(), file, stamp));
    }
    Ok(opened)
}

/// What a local file's metadata says about its content: a write to it, even in place (which
/// an open descriptor would not notice), changes its modification and change times, and an
/// append or a truncation its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of the open file `f`.
    pub fn of(f: &File) -> anyhow::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata().context("cannot read")?;
        Ok(Stamp {
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The regular files opened and not yet asked about, by the path they were opened as, each
/// with its stamp when opened.
type Watched = (std::path::PathBuf, File, Stamp);
static WATCHED: std::sync::Mutex<Vec<Watched>> = std::sync::Mutex::new(Vec::new());

/// Fails (`source.changed`) when the regular file opened as `path` was written to since it
/// was opened, and stops watching it. A command asks after its last read of a file and
/// before it reports on it or renames its output into place: a digest, a conversion or a
/// verdict of a file rewritten while it was read would describe neither version. (A URL is
/// pinned by its validators instead, docs/remote.md.)
pub fn unchanged(path: &Path) -> glimpse_formats::Result<()> {
    let watched: Vec<Watched> = {
        let mut all = WATCHED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mine, rest) = std::mem::take(&mut *all)
            .into_iter()
            .partition(|(p, _, _)| p == path);
        *all = rest;
        mine
    };
    for (_, file, before) in &watched {
        let now = Stamp::of(file).map_err(|e| {
            glimpse_formats::Error::new(glimpse_formats::ErrorKind::Io, format!("{e:#}"))
        })?;
        if now != *before {
            return Err(glimpse_formats::Error::new(
                glimpse_formats::ErrorKind::Io,
                "the file was written to while it was read (its size or modification time \
                 changed): what was read is neither the old nor the new content, so no result \
                 is given",
            )
            .code("source.changed"));
        }
    }
    Ok(())
}

/// `result` of a command's work on `path`, failed with `source.changed` when the file was
/// written to meanwhile; either way the file is no longer watched, so a command given
/// thousands of files holds no descriptor past each one's turn.
pub fn settled<T>(path: &Path, result: anyhow::Result<T>) -> anyhow::Result<T> {
    let unchanged = unchanged(path);
    let value = result?;
    unchanged?;
    Ok(value)
}

/// The input as text when it names a remote object (`http(s)://`, `glance://`).
pub fn remote_input(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| crate::remote::is_remote(s))
}

/// Opens `path` as a positional source for commands that parse an image: a regular file or a
/// block device (whose size comes from the device), or a URL whose server answers range
/// requests.
pub fn open_random(path: &Path) -> anyhow::Result<Source> {
    if let Some(url) = remote_input(path) {
        let src = open_remote(url)?;
        if let Some(why) = src.unpinned_reason() {
            // Each read is its own request: only a strong ETag ties them to one version.
            errln!(
                "glimpse: warning: {}: {why}, so a change of the object while it is read \
                 cannot be detected",
                src.shown()
            );
        }
        return Ok(Arc::new(src));
    }
    let Opened { file, .. } = open_input(path, Access::Random)?;
    Ok(Arc::new(file))
}

/// Opens a URL for reading at any offset: its server must answer range requests.
pub fn open_remote(url: &str) -> anyhow::Result<crate::remote::HttpSource> {
    let src = crate::remote::open(url)?;
    if !src.ranges_supported() {
        anyhow::bail!("{}", crate::remote::NO_RANGES);
    }
    Ok(src)
}

/// Opens `path` for a front-to-back read: also pipes, FIFOs and stdin.
pub fn open_stream(path: &Path) -> anyhow::Result<(File, FileKind)> {
    let Opened { file, kind } = open_input(path, Access::Stream)?;
    Ok((file, kind))
}

/// Restores the default action of SIGPIPE, so that a command that only prints (and holds no
/// temporary file, no remote state) ends quietly, as `cat` and `md5sum` do, when the reader of
/// its stdout goes away: the shell shows status 141. Rust ignores SIGPIPE by default, which
/// turns `println!` into a panic on a closed pipe. `convert` (which removes its temporary
/// file) and `upload` (which talks over sockets) handle EPIPE themselves instead.
pub fn die_on_sigpipe() {
    // SAFETY: resetting a signal's disposition to its default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
