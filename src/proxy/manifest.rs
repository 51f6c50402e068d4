//! Manifests: by digest from memory or disk (fetched and verified once on a miss); by tag through
//! a tag record that upstream revalidates with a HEAD after the TTL, served stale with a
//! `Warning` when upstream cannot be asked.
//!
//! Tag answers are recorded only for clients that accept every modern manifest type, since only
//! then is upstream's answer the same for all of them; other clients are passed through.

use super::provenance::{confirm, Content};
use super::{body_unless_head, Outcome};
use crate::app::App;
use crate::body::ResponseBody;
use crate::cache::store::TagRecord;
use crate::cache::{Manifest, TagAnswer, TagKey};
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::oci::{self, AcceptSet, Reference, RepoName, Tag, DOCKER_CONTENT_DIGEST};
use crate::upstream::{Answer, UpstreamError, UpstreamRequest};
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
    match reference {
        Reference::Digest(digest) if head => {
            head_by_digest(app, registry, repo, digest, outcome).await
        }
        Reference::Digest(digest) => {
            let manifest = by_digest(app, registry, repo, digest, outcome).await?;
            if *outcome == Outcome::Hit {
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
                    revalidate(app, key.clone(), Arc::clone(&went_upstream))
                })
                .await?;
            *outcome = match (answer.stale, went_upstream.load(Ordering::Relaxed)) {
                (true, _) => Outcome::Stale,
                (false, true) => Outcome::Miss,
                (false, false) => Outcome::Hit,
            };
            if head {
                let size = answer.size as usize;
                return Ok(respond_head(
                    &answer.digest,
                    &answer.media_type,
                    size,
                    answer.stale,
                ));
            }
            let mut ignored = Outcome::None;
            let manifest = by_digest(app, registry, repo, &answer.digest, &mut ignored).await?;
            Ok(respond(
                &manifest.digest,
                &manifest.media_type,
                manifest.bytes.clone(),
                false,
                answer.stale,
            ))
        }
        Reference::Tag(tag) => {
            // A narrower Accept gets what upstream gives every client when the tag's current
            // answer is of a type it accepts; otherwise only upstream can say.
            let key = TagKey::new(app, registry, repo, tag);
            if let Some(answer) = app.cache().peek_tag(&key).await {
                if !answer.stale && accept.accepts(&answer.media_type) {
                    *outcome = Outcome::Hit;
                    if head {
                        return Ok(respond_head(
                            &answer.digest,
                            &answer.media_type,
                            answer.size as usize,
                            false,
                        ));
                    }
                    let mut ignored = Outcome::None;
                    let manifest =
                        by_digest(app, registry, repo, &answer.digest, &mut ignored).await?;
                    return Ok(respond(
                        &manifest.digest,
                        &manifest.media_type,
                        manifest.bytes.clone(),
                        false,
                        false,
                    ));
                }
            }
            *outcome = Outcome::Bypass;
            pass_through(app, registry, repo, tag, &accept, head).await
        }
    }
}

/// A manifest by digest: memory, disk, or upstream (verified), one load for all waiters.
async fn by_digest(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    outcome: &mut Outcome,
) -> Result<Arc<Manifest>, Error> {
    let went_upstream = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&went_upstream);
    let load = || async move {
        flag.store(true, Ordering::Relaxed);
        let accept = canonical_accept();
        let reference = Reference::Digest(digest.clone());
        let request = UpstreamRequest::manifest(Method::GET, repo, &reference, &accept);
        let answer = app.upstream(registry).fetch(&request).await?;
        let manifest =
            read_upstream_manifest(app, registry, repo, answer, &format!("{repo}@{digest}"))
                .await?;
        if &manifest.digest != digest {
            app.upstream(registry).mismatch();
            return Err(Error::BadContent(format!(
                "upstream answered {digest} with content whose digest is {}",
                manifest.digest
            )));
        }
        Ok(manifest)
    };
    let manifest = app.cache().manifest(digest, load).await?;
    *outcome = if went_upstream.load(Ordering::Relaxed) {
        Outcome::Miss
    } else {
        Outcome::Hit
    };
    Ok(manifest)
}

