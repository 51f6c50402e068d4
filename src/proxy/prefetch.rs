//! Fetching an image's blobs ahead of its client. When a client's request for a layer starts
//! a download, the other blobs of the image it belongs to (as its manifest, fetched from
//! upstream lately, lists them) start downloading in the background, a few at a time across
//! all images (`cache.prefetch_downloads`). A client that asks for layers one by one, or three
//! at a time as dockerd does, then joins downloads already running or hits the cache.
//!
//! They ramp up: while each download finishes within [`RAMP`], the next starts after it, and
//! the first after the client's own. Against a fast upstream one at a time stays well ahead of
//! the client, and the client's download keeps the bandwidth (and, with the client on the same
//! host, the CPU) to itself; the first download that takes longer opens every slot.
//!
//! A manifest alone starts nothing, nor does a config: tools that only inspect images (which
//! read manifests and configs, never layers) cost no layer downloads. Only a miss in the
//! registry and repository the manifest came from starts its image. The first client to get a
//! blob downloaded ahead of it is counted as a miss (its bytes were not saved), not a hit.

use crate::app::App;
use crate::cache::inflight::{FillState, Role};
use crate::digest::Digest;
use crate::fill::{self, FillJob};
use crate::oci::RepoName;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Memory for images remembered for prefetching, in blob digests: each layer key weighs its
/// whole image, so this bounds what they hold however they are made.
const REMEMBERED_WEIGHT: u64 = 64 * 1024;
/// Blobs downloaded ahead of clients and not yet served, remembered to count their first client.
const UNCLAIMED: u64 = 4 * 1024;
/// Downloads ahead of clients run one at a time while each finishes within this.
const RAMP: Duration = Duration::from_millis(250);

/// A layer of an image remembered, where its manifest came from.
type LayerKey = (usize, RepoName, Digest);

/// The downloads started ahead of clients, bounded across all images.
pub struct Prefetcher {
    /// One permit per download at once; `None` when prefetching is off.
    slots: Option<Arc<Semaphore>>,
    /// Each layer of an image whose manifest arrived from upstream lately, with that image's
    /// blobs; forgotten once one of them started the rest.
    images: moka::sync::Cache<LayerKey, Arc<Image>>,
    /// Blobs downloaded ahead of clients that no client has been served yet.
    unclaimed: moka::sync::Cache<Digest, ()>,
    /// Images whose blobs are still being handed to downloads (waiting for the ramp or a slot).
    runs: Arc<AtomicUsize>,
}

/// Counts one image's run while it lives.
struct Run(Arc<AtomicUsize>);

