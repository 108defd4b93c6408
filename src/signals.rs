//! Cancellation by signal. SIGINT, SIGTERM and SIGHUP only set a flag: the work in
//! progress notices it at its next check (or its child is killed by the waiter), unwinds,
//! and the guards release mounts, snapshots and locks in order. A second signal during
//! cleanup sets the same flag again and changes nothing, so cleanup is never cut in half.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static LAST: AtomicI32 = AtomicI32::new(0);

/// Installs the handlers (idempotent). Until this is called, `cancelled()` is false.
///
/// # Errors
/// When the handlers cannot be registered.
pub fn install() -> std::io::Result<()> {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        signal_hook::flag::register(sig, Arc::clone(flag))?;
        // SAFETY: the closure only stores an integer into an atomic, which is
        // async-signal-safe.
        unsafe {
            signal_hook::low_level::register(sig, move || LAST.store(sig, Ordering::SeqCst))?;
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
