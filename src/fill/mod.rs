//! The leader of a blob download: upstream body -> temp file + sha256, progress published per
//! chunk; at the end, size and digest are checked, readers may send the last byte, and only a
//! verified blob is committed, once blob traffic pauses.
//!
//! Runs detached from any client (a client that disconnects does not cancel it) under its own
//! timeout. Three parts run side by side: the async pump reads the upstream body; a blocking
//! writer writes each chunk and publishes how far the file is written; a blocking hasher hashes.
//! Network, disk and hashing overlap.

use crate::cache::index::Placed;
use crate::cache::inflight::{FillError, FillPermit, FillState};
use crate::cache::lifecycle::Lifecycle;
use crate::cache::pacer::CommitPacer;
use crate::cache::slots::DownloadSlots;
use crate::cache::store::TempBlob;
use crate::cluster::Cluster;
use crate::digest::Digest;
use crate::digest::Hasher;
use crate::error::Code;
use crate::oci::RepoName;
use crate::shared::SharedStore;
use crate::upstream::{RegistryUpstream, UpstreamError, UpstreamRequest};
use bytes::Bytes;
use http::Method;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

mod pump;
pub use pump::range_start;
use pump::{pump_with_resume, Source, Sources};

/// Chunks queued between the network half and each of the writer and the hasher (the two
/// queues hold the same chunks). Upstream chunks run to a few hundred KB, so a download buffers
/// 2-4 MiB at most; the socket's receive buffer absorbs bursts beyond it. 16 held 8 MiB more per
/// download at peak, and 64 another 15 MiB, for no more throughput.
const WRITE_QUEUE: usize = 6;
/// Most chunks written before readers are told how far the file goes.
const WRITE_BATCH: usize = 16;
/// What clients of a download that waited its whole timeout for a slot are told to wait.
pub const RETRY_AFTER_QUEUED: u64 = 10;

/// What a fill needs to know.
pub struct FillJob {
    pub upstream: Arc<RegistryUpstream>,
    pub repo: RepoName,
    /// Where a verified blob is committed (and what makes room when the disk is full).
    pub lifecycle: Arc<Lifecycle>,
    /// When the verified blob is committed.
    pub pacer: Arc<CommitPacer>,
    pub timeout: Duration,
    /// The largest size manifests declared for this blob: a body sent without a length is cut
    /// off beyond it (a bound only, never taken for the blob's length).
    pub declared_size: Option<u64>,
    /// The ceiling on downloads at once: this one waits for a slot before it asks upstream.
    pub slots: Arc<DownloadSlots>,
    /// Started ahead of any client (a prefetch): kept when no client follows it.
    pub ahead_of_clients: bool,
    /// The bucket shared with other replicas: asked before upstream, and given what upstream
    /// sent once it is committed.
    pub shared: Option<Arc<SharedStore>>,
    /// The other replicas: the owner of the digest is asked after the bucket and before
    /// upstream. `None` for a download started for a peer (which never asks another).
    pub cluster: Option<Arc<Cluster>>,
}

