//! When a verified download is committed. A commit `fdatasync`s the whole blob at once; run
//! while clients are still pulling, that burst of writes competes with their own (on a host
//! that runs its clients too) and with the cache's other downloads, just when they wait on the
//! disk. So a verified blob waits for a pause in blob traffic: no blob request or download
//! started for [`PAUSE`] (a pull asks for its blobs one after another, a few at a time). Its
//! starts, not open transfers, mark traffic, so that a slow or stalled client does not hold
//! commits back. A blob waits [`LONGEST`] at most, and not at all once more than
//! [`WAITING_BLOBS`] blobs or [`WAITING_BYTES`] bytes wait (bounding the open files and the
//! unsynced bytes a crash would lose) or once the server is stopping. A waiting blob's bytes
//! count against the cache's budget from its verification on.
//!
//! Nothing is weaker for the wait: a waiting blob is served from its download file like a
//! download in progress (its single-flight entry stays until the commit), and only a synced
//! blob gets its name in the store, so a crash loses it and never leaves a partial one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// The pause in blob traffic a commit waits for.
pub const PAUSE: Duration = Duration::from_millis(500);
/// The longest a verified blob waits for a pause.
pub const LONGEST: Duration = Duration::from_secs(30);
/// Beyond this many blobs waiting, blobs are committed at once (each holds two open files).
pub const WAITING_BLOBS: usize = 128;
/// Beyond this many bytes waiting, blobs are committed at once.
pub const WAITING_BYTES: u64 = 1024 * 1024 * 1024;

/// Blob traffic and the commits waiting for a pause in it.
#[derive(Debug)]
pub struct CommitPacer {
    /// When the pacer was made: traffic is kept as nanoseconds since.
    epoch: Instant,
    /// When the last blob request or download started.
    last_start: AtomicU64,
    waiting: AtomicUsize,
    waiting_bytes: AtomicU64,
    stopping: watch::Sender<bool>,
}

/// A commit waiting; counted until dropped.
struct Waiting<'a> {
    pacer: &'a CommitPacer,
    size: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pacer.waiting.fetch_sub(1, Ordering::Relaxed);
        self.pacer
            .waiting_bytes
            .fetch_sub(self.size, Ordering::Relaxed);
    }
}

impl Default for CommitPacer {
    fn default() -> Self {
        CommitPacer {
            epoch: Instant::now(),
            last_start: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            waiting_bytes: AtomicU64::new(0),
            stopping: watch::Sender::new(false),
        }
    }
}

impl CommitPacer {
    /// A blob request or download starts now.
    pub fn traffic(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.last_start.fetch_max(now, Ordering::Relaxed);
    }

    /// Commits waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Returns when a verified blob of `size` bytes may be committed.
    pub async fn wait_turn(&self, size: u64) {
        let blobs_before = self.waiting.fetch_add(1, Ordering::Relaxed);
        let bytes_before = self.waiting_bytes.fetch_add(size, Ordering::Relaxed);
        let _waiting = Waiting { pacer: self, size };
        if blobs_before >= WAITING_BLOBS || bytes_before + size > WAITING_BYTES {
            return;
        }
        let deadline = Instant::now() + LONGEST;
        let mut stopping = self.stopping.subscribe();
        loop {
            let quiet_at = self.quiet_at().min(deadline);
            if quiet_at <= Instant::now() || *stopping.borrow_and_update() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(quiet_at) => {}
                _ = stopping.changed() => return,
            }
        }
    }

    /// When blob traffic will have paused long enough, if nothing starts meanwhile.
    fn quiet_at(&self) -> Instant {
        let last_start = Duration::from_nanos(self.last_start.load(Ordering::Relaxed));
        self.epoch + last_start + PAUSE
    }

    /// The server is stopping: every commit waiting goes now, and none waits from here on.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn turn_after(pacer: &CommitPacer, size: u64) -> Duration {
        let started = Instant::now();
        pacer.wait_turn(size).await;
        started.elapsed()
    }

    /// Starts blob traffic every `every` for `lasting`.
    fn traffic(pacer: &Arc<CommitPacer>, every: Duration, lasting: Duration) {
        let pacer = Arc::clone(pacer);
        tokio::spawn(async move {
            let end = Instant::now() + lasting;
            while Instant::now() < end {
                pacer.traffic();
                tokio::time::sleep(every).await;
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_waits_for_a_pause_in_blob_traffic() {
        let pacer = Arc::new(CommitPacer::default());
        tokio::time::sleep(PAUSE).await;
        // Quiet already: no wait.
        assert_eq!(turn_after(&pacer, 1).await, Duration::ZERO);
        // Requests start every 200 ms for 2 s: the commit goes one pause after the last.
        traffic(&pacer, Duration::from_millis(200), Duration::from_secs(2));
        tokio::task::yield_now().await;
        let waited = tokio::spawn({
            let pacer = Arc::clone(&pacer);
            async move { turn_after(&pacer, 1).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(pacer.waiting(), 1);
        assert_eq!(waited.await.unwrap(), Duration::from_millis(1800) + PAUSE);
        assert_eq!(pacer.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_that_never_pauses_delays_a_commit_by_the_longest_wait_only() {
        let pacer = Arc::new(CommitPacer::default());
        traffic(&pacer, PAUSE / 2, LONGEST * 2);
        tokio::task::yield_now().await;
        assert_eq!(turn_after(&pacer, 1).await, LONGEST);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_bytes_waiting_or_a_stop_commit_at_once() {
        let pacer = Arc::new(CommitPacer::default());
        traffic(&pacer, PAUSE / 2, LONGEST * 2);
        tokio::task::yield_now().await;
        let waited = tokio::spawn({
            let pacer = Arc::clone(&pacer);
            async move { turn_after(&pacer, WAITING_BYTES - 1).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        // With this one, more than the bound waits: it goes at once; the first still waits.
        assert_eq!(turn_after(&pacer, 2).await, Duration::ZERO);
        assert!(!waited.is_finished());
        pacer.stop();
        assert_eq!(waited.await.unwrap(), Duration::from_secs(1));
        assert_eq!(turn_after(&pacer, 1).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_blobs_waiting_commit_at_once() {
        let pacer = Arc::new(CommitPacer::default());
        traffic(&pacer, PAUSE / 2, LONGEST * 2);
        let waiters: Vec<_> = (0..WAITING_BLOBS)
            .map(|_| {
                let pacer = Arc::clone(&pacer);
                tokio::spawn(async move { turn_after(&pacer, 1).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(pacer.waiting(), WAITING_BLOBS);
        assert_eq!(turn_after(&pacer, 1).await, Duration::ZERO);
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), LONGEST);
        }
    }
}
