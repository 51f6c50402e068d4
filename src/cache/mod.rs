//! The cache facade: content by digest (blobs on disk, the small ones served lately also in
//! memory; manifests on disk and in memory), tag records with a TTL, the single-flight table
//! for downloads in progress, and the pacing of their commits.
//!
//! The cache knows nothing of HTTP or upstreams: loaders are handed in by the caller
//! (`proxy`), and the cache makes sure each runs once however many requests wait for it.
//! Blocking file calls run on tokio's blocking pool.

pub mod hot;
pub mod index;
pub mod inflight;
pub mod lifecycle;
pub mod pacer;
pub mod slots;
pub mod store;
mod tags;

use crate::config::CacheConfig;
use crate::digest::Digest;
use crate::error::Error;
use crate::oci::RepoName;
use bytes::Bytes;
use index::{Budget, ReadGuard};
use inflight::{Fill, Inflight, Role};
use lifecycle::{parse_pin, Lifecycle, Pin};
use pacer::CommitPacer;
use slots::DownloadSlots;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use store::{ManifestMeta, Store, TempBlob};
pub use tags::{Listing, TagAnswer, TagKey};
use tags::{TagAnswerTtl, TagTtl};

/// A manifest with the media type it is served as.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// A stored blob, open, held in use while the guard lives.
pub struct BlobHit {
    pub file: Arc<File>,
    pub size: u64,
    /// The blob's first bytes, read with the opening (one trip to the blocking pool for a
    /// small blob, not two).
    pub first: Bytes,
    pub guard: ReadGuard,
}

/// Shared cache state.
pub struct Cache {
    store: Arc<Store>,
    lifecycle: Arc<Lifecycle>,
    inflight: Arc<Inflight>,
    /// When verified downloads are committed.
    pacer: Arc<CommitPacer>,
    /// The ceiling on downloads at once.
    slots: Arc<DownloadSlots>,
    /// Recently served manifests, weighed by size; also coalesces concurrent loads.
    manifests: moka::future::Cache<Digest, Arc<Manifest>>,
    /// Tag answers live for the tag TTL (stale ones a second); loading one coalesces
    /// concurrent revalidations.
    tags: moka::future::Cache<TagKey, TagAnswer>,
    /// Listings live for the tag TTL too.
    listings: moka::future::Cache<String, Listing>,
    /// The tag TTL in milliseconds (changeable by a reload; applies to answers loaded after it).
    tag_ttl_ms: Arc<AtomicU64>,
    /// The largest size any manifest fetched lately declared for a digest: a download without a
    /// `Content-Length` is cut off at the first byte beyond it. The largest, so that a manifest
    /// declaring too little (anyone can push one) can only loosen the bound, never break
    /// another repository's download of the same blob.
    declared_sizes: moka::sync::Cache<Digest, u64>,
    /// Links known to exist (`Store::link`), so that checking one costs no disk access.
    links: moka::sync::Cache<(String, String, Digest), ()>,
}

/// Descriptor sizes remembered (a few MiB of memory at most).
const DECLARED_SIZES: u64 = 200_000;
/// Repository links remembered in memory.
const LINKS_IN_MEMORY: u64 = 200_000;

