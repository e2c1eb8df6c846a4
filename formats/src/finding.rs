//! Findings: what `check` reports about an image.

use serde::Serialize;

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A fact worth knowing.
    Info,
    /// Suspicious but accepted.
    Warn,
    /// The image must not be accepted.
    Reject,
}

/// One problem or fact found in an image. Codes are stable; see `docs/findings.md`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable code such as `qcow2.backing-file`.
    pub code: &'static str,
    /// How much it matters.
    pub severity: Severity,
    /// Human-readable explanation.
    pub message: String,
    /// Byte offset in the file where it applies, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl Finding {
    /// A finding that rejects the image.
    pub fn reject(code: &'static str, message: impl Into<String>) -> Self {
        Finding {
            code,
            severity: Severity::Reject,
            message: message.into(),
            offset: None,
        }
    }
    /// A warning.
    pub fn warn(code: &'static str, message: impl Into<String>) -> Self {
        Finding {
            code,
            severity: Severity::Warn,
            message: message.into(),
            offset: None,
        }
    }
    /// Information.
    pub fn info(code: &'static str, message: impl Into<String>) -> Self {
        Finding {
            code,
            severity: Severity::Info,
            message: message.into(),
            offset: None,
        }
    }
    /// Sets the offset.
    #[must_use]
    pub fn at(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }
    /// A rejecting finding made from an error that stopped parsing.
    pub fn from_error(err: &crate::Error) -> Self {
        Finding {
            code: err.finding_code(),
            severity: Severity::Reject,
            message: err.message().to_string(),
            offset: err.offset(),
        }
    }
}
