//! What a tag points to: the tag record upstream last confirmed, revalidated with a HEAD after
//! the TTL (HEADs do not count against Docker Hub's pull limit), and what happens when upstream
//! cannot confirm it.
//!
//! In a cluster, a tag's owner among the peers asks upstream for the fleet, and the others ask
//! it ([`from_owner`]); a replica that owns the tag, or whose owner cannot say, asks upstream.
//!
//! The last known mapping answers (stale, with a `Warning`) only when upstream could not be
//! asked: an outage or a rate limit. When the endpoints trusted with tags answer that the tag
//! is gone (404) or that the repository is refused (401, 403), the client is told so and the
//! record goes. A tag that moved while upstream cannot hand over the new manifest (a 429 pause
//! on manifest GETs, say) keeps its previous mapping until it can.

use super::manifest::{arrived, by_digest_quietly, canonical_accept, described, fetch_manifest};
use crate::app::App;
use crate::cache::store::TagRecord;
use crate::cache::{TagAnswer, TagKey};
use crate::cluster::OwnerTag;
use crate::digest::Digest;
use crate::error::Error;
use crate::oci::Reference;
use crate::upstream::{UpstreamError, UpstreamRequest};
use http::Method;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Loads a tag's answer after its TTL: from the tag's owner (with `ask_owner`, in a cluster),
/// else a HEAD upstream when a previous mapping is known, a GET otherwise; the previous
/// mapping, stale, when upstream cannot be asked.
pub(super) async fn revalidate(
    app: &App,
    key: TagKey,
    went_upstream: Arc<AtomicBool>,
    ask_owner: bool,
) -> Result<TagAnswer, Error> {
    went_upstream.store(true, Ordering::Relaxed);
    if ask_owner {
        if let Some(answer) = from_owner(app, &key).await {
            return Ok(answer);
        }
    }
    let upstream = app.upstream(key.registry);
    let Some(previous) = known_record(app, &key).await? else {
        return fetch_tag(app, &key, false).await;
    };
    match confirm(app, &key, &previous, ask_owner).await {
        Ok(answer) => Ok(answer),
        Err(e) if e.serves_stale() => stale(previous, e, &key),
        Err(e) => {
            // Gone or refused, as the endpoints trusted with tags say: the record goes. An
            // untrusted endpoint's 404, or any other refusal, leaves it.
            let gone = e
                .upstream()
                .is_some_and(|u| (u.authoritative && u.is_not_found()) || u.is_denial());
            if gone {
                app.cache().remove_tag_record(&upstream.name, &key).await?;
                if let Some(shared) = app.shared() {
                    let (repo, tag) = (key.repo.to_string(), key.tag.to_string());
                    shared.delete_tag(&upstream.name, &repo, &tag);
                }
                tracing::info!(repo = %key.repo, tag = %key.tag, error = %e, "upstream says the tag is gone or refused; its record is removed");
            }
            Err(e)
        }
    }
}

/// Asks upstream what the tag points to now (a HEAD; a GET when the HEAD's headers do not
/// say), with the previous mapping as the fallback for an unreachable upstream. A moved tag's
/// manifest is asked of its owner only with `ask_peers`.
async fn confirm(
    app: &App,
    key: &TagKey,
    previous: &TagRecord,
    ask_peers: bool,
) -> Result<TagAnswer, Error> {
    let upstream = app.upstream(key.registry);
    let (reference, accept) = (Reference::Tag(key.tag.clone()), canonical_accept());
    let request =
        UpstreamRequest::manifest(Method::HEAD, &key.repo, &reference, &accept).with_fallback();
    let answer = upstream.fetch(&request).await?;
    let Some((digest, media_type, size)) = described(answer.headers()) else {
        return fetch_tag(app, key, true).await;
    };
    if previous.digest != digest.to_string() {
        // Moved: the new manifest must be at hand before the tag points to it (a client told
        // the new digest would otherwise be refused the manifest while upstream pauses GETs).
        by_digest_quietly(app, key.registry, &key.repo, &digest, ask_peers)
            .await
            .map_err(|e| not_yet_there(e, &digest))?;
        tracing::info!(repo = %key.repo, tag = %key.tag, from = %previous.digest, to = %digest, "tag moved upstream");
    }
    record(app, key, &digest, &media_type, size).await
}