/// A HEAD by digest: from the cache, else a HEAD upstream (which, unlike a GET, does not
/// count as a pull on Docker Hub); nothing is stored.
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
    let request = UpstreamRequest::manifest(Method::HEAD, repo, &reference, &accept);
    let answer = app.upstream(registry).fetch(&request).await?;
    if answer.status() == StatusCode::NOT_FOUND {
        return Err(Error::coded(
            Code::ManifestUnknown,
            format!("manifest {repo}@{digest} not found upstream"),
        ));
    }
    match described(answer.headers()) {
        Some((claimed, media_type, size)) if &claimed == digest => {
            Ok(respond_head(digest, &media_type, size as usize, false))
        }
        Some((claimed, ..)) => Err(Error::BadContent(format!(
            "upstream answered {digest} with {claimed}"
        ))),
        None => {
            // Upstream's HEAD does not say enough: fetch (and cache) the manifest instead.
            let m = by_digest(app, registry, repo, digest, outcome).await?;
            Ok(respond_head(&m.digest, &m.media_type, m.bytes.len(), false))
        }
    }
}

/// Loads a tag's answer after its TTL: a HEAD upstream when a previous mapping is known (HEADs
/// do not count against Docker Hub's pull limit), a GET otherwise; the last mapping when
/// upstream cannot be asked.
async fn revalidate(
    app: &App,
    key: TagKey,
    went_upstream: Arc<AtomicBool>,
) -> Result<TagAnswer, Error> {
    went_upstream.store(true, Ordering::Relaxed);
    let upstream = app.upstream(key.registry);
    let Some(previous) = app.cache().tag_record(&upstream.name, &key).await? else {
        return fetch_tag(app, &key).await;
    };
    let (reference, accept) = (Reference::Tag(key.tag.clone()), canonical_accept());
    let request = UpstreamRequest::manifest(Method::HEAD, &key.repo, &reference, &accept);
    let head = upstream.fetch(&request).await;
    match head {
        Ok(answer) if answer.status() == StatusCode::NOT_FOUND => {
            app.cache().remove_tag_record(&upstream.name, &key).await?;
            Err(manifest_unknown(&key.repo, &key.tag))
        }
        Ok(answer) => match described(answer.headers()) {
            Some((digest, media_type, size)) => {
                let record = TagRecord {
                    digest: digest.to_string(),
                    media_type: media_type.clone(),
                    size,
                    checked_at: unix_now(),
                };
                app.cache()
                    .put_tag_record(&upstream.name, &key, record)
                    .await?;
                Ok(TagAnswer {
                    digest,
                    media_type,
                    size,
                    stale: false,
                })
            }
            None => fetch_tag(app, &key).await,
        },
        Err(e) => stale_or(previous, e, &key),
    }
}

fn stale_or(previous: TagRecord, error: UpstreamError, key: &TagKey) -> Result<TagAnswer, Error> {
    let Ok(digest) = previous.digest.parse::<Digest>() else {
        return Err(error.into());
    };
    tracing::warn!(repo = %key.repo, tag = %key.tag, %digest, error = %error, "upstream unreachable; serving the last known tag mapping");
    Ok(TagAnswer {
        digest,
        media_type: previous.media_type,
        size: previous.size,
        stale: true,
    })
}

