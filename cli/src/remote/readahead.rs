//! Front-to-back reading of a whole object with several range requests in flight.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use glimpse_formats::limits::Charge;

use super::HttpSource;

/// Bytes per request.
const CHUNK: u64 = 4 << 20;
/// Requests in flight (one thread each); each holds at most two chunks (one being fetched, one
/// queued), and the reader one more, so memory stays under `(2 * LANES + 1) * CHUNK` (36 MiB),
/// charged to the command's budget (one lane, uncharged, when the budget cannot pay).
const LANES: u64 = 4;

/// The bytes `lanes` lanes and the reader hold at most.
fn held(lanes: u64) -> u64 {
    lanes
        .saturating_mul(2)
        .saturating_add(1)
        .saturating_mul(CHUNK)
}

/// Reads `[0, size)` of a source that answers ranges: lane `i` fetches chunks `i`,
/// `i + LANES`, ... and the reader takes them in order.
pub struct Readahead {
    lanes: Vec<Receiver<io::Result<Vec<u8>>>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    next: u64,
    chunks: u64,
    cur: Vec<u8>,
    pos: usize,
    _charge: Option<Charge>,
}

impl Readahead {
    /// Starts the lanes.
    pub fn new(src: HttpSource, size: u64) -> Self {
        let chunks = size.div_ceil(CHUNK);
        let budget = crate::common::limits().budget();
        let (lane_count, charge) =
            match budget.charge(held(LANES.min(chunks)), "the HTTP readahead") {
                Ok(c) => (LANES, Some(c)),
                Err(_) => (1, budget.charge(held(1), "the HTTP readahead").ok()),
            };
        let stop = Arc::new(AtomicBool::new(false));
        let mut lanes = Vec::new();
        let mut threads = Vec::new();
        for lane in 0..lane_count.min(chunks) {
            let (tx, rx) = sync_channel(1);
            let src = src.clone();
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut c = lane;
                while c < chunks && !stop.load(Ordering::Relaxed) {
                    let start = c * CHUNK;
                    let len = (size - start).min(CHUNK);
                    let r = usize::try_from(len)
                        .map_err(io::Error::other)
                        .and_then(|len| src.inner.fetch_after_cached(len, start));
                    let failed = r.is_err();
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                    c = c.saturating_add(lane_count);
                }
            }));
            lanes.push(rx);
        }
        Readahead {
            lanes,
            threads,
            stop,
            next: 0,
            chunks,
            cur: Vec::new(),
            pos: 0,
            _charge: charge,
        }
    }
}

impl Read for Readahead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.cur.len() {
            if self.next >= self.chunks {
                return Ok(0);
            }
            // chunk c is lane c % lanes: each lane steps by the number of lanes
            let lanes = self.lanes.len() as u64;
            let lane = usize::try_from(self.next.checked_rem(lanes).unwrap_or(0)).unwrap_or(0);
            let rx = self
                .lanes
                .get(lane)
                .ok_or_else(|| io::Error::other("readahead lane missing"))?;
            let chunk = rx
                .recv()
                .map_err(|_| io::Error::other("a readahead lane stopped"))??;
            self.cur = chunk;
            self.pos = 0;
            self.next += 1;
        }
        let src = self.cur.get(self.pos..).unwrap_or_default();
        let n = src.len().min(buf.len());
        if let (Some(d), Some(s)) = (buf.get_mut(..n), src.get(..n)) {
            d.copy_from_slice(s);
        }
        self.pos += n;
        Ok(n)
    }
}

impl Drop for Readahead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Dropping the receivers unblocks lanes waiting to send.
        self.lanes.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