/// Starts the download of `permit.digest()` into `temp`; readers follow through the permit's
/// progress. A verified blob is committed once blob traffic pauses (see [`CommitPacer`]); it
/// stays in the single-flight table, served from its download file, until then.
pub fn spawn(mut job: FillJob, permit: FillPermit, temp: TempBlob) {
    permit.set_wanted_by(&job.upstream.name, job.repo.as_str());
    tokio::spawn(async move {
        let digest = permit.digest().clone();
        let started = Instant::now();
        job.pacer.traffic();
        // Whether the owner is asked is decided once, here: a download meant for the owner
        // takes a slot of the cluster's (it may end up reading the bucket or, declined,
        // upstream: downloads from upstream then reach twice `max_downloads` at most); one
        // this replica owns never asks a peer, so it never waits on another replica's slots.
        if !job
            .cluster
            .as_ref()
            .is_some_and(|c| c.owned_elsewhere(&digest))
        {
            job.cluster = None;
        }
        let slots = match &job.cluster {
            Some(cluster) => cluster.slots(),
            None => &job.slots,
        };
        let slot = tokio::time::timeout(job.timeout, slots.acquire()).await;
        let Ok(slot) = slot else {
            let waited = format!("no download slot came free within {:?}", job.timeout);
            tracing::error!(%digest, "{waited}");
            permit.finish(FillState::Failed(FillError {
                retry_after: Some(RETRY_AFTER_QUEUED),
                ..failure(Code::Unavailable, waited)
            }));
            return;
        };
        if !job.ahead_of_clients && permit.readers() == 0 {
            // Its clients left while it waited: nobody needs it now (dropping the permit
            // before the download started tells any late follower to start over).
            tracing::debug!(%digest, "a queued download whose clients left is dropped");
            return;
        }
        let downloaded =
            match tokio::time::timeout(job.timeout, download(&job, &permit, temp)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(failure(
                    Code::Unavailable,
                    format!("download exceeded {:?}", job.timeout),
                )),
            };
        // Verified (or failed): the slot goes to the next download; the commit needs none.
        drop(slot);
        let Downloaded {
            temp,
            size,
            trusted,
            sources,
        } = match downloaded {
            Ok(verified) => verified,
            Err(e) => {
                if e.code == Code::BlobUnknown {
                    tracing::info!(%digest, registry = %job.upstream.name, repo = %job.repo, "blob not found upstream");
                } else {
                    tracing::error!(%digest, registry = %job.upstream.name, repo = %job.repo, error = %e.message, "blob download failed; nothing stored");
                }
                permit.finish(FillState::Failed(e));
                return;
            }
        };
        let downloaded_ms = started.elapsed().as_millis() as u64;
        let placed = job.lifecycle.place(size);
        settle(&job, &digest, trusted).await;
        job.pacer.wait_turn(size).await;
        // The fill stays in the table until its commit has returned, however long a sick disk
        // takes: a newcomer then joins it (served from its file) rather than fetching the blob
        // again and committing it twice.
        let committed = commit(&job, temp, &digest, placed);
        tokio::pin!(committed);
        let committed = match tokio::time::timeout(job.timeout, &mut committed).await {
            Ok(done) => done,
            Err(_) => {
                tracing::error!(%digest, timeout = ?job.timeout, "committing to the cache is taking longer than the fill timeout; still waiting for the disk");
                committed.await
            }
        };
        match committed {
            Ok(()) => {
                tracing::info!(%digest, registry = %job.upstream.name, repo = %job.repo, size, elapsed_ms = downloaded_ms, "blob cached");
                share(&job, &digest, size, &sources);
            }
            // Verified, but there is no room to keep it: readers finish from the open file.
            Err(e) if is_disk_full(&e) => {
                tracing::warn!(%digest, "disk full: blob served but not cached")
            }
            Err(e) => {
                tracing::error!(%digest, error = %e, "committing to the cache failed: blob served but not cached")
            }
        }
        permit.finish(FillState::Complete { size });
    });
}

fn failure(code: Code, message: impl Into<String>) -> FillError {
    FillError {
        code,
        message: message.into(),
        resumable: false,
        retry_after: None,
    }
}

/// A download that upstream could not start: what its class tells the clients following it.
fn upstream_failure(error: UpstreamError) -> FillError {
    FillError {
        retry_after: error.retry_after,
        ..failure(Code::for_upstream(&error), error.message)
    }
}

/// A verified download, ready for its commit.
struct Downloaded {
    temp: TempBlob,
    size: u64,
    /// Only endpoints trusted with tags sent it.
    trusted: bool,
    sources: Sources,
}

/// The first source of a blob: the shared bucket when it holds the blob, else the peer that
/// owns it (unless this replica does), else upstream.
async fn first_source(
    job: &FillJob,
    permit: &FillPermit,
    digest: &Digest,
) -> Result<(Source, Option<u64>), FillError> {
    if let Some(shared) = &job.shared {
        if let Some(blob) = shared.read_blob(digest, job.declared_size).await {
            permit.set_source(shared.label());
            let total = Some(blob.size);
            return Ok((
                Source::bucket(blob, shared.label(), shared.stall_timeout()),
                total,
            ));
        }
    }
    if let Some(cluster) = &job.cluster {
        let from_peer = cluster
            .read_blob(&job.upstream.name, &job.repo, digest)
            .await
            // Longer than a manifest declared: not this blob (the bucket's rule too).
            .filter(|blob| {
                job.declared_size
                    .is_none_or(|declared| blob.size <= declared)
            });
        if let Some(blob) = from_peer {
            permit.set_source(&blob.label);
            let total = Some(blob.size);
            return Ok((Source::peer(blob, cluster.stall_timeout()), total));
        }
    }
    let answer = job
        .upstream
        .fetch(&UpstreamRequest::blob(Method::GET, &job.repo, digest))
        .await
        .map_err(upstream_failure)?;
    let total = answer.content_length();
    permit.set_source(&answer.endpoint);
    Ok((Source::upstream(answer), total))
}

