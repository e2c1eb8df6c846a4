//! `ova extract`: every regular member written beside each other, only for an archive that
//! passes the check, never replacing a file.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::error::{Error, Result};
use crate::finding::{Finding, Severity};
use crate::limits::Limits;
use crate::tmpfile::Temp;

use super::tar::MemberKind;
use super::{check, Ova};

impl Ova {
    /// Extracts every regular-file member into `dir` (created if missing) — but only when
    /// [`Ova::check_all`] finds nothing to reject. Each member is written to a temporary file
    /// in `dir` and renamed into place (never replacing a file) only once all are written, so
    /// nothing is overwritten or left half-written; names are single plain components, so
    /// nothing lands outside `dir`. On any error the files created so far are removed.
    ///
    /// # Errors
    /// `Io` for write errors (including a name that already exists in `dir`).
    ///
    /// # Security
    /// Writes nothing at all for a rejected archive; never creates links, devices or
    /// directories other than `dir`.
    pub fn extract(&self, dir: &Path, limits: &Limits) -> Result<Extraction> {
        self.extract_with(dir, limits, &ExtractHooks::default())
    }

    /// [`Ova::extract`] for a caller that handles signals: `hooks.cancel` stops the check and
    /// the writing (the temporary files are removed, as on any error), and `hooks.temp` learns
    /// each temporary file's path and each directory this creates (so that a signal handler
    /// can remove them when the process cannot wait); what it returns is dropped once that
    /// file is renamed into place or removed, and once the extraction ends for a directory.
    ///
    /// # Errors
    /// As [`Ova::extract`]; `Invalid` when cancelled.
    pub fn extract_with(
        &self,
        dir: &Path,
        limits: &Limits,
        hooks: &ExtractHooks<'_>,
    ) -> Result<Extraction> {
        let findings = self.check_all_with(limits, hooks.cancel)?;
        if findings.iter().any(|f| f.severity == Severity::Reject) {
            return Ok(Extraction {
                written: Vec::new(),
                findings,
                rejected: true,
            });
        }
        hooks.check()?;
        let mut plan = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.kind != MemberKind::Regular {
                continue;
            }
            // check_all rejected every unsafe name; this is a second line of defence.
            let name = check::normalized_name(m)
                .filter(|_| check::name_problem(m).is_none())
                .ok_or_else(|| {
                    Error::unsafe_(format!("member name {:?} is unsafe", m.name))
                        .code("ova.member-name")
                })?;
            plan.push((i, dir.join(name)));
        }
        for (_, p) in &plan {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(Error::io(
                    std::io::Error::from(std::io::ErrorKind::AlreadyExists),
                    format!("{} already exists; nothing was extracted", p.display()),
                ));
            }
        }
        // The directories this run makes, outermost first: only those whose creation
        // succeeded here, never a prediction from the path's text (`new/../existing` names a
        // directory that exists once `new` does). Each is handed to `hooks.temp` once it
        // exists, so that a handler that cannot wait removes it too; one a signal catches
        // between its creation and its registration is left behind empty, never a directory
        // that was there before.
        let mut created: Vec<PathBuf> = Vec::new();
        let mut registered: Vec<Box<dyn Any>> = Vec::new();
        let remove_created = |created: &[PathBuf]| {
            for d in created.iter().rev() {
                // Only succeeds when empty: never removes anything but our own directories.
                let _ = std::fs::remove_dir(d);
            }
        };
        if let Err(e) = create_dirs(dir, &mut created, &mut registered, hooks) {
            remove_created(&created);
            return Err(Error::io(e, format!("creating {}", dir.display())).code("output.write"));
        }
        let written = self
            .write_all(plan, dir, hooks)
            .inspect_err(|_| remove_created(&created))?;
        drop(registered);
        Ok(Extraction {
            written,
            findings,
            rejected: false,
        })
    }

    /// Writes every planned member to a temporary file beside its destination, then, once all
    /// are written, renames each into place without replacing anything. On any failure the
    /// temporary files and the files already renamed are removed: an existing file is never
    /// opened for writing, truncated or replaced.
    fn write_all(
        &self,
        plan: Vec<(usize, PathBuf)>,
        dir: &Path,
        hooks: &ExtractHooks<'_>,
    ) -> Result<Vec<PathBuf>> {
        // Every member's file stays open until all are written (an unnamed one has no other
        // handle): make room for them under the soft open-file limit.
        room_for_open_files(plan.len())?;
        let mut temps = Vec::new();
        for (i, path) in plan {
            // Dropping a temporary file removes it.
            temps.push((self.write_member(i, &path, hooks)?, path));
        }
        // One sync of the file system for all members, rather than one fsync each (2,000
        // members took 8 s that way, GNU tar 0.3 s): the data is on disk before any name is.
        sync_file_system(dir)?;
        // Past this point every member is written: a signal no longer stops the renames.
        hooks.check()?;
        if let Some(f) = hooks.before_commit {
            f()?;
        }
        let mut written: Vec<PathBuf> = Vec::new();
        for ((tmp, _registered), path) in temps {
            if let Err((e, _)) = tmp.persist_noclobber(&path) {
                for p in &written {
                    let _ = std::fs::remove_file(p);
                }
                return Err(
                    Error::io(e, format!("renaming into {}", path.display())).code("output.write")
                );
            }
            written.push(path);
        }
        Ok(written)
    }

    fn write_member(
        &self,
        i: usize,
        path: &Path,
        hooks: &ExtractHooks<'_>,
    ) -> Result<(Temp, Option<Box<dyn Any>>)> {
        use std::io::Write;
        let dir = path.parent().unwrap_or(Path::new("."));
        let werr = |e: std::io::Error| {
            Error::io(e, format!("writing {}", path.display())).code("output.write")
        };
        // Without a name where the file system allows (O_TMPFILE): a SIGKILL leaves nothing.
        let mut tmp = Temp::create_in(dir, ".glimpse-extract-", "", 0o644).map_err(|e| {
            Error::io(e, format!("creating a temporary file in {}", dir.display()))
                .code("output.write")
        })?;
        let registered = tmp.path().and_then(|p| hooks.temp.map(|t| t(p)));
        hooks.check()?;
        let src = self.member_source(i)?;
        let f = tmp.as_file_mut();
        crate::io::for_each_chunk(src.as_ref(), |chunk, _| {
            hooks.check()?;
            f.write_all(chunk).map_err(werr)
        })?;
        Ok((tmp, registered))
    }
}

