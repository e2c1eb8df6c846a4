//! Copies into a page-copying file system (ext4) made by two threads through buffers of their
//! own, without waiting for each other between copies.
//!
//! ext4 cannot share blocks, so every copy into it copies bytes into the output's page cache,
//! and it takes the output's inode lock for each buffered write: writes into one file run one
//! at a time, whatever makes them. A copy inside the kernel (`copy_file_range`, `splice`) does
//! all its work under that lock, reading the source's pages from memory. A `pread` into a
//! small buffer takes no lock on the output, so here two threads take turns with the output:
//! while one writes its buffer (still in its core's cache) under the lock, the other reads the
//! next piece into its own.
//!
//! The writer thread hands each copy to a queue and takes pieces from it itself until at most
//! [`BACKLOG`] bytes are left, then goes back to its chunks; a second thread takes pieces
//! whenever there are any. Neither waits for the other at the end of a copy: only
//! [`Copier::drain`] does, before the writer finishes the file. Before the writer waits for
//! its next chunks, it hands the copy it holds back to the second thread
//! ([`Copier::hand_off`]), which would otherwise run out of pieces while the writer waits.
//!
//! What was left idle, traced on 1 GiB raw -> qcow2 (the lock counted as busy while a
//! `pwrite` was under way): 19 ms of about 120, in three kinds of gaps. 5-9 ms were the
//! second thread out of pieces at the end of a batch: the writer, waking the producer as it
//! took the next batch, lost its core to it for the 0.3-0.5 ms the producer spent preparing
//! the one after, while the copy it held back waited. Handing that copy off left 1-2 ms. About
//! 8 ms were both threads reading at once, mostly after the writer reserved blocks for a copy
//! it queued: it waited for the lock, then read in step with the second thread. Reserving in
//! the copying thread, between its read and its write (see [`Job::reserve`]), moves that
//! wait into its turn with the lock. The rest is the two threads' natural drift: a read of
//! 256 KiB costs about what a write does (25-40 us each).
//!
//! Measured on 1 GiB raw -> raw (664 MB of data in 241 runs) in the page cache, on an Intel
//! Xeon with ERMS/FSRM (2 cores, ext4, kernel 6.18), each output range reserved first, with
//! throwaway C programs: one thread splicing 160 ms; two threads `pread`ing and `pwrite`ing
//! 128 KiB / 256 KiB / 1 MiB pieces of one contiguous range 118 / 110 / 118 ms; one thread
//! reading for the other through a ring of buffers 125-135 ms; the 241 runs as one list of
//! 256 KiB pieces 116 ms, but 140-144 ms when both threads met at the end of every run; the
//! same `pwrite`s from one buffer in cache, with no reading at all, 101 ms.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The bytes one thread reads and then writes at a time. Pieces end on multiples of it in
/// the output, as the spliced copy's do.
pub(super) const PIECE: u64 = 256 << 10;

/// The queued bytes the writer leaves to the second thread when it goes back to its chunks:
/// enough to keep that thread busy until the next copy arrives.
const BACKLOG: u64 = 2 * PIECE;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// One queued copy, or a piece taken from one: `len` bytes from `from` in the source to `to`
/// in `dst`.
#[derive(Debug)]
struct Job {
    dst: Arc<File>,
    from: u64,
    to: u64,
    len: u64,
    /// Bytes from `to` whose blocks are reserved ([`super::reserve`]) before the piece is
    /// written: the whole copy, by whichever thread takes its first piece (0 on the rest).
    /// That thread reserves between its read and its write, so that taking the output's lock
    /// for it falls in that thread's turn with the lock; the writer reserving as it queued
    /// the copy waited for the lock, then read in step with the other thread, leaving the
    /// lock idle (1 GiB raw -> qcow2: about 350 such gaps of 25 us).
    reserve: u64,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Job>,
    /// Bytes in `queue`.
    queued: u64,
    /// Pieces being copied now.
    busy: usize,
    /// The first error; the queue is emptied when it is set.
    error: Option<io::Error>,
    /// The [`Copier`] is gone: the second thread ends.
    closed: bool,
}