/// What the tag's owner in the cluster says the tag points to, with the manifest now at hand
/// and the mapping recorded here, confirmed when the owner's was (so that it runs out when the
/// owner's does). `None` when this replica owns the tag, or the owner could not say for sure
/// (it could not reach upstream either — this replica may —, its confirmation is older than
/// this replica's TTL, or it sent nothing usable or unsigned): upstream is asked directly
/// then. Not with `[auth]` on, for the reason the bucket's tag records are not used then
/// ([`known_record`]).
async fn from_owner(app: &App, key: &TagKey) -> Option<TagAnswer> {
    let cluster = app.cluster().filter(|_| app.access().is_none())?;
    let registry = &app.upstream(key.registry).name;
    // The manifest the tag pointed to here, if it is at hand: the owner then only says
    // whether it still does.
    let known = match app.cache().tag_record(registry, key).await.ok().flatten() {
        Some(record) => match record.digest.parse::<Digest>() {
            Ok(digest) => app.cache().cached_manifest(&digest).await.ok().flatten(),
            Err(_) => None,
        },
        None => None,
    };
    let accept = canonical_accept().join(", ");
    let known_digest = known.as_ref().map(|m| &m.digest);
    let told = cluster
        .read_tag(registry, &key.repo, &key.tag, &accept, known_digest)
        .await?;
    // Not believed: an owner that could not confirm the tag (this replica may reach upstream),
    // or whose confirmation is older than this replica's TTL (its own TTL is longer).
    let ttl = app.config().cache.tag_ttl;
    if told.signed.stale || told.signed.age >= ttl {
        return None;
    }
    let manifest = match told.answer {
        OwnerTag::Unchanged(_) => known?,
        OwnerTag::Points(manifest) => {
            if let Err(e) = app.cache().put_manifest(&manifest).await {
                tracing::warn!(digest = %manifest.digest, error = %e, "cannot store a manifest from the tag's owner");
                return None;
            }
            arrived(app, key.registry, &key.repo, &manifest);
            Arc::new(manifest)
        }
    };
    let age = told.signed.age;
    let confirmed_at = Instant::now().checked_sub(age)?;
    let size = manifest.bytes.len() as u64;
    let record = TagRecord {
        digest: manifest.digest.to_string(),
        media_type: manifest.media_type.clone(),
        size,
        checked_at: unix_now().saturating_sub(age.as_secs()),
    };
    // Kept for when neither the owner nor upstream can be asked; the owner put it in the bucket.
    if let Err(e) = app.cache().put_tag_record(registry, key, record).await {
        tracing::warn!(repo = %key.repo, tag = %key.tag, error = %e, "cannot record a tag");
    }
    tracing::debug!(repo = %key.repo, tag = %key.tag, digest = %manifest.digest, ?age, "tag confirmed by its owner");
    Some(TagAnswer {
        digest: manifest.digest.clone(),
        media_type: manifest.media_type.clone(),
        size,
        stale: false,
        recheck_after: None,
        confirmed_at,
    })
}

/// A tag that moved to a manifest upstream cannot hand over yet (replicas lagging behind the
/// tag, say) is as good as unreachable: its previous mapping answers meanwhile.
fn not_yet_there(error: Error, digest: &Digest) -> Error {
    if !error.upstream().is_some_and(|e| e.is_not_found()) {
        return error;
    }
    let message = format!("the tag moved to {digest}, which upstream does not serve yet: {error}");
    // Asked again in a while, not at every request.
    Error::Upstream(UpstreamError::outage(message).with_retry_after(Some(10)))
}

