//! Signals for the commands that must clean up what they made, whatever stops them: the
//! temporary files of `convert` and `ova extract`, the half-made image of `upload`.
//!
//! - SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session): the first one sets a flag
//!   the command polls; it stops, its error path cleans up and it exits 2.
//! - A second one ([`Again::Exits`], for the commands whose leftovers are local files) does not
//!   wait (the command may be blocked on a network read): the handler removes every
//!   registered temporary file, then every registered directory that is empty (those the
//!   command created), itself and exits 128 + the signal. With [`Again::Waits`] (`upload`,
//!   whose leftover is an image only it can delete) a second signal changes nothing, and
//!   blocked calls return EINTR rather than restart, so that the flag is seen soon.
//! - SIGXFSZ (`ulimit -f`) is ignored, so that a write past the limit fails with EFBIG and the
//!   ordinary error path removes the temporary file, as qemu-img does (the default action kills
//!   the process and leaves the file).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};

static CANCEL: AtomicBool = AtomicBool::new(false);
/// The signal that set [`CANCEL`].
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Whether a second signal exits at once ([`Again::Exits`]).
static EXIT_ON_SECOND: AtomicBool = AtomicBool::new(true);
/// Whether [`install`] ran: only then can [`CANCEL`] be set (a command without the handlers
/// dies on the signal).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// What a second signal does.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// Removes the registered paths and exits at once.
    Exits,
    /// Nothing: the command finishes its own cleanup.
    Waits,
}

/// One slot of the list of temporary files the handler removes: a C string (null when the
/// slot is free). Slots are leaked and never unlinked from the list, so the handler can walk
/// it at any time; a free slot is reused.
struct Slot {
    path: AtomicPtr<libc::c_char>,
    next: AtomicPtr<Slot>,
}

static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_signal(sig: libc::c_int) {
    if CANCEL.swap(true, Ordering::SeqCst) && EXIT_ON_SECOND.load(Ordering::SeqCst) {
        // SAFETY: only atomic loads, unlink, rmdir and _exit, which are async-signal-safe. Every
        // slot and every path is a leaked allocation that is never freed while in the list
        // (a path taken out of a slot is leaked too), so each pointer is null or valid.
        unsafe {
            let mut slots = 0usize;
            let mut s = SLOTS.load(Ordering::SeqCst);
            while let Some(slot) = s.as_ref() {
                let p = slot.path.load(Ordering::SeqCst);
                if !p.is_null() {
                    libc::unlink(p);
                }
                slots += 1;
                s = slot.next.load(Ordering::SeqCst);
            }
            // Then the directories, innermost first whatever the list's order: rmdir only
            // removes an empty directory (and fails on anything else), and each pass that
            // removes one may have emptied its parent (so at most one pass per slot).
            for _ in 0..slots {
                let mut removed = false;
                let mut s = SLOTS.load(Ordering::SeqCst);
                while let Some(slot) = s.as_ref() {
                    let p = slot.path.load(Ordering::SeqCst);
                    if !p.is_null() && libc::rmdir(p) == 0 {
                        removed = true;
                    }
                    s = slot.next.load(Ordering::SeqCst);
                }
                if !removed {
                    break;
                }
            }
            libc::_exit(128 + sig);
        }
    }
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// Installs the handlers (see the module's documentation).
pub fn install(again: Again) {
    EXIT_ON_SECOND.store(again == Again::Exits, Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `sigaction` with a zeroed struct, an empty mask and a handler that only
        // touches atomics and calls async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = if again == Again::Exits {
                libc::SA_RESTART
            } else {
                0
            };
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: ignoring a signal has no preconditions.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    INSTALLED.store(true, Ordering::SeqCst);
}

/// True once [`install`] ran.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::SeqCst)
}

/// The flag the first signal sets.
pub fn flag() -> &'static AtomicBool {
    &CANCEL
}

/// True once a signal asked the command to stop.
pub fn cancelled() -> bool {
    CANCEL.load(Ordering::SeqCst)
}

/// The name of the signal that stopped the command.
pub fn signal_name() -> &'static str {
    match SIGNAL.load(Ordering::SeqCst) {
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "SIGINT",
    }
}

/// A temporary file (or a directory the command created) the handler removes until this is
/// dropped (when the file was renamed into place or removed).
pub struct Registered(Option<&'static Slot>);

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(slot) = self.0 {
            // The string is leaked, not freed: the handler may be reading it right now.
            slot.path.store(std::ptr::null_mut(), Ordering::SeqCst);
        }
    }
}

/// Lets the handler remove `path` until the returned value is dropped.
pub fn register(path: &Path) -> Registered {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return Registered(None);
    };
    let p = c.into_raw();
    // A free slot first.
    let mut s = SLOTS.load(Ordering::SeqCst);
    // SAFETY: slots are leaked `Box`es that live for the rest of the process.
    while let Some(slot) = unsafe { s.as_ref() } {
        if slot
            .path
            .compare_exchange(std::ptr::null_mut(), p, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return Registered(Some(slot));
        }
        s = slot.next.load(Ordering::SeqCst);
    }
    let slot: &'static Slot = Box::leak(Box::new(Slot {
        path: AtomicPtr::new(p),
        next: AtomicPtr::new(std::ptr::null_mut()),
    }));
    let me = slot as *const Slot as *mut Slot;
    let mut head = SLOTS.load(Ordering::SeqCst);
    loop {
        slot.next.store(head, Ordering::SeqCst);
        match SLOTS.compare_exchange(head, me, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return Registered(Some(slot)),
            Err(h) => head = h,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_once_released() {
        let a = register(Path::new("/nonexistent/a"));
        let b = register(Path::new("/nonexistent/b"));
        let count = || {
            let mut n = 0;
            let mut s = SLOTS.load(Ordering::SeqCst);
            // SAFETY: as in `register`.
            while let Some(slot) = unsafe { s.as_ref() } {
                n += 1;
                s = slot.next.load(Ordering::SeqCst);
            }
            n
        };
        let before = count();
        drop(a);
        let c = register(Path::new("/nonexistent/c"));
        assert_eq!(count(), before);
        drop(b);
        drop(c);
        let live = {
            let mut n = 0;
            let mut s = SLOTS.load(Ordering::SeqCst);
            // SAFETY: as in `register`.
            while let Some(slot) = unsafe { s.as_ref() } {
                n += usize::from(!slot.path.load(Ordering::SeqCst).is_null());
                s = slot.next.load(Ordering::SeqCst);
            }
            n
        };
        assert_eq!(live, 0);
    }
}
