//! The page cache of an [`super::HttpSource`] and the read streams that size its requests.
//!
//! A miss fetches the pages a read asks for, rounded out to [`PAGE`]; only a read that
//! continues one a reader made before (a stream, [`Streams`]) also fetches ahead, in windows
//! that double up to [`WINDOW_MAX`]. Fixed 256 KiB blocks made every read of a random-order
//! image (a qcow2 whose clusters a guest wrote in random order) fetch a whole block, 4.5 times
//! the file for 16 KiB clusters (report remote-hostile F2).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

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

/// Pages, least recently used evicted first, at most `max` of them. O(log n) per operation
/// (a cache of 32 MiB holds 8,192 pages).
pub struct Pages {
    inner: Mutex<Inner>,
    max: usize,
}

struct Inner {
    /// Page number -> (bytes, last use).
    map: HashMap<u64, (Arc<[u8]>, u64)>,
    /// Last use -> page number.
    order: BTreeMap<u64, u64>,
    tick: u64,
}

impl Pages {
    /// A cache of at most `max` pages (at least one).
    pub fn new(max: usize) -> Self {
        Pages {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
            }),
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::io::Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| std::io::Error::other("cache poisoned"))
    }

    /// Page `p`, now the most recently used.
    ///
    /// # Errors
    /// Another thread panicked holding the cache.
    pub fn get(&self, p: u64) -> std::io::Result<Option<Arc<[u8]>>> {
        let mut c = self.lock()?;
        let c = &mut *c;
        c.tick = c.tick.wrapping_add(1);
        let tick = c.tick;
        let Some((v, used)) = c.map.get_mut(&p) else {
            return Ok(None);
        };
        c.order.remove(used);
        *used = tick;
        c.order.insert(tick, p);
        Ok(Some(v.clone()))
    }

    /// True when page `p` is held (its use is not refreshed).
    pub fn has(&self, p: u64) -> bool {
        self.lock().is_ok_and(|c| c.map.contains_key(&p))
    }

    /// Keeps `v` as page `p`, evicting the least recently used pages to make room.
    ///
    /// # Errors
    /// As [`Pages::get`].
    pub fn put(&self, p: u64, v: Arc<[u8]>) -> std::io::Result<()> {
        let mut c = self.lock()?;
        let c = &mut *c;
        c.tick = c.tick.wrapping_add(1);
        let tick = c.tick;
        if let Some((_, used)) = c.map.insert(p, (v, tick)) {
            c.order.remove(&used);
        }
        c.order.insert(tick, p);
        while c.map.len() > self.max {
            let Some((_, old)) = c.order.pop_first() else {
                break;
            };
            c.map.remove(&old);
        }
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
        let v = |b: u8| -> Arc<[u8]> { Arc::from(vec![b; 4]) };
        c.put(1, v(1)).unwrap();
        c.put(2, v(2)).unwrap();
        assert!(c.get(1).unwrap().is_some());
        c.put(3, v(3)).unwrap();
        assert!(c.has(1) && c.has(3) && !c.has(2));
        c.put(1, v(9)).unwrap();
        assert_eq!(&*c.get(1).unwrap().unwrap(), &[9; 4]);
        c.put(4, v(4)).unwrap();
        assert!(c.has(1) && c.has(4) && !c.has(3));
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
