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
//! The flag is set by a handler chained in front of the command's own: installed when the
//! first remote source is opened, and only when the command has a handler (a command that
//! keeps the default action simply dies on the signal, which is already prompt).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, SendError, Sender};
use std::sync::{Mutex, Once};
use std::time::Duration;

use ureq::Agent;

/// How often a waiting caller looks at the flag.
pub const POLL: Duration = Duration::from_millis(100);

static CANCEL: AtomicBool = AtomicBool::new(false);
/// The handlers that were installed before ours, by signal (0: none to call).
static PREV_INT: AtomicUsize = AtomicUsize::new(0);
static PREV_TERM: AtomicUsize = AtomicUsize::new(0);
static PREV_HUP: AtomicUsize = AtomicUsize::new(0);
static PREV_INT_SIGINFO: AtomicBool = AtomicBool::new(false);
static PREV_TERM_SIGINFO: AtomicBool = AtomicBool::new(false);
static PREV_HUP_SIGINFO: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();
/// True once a handler was chained, so that [`CANCEL`] can be set.
static WATCHING: AtomicBool = AtomicBool::new(false);
/// The agents to shut down when a signal arrives ([`watch_agent`]).
static AGENTS: Mutex<Vec<Agent>> = Mutex::new(Vec::new());
static WATCHER: Once = Once::new();

/// True once SIGINT, SIGTERM or SIGHUP arrived (after a remote source was opened).
pub fn cancelled() -> bool {
    CANCEL.load(Ordering::SeqCst)
}

/// The error of a read a signal stopped.
pub fn interrupted() -> io::Error {
    // Not ErrorKind::Interrupted: readers retry that.
    io::Error::other("interrupted by a signal while waiting for the server")
}

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    CANCEL.store(true, Ordering::SeqCst);
    let (prev, siginfo) = match sig {
        libc::SIGINT => (&PREV_INT, &PREV_INT_SIGINFO),
        libc::SIGHUP => (&PREV_HUP, &PREV_HUP_SIGINFO),
        _ => (&PREV_TERM, &PREV_TERM_SIGINFO),
    };
    let h = prev.load(Ordering::SeqCst);
    if h == 0 {
        return;
    }
    // SAFETY: `h` is the address of the handler the command installed (neither SIG_DFL nor
    // SIG_IGN: those are never stored), called with the signature its flags declared.
    unsafe {
        if siginfo.load(Ordering::SeqCst) {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(h);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(libc::c_int) = std::mem::transmute(h);
            f(sig);
        }
    }
}

/// Chains [`on_signal`] in front of the command's SIGINT/SIGTERM/SIGHUP handlers, once
/// (`convert` treats a hang-up like an interrupt).
pub fn watch_signals() {
    INSTALL.call_once(|| {
        for (sig, prev, siginfo) in [
            (libc::SIGINT, &PREV_INT, &PREV_INT_SIGINFO),
            (libc::SIGTERM, &PREV_TERM, &PREV_TERM_SIGINFO),
            (libc::SIGHUP, &PREV_HUP, &PREV_HUP_SIGINFO),
        ] {
            // SAFETY: sigaction with a zeroed struct reads the current disposition; the new
            // one keeps its mask and flags (SA_RESTART included) and adds SA_SIGINFO, and its
            // handler only stores an atomic and calls the previous handler.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                    continue;
                }
                if old.sa_sigaction == libc::SIG_DFL || old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
                prev.store(old.sa_sigaction, Ordering::SeqCst);
                siginfo.store(old.sa_flags & libc::SA_SIGINFO != 0, Ordering::SeqCst);
                let mut sa = old;
                sa.sa_sigaction = on_signal
                    as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                    as libc::sighandler_t;
                sa.sa_flags = old.sa_flags | libc::SA_SIGINFO;
                if libc::sigaction(sig, &sa, std::ptr::null_mut()) == 0 {
                    WATCHING.store(true, Ordering::SeqCst);
                }
            }
        }
    });
}

/// Shuts down `agent`'s connections within [`POLL`] of a signal, ending any read blocked on
/// one, of a body or of a reply's headers (`ureq::Agent::shutdown` closes the sockets in use;
/// the agent refuses new requests afterwards). Only when a handler was chained
/// ([`watch_signals`], called first): without one, nothing sets the flag. Each source
/// registers its agent: a command with a handler opens one or two.
pub fn watch_agent(agent: &Agent) {
    if !WATCHING.load(Ordering::SeqCst) {
        return;
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