/// GET of a tag with every modern manifest type accepted: stores the manifest and the mapping.
async fn fetch_tag(app: &App, key: &TagKey) -> Result<TagAnswer, Error> {
    let upstream = app.upstream(key.registry);
    let (reference, accept) = (Reference::Tag(key.tag.clone()), canonical_accept());
    let request = UpstreamRequest::manifest(Method::GET, &key.repo, &reference, &accept);
    let answer = upstream.fetch(&request).await?;
    if answer.status() == StatusCode::NOT_FOUND {
        return Err(manifest_unknown(&key.repo, &key.tag));
    }
    let what = format!("{}:{}", key.repo, key.tag);
    let manifest = read_upstream_manifest(app, key.registry, &key.repo, answer, &what).await?;
    app.cache().put_manifest(&manifest).await?;
    let record = TagRecord {
        digest: manifest.digest.to_string(),
        media_type: manifest.media_type.clone(),
        size: manifest.bytes.len() as u64,
        checked_at: unix_now(),
    };
    app.cache()
        .put_tag_record(&upstream.name, key, record)
        .await?;
    Ok(TagAnswer {
        digest: manifest.digest,
        media_type: manifest.media_type,
        size: manifest.bytes.len() as u64,
        stale: false,
    })
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
) -> Result<Response<ResponseBody>, Error> {
    let method = if head { Method::HEAD } else { Method::GET };
    let reference = Reference::Tag(tag.clone());
    let request = UpstreamRequest::manifest(method, repo, &reference, accept.types());
    let answer = app.upstream(registry).fetch(&request).await?;
    if answer.status() == StatusCode::NOT_FOUND {
        return Err(manifest_unknown(repo, tag));
    }
    if head {
        let (digest, media_type, size) = described(answer.headers()).ok_or_else(|| {
            Error::BadContent(format!(
                "upstream HEAD of {repo}:{tag} lacks digest, type or length"
            ))
        })?;
        return Ok(respond_head(&digest, &media_type, size as usize, false));
    }
    let what = format!("{repo}:{tag}");
    let manifest = read_upstream_manifest(app, registry, repo, answer, &what).await?;
    app.cache().put_manifest(&manifest).await?;
    Ok(respond(
        &manifest.digest,
        &manifest.media_type,
        manifest.bytes,
        false,
        false,
    ))
}

/// A manifest from upstream for `repo`, checked; it and what it references are linked to the
/// repository (they are served there without asking upstream again), and the sizes it declares
/// for its blobs are remembered (they bound downloads sent without a length).
async fn read_upstream_manifest(
    app: &App,
    registry: usize,
    repo: &RepoName,
    answer: Answer,
    what: &str,
) -> Result<Manifest, Error> {
    let manifest = read_manifest(answer, what).await?;
    app.cache().note_declared_sizes(&manifest.bytes);
    let mut served = crate::oci::references(&manifest.bytes);
    served.push(manifest.digest.clone());
    app.cache()
        .link(&app.routes()[registry].name, repo, served)
        .await;
    let blobs = crate::oci::image_blobs(&manifest.media_type, &manifest.bytes);
    app.prefetcher().image_arrived(registry, repo, blobs);
    Ok(manifest)
}

/// Reads and checks a manifest answer: at most 4 MiB, and the digest upstream claims (if any)
/// must be the digest of the bytes.
async fn read_manifest(answer: Answer, what: &str) -> Result<Manifest, Error> {
    if answer.status() == StatusCode::NOT_FOUND {
        return Err(Error::coded(
            Code::ManifestUnknown,
            format!("manifest {what} not found upstream"),
        ));
    }
    let claimed = header_digest(answer.headers());
    let content_type = media_type_of(answer.headers());
    let bytes = answer
        .bytes(oci::MAX_MANIFEST_BYTES)
        .await
        .map_err(|e| match e {
            UpstreamError::TooLarge(_) => {
                Error::BadContent(format!("manifest {what} is larger than 4 MiB"))
            }
            other => other.into(),
        })?;
    let digest = Digest::of(&bytes);
    if let Some(claimed) = claimed {
        if claimed != digest {
            return Err(Error::BadContent(format!(
                "manifest {what}: upstream claims {claimed}, content is {digest}"
            )));
        }
    }
    let media_type = content_type
        .filter(|t| t != "application/json" && t != "text/plain")
        .or_else(|| oci::sniff_manifest_type(&bytes))
        .unwrap_or_else(|| oci::OCI_MANIFEST.to_string());
    Ok(Manifest {
        digest,
        media_type,
        bytes,
    })
}

/// Digest, media type and size from an upstream manifest answer's headers, when all are there.
fn described(headers: &HeaderMap) -> Option<(Digest, String, u64)> {
    let digest = header_digest(headers)?;
    let media_type = media_type_of(headers)?;
    let size = crate::upstream::content_length(headers)?;
    Some((digest, media_type, size))
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get(DOCKER_CONTENT_DIGEST)?
        .to_str()
        .ok()?
        .parse()
        .ok()
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

fn manifest_unknown(repo: &RepoName, tag: &Tag) -> Error {
    Error::coded(
        Code::ManifestUnknown,
        format!("manifest {repo}:{tag} not found upstream"),
    )
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
