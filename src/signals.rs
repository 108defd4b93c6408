//! Cancellation by signal. SIGINT, SIGTERM and SIGHUP only set a flag: the work in
//! progress notices it at its next check (or its child is killed by the waiter), unwinds,
//! and the guards release mounts, snapshots and locks in order. A second signal during
//! cleanup sets the same flag again and changes nothing, so cleanup is never cut in half.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static LAST: AtomicI32 = AtomicI32::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Installs the handlers (idempotent). Until this is called, `cancelled()` is false.
///
/// # Errors
/// When the handlers cannot be registered.
pub fn install() -> std::io::Result<()> {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        signal_hook::flag::register(sig, Arc::clone(flag))?;
        // SAFETY: the closure only stores into atomics, which is async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || {
                LAST.store(sig, Ordering::SeqCst);
                COUNT.fetch_add(1, Ordering::SeqCst);
            })?;
        }
    }
    Ok(())
}

/// True once a terminating signal arrived.
pub fn cancelled() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::SeqCst))
}

/// The last terminating signal received, if any (for messages: "interrupted by SIGTERM").
pub fn last_signal() -> Option<i32> {
    match LAST.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// How many terminating signals arrived so far. A command that must stop on a signal
/// that arrives while it runs, but not on the one that already interrupted the run
/// (an on-failure hook that reports the interruption), is made
/// [`crate::exec::Cmd::cancellable`] from this count.
pub fn count() -> usize {
    COUNT.load(Ordering::SeqCst)
}

/// The last signal's name for messages ("interrupted by SIGTERM").
pub fn last_signal_name() -> &'static str {
    last_signal()
        .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
        .map(|s| s.as_str())
        .unwrap_or("a signal")
}
