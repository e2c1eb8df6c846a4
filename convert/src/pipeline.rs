//! The parallel streaming pipeline.
//!
//! 1. Walk the source's extents in guest order and cut them into the writer's chunks. A chunk
//!    that only covers zero or unallocated extents becomes [`Payload::Zero`] without a read,
//!    and the whole chunks of one zero extent become a single zero span that the writer lays
//!    down with [`Writer::write_zeros`] (a hole or untouched table entries), so the work is
//!    proportional to the extents, not to the virtual size.
//! 2. Batches of chunks go to rayon workers that read guest data (positional reads on the
//!    shared source), detect all-zero chunks and compress where the writer asks.
//! 3. One writer thread lays the chunks down in order.
//!
//! Where the source's data lies verbatim in a file and the writer stores chunks uncompressed
//! ([`Writer::accepts_copy`]), step 2 reads nothing into memory: the producing thread maps
//! each chunk to runs of the source file, probes them until a non-zero byte shows they are
//! not all zero, and sends a [`Payload::Copy`] that the writer copies file to file (see
//! [`crate::copy`]). No thread pool is involved then, so no worker spins waiting for work.
//! Chunks that need decompressing still go to the workers.
//!
//! At most three batches are alive at once (one being prepared, one queued, one being
//! written), so memory stays bounded by `3 × batch_bytes` whatever the image size. With a
//! [`ConvertOptions::budget`] (the command's, from `Limits::per_command`) those bytes are
//! charged to it for the whole conversion, so that metadata, the reader's cache and the
//! pipeline together stay within one number.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;

use glimpse_formats::image::Image;
use glimpse_formats::limits::{Budget, Charge};
use glimpse_formats::reader::{ChunkPlan, ChunkPlanner, GuestReader};
use rayon::prelude::*;

use crate::copy::{CopyFrom, CopyMode, Run, SourceFile};
use crate::{Chunk, Compressor, Error, Payload, Result, Writer};

/// Pipeline settings.
pub struct ConvertOptions<'a> {
    /// Guest bytes per batch handed to the workers.
    pub batch_bytes: u64,
    /// Called from the writer thread after each batch with (bytes done, total bytes).
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    /// Set to true (from a signal handler, say) to stop early with an error.
    pub cancel: Option<&'a AtomicBool>,
    /// The command's memory budget, charged with the batches' bytes while converting.
    pub budget: Option<Budget>,
    /// How data that lies verbatim in the source file reaches the output.
    pub copy: CopyMode,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            batch_bytes: 32 << 20,
            progress: None,
            cancel: None,
            budget: None,
            copy: CopyMode::default(),
        }
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
    /// Bytes copied file to file by the kernel (`copy_file_range`).
    pub kernel_copied: u64,
    /// Bytes copied file to file through a buffer (forced, or where the kernel refused).
    pub buffer_copied: u64,
    /// Bytes copied file to file into ext4 by two threads through buffers
    /// ([`CopyMode::Auto`]).
    pub paired_copied: u64,
}

/// The runs of the source file that hold the chunk `plan`, or `None` when part of it is
/// compressed (it must then be read and decompressed).
fn copy_runs(image: &dyn Image, plan: &ChunkPlan, base: u64) -> Result<Option<Vec<Run>>> {
    use glimpse_formats::image::ExtentKind;
    let end = plan.guest.saturating_add(plan.len);
    let mut runs: Vec<Run> = Vec::new();
    let mut pos = plan.guest;
    while pos < end {
        let e = image.content_mapping(pos, end - pos)?;
        let at = match e.kind {
            ExtentKind::Data { host } => Some(
                base.checked_add(host)
                    .ok_or_else(|| Error::corrupt("data extent past the largest offset"))?,
            ),
            ExtentKind::Zero | ExtentKind::Unallocated => None,
            ExtentKind::Compressed { .. } => return Ok(None),
        };
        let len = e.end().min(end).saturating_sub(pos);
        match runs.last_mut() {
            Some(last)
                if last.at.is_none() == at.is_none()
                    && last.at.map(|a| a.saturating_add(last.len)) == at =>
            {
                last.len += len;
            }
            _ => runs.push(Run { at, len }),
        }
        pos = e.end();
    }
    Ok(Some(runs))
}

