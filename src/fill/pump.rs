//! Where a download's bytes come from and how they reach the writer and the hasher: the shared
//! bucket, the peer that owns the digest, or an upstream endpoint first, then, when a source
//! fails mid-body, the next endpoint from the byte it stopped at.

use super::{failure, upstream_failure, FillJob};
use crate::cache::inflight::FillError;
use crate::cluster::{Peer, PeerBlob};
use crate::digest::Digest;
use crate::error::Code;
use crate::shared::BucketBlob;
use crate::upstream::{Answer, UpstreamError, UpstreamRequest};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{header, Method, StatusCode};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// One source of a blob's bytes.
pub struct Source {
    bytes: BoxStream<'static, Result<Bytes, String>>,
    /// For logs: the endpoint's URL, the bucket's or the peer's.
    label: String,
    /// How long it may go without a byte.
    stall: Duration,
    kind: SourceKind,
}

/// What kind of source sends a download's bytes.
#[derive(Clone)]
enum SourceKind {
    /// An upstream endpoint, by index.
    Endpoint(usize),
    /// The shared bucket.
    Bucket,
    /// A peer of the cluster.
    Peer(Arc<Peer>),
}

impl Source {
    pub fn upstream(answer: Answer) -> Source {
        Source {
            label: answer.endpoint,
            stall: answer.stall_timeout,
            kind: SourceKind::Endpoint(answer.endpoint_index),
            bytes: answer
                .response
                .into_body()
                .into_data_stream()
                .map_err(|e| e.to_string())
                .boxed(),
        }
    }

    pub fn bucket(blob: BucketBlob, label: &str, stall: Duration) -> Source {
        Source {
            bytes: blob.bytes,
            label: label.to_string(),
            stall,
            kind: SourceKind::Bucket,
        }
    }

    pub fn peer(blob: PeerBlob, stall: Duration) -> Source {
        Source {
            bytes: blob.bytes,
            label: blob.label,
            stall,
            kind: SourceKind::Peer(blob.peer),
        }
    }
}

/// Which sources a download read from.
#[derive(Debug, Default)]
pub struct Sources {
    /// Upstream endpoints, by index, in the order they were read.
    pub endpoints: Vec<usize>,
    /// The shared bucket.
    pub bucket: bool,
    /// The peer that owns the digest.
    pub peer: Option<Arc<Peer>>,
}

