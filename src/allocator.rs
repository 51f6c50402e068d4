//! How the C allocator treats memory the process frees.
//!
//! A download's upstream chunks (a few hundred KB each) are allocated by the network half and
//! freed by the disk writer or the hasher moments later. glibc's defaults hand the top of each
//! heap back to the kernel as soon as more than about twice the chunk size is free there, so
//! every new chunk was received into freshly faulted, zeroed pages: on a cold 512 MiB miss, page
//! faults and `madvise` made up about 14 % of the process's CPU. Keeping up to 16 MiB free per
//! heap removes that work. Resident memory would then stay at what the busiest moment needed
//! (a burst of connections, say); so once the server is quiet — no download in flight — and the
//! allocator holds more than [`TRIM_ABOVE`] free, it is handed back to the kernel (checked every
//! [`QUIET_TRIM_EVERY`]; a server serving hits keeps its working memory).

/// Largest free block at the top of a heap that is kept rather than returned to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 16 << 20;
/// Allocations of this size and more get mappings of their own (fixed: no dynamic threshold).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 4 << 20;

/// Tunes glibc's malloc for the server, unless the operator tunes malloc through
/// `GLIBC_TUNABLES`. Call before any thread starts. Elsewhere (musl, other systems) it does
/// nothing.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// How often a quiet server hands free memory back to the kernel.
pub const QUIET_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Free memory the allocator may keep before a quiet server hands it back: small enough that a
/// fleet of parked connections (a few KiB freed each) gets its memory back; a quiet server's
/// next download faults in its few MiB of buffers once.
pub const TRIM_ABOVE: usize = 8 << 20;

/// Hands free heap memory back to the kernel when `quiet` says so and more than
/// [`TRIM_ABOVE`] is free, checked every [`QUIET_TRIM_EVERY`]; runs until the task is dropped.
pub async fn trim_when_quiet(quiet: impl Fn() -> bool) {
    let mut every = tokio::time::interval(QUIET_TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if quiet() {
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

/// Returns free memory at the top of every heap, and free pages within them, to the kernel,
/// when there is much of it.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo2 only reads the allocator's figures; malloc_trim only releases memory
    // it holds free.
    unsafe {
        if libc::mallinfo2().fordblks > TRIM_ABOVE {
            libc::malloc_trim(0);
        }
    }
}
