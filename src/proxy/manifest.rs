//! Manifests: by digest from memory or disk (fetched and verified once on a miss, from the
//! first endpoint whose answer checks out); by tag through a tag record ([`super::tag`]) that
//! upstream revalidates with a HEAD after the TTL, served stale with a `Warning` when upstream
//! cannot be asked.
//!
//! Tag answers are recorded only for clients that accept every modern manifest type, since only
//! then is upstream's answer the same for all of them; other clients are passed through.

use super::provenance::{confirm, Content};
use super::{body_unless_head, Outcome};
use crate::app::App;
use crate::body::ResponseBody;
use crate::cache::{Manifest, TagAnswer, TagKey};
use crate::digest::Digest;
use crate::error::Error;
use crate::oci::{self, AcceptSet, Reference, RepoName, Tag, DOCKER_CONTENT_DIGEST};
use crate::upstream::{Answer, Failure, RegistryUpstream, UpstreamError, UpstreamRequest};
use bytes::Bytes;
use http::{header, HeaderMap, Method, Response, StatusCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The `Warning` sent with a tag answer upstream could not confirm.
const STALE_WARNING: &str =
    r#"299 - "regmirror: upstream unreachable; serving the last known digest for this tag""#;

pub async fn serve(
    app: &App,
    registry: usize,
    repo: &RepoName,
    reference: &Reference,
    headers: &HeaderMap,
    head: bool,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let accept = AcceptSet::from_headers(headers);
    // A peer's request never goes on to another peer for what was asked.
    let from_peer = headers.contains_key(crate::cluster::signature::PEER_HEADER);
    match reference {
        Reference::Digest(digest) if head => {
            head_by_digest(app, registry, repo, digest, outcome).await
        }
        Reference::Digest(digest) => {
            let manifest = by_digest(app, registry, repo, digest, !from_peer, outcome).await?;
            // Stored, or fetched from a content-only endpoint (which answers by digest for any
            // repository): served here only if the repository holds it. A trusted endpoint's
            // answer was linked to the repository as it came. A peer confirms it for its
            // own client.
            if !from_peer {
                confirm(app, registry, repo, digest, Content::Manifest).await?;
            }
            Ok(respond(
                &manifest.digest,
                &manifest.media_type,
                manifest.bytes.clone(),
                head,
                false,
            ))
        }
        Reference::Tag(tag) if accept.is_canonical() => {
            let key = TagKey::new(app, registry, repo, tag);
            let went_upstream = Arc::new(AtomicBool::new(false));
            let answer = app
                .cache()
                .tag(&key, || {
                    let went_upstream = Arc::clone(&went_upstream);
                    super::tag::revalidate(app, key.clone(), went_upstream, !from_peer)
                })
                .await?;
            *outcome = match (answer.stale, went_upstream.load(Ordering::Relaxed)) {
                (true, _) => Outcome::Stale,
                (false, true) => Outcome::Miss,
                (false, false) => Outcome::Hit,
            };
            let mut response = if !head && names_etag(headers, &answer.digest) {
                not_modified(&answer)
            } else {
                answer_tag(app, registry, repo, &answer, head, !from_peer).await?
            };
            let age = answer.confirmed_at.elapsed();
            if !answer.stale {
                response
                    .headers_mut()
                    .insert(header::AGE, age.as_secs().into());
            }
            if let (true, Some(cluster)) = (from_peer, app.cluster()) {
                sign_for_peer(cluster, headers, &mut response, &answer, age);
            }
            Ok(response)
        }
        Reference::Tag(tag) => {
            // A narrower Accept gets what upstream gives every client when the tag's current
            // answer is of a type it accepts; otherwise only upstream can say.
            let key = TagKey::new(app, registry, repo, tag);
            if let Some(answer) = app.cache().peek_tag(&key).await {
                if !answer.stale && accept.accepts(&answer.media_type) {
                    *outcome = Outcome::Hit;
                    return answer_tag(app, registry, repo, &answer, head, !from_peer).await;
                }
            }
            *outcome = Outcome::Bypass;
            // The last known digest answers when upstream cannot be asked, if this client
            // takes its type (and then no endpoint backing off is waited for).
            let fallback = super::tag::last_known(app, &key)
                .await
                .filter(|answer| accept.accepts(&answer.media_type));
            let has_fallback = fallback.is_some();
            match pass_through(app, registry, repo, tag, &accept, head, has_fallback).await {
                Err(e) if e.serves_stale() && has_fallback => {
                    let answer = fallback.expect("checked");
                    tracing::warn!(%repo, %tag, digest = %answer.digest, error = %e, "upstream unreachable; serving the last known tag mapping");
                    *outcome = Outcome::Stale;
                    answer_tag(app, registry, repo, &answer, head, !from_peer).await
                }
                answered => answered,
            }
        }
    }
}

/// Whether the client's `If-None-Match` names `digest` (it has that manifest).
fn names_etag(headers: &HeaderMap, digest: &Digest) -> bool {
    let digest = digest.to_string();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|tag| tag.trim().trim_start_matches("W/").trim_matches('"') == digest)
}

