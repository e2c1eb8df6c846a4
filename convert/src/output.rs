//! Output files that appear only when they are complete.
//!
//! A writer never opens its destination. It writes into a temporary file next to it (same
//! directory, so same filesystem), and [`OutputFile::commit`] renames that into place only
//! after the conversion succeeded. A failure, a cancellation or a panic drops the
//! [`OutputFile`], which removes the temporary file and nothing else: an existing destination
//! keeps every byte unless a new one replaced it whole. Where the file system allows, the
//! temporary file has no name at all until the commit (`O_TMPFILE`,
//! [`glimpse_formats::tmpfile`]), so that even a SIGKILL leaves nothing behind.
//!
//! A destination that is the source's storage ([`Storage`]: the same device and inode whatever
//! path names it, another node of the same device, a loop device over it or the file a loop
//! device reads) is refused before anything is created, and so is one that is a file the source refers to
//! (a backing file, an external data file or extent, a parent): replacing it would destroy
//! the data of the very chain being read ([`check_not_referenced`]).
//!
//! A replaced destination keeps its permission bits, and its owner and group when the process
//! may set them. Its other hard links, if any, keep the old content: the new file is a new
//! inode. Writing in place instead (as `qemu-img convert` does) would truncate the old data
//! before the new one exists, so a failure or a signal would lose both;
//! [`OutputFile::other_links`] lets the caller say so.

use std::fs::{File, Permissions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use glimpse_formats::tmpfile::Temp;
use glimpse_formats::Reference;

use crate::{Error, ErrorKind, Result, Target};

/// The longest part of the destination's name that goes into the temporary file's name, in
/// bytes: with the dot, the random part and the suffix the temporary name stays far below
/// NAME_MAX (255) whatever name the destination has.
const TEMP_NAME_MAX: usize = 100;

/// How an [`OutputFile`] is made durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputOptions {
    /// fsync the file before the rename and its directory after it. Without it durability is
    /// left to the kernel's writeback, as `qemu-img convert` does by default.
    pub fsync: bool,
}

/// A destination being written through a temporary file in its directory.
#[derive(Debug)]
pub struct OutputFile {
    temp: Temp,
    dest: PathBuf,
    opts: OutputOptions,
    other_links: u64,
}