/// Prepares `plan` as a file-to-file copy (or zeros) when its bytes lie verbatim in `src`;
/// `None` when they must be read.
fn prepare_copy(src: &Arc<SourceFile>, plan: &ChunkPlan, runs: Vec<Run>) -> Result<Chunk> {
    let copy = CopyFrom {
        src: src.clone(),
        runs,
    };
    let zero = copy
        .is_zero()
        .map_err(|e| Error::from(e).context(format!("reading guest offset {:#x}", plan.guest)))?;
    Ok(Chunk {
        guest: plan.guest,
        len: plan.len,
        payload: if zero {
            Payload::Zero
        } else {
            Payload::Copy(copy)
        },
    })
}

/// The source runs of each chunk of a batch (`None` for a chunk that must be read, an empty
/// list for a zero span), and whether every range they name was in the page cache. The ranges
/// are announced to the kernel (`POSIX_FADV_WILLNEED`) here, a batch before they are probed
/// and copied, so that from a cold cache they arrive in a few large reads while the previous
/// batch is being probed, instead of one small read per chunk.
fn map_batch(
    image: &dyn Image,
    src: &SourceFile,
    base: u64,
    plans: &[ChunkPlan],
) -> Result<(Vec<Option<Vec<Run>>>, bool)> {
    let runs: Vec<Option<Vec<Run>>> = plans
        .iter()
        .map(|p| match p.read {
            true => copy_runs(image, p, base),
            false => Ok(Some(Vec::new())),
        })
        .collect::<Result<_>>()?;
    let mut ahead: Option<(u64, u64)> = None;
    let mut cached = true;
    for r in runs.iter().flatten().flatten() {
        let Some(at) = r.at else { continue };
        match &mut ahead {
            Some((from, len)) if from.saturating_add(*len) == at => *len += r.len,
            _ => {
                if let Some((from, len)) = ahead.replace((at, r.len)) {
                    cached &= src.will_need(from, len);
                }
            }
        }
    }
    if let Some((from, len)) = ahead {
        cached &= src.will_need(from, len);
    }
    Ok((runs, cached))
}

/// The chunks of one batch that can be copied (or are zeros), with `None` for those that must
/// be read.
fn prepare_copies(
    src: &Arc<SourceFile>,
    plans: &[ChunkPlan],
    runs: Vec<Option<Vec<Run>>>,
) -> Result<Vec<Option<Chunk>>> {
    plans
        .iter()
        .zip(runs)
        .map(|(p, runs)| match runs {
            Some(_) if !p.read => Ok(Some(Chunk {
                guest: p.guest,
                len: p.len,
                payload: Payload::Zero,
            })),
            Some(runs) => prepare_copy(src, p, runs).map(Some),
            None => Ok(None),
        })
        .collect()
}

/// The source file for copies, when `image`'s data lies verbatim in one and the writer takes
/// copies: a duplicate descriptor and the offset of the source's byte 0 in it.
fn copy_source(
    image: &dyn Image,
    writer: &dyn Writer,
    comp: Option<Compressor>,
    mode: CopyMode,
) -> Option<(Arc<SourceFile>, u64)> {
    if mode == CopyMode::Off || comp.is_some() || !writer.accepts_copy() {
        return None;
    }
    let (file, base) = image.source().backing_file()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let file = file.try_clone().ok()?;
    Some((Arc::new(SourceFile::new(file, mode)), base))
}

/// The plans of one batch and, when the source allows copies, their source runs.
struct Batch {
    plans: Vec<ChunkPlan>,
    runs: Option<Vec<Option<Vec<Run>>>>,
    /// Every source range of the copies was in the page cache when the batch was mapped
    /// (false without copies).
    cached: bool,
}

