//! The ceiling on blob downloads at once (`cache.max_downloads`), clients' and prefetches'
//! together. A download takes a slot before it asks upstream and keeps it until its bytes are
//! verified (or it fails); downloads beyond the ceiling wait in order. Each running download
//! holds two blocking threads and two open files, so the ceiling is what keeps a crowd of cold
//! pulls from starving lookups and hits of threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The download slots and the downloads waiting for one.
#[derive(Debug)]
pub struct DownloadSlots {
    semaphore: Arc<Semaphore>,
    /// The ceiling now (slots in use plus free, once a shrink has taken effect).
    size: Mutex<usize>,
    queued: Arc<AtomicUsize>,
}

/// A running download's slot; freed when dropped.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

/// Counts a download while it waits.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl DownloadSlots {
    pub fn new(size: usize) -> DownloadSlots {
        DownloadSlots {
            semaphore: Arc::new(Semaphore::new(size)),
            size: Mutex::new(size),
            queued: Arc::default(),
        }
    }

    /// Waits for a free slot, in order.
    pub async fn acquire(&self) -> Slot {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(Arc::clone(&self.queued));
        let permit = Arc::clone(&self.semaphore)
            .acquire_owned()
            .await
            .expect("the download slots are never closed");
        Slot(permit)
    }

    /// Downloads waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Downloads holding a slot.
    pub fn running(&self) -> usize {
        let size = *self.size.lock().expect("slots lock poisoned");
        size.saturating_sub(self.semaphore.available_permits())
    }

    /// A new ceiling (configuration reload). Growing frees slots at once; shrinking retires
    /// slots as running downloads give them back.
    pub fn resize(&self, new: usize) {
        let mut size = self.size.lock().expect("slots lock poisoned");
        if new > *size {
            self.semaphore.add_permits(new - *size);
        } else if new < *size {
            let retire = u32::try_from(*size - new).unwrap_or(u32::MAX);
            let semaphore = Arc::clone(&self.semaphore);
            tokio::spawn(async move {
                if let Ok(permits) = semaphore.acquire_many_owned(retire).await {
                    permits.forget();
                }
            });
        }
        *size = new;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn downloads_beyond_the_ceiling_wait_in_order() {
        let slots = Arc::new(DownloadSlots::new(2));
        let first = slots.acquire().await;
        let _second = slots.acquire().await;
        assert_eq!((slots.running(), slots.queued()), (2, 0));
        let waiting = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.acquire().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(slots.queued(), 1);
        assert!(!waiting.is_finished());
        drop(first);
        let _third = waiting.await.unwrap();
        assert_eq!((slots.running(), slots.queued()), (2, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_smaller_ceiling_retires_slots_as_they_come_back() {
        let slots = DownloadSlots::new(3);
        let a = slots.acquire().await;
        let b = slots.acquire().await;
        slots.resize(1);
        tokio::task::yield_now().await;
        drop(a);
        drop(b);
        tokio::task::yield_now().await;
        // One slot is left: a second download waits.
        let _only = slots.acquire().await;
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(1), slots.acquire())
                .await
                .is_err()
        );
        slots.resize(2);
        let _again = slots.acquire().await;
    }
}
