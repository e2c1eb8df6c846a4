//! Caps on what untrusted metadata may make us read, allocate or do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

/// The default budget of a command: its metadata, its reader caches and its conversion buffers
/// together (docs/memory.md). With the few tens of MiB nothing charges (code, stacks, codec
/// state, one chunk per worker), a command stays within 256 MiB of memory on any input.
pub const DEFAULT_METADATA_BYTES: u64 = 224 << 20;

/// The default cap on one table's bytes as stored (docs/memory.md). It is qemu's largest
/// own table cap that glimpse reads whole: a VMDK grain directory of 32 Mi four-byte entries
/// ("L1 size too big"). It admits a qcow2 L1 table at qemu's 32 MiB, a VDI of 32 TiB, a VHDX of
/// almost 16 TiB in 1 MiB blocks; and it leaves 96 MiB of [`DEFAULT_METADATA_BYTES`] for the rest of
/// a command (reader cache, conversion buffers, what `check` holds beside the table).
pub const DEFAULT_TABLE_BYTES: u64 = 128 << 20;

/// Caps applied while opening and walking an image. Every allocation whose size comes from the
/// image is charged to a [`Budget`] made from these.
///
/// A command that opens several images (`compare`, every disk of an OVA) makes its limits with
/// [`Limits::per_command`]: every [`Limits::budget`] call then hands out the same shared
/// budget, so the command as a whole, not each image, stays within `max_metadata_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes `open`, `check`, the guest readers and the conversion pipeline may hold at
    /// once (tables, descriptors, caches, buffers): per image, or per command with
    /// [`Limits::per_command`].
    pub max_metadata_bytes: u64,
    /// Bytes of any one table as stored (L1, grain directory, BAT, block map, ...): entries
    /// times entry size. Each format also applies qemu's own cap on its tables, which may be
    /// lower (qcow2's L1 and refcount tables, VDI's block count, ...).
    pub max_table_bytes: u64,
    /// Largest virtual size accepted at all (a sanity cap, not the policy's limit).
    pub max_virtual_size: u64,
    /// Decompressed bytes held in the guest reader's cache.
    pub max_cache_bytes: u64,
    /// Bytes all gzip-compressed OVA disks of one command may inflate to, together (spooled to
    /// a temporary file past a few MiB, so this bounds disk use and work, not memory).
    pub max_inflated_bytes: u64,
    /// The budget every [`Limits::budget`] call shares, when set ([`Limits::per_command`]).
    pub shared: Option<Budget>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // QEMU caps one qcow2 L1 table at 32 MiB and the refcount table at 8 MiB; a full
            // check also holds L2 and refcount blocks one at a time and at most 128 MiB of
            // refcount counters.
            max_metadata_bytes: DEFAULT_METADATA_BYTES,
            max_table_bytes: DEFAULT_TABLE_BYTES,
            // 2^63 - 1: sizes travel as i64 in qemu-img's JSON.
            max_virtual_size: i64::MAX as u64,
            max_cache_bytes: 64 << 20,
            // A bound on the temporary disk space and the time a gzip bomb can cost; far
            // above the compressed OVA disks seen in practice.
            max_inflated_bytes: 16 << 30,
            shared: None,
        }
    }
}

impl Limits {
    /// Tight limits for fuzzing: small tables, little memory.
    pub fn tight() -> Self {
        Limits {
            max_metadata_bytes: 16 << 20,
            // 64 Ki eight-byte entries.
            max_table_bytes: 512 << 10,
            max_virtual_size: 1 << 40,
            max_cache_bytes: 4 << 20,
            max_inflated_bytes: 64 << 20,
            shared: None,
        }
    }

    /// These limits with one budget of `max_metadata_bytes` shared by every
    /// [`Limits::budget`] call, and by every clone: one per command.
    #[must_use]
    pub fn per_command(mut self) -> Self {
        self.shared = Some(Budget::new(self.max_metadata_bytes));
        self
    }

    /// The command's shared budget when there is one, else a fresh budget counting down from
    /// `max_metadata_bytes`.
    pub fn budget(&self) -> Budget {
        match &self.shared {
            Some(b) => b.clone(),
            None => Budget::new(self.max_metadata_bytes),
        }
    }

    /// The bytes of a table of `entries` entries of `entry_size` bytes, when they fit
    /// `max_table_bytes`. Writers ask this of `Limits::default()` so that glimpse reads back
    /// what they write.
    pub fn table_bytes(&self, entries: u64, entry_size: u64) -> Option<u64> {
        entries
            .checked_mul(entry_size)
            .filter(|&b| b <= self.max_table_bytes)
    }
}

/// A countdown of metadata bytes: a handle, cheap to clone; clones share the count. `Sync`.
#[derive(Debug, Clone)]
pub struct Budget {
    left: Arc<AtomicU64>,
    /// How many charges it refused, ever ([`Budget::refusals`]).
    refused: Arc<AtomicU64>,
}

/// Budgets are equal when they are the same count.
impl PartialEq for Budget {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.left, &other.left)
    }
}
impl Eq for Budget {}

