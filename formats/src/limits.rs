//! Caps on what untrusted metadata may make us read, allocate or do.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Caps applied while opening and walking an image. Every allocation whose size comes from the
/// image is charged to a [`Budget`] made from these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total metadata bytes `open` and `check` may read and hold (tables, descriptors).
    pub max_metadata_bytes: u64,
    /// Entries in any one table (L1, grain directory, BAT, block map, ...).
    pub max_table_entries: u64,
    /// Largest virtual size accepted at all (a sanity cap, not the policy's limit).
    pub max_virtual_size: u64,
    /// Decompressed bytes held in the guest reader's cache.
    pub max_cache_bytes: u64,
    /// Bytes all gzip-compressed OVA disks of one command may inflate to, together (spooled to
    /// a temporary file past a few MiB, so this bounds disk use and work, not memory).
    pub max_inflated_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // QEMU caps one qcow2 L1 table at 32 MiB and the refcount table at 8 MiB; a full
            // check also holds L2 and refcount blocks one at a time. 512 MiB is far above any
            // real image's metadata and well inside the machine.
            max_metadata_bytes: 512 << 20,
            // 32 MiB of 8-byte entries: QEMU's QCOW_MAX_L1_SIZE.
            max_table_entries: 4 << 20,
            // 2^63 - 1: sizes travel as i64 in qemu-img's JSON.
            max_virtual_size: i64::MAX as u64,
            max_cache_bytes: 64 << 20,
            // A bound on the temporary disk space and the time a gzip bomb can cost; far
            // above the compressed OVA disks seen in practice.
            max_inflated_bytes: 16 << 30,
        }
    }
}

impl Limits {
    /// Tight limits for fuzzing: small tables, little memory.
    pub fn tight() -> Self {
        Limits {
            max_metadata_bytes: 16 << 20,
            max_table_entries: 1 << 16,
            max_virtual_size: 1 << 40,
            max_cache_bytes: 4 << 20,
            max_inflated_bytes: 64 << 20,
        }
    }

    /// A fresh budget counting down from `max_metadata_bytes`.
    pub fn budget(&self) -> Budget {
        Budget::new(self.max_metadata_bytes)
    }

    /// Fails when `entries` exceeds the per-table cap.
    ///
    /// # Errors
    /// `LimitExceeded` naming the table.
    pub fn check_entries(&self, what: &str, entries: u64) -> Result<()> {
        if entries > self.max_table_entries {
            return Err(Error::limit(format!(
                "{what}: {entries} entries exceed the limit of {}",
                self.max_table_entries
            ))
            .code("table.too-large"));
        }
        Ok(())
    }
}

/// A countdown of metadata bytes. Shared by reference; `Sync`.
#[derive(Debug)]
pub struct Budget {
    left: AtomicU64,
}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        Budget {
            left: AtomicU64::new(bytes),
        }
    }

    /// Charges `bytes`, failing when the budget would go below zero.
    ///
    /// # Errors
    /// `LimitExceeded` naming `what`.
    pub fn take(&self, bytes: u64, what: &str) -> Result<()> {
        self.left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                l.checked_sub(bytes)
            })
            .map(|_| ())
            .map_err(|_| {
                Error::limit(format!(
                    "{what}: metadata budget exhausted ({bytes} bytes asked)"
                ))
            })
    }

    /// Gives bytes back once a temporary buffer is dropped.
    pub fn give_back(&self, bytes: u64) {
        let _ = self
            .left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_add(bytes))
            });
    }

    /// Bytes left.
    pub fn left(&self) -> u64 {
        self.left.load(Ordering::Relaxed)
    }
}