impl OutputFile {
    /// Creates the temporary file for `dest`, after refusing a destination that is `source`
    /// (`output.same-as-source`) or that exists and is not a regular file
    /// (`output.not-regular`). A symbolic link as destination is followed: its target is what
    /// gets replaced; a link whose target does not exist is refused (`output.dangling-link`).
    /// A new file gets the usual mode (0666 less the umask); a replaced one keeps its
    /// permission bits, and its owner and group where the process may set them.
    ///
    /// # Errors
    /// `Invalid` for the refusals above; `Io` when the temporary file cannot be created.
    pub fn create(dest: &Path, source: Option<&Storage>, opts: OutputOptions) -> Result<Self> {
        if let Some(src) = source {
            let at = Storage::at(dest).map_err(|e| io_error(dest, "cannot inspect", e))?;
            check_not_source(src, &at)?;
        }
        let dest = resolve(dest)?;
        let existing = match std::fs::metadata(&dest) {
            Ok(m) if m.is_file() => Some(m),
            Ok(m) => return Err(not_regular(&dest, &m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error(&dest, "cannot inspect", e)),
        };
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = temp_stem(&dest);
        let mode = existing.as_ref().map_or(0o666, |m| m.mode() & 0o777);
        let temp = Temp::create_in(&dir, &format!(".{name}."), ".glimpse-tmp", mode)
            .map_err(|e| io_error(&dest, "cannot create a temporary file beside", e))?;
        if let Some(m) = &existing {
            // The owner first: a change of owner may clear the set-id bits the mode restores.
            keep_owner(temp.as_file(), m);
            // Then the extended attributes (a change of owner clears file capabilities), ACLs
            // among them, before the mode, which agrees with the ACL it came with.
            keep_xattrs(temp.as_file(), &dest);
            // The mode given at creation is reduced by the umask; a replaced file keeps its own.
            temp.as_file()
                .set_permissions(Permissions::from_mode(mode))
                .map_err(|e| io_error(&dest, "cannot set the mode of the output for", e))?;
        }
        let other_links = existing.as_ref().map_or(0, |m| m.nlink().saturating_sub(1));
        Ok(OutputFile {
            temp,
            dest,
            opts,
            other_links,
        })
    }

    /// How many other hard links the replaced destination has: they keep the old content,
    /// since the new file is a new inode (0 for a new destination).
    pub fn other_links(&self) -> u64 {
        self.other_links
    }

    /// A writer target on the temporary file.
    ///
    /// # Errors
    /// `Io` when the descriptor cannot be duplicated.
    pub fn target(&self) -> Result<Target> {
        let f = self
            .temp
            .as_file()
            .try_clone()
            .map_err(|e| io_error(&self.dest, "cannot open the output for", e))?;
        Ok(Target::File(f))
    }

    /// The temporary file itself, for callers that write without a [`crate::Writer`] (an
    /// extracted OVA member, say).
    pub fn as_file(&self) -> &File {
        self.temp.as_file()
    }

    /// The temporary file's path, for a signal handler that must remove it itself: `None`
    /// when it has no name (`O_TMPFILE`), so that nothing can be left behind.
    pub fn temp_path(&self) -> Option<&Path> {
        self.temp.path()
    }

    /// The path that [`OutputFile::commit`] will replace.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Renames the temporary file onto the destination (with fsync of the file before and of
    /// the directory after, when asked).
    ///
    /// # Errors
    /// `Io` when fsync or the rename fails; the temporary file is then removed.
    pub fn commit(self) -> Result<()> {
        let OutputFile {
            temp, dest, opts, ..
        } = self;
        if opts.fsync {
            temp.as_file()
                .sync_all()
                .map_err(|e| io_error(&dest, "cannot fsync the output for", e))?;
        }
        let temp = if std::fs::symlink_metadata(&dest).is_err() {
            // Nothing there: the file gets its final name directly, never replacing one that
            // appeared meanwhile (that is replaced as below).
            match temp.persist_noclobber(&dest) {
                Ok(_) => return sync_dir(&dest, opts),
                Err((e, t)) if e.kind() == io::ErrorKind::AlreadyExists => t,
                Err((e, _)) => return Err(io_error(&dest, "cannot rename the output onto", e)),
            }
        } else {
            temp
        };
        let temp = temp
            .into_named()
            .map_err(|e| io_error(&dest, "cannot name the output beside", e))?
            .into_temp_path();
        let replaces_a_file = std::fs::symlink_metadata(&dest).is_ok_and(|m| m.is_file());
        if replaces_a_file && exchange(&temp, &dest).is_ok() {
            if std::fs::symlink_metadata(&temp).is_ok_and(|m| m.is_dir()) {
                // A directory appeared there meanwhile: give it its name back, and fail as a
                // rename onto it fails.
                let _ = exchange(&temp, &dest);
                return Err(io_error(
                    &dest,
                    "cannot rename the output onto",
                    io::Error::from_raw_os_error(libc::EISDIR),
                ));
            }
            // `temp` now names the replaced file: dropping its last name here is cheap.
            let _ = temp.close();
        } else {
            // No file to replace (or a file system without the exchange): a plain rename.
            temp.persist(&dest)
                .map_err(|e| io_error(&dest, "cannot rename the output onto", e.error))?;
        }
        sync_dir(&dest, opts)
    }
}

/// fsyncs the directory of `dest` when asked, so that its new name is durable.
fn sync_dir(dest: &Path, opts: OutputOptions) -> Result<()> {
    if opts.fsync {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error(dir, "cannot fsync the directory", e))?;
    }
    Ok(())
}

/// Swaps the names `a` and `b` atomically (`renameat2` with `RENAME_EXCHANGE`): `b` is the new
/// output at once, and `a` the file it replaced. A plain rename onto an existing file costs far
/// more on ext4: replacing a file by rename makes it allocate and start writing back the new
/// file's delayed blocks in the rename itself (`auto_da_alloc`), about 200 ms for 664 MB, where
/// the exchange and the removal of the old file take about 30 ms. Without `--fsync` nothing
/// is promised about durability (as with qemu-img); with it, the file is synced before and its
/// directory after. Fails (the caller then renames) when `b` does not exist or the file system
/// cannot exchange.
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let (a, b) = (c_path(a)?, c_path(b)?);
    // SAFETY: two valid C strings, relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where a file's bytes are, as the same-storage checks compare it: the file itself (device
/// and inode), the device a device node stands for (its `st_rdev`: two nodes of one device
/// are two inodes but one disk), and for a loop device the file it reads (`LOOP_GET_STATUS64`:
/// the device and inode of its backing file). Made from a path ([`Storage::at`]) or from an
/// open descriptor ([`Storage::of_fd`]: stdin, stdout), never from `/dev/stdin` or
/// `/proc/self/fd`, which need /proc.
#[derive(Debug, Clone)]
pub struct Storage {
    shown: String,
    path: Option<PathBuf>,
    id: Option<Id>,
}