impl Cache {
    /// Opens the cache directory for the server (purging downloads a previous run left) and
    /// indexes what it holds.
    pub fn open(config: &CacheConfig) -> io::Result<Cache> {
        let pins = parse_pins(&config.pin)?;
        let budget = Budget {
            max: config.max_size,
            high: config.high_watermark,
            low: config.low_watermark,
        };
        let store = Arc::new(Store::open(&config.dir)?);
        let lifecycle = Arc::new(Lifecycle::open(Arc::clone(&store), budget, pins)?);
        let (tag_ttl, manifest_memory_bytes) =
            (config.tag_ttl, config.manifest_memory_mib * 1024 * 1024);
        let manifests = moka::future::Cache::builder()
            .max_capacity(manifest_memory_bytes)
            .weigher(|_, m: &Arc<Manifest>| u32::try_from(m.bytes.len()).unwrap_or(u32::MAX))
            .build();
        let tag_ttl_ms = Arc::new(AtomicU64::new(tag_ttl.as_millis() as u64));
        let tags = moka::future::Cache::builder()
            .max_capacity(100_000)
            .expire_after(TagAnswerTtl(Arc::clone(&tag_ttl_ms)))
            .build();
        let listings = moka::future::Cache::builder()
            .max_capacity(64 * 1024 * 1024)
            .weigher(|k: &String, l: &Listing| {
                u32::try_from(k.len() + l.body.len()).unwrap_or(u32::MAX)
            })
            .expire_after(TagTtl(Arc::clone(&tag_ttl_ms)))
            .build();
        Ok(Cache {
            tag_ttl_ms,
            store,
            lifecycle,
            inflight: Arc::new(Inflight::default()),
            pacer: Arc::new(CommitPacer::default()),
            slots: Arc::new(DownloadSlots::new(config.max_downloads)),
            manifests,
            tags,
            listings,
            declared_sizes: moka::sync::Cache::new(DECLARED_SIZES),
            links: moka::sync::Cache::new(LINKS_IN_MEMORY),
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn lifecycle(&self) -> &Arc<Lifecycle> {
        &self.lifecycle
    }

    /// Applies the reloadable parts of a new cache configuration (TTL, budget, pins).
    pub fn reconfigure(&self, config: &CacheConfig) -> io::Result<()> {
        let pins = parse_pins(&config.pin)?;
        self.tag_ttl_ms
            .store(config.tag_ttl.as_millis() as u64, Ordering::Relaxed);
        let budget = Budget {
            max: config.max_size,
            high: config.high_watermark,
            low: config.low_watermark,
        };
        self.lifecycle.reconfigure(budget, pins);
        self.slots.resize(config.max_downloads);
        Ok(())
    }

    pub fn pacer(&self) -> &Arc<CommitPacer> {
        &self.pacer
    }

    /// The ceiling on downloads at once, and the downloads waiting for a slot.
    pub fn download_slots(&self) -> &Arc<DownloadSlots> {
        &self.slots
    }

    /// Downloads in progress, counting verified ones waiting to be committed.
    pub fn fills_in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Clients reading the download of `digest` as it arrives; `None` when none is in flight.
    pub fn download_readers(&self, digest: &Digest) -> Option<usize> {
        self.inflight.readers(digest)
    }

    /// Every download in progress (and verified one waiting for its commit), oldest first.
    pub fn downloads(&self) -> Vec<inflight::InProgress> {
        self.inflight.list()
    }

    /// Downloads under way: not counting verified ones waiting for (or in) their commit.
    pub fn downloads_in_flight(&self) -> usize {
        self.inflight.downloading()
    }

    /// The size of a blob downloaded and verified but not yet committed, if `digest` is one.
    pub fn verified_in_flight(&self, digest: &Digest) -> Option<u64> {
        self.inflight.verified(digest).map(|(_, size)| size)
    }

    /// A blob downloaded and verified but not yet committed, to follow like a download (its
    /// bytes are all in its file), without joining or starting a download otherwise.
    pub fn verified_download(&self, digest: &Digest) -> Option<Fill> {
        self.inflight.verified(digest).map(|(fill, _)| fill)
    }

    /// A stored blob, without joining or starting a download.
    pub async fn stored_blob(&self, digest: &Digest) -> io::Result<Option<BlobHit>> {
        if let Some(hit) = self.hot_hit(digest) {
            return Ok(Some(hit));
        }
        let lifecycle = Arc::clone(&self.lifecycle);
        let digest = digest.clone();
        blocking(move || open_hit(&lifecycle, &digest)).await
    }

    /// A stored blob, or the download in progress, or the duty to start one.
    pub async fn blob(&self, digest: &Digest) -> io::Result<Role<BlobHit, TempBlob>> {
        if let Some(hit) = self.hot_hit(digest) {
            return Ok(Role::Hit(hit));
        }
        let store = Arc::clone(&self.store);
        let lifecycle = Arc::clone(&self.lifecycle);
        let inflight = Arc::clone(&self.inflight);
        let digest = digest.clone();
        blocking(move || {
            inflight.join_or_lead(
                &digest,
                || open_hit(&lifecycle, &digest),
                || {
                    let temp = store.create_temp(&digest)?;
                    let reader = temp.file.try_clone()?;
                    Ok((temp, reader))
                },
                || lifecycle.indexed_blob_size(&digest).is_some(),
            )
        })
        .await
    }

    /// A small blob served lately, answered from memory (see [`hot`]).
    fn hot_hit(&self, digest: &Digest) -> Option<BlobHit> {
        let blob = self.lifecycle.hot().get(digest)?;
        let Some(guard) = self.lifecycle.hit_in_memory(digest) else {
            // Evicted since: the disk decides (and the download starts over if it is gone).
            self.lifecycle.hot().forget(digest);
            return None;
        };
        Some(BlobHit {
            size: blob.bytes.len() as u64,
            file: blob.file,
            first: blob.bytes,
            guard,
        })
    }

    /// The manifest with this digest if the cache holds it (memory or disk; one read from disk
    /// is kept in memory, so HEADs alone do not read the disk each time); never loads.
    pub async fn cached_manifest(&self, digest: &Digest) -> io::Result<Option<Arc<Manifest>>> {
        if let Some(m) = self.manifests.get(digest).await {
            return Ok(Some(m));
        }
        let store = Arc::clone(&self.store);
        let key = digest.clone();
        let Some((bytes, meta)) = blocking(move || store.get_manifest(&key)).await? else {
            return Ok(None);
        };
        let manifest = Arc::new(manifest_from_disk(digest.clone(), bytes, meta));
        self.manifests
            .insert(digest.clone(), Arc::clone(&manifest))
            .await;
        Ok(Some(manifest))
    }

    /// The manifest with this digest: from memory, disk, or `load` (run once for all waiters,
    /// its result stored on disk). A manifest in memory is answered without building `load`.
    pub async fn manifest<F, L>(&self, digest: &Digest, load: L) -> Result<Arc<Manifest>, Error>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<Manifest, Error>>,
    {
        if let Some(manifest) = self.manifests.get(digest).await {
            return Ok(manifest);
        }
        let store = Arc::clone(&self.store);
        let key = digest.clone();
        let init = async move {
            let disk_store = Arc::clone(&store);
            let disk_key = key.clone();
            if let Some((bytes, meta)) =
                blocking(move || disk_store.get_manifest(&disk_key)).await?
            {
                return Ok(Arc::new(manifest_from_disk(key, bytes, meta)));
            }
            let manifest = load().await?;
            self.put_manifest(&manifest).await?;
            Ok(Arc::new(manifest))
        };
        // Boxed: a hit's future need not carry room for a load.
        Box::pin(self.manifests.try_get_with(digest.clone(), init))
            .await
            .map_err(Error::Shared)
    }

    /// Stores a verified manifest on disk and in memory.
    pub async fn put_manifest(&self, manifest: &Manifest) -> io::Result<()> {
        let store = Arc::clone(&self.store);
        let m = manifest.clone();
        let lifecycle = Arc::clone(&self.lifecycle);
        blocking(move || {
            let meta = ManifestMeta {
                media_type: m.media_type.clone(),
            };
            store.put_manifest(&m.digest, &m.bytes, &meta)?;
            lifecycle.manifest_stored(&m.digest, m.bytes.len() as u64);
            Ok(())
        })
        .await?;
        self.manifests
            .insert(manifest.digest.clone(), Arc::new(manifest.clone()))
            .await;
        Ok(())
    }

    /// Records that upstream served these digests for `registry/repo` (a manifest and what it
    /// references, which a registry keeps in the same repository). A failure is logged, not
    /// returned: without the link the content is only confirmed upstream once more.
    pub async fn link(&self, registry: &str, repo: &RepoName, digests: Vec<Digest>) {
        let key = |d: &Digest| (registry.to_string(), repo.as_str().to_string(), d.clone());
        let new: Vec<Digest> = digests
            .into_iter()
            .filter(|d| !self.links.contains_key(&key(d)))
            .collect();
        if new.is_empty() {
            return;
        }
        let store = Arc::clone(&self.store);
        let (r, n, list) = (registry.to_string(), repo.clone(), new.clone());
        let written = blocking(move || {
            for digest in &list {
                store.link(&r, &n, digest)?;
            }
            Ok(())
        })
        .await;
        match written {
            Ok(()) => new.iter().for_each(|d| self.links.insert(key(d), ())),
            Err(e) => {
                tracing::warn!(%registry, %repo, error = %e, "cannot record content's repository")
            }
        }
    }

    /// Whether upstream served `digest` for `registry/repo` before.
    pub async fn is_linked(&self, registry: &str, repo: &RepoName, digest: &Digest) -> bool {
        let key = (
            registry.to_string(),
            repo.as_str().to_string(),
            digest.clone(),
        );
        if self.links.contains_key(&key) {
            return true;
        }
        let store = Arc::clone(&self.store);
        let (r, n, d) = (registry.to_string(), repo.clone(), digest.clone());
        let linked = blocking(move || Ok(store.is_linked(&r, &n, &d)))
            .await
            .unwrap_or(false);
        if linked {
            self.links.insert(key, ());
        }
        linked
    }

    /// Remembers the sizes a manifest declares for what it references.
    pub fn note_declared_sizes(&self, manifest: &[u8]) {
        for (digest, size) in crate::oci::descriptors(manifest) {
            let Some(size) = size else { continue };
            let largest = self
                .declared_sizes
                .get(&digest)
                .map_or(size, |known| known.max(size));
            self.declared_sizes.insert(digest, largest);
        }
    }

    /// The largest size a manifest fetched lately declared for `digest`, if any.
    pub fn declared_size(&self, digest: &Digest) -> Option<u64> {
        self.declared_sizes.get(digest)
    }
}

fn parse_pins(pins: &[String]) -> io::Result<Vec<Pin>> {
    pins.iter()
        .map(|p| {
            parse_pin(p).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cache.pin: {p:?} is not an image reference"),
                )
            })
        })
        .collect()
}

/// Opens a stored blob and records the hit.
fn open_hit(lifecycle: &Lifecycle, digest: &Digest) -> io::Result<Option<BlobHit>> {
    let Some((file, size)) = lifecycle.store().open_blob(digest)? else {
        return Ok(None);
    };
    let file = Arc::new(file);
    let first = crate::body::read_first(&file, size)?;
    let guard = lifecycle.hit(digest, size);
    if file.metadata()?.nlink() == 0 {
        // Removed since it was opened (evicted): served from what is open, not indexed again.
        lifecycle.forget_removed(digest);
    } else {
        lifecycle.hot().remember(digest, &file, size, &first);
    }
    Ok(Some(BlobHit {
        guard,
        file,
        size,
        first,
    }))
}

fn manifest_from_disk(digest: Digest, bytes: Vec<u8>, meta: ManifestMeta) -> Manifest {
    let media_type = Some(meta.media_type)
        .filter(|t| crate::oci::is_media_type(t))
        .or_else(|| crate::oci::sniff_manifest_type(&bytes))
        .unwrap_or_else(|| crate::oci::OCI_MANIFEST.to_string());
    Manifest {
        digest,
        media_type,
        bytes: Bytes::from(bytes),
    }
}

/// Runs a blocking file operation on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}
