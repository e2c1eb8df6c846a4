//! Stopping remote reads on SIGINT/SIGTERM/SIGHUP: a command that handles those signals itself
//! (`convert` removes its temporary file, `upload` deletes its half-made image) stops at its
//! next check of its own flag, but a thread blocked inside a network read never gets there.
//! Two ways:
//!
//! - A step on a worker thread ([`run`]; long-lived, reused), which the caller waits for in
//!   short slices, checking [`cancelled`] in between: one signal ends the wait within
//!   [`POLL`], the read fails with an interrupted error and the command's own cleanup runs.
//!   The abandoned worker finishes its step by itself at its next timeout (the process is
//!   exiting anyway). Sending a request and waiting for its headers (name lookup and connect
//!   included) goes this way for the first request, streams and every retry.
//! - A step on the caller's own thread, ended by a watcher thread that shuts down the
//!   connections of every agent a remote source uses ([`watch_agent`]) within [`POLL`] of a
//!   signal (`ureq::Agent::shutdown`): a blocked read fails at once, and the retry loop
//!   reports it as interrupted. Every ranged body goes this way, straight into the caller's
//!   buffer, and so do the request and headers of the first try of each ranged read: a
//!   `convert` reads hundreds of MiB in hundreds of requests, and handing each body over from
//!   a worker (a fresh thread, a zeroed buffer, a copy) made it half again as slow; the
//!   worker's two wake-ups per request alone cost it 10%. A shutdown does not end a connect
//!   or a name lookup in progress: on that first try (the server answered the previous
//!   request moments before) those are bounded by their timeouts (30 s for a connect)
//!   instead.
//!
//! The flag is the one the command's own handler sets ([`crate::interrupt`]); a command that
//! keeps the default action simply dies on the signal, which is already prompt.

use std::io;
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, SendError, Sender};
use std::sync::{Mutex, Once};
use std::time::Duration;

use ureq::Agent;

/// How often a waiting caller looks at the flag.
pub const POLL: Duration = Duration::from_millis(100);

/// The agents to shut down when a signal arrives ([`watch_agent`]).
static AGENTS: Mutex<Vec<Agent>> = Mutex::new(Vec::new());
static WATCHER: Once = Once::new();

/// True once SIGINT, SIGTERM or SIGHUP arrived.
pub fn cancelled() -> bool {
    crate::interrupt::cancelled()
}

/// The error of a read a signal stopped.
pub fn interrupted() -> io::Error {
    // Not ErrorKind::Interrupted: readers retry that.
    io::Error::other("interrupted by a signal while waiting for the server")
}

/// Shuts down `agent`'s connections within [`POLL`] of a signal, ending any read blocked on
/// one, of a body or of a reply's headers (`ureq::Agent::shutdown` closes the sockets in use;
/// the agent refuses new requests afterwards). Only once the command installed its handlers
/// (false otherwise, and nothing is kept): without them, nothing sets the flag. A source calls
/// this before each request until it returns true, so that one opened before the handlers
/// were installed (`upload` checks its input first) is watched from then on; a command with
/// handlers opens one or two sources.
pub fn watch_agent(agent: &Agent) -> bool {
    if !crate::interrupt::installed() {
        return false;
    }
    if let Ok(mut agents) = AGENTS.lock() {
        agents.push(agent.clone());
    }
    WATCHER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("glimpse-signal".into())
            .spawn(|| loop {
                std::thread::sleep(POLL);
                if cancelled() {
                    let agents = AGENTS.lock().map(|mut a| std::mem::take(&mut *a));
                    for a in agents.unwrap_or_default() {
                        a.shutdown();
                    }
                }
            });
        // A thread that cannot start leaves a blocked read to its stall timeout.
        drop(spawned);
    });
    true
}

/// Runs `f` (a blocking network step) on a worker thread and waits for it, giving up with
/// [`interrupted`] when a signal arrives.
///
/// # Errors
/// A signal arrived, or the worker could not be started.
pub fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    if cancelled() {
        return Err(interrupted());
    }
    let (tx, rx) = sync_channel(1);
    submit(Box::new(move || {
        let _ = tx.send(f());
    }))?;
    wait(&rx)?.ok_or_else(|| io::Error::other("an HTTP worker thread stopped"))
}

/// A network step for a worker.
type Job = Box<dyn FnOnce() + Send>;

/// The workers waiting for a job. A worker lives for the rest of the process once started, so
/// a step costs two channel hops rather than a thread's start and end. There are never more
/// workers than steps that ran at the same time: a worker takes a job only when idle, and one
/// that a signal abandoned finishes its step (bounded by the timeouts) before it waits again,
/// while [`run`] starts none after a signal.
static IDLE: Mutex<Vec<Sender<Job>>> = Mutex::new(Vec::new());

/// Hands `job` to an idle worker, or to a new one when all are busy.
fn submit(mut job: Job) -> io::Result<()> {
    loop {
        let idle = IDLE.lock().ok().and_then(|mut w| w.pop());
        let Some(worker) = idle else { break };
        match worker.send(job) {
            Ok(()) => return Ok(()),
            // A listed worker is waiting, so this does not happen; were it gone, the next.
            Err(SendError(j)) => job = j,
        }
    }
    std::thread::Builder::new()
        .name("glimpse-http".into())
        .spawn(move || work(job))?;
    Ok(())
}

/// A worker: runs its first job, then waits on its own channel for the next, listed in
/// [`IDLE`] while it waits.
fn work(first: Job) {
    let (tx, rx) = channel::<Job>();
    let mut job = first;
    loop {
        job();
        match IDLE.lock() {
            Ok(mut idle) => idle.push(tx.clone()),
            Err(_) => return,
        }
        // `tx` lives here, so this waits until a job comes.
        match rx.recv() {
            Ok(j) => job = j,
            Err(_) => return,
        }
    }
}

/// Waits for the next message on `rx`, giving up with [`interrupted`] when a signal arrives;
/// `None` when the sender has gone.
///
/// # Errors
/// A signal arrived.
pub fn wait<T>(rx: &Receiver<T>) -> io::Result<Option<T>> {
    loop {
        match rx.recv_timeout(POLL) {
            Ok(v) => return Ok(Some(v)),
            Err(RecvTimeoutError::Disconnected) => return Ok(None),
            Err(RecvTimeoutError::Timeout) => {
                if cancelled() {
                    return Err(interrupted());
                }
            }
        }
    }
}

/// Sleeps `d`, waking early (with [`interrupted`]) when a signal arrives.
///
/// # Errors
/// A signal arrived.
pub fn sleep(d: Duration) -> io::Result<()> {
    let end = std::time::Instant::now() + d;
    loop {
        if cancelled() {
            return Err(interrupted());
        }
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(POLL));
    }
}
