//! Blobs: from the store (Range aware), or by following the one download in progress, which
//! the first request for an uncached blob starts. A HEAD of an uncached blob asks upstream with a
//! HEAD and starts nothing.

use super::provenance::{confirm, Content};
use super::Outcome;
use crate::app::App;
use crate::body::{self, Continuation, ResponseBody, WindowSize, WithGuard};
use crate::cache::inflight::{Fill, FillState, Role};
use crate::cache::BlobHit;
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::fill::{self, FillJob};
use crate::oci::{RepoName, DOCKER_CONTENT_DIGEST};
use crate::range::{self, Plan};
use crate::upstream::{Answer, UpstreamError, UpstreamRequest};
use http::{header, HeaderMap, Method, Response, StatusCode};
use std::sync::Arc;

/// What a blob request asks, as routed: the blob, how (HEAD; the request's headers) and the
/// body windows its connection takes.
pub struct BlobRequest<'a> {
    pub registry: usize,
    pub repo: &'a RepoName,
    pub digest: &'a Digest,
    pub headers: &'a HeaderMap,
    pub head: bool,
    pub window: WindowSize,
    /// Asked by a peer of the cluster: the download never asks another peer, and the
    /// repository's membership is the asking replica's to confirm.
    pub from_peer: bool,
}

pub async fn serve(
    app: &App,
    request: BlobRequest<'_>,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let BlobRequest {
        registry,
        repo,
        digest,
        headers,
        head,
        window,
        from_peer,
    } = request;

    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    if head {
        return serve_head(app, registry, repo, digest, range, outcome).await;
    }
    if app.cache().lifecycle().disk_full() {
        if let Some(hit) = app.cache().stored_blob(digest).await? {
            *outcome = Outcome::Hit;
            confirm_blob(app, from_peer, registry, repo, digest).await?;
            return Ok(respond_hit(app, digest, hit, range, window));
        }
        // Verified and waiting for its commit: its bytes are on the disk already.
        if let Some(fill) = app.cache().verified_download(digest) {
            *outcome = Outcome::Join;
            confirm_blob(app, from_peer, registry, repo, digest).await?;
            if let Some(response) =
                follow_fill(app, registry, repo, digest, fill, range, window).await?
            {
                return Ok(response);
            }
        }
        *outcome = Outcome::Bypass;
        return pass_through(app, registry, repo, digest).await;
    }
    // A download whose leader went away before it started is started over; a few times at most.
    for _ in 0..RESTARTS {
        let followed = match app.cache().blob(digest).await? {
            Role::Hit(hit) => {
                *outcome = first_client_of_prefetch(app, digest).unwrap_or(Outcome::Hit);
                confirm_blob(app, from_peer, registry, repo, digest).await?;
                return Ok(respond_hit(app, digest, hit, range, window.clone()));
            }
            Role::Follower(fill) => {
                *outcome = first_client_of_prefetch(app, digest).unwrap_or(Outcome::Join);
                confirm_blob(app, from_peer, registry, repo, digest).await?;
                follow_fill(app, registry, repo, digest, fill, range, window.clone()).await?
            }
            Role::Leader(permit, fill, temp) => {
                *outcome = Outcome::Miss;
                let mut job = fill_job(app, registry, repo, digest);
                if from_peer {
                    job.cluster = None;
                }
                fill::spawn(job, permit, temp);
                // The asking replica's clients pull the image: it prefetches, not this one.
                if !from_peer {
                    let download = fill.progress.clone();
                    app.prefetcher()
                        .layer_missed(app, registry, repo, digest, download);
                }
                follow_fill(app, registry, repo, digest, fill, range, window.clone()).await?
            }
        };
        if let Some(response) = followed {
            return Ok(response);
        }
        tracing::debug!(%digest, "a download was abandoned before it started; starting over");
    }
    Err(Error::coded(
        Code::Unavailable,
        format!("the download of {digest} was abandoned {RESTARTS} times"),
    ))
}

/// A miss for the first client of a blob downloaded ahead of it: upstream sent those bytes for
/// it, so they were not saved.
fn first_client_of_prefetch(app: &App, digest: &Digest) -> Option<Outcome> {
    app.prefetcher().claim(digest).then_some(Outcome::Miss)
}

/// Confirms `repo` holds the blob (see [`confirm`]), unless a peer asks: the replica that
/// asks confirms it for its own client.
async fn confirm_blob(
    app: &App,
    from_peer: bool,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
) -> Result<(), Error> {
    if from_peer {
        return Ok(());
    }
    confirm(app, registry, repo, digest, Content::Blob).await
}