/// `304 Not Modified` for a client that has the manifest the tag points to (as distribution
/// answers): the headers of the answer, no body.
fn not_modified(answer: &TagAnswer) -> Response<ResponseBody> {
    let mut response = respond_head(&answer.digest, &answer.media_type, 0, answer.stale);
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    response.headers_mut().remove(header::CONTENT_LENGTH);
    response
}

/// Signs a tag's answer for the peer that asked (its digest, age and staleness cannot be
/// checked by its bytes).
fn sign_for_peer(
    cluster: &crate::cluster::Cluster,
    request: &HeaderMap,
    response: &mut Response<ResponseBody>,
    answer: &TagAnswer,
    age: std::time::Duration,
) {
    use crate::cluster::signature::{SignedAnswer, ANSWER_HEADER, PEER_HEADER};
    let Some(signature) = request.get(PEER_HEADER) else {
        return;
    };
    let signed = SignedAnswer {
        age,
        stale: answer.stale,
    };
    let (status, digest) = (response.status().as_u16(), answer.digest.to_string());
    let value = cluster
        .signer()
        .sign_answer(signature, status, &digest, &signed);
    response.headers_mut().insert(ANSWER_HEADER, value);
}

/// The answer for a tag that resolves to `answer` (marked stale if it is).
async fn answer_tag(
    app: &App,
    registry: usize,
    repo: &RepoName,
    answer: &TagAnswer,
    head: bool,
    ask_peers: bool,
) -> Result<Response<ResponseBody>, Error> {
    let (digest, media_type) = (&answer.digest, &answer.media_type);
    if head {
        let size = answer.size as usize;
        return Ok(respond_head(digest, media_type, size, answer.stale));
    }
    let manifest = by_digest_quietly(app, registry, repo, digest, ask_peers).await?;
    Ok(respond(
        &manifest.digest,
        &manifest.media_type,
        manifest.bytes.clone(),
        false,
        answer.stale,
    ))
}

/// A manifest by digest: memory, disk, the bucket, the peer that owns it (with `ask_peers`),
/// or upstream (verified), one load for all waiters.
async fn by_digest(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    ask_peers: bool,
    outcome: &mut Outcome,
) -> Result<Arc<Manifest>, Error> {
    let went_upstream = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&went_upstream);
    let load = || async move {
        flag.store(true, Ordering::Relaxed);
        if let Some(manifest) = from_shared_store(app, registry, repo, digest).await {
            return Ok(manifest);
        }
        if let (true, Some(cluster)) = (ask_peers, app.cluster()) {
            let name = &app.routes()[registry].name;
            if let Some(manifest) = cluster.read_manifest(name, repo, digest).await {
                arrived(app, registry, repo, &manifest);
                return Ok(manifest);
            }
        }
        let accept = canonical_accept();
        let reference = Reference::Digest(digest.clone());
        let request = UpstreamRequest::manifest(Method::GET, repo, &reference, &accept);
        let what = format!("{repo}@{digest}");
        fetch_manifest(app, registry, repo, &request, Some(digest), &what).await
    };
    let manifest = app.cache().manifest(digest, load).await?;
    *outcome = if went_upstream.load(Ordering::Relaxed) {
        Outcome::Miss
    } else {
        Outcome::Hit
    };
    Ok(manifest)
}

/// A manifest by digest from the shared store, checked there (it hashes to its name and is a
/// manifest). Like a content-only endpoint's, its answer links nothing to the repository.
async fn from_shared_store(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
) -> Option<Manifest> {
    let manifest = app.shared()?.read_manifest(digest).await?;
    arrived(app, registry, repo, &manifest);
    Some(manifest)
}

