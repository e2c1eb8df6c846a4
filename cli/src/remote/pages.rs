//! The page cache of an [`super::HttpSource`] and the read streams that size its requests.
//!
//! A miss fetches the pages a read asks for, rounded out to [`PAGE`]; only a read that
//! continues one a reader made before (a stream, [`Streams`]) also fetches ahead, in windows
//! that double up to [`WINDOW_MAX`]. Fixed 256 KiB blocks made every read of a random-order
//! image (a qcow2 whose clusters a guest wrote in random order) fetch a whole block, 4.5 times
//! the file for 16 KiB clusters (report remote-hostile F2).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Bytes per cached page: what a miss outside a stream is rounded to.
pub const PAGE: u64 = 4 << 10;
/// The first window a stream fetches ahead; each later miss of the stream doubles it.
pub const WINDOW_MIN: u64 = 1 << 20;
/// The largest window (one request).
pub const WINDOW_MAX: u64 = 4 << 20;
/// The longest forward skip a stream may make between two reads (a walk over a
/// streamOptimized VMDK's grain markers, which skips each grain's data): a stream fetches
/// ahead across skips only after its second one, so that two random reads that happen to
/// lie close together do not start fetching windows.
const HOP_MAX: u64 = 256 << 10;
/// Read streams remembered per source (readers running front to back at once: convert's
/// workers, a checker and its grain walk).
const STREAMS: usize = 8;

/// Pages, least recently used evicted first, at most `max` of them, held in slots of 1 MiB
/// buffers allocated as the cache fills and kept until it is dropped. O(log n) per operation
/// (a cache of 32 MiB holds 8,192 pages).
///
/// A few large buffers, not one allocation per page: pages allocated by one thread and evicted
/// by another landed in and left holes in the allocator's per-thread arenas, so that a source's
/// 32 MiB cache held 60 MiB and more of RSS, and `compare URL URL` of two 160 MiB
/// streamOptimized VMDKs peaked at 272-288 MB, past the 256 MiB ceiling (remote-hostile F5).
pub struct Pages {
    inner: Mutex<Inner>,
    max: usize,
}

struct Inner {
    /// Slots of [`PAGE`] bytes, [`SEGMENT`] slots to a buffer, allocated as the slots are
    /// first used (a zeroed allocation of all of them at once was written through to zero it
    /// on a thread's arena: 32 MiB resident for `info`).
    slab: Vec<Box<[u8]>>,
    /// Page number -> (slot, bytes held, last use).
    map: HashMap<u64, (usize, usize, u64)>,
    /// Last use -> page number.
    order: BTreeMap<u64, u64>,
    /// Slots never used yet or given back.
    free: Vec<usize>,
    tick: u64,
}

const PAGE_BYTES: usize = PAGE as usize;
/// Slots per slab buffer (1 MiB).
const SEGMENT: usize = 256;

impl Inner {
    /// Slot `slot`'s bytes, allocating its buffer (and those before it) on first use.
    fn slot(&mut self, slot: usize) -> std::io::Result<&mut [u8; PAGE_BYTES]> {
        let seg = slot / SEGMENT;
        while self.slab.len() <= seg {
            self.slab
                .push(vec![0; SEGMENT.saturating_mul(PAGE_BYTES)].into_boxed_slice());
        }
        let at = (slot % SEGMENT).saturating_mul(PAGE_BYTES);
        self.slab
            .get_mut(seg)
            .and_then(|b| b.get_mut(at..at.saturating_add(PAGE_BYTES)))
            .and_then(|b| <&mut [u8; PAGE_BYTES]>::try_from(b).ok())
            .ok_or_else(|| std::io::Error::other("a page outside the cache"))
    }
}

impl Pages {
    /// A cache of at most `max` pages (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Pages {
            inner: Mutex::new(Inner {
                slab: Vec::new(),
                map: HashMap::new(),
                order: BTreeMap::new(),
                free: (0..max).rev().collect(),
                tick: 0,
            }),
            max,
        }
    }

    fn lock(&self) -> std::io::Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| std::io::Error::other("cache poisoned"))
    }

    /// Runs `f` on page `p`, now the most recently used; `None` when it is not held.
    ///
    /// # Errors
    /// Another thread panicked holding the cache.
    pub fn with<R>(&self, p: u64, f: impl FnOnce(&[u8]) -> R) -> std::io::Result<Option<R>> {
        let mut c = self.lock()?;
        let c = &mut *c;
        c.tick = c.tick.wrapping_add(1);
        let tick = c.tick;
        let Some((slot, len, used)) = c.map.get_mut(&p) else {
            return Ok(None);
        };
        c.order.remove(used);
        *used = tick;
        c.order.insert(tick, p);
        let (slot, len) = (*slot, *len);
        let bytes = c
            .slot(slot)?
            .get(..len)
            .ok_or_else(|| std::io::Error::other("a page outside the cache"))?;
        Ok(Some(f(bytes)))
    }

    /// Page `p`'s bytes, copied (tests and the rare large read that verifies them).
    ///
    /// # Errors
    /// As [`Pages::with`].
    pub fn get(&self, p: u64) -> std::io::Result<Option<Vec<u8>>> {
        self.with(p, <[u8]>::to_vec)
    }

    /// True when page `p` is held (its use is not refreshed).
    pub fn has(&self, p: u64) -> bool {
        self.lock().is_ok_and(|c| c.map.contains_key(&p))
    }

    /// Keeps `v` (at most [`PAGE`] bytes) as page `p`, evicting the least recently used page
    /// when every slot is taken.
    ///
    /// # Errors
    /// As [`Pages::with`]; `v` is longer than a page.
    pub fn put(&self, p: u64, v: &[u8]) -> std::io::Result<()> {
        if v.len() > PAGE_BYTES {
            return Err(std::io::Error::other("a page longer than a page"));
        }
        let mut c = self.lock()?;
        let c = &mut *c;
        c.tick = c.tick.wrapping_add(1);
        let tick = c.tick;
        let slot = if let Some((slot, _, used)) = c.map.remove(&p) {
            c.order.remove(&used);
            slot
        } else if let Some(slot) = c.free.pop() {
            slot
        } else {
            let (_, old) = c
                .order
                .pop_first()
                .ok_or_else(|| std::io::Error::other("a full cache with no pages"))?;
            let (slot, _, _) = c
                .map
                .remove(&old)
                .ok_or_else(|| std::io::Error::other("a cached page went missing"))?;
            slot
        };
        let dst = c
            .slot(slot)?
            .get_mut(..v.len())
            .ok_or_else(|| std::io::Error::other("a page outside the cache"))?;
        dst.copy_from_slice(v);
        c.map.insert(p, (slot, v.len(), tick));
        c.order.insert(tick, p);
        debug_assert!(c.map.len() <= self.max);
        Ok(())
    }
}