/// What the download of `digest` for `repo` needs.
pub(super) fn fill_job(app: &App, registry: usize, repo: &RepoName, digest: &Digest) -> FillJob {
    FillJob {
        upstream: Arc::clone(app.upstream(registry)),
        repo: repo.clone(),
        lifecycle: Arc::clone(app.cache().lifecycle()),
        pacer: Arc::clone(app.cache().pacer()),
        timeout: app.config().cache.fill_timeout,
        declared_size: app.cache().declared_size(digest),
        slots: Arc::clone(app.cache().download_slots()),
        ahead_of_clients: false,
        shared: app.shared().cloned(),
        cluster: app.cluster().cloned(),
    }
}

/// How often a request starts over after a download's leader went away before it started.
const RESTARTS: usize = 3;

async fn serve_head(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    range: Option<&str>,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    // From the index in memory, or a download verified and waiting for its commit; from the
    // disk only for a blob another process stored.
    let cache = app.cache();
    let stored = match cache
        .lifecycle()
        .indexed_blob_size(digest)
        .or_else(|| cache.verified_in_flight(digest))
    {
        Some(size) => Some(size),
        None => cache.stored_blob(digest).await?.map(|hit| hit.size),
    };
    if let Some(size) = stored {
        *outcome = Outcome::Hit;
        confirm(app, registry, repo, digest, Content::Blob).await?;
        return Ok(respond_sized(digest, size, range, |_, _| body::empty()));
    }
    *outcome = Outcome::Bypass;
    let size = size_upstream(app, registry, repo, digest).await?;
    Ok(respond_sized(digest, size, range, |_, _| body::empty()))
}

/// The size of a blob the cache does not hold, from the endpoints trusted with tags (what a
/// client going direct would be told); when they cannot be asked, the client is told so, as
/// going direct it would be. A content-only endpoint's length is never passed on, unless the
/// registry has no endpoint trusted with tags (`allow_untrusted_tags` with content-only
/// endpoints alone: their tags, and so the sizes their manifests declare, are taken anyway).
async fn size_upstream(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
) -> Result<u64, Error> {
    // An endpoint that does not say the length is bad content: the next one is asked.
    let sized = |answer: Answer| {
        std::future::ready(answer.content_length().ok_or_else(|| {
            UpstreamError::bad_content(format!(
                "{}: HEAD of blob {digest} has no Content-Length",
                answer.endpoint
            ))
        }))
    };
    let upstream = app.upstream(registry);
    let mut request = UpstreamRequest::blob(Method::HEAD, repo, digest);
    if upstream.has_trusted_endpoint() {
        request = request.trusted_only();
    }
    Ok(upstream.fetch_with(&request, sized).await?)
}

/// Answers from the store (blob traffic); the blob stays in use (not evictable) until the body
/// is done.
fn respond_hit(
    app: &App,
    digest: &Digest,
    hit: BlobHit,
    range: Option<&str>,
    window: WindowSize,
) -> Response<ResponseBody> {
    let BlobHit {
        file,
        size,
        first,
        guard,
    } = hit;
    app.cache().pacer().traffic();
    respond_sized(digest, size, range, |start, end| {
        body::stored(file, start, end, first, window).with_guard(guard)
    })
}