/// Downloads and verifies the blob; then readers may send its last byte, and the caller
/// commits the returned file.
async fn download(
    job: &FillJob,
    permit: &FillPermit,
    temp: TempBlob,
) -> Result<Downloaded, FillError> {
    let digest = permit.digest().clone();
    let (source, total) = first_source(job, permit, &digest).await?;
    permit.publish(FillState::Streaming { written: 0, total });

    // Three parties run side by side: this task reads the network, one blocking task writes
    // the file (and tells readers how far it is), another hashes.
    let (to_writer, writer_queue) = mpsc::channel(WRITE_QUEUE);
    let (to_hasher, hasher_queue) = mpsc::channel(WRITE_QUEUE);
    let progress = permit.progress_sender();
    let lifecycle = Arc::clone(&job.lifecycle);
    let writer =
        tokio::task::spawn_blocking(move || write(temp, writer_queue, progress, total, &lifecycle));
    let hasher = tokio::task::spawn_blocking(move || hash(hasher_queue));
    let mut sources = Sources::default();
    let received = pump_with_resume(
        job,
        &digest,
        source,
        [to_writer, to_hasher],
        total,
        &mut sources,
    )
    .await;
    let written = writer
        .await
        .map_err(|e| failure(Code::Unknown, format!("writer task failed: {e}")))?
        .map_err(|e| FillError {
            resumable: is_disk_full(&e),
            ..failure(
                Code::Unavailable,
                format!("writing to the cache failed: {e}"),
            )
        });
    let hasher = hasher
        .await
        .map_err(|e| failure(Code::Unknown, format!("hasher task failed: {e}")))?;
    received?;
    let temp = written?;
    let size = hasher.len();
    if !sources.endpoints.is_empty() {
        job.upstream.received(size);
    }
    if let Err(m) = hasher.verify(&digest, total) {
        if !sources.endpoints.is_empty() {
            job.upstream.mismatch();
            job.upstream.served_bad_content(&sources.endpoints, &digest);
        }
        if let (true, Some(shared)) = (sources.bucket, &job.shared) {
            shared.discard_blob(&digest, &m.to_string());
        }
        // A peer is blamed only when it sent every byte.
        if let (Some(peer), Some(cluster), true) = (
            sources.peer,
            &job.cluster,
            sources.endpoints.is_empty() && !sources.bucket,
        ) {
            cluster.sent_corrupt(&peer, &digest, &m.to_string());
        }
        return Err(failure(
            Code::Unavailable,
            format!("a source sent a corrupt blob: {m}"),
        ));
    }
    // Verified: readers may send the last byte now; the commit (an fsync of a large file takes
    // a while) comes later, and a client need not wait for the cache's own safety. The bucket
    // and peers answer by digest for any repository: what they sent says nothing of this one.
    permit.publish(FillState::Complete { size });
    let trusted = !sources.bucket
        && sources.peer.is_none()
        && sources
            .endpoints
            .iter()
            .all(|i| job.upstream.resolves_tags(*i));
    Ok(Downloaded {
        temp,
        size,
        trusted,
        sources,
    })
}

/// Offers a blob just committed to the shared bucket, unless the bucket or a peer (which
/// offers it itself) alone sent it.
fn share(job: &FillJob, digest: &Digest, size: u64, sources: &Sources) {
    let Some(shared) = &job.shared else { return };
    if sources.endpoints.is_empty() {
        return;
    }
    // Held weakly: a server that stops lets go of its store (and its directory's lock) with
    // uploads still waiting.
    let (lifecycle, owned) = (Arc::downgrade(&job.lifecycle), digest.clone());
    let open = Box::new(move || match lifecycle.upgrade() {
        Some(lifecycle) => lifecycle.store().open_blob(&owned),
        None => Ok(None),
    });
    shared.upload_blob(digest.clone(), size, open);
}

