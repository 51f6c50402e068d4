//! What stays on disk: the index rebuilt from the store at start-up, recency on every hit, the
//! byte budget (evict least recently used blobs from the high to the low watermark), pinned
//! images, the disk-full state, and the small blobs kept open for fast hits (which eviction
//! lets go with the blob).
//!
//! Every call blocks (file system work) except [`Lifecycle::hit_in_memory`]; async callers use
//! the blocking pool.

use super::hot::HotBlobs;
use super::index::{Budget, Index, Kind, Placed, ReadGuard, Usage};
use super::store::{Store, TempBlob};
use crate::digest::Digest;
use crate::oci::{self, ImageRef, Reference};
use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// After the disk filled up, misses bypass the cache for this long before trying again.
const DISK_FULL_BACKOFF: Duration = Duration::from_secs(30);
/// The least an emergency eviction tries to free.
const MIN_ROOM: u64 = 64 * 1024 * 1024;

/// An image that is never evicted (`registry/repository:tag` or `...@sha256:...`).
pub type Pin = ImageRef;

/// Parses a pin: the registry must be named.
pub fn parse_pin(text: &str) -> Option<Pin> {
    ImageRef::parse(text, None)
}

/// Owner of the index and of eviction.
pub struct Lifecycle {
    store: Arc<Store>,
    index: Arc<Index>,
    pins: Mutex<Vec<Pin>>,
    /// An eviction run is under way.
    evicting: AtomicBool,
    disk_full_until: Mutex<Option<Instant>>,
    /// Blobs evicted since start-up.
    evictions: AtomicU64,
    hot: HotBlobs,
}