/// Plans the next batch of at most `per_batch` chunks (empty at the end) and maps it to source
/// runs when copies are possible.
fn next_batch(
    planner: &mut ChunkPlanner<'_>,
    per_batch: usize,
    image: &dyn Image,
    copy: Option<&(Arc<SourceFile>, u64)>,
) -> Result<Batch> {
    let mut plans = Vec::with_capacity(per_batch);
    while plans.len() < per_batch {
        match planner.next() {
            None => break,
            Some(p) => plans.push(p?),
        }
    }
    let (runs, cached) = match copy {
        Some((src, base)) => {
            let (runs, cached) = map_batch(image, src, *base, &plans)?;
            (Some(runs), cached)
        }
        None => (None, false),
    };
    Ok(Batch {
        plans,
        runs,
        cached,
    })
}

/// Prepares one batch: copies (or zeros) on this thread where the source allows, the rest
/// (reads, decompression, compression) on the workers. The pool is not entered when nothing
/// needs it.
fn prepare_batch(
    reader: &GuestReader,
    batch: Batch,
    comp: Option<Compressor>,
    copy: Option<&(Arc<SourceFile>, u64)>,
) -> Result<Vec<Chunk>> {
    let Batch { plans, runs, .. } = batch;
    let pre: Vec<Option<Chunk>> = match (copy, runs) {
        (Some((src, _)), Some(runs)) => prepare_copies(src, &plans, runs)?,
        _ => vec![None; plans.len()],
    };
    if pre.iter().all(Option::is_some) {
        return Ok(pre.into_iter().flatten().collect());
    }
    plans
        .into_par_iter()
        .zip(pre)
        .map(|(p, c)| match c {
            Some(c) => Ok(c),
            None => prepare(reader, p, comp),
        })
        .collect()
}