impl Budget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        Budget {
            left: Arc::new(AtomicU64::new(bytes)),
            refused: Arc::new(AtomicU64::new(0)),
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
                let _ = self
                    .refused
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                        Some(n.saturating_add(1))
                    });
                Error::limit(format!(
                    "{what}: metadata budget exhausted ({bytes} bytes asked)"
                ))
            })
    }

    /// Charges `bytes` and returns a [`Charge`] that gives them back when dropped: the one
    /// way to hold budget for as long as a buffer lives.
    ///
    /// # Errors
    /// As [`Budget::take`].
    pub fn charge(&self, bytes: u64, what: &str) -> Result<Charge> {
        self.take(bytes, what)?;
        Ok(Charge {
            budget: self.clone(),
            bytes,
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

    /// How many charges this budget (any clone of it) has refused so far. A caller that runs
    /// several images under one budget sees from it whether a refusal happened while one of
    /// them was checked: its result may then depend on what the others held (`glimpse check`
    /// checks such an image again alone).
    pub fn refusals(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Bytes held from a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Budget,
    bytes: u64,
}

impl Charge {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Charges `bytes` more to the same budget, held as long as this charge.
    ///
    /// # Errors
    /// As [`Budget::take`].
    pub fn grow(&mut self, bytes: u64, what: &str) -> Result<()> {
        self.budget.take(bytes, what)?;
        self.bytes = self.bytes.saturating_add(bytes);
        Ok(())
    }
}

impl Charge {
    /// Makes room in `v` for `more` elements, charging this charge for the capacity it adds
    /// before the allocation is made: a list that grows by pushes is then charged for what it
    /// holds in memory (its capacity), never only for its length. The capacity roughly
    /// doubles, as `Vec` would grow it, but never past what the budget has left; when even
    /// `more` elements do not fit, nothing is allocated.
    ///
    /// # Errors
    /// `LimitExceeded` naming `what` when the budget cannot hold the room, or the allocator
    /// refuses it.
    pub fn reserve<T>(&mut self, v: &mut Vec<T>, more: usize, what: &str) -> Result<()> {
        let cap = v.capacity();
        let need = v
            .len()
            .checked_add(more)
            .ok_or_else(|| Error::limit(format!("{what}: too many entries")))?;
        if need <= cap {
            return Ok(());
        }
        let size = std::mem::size_of::<T>().max(1);
        // Elements the budget can still pay for, on top of the capacity already charged.
        let room = usize::try_from(self.budget.left().checked_div(size as u64).unwrap_or(0))
            .unwrap_or(usize::MAX);
        let new_cap = cap
            .saturating_mul(2)
            .max(16)
            .min(cap.saturating_add(room))
            .max(need);
        let added = new_cap.saturating_sub(cap);
        let bytes = (added as u64).saturating_mul(size as u64);
        self.grow(bytes, what)?;
        if v.try_reserve_exact(new_cap.saturating_sub(v.len()))
            .is_err()
        {
            self.budget.give_back(bytes);
            self.bytes = self.bytes.saturating_sub(bytes);
            return Err(Error::limit(format!(
                "{what}: cannot allocate {bytes} bytes"
            )));
        }
        // An allocator may round a request up: what it gave beyond is charged too, or given
        // back if the budget cannot take it (the memory is there either way).
        let extra = (v.capacity().saturating_sub(new_cap) as u64).saturating_mul(size as u64);
        if extra > 0 {
            self.grow(extra, what)?;
        }
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_per_command_budget_is_shared_and_charges_come_back() {
        let limits = Limits {
            max_metadata_bytes: 100,
            ..Limits::default()
        }
        .per_command();
        let copy = limits.clone();
        let c = limits.budget().charge(60, "a").unwrap();
        assert_eq!(copy.budget().left(), 40);
        assert_eq!(copy.budget().refusals(), 0);
        assert!(copy.budget().charge(41, "b").is_err());
        assert_eq!(limits.budget().refusals(), 1);
        let mut g = limits.budget().charge(0, "d").unwrap();
        g.grow(30, "d").unwrap();
        assert!(g.grow(11, "d").is_err());
        assert_eq!((g.bytes(), copy.budget().left()), (30, 10));
        drop(c);
        drop(g);
        assert_eq!(limits.budget().left(), 100);
        // Room in a list is charged for its capacity before it is allocated, and never past
        // what the budget has left.
        let mut h = limits.budget().charge(0, "e").unwrap();
        let mut v: Vec<u32> = Vec::new();
        h.reserve(&mut v, 1, "e").unwrap();
        assert_eq!((v.capacity(), h.bytes()), (16, 64));
        v.resize(16, 0);
        h.reserve(&mut v, 1, "e").unwrap();
        // Doubling to 32 would take 128 bytes; 100 - 64 leaves room for 9 more.
        assert_eq!((v.capacity(), h.bytes()), (25, 100));
        v.resize(25, 0);
        assert!(h.reserve(&mut v, 1, "e").is_err());
        assert_eq!(v.capacity(), 25);
        drop(h);
        assert_eq!(limits.budget().left(), 100);
        // Without per_command every call is a fresh budget.
        let fresh = Limits::default();
        fresh.budget().take(10, "c").unwrap();
        assert_eq!(fresh.budget().left(), DEFAULT_METADATA_BYTES);
    }
}
