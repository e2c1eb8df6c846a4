//! The OVF manifest (`.mf`): one `ALGO(name)= hexdigest` line per file.

use std::sync::atomic::AtomicBool;

use serde::Serialize;
use sha1::Digest;

use crate::error::{Error, Result};
use crate::io::ReadAt;

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST: u64 = 1 << 20;

/// A digest algorithm a manifest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// SHA-1 (OVF 1.x; weak).
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl Algo {
    fn from_name(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "SHA1" => Some(Algo::Sha1),
            "SHA256" => Some(Algo::Sha256),
            "SHA384" => Some(Algo::Sha384),
            "SHA512" => Some(Algo::Sha512),
            _ => None,
        }
    }
    fn digest_len(self) -> usize {
        match self {
            Algo::Sha1 => 20,
            Algo::Sha256 => 32,
            Algo::Sha384 => 48,
            Algo::Sha512 => 64,
        }
    }
}

/// One manifest line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// The algorithm.
    pub algo: Algo,
    /// The file name.
    pub name: String,
    /// The expected digest, lowercase hex.
    pub digest: String,
}

/// Parses a manifest.
///
/// # Errors
/// `Invalid` (`ova.manifest-malformed`) for text that is not UTF-8, a line that is not
/// `ALGO(name)= hex`, an unknown algorithm or a digest of the wrong length;
/// `LimitExceeded` when larger than [`MAX_MANIFEST`].
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>> {
    let bad = |m: String| Error::invalid(m).code("ova.manifest-malformed");
    if bytes.len() as u64 > MAX_MANIFEST {
        return Err(Error::limit(format!(
            "manifest of {} bytes exceeds {MAX_MANIFEST}",
            bytes.len()
        ))
        .code("ova.manifest-malformed"));
    }
    let text =
        std::str::from_utf8(bytes).map_err(|e| bad(format!("manifest is not UTF-8: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let lineno = i.saturating_add(1);
        let parsed = (|| {
            let (algo, rest) = line.split_once('(')?;
            let (name, rest) = rest.rsplit_once(')')?;
            let hex = rest.trim_start().strip_prefix('=')?.trim();
            Some((algo.trim(), name, hex))
        })();
        let (algo, name, hex) = parsed
            .ok_or_else(|| bad(format!("manifest line {lineno} is not ALGO(name)= digest")))?;
        let algo = Algo::from_name(algo).ok_or_else(|| {
            bad(format!(
                "manifest line {lineno}: unknown algorithm {algo:?}"
            ))
        })?;
        if hex.len() != algo.digest_len().saturating_mul(2)
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(bad(format!(
                "manifest line {lineno}: {hex:?} is not a {algo:?} digest"
            )));
        }
        out.push(Entry {
            algo,
            name: name.to_string(),
            digest: hex.to_ascii_lowercase(),
        });
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Digests all of `src` with `algo`, streaming through a fixed buffer.
///
/// # Errors
/// `Io` / `Truncated` when the source cannot be read in full.
pub fn digest(src: &dyn ReadAt, algo: Algo) -> Result<String> {
    digest_with(src, algo, None)
}

/// [`digest`] that stops with `Invalid` before the next chunk once `cancel` is set.
///
/// # Errors
/// As [`digest`]; `Invalid` when cancelled.
pub fn digest_with(src: &dyn ReadAt, algo: Algo, cancel: Option<&AtomicBool>) -> Result<String> {
    fn run<D: Digest>(src: &dyn ReadAt, cancel: Option<&AtomicBool>) -> Result<String> {
        let mut d = D::new();
        crate::io::for_each_chunk(src, |chunk, _| {
            super::stop_if_cancelled(cancel)?;
            d.update(chunk);
            Ok(())
        })?;
        Ok(hex(&d.finalize()))
    }
    match algo {
        Algo::Sha1 => run::<sha1::Sha1>(src, cancel),
        Algo::Sha256 => run::<sha2::Sha256>(src, cancel),
        Algo::Sha384 => run::<sha2::Sha384>(src, cancel),
        Algo::Sha512 => run::<sha2::Sha512>(src, cancel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_digests() {
        let e = parse(b"SHA256(a.ovf)= ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\nSHA1(b (1).vmdk) = a9993e364706816aba3e25717850c26c9cd0d89d\n").unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].name, "b (1).vmdk");
        assert_eq!(digest(&b"abc".to_vec(), Algo::Sha256).unwrap(), e[0].digest);
        assert_eq!(digest(&b"abc".to_vec(), Algo::Sha1).unwrap(), e[1].digest);
        assert!(parse(b"MD5(a)= 900150983cd24fb0d6963f7d28e17f72").is_err());
        assert!(parse(b"SHA1(a)= 12").is_err());
        assert!(parse(b"garbage").is_err());
    }
}