/// Creates `dir` and its missing parents one component at a time, outermost first, pushing
/// onto `created` (and registering with `hooks.temp`) each directory that `create_dir` made
/// here. One that already exists (`EEXIST`: the user's, or `new/..`) is not ours and is left
/// out, whatever its path looks like.
fn create_dirs(
    dir: &Path,
    created: &mut Vec<PathBuf>,
    registered: &mut Vec<Box<dyn Any>>,
    hooks: &ExtractHooks<'_>,
) -> std::io::Result<()> {
    let mut at = PathBuf::new();
    for c in dir.components() {
        at.push(c);
        match std::fs::create_dir(&at) {
            Ok(()) => {
                if let Some(t) = hooks.temp {
                    registered.push(t(&at));
                }
                created.push(at.clone());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    if std::fs::metadata(dir)?.is_dir() {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(libc::ENOTDIR))
    }
}

/// Raises the soft limit on open files, up to the hard limit, so that `members` files can be
/// open at once (plus a margin for the process's own); fails before anything is written when
/// even the hard limit is too low.
fn room_for_open_files(members: usize) -> Result<()> {
    const MARGIN: u64 = 64;
    let need = (members as u64).saturating_add(MARGIN);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Ok(());
    }
    if lim.rlim_cur >= need {
        return Ok(());
    }
    if lim.rlim_max >= need {
        let raised = libc::rlimit {
            rlim_cur: need,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `setrlimit` reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(());
        }
    }
    Err(Error::limit(format!(
        "extracting {members} members needs {need} open files, above the limit of {} \
         (ulimit -n); nothing was extracted",
        lim.rlim_max
    ))
    .code("ova.too-many-members"))
}

/// Flushes the data written into `dir`'s file system (`syncfs`), once for every member.
fn sync_file_system(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let d =
        std::fs::File::open(dir).map_err(|e| Error::io(e, format!("opening {}", dir.display())))?;
    // SAFETY: an open descriptor.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(Error::io(
            std::io::Error::last_os_error(),
            format!("syncing the file system of {}", dir.display()),
        )
        .code("output.write"));
    }
    Ok(())
}

/// Learns the path of a temporary file or of a directory the extraction creates; what it
/// returns lives as long as that path is temporary.
pub type TempHook<'a> = dyn Fn(&Path) -> Box<dyn Any> + 'a;

/// What a caller that handles signals gives [`Ova::extract_with`].
#[derive(Default, Clone, Copy)]
pub struct ExtractHooks<'a> {
    /// Set (by a signal handler, say) to stop before the next chunk.
    pub cancel: Option<&'a AtomicBool>,
    /// Called with each temporary file's path as soon as it exists (a file without a name,
    /// `O_TMPFILE`, has none and needs no removing), and with each directory
    /// the extraction creates just before it exists; the value it returns is dropped when
    /// that file is renamed into place or removed, or when the extraction ends.
    pub temp: Option<&'a TempHook<'a>>,
    /// Called once every member is written and synced, before the first is renamed into
    /// place: an error (the archive was written to while it was read, say) removes them all.
    pub before_commit: Option<&'a dyn Fn() -> Result<()>>,
}

impl ExtractHooks<'_> {
    fn check(&self) -> Result<()> {
        super::stop_if_cancelled(self.cancel)
    }
}

/// What [`Ova::extract`] did.
#[derive(Debug)]
pub struct Extraction {
    /// Files written, in archive order (empty when rejected).
    pub written: Vec<PathBuf>,
    /// The check's findings.
    pub findings: Vec<Finding>,
    /// True when the check rejected the archive and nothing was written.
    pub rejected: bool,
}
