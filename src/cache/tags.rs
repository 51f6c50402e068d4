//! What tags and listings resolve to: answers kept in memory for the tag TTL (stale ones only
//! until upstream may answer again), loaded once for all waiters, and the tag records kept on
//! disk.

use super::{blocking, Cache};
use crate::cache::store::TagRecord;
use crate::digest::Digest;
use crate::error::Error;
use crate::oci::{RepoName, Tag};
use bytes::Bytes;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a tag resolves to, and whether upstream confirmed it recently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagAnswer {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// Upstream could not be asked: this is the last known mapping.
    pub stale: bool,
    /// For a stale answer: when upstream may answer again (the end of its back-off or of its
    /// rate-limit pause), so that it is asked again then, not before.
    pub recheck_after: Option<Duration>,
    /// When upstream confirmed it (here, or at the tag's owner in a cluster): a fresh answer
    /// lives for the tag TTL from then.
    pub confirmed_at: Instant,
}

/// A tag of a repository of a registry: the index of a configured registry, and its name,
/// since a reload may give the index to another registry while answers cached before it live.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TagKey {
    pub registry: usize,
    registry_name: String,
    pub repo: RepoName,
    pub tag: Tag,
}

impl TagKey {
    pub fn new(app: &crate::app::App, registry: usize, repo: &RepoName, tag: &Tag) -> TagKey {
        TagKey {
            registry,
            registry_name: app.upstream(registry).name.clone(),
            repo: repo.clone(),
            tag: tag.clone(),
        }
    }
}

/// A small upstream listing (a `tags/list` page, a referrers index), or the fact there is none.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    pub body: Bytes,
    /// The pagination `Link` header, if upstream sent one.
    pub link: Option<String>,
    /// Upstream had it (false: it answered 404).
    pub found: bool,
}

/// Expiry by the current tag TTL.
pub(super) struct TagTtl(pub(super) Arc<AtomicU64>);

/// How long a stale tag answer (upstream could not confirm it) is kept at least before it is
/// asked again; it is kept until upstream may answer again (`recheck_after`), and never beyond
/// the tag TTL: an upstream that is back is noticed soon.
const STALE_TAG_TTL: Duration = Duration::from_secs(1);

/// Tag answers live for the tag TTL; stale ones briefly.
pub(super) struct TagAnswerTtl(pub(super) Arc<AtomicU64>);

impl moka::Expiry<TagKey, TagAnswer> for TagAnswerTtl {
    fn expire_after_create(
        &self,
        _key: &TagKey,
        answer: &TagAnswer,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let ttl = Duration::from_millis(self.0.load(Ordering::Relaxed).max(1));
        let recheck = answer.recheck_after.unwrap_or_default().max(STALE_TAG_TTL);
        let left = ttl.saturating_sub(answer.confirmed_at.elapsed());
        Some(if answer.stale {
            ttl.min(recheck)
        } else {
            ttl.min(left)
        })
    }
}

impl<K, V> moka::Expiry<K, V> for TagTtl {
    fn expire_after_create(
        &self,
        _key: &K,
        _value: &V,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(self.0.load(Ordering::Relaxed).max(1)))
    }
}

impl Cache {
    /// The tag's answer if one is fresh in memory; never loads.
    pub async fn peek_tag(&self, key: &TagKey) -> Option<TagAnswer> {
        self.tags.get(key).await
    }

    /// The tag's answer: fresh from memory (without building `load`), or from `load` (run
    /// once for all waiters).
    pub async fn tag<F, L>(&self, key: &TagKey, load: L) -> Result<TagAnswer, Error>
    where
        L: FnOnce() -> F,
        F: Future<Output = Result<TagAnswer, Error>>,
    {
        if let Some(answer) = self.tags.get(key).await {
            return Ok(answer);
        }
        Box::pin(
            self.tags
                .try_get_with(key.clone(), async move { load().await }),
        )
        .await
        .map_err(Error::Shared)
    }

    /// A listing: fresh from memory, or from `load` (run once for all waiters).
    pub async fn listing<F>(&self, key: String, load: F) -> Result<Listing, Error>
    where
        F: Future<Output = Result<Listing, Error>>,
    {
        self.listings
            .try_get_with(key, load)
            .await
            .map_err(Error::Shared)
    }

    /// The tag record kept on disk (the last mapping upstream confirmed).
    pub async fn tag_record(&self, registry: &str, key: &TagKey) -> io::Result<Option<TagRecord>> {
        let store = Arc::clone(&self.store);
        let (registry, repo, tag) = (registry.to_string(), key.repo.clone(), key.tag.clone());
        blocking(move || store.get_tag(&registry, &repo, &tag)).await
    }

    pub async fn put_tag_record(
        &self,
        registry: &str,
        key: &TagKey,
        record: TagRecord,
    ) -> io::Result<()> {
        let store = Arc::clone(&self.store);
        let (registry, repo, tag) = (registry.to_string(), key.repo.clone(), key.tag.clone());
        blocking(move || store.put_tag(&registry, &repo, &tag, &record)).await
    }

    pub async fn remove_tag_record(&self, registry: &str, key: &TagKey) -> io::Result<()> {
        let store = Arc::clone(&self.store);
        let (registry, repo, tag) = (registry.to_string(), key.repo.clone(), key.tag.clone());
        blocking(move || store.remove_tag(&registry, &repo, &tag)).await
    }
}
