//! The least-recently-used cache behind the guest reader's decompressed units, qcow2's L2
//! tables and VMDK's grain tables: keyed by host offset, bounded by a cost (bytes) and by an
//! entry count, `Sync` through one mutex. The HTTP reader's page cache
//! (`cli/src/remote/pages.rs`) holds thousands of 4 KiB pages, too many for this linear scan,
//! and keeps an O(log n) LRU of its own.

use std::sync::Mutex;

use crate::error::{Error, Result};

/// A bounded LRU of `V` keyed by `K`. Lookups are linear: the caches hold tens to a few
/// thousand entries, and a scan of a `Vec` beats hashing at that size.
#[derive(Debug)]
pub struct Lru<K, V> {
    inner: Mutex<Inner<K, V>>,
    max_cost: u64,
    max_entries: usize,
}

#[derive(Debug)]
struct Inner<K, V> {
    /// Least recently used first.
    entries: Vec<(K, V, u64)>,
    cost: u64,
}

impl<K: PartialEq + Copy, V: Clone> Lru<K, V> {
    /// A cache holding at most `max_cost` in all and at most `max_entries` entries (at least
    /// one of each is always allowed).
    pub fn new(max_cost: u64, max_entries: usize) -> Self {
        Lru {
            inner: Mutex::new(Inner {
                entries: Vec::new(),
                cost: 0,
            }),
            max_cost,
            max_entries: max_entries.max(1),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner<K, V>>> {
        self.inner
            .lock()
            .map_err(|_| Error::corrupt("cache poisoned"))
    }

    /// The value at `key`, now the most recently used.
    ///
    /// # Errors
    /// `Corrupt` when another thread panicked holding the cache.
    pub fn get(&self, key: K) -> Result<Option<V>> {
        let mut c = self.lock()?;
        let Some(i) = c.entries.iter().position(|(k, _, _)| *k == key) else {
            return Ok(None);
        };
        let e = c.entries.remove(i);
        let v = e.1.clone();
        c.entries.push(e);
        Ok(Some(v))
    }

    /// Inserts `value` of `cost` at `key`, evicting the least recently used entries to make
    /// room. A value costing more than the whole cache is not kept.
    ///
    /// # Errors
    /// As [`Lru::get`].
    pub fn put(&self, key: K, value: V, cost: u64) -> Result<()> {
        if cost > self.max_cost {
            return Ok(());
        }
        let mut c = self.lock()?;
        if let Some(i) = c.entries.iter().position(|(k, _, _)| *k == key) {
            let (_, _, old) = c.entries.remove(i);
            c.cost = c.cost.saturating_sub(old);
        }
        while !c.entries.is_empty()
            && (c.cost.saturating_add(cost) > self.max_cost || c.entries.len() >= self.max_entries)
        {
            let (_, _, old) = c.entries.remove(0);
            c.cost = c.cost.saturating_sub(old);
        }
        c.cost = c.cost.saturating_add(cost);
        c.entries.push((key, value, cost));
        Ok(())
    }

    /// The value at `key`, loaded with `load` (outside the lock) and kept on a miss.
    ///
    /// # Errors
    /// Whatever `load` returns; as [`Lru::get`].
    pub fn get_or_load(
        &self,
        key: K,
        cost: impl FnOnce(&V) -> u64,
        load: impl FnOnce() -> Result<V>,
    ) -> Result<V> {
        if let Some(v) = self.get(key)? {
            return Ok(v);
        }
        let v = load()?;
        self.put(key, v.clone(), cost(&v))?;
        Ok(v)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().map(|c| c.entries.len()).unwrap_or(0)
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_by_cost_and_count() {
        let c: Lru<u64, u32> = Lru::new(10, 3);
        c.put(1, 1, 4).unwrap();
        c.put(2, 2, 4).unwrap();
        assert_eq!(c.get(1).unwrap(), Some(1)); // 2 is now the oldest
        c.put(3, 3, 4).unwrap(); // 12 > 10: evicts 2
        assert_eq!(c.get(2).unwrap(), None);
        assert_eq!((c.get(1).unwrap(), c.get(3).unwrap()), (Some(1), Some(3)));
        c.put(4, 4, 11).unwrap(); // larger than the cache: not kept
        assert_eq!(c.get(4).unwrap(), None);
        c.put(5, 5, 1).unwrap();
        c.put(6, 6, 1).unwrap(); // count cap 3: evicts 1
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(1).unwrap(), None);
        let v = c.get_or_load(7, |_| 1, || Ok(70)).unwrap();
        assert_eq!((v, c.get(7).unwrap()), (70, Some(70)));
    }
}