/// Feeds the writer and the hasher from `source`; when a source fails mid-body, continues from
/// the next endpoint with `Range: bytes=N-` (or, where ranges are not supported, from a full
/// answer whose first N bytes are skipped), keeping the hash state. Readers never notice: bytes
/// already delivered stay valid, and the digest check at the end covers every byte.
///
/// A resume that brought new bytes renews the budget: only [`max_resumes`] failures in a row
/// without progress end the download (a connection that breaks every few hundred KiB still
/// delivers the blob, as a client resuming on its own would get it), and the fill's timeout
/// bounds the whole.
pub async fn pump_with_resume(
    job: &FillJob,
    digest: &Digest,
    mut source: Source,
    sinks: [mpsc::Sender<Bytes>; 2],
    total: Option<u64>,
    sources: &mut Sources,
) -> Result<(), FillError> {
    let mut received = 0u64;
    let mut skip = 0u64;
    let mut resumes = 0usize;
    let mut received_at_last_failure = 0u64;
    loop {
        let failed_source = source.kind.clone();
        match &failed_source {
            SourceKind::Endpoint(index) => sources.endpoints.push(*index),
            SourceKind::Bucket => sources.bucket = true,
            SourceKind::Peer(peer) => sources.peer = Some(Arc::clone(peer)),
        }
        let error = match pump(
            source,
            &sinks,
            total,
            job.declared_size,
            &mut received,
            skip,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(Stop::SinkClosed) => return Ok(()),
            Err(Stop::TooLong(message)) => return Err(failure(Code::Unavailable, message)),
            Err(Stop::Source(message)) => message,
        };
        match (failed_source, &job.shared, &job.cluster) {
            (SourceKind::Endpoint(index), _, _) => job
                .upstream
                .note_failure(index, &UpstreamError::outage(error.clone())),
            (SourceKind::Bucket, Some(shared), _) => shared.body_failed(&error),
            (SourceKind::Peer(peer), _, Some(cluster)) => cluster.failed(&peer, &error),
            _ => {}
        }
        if received > received_at_last_failure {
            resumes = 0;
        }
        received_at_last_failure = received;
        resumes += 1;
        if resumes > max_resumes(job.upstream.len()) {
            return Err(failure(
                Code::Unavailable,
                format!(
                    "giving up after {resumes} attempts in a row that brought nothing: {error}"
                ),
            ));
        }
        tracing::warn!(%digest, offset = received, error = %error, "a source failed mid-blob; resuming from upstream");
        let request = UpstreamRequest::blob(Method::GET, &job.repo, digest).resume_from(received);
        // The failed source backs off now; with nobody else to ask, it is asked anyway.
        let answer = job.upstream.fetch(&request).await.map_err(|e| FillError {
            message: format!("{error}; resuming failed: {e}"),
            ..upstream_failure(e)
        })?;
        skip = match answer.status() {
            StatusCode::PARTIAL_CONTENT if range_start(answer.headers()) == Some(received) => 0,
            StatusCode::OK => received,
            other => {
                return Err(failure(
                    Code::Unavailable,
                    format!(
                        "{error}; {} answered the resume with {other}",
                        answer.endpoint
                    ),
                ))
            }
        };
        source = Source::upstream(answer);
    }
}

/// Failures in a row without a new byte that a download survives: two per endpoint.
fn max_resumes(endpoints: usize) -> usize {
    2 * endpoints.max(1)
}

/// Why a pump stopped early.
enum Stop {
    /// The writer is gone (its own error says why).
    SinkClosed,
    /// The source failed: resume elsewhere.
    Source(String),
    /// More bytes than declared: not worth resuming.
    TooLong(String),
}

/// Moves one source's bytes into the sinks after skipping the first `skip`, counting
/// `received`, bounded by the stall timeout and by the body's length: its `Content-Length`, or,
/// sent without one, the largest size manifests declared for the blob (`cap`: only a bound,
/// never taken for the length, so a manifest declaring too much breaks nothing).
async fn pump(
    source: Source,
    sinks: &[mpsc::Sender<Bytes>; 2],
    total: Option<u64>,
    cap: Option<u64>,
    received: &mut u64,
    mut skip: u64,
) -> Result<(), Stop> {
    let bound = total.or(cap);
    let Source {
        mut bytes,
        label,
        stall,
        ..
    } = source;
    loop {
        let mut data = match tokio::time::timeout(stall, bytes.next()).await {
            Err(_) => return Err(Stop::Source(format!("{label}: no data for {stall:?}"))),
            Ok(None) if total.is_some_and(|t| *received < t) => {
                return Err(Stop::Source(format!(
                    "{label}: body ended after {received} bytes"
                )))
            }
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(Stop::Source(format!("{label}: body failed: {e}"))),
            Ok(Some(Ok(data))) => data,
        };
        if skip > 0 {
            let n = skip.min(data.len() as u64);
            let _ = data.split_to(n as usize);
            skip -= n;
        }
        if data.is_empty() {
            continue;
        }
        *received += data.len() as u64;
        if bound.is_some_and(|t| *received > t) {
            return Err(Stop::TooLong(format!(
                "{label}: body longer than its Content-Length or its manifest's size"
            )));
        }
        for sink in sinks {
            if sink.send(data.clone()).await.is_err() {
                return Err(Stop::SinkClosed);
            }
        }
    }
}

/// The first byte position of a `Content-Range: bytes N-M/T` answer.
pub fn range_start(headers: &http::HeaderMap) -> Option<u64> {
    let value = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let range = value.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}