/// What a verified download does before its commit: records that upstream served the blob
/// for this repository when endpoints trusted with tags sent it (pulls through it need not
/// ask again, while the blob waits for its commit as well as after; a content-only endpoint
/// answers by digest for any repository, so its answer says nothing of this one), and makes
/// room for its bytes, which count against the budget from now on.
async fn settle(job: &FillJob, digest: &Digest, trusted: bool) {
    let lifecycle = Arc::clone(&job.lifecycle);
    let (registry, repo, owned) = (job.upstream.name.clone(), job.repo.clone(), digest.clone());
    let linked = tokio::task::spawn_blocking(move || {
        let linked = if trusted {
            lifecycle.store().link(&registry, &repo, &owned)
        } else {
            Ok(())
        };
        lifecycle.enforce_budget();
        linked
    })
    .await;
    if let Ok(Err(e)) = linked {
        tracing::warn!(%digest, error = %e, "cannot record the blob's repository");
    }
}

/// Makes a verified download part of the store at the place it took, and keeps the store
/// within its budget.
async fn commit(
    job: &FillJob,
    temp: TempBlob,
    digest: &Digest,
    placed: Placed,
) -> std::io::Result<()> {
    let lifecycle = Arc::clone(&job.lifecycle);
    let digest = digest.clone();
    tokio::task::spawn_blocking(move || {
        let size = placed.size();
        let committed = lifecycle.commit(temp, &digest, placed);
        if committed.as_ref().is_err_and(is_disk_full) {
            lifecycle.mark_disk_full();
            lifecycle.make_room(size);
        }
        lifecycle.enforce_budget();
        committed
    })
    .await
    .map_err(|e| std::io::Error::other(format!("commit task failed: {e}")))?
}

/// The disk: write each chunk, then tell readers how far the file goes. When the disk is full,
/// evict and try once more; if it is still full, give up (the temp file goes) and let misses
/// bypass the cache for a while.
fn write(
    mut temp: TempBlob,
    mut queue: mpsc::Receiver<Bytes>,
    progress: watch::Sender<FillState>,
    total: Option<u64>,
    lifecycle: &Lifecycle,
) -> std::io::Result<TempBlob> {
    let mut written = 0u64;
    while let Some(first) = queue.blocking_recv() {
        // Write what is queued now, then tell readers once: fewer wake-ups per byte.
        written = write_chunk(&mut temp, &first, written, total, lifecycle)?;
        for _ in 1..WRITE_BATCH {
            let Ok(chunk) = queue.try_recv() else { break };
            written = write_chunk(&mut temp, &chunk, written, total, lifecycle)?;
        }
        progress.send_replace(FillState::Streaming { written, total });
    }
    Ok(temp)
}

/// Writes one chunk at `written`; returns the new length.
fn write_chunk(
    temp: &mut TempBlob,
    chunk: &Bytes,
    written: u64,
    total: Option<u64>,
    lifecycle: &Lifecycle,
) -> std::io::Result<u64> {
    if let Err(e) = temp.file.write_all(chunk) {
        if !is_disk_full(&e) {
            return Err(e);
        }
        let needed = total.map_or(chunk.len() as u64, |t| t.saturating_sub(written));
        let freed = lifecycle.make_room(needed);
        tracing::warn!(
            freed,
            needed,
            "disk full while caching a blob; evicted to make room"
        );
        // Undo the partial write, then try the chunk once more.
        temp.file.set_len(written)?;
        temp.file.seek(SeekFrom::Start(written))?;
        if let Err(e) = temp.file.write_all(chunk) {
            if is_disk_full(&e) {
                lifecycle.mark_disk_full();
            }
            return Err(e);
        }
    }
    Ok(written + chunk.len() as u64)
}

/// ENOSPC (or a quota).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// The hash of everything the pump received.
fn hash(mut queue: mpsc::Receiver<Bytes>) -> Hasher {
    let mut hasher = Hasher::default();
    while let Some(chunk) = queue.blocking_recv() {
        hasher.update(&chunk);
    }
    hasher
}
