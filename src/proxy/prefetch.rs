//! Fetching an image's blobs ahead of its client. When a client's request for a layer starts
//! a download, the other blobs of the image it belongs to (as its manifest, fetched from
//! upstream lately, lists them) start downloading in the background, a few at a time across
//! all images (`cache.prefetch_downloads`). A client that asks for layers one by one, or three
//! at a time as dockerd does, then joins downloads already running or hits the cache.
//!
//! A manifest alone starts nothing, nor does a config: tools that only inspect images (which
//! read manifests and configs, never layers) cost no layer downloads.

use crate::app::App;
use crate::cache::inflight::{FillState, Role};
use crate::digest::Digest;
use crate::fill::{self, FillJob};
use crate::oci::RepoName;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Images remembered for prefetching: layers of the images whose manifests arrived lately.
const REMEMBERED_LAYERS: u64 = 16 * 1024;

/// The downloads started ahead of clients, bounded across all images.
pub struct Prefetcher {
    /// One permit per download at once; `None` when prefetching is off.
    slots: Option<Arc<Semaphore>>,
    /// Each layer of an image whose manifest arrived from upstream lately, with that image's
    /// blobs; forgotten once one of them started the rest.
    images: moka::sync::Cache<Digest, Arc<Image>>,
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
            images: moka::sync::Cache::new(REMEMBERED_LAYERS),
        }
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
            self.images.insert(layer.clone(), Arc::clone(&image));
        }
    }

    /// A client's request for `digest` started its download: when it is a layer of an image
    /// remembered, the image's other blobs start downloading too. Returns at once.
    pub fn layer_missed(&self, app: &App, digest: &Digest) {
        let Some(image) = self.images.get(digest) else {
            return;
        };
        for layer in &image.blobs[1..] {
            self.images.invalidate(layer);
        }
        self.start(app, &image);
    }

    /// Starts no more downloads (the server is stopping); those running go on.
    pub fn stop(&self) {
        if let Some(slots) = &self.slots {
            slots.close();
        }
    }

    /// Starts downloading the image's blobs that the cache neither holds nor is downloading,
    /// in order, as slots free up. Nothing while the disk is full: clients are passed through.
    fn start(&self, app: &App, image: &Image) {
        let Some(slots) = &self.slots else { return };
        if app.cache().lifecycle().disk_full() {
            return;
        }
        let wanted: Vec<(Digest, FillJob)> = image
            .blobs
            .iter()
            .filter(|d| app.cache().lifecycle().indexed_blob_size(d).is_none())
            .map(|d| {
                let job = super::blob::fill_job(app, image.registry, &image.repo, d);
                (d.clone(), job)
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let (slots, cache) = (Arc::clone(slots), Arc::clone(app.cache()));
        let started = app.metrics().prefetches_counter();
        tokio::spawn(async move {
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
                        tracing::debug!(%digest, "prefetching");
                        fill::spawn(job, permit, temp);
                        let mut progress = fill.progress;
                        // The slot is taken until the download has an outcome.
                        tokio::spawn(async move {
                            let _ = progress
                                .wait_for(|s| {
                                    !matches!(s, FillState::Starting | FillState::Streaming { .. })
                                })
                                .await;
                            drop(slot);
                        });
                    }
                    // Stored by another process, or a client's download is already running.
                    Ok(Role::Hit(_) | Role::Follower(_)) => {}
                    Err(e) => tracing::warn!(%digest, error = %e, "cannot prefetch"),
                }
            }
        });
    }
}
