//! Keeping the resident set small between requests.
//!
//! Big transfers leave freed buffers in the allocator's arenas. After one,
//! a trim is scheduled shortly later (once the buffers still in flight have
//! been released), which brings the idle RSS back down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Transfers at least this large schedule a trim.
pub const TRIM_AFTER_BYTES: u64 = 1024 * 1024;

/// Delay before the trim, so the response buffers are gone by then.
const TRIM_DELAY: Duration = Duration::from_millis(500);

static SCHEDULED: AtomicBool = AtomicBool::new(false);

/// Note that `bytes` went through memory; schedule a trim when that is a
/// lot. Must be called within the runtime (also from blocking tasks).
pub fn transferred(bytes: u64) {
    if bytes < TRIM_AFTER_BYTES || SCHEDULED.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(TRIM_DELAY).await;
        SCHEDULED.store(false, Ordering::Release);
        trim();
    });
}

/// Configure the allocator for a small footprint: one arena shared by all
/// threads, so a trim can release everything (memory left at the top of a
/// per-thread arena is never returned). Call before any thread starts.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt has no preconditions; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Return free heap memory to the kernel now.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
