//! Fetching an image's blobs ahead of its client. When an image manifest arrives from upstream,
//! its config and layers are downloaded in the background, a few at a time across all images
//! (`cache.prefetch_downloads`), so that a client asking for them one by one, or three at a
//! time as dockerd does, joins downloads already running or hits the cache: a cold pull gets
//! the upstream bandwidth without waiting for the client's next request.

use crate::app::App;
use crate::cache::inflight::{FillState, Role};
use crate::digest::Digest;
use crate::fill::{self, FillJob};
use crate::oci::RepoName;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// The downloads started ahead of clients, bounded across all images.
pub struct Prefetcher {
    /// One permit per download at once; `None` when prefetching is off.
    slots: Option<Arc<Semaphore>>,
}

impl Prefetcher {
    pub fn new(downloads_at_once: usize) -> Prefetcher {
        Prefetcher {
            slots: (downloads_at_once > 0).then(|| Arc::new(Semaphore::new(downloads_at_once))),
        }
    }

    /// Starts downloading `blobs` of `repo` that the cache neither holds nor is downloading, in
    /// order, as slots free up. Returns at once.
    pub fn start(&self, app: &App, registry: usize, repo: &RepoName, blobs: Vec<Digest>) {
        let Some(slots) = &self.slots else { return };
        let wanted: Vec<(Digest, FillJob)> = blobs
            .into_iter()
            .filter(|d| app.cache().lifecycle().indexed_blob_size(d).is_none())
            .map(|d| {
                let job = super::blob::fill_job(app, registry, repo, &d);
                (d, job)
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
                if cache.lifecycle().indexed_blob_size(&digest).is_some() {
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