impl Lifecycle {
    /// Indexes what the store holds.
    pub fn open(store: Arc<Store>, budget: Budget, pins: Vec<Pin>) -> io::Result<Lifecycle> {
        let index = Arc::new(Index::new(budget));
        let mut found = store.scan()?;
        found.sort_by_key(|f| f.modified);
        for found in found {
            let kind = if found.manifest {
                Kind::Manifest
            } else {
                Kind::Blob
            };
            index.insert(found.digest, found.size, kind, found.modified);
        }
        Ok(Lifecycle {
            store,
            index,
            pins: Mutex::new(pins),
            evicting: AtomicBool::new(false),
            disk_full_until: Mutex::new(None),
            evictions: AtomicU64::new(0),
            hot: HotBlobs::default(),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Small blobs kept open (see [`HotBlobs`]).
    pub fn hot(&self) -> &HotBlobs {
        &self.hot
    }

    pub fn usage(&self) -> Usage {
        self.index.usage()
    }

    pub fn budget(&self) -> Budget {
        self.index.budget()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// A new budget and pins (configuration reload); applied at the next eviction.
    pub fn reconfigure(&self, budget: Budget, pins: Vec<Pin>) {
        self.index.set_budget(budget);
        *self.pins.lock().expect("pins lock poisoned") = pins;
    }

    /// A place in the order of use for a download of `size` bytes just verified: its commit
    /// may wait (see [`super::pacer`]), and meanwhile the blob ranks by when it was fetched and
    /// its bytes count against the budget.
    pub fn place(&self, size: u64) -> Placed {
        self.index.place(size, now())
    }

    /// Commits a verified download at the place it took.
    pub fn commit(&self, temp: TempBlob, digest: &Digest, placed: Placed) -> io::Result<()> {
        self.store.commit(temp, digest)?;
        self.index.insert_placed(digest.clone(), placed);
        Ok(())
    }

    /// Counts a stored manifest.
    pub fn manifest_stored(&self, digest: &Digest, size: u64) {
        self.index
            .insert(digest.clone(), size, Kind::Manifest, now());
    }

    /// The size of a stored blob, from memory: what a HEAD needs, without touching the disk.
    pub fn indexed_blob_size(&self, digest: &Digest) -> Option<u64> {
        self.index.blob_size(digest)
    }

    /// Records a hit: refreshes recency (on disk at most hourly) and marks the blob in use
    /// until the returned guard is dropped.
    pub fn hit(&self, digest: &Digest, size: u64) -> ReadGuard {
        let now = now();
        let (guard, persist) = self.index.hit(digest, size, now);
        if persist {
            if let Err(e) = self.store.touch(digest, now) {
                tracing::debug!(%digest, error = %e, "cannot record recency");
            }
        }
        guard
    }

    /// A hit on a blob the index holds, recorded in memory (a recency due on disk is written
    /// on the blocking pool); `None` when the blob is not indexed. For async callers that
    /// already hold the blob's bytes.
    pub fn hit_in_memory(&self, digest: &Digest) -> Option<ReadGuard> {
        let now = now();
        let (guard, persist) = self.index.hit_if_indexed(digest, now)?;
        if persist {
            let (store, digest) = (Arc::clone(&self.store), digest.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) = store.touch(&digest, now) {
                    tracing::debug!(%digest, error = %e, "cannot record recency");
                }
            });
        }
        Some(guard)
    }

    /// A blob whose file was removed (evicted, or by another process) after a hit opened it:
    /// neither indexed nor kept open from now on.
    pub fn forget_removed(&self, digest: &Digest) {
        self.index.remove(digest);
        self.hot.forget(digest);
    }

    /// Evicts down to the low watermark when usage passed the high one. One run at a time: a
    /// caller that finds one under way leaves it to that run, which looks again when it is done
    /// (commits released together by the pacer arrive at once).
    pub fn enforce_budget(&self) {
        while self.index.over_high_watermark() && !self.evicting.swap(true, Ordering::AcqRel) {
            let evicted = match self.index.low_target() {
                Some(target) => self.evict_to(target, "budget").0,
                None => 0,
            };
            // Acquires what a caller that left it to this run inserted before it looked.
            self.evicting.swap(false, Ordering::AcqRel);
            if evicted == 0 {
                break; // everything left is pinned or being read
            }
        }
    }

    /// Evicts down to `target` bytes of blobs now (`regmirror gc`); returns (blobs, bytes).
    pub fn evict_to(&self, target: u64, why: &str) -> (usize, u64) {
        self.evict_reporting(target, why, &crate::progress::Silent)
    }

    /// [`Lifecycle::evict_to`], telling `progress` what it chose and each blob it deletes.
    pub fn evict_reporting(
        &self,
        target: u64,
        why: &str,
        progress: &dyn crate::progress::Report,
    ) -> (usize, u64) {
        let pinned = self.pinned();
        let evicted = self.index.evict_to(target, &pinned);
        progress.planned(evicted.len() as u64, evicted.iter().map(|(_, s)| s).sum());
        let mut bytes = 0;
        for (digest, size) in &evicted {
            match self.store.remove_blob(digest) {
                Ok(()) => bytes += size,
                Err(e) => tracing::error!(%digest, error = %e, "cannot delete an evicted blob"),
            }
            progress.done(1, *size);
            // Once more: a hit that opened the file before it left the index recorded it again.
            self.forget_removed(digest);
        }
        if !evicted.is_empty() {
            self.evictions
                .fetch_add(evicted.len() as u64, Ordering::Relaxed);
            let usage = self.index.usage();
            tracing::info!(
                reason = why,
                blobs = evicted.len(),
                bytes,
                usage_bytes = usage.blob_bytes,
                waiting_bytes = usage.waiting_bytes,
                "evicted least recently used blobs"
            );
        }
        (evicted.len(), bytes)
    }

    /// The disk is full: evicts at least `needed` bytes (and at least 64 MiB). Returns
    /// whether anything was freed.
    pub fn make_room(&self, needed: u64) -> bool {
        let usage = self.index.usage().on_disk();
        let mut target = usage.saturating_sub(needed.max(MIN_ROOM));
        if let Some(low) = self.index.low_target() {
            target = target.min(low);
        }
        self.evict_to(target, "disk full").0 > 0
    }

    pub fn mark_disk_full(&self) {
        *self
            .disk_full_until
            .lock()
            .expect("disk-full lock poisoned") = Some(Instant::now() + DISK_FULL_BACKOFF);
    }

    /// Whether misses should bypass the cache because the disk was full a moment ago.
    pub fn disk_full(&self) -> bool {
        let state = self
            .disk_full_until
            .lock()
            .expect("disk-full lock poisoned");
        state.is_some_and(|until| Instant::now() < until)
    }

    /// Every digest the pinned images need that the store knows of: the index, the platform
    /// manifests stored so far, their configs and layers.
    pub fn pinned(&self) -> HashSet<Digest> {
        let mut pinned = HashSet::new();
        let pins = self.pins.lock().expect("pins lock poisoned").clone();
        for pin in &pins {
            let root = match &pin.reference {
                Reference::Digest(d) => Some(d.clone()),
                Reference::Tag(tag) => self
                    .store
                    .get_tag(&pin.registry, &pin.repo, tag)
                    .ok()
                    .flatten()
                    .and_then(|r| r.digest.parse().ok()),
            };
            if let Some(root) = root {
                self.collect(root, &mut pinned);
            }
        }
        pinned
    }

    fn collect(&self, digest: Digest, into: &mut HashSet<Digest>) {
        if !into.insert(digest.clone()) {
            return;
        }
        if let Ok(Some((bytes, _))) = self.store.get_manifest(&digest) {
            for child in oci::references(&bytes) {
                self.collect(child, into);
            }
        }
    }

    /// Every indexed entry, for `ls`.
    pub fn entries(&self) -> Vec<(Digest, u64, Kind, u64)> {
        self.index.entries()
    }

    /// Forgets content removed behind the index's back (`verify`).
    pub fn forget(&self, digest: &Digest) {
        self.hot.forget(digest);
        self.index.remove(digest);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Tag;

    #[test]
    fn pins_parse() {
        let p = parse_pin("docker.io/alpine:3.20").unwrap();
        assert_eq!(p.repo.as_str(), "library/alpine");
        assert_eq!(p.reference, Reference::Tag(Tag::parse("3.20").unwrap()));
        let p = parse_pin("registry.example:5000/org/app").unwrap();
        assert_eq!(p.registry, "registry.example:5000");
        assert_eq!(p.reference, Reference::Tag(Tag::parse("latest").unwrap()));
        let d = Digest::of(b"x");
        let p = parse_pin(&format!("ghcr.io/org/app@{d}")).unwrap();
        assert_eq!(p.reference, Reference::Digest(d));
        assert!(parse_pin("alpine").is_none());
        assert!(parse_pin("ghcr.io/Org/app:1").is_none());
    }
}