/// What a manifest from the bucket or a peer sets going: the sizes it declares are
/// remembered, and its blobs may be fetched ahead of the client.
pub(super) fn arrived(app: &App, registry: usize, repo: &RepoName, manifest: &Manifest) {
    app.cache().note_declared_sizes(&manifest.bytes);
    let blobs = crate::oci::image_blobs(&manifest.media_type, &manifest.bytes);
    app.prefetcher().image_arrived(registry, repo, blobs);
}

/// A manifest by digest, for a caller that only needs it at hand.
pub(super) async fn by_digest_quietly(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    ask_peers: bool,
) -> Result<Arc<Manifest>, Error> {
    by_digest(app, registry, repo, digest, ask_peers, &mut Outcome::None).await
}

/// A HEAD by digest: from the cache, else a HEAD to the endpoints trusted with tags (which,
/// unlike a GET, does not count as a pull on Docker Hub; their answer is what a client going
/// direct would get), else the manifest fetched, verified and stored, so that the size and
/// type answered are those of verified content. A content-only endpoint's headers are never
/// passed on: a wrong size there would break digest-pinned pulls at size validation.
async fn head_by_digest(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    if let Some(m) = app.cache().cached_manifest(digest).await? {
        *outcome = Outcome::Hit;
        confirm(app, registry, repo, digest, Content::Manifest).await?;
        return Ok(respond_head(&m.digest, &m.media_type, m.bytes.len(), false));
    }
    *outcome = Outcome::Bypass;
    let (reference, accept) = (Reference::Digest(digest.clone()), canonical_accept());
    let request = UpstreamRequest::manifest(Method::HEAD, repo, &reference, &accept).trusted_only();
    let check = |answer: Answer| {
        std::future::ready(match described(answer.headers()) {
            Some((claimed, ..)) if &claimed != digest => Err(UpstreamError::bad_content(format!(
                "{} answered {digest} with {claimed}",
                answer.endpoint
            ))),
            // A generic type: only the manifest's JSON says which it is, as for a GET.
            Some((_, media_type, _)) if oci::is_generic_type(&media_type) => Ok(None),
            found => Ok(found),
        })
    };
    match app.upstream(registry).fetch_with(&request, check).await {
        Ok(Some((_, media_type, size))) => {
            Ok(respond_head(digest, &media_type, size as usize, false))
        }
        // The trusted endpoints say it does not exist: so be it.
        Err(e) if e.failure == Failure::NotFound && e.authoritative => Err(e.into()),
        // Not said, or not said enough (no trusted endpoint answered, or its HEAD lacks a
        // header): fetch, verify and store the manifest instead, from any endpoint.
        Ok(None) | Err(_) => {
            let m = by_digest(app, registry, repo, digest, true, outcome).await?;
            confirm(app, registry, repo, digest, Content::Manifest).await?;
            Ok(respond_head(&m.digest, &m.media_type, m.bytes.len(), false))
        }
    }
}

/// A tag asked for with a narrower `Accept`: upstream's answer is for this client only, so
/// the manifest is stored by digest but no tag mapping is recorded.
async fn pass_through(
    app: &App,
    registry: usize,
    repo: &RepoName,
    tag: &Tag,
    accept: &AcceptSet,
    head: bool,
    has_fallback: bool,
) -> Result<Response<ResponseBody>, Error> {
    let method = if head { Method::HEAD } else { Method::GET };
    let reference = Reference::Tag(tag.clone());
    let mut request = UpstreamRequest::manifest(method, repo, &reference, accept.types());
    if has_fallback {
        request = request.with_fallback();
    }
    if head {
        let check = |answer: Answer| {
            std::future::ready(described(answer.headers()).ok_or_else(|| {
                UpstreamError::bad_content(format!(
                    "{}: HEAD of {repo}:{tag} lacks digest, type or length",
                    answer.endpoint
                ))
            }))
        };
        let (digest, media_type, size) = app.upstream(registry).fetch_with(&request, check).await?;
        return Ok(respond_head(&digest, &media_type, size as usize, false));
    }
    let what = format!("{repo}:{tag}");
    let manifest = fetch_manifest(app, registry, repo, &request, None, &what).await?;
    app.cache().put_manifest(&manifest).await?;
    Ok(respond(
        &manifest.digest,
        &manifest.media_type,
        manifest.bytes,
        false,
        false,
    ))
}