/// What [`Storage`] compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Id {
    dev: u64,
    ino: u64,
    kind: NodeKind,
    /// For a loop device: the device and inode of the file it reads.
    backing: Option<(u64, u64)>,
}

/// The kind of file, with the device number of a device node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    File,
    Block(u64),
    Char(u64),
    Other,
}

/// The major number of loop devices (their partitions have another, and are not loop devices).
const LOOP_MAJOR: u32 = 7;

impl Storage {
    /// The storage of `path` (symbolic links followed). A path that does not exist has no
    /// storage yet ([`Storage::exists`] is false): it cannot be any other file. A loop device
    /// is opened (read-only, which has no effect on it) to ask for its backing file; no other
    /// file is opened.
    ///
    /// # Errors
    /// The error of `stat` other than "not found" (a path that cannot be looked at cannot be
    /// told apart from the source).
    pub fn at(path: &Path) -> io::Result<Storage> {
        let id = match std::fs::metadata(path) {
            Ok(m) => {
                let mut id = Id::of(&m);
                if id.is_loop() {
                    id.backing = std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(path)
                        .ok()
                        .and_then(|f| loop_backing(f.as_fd()));
                }
                Some(id)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Storage {
            shown: path.display().to_string(),
            path: Some(path.to_path_buf()),
            id,
        })
    }

    /// The storage of the open descriptor `fd` (`fstat`, and for a loop device its backing
    /// file), shown as `shown`: what stdin or stdout is redirected to, found without /proc.
    ///
    /// # Errors
    /// When the descriptor cannot be duplicated or `fstat` fails.
    pub fn of_fd(fd: BorrowedFd<'_>, shown: &str) -> io::Result<Storage> {
        let file = File::from(fd.try_clone_to_owned()?);
        let mut id = Id::of(&file.metadata()?);
        if id.is_loop() {
            id.backing = loop_backing(file.as_fd());
        }
        Ok(Storage {
            shown: shown.to_string(),
            path: None,
            id: Some(id),
        })
    }

    /// True when the file exists (always, for a descriptor).
    pub fn exists(&self) -> bool {
        self.id.is_some()
    }

    /// True for a regular file or a block device: what a conversion could be reading.
    pub fn is_file_or_block_device(&self) -> bool {
        self.id
            .is_some_and(|i| matches!(i.kind, NodeKind::File | NodeKind::Block(_)))
    }

    /// The device number when this is a character device (to recognise `/dev/null`).
    pub fn char_device(&self) -> Option<u64> {
        match self.id?.kind {
            NodeKind::Char(rdev) => Some(rdev),
            _ => None,
        }
    }

    /// How the file is named in messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }
}

impl Id {
    fn of(m: &std::fs::Metadata) -> Id {
        let t = m.file_type();
        let kind = if t.is_file() {
            NodeKind::File
        } else if t.is_block_device() {
            NodeKind::Block(m.rdev())
        } else if t.is_char_device() {
            NodeKind::Char(m.rdev())
        } else {
            NodeKind::Other
        };
        Id {
            dev: m.dev(),
            ino: m.ino(),
            kind,
            backing: None,
        }
    }

    fn is_loop(&self) -> bool {
        matches!(self.kind, NodeKind::Block(rdev) if libc::major(rdev) == LOOP_MAJOR)
    }

    /// How `self` and `other` are one storage, when they are.
    fn alias_of(&self, other: &Id) -> Option<&'static str> {
        if (self.dev, self.ino) == (other.dev, other.ino) {
            return Some("the same file on disk");
        }
        match (self.kind, other.kind) {
            (NodeKind::Block(a), NodeKind::Block(b)) | (NodeKind::Char(a), NodeKind::Char(b))
                if a == b =>
            {
                return Some("the same device, through another device node");
            }
            _ => {}
        }
        if self.backing == Some((other.dev, other.ino))
            || other.backing == Some((self.dev, self.ino))
        {
            return Some("a loop device and the file it reads");
        }
        if self.backing.is_some() && self.backing == other.backing {
            return Some("two loop devices over one file");
        }
        None
    }
}

/// The kernel's `struct loop_info64` (linux/loop.h), which the libc crate does not define.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `LOOP_GET_STATUS64` (linux/loop.h).
const LOOP_GET_STATUS64: u32 = 0x4C05;