fn prepare(reader: &GuestReader, plan: ChunkPlan, comp: Option<Compressor>) -> Result<Chunk> {
    if !plan.read {
        return Ok(Chunk {
            guest: plan.guest,
            len: plan.len,
            payload: Payload::Zero,
        });
    }
    let n = usize::try_from(plan.len).map_err(|_| Error::limit("chunk too large"))?;
    let mut buf = vec![0u8; n];
    reader.read_at(&mut buf, plan.guest)?;
    if is_zero(&buf) {
        return Ok(Chunk {
            guest: plan.guest,
            len: plan.len,
            payload: Payload::Zero,
        });
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
    Ok(Chunk {
        guest: plan.guest,
        len: plan.len,
        payload,
    })
}

pub use glimpse_formats::io::is_zero;

/// The calling thread's scheduling policy while it produces: `SCHED_BATCH` while the batches
/// it probes are in the page cache ([`BatchPolicy::set`]), the normal policy (`SCHED_OTHER`)
/// otherwise and again when dropped. Nothing changes for a thread that was not under the
/// normal policy (real-time, idle), or where the kernel refuses.
///
/// A `SCHED_BATCH` thread keeps its share of the CPU, but its wakeups do not preempt the
/// running thread. With copies from the page cache the producer only plans and probes, and the
/// two copy threads need both cores. Woken because the writer took a batch, the producer used
/// to take a copy thread's core at once. When that thread held the output's lock, the other
/// one stopped spinning for it and slept, and its core went idle (182 times in a 4 GiB
/// conversion). 4 GiB raw -> qcow2 in the page cache, side by side: 450-461 ms under the
/// normal policy, 434-436 ms under this (12 and 10 runs); 1 GiB the same within 2 ms.
///
/// From a cold cache the producer drives the reads: it must run as soon as its data arrives.
/// Under `SCHED_BATCH` there, 4 GiB qcow2 -> raw took 1.93 s instead of 1.49 s.
struct BatchPolicy {
    /// The thread ran under the normal policy when this was made.
    normal: bool,
    /// The thread is under `SCHED_BATCH` now.
    batch: bool,
}

impl BatchPolicy {
    fn new() -> Self {
        // SAFETY: `sched_getscheduler(0)` asks about the calling thread.
        let normal = unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER;
        BatchPolicy {
            normal,
            batch: false,
        }
    }

    /// Puts the thread under `SCHED_BATCH` when `batch`, else under the normal policy.
    fn set(&mut self, batch: bool) {
        if !self.normal || batch == self.batch {
            return;
        }
        if batch {
            // The global thread pool is made first: threads it starts would inherit the
            // policy.
            rayon::current_num_threads();
        }
        let policy = if batch {
            libc::SCHED_BATCH
        } else {
            libc::SCHED_OTHER
        };
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler(0, ..)` acts on the calling thread; `param` is a live
        // sched_param that the kernel only reads. Moving between the two normal policies
        // needs no privilege.
        if unsafe { libc::sched_setscheduler(0, policy, &param) } == 0 {
            self.batch = batch;
        }
    }
}

impl Drop for BatchPolicy {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Guest bytes of the first batch; each next one is twice as large, up to the full batch.
const FIRST_BATCH_BYTES: u64 = 1 << 20;

/// What the batches leave of the budget to the source's caches, which charge as the walk
/// reads them (qcow2: up to 16 MiB of L2 tables and their lists of runs). Without it, a writer
/// whose table takes 128 MiB (docs/memory.md) would leave the batches all the rest, and the
/// source's first table read past them would fail.
const SOURCE_HEADROOM: u64 = 32 << 20;

/// Charges the three batches that can be alive at once to `budget`, when there is one, with
/// fewer chunks per batch when the budget has less left than the full batches and
/// [`SOURCE_HEADROOM`] (at least one chunk per batch). Returns the charge and the chunks per
/// batch.
fn charge_batches(
    budget: Option<&Budget>,
    per_batch: usize,
    chunk: u64,
) -> Result<(Option<Charge>, usize)> {
    let Some(b) = budget else {
        return Ok((None, per_batch));
    };
    let fit = b.left().saturating_sub(SOURCE_HEADROOM) / chunk.saturating_mul(3).max(1);
    let n = per_batch
        .min(usize::try_from(fit).unwrap_or(usize::MAX))
        .max(1);
    let bytes = (n as u64).saturating_mul(chunk).saturating_mul(3);
    Ok((Some(b.charge(bytes, "conversion buffers")?), n))
}

/// An I/O error of a writer (created or writing) is about the output (a full disk,
/// `ulimit -f`, a quota): it says "cannot write" and carries `output.write`, so that the
/// caller names the output, not the input. (`From<io::Error>` would call it "cannot read".)
/// Other errors are returned as they are.
pub fn output_side(e: Error) -> Error {
    match (e.kind(), e.io_error()) {
        (glimpse_formats::ErrorKind::Io, Some(io)) => {
            let os = match io.raw_os_error() {
                Some(n) => std::io::Error::from_raw_os_error(n),
                None => std::io::Error::new(io.kind(), io.to_string()),
            };
            Error::io(os, "cannot write").code("output.write")
        }
        _ => e,
    }
}

/// Converts `image` into `writer`.
///
/// # Errors
/// Any read, decompression or write error, or `Invalid` when cancelled.
pub fn convert(
    image: Arc<dyn Image>,
    writer: Box<dyn Writer>,
    reader: &GuestReader,
    opts: &ConvertOptions<'_>,
) -> Result<Stats> {
    let size = image.info().virtual_size;
    let chunk = writer.chunk_size().max(512);
    let comp = writer.compressor();
    // Whole chunks up to `batch_bytes`, however many threads there are: the memory bound must
    // hold on a 64-core machine too.
    let per_batch = usize::try_from((opts.batch_bytes / chunk).max(1)).unwrap_or(64);
    let (_held, per_batch) = charge_batches(opts.budget.as_ref(), per_batch, chunk)?;
    let copy = copy_source(image.as_ref(), writer.as_ref(), comp, opts.copy);
    let mut planner = ChunkPlanner::new(image.as_ref(), chunk);
    let (tx, rx) = sync_channel::<Vec<Chunk>>(1);
    let mut stats = Stats {
        guest_bytes: size,
        ..Stats::default()
    };

    std::thread::scope(|s| -> Result<()> {
        let progress = opts.progress;
        let writer_thread = s.spawn(move || -> Result<()> {
            let mut w = writer;
            let mut done = 0u64;
            for batch in rx {
                for c in batch {
                    done = done.saturating_add(c.len);
                    if c.payload == Payload::Zero {
                        w.write_zeros(c.guest, c.len).map_err(output_side)?;
                    } else {
                        w.write_chunk(c).map_err(output_side)?;
                    }
                }
                w.batch_end().map_err(output_side)?;
                if let Some(p) = progress {
                    p(done, size);
                }
            }
            w.finish().map_err(output_side)
        });

        let mut produce = || -> Result<()> {
            // With copies, one batch ahead: its source ranges are read in while this one is
            // probed. Without, each batch is planned just before it is read: planning a
            // streamOptimized VMDK reads its grain markers, and through a bounded remote
            // cache the blocks they pull in must still be there when the grains are read.
            let mut ahead: Option<Batch> = None;
            let mut policy = BatchPolicy::new();
            // The first batches are small and grow to `per_batch`, so that the writer starts
            // after a few chunks are ready rather than a whole batch: 1 GiB raw -> qcow2 (64 KiB
            // chunks) waited 2 ms for its first 512 chunks to be probed.
            let mut size = usize::try_from(FIRST_BATCH_BYTES / chunk)
                .unwrap_or(1)
                .clamp(1, per_batch);
            let mut grow = || {
                let n = size;
                size = size.saturating_mul(2).min(per_batch);
                n
            };
            loop {
                if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err(Error::invalid("conversion cancelled"));
                }
                let batch = match ahead.take() {
                    Some(b) => b,
                    None => next_batch(&mut planner, grow(), image.as_ref(), copy.as_ref())?,
                };
                if batch.plans.is_empty() {
                    return Ok(());
                }
                policy.set(batch.cached);
                if copy.is_some() {
                    ahead = Some(next_batch(
                        &mut planner,
                        grow(),
                        image.as_ref(),
                        copy.as_ref(),
                    )?);
                }
                stats.read_bytes += batch
                    .plans
                    .iter()
                    .filter(|p| p.read)
                    .map(|p| p.len)
                    .sum::<u64>();
                let chunks = prepare_batch(reader, batch, comp, copy.as_ref())?;
                for c in &chunks {
                    if c.payload == Payload::Zero {
                        stats.zero_chunks += c.len.div_ceil(chunk);
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
        let written = writer_thread
            .join()
            .map_err(|_| Error::invalid("writer thread panicked"))?;
        produced?;
        written
    })?;
    if let Some((src, _)) = &copy {
        stats.kernel_copied = src.kernel_bytes();
        stats.buffer_copied = src.fallback_bytes();
        stats.paired_copied = src.paired_bytes();
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use glimpse_formats::image::{Extent, ExtentKind, ImageCore, ImageInfo};
    use glimpse_formats::{Format, Limits, Source};
    use std::sync::Mutex;

    #[test]
    fn batches_leave_the_source_its_headroom_next_to_a_writer_table_at_the_cap() {
        // 224 MiB, of which a writer's table took 128 MiB and the reader's cache 48 MiB: the
        // batches shrink so that 32 MiB stay for the source's tables read during the walk.
        let b = Budget::new(224 << 20);
        let _table = b.charge(128 << 20, "table").unwrap();
        let _cache = b.charge(48 << 20, "cache").unwrap();
        let (held, per) = charge_batches(Some(&b), 32, 1 << 20).unwrap();
        assert_eq!(per, 5);
        assert_eq!(held.map(|c| c.bytes()), Some(15 << 20));
        assert!(b.left() >= SOURCE_HEADROOM);
        // With room, full batches as before; with none, one chunk each.
        let (_held, per) = charge_batches(Some(&Budget::new(224 << 20)), 32, 1 << 20).unwrap();
        assert_eq!(per, 32);
        let (_held, per) = charge_batches(Some(&Budget::new(4 << 20)), 32, 1 << 20).unwrap();
        assert_eq!(per, 1);
    }

    /// A disk whose mapping, like qcow2's, ends every extent at `run` bytes: all unallocated,
    /// or with `data` all data, stored at its guest offset in the source.
    struct Plain {
        info: ImageInfo,
        src: Source,
        run: u64,
        data: bool,
    }
    impl Image for Plain {
        fn core(&self) -> ImageCore<'_> {
            ImageCore {
                info: &self.info,
                findings: &[],
                source: &self.src,
            }
        }
        fn extent_at(&self, guest: u64, span: u64) -> glimpse_formats::Result<Extent> {
            let len = span.min(self.run - guest % self.run);
            Ok(Extent {
                start: guest,
                len,
                kind: match self.data {
                    true => ExtentKind::Data { host: guest },
                    false => ExtentKind::Unallocated,
                },
            })
        }
    }

    /// Records what the pipeline asked of it: chunks and zero spans, and how many of them had
    /// come at each end of a batch.
    #[derive(Default)]
    struct Recorder(Arc<Mutex<Vec<(u64, u64, bool)>>>, Arc<Mutex<Vec<usize>>>);
    impl Writer for Recorder {
        fn chunk_size(&self) -> u64 {
            65536
        }
        fn write_chunk(&mut self, c: Chunk) -> Result<()> {
            self.0.lock().unwrap().push((c.guest, c.len, false));
            Ok(())
        }
        fn write_zeros(&mut self, guest: u64, len: u64) -> Result<()> {
            self.0.lock().unwrap().push((guest, len, true));
            Ok(())
        }
        fn batch_end(&mut self) -> Result<()> {
            let n = self.0.lock().unwrap().len();
            self.1.lock().unwrap().push(n);
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_empty_petabyte_disk_is_one_zero_span_per_extent() {
        let size = 1u64 << 50;
        let run = 1u64 << 40; // 1024 extents
        let image: Arc<dyn Image> = Arc::new(Plain {
            info: ImageInfo::new(Format::Qcow2, size),
            src: Arc::new(Vec::new()),
            run,
            data: false,
        });
        let reader = GuestReader::new(image.clone(), &Limits::default());
        let calls = Arc::new(Mutex::new(Vec::new()));
        let stats = convert(
            image,
            Box::new(Recorder(calls.clone(), Arc::default())),
            &reader,
            &ConvertOptions::default(),
        )
        .unwrap();
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1024);
        assert!(calls
            .iter()
            .all(|&(g, l, zero)| zero && l == run && g % run == 0));
        assert_eq!(stats.zero_chunks, size / 65536);
        assert_eq!(stats.read_bytes, 0);
    }

    #[test]
    fn the_writer_starts_on_a_small_first_batch_and_batches_grow_to_the_full_size() {
        let size = 48u64 << 20;
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
        let image: Arc<dyn Image> = Arc::new(Plain {
            info: ImageInfo::new(Format::Raw, size),
            src: Arc::new(bytes),
            run: size,
            data: true,
        });
        let reader = GuestReader::new(image.clone(), &Limits::default());
        let rec = Recorder::default();
        let (calls, ends) = (rec.0.clone(), rec.1.clone());
        let done = Mutex::new(Vec::new());
        let progress = |d: u64, _: u64| done.lock().unwrap().push(d >> 20);
        let opts = ConvertOptions {
            progress: Some(&progress),
            ..ConvertOptions::default()
        };
        convert(image, Box::new(rec), &reader, &opts).unwrap();
        // MiB done after each batch: 1, 2, 4, 8 and 16 MiB, then the full 32 MiB (the rest).
        assert_eq!(*done.lock().unwrap(), [1, 3, 7, 15, 31, 48]);
        assert_eq!(calls.lock().unwrap().len(), 48 * 16);
        // The writer heard of each batch's end after its last chunk (16 per MiB), so that it
        // can hand off a copy it holds back before it waits.
        assert_eq!(*ends.lock().unwrap(), [16, 48, 112, 240, 496, 768]);
    }

    /// Takes copies, and records the scheduling policy of thread `tid` at each chunk.
    struct PolicyProbe(libc::pid_t, Arc<Mutex<Vec<libc::c_int>>>);
    impl Writer for PolicyProbe {
        fn chunk_size(&self) -> u64 {
            1 << 20
        }
        fn accepts_copy(&self) -> bool {
            true
        }
        fn write_chunk(&mut self, _: Chunk) -> Result<()> {
            // SAFETY: asks about a thread by id; no memory is passed.
            let policy = unsafe { libc::sched_getscheduler(self.0) };
            self.1.lock().unwrap().push(policy);
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_producer_of_copies_from_the_page_cache_runs_as_a_batch_thread_and_only_then() {
        let size = 64u64 << 20;
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &vec![9u8; size as usize]).unwrap();
        let f = Arc::new(f);
        let image: Arc<dyn Image> = Arc::new(Plain {
            info: ImageInfo::new(Format::Raw, size),
            src: f.clone(),
            run: size,
            data: true,
        });
        let reader = GuestReader::new(image.clone(), &Limits::default());
        use std::os::unix::io::AsRawFd;
        // SAFETY: no arguments.
        let me = unsafe { libc::gettid() };
        // SAFETY: asks about the calling thread.
        let before = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(before, libc::SCHED_OTHER);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stats = convert(
            image.clone(),
            Box::new(PolicyProbe(me, seen.clone())),
            &reader,
            &ConvertOptions::default(),
        )
        .unwrap();
        assert_eq!(stats.data_chunks, 64);
        // This thread produced the chunks from the page cache (the file was just written): a
        // batch thread while the writer took the first batches (1, 2, 4 and 8 chunks: it was
        // still producing the later ones), a normal one again afterwards.
        let hot = seen.lock().unwrap().clone();
        assert_eq!(hot.len(), 64);
        assert!(hot[..15].iter().all(|&p| p == libc::SCHED_BATCH), "{hot:?}");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        // From a cold cache (written out and dropped) it stays a normal thread. Not on tmpfs,
        // whose pages cannot be dropped.
        f.sync_all().unwrap();
        // SAFETY: advice on an open descriptor; no memory is passed.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let probe = crate::copy::SourceFile::new(f.try_clone().unwrap(), CopyMode::Auto);
        if !probe.will_need(size - 4096, 4096) {
            let seen = Arc::new(Mutex::new(Vec::new()));
            convert(
                image,
                Box::new(PolicyProbe(me, seen.clone())),
                &reader,
                &ConvertOptions::default(),
            )
            .unwrap();
            let cold = seen.lock().unwrap();
            assert_eq!(cold.len(), 64);
            assert!(cold.iter().all(|&p| p == libc::SCHED_OTHER), "{cold:?}");
        }
        // Without copies (a source that is not a file) the producer is left alone.
        let plain: Arc<dyn Image> = Arc::new(Plain {
            info: ImageInfo::new(Format::Raw, size),
            src: Arc::new(vec![9u8; size as usize]),
            run: size,
            data: true,
        });
        let reader = GuestReader::new(plain.clone(), &Limits::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        convert(
            plain,
            Box::new(PolicyProbe(me, seen.clone())),
            &reader,
            &ConvertOptions::default(),
        )
        .unwrap();
        assert!(seen.lock().unwrap().iter().all(|&p| p == libc::SCHED_OTHER));
    }

    #[test]
    fn zero_spans_reach_a_qcow2_output_in_constant_time() {
        let size = 1u64 << 50;
        let image: Arc<dyn Image> = Arc::new(Plain {
            info: ImageInfo::new(Format::Raw, size),
            src: Arc::new(Vec::new()),
            run: size,
            data: false,
        });
        let reader = GuestReader::new(image.clone(), &Limits::default());
        let out = tempfile::tempfile().unwrap();
        let w = crate::create(
            Format::Qcow2,
            &crate::WriteOptions::default(),
            crate::Target::File(out.try_clone().unwrap()),
            size,
        )
        .unwrap();
        let t = std::time::Instant::now();
        convert(image, w, &reader, &ConvertOptions::default()).unwrap();
        // One zero span; per-cluster work would be 16 billion steps.
        assert!(t.elapsed().as_secs() < 60);
        assert!(out.metadata().unwrap().len() < 64 << 20);
    }

    #[test]
    fn a_raw_output_larger_than_the_file_system_allows_is_refused_before_writing() {
        let out = tempfile::tempfile().unwrap();
        // No Linux file system holds a file of 2^63 - 1 bytes... except tmpfs? It refuses
        // past its own s_maxbytes too; either way the error says so up front.
        let e = crate::create(
            Format::Raw,
            &crate::WriteOptions::default(),
            crate::Target::File(out),
            u64::MAX,
        )
        .err()
        .unwrap();
        assert_eq!(e.kind(), glimpse_formats::ErrorKind::LimitExceeded);
        assert!(e.to_string().contains("cannot hold"), "{e}");
    }
}
