//! Opening inputs by kind: regular files and block devices are read at any offset; pipes,
//! FIFOs and stdin only as streams (file digests), and nothing else.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use glimpse_formats::io::{open_path, opened, Access, FileKind, Opened};
use glimpse_formats::Source;

/// True when `path` is `-`, which means stdin.
pub fn is_stdin(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Opens `path` (or stdin for `-`) for `access`, refusing kinds of files that cannot be read
/// that way with a one-line message that names the file and says what to do.
pub fn open_input(path: &Path, access: Access) -> anyhow::Result<Opened> {
    if is_stdin(path) {
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| anyhow::anyhow!("stdin: cannot open: {e}"))?;
        return opened(File::from(fd), access).map_err(|e| e.context("stdin").into());
    }
    Ok(open_path(path, access)?)
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
        if !src.pinned() {
            // Each read is its own request: nothing ties them to one version of the object.
            eprintln!(
                "glimpse: warning: {}: the server sends no ETag or Last-Modified, so a change \
                 of the object while it is read cannot be detected",
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
