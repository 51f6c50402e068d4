//! The leader of a blob download: upstream body -> temp file + sha256, progress published per
//! chunk; at the end, size and digest are checked and only a verified blob is committed.
//!
//! Runs detached from any client (a client that disconnects does not cancel it) under its own
//! timeout. Two halves run side by side: the async half reads the upstream body, and a blocking
//! writer writes and hashes each chunk and publishes how far the file is written, so network,
//! disk and hashing overlap.

use crate::cache::inflight::{FillError, FillPermit, FillState};
use crate::cache::store::{Store, TempBlob};
use crate::digest::Hasher;
use crate::error::Code;
use crate::oci::RepoName;
use crate::upstream::{Answer, RegistryUpstream};
use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::BodyExt;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Chunks queued between the network half and the disk half.
const WRITE_QUEUE: usize = 64;

/// What a fill needs to know.
pub struct FillJob {
    pub upstream: Arc<RegistryUpstream>,
    pub repo: RepoName,
    pub store: Arc<Store>,
    pub timeout: Duration,
}

/// Starts the download of `permit.digest()` into `temp`; readers follow through the permit's
/// progress.
pub fn spawn(job: FillJob, permit: FillPermit, temp: TempBlob) {
    tokio::spawn(async move {
        let digest = permit.digest().clone();
        let started = Instant::now();
        let outcome = match tokio::time::timeout(job.timeout, run(&job, &permit, temp)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(failure(
                Code::Unavailable,
                format!("download exceeded {:?}", job.timeout),
            )),
        };
        match outcome {
            Ok(size) => {
                tracing::info!(%digest, registry = %job.upstream.name, repo = %job.repo, size, elapsed_ms = started.elapsed().as_millis() as u64, "blob cached");
                permit.finish(FillState::Complete { size });
            }
            Err(e) => {
                if e.code == Code::BlobUnknown {
                    tracing::info!(%digest, registry = %job.upstream.name, repo = %job.repo, "blob not found upstream");
                } else {
                    tracing::error!(%digest, registry = %job.upstream.name, repo = %job.repo, error = %e.message, "blob download failed; nothing stored");
                }
                permit.finish(FillState::Failed(e));
            }
        }
    });
}

fn failure(code: Code, message: impl Into<String>) -> FillError {
    FillError {
        code,
        message: message.into(),
    }
}

async fn run(job: &FillJob, permit: &FillPermit, temp: TempBlob) -> Result<u64, FillError> {
    let digest = permit.digest().clone();
    let answer = job
        .upstream
        .fetch(Method::GET, &job.repo, &format!("blobs/{digest}"), &[])
        .await
        .map_err(|e| failure(Code::Unavailable, e.to_string()))?;
    if answer.status() == StatusCode::NOT_FOUND {
        return Err(failure(
            Code::BlobUnknown,
            format!("blob {digest} not found upstream"),
        ));
    }
    let total = content_length(answer.headers());
    permit.publish(FillState::Streaming { written: 0, total });

    let (chunks, queue) = mpsc::channel(WRITE_QUEUE);
    let progress = permit.progress_sender();
    let writer = tokio::task::spawn_blocking(move || write_and_hash(temp, queue, progress, total));
    let received = pump(answer, chunks, total).await;
    let written = writer
        .await
        .map_err(|e| failure(Code::Unknown, format!("writer task failed: {e}")))?
        .map_err(|e| failure(Code::Unknown, format!("writing to the cache failed: {e}")));
    received?;
    let (temp, hasher) = written?;
    let size = hasher.len();
    hasher.verify(&digest, total).map_err(|m| {
        failure(
            Code::Unavailable,
            format!("upstream sent a corrupt blob: {m}"),
        )
    })?;
    let store = Arc::clone(&job.store);
    tokio::task::spawn_blocking(move || store.commit(temp, &digest))
        .await
        .map_err(|e| failure(Code::Unknown, format!("commit task failed: {e}")))?
        .map_err(|e| {
            failure(
                Code::Unknown,
                format!("committing to the cache failed: {e}"),
            )
        })?;
    Ok(size)
}

/// Moves the upstream body into the writer's queue, bounded by the declared length and the
/// stall timeout. Dropping `chunks` (on return) tells the writer the body is over.
async fn pump(
    answer: Answer,
    chunks: mpsc::Sender<Bytes>,
    total: Option<u64>,
) -> Result<(), FillError> {
    let stall = answer.stall_timeout;
    let endpoint = answer.endpoint.clone();
    let mut body = answer.response.into_body();
    let mut received = 0u64;
    loop {
        let frame = match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => {
                return Err(failure(
                    Code::Unavailable,
                    format!("{endpoint}: no data for {stall:?}"),
                ))
            }
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => {
                return Err(failure(
                    Code::Unavailable,
                    format!("{endpoint}: body failed: {e}"),
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        received += data.len() as u64;
        if total.is_some_and(|t| received > t) {
            return Err(failure(
                Code::Unavailable,
                format!("{endpoint}: body longer than its Content-Length"),
            ));
        }
        if chunks.send(data).await.is_err() {
            // The writer stopped; its error is what the fill reports.
            return Ok(());
        }
    }
}

/// The disk half: write, hash, publish.
fn write_and_hash(
    mut temp: TempBlob,
    mut queue: mpsc::Receiver<Bytes>,
    progress: watch::Sender<FillState>,
    total: Option<u64>,
) -> std::io::Result<(TempBlob, Hasher)> {
    let mut hasher = Hasher::default();
    while let Some(chunk) = queue.blocking_recv() {
        temp.file.write_all(&chunk)?;
        hasher.update(&chunk);
        progress.send_replace(FillState::Streaming {
            written: hasher.len(),
            total,
        });
    }
    Ok((temp, hasher))
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