/// One reader running front to back: where its last read ended, and how many misses it has
/// had (its next window is [`WINDOW_MIN`] doubled that many times).
#[derive(Clone, Copy)]
struct Stream {
    end: u64,
    misses: u32,
    /// Forward skips (of [`PAGE`] to [`HOP_MAX`] bytes) made so far.
    hops: u32,
    used: u64,
}

/// The streams of one source.
#[derive(Default)]
pub struct Streams {
    inner: Mutex<(Vec<Stream>, u64)>,
}

impl Streams {
    /// A read of `[offset, offset + len)`: the window to fetch ahead of a miss at `offset`
    /// when the read continues a stream (it starts where one ended, or within a page after),
    /// else 0 (and the read starts a stream of its own). `miss`: whether the read misses.
    pub fn read(&self, offset: u64, len: u64, miss: bool) -> u64 {
        let Ok(mut g) = self.inner.lock() else {
            return 0;
        };
        let (streams, tick) = &mut *g;
        *tick = tick.wrapping_add(1);
        let end = offset.saturating_add(len);
        let found = streams
            .iter_mut()
            .filter(|s| offset >= s.end && offset - s.end < HOP_MAX)
            .min_by_key(|s| offset - s.end);
        if let Some(s) = found {
            let hop = offset - s.end >= PAGE;
            let sure = !hop || s.hops > 0;
            if hop {
                s.hops = s.hops.saturating_add(1);
            }
            s.end = end;
            s.used = *tick;
            if !miss || !sure {
                return 0;
            }
            let window = WINDOW_MIN
                .checked_shl(s.misses.min(8))
                .unwrap_or(WINDOW_MAX)
                .min(WINDOW_MAX);
            s.misses = s.misses.saturating_add(1);
            return window;
        }
        let new = Stream {
            end,
            misses: 0,
            hops: 0,
            used: *tick,
        };
        if streams.len() < STREAMS {
            streams.push(new);
        } else if let Some(s) = streams.iter_mut().min_by_key(|s| s.used) {
            *s = new;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_evict_the_least_recently_used() {
        let c = Pages::new(2);
        c.put(1, &[1; 4]).unwrap();
        c.put(2, &[2; 4]).unwrap();
        assert!(c.get(1).unwrap().is_some());
        c.put(3, &[3; 4]).unwrap();
        assert!(c.has(1) && c.has(3) && !c.has(2));
        c.put(1, &[9; 4]).unwrap();
        assert_eq!(c.get(1).unwrap().unwrap(), [9; 4]);
        c.put(4, &[4; 4096]).unwrap();
        assert!(c.has(1) && c.has(4) && !c.has(3));
        assert_eq!(c.get(4).unwrap().unwrap(), [4; 4096]);
        assert_eq!(c.with(1, <[u8]>::len).unwrap(), Some(4));
        assert!(c.put(5, &[0; 4097]).is_err());
    }

    #[test]
    fn only_a_read_that_continues_another_fetches_ahead() {
        let s = Streams::default();
        // a random read: no window; reads that follow it: growing windows
        assert_eq!(s.read(1 << 30, 16 << 10, true), 0);
        let mut at = (1 << 30) + (16 << 10);
        let mut windows = Vec::new();
        for _ in 0..7 {
            windows.push(s.read(at, 64 << 10, true));
            at += 64 << 10;
        }
        assert_eq!(
            windows,
            [
                1 << 20,
                2 << 20,
                4 << 20,
                4 << 20,
                4 << 20,
                4 << 20,
                4 << 20
            ]
        );
        // a hit continues the stream without a window
        assert_eq!(s.read(at, 512, false), 0);
        assert_eq!(s.read(at + 512, 512, true), 4 << 20);
        // a walk that skips forward fetches ahead from its second skip on
        let t = Streams::default();
        assert_eq!(t.read(0, 512, true), 0);
        assert_eq!(t.read(64 << 10, 512, true), 0);
        assert_eq!(t.read(128 << 10, 512, true), 1 << 20);
        // a skip past HOP_MAX starts another stream
        assert_eq!(t.read(10 << 20, 512, true), 0);
        // reads anywhere else start streams of their own, and do not fetch ahead
        for i in 0..20u64 {
            assert_eq!(s.read(i * (100 << 20), 4096, true), 0);
        }
    }
}
