//! The parallel streaming pipeline.
//!
//! 1. Walk the source's extents in guest order and cut them into the writer's chunks. A chunk
//!    that only covers zero or unallocated extents becomes [`Payload::Zero`] without a read.
//! 2. Batches of chunks go to rayon workers that read guest data (positional reads on the
//!    shared source), detect all-zero chunks and compress where the writer asks.
//! 3. One writer thread lays the chunks down in order.
//!
//! At most two batches are in flight (one being prepared, one being written), so memory stays
//! bounded by about `2 × batch_bytes` whatever the image size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use glimpse_formats::image::Image;
use glimpse_formats::reader::GuestReader;
use rayon::prelude::*;

use crate::{Chunk, Compressor, Error, Payload, Result, Writer};

/// Pipeline settings.
pub struct ConvertOptions<'a> {
    /// Guest bytes per batch handed to the workers.
    pub batch_bytes: u64,
    /// Called from the writer thread after each batch with (bytes done, total bytes).
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    /// Set to true (from a signal handler, say) to stop early with an error.
    pub cancel: Option<&'a AtomicBool>,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions { batch_bytes: 32 << 20, progress: None, cancel: None }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Guest bytes covered.
    pub guest_bytes: u64,
    /// Guest bytes that were read from the source.
    pub read_bytes: u64,
    /// Chunks that were all zero (skipped by the writer).
    pub zero_chunks: u64,
    /// Chunks passed as data or compressed.
    pub data_chunks: u64,
}

/// A chunk to prepare: its range, and whether any of it needs reading.
#[derive(Debug, Clone, Copy)]
struct Plan {
    guest: u64,
    len: u64,
    read: bool,
}

/// Walks the mapping and yields chunk plans in order. Each extent is looked up once.
struct Planner<'a> {
    image: &'a dyn Image,
    chunk: u64,
    pos: u64,
    size: u64,
    /// The current extent's end and whether it reads as zero.
    cur: Option<(u64, bool)>,
}

impl Planner<'_> {
    fn next(&mut self) -> Option<Result<Plan>> {
        if self.pos >= self.size {
            return None;
        }
        let start = self.pos;
        let end = (start / self.chunk).saturating_add(1).saturating_mul(self.chunk).min(self.size);
        let mut read = false;
        let mut p = start;
        while p < end {
            let (ext_end, zero) = match self.cur {
                Some((e, z)) if e > p => (e, z),
                _ => {
                    // Ask for a long run so that one lookup covers many chunks.
                    match self.image.mapping(p, self.size - p) {
                        Ok(e) => {
                            if let Err(err) = glimpse_formats::validate_extent(&e, p, self.size - p, self.size) {
                                return Some(Err(err));
                            }
                            self.cur = Some((e.end(), e.reads_as_zero()));
                            (e.end(), e.reads_as_zero())
                        }
                        Err(err) => return Some(Err(err)),
                    }
                }
            };
            read |= !zero;
            p = ext_end.min(end);
        }
        self.pos = end;
        Some(Ok(Plan { guest: start, len: end - start, read }))
    }
}

fn prepare(reader: &GuestReader, plan: Plan, comp: Option<Compressor>) -> Result<Chunk> {
    if !plan.read {
        return Ok(Chunk { guest: plan.guest, len: plan.len, payload: Payload::Zero });
    }
    let n = usize::try_from(plan.len).map_err(|_| Error::limit("chunk too large"))?;
    let mut buf = vec![0u8; n];
    reader.read_at(&mut buf, plan.guest)?;
    if is_zero(&buf) {
        return Ok(Chunk { guest: plan.guest, len: plan.len, payload: Payload::Zero });
    }
    let payload = match comp {
        None => Payload::Data(buf),
        Some(c) => {
            let z = crate::codec::compress(c.codec, c.level, &buf)?;
            if c.always || z.len() < c.max_len {
                Payload::Compressed(z)
            } else {
                Payload::Data(buf)
            }
        }
    };
    Ok(Chunk { guest: plan.guest, len: plan.len, payload })
}

/// True when every byte is zero. Compares 16-byte words for speed.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut words = buf.chunks_exact(16);
    let rem = words.remainder();
    words.all(|w| u128::from_ne_bytes(w.try_into().unwrap_or([1; 16])) == 0) && rem.iter().all(|&b| b == 0)
}

/// Converts `image` into `writer`.
///
/// # Errors
/// Any read, decompression or write error, or `Invalid` when cancelled.
pub fn convert(image: Arc<dyn Image>, writer: Box<dyn Writer>, reader: &GuestReader, opts: &ConvertOptions<'_>) -> Result<Stats> {
    let size = image.info().virtual_size;
    let chunk = writer.chunk_size().max(512);
    let comp = writer.compressor();
    let per_batch = usize::try_from((opts.batch_bytes / chunk).max(rayon::current_num_threads() as u64 * 2))
        .unwrap_or(64);
    let mut planner = Planner { image: image.as_ref(), chunk, pos: 0, size, cur: None };
    let (tx, rx) = sync_channel::<Vec<Chunk>>(1);
    let mut stats = Stats { guest_bytes: size, ..Stats::default() };

    std::thread::scope(|s| -> Result<()> {
        let progress = opts.progress;
        let writer_thread = s.spawn(move || -> Result<()> {
            let mut w = writer;
            let mut done = 0u64;
            for batch in rx {
                for c in batch {
                    done = done.saturating_add(c.len);
                    w.write_chunk(c)?;
                }
                if let Some(p) = progress {
                    p(done, size);
                }
            }
            w.finish()
        });

        let mut produce = || -> Result<()> {
            loop {
                if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err(Error::invalid("conversion cancelled"));
                }
                let mut plans = Vec::with_capacity(per_batch);
                while plans.len() < per_batch {
                    match planner.next() {
                        None => break,
                        Some(p) => plans.push(p?),
                    }
                }
                if plans.is_empty() {
                    return Ok(());
                }
                stats.read_bytes += plans.iter().filter(|p| p.read).map(|p| p.len).sum::<u64>();
                let chunks: Vec<Chunk> =
                    plans.into_par_iter().map(|p| prepare(reader, p, comp)).collect::<Result<_>>()?;
                for c in &chunks {
                    if c.payload == Payload::Zero {
                        stats.zero_chunks += 1;
                    } else {
                        stats.data_chunks += 1;
                    }
                }
                if tx.send(chunks).is_err() {
                    // The writer stopped: its error is reported below.
                    return Ok(());
                }
            }
        };
        let produced = produce();
        drop(tx);
        let written = writer_thread.join().map_err(|_| Error::invalid("writer thread panicked"))?;
        produced?;
        written
    })?;
    Ok(stats)
}