/// The device and inode of the file the loop device open as `fd` reads, when it is bound to
/// one (`LOOP_GET_STATUS64`; an unbound loop device answers ENXIO).
fn loop_backing(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
    let mut info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; 64],
        lo_crypt_name: [0; 64],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    };
    // SAFETY: `fd` is an open descriptor and `info` a writable struct of the layout the
    // request fills in.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            LOOP_GET_STATUS64 as _,
            std::ptr::addr_of_mut!(info),
        )
    };
    (r == 0).then_some((info.lo_device, info.lo_inode))
}

/// Refuses `dest` when it is the storage `source` is read from ([`Storage`]): the same file
/// under any spelling (`./x`, a symbolic link, a hard link, a bind mount), another device
/// node of the same device, a loop device over the source file, or the file a loop device
/// source reads. A destination that does not exist cannot be the source; a source that
/// cannot be identified (one that does not exist) is refused, since nothing can be said.
///
/// # Errors
/// `Invalid` with code `output.same-as-source`.
pub fn check_not_source(source: &Storage, dest: &Storage) -> Result<()> {
    let Some(s) = &source.id else {
        return Err(Error::invalid(format!(
            "{}: cannot tell whether the destination is the source {}, which cannot be \
             found; refusing to write it",
            dest.shown, source.shown
        ))
        .code("output.same-as-source"));
    };
    let Some(d) = &dest.id else {
        return Ok(());
    };
    if let Some(how) = s.alias_of(d) {
        return Err(Error::invalid(format!(
            "{}: the destination is the source {} ({how}); refusing to overwrite the input",
            dest.shown, source.shown
        ))
        .code("output.same-as-source"));
    }
    Ok(())
}

/// Refuses `dest` when it is a file that `source` refers to (`refs`: its backing file,
/// external data file, extents, parent locators, hrefs, as `info` reports them).
///
/// Each reference is resolved as qemu resolves it ([`glimpse_formats::refname::resolve`]): cut
/// at a NUL, protocol prefixes (`file:`, `blkdebug:`, `host_device:`, ...) stripped, every
/// path of a `json:` specification. A plain relative name is resolved against the source's
/// directory, as qemu does (both as the source was named and through its symbolic links);
/// a relative path inside a protocol name or `json:` against the working directory too. The
/// destination matches when it has the same canonical path as one of them, or, when both
/// exist, the same device and inode. A name that cannot be resolved with confidence (an
/// unknown protocol, a `json:` that does not parse) could be any file: every destination is
/// refused. Nothing is opened: only paths are resolved and files stat-ed. Network names
/// (`nbd:`, `http://`) name no local file; `source` None (a remote image) checks absolute and
/// working-directory references only.
///
/// # Errors
/// `Invalid` with code `output.source-reference`.
pub fn check_not_referenced(
    source: Option<&Path>,
    refs: &[Reference],
    dest: &Storage,
) -> Result<()> {
    use glimpse_formats::refname::Base;
    let mut image_bases: Vec<PathBuf> = Vec::new();
    if let Some(src) = source {
        let dir = match src.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        image_bases.push(dir);
        if let Some(p) = std::fs::canonicalize(src)
            .ok()
            .and_then(|c| c.parent().map(Path::to_path_buf))
        {
            image_bases.push(p);
        }
    }
    let mut either_bases = image_bases.clone();
    either_bases.push(PathBuf::from("."));
    let dest_canon = dest.path.as_deref().and_then(canonical);
    for r in refs {
        let resolved = r.resolved();
        if !resolved.certain {
            return Err(Error::invalid(format!(
                "{}: the source names {} qemu may resolve to any file ({:?}: an unknown \
                 protocol or a json: specification glimpse cannot read with confidence); \
                 refusing to write any destination for it, even with --force",
                dest.shown,
                ref_kind(r),
                r.target
            ))
            .code("output.source-reference"));
        }
        for local in &resolved.paths {
            let bases = match local.base {
                Base::Image => &image_bases,
                Base::Either => &either_bases,
            };
            for cand in ref_paths(&local.path, bases) {
                // The named file is only stat-ed, never opened (a loop device it names is not
                // asked for its backing file).
                let same_storage = dest.id.as_ref().is_some_and(|d| {
                    std::fs::metadata(&cand)
                        .ok()
                        .is_some_and(|m| Id::of(&m).alias_of(d).is_some())
                });
                if same_storage
                    || dest_canon
                        .as_ref()
                        .is_some_and(|d| canonical(&cand).as_ref() == Some(d))
                {
                    let via = if local.path == r.target {
                        String::new()
                    } else {
                        format!(", which qemu opens as {:?}", local.path)
                    };
                    return Err(Error::invalid(format!(
                        "{}: the destination is {} the source refers to ({:?}{via}); refusing \
                         to overwrite a file the input's data depends on, even with --force",
                        dest.shown,
                        ref_kind(r),
                        r.target
                    ))
                    .code("output.source-reference"));
                }
            }
        }
    }
    Ok(())
}

