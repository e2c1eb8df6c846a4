//! `ova extract`: every regular member written beside each other, only for an archive that
//! passes the check, never replacing a file.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::finding::{Finding, Severity};
use crate::limits::Limits;

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
        let findings = self.check_all(limits)?;
        if findings.iter().any(|f| f.severity == Severity::Reject) {
            return Ok(Extraction {
                written: Vec::new(),
                findings,
                rejected: true,
            });
        }
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
        let created_dir = std::fs::symlink_metadata(dir).is_err();
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(e, format!("creating {}", dir.display())))?;
        let written = self.write_all(plan).inspect_err(|_| {
            if created_dir {
                // Only succeeds when empty: never removes anything but our own directory.
                let _ = std::fs::remove_dir(dir);
            }
        })?;
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
    fn write_all(&self, plan: Vec<(usize, PathBuf)>) -> Result<Vec<PathBuf>> {
        let mut temps = Vec::new();
        for (i, path) in plan {
            // Dropping a temporary file removes it.
            temps.push((self.write_member(i, &path)?, path));
        }
        let mut written: Vec<PathBuf> = Vec::new();
        for (tmp, path) in temps {
            if let Err(e) = tmp.persist_noclobber(&path) {
                for p in &written {
                    let _ = std::fs::remove_file(p);
                }
                return Err(Error::io(
                    e.error,
                    format!("renaming into {}", path.display()),
                ));
            }
            written.push(path);
        }
        Ok(written)
    }

    fn write_member(&self, i: usize, path: &Path) -> Result<tempfile::NamedTempFile> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let dir = path.parent().unwrap_or(Path::new("."));
        let werr = |e: std::io::Error| Error::io(e, format!("writing {}", path.display()));
        let mut tmp = tempfile::Builder::new()
            .prefix(".glimpse-extract-")
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(|e| Error::io(e, format!("creating a temporary file in {}", dir.display())))?;
        let src = self.member_source(i)?;
        let f = tmp.as_file_mut();
        crate::io::for_each_chunk(src.as_ref(), |chunk, _| f.write_all(chunk).map_err(werr))?;
        f.sync_all().map_err(werr)?;
        Ok(tmp)
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