impl State {
    /// The next piece: the head copy up to its next multiple of [`PIECE`] in the output.
    fn take(&mut self) -> Option<Job> {
        let job = self.queue.front_mut()?;
        let boundary = (job.to / PIECE).saturating_add(1).saturating_mul(PIECE);
        let len = boundary.saturating_sub(job.to).min(job.len);
        let piece = Job {
            dst: job.dst.clone(),
            from: job.from,
            to: job.to,
            len,
            reserve: std::mem::take(&mut job.reserve),
        };
        job.from = job.from.saturating_add(len);
        job.to = job.to.saturating_add(len);
        job.len = job.len.saturating_sub(len);
        if job.len == 0 {
            self.queue.pop_front();
        }
        self.queued = self.queued.saturating_sub(len);
        self.busy = self.busy.saturating_add(1);
        Some(piece)
    }
}

#[derive(Debug)]
struct Shared {
    src: File,
    state: Mutex<State>,
    /// The second thread waits here for pieces (or for the end).
    work: Condvar,
    /// [`Copier::drain`] waits here for the last piece in flight.
    idle: Condvar,
    copied: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left a consistent state: every
        // change to it is a few assignments.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies `p`, with the lock released, and records how it went.
    fn copy<'a>(&'a self, p: Job, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        drop(guard);
        let moved = BUFFER.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < PIECE as usize {
                buf.resize(PIECE as usize, 0);
            }
            let bytes = buf.get_mut(..p.len as usize).unwrap_or_default();
            self.src
                .read_exact_at(bytes, p.from)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => super::ended_early(),
                    _ => e,
                })
                .and_then(|()| {
                    if p.reserve > 0 {
                        super::reserve(&p.dst, p.to, p.reserve);
                    }
                    p.dst.write_all_at(bytes, p.to)
                })
        });
        let mut st = self.lock();
        st.busy = st.busy.saturating_sub(1);
        match moved {
            Ok(()) => {
                self.copied.fetch_add(p.len, Ordering::Relaxed);
            }
            Err(e) => {
                st.error.get_or_insert(e);
                st.queue.clear();
                st.queued = 0;
            }
        }
        if st.busy == 0 && st.queue.is_empty() {
            self.idle.notify_all();
        }
        st
    }
}

/// The queue of copies from one source file, and the second thread that works on it.
#[derive(Debug)]
pub(super) struct Copier {
    shared: Arc<Shared>,
    /// The second thread, when it runs; without it the writer copies everything itself.
    partner: Option<std::thread::JoinHandle<()>>,
}

impl Copier {
    /// A queue of copies from `src`, and its second thread when the system starts one.
    pub(super) fn new(src: &File) -> io::Result<Self> {
        Self::start(src, true)
    }