fn ref_kind(r: &Reference) -> &'static str {
    use glimpse_formats::RefKind;
    match r.kind {
        RefKind::BackingFile => "the backing file",
        RefKind::DataFile => "the external data file",
        RefKind::Extent => "an extent file",
        RefKind::ParentLocator => "the parent (a parent locator)",
        RefKind::Href => "a file",
    }
}

/// The paths a local name may be: absolute as it is, relative against each base directory.
fn ref_paths(name: &str, bases: &[PathBuf]) -> Vec<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        bases.iter().map(|b| b.join(p)).collect()
    }
}

/// The canonical form of `p`: the path with every symbolic link resolved when it exists, or
/// its canonical directory and its name when only the directory does.
fn canonical(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Some(c);
    }
    let name = p.file_name()?;
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::canonicalize(dir).ok().map(|d| d.join(name))
}

/// The destination's name as it goes into the temporary name: lossily decoded and cut to
/// [`TEMP_NAME_MAX`] bytes at a character boundary.
fn temp_stem(dest: &Path) -> String {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = name.len().min(TEMP_NAME_MAX);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.get(..end).unwrap_or_default().to_string()
}

/// Gives the temporary file the replaced file's owner and group, where the process may: root
/// may give any; another user only a group it belongs to. A refusal leaves the temporary
/// file's own (the process's) owner, as before.
fn keep_owner(f: &File, old: &std::fs::Metadata) {
    use std::os::unix::fs::fchown;
    let Ok(now) = f.metadata() else { return };
    if now.uid() == old.uid() && now.gid() == old.gid() {
        return;
    }
    if fchown(f, Some(old.uid()), Some(old.gid())).is_err() {
        // Not root: the owner cannot change, but the group may.
        let _ = fchown(f, None, Some(old.gid()));
    }
}

