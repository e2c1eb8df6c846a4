//! The crate's error type.
//!
//! Every error carries an [`ErrorKind`] so that callers (and the CLI's exit codes) can tell
//! "corrupt", "unsupported" and "unsafe" apart, an optional stable finding code, and the byte
//! offset in the source where the problem was seen.

use std::fmt;
use std::io;

/// What went wrong, at the level callers act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The source could not be read (an I/O error from the operating system).
    Io,
    /// The data ends before a structure it declares.
    Truncated,
    /// A field has a value the format does not allow.
    Invalid,
    /// A legal feature that glimpse does not implement.
    Unsupported,
    /// Structures disagree with each other (tables overlap, checksums fail, ...).
    Corrupt,
    /// A declared size exceeds the caller's [`crate::limits::Limits`].
    LimitExceeded,
    /// The image asks for something dangerous (a reference to another file, ...).
    Unsafe,
    /// The caller asked for something the input does not have (an OVA disk number out of
    /// range, `--disk` on an image that is not an OVA): a usage error, not a verdict.
    Usage,
}

impl ErrorKind {
    /// A short lowercase name, used in JSON output and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::Truncated => "truncated",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::LimitExceeded => "limit-exceeded",
            ErrorKind::Unsafe => "unsafe",
            ErrorKind::Usage => "usage",
        }
    }

    /// The finding code used when an error of this kind stops `open` and no more specific code
    /// was attached.
    pub fn default_code(self) -> &'static str {
        match self {
            ErrorKind::Io => "io.error",
            ErrorKind::Truncated => "format.truncated",
            ErrorKind::Invalid => "format.invalid",
            ErrorKind::Unsupported => "format.unsupported",
            ErrorKind::Corrupt => "format.corrupt",
            ErrorKind::LimitExceeded => "size.limit",
            ErrorKind::Unsafe => "format.unsafe",
            ErrorKind::Usage => "usage.invalid",
        }
    }
}

/// The error type of every fallible operation in this crate.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    code: Option<&'static str>,
    message: String,
    offset: Option<u64>,
    source: Option<io::Error>,
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            code: None,
            message: message.into(),
            offset: None,
            source: None,
        }
    }
    /// Data ends early.
    pub fn truncated(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Truncated, message)
    }
    /// A field has an illegal value.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }
    /// A legal but unimplemented feature.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    /// Inconsistent structures.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }
    /// A declared size above the caller's limits.
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::LimitExceeded, message)
    }
    /// Something dangerous was asked for.
    pub fn unsafe_(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsafe, message)
    }
    /// The caller asked for something the input does not have.
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Usage, message)
    }
    /// An I/O error while reading the source.
    pub fn io(err: io::Error, message: impl Into<String>) -> Self {
        let mut e = Self::new(ErrorKind::Io, message);
        e.source = Some(err);
        e
    }

    /// Attaches the byte offset in the source where the problem lies.
    #[must_use]
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }
    /// Attaches a stable finding code (see `docs/findings.md`).
    #[must_use]
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    /// Prefixes the message with context.
    #[must_use]
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The stable finding code: the one attached, or the kind's default.
    pub fn finding_code(&self) -> &'static str {
        self.code.unwrap_or_else(|| self.kind.default_code())
    }
    /// The message without the offset.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The byte offset where the problem lies, when known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }
    /// The operating system's error behind an `Io` error, when there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(off) = self.offset {
            write!(f, " (at offset {off:#x})")?;
        }
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

/// `source()` is deliberately `None`: [`Display`](fmt::Display) already ends with the OS error,
/// and a chain printer (anyhow's `{:#}`) would print it a second time
/// (`Is a directory (os error 21): Is a directory (os error 21)`). Use [`Error::io_error`].
impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        if err.kind() == io::ErrorKind::UnexpectedEof {
            Error::truncated("unexpected end of data")
        } else {
            Error::io(err, "cannot read")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain printer (anyhow's `{:#}`) walks `source()`: the OS error must appear once.
    #[test]
    fn the_os_error_is_printed_once_by_a_chain_printer() {
        let e = Error::from(io::Error::from_raw_os_error(21));
        let mut text = e.to_string();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        while let Some(c) = cur {
            text += &format!(": {c}");
            cur = c.source();
        }
        assert_eq!(text.matches("os error 21").count(), 1, "{text}");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(e.io_error().and_then(io::Error::raw_os_error), Some(21));
    }
}