/// A manifest from upstream for `repo`: the first endpoint whose answer checks out (see
/// [`read_manifest`]; bad content moves on to the next). The sizes it declares for its blobs
/// are remembered (they bound downloads sent without a length). When an endpoint trusted with
/// tags served it, it and the blobs its registry serves for it are linked to the repository
/// (served there without asking upstream again): a content-only endpoint answers by digest
/// for any repository, so its answer says nothing of what this one holds.
pub(super) async fn fetch_manifest(
    app: &App,
    registry: usize,
    repo: &RepoName,
    request: &UpstreamRequest,
    expected: Option<&Digest>,
    what: &str,
) -> Result<Manifest, Error> {
    let upstream = app.upstream(registry);
    let read = |answer: Answer| {
        let endpoint = answer.endpoint_index;
        async move {
            Ok((
                read_manifest(answer, expected, what, upstream).await?,
                endpoint,
            ))
        }
    };
    let (manifest, endpoint) = Box::pin(upstream.fetch_with(request, read)).await?;
    app.cache().note_declared_sizes(&manifest.bytes);
    if let Some(shared) = app.shared() {
        shared.upload_manifest(&manifest);
    }
    if upstream.resolves_tags(endpoint) {
        let mut served = crate::oci::served_references(&manifest.bytes);
        served.push(manifest.digest.clone());
        app.cache()
            .link(&app.routes()[registry].name, repo, served)
            .await;
    }
    let blobs = crate::oci::image_blobs(&manifest.media_type, &manifest.bytes);
    app.prefetcher().image_arrived(registry, repo, blobs);
    Ok(manifest)
}

/// Reads and checks a manifest answer: at most 4 MiB, and its digest must be the one asked for
/// (`expected`) and the one upstream claims, if any.
async fn read_manifest(
    answer: Answer,
    expected: Option<&Digest>,
    what: &str,
    upstream: &RegistryUpstream,
) -> Result<Manifest, UpstreamError> {
    let endpoint = answer.endpoint.clone();
    let claimed = oci::content_digest(answer.headers());
    let content_type = media_type_of(answer.headers());
    let bytes = answer
        .bytes(oci::MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| match e.failure {
            Failure::BadContent => UpstreamError::bad_content(format!(
                "{endpoint}: manifest {what} is larger than 4 MiB"
            )),
            _ => e,
        })?;
    let digest = Digest::of(&bytes);
    for wanted in [expected, claimed.as_ref()].into_iter().flatten() {
        if wanted != &digest {
            upstream.mismatch();
            return Err(UpstreamError::bad_content(format!(
                "{endpoint}: manifest {what} should be {wanted}, its content is {digest}"
            )));
        }
    }
    if !oci::is_manifest_document(&bytes) {
        return Err(UpstreamError::bad_content(format!(
            "{endpoint}: {what} answered as a manifest is not one"
        )));
    }
    let media_type = content_type
        .filter(|t| !oci::is_generic_type(t))
        .or_else(|| oci::sniff_manifest_type(&bytes))
        .unwrap_or_else(|| oci::OCI_MANIFEST.to_string());
    Ok(Manifest {
        digest,
        media_type,
        bytes,
    })
}

/// Digest, media type and size from an upstream manifest answer's headers, when all are there.
pub(super) fn described(headers: &HeaderMap) -> Option<(Digest, String, u64)> {
    let digest = oci::content_digest(headers)?;
    let media_type = media_type_of(headers)?;
    let size = crate::upstream::content_length(headers)?;
    Some((digest, media_type, size))
}

fn media_type_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let media = value.split(';').next()?.trim();
    oci::is_media_type(media).then(|| media.to_string())
}

/// The `Accept` values the mirror sends for its own manifest requests.
pub(super) fn canonical_accept() -> Vec<String> {
    oci::CANONICAL_MANIFEST_TYPES
        .iter()
        .map(|t| t.to_string())
        .collect()
}

fn respond(
    digest: &Digest,
    media_type: &str,
    bytes: Bytes,
    head: bool,
    stale: bool,
) -> Response<ResponseBody> {
    let size = bytes.len();
    let builder = headers(digest, media_type, size, stale);
    builder
        .body(body_unless_head(bytes, head))
        .expect("manifest headers are valid")
}

fn respond_head(
    digest: &Digest,
    media_type: &str,
    size: usize,
    stale: bool,
) -> Response<ResponseBody> {
    headers(digest, media_type, size, stale)
        .body(crate::body::empty())
        .expect("manifest headers are valid")
}

fn headers(digest: &Digest, media_type: &str, size: usize, stale: bool) -> http::response::Builder {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media_type)
        .header(header::CONTENT_LENGTH, size)
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""));
    if stale {
        builder = builder.header(header::WARNING, STALE_WARNING);
    }
    builder
}
