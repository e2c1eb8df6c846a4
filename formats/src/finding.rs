//! Findings: what `check` reports about an image.

use std::collections::BTreeMap;

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
    pub fn from_error(err: &crate::error::Error) -> Self {
        Finding {
            code: err.finding_code(),
            severity: Severity::Reject,
            message: err.message().to_string(),
            offset: err.offset(),
        }
    }
}

/// Findings of one kind kept in full before the rest are only counted: a hostile image can
/// make millions of the same finding, and the first few say everything.
pub const PER_CODE: usize = 16;

/// Collects findings, at most [`PER_CODE`] of each code, then one summary finding per code that
/// overflowed ("N more like this (M in all)", with the severity of the first of that code).
/// Every format's `check` reports through one of these.
#[derive(Debug, Default)]
pub struct Findings {
    kept: Vec<Finding>,
    per_code: BTreeMap<&'static str, u64>,
}

impl Findings {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a finding (kept, or only counted past [`PER_CODE`] of its code).
    pub fn push(&mut self, f: Finding) {
        let n = self.per_code.entry(f.code).or_insert(0);
        *n = n.saturating_add(1);
        if *n <= PER_CODE as u64 {
            self.kept.push(f);
        }
    }

    /// Adds the rejecting finding for an error that stopped one part of a check.
    pub fn error(&mut self, e: &crate::error::Error) {
        self.push(Finding::from_error(e));
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// The findings kept so far, in the order they were added.
    pub fn kept(&self) -> &[Finding] {
        &self.kept
    }

    /// The findings in the order added, then one summary per overflowing code.
    pub fn finish(mut self) -> Vec<Finding> {
        for (code, n) in &self.per_code {
            let extra = n.saturating_sub(PER_CODE as u64);
            if extra == 0 {
                continue;
            }
            let sev = self
                .kept
                .iter()
                .find(|f| f.code == *code)
                .map(|f| f.severity);
            let msg = format!("{extra} more like this ({n} in all)");
            self.kept.push(match sev {
                Some(Severity::Warn) => Finding::warn(code, msg),
                Some(Severity::Info) => Finding::info(code, msg),
                _ => Finding::reject(code, msg),
            });
        }
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_are_capped_per_code_with_one_summary() {
        let mut f = Findings::new();
        for i in 0..20 {
            f.push(Finding::warn("a.b", format!("{i}")));
        }
        f.push(Finding::reject("c.d", "x"));
        let out = f.finish();
        assert_eq!(out.len(), PER_CODE + 2);
        let last = out.last().unwrap();
        assert_eq!(
            (last.code, last.severity, last.message.as_str()),
            ("a.b", Severity::Warn, "4 more like this (20 in all)")
        );
        assert_eq!(out[PER_CODE].code, "c.d");
    }
}