/// The disk is full: streams from upstream to this client without caching, verified like a
/// fill (the last bytes wait for the digest). Whole blobs only: a range could not be verified.
/// Each takes a download slot for its whole transfer, as a fill does: a full disk does not
/// lift the ceiling on downloads.
async fn pass_through(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Response<ResponseBody>, Error> {
    let wait = app.config().cache.fill_timeout;
    let slot = tokio::time::timeout(wait, app.cache().download_slots().acquire())
        .await
        .map_err(|_| {
            Error::coded_retry(
                Code::Unavailable,
                format!("no download slot came free within {wait:?}"),
                Some(crate::fill::RETRY_AFTER_QUEUED),
            )
        })?;
    let answer = app
        .upstream(registry)
        .fetch(&UpstreamRequest::blob(Method::GET, repo, digest))
        .await?;
    let total = answer.content_length();
    tracing::warn!(%digest, "disk full: passing the blob through without caching");
    let mut builder = blob_headers(digest, StatusCode::OK);
    if let Some(total) = total {
        builder = builder.header(header::CONTENT_LENGTH, total);
    }
    let stall = answer.stall_timeout;
    let body = body::verified(answer.response.into_body(), digest.clone(), total, stall);
    Ok(builder
        .body(body.with_guard(slot))
        .expect("blob headers are valid"))
}

/// Answers from a download in progress, once upstream has answered it; `None` when the download
/// was abandoned before it started.
async fn follow_fill(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    fill: Fill,
    range: Option<&str>,
    window: WindowSize,
) -> Result<Option<Response<ResponseBody>>, Error> {
    let mut progress = fill.progress.clone();
    let state = progress
        .wait_for(|s| !matches!(s, FillState::Starting))
        .await
        .map(|s| s.clone())
        .map_err(|_| {
            Error::coded(
                Code::Unavailable,
                "the download ended before upstream answered",
            )
        })?;
    let size = match state {
        FillState::Failed(e) => return Err(Error::coded_retry(e.code, e.message, e.retry_after)),
        FillState::Abandoned => return Ok(None),
        FillState::Complete { size } => Some(size),
        FillState::Streaming { total, .. } => total,
        FillState::Starting => unreachable!("waited for a later state"),
    };
    if let Some(source) = fill.source.get() {
        crate::upstream::note_endpoint(source);
        // A content-only endpoint answers by digest for any repository: what it sends is
        // served here only if the repository holds it (the origin says so, or said so before).
        if !app.upstream(registry).base_resolves_tags(source) {
            confirm(app, registry, repo, digest, Content::Blob).await?;
        }
    }
    let file = fill.file;
    let continuation = continuation(app, registry, repo, digest, size);
    app.cache().pacer().traffic();
    let Some(size) = size else {
        // Upstream sent no length: the whole blob, chunked; its end is held back until verified.
        return Ok(Some(
            blob_headers(digest, StatusCode::OK)
                .body(body::follow(
                    file,
                    Some(progress),
                    0,
                    None,
                    window,
                    Some(continuation),
                ))
                .expect("blob headers are valid"),
        ));
    };
    Ok(Some(respond_sized(digest, size, range, |start, end| {
        let whole = start == 0 && end == size;
        body::follow(
            file,
            Some(progress),
            start,
            Some(end),
            window,
            whole.then_some(continuation),
        )
    })))
}

/// How a client following a download fetches the rest itself if the download cannot be stored.
fn continuation(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    total: Option<u64>,
) -> Continuation {
    let upstream = Arc::clone(app.upstream(registry));
    let (repo, owned) = (repo.clone(), digest.clone());
    Continuation {
        digest: digest.clone(),
        total,
        fetch: Box::new(move |offset| {
            Box::pin(async move {
                let request = UpstreamRequest::blob(Method::GET, &repo, &owned).resume_from(offset);
                let answer = upstream.fetch(&request).await.map_err(|e| e.to_string())?;
                let skip = match answer.status() {
                    StatusCode::PARTIAL_CONTENT
                        if fill::range_start(answer.headers()) == Some(offset) =>
                    {
                        0
                    }
                    StatusCode::OK => offset,
                    other => return Err(format!("{} answered {other}", answer.endpoint)),
                };
                Ok((answer.response.into_body(), skip, answer.stall_timeout))
            })
        }),
    }
}

/// A blob answer of known size: 200, 206 or 416 as the `Range` asks.
fn respond_sized(
    digest: &Digest,
    size: u64,
    range: Option<&str>,
    body: impl FnOnce(u64, u64) -> ResponseBody,
) -> Response<ResponseBody> {
    let response = match range::plan(range, size) {
        Plan::Whole => blob_headers(digest, StatusCode::OK)
            .header(header::CONTENT_LENGTH, size)
            .body(body(0, size)),
        Plan::Partial { start, end } => blob_headers(digest, StatusCode::PARTIAL_CONTENT)
            .header(
                header::CONTENT_RANGE,
                range::content_range(start, end, size),
            )
            .header(header::CONTENT_LENGTH, end - start)
            .body(body(start, end)),
        Plan::Unsatisfiable => blob_headers(digest, StatusCode::RANGE_NOT_SATISFIABLE)
            .header(header::CONTENT_RANGE, format!("bytes */{size}"))
            .header(header::CONTENT_LENGTH, 0)
            .body(body::empty()),
    };
    response.expect("blob headers are valid")
}

fn blob_headers(digest: &Digest, status: StatusCode) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
}