/// The tag's last known mapping: this replica's record, else the one the shared store holds
/// (what another replica last had confirmed; it stands in for a record of our own, and is
/// revalidated like one). With `[auth]` on, only this replica's own: a record from the bucket
/// would name a manifest no endpoint trusted with tags confirmed for this repository here.
async fn known_record(app: &App, key: &TagKey) -> Result<Option<TagRecord>, Error> {
    let registry = &app.upstream(key.registry).name;
    if let Some(record) = app.cache().tag_record(registry, key).await? {
        return Ok(Some(record));
    }
    let Some(shared) = app.shared().filter(|_| app.access().is_none()) else {
        return Ok(None);
    };
    let (repo, tag) = (key.repo.to_string(), key.tag.to_string());
    Ok(shared.read_tag(registry, &repo, &tag).await)
}

/// The tag's last known mapping on this replica, marked stale, if there is one (asked before
/// every pass-through of a narrower `Accept`: the bucket is not asked on that path).
pub(super) async fn last_known(app: &App, key: &TagKey) -> Option<TagAnswer> {
    let registry = &app.upstream(key.registry).name;
    let record = app.cache().tag_record(registry, key).await.ok()??;
    Some(TagAnswer {
        digest: record.digest.parse().ok()?,
        media_type: record.media_type,
        size: record.size,
        stale: true,
        recheck_after: None,
        confirmed_at: Instant::now(),
    })
}

/// The last known mapping, marked stale.
fn stale(previous: TagRecord, error: Error, key: &TagKey) -> Result<TagAnswer, Error> {
    let Ok(digest) = previous.digest.parse::<Digest>() else {
        return Err(error);
    };
    tracing::warn!(repo = %key.repo, tag = %key.tag, %digest, error = %error, "upstream unreachable; serving the last known tag mapping");
    Ok(TagAnswer {
        digest,
        media_type: previous.media_type,
        size: previous.size,
        stale: true,
        recheck_after: error
            .upstream()
            .and_then(|e| e.retry_after)
            .map(Duration::from_secs),
        confirmed_at: Instant::now(),
    })
}

/// GET of a tag with every modern manifest type accepted: stores the manifest and the mapping.
/// `has_fallback`: a previous mapping answers if upstream cannot be asked.
async fn fetch_tag(app: &App, key: &TagKey, has_fallback: bool) -> Result<TagAnswer, Error> {
    let (reference, accept) = (Reference::Tag(key.tag.clone()), canonical_accept());
    let mut request = UpstreamRequest::manifest(Method::GET, &key.repo, &reference, &accept);
    if has_fallback {
        request = request.with_fallback();
    }
    let what = format!("{}:{}", key.repo, key.tag);
    let manifest = fetch_manifest(app, key.registry, &key.repo, &request, None, &what).await?;
    app.cache().put_manifest(&manifest).await?;
    let size = manifest.bytes.len() as u64;
    record(app, key, &manifest.digest, &manifest.media_type, size).await
}

/// Records what upstream confirmed the tag points to.
async fn record(
    app: &App,
    key: &TagKey,
    digest: &Digest,
    media_type: &str,
    size: u64,
) -> Result<TagAnswer, Error> {
    let record = TagRecord {
        digest: digest.to_string(),
        media_type: media_type.to_string(),
        size,
        checked_at: unix_now(),
    };
    let registry = &app.upstream(key.registry).name;
    if let Some(shared) = app.shared() {
        let (repo, tag) = (key.repo.to_string(), key.tag.to_string());
        shared.upload_tag(registry, &repo, &tag, record.clone());
    }
    app.cache().put_tag_record(registry, key, record).await?;
    Ok(TagAnswer {
        digest: digest.clone(),
        media_type: media_type.to_string(),
        size,
        stale: false,
        recheck_after: None,
        confirmed_at: Instant::now(),
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