    /// A queue of copies from `src`, with a second thread when `partner` and the system
    /// starts one.
    fn start(src: &File, partner: bool) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            src: src.try_clone()?,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            copied: AtomicU64::new(0),
        });
        let theirs = shared.clone();
        let partner = if partner {
            std::thread::Builder::new()
                .name("glimpse-copy".into())
                .stack_size(64 << 10)
                .spawn(move || {
                    let s = &theirs;
                    let mut st = s.lock();
                    while !(st.closed && st.queue.is_empty()) {
                        st = match st.take() {
                            Some(p) => s.copy(p, st),
                            None => s.work.wait(st).unwrap_or_else(|p| p.into_inner()),
                        };
                    }
                })
                .ok()
        } else {
            None
        };
        Ok(Copier { shared, partner })
    }

    /// Bytes copied so far.
    pub(super) fn copied(&self) -> u64 {
        self.shared.copied.load(Ordering::Relaxed)
    }

    /// Queues a copy of `len` bytes from `from` in the source to `to` in `dst`, then copies
    /// pieces of the queue until at most [`BACKLOG`] bytes are left (none without the second
    /// thread). The rest is copied by the second thread, or by [`Copier::drain`].
    ///
    /// # Errors
    /// The first error of any copy queued so far (the queue is then dropped).
    pub(super) fn submit(&self, dst: &File, from: u64, to: u64, len: u64) -> io::Result<()> {
        let mut st = self.push(dst, from, to, len)?;
        let leave = if self.partner.is_some() { BACKLOG } else { 0 };
        while st.queued > leave {
            let Some(p) = st.take() else { break };
            st = self.shared.copy(p, st);
        }
        st.error.take().map_or(Ok(()), Err)
    }

    /// Queues a copy as [`Copier::submit`] does, but copies none of it here: the second
    /// thread starts on it at once, while the writer waits for its next chunks (without the
    /// second thread, the next submit or [`Copier::drain`] copies it).
    ///
    /// # Errors
    /// The first error of any copy queued so far (the queue is then dropped).
    pub(super) fn hand_off(&self, dst: &File, from: u64, to: u64, len: u64) -> io::Result<()> {
        self.push(dst, from, to, len).map(drop)
    }

    /// Queues a copy and wakes the second thread; returns the queue, still locked.
    fn push(&self, dst: &File, from: u64, to: u64, len: u64) -> io::Result<MutexGuard<'_, State>> {
        let dst = Arc::new(dst.try_clone()?);
        let s = &self.shared;
        let mut st = s.lock();
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        st.queue.push_back(Job {
            dst,
            from,
            to,
            len,
            reserve: len,
        });
        st.queued = st.queued.saturating_add(len);
        s.work.notify_one();
        Ok(st)
    }

    /// Copies what is queued, with the second thread, and waits until every copy is done.
    ///
    /// # Errors
    /// The first error of any copy queued so far.
    pub(super) fn drain(&self) -> io::Result<()> {
        let s = &self.shared;
        let mut st = s.lock();
        loop {
            if let Some(p) = st.take() {
                st = s.copy(p, st);
            } else if st.busy > 0 {
                st = s.idle.wait(st).unwrap_or_else(|p| p.into_inner());
            } else {
                break;
            }
        }
        st.error.take().map_or(Ok(()), Err)
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        // Nothing may write to an output after its writer is gone: finish what is queued
        // (the writer normally drained it already), then end the second thread, and wait
        // for it, so that no thread outlives its copies (a thread left to end on its own was
        // still holding its handle and buffer when the fuzzer's leak check ran).
        let _ = self.drain();
        self.shared.lock().closed = true;
        self.shared.work.notify_all();
        if let Some(t) = self.partner.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    fn read_all(f: &File) -> Vec<u8> {
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut &*f, &mut got).unwrap();
        got
    }

    #[test]
    fn copies_left_under_way_land_in_place_once_drained() {
        let data: Vec<u8> = (0..(9 << 20) + 77).map(|i| (i * 31 % 241) as u8).collect();
        // Lengths of many pieces, of one, of less than one; offsets unaligned in both files.
        let copies = [
            (3u64, 5000u64, (3 << 20) + 11),
            ((3 << 20) + 14, (3 << 20) + 9000, 100),
            (4 << 20, 8 << 20, PIECE),
            ((5 << 20) + 1, (12 << 20) + 4095, (4 << 20) + 76),
        ];
        for partner in [true, false] {
            let src = file_with(&data);
            let c = Copier::start(&src, partner).unwrap();
            assert_eq!(c.partner.is_some(), partner);
            let out = tempfile::tempfile().unwrap();
            for &(from, to, len) in &copies {
                c.submit(&out, from, to, len).unwrap();
            }
            c.drain().unwrap();
            let total: u64 = copies.iter().map(|c| c.2).sum();
            assert_eq!(c.copied(), total, "partner {partner}");
            let got = read_all(&out);
            let mut want = vec![0u8; got.len()];
            for &(from, to, len) in &copies {
                let (f, t, n) = (from as usize, to as usize, len as usize);
                want[t..t + n].copy_from_slice(&data[f..f + n]);
            }
            assert_eq!(got.len(), (12 << 20) + 4095 + (4 << 20) + 76);
            assert!(got == want, "partner {partner}: the output differs");
        }
    }

    #[test]
    fn the_writer_leaves_at_most_the_backlog_to_the_second_thread() {
        let data = vec![5u8; 8 << 20];
        let src = file_with(&data);
        let c = Copier::start(&src, true).unwrap();
        let out = tempfile::tempfile().unwrap();
        c.submit(&out, 0, 0, 8 << 20).unwrap();
        // What the writer did not copy itself is at most BACKLOG bytes, plus a piece each
        // thread may have in hand.
        assert!(
            c.copied() + BACKLOG + 2 * PIECE >= 8 << 20,
            "{}",
            c.copied()
        );
        c.drain().unwrap();
        assert_eq!(c.copied(), 8 << 20);
        assert!(read_all(&out) == data);
    }

    #[test]
    fn a_copy_handed_off_is_made_by_the_second_thread_alone() {
        let data: Vec<u8> = (0..(3 << 20) + 5).map(|i| (i * 7 % 251) as u8).collect();
        let len = 3u64 << 20;
        for partner in [true, false] {
            let src = file_with(&data);
            let c = Copier::start(&src, partner).unwrap();
            let out = tempfile::tempfile().unwrap();
            c.hand_off(&out, 5, 4096, len).unwrap();
            if partner {
                // Nobody drains: the second thread copies it on its own.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                while c.copied() < len {
                    assert!(std::time::Instant::now() < deadline, "{}", c.copied());
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            } else {
                // Without the second thread, the copy waits for a drain (or a submit).
                assert_eq!(c.copied(), 0);
                c.drain().unwrap();
            }
            assert_eq!(c.copied(), len, "partner {partner}");
            let got = read_all(&out);
            assert_eq!(got.len() as u64, 4096 + len);
            assert!(got[..4096].iter().all(|&b| b == 0));
            assert!(
                got[4096..] == data[5..],
                "partner {partner}: the output differs"
            );
        }
    }

    #[test]
    fn a_copys_first_piece_reserves_the_whole_copy_and_no_other_piece_does() {
        let mut st = State::default();
        let dst = Arc::new(tempfile::tempfile().unwrap());
        for (to, len) in [(100, 3 * PIECE), (9 * PIECE, PIECE / 2)] {
            st.queue.push_back(Job {
                dst: dst.clone(),
                from: 0,
                to,
                len,
                reserve: len,
            });
            st.queued += len;
        }
        let first = st.take().unwrap();
        assert_eq!(
            (first.to, first.len, first.reserve),
            (100, PIECE - 100, 3 * PIECE)
        );
        let mut rest = Vec::new();
        while let Some(p) = st.take() {
            rest.push((p.to, p.len, p.reserve));
        }
        assert_eq!(
            rest,
            [
                (PIECE, PIECE, 0),
                (2 * PIECE, PIECE, 0),
                (3 * PIECE, 100, 0),
                (9 * PIECE, PIECE / 2, PIECE / 2),
            ]
        );
        assert_eq!(st.queued, 0);
    }

    #[test]
    fn an_error_under_way_is_reported_once_and_drops_the_rest() {
        let src = file_with(&[1u8; 1 << 20]);
        let c = Copier::start(&src, true).unwrap();
        let out = tempfile::tempfile().unwrap();
        // Past the source's end: the error may come from the submit or from the drain.
        let first = c
            .submit(&out, 0, 0, 4 << 20)
            .and_then(|()| c.drain())
            .unwrap_err();
        assert_eq!(first.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(first.to_string(), "source ended early");
        // It was reported: the queue is usable again.
        c.submit(&out, 0, 0, 4096).unwrap();
        c.drain().unwrap();

        // An output it cannot write.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        std::fs::write(&path, b"").unwrap();
        let read_only = File::open(&path).unwrap();
        let e = c
            .submit(&read_only, 0, 0, 1 << 20)
            .and_then(|()| c.drain())
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    #[test]
    fn a_dropped_queue_finishes_its_copies_first() {
        let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let src = file_with(&data);
        let out = tempfile::tempfile().unwrap();
        let c = Copier::start(&src, true).unwrap();
        c.submit(&out, 0, 0, 4 << 20).unwrap();
        drop(c);
        assert!(read_all(&out) == data);
    }
}