/// Gives the temporary file the extended attributes of the file it replaces — POSIX ACLs
/// (`system.posix_acl_access`), `user.*` attributes, and the security labels the process may
/// set — as `cp --preserve=xattr` does, since the rename makes a new inode where rewriting in
/// place (qemu-img) keeps them. What the process may not set, or the file system does not
/// hold, is left as the new file has it. Linux bounds a list and a value at 64 KiB each.
fn keep_xattrs(f: &File, old: &Path) {
    const MAX: usize = 64 << 10;
    let Ok(path) = c_path(old) else {
        return;
    };
    let mut names = vec![0u8; MAX];
    // SAFETY: `path` is a valid C string and `names` a writable buffer of the length given.
    let n = unsafe { libc::listxattr(path.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let Ok(n) = usize::try_from(n) else { return };
    let mut value = vec![0u8; MAX];
    for name in names.get(..n).unwrap_or_default().split(|b| *b == 0) {
        let Ok(name) = std::ffi::CString::new(name) else {
            continue;
        };
        if name.as_bytes().is_empty() {
            continue;
        }
        // SAFETY: as above, for one attribute's value.
        let len = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        let Ok(len) = usize::try_from(len) else {
            continue;
        };
        // SAFETY: `f` is an open descriptor, `name` a C string and `value[..len]` initialised.
        unsafe {
            libc::fsetxattr(
                f.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                len.min(value.len()),
                0,
            );
        }
    }
}

/// `p` as a C string for the libc calls above (a path never holds a NUL byte).
fn c_path(p: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Follows a symbolic link at `dest`, so that the file it names is replaced, not the link. A
/// link whose target does not exist (or a loop) is refused: glimpse does not create files
/// through a dangling link, whose target may be anywhere.
fn resolve(dest: &Path) -> Result<PathBuf> {
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(dest).map_err(|e| {
            let target = std::fs::read_link(dest)
                .map(|t| format!("{:?}", t.display().to_string()))
                .unwrap_or_else(|_| "?".into());
            let why = if e.kind() == io::ErrorKind::NotFound {
                "which does not exist".to_string()
            } else {
                format!("which cannot be followed ({e})")
            };
            Error::invalid(format!(
                "{}: is a symbolic link to {target}, {why}; refusing to create a file through \
                 a dangling link: give the path of the file to write",
                dest.display()
            ))
            .code("output.dangling-link")
        }),
        _ => Ok(dest.to_path_buf()),
    }
}

fn not_regular(dest: &Path, m: &std::fs::Metadata) -> Error {
    let kind = glimpse_formats::io::FileKind::of(&m.file_type());
    Error::invalid(format!(
        "{}: is {}; convert writes a regular file, or - for stdout (redirect that to a \
         device)",
        dest.display(),
        kind.describe()
    ))
    .code("output.not-regular")
}

fn io_error(path: &Path, what: &str, e: io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{what} {}: {e}", path.display())).code("output.write")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn at(p: &Path) -> Storage {
        Storage::at(p).unwrap()
    }

    #[test]
    fn commit_replaces_and_drop_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.img");
        std::fs::write(&dest, b"old").unwrap();
        let out = OutputFile::create(&dest, None, OutputOptions::default()).unwrap();
        let Target::File(mut f) = out.target().unwrap() else {
            panic!("file target")
        };
        f.write_all(b"new").unwrap();
        // O_TMPFILE: the file being written has no name, so nothing can be left behind.
        assert!(out.temp_path().is_none());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        drop(out);
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        let out = OutputFile::create(&dest, None, OutputOptions { fsync: true }).unwrap();
        out.as_file().write_all(b"new").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn same_file_through_any_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.img");
        std::fs::write(&src, b"data").unwrap();
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&src, &link).unwrap();
        let hard = dir.path().join("hard.img");
        std::fs::hard_link(&src, &hard).unwrap();
        let dotted = dir.path().join(".").join("a.img");
        for dest in [&src, &link, &hard, &dotted] {
            let e =
                OutputFile::create(dest, Some(&at(&src)), OutputOptions::default()).unwrap_err();
            assert_eq!(
                e.finding_code(),
                "output.same-as-source",
                "{}",
                dest.display()
            );
        }
        assert!(check_not_source(&at(&src), &at(&dir.path().join("new.img"))).is_ok());
        assert_eq!(std::fs::read(&src).unwrap(), b"data");
    }

    #[test]
    fn a_symlinked_destination_replaces_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.img");
        std::fs::write(&real, b"old").unwrap();
        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let out = OutputFile::create(&link, None, OutputOptions::default()).unwrap();
        let Target::File(mut f) = out.target().unwrap() else {
            panic!("file target")
        };
        f.write_all(b"new").unwrap();
        out.commit().unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
    }

    #[test]
    fn a_device_or_directory_destination_is_refused() {
        for dest in ["/dev/null", "/tmp"] {
            let e =
                OutputFile::create(Path::new(dest), None, OutputOptions::default()).unwrap_err();
            assert_eq!(e.finding_code(), "output.not-regular", "{dest}");
        }
    }

    fn reference(kind: glimpse_formats::RefKind, target: &str) -> Reference {
        Reference {
            kind,
            target: target.into(),
            format: None,
            offset: None,
        }
    }

    #[test]
    fn a_file_the_source_refers_to_is_refused_however_it_is_named() {
        use glimpse_formats::RefKind;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let src = sub.join("ov.qcow2");
        std::fs::write(&src, b"overlay").unwrap();
        let base = sub.join("base.raw");
        std::fs::write(&base, b"base").unwrap();
        std::os::unix::fs::symlink(&base, dir.path().join("link.raw")).unwrap();
        std::fs::hard_link(&base, dir.path().join("hard.raw")).unwrap();
        let refused = |refs: &[Reference], src: Option<&Path>, dest: &Path| {
            let e = check_not_referenced(src, refs, &at(dest)).unwrap_err();
            assert_eq!(
                e.finding_code(),
                "output.source-reference",
                "{}",
                dest.display()
            );
            e.to_string()
        };
        let backing = [reference(RefKind::BackingFile, "base.raw")];
        // Relative to the source's directory, not to the current one.
        let msg = refused(&backing, Some(&src), &base);
        assert!(
            msg.contains("backing file") && msg.contains("--force"),
            "{msg}"
        );
        refused(&backing, Some(&src), &sub.join(".").join("base.raw"));
        refused(&backing, Some(&src), &dir.path().join("link.raw"));
        refused(&backing, Some(&src), &dir.path().join("hard.raw"));
        // The source named through a symbolic link to its directory: qemu resolves against
        // the directory as named, and the canonical one is checked too.
        let via = dir.path().join("via");
        std::os::unix::fs::symlink(&sub, &via).unwrap();
        refused(&backing, Some(&via.join("ov.qcow2")), &base);
        // Absolute references, other kinds, a parent locator with Windows separators.
        let abs = [reference(RefKind::DataFile, base.to_str().unwrap())];
        refused(&abs, None, &base);
        refused(
            &[reference(RefKind::Extent, "./base.raw")],
            Some(&src),
            &base,
        );
        refused(
            &[reference(RefKind::ParentLocator, ".\\base.raw")],
            Some(&src),
            &base,
        );
        // A reference to a file that does not exist yet: writing it would create the base.
        let missing = [reference(RefKind::BackingFile, "gone.raw")];
        refused(&missing, Some(&src), &sub.join("gone.raw"));
        // Anything else passes: another name, a URL, qemu's json:, a remote source's
        // relative reference.
        assert!(check_not_referenced(Some(&src), &backing, &at(&sub.join("out.raw"))).is_ok());
        assert!(
            check_not_referenced(Some(&src), &backing, &at(&dir.path().join("base.raw"))).is_ok()
        );
        let other = [
            reference(RefKind::BackingFile, "http://host/base.raw"),
            reference(RefKind::BackingFile, "json:{}"),
            reference(RefKind::BackingFile, ""),
        ];
        assert!(check_not_referenced(Some(&src), &other, &at(&base)).is_ok());
        assert!(check_not_referenced(None, &backing, &at(&base)).is_ok());
        assert_eq!(std::fs::read(&base).unwrap(), b"base");
    }

    #[test]
    fn names_qemu_resolves_to_the_destination_are_refused() {
        use glimpse_formats::RefKind;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("ov.qcow2");
        std::fs::write(&src, b"overlay").unwrap();
        let victim = dir.path().join("victim.raw");
        std::fs::write(&victim, b"victim").unwrap();
        let v = victim.to_str().unwrap();
        let refused = |kind: RefKind, name: &str| {
            let e = check_not_referenced(Some(&src), &[reference(kind, name)], &at(&victim))
                .expect_err(name);
            assert_eq!(e.finding_code(), "output.source-reference", "{name:?}");
        };
        for name in [
            format!("{v}\0junk"),
            format!("{v}\0\0\0\0\0\0\0\0"),
            format!("{v}\0/etc"),
            format!("json:{{\"file.filename\":\"{v}\"}}"),
            format!(
                "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"file\",\"filename\":\"{v}\"}}}}"
            ),
            format!("json:{{'file.filename':'{v}'}}"),
            format!("json:{{\"driver\":\"quorum\",\"children\":[{{\"file.filename\":\"{v}\"}}]}}"),
            format!("blkdebug::{v}"),
            format!("blkdebug:/nonexistent/cfg:file:{v}"),
            format!("blkverify:/nonexistent/a:{v}"),
            format!("host_device:{v}"),
            format!("host_cdrom:{v}"),
            format!("file:{v}"),
            // qemu cannot be followed with confidence: any destination is refused.
            format!("weird:{v}"),
            "JSON:{}".to_string(),
            "json:{'file.filename':".to_string(),
        ] {
            refused(RefKind::BackingFile, &name);
        }
        refused(RefKind::DataFile, &format!("json:{{'filename':'{v}'}}"));
        refused(RefKind::Extent, &format!("file:{v}"));
        // A relative path inside a protocol name is qemu's working directory's, and the
        // image's directory's.
        refused(RefKind::BackingFile, "blkdebug::victim.raw");
        // Resolved names that are another file still pass; network names name no file.
        for name in [
            format!("json:{{\"file.filename\":\"{v}.other\"}}"),
            format!("{v}.other\0{v}"),
            "nbd:127.0.0.1:1".to_string(),
            "http://host/victim.raw".to_string(),
        ] {
            assert!(
                check_not_referenced(
                    Some(&src),
                    &[reference(RefKind::BackingFile, &name)],
                    &at(&victim)
                )
                .is_ok(),
                "{name:?}"
            );
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
    }

    #[test]
    fn a_long_destination_name_gets_a_temporary_name_that_fits() {
        let dir = tempfile::tempdir().unwrap();
        for len in [240, 250, 255] {
            let dest = dir.path().join("é".repeat(len / 2) + &"a".repeat(len % 2));
            // The name a temporary file gets where it needs one (a file system without
            // O_TMPFILE, or when it replaces a file).
            let stem = temp_stem(&dest);
            let named =
                Temp::create_named_in(dir.path(), &format!(".{stem}."), ".glimpse-tmp", 0o600)
                    .unwrap();
            let temp = named.path().unwrap().file_name().unwrap().len();
            assert!(temp <= 130, "{temp}");
            drop(named);
            // Written new, then replaced.
            for content in [&b"new"[..], b"newer"] {
                let out = OutputFile::create(&dest, None, OutputOptions::default()).unwrap();
                out.as_file().write_all(content).unwrap();
                out.commit().unwrap();
                assert_eq!(std::fs::read(&dest).unwrap(), content);
            }
            std::fs::remove_file(&dest).unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_dangling_link_is_refused_with_its_target_named() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("dang.raw");
        std::os::unix::fs::symlink("nowhere.raw", &link).unwrap();
        let e = OutputFile::create(&link, None, OutputOptions::default()).unwrap_err();
        assert_eq!(e.finding_code(), "output.dangling-link");
        let msg = e.to_string();
        assert!(
            msg.contains("\"nowhere.raw\", which does not exist"),
            "{msg}"
        );
        assert!(!dir.path().join("nowhere.raw").exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_replaced_file_keeps_mode_owner_and_group_and_counts_its_other_links() {
        use std::os::unix::fs::{chown, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.img");
        std::fs::write(&dest, b"old").unwrap();
        std::fs::hard_link(&dest, dir.path().join("other.img")).unwrap();
        // Root gives the file away; another user keeps its own ids.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let (uid, gid) = if root {
            (65534, 65534)
        } else {
            let m = std::fs::metadata(&dest).unwrap();
            (m.uid(), m.gid())
        };
        chown(&dest, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&dest, Permissions::from_mode(0o640)).unwrap();
        let out = OutputFile::create(&dest, None, OutputOptions::default()).unwrap();
        assert_eq!(out.other_links(), 1);
        out.as_file().write_all(b"new").unwrap();
        out.commit().unwrap();
        let m = std::fs::metadata(&dest).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid, gid, 0o640));
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        // The other link is the old inode, with the old bytes.
        assert_eq!(std::fs::read(dir.path().join("other.img")).unwrap(), b"old");
        let fresh = OutputFile::create(&dir.path().join("new.img"), None, OutputOptions::default())
            .unwrap();
        assert_eq!(fresh.other_links(), 0);
    }

    #[test]
    fn replacing_a_file_leaves_only_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.img");
        for round in 0..3u8 {
            if round > 0 {
                assert!(dest.is_file());
            }
            let out = OutputFile::create(&dest, None, OutputOptions::default()).unwrap();
            out.as_file().write_all(&[round; 4096]).unwrap();
            out.commit().unwrap();
            assert_eq!(std::fs::read(&dest).unwrap(), vec![round; 4096]);
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["out.img"], "round {round}");
        }
    }

    fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let p = c_path(path).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        let mut v = vec![0u8; 4096];
        // SAFETY: C strings and a writable buffer of the length given.
        let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        v.truncate(usize::try_from(len).ok()?);
        Some(v)
    }

    fn set_xattr(path: &Path, name: &str, value: &[u8]) {
        let p = c_path(path).unwrap();
        let n = std::ffi::CString::new(name).unwrap();
        // SAFETY: C strings and an initialised buffer of the length given.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(r, 0, "setxattr {name}: {}", io::Error::last_os_error());
    }

    #[test]
    fn a_replaced_file_keeps_its_acl_and_extended_attributes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.img");
        std::fs::write(&dest, b"old").unwrap();
        std::fs::set_permissions(&dest, Permissions::from_mode(0o640)).unwrap();
        // An access ACL in the kernel's xattr form (version 2; tag, permissions, id):
        // owner rw, user 65534 r, group r, mask r, others nothing.
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX),
            (0x02, 4, 65534),
            (0x04, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            acl.extend(tag.to_le_bytes());
            acl.extend(perm.to_le_bytes());
            acl.extend(id.to_le_bytes());
        }
        set_xattr(&dest, "system.posix_acl_access", &acl);
        set_xattr(&dest, "user.glimpse.test", b"kept");
        let out = OutputFile::create(&dest, None, OutputOptions::default()).unwrap();
        out.as_file().write_all(b"new").unwrap();
        out.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(
            xattr(&dest, "user.glimpse.test").as_deref(),
            Some(&b"kept"[..])
        );
        assert_eq!(xattr(&dest, "system.posix_acl_access"), Some(acl));
        assert_eq!(std::fs::metadata(&dest).unwrap().mode() & 0o7777, 0o640);
    }
}