impl Run {
    fn begin(runs: &Arc<AtomicUsize>) -> Run {
        runs.fetch_add(1, Ordering::SeqCst);
        Run(Arc::clone(runs))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The blobs of one image manifest, config first, and where they come from.
struct Image {
    registry: usize,
    repo: RepoName,
    blobs: Vec<Digest>,
}

impl Prefetcher {
    pub fn new(downloads_at_once: usize) -> Prefetcher {
        Prefetcher {
            slots: (downloads_at_once > 0).then(|| Arc::new(Semaphore::new(downloads_at_once))),
            images: moka::sync::Cache::builder()
                .max_capacity(REMEMBERED_WEIGHT)
                .weigher(|_, image: &Arc<Image>| image.blobs.len().try_into().unwrap_or(u32::MAX))
                .build(),
            unclaimed: moka::sync::Cache::new(UNCLAIMED),
            runs: Arc::default(),
        }
    }

    /// Images whose blobs are still being handed to downloads. A client's miss that starts an
    /// image counts here before its response begins; once this is 0 again, every download the
    /// prefetcher meant to start has started (or never will).
    pub fn runs_in_progress(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Remembers an image manifest that arrived from upstream: its config, then its layers.
    pub fn image_arrived(&self, registry: usize, repo: &RepoName, blobs: Vec<Digest>) {
        if self.slots.is_none() || blobs.len() < 2 {
            return;
        }
        let image = Arc::new(Image {
            registry,
            repo: repo.clone(),
            blobs,
        });
        for layer in &image.blobs[1..] {
            let key = (registry, repo.clone(), layer.clone());
            self.images.insert(key, Arc::clone(&image));
        }
    }

    /// A client's request for `digest` in `repo` started its download (`download`): when it is
    /// a layer of an image remembered from there, the image's other blobs start downloading
    /// too (once: the image is forgotten). Returns at once.
    pub fn layer_missed(
        &self,
        app: &App,
        registry: usize,
        repo: &RepoName,
        digest: &Digest,
        download: watch::Receiver<FillState>,
    ) {
        let key = (registry, repo.clone(), digest.clone());
        let Some(image) = self.images.remove(&key) else {
            return;
        };
        for layer in &image.blobs[1..] {
            self.images
                .invalidate(&(registry, repo.clone(), layer.clone()));
        }
        self.start(app, &image, download);
    }

    /// Whether `digest` was downloaded ahead of clients and this is its first client (who is
    /// then counted as a miss: upstream sent those bytes for it).
    pub fn claim(&self, digest: &Digest) -> bool {
        // Every hit asks: a read first, so that the usual answer (no) records no write.
        self.unclaimed.contains_key(digest) && self.unclaimed.remove(digest).is_some()
    }

    /// Download slots free now (0 when prefetching is off).
    pub fn free_slots(&self) -> usize {
        self.slots.as_ref().map_or(0, |s| s.available_permits())
    }

    /// Whether [`Prefetcher::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.slots.as_ref().is_none_or(|s| s.is_closed())
    }

    /// Starts no more downloads (the server is stopping); those running go on.
    pub fn stop(&self) {
        if let Some(slots) = &self.slots {
            slots.close();
        }
    }

    /// Starts downloading the image's blobs that the cache neither holds nor is downloading,
    /// in order, ramping up after the client's `download`, as slots free up. Nothing while the
    /// disk is full: clients are passed through.
    fn start(&self, app: &App, image: &Image, download: watch::Receiver<FillState>) {
        let Some(slots) = &self.slots else { return };
        if app.cache().lifecycle().disk_full() {
            return;
        }
        let wanted: Vec<(Digest, FillJob)> = image
            .blobs
            .iter()
            .filter(|d| app.cache().lifecycle().indexed_blob_size(d).is_none())
            .map(|d| {
                let job = FillJob {
                    ahead_of_clients: true,
                    ..super::blob::fill_job(app, image.registry, &image.repo, d)
                };
                (d.clone(), job)
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let (slots, cache) = (Arc::clone(slots), Arc::clone(app.cache()));
        let unclaimed = self.unclaimed.clone();
        let started = app.metrics().prefetches_counter();
        let run = Run::begin(&self.runs);
        tokio::spawn(async move {
            let _run = run;
            let mut one_at_a_time = finished_within(download, RAMP).await;
            for (digest, job) in wanted {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let lifecycle = cache.lifecycle();
                if lifecycle.disk_full() || lifecycle.indexed_blob_size(&digest).is_some() {
                    continue;
                }
                match cache.blob(&digest).await {
                    Ok(Role::Leader(permit, fill, temp)) => {
                        started.inc();
                        unclaimed.insert(digest.clone(), ());
                        tracing::debug!(%digest, "prefetching");
                        fill::spawn(job, permit, temp);
                        // The slot is taken until the download has an outcome.
                        let progress = fill.progress.clone();
                        tokio::spawn(async move {
                            finished(progress).await;
                            drop(slot);
                        });
                        if one_at_a_time {
                            one_at_a_time = finished_within(fill.progress, RAMP).await;
                        }
                    }
                    // Stored by another process, or a client's download is already running.
                    Ok(Role::Hit(_) | Role::Follower(_)) => {}
                    Err(e) => tracing::warn!(%digest, error = %e, "cannot prefetch"),
                }
            }
        });
    }
}

/// Returns when a download has an outcome (verified, failed or abandoned).
async fn finished(mut progress: watch::Receiver<FillState>) {
    let _ = progress
        .wait_for(|s| !matches!(s, FillState::Starting | FillState::Streaming { .. }))
        .await;
}

/// Whether a download has an outcome within `limit`.
async fn finished_within(progress: watch::Receiver<FillState>, limit: Duration) -> bool {
    tokio::time::timeout(limit, finished(progress))
        .await
        .is_ok()
}
