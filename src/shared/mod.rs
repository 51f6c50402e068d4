//! The shared store: an S3-compatible bucket several replicas use as their second cache level,
//! below each one's local disk. This module owns the bucket's keys and every request to it.
//!
//! A bucket is a source like any upstream, never an authority: what it sends is verified by the
//! download that reads it, and an object found corrupt is deleted (the next download fetches
//! the blob from upstream and uploads a good copy). What reaches the bucket was verified twice:
//! by the download that stored it on the local disk, and again while it is read back for the
//! upload, which is completed only when the digest matches — a multipart upload is invisible
//! until then, so no replica ever sees half an object.
//!
//! The bucket never holds a request up for long: its requests have their own time limits, a
//! failure marks it down (logged once, shown by `/readyz` and the metrics), and a mirror whose
//! bucket is down serves from its disk and upstream as a single node does.
//!
//! Keys, under the configured prefix: `blobs/sha256/<hex>`.

mod http;

use crate::config::SharedStoreConfig;
use crate::digest::{Digest, Hasher};
use crate::metrics::Metrics;
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutPayload};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Blobs up to this size are uploaded in one request; larger ones in parts of this size.
const PART_SIZE: usize = 8 << 20;
/// Uploads waiting for their turn, at most; more are dropped (the blob stays local only).
const MAX_QUEUED_UPLOADS: usize = 1024;

/// A blob as the bucket sends it.
pub struct BucketBlob {
    pub size: u64,
    pub bytes: BoxStream<'static, Result<Bytes, String>>,
}

/// The bucket and what this replica knows of it.
pub struct SharedStore {
    bucket: AmazonS3,
    prefix: String,
    /// `s3://bucket/prefix`, for logs and metrics.
    label: String,
    config: SharedStoreConfig,
    up: AtomicBool,
    /// When its last request failed.
    failed_at: Mutex<Option<Instant>>,
    uploads: Arc<Semaphore>,
    queued: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Why the bucket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SharedStoreError {
    #[error("shared_store: {0}")]
    Config(String),
}

impl SharedStore {
    /// A client for the configured bucket (nothing is asked of it yet).
    pub fn open(
        config: &SharedStoreConfig,
        metrics: Arc<Metrics>,
    ) -> Result<SharedStore, SharedStoreError> {
        let (bucket_name, prefix) = config
            .bucket_and_prefix()
            .map_err(|e| SharedStoreError::Config(e.to_string()))?;
        let tls = crate::tls::client_config(config.ca_file.as_deref(), true)
            .map_err(|e| SharedStoreError::Config(e.to_string()))?;
        let connector = http::BucketConnector {
            tls,
            allow_http: config.allow_http,
            connect_timeout: config.connect_timeout,
            timeout: config.timeout,
        };
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: config.timeout,
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket_name)
            .with_region(&config.region)
            .with_allow_http(config.allow_http)
            .with_retry(retry)
            .with_http_connector(connector);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        // Without a key in the configuration: AWS_* variables, or an instance's role.
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret.expose());
        }
        let bucket = builder
            .build()
            .map_err(|e| SharedStoreError::Config(e.to_string()))?;
        let label = if prefix.is_empty() {
            format!("s3://{bucket_name}")
        } else {
            format!("s3://{bucket_name}/{prefix}")
        };
        metrics.shared_store_configured();
        Ok(SharedStore {
            bucket,
            prefix,
            label,
            config: config.clone(),
            up: AtomicBool::new(true),
            failed_at: Mutex::new(None),
            uploads: Arc::new(Semaphore::new(config.max_uploads)),
            queued: AtomicUsize::new(0),
            metrics,
        })
    }

    /// `s3://bucket/prefix`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The configuration it was opened with (a reload with another one needs a restart).
    pub fn config(&self) -> &SharedStoreConfig {
        &self.config
    }

    /// Whether its last request went through (or none was made yet).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Uploads waiting for their turn.
    pub fn uploads_waiting(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// How long a blob read from it may go without a byte.
    pub fn stall_timeout(&self) -> Duration {
        self.config.stall_timeout
    }

    fn blob_key(&self, digest: &Digest) -> Key {
        let key = format!("blobs/{}/{}", digest.algorithm(), digest.hex());
        if self.prefix.is_empty() {
            Key::from(key)
        } else {
            Key::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Records how a request went: up or down (a change is logged once), and the counters.
    fn outcome<T>(
        &self,
        operation: &'static str,
        result: &object_store::Result<T>,
    ) -> &'static str {
        let outcome = match result {
            Ok(_) => "ok",
            Err(object_store::Error::NotFound { .. }) => "missing",
            Err(_) => "error",
        };
        let up = outcome != "error";
        if !up {
            *self.failed_at.lock().expect("bucket state lock poisoned") = Some(Instant::now());
        }
        if self.up.swap(up, Ordering::Relaxed) != up {
            match result {
                Err(e) if !up => {
                    tracing::warn!(bucket = %self.label, error = %e, "the shared store is down; serving from local disk and upstream")
                }
                _ => tracing::info!(bucket = %self.label, "the shared store is back"),
            }
        }
        self.metrics.shared_store_request(operation, outcome);
        outcome
    }

    /// Whether downloads should ask it now: it is up, or its last failure is `recheck_after`
    /// old (so a bucket that hangs costs one miss its time limit, not every miss).
    fn worth_asking(&self) -> bool {
        let failed_at = *self.failed_at.lock().expect("bucket state lock poisoned");
        self.is_up() || failed_at.is_none_or(|t| t.elapsed() >= self.config.recheck_after)
    }

    /// Starts reading a blob; `None` when the bucket does not hold it, cannot be reached, or
    /// failed lately (within `recheck_after`).
    pub async fn read_blob(&self, digest: &Digest) -> Option<BucketBlob> {
        if !self.worth_asking() {
            return None;
        }
        let key = self.blob_key(digest);
        let result = self.bucket.get(&key).await;
        if let ("error", Err(e)) = (self.outcome("get", &result), &result) {
            tracing::debug!(bucket = %self.label, %digest, error = %e, "reading from the shared store failed");
        }
        let found = result.ok()?;
        let size = found.meta.size;
        let metrics = Arc::clone(&self.metrics);
        let bytes = found
            .into_stream()
            .map(move |chunk| {
                let chunk = chunk.map_err(|e| e.to_string())?;
                metrics.shared_store_bytes("read", chunk.len() as u64);
                Ok(chunk)
            })
            .boxed();
        Some(BucketBlob { size, bytes })
    }

    /// Deletes a blob the bucket sent corrupt or short, so that a good copy replaces it.
    pub async fn discard_blob(&self, digest: &Digest, why: &str) {
        tracing::error!(bucket = %self.label, %digest, problem = why, "the shared store holds a bad copy of this blob; deleting it");
        let result = self.bucket.delete(&self.blob_key(digest)).await;
        self.outcome("delete", &result);
        if let Err(e) = result {
            tracing::warn!(bucket = %self.label, %digest, error = %e, "could not delete the bad copy");
        }
    }

    /// Uploads a verified local blob in the background, unless the bucket has it already;
    /// read from `file` (its open handle: an eviction meanwhile does not matter) and verified
    /// again on the way. Dropped when too many uploads are waiting.
    pub fn upload_blob(self: &Arc<Self>, digest: Digest, file: File, size: u64) {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= MAX_QUEUED_UPLOADS {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(bucket = %self.label, %digest, "too many uploads waiting; this blob stays local");
            return;
        }
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let turn = Arc::clone(&store.uploads).acquire_owned().await;
            store.queued.fetch_sub(1, Ordering::SeqCst);
            let Ok(_turn) = turn else { return };
            if !store.worth_asking() {
                tracing::debug!(bucket = %store.label, %digest, "the shared store is down; this blob stays local");
                return;
            }
            match store.upload(&digest, Arc::new(file), size).await {
                Ok(true) => {
                    tracing::info!(bucket = %store.label, %digest, size, "blob uploaded to the shared store")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(bucket = %store.label, %digest, error = %e, "uploading to the shared store failed; the blob stays local")
                }
            }
        });
    }

    /// Uploads unless present: `Ok(false)` when the bucket had it.
    async fn upload(&self, digest: &Digest, file: Arc<File>, size: u64) -> Result<bool, String> {
        let key = self.blob_key(digest);
        let present = self.bucket.head(&key).await;
        self.outcome("head", &present);
        match present {
            Ok(meta) if meta.size == size => return Ok(false),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
        let mut hasher = Hasher::default();
        if size <= PART_SIZE as u64 {
            let bytes = read_part(&file, 0, size as usize).await?;
            hasher.update(&bytes);
            verify(hasher, digest, size)?;
            let result = self.bucket.put(&key, PutPayload::from(bytes)).await;
            self.outcome("put", &result);
            result.map_err(|e| e.to_string())?;
        } else {
            let started = self.bucket.put_multipart(&key).await;
            self.outcome("put", &started);
            let mut upload = started.map_err(|e| e.to_string())?;
            let sent = async {
                let mut offset = 0u64;
                while offset < size {
                    let len = (size - offset).min(PART_SIZE as u64) as usize;
                    let bytes = read_part(&file, offset, len).await?;
                    hasher.update(&bytes);
                    offset += len as u64;
                    let part = upload.put_part(PutPayload::from(bytes)).await;
                    self.outcome("put", &part);
                    part.map_err(|e| e.to_string())?;
                }
                verify(hasher, digest, size)?;
                let done = upload.complete().await;
                self.outcome("put", &done);
                done.map(|_| ()).map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = sent {
                let _ = upload.abort().await;
                return Err(e);
            }
        }
        self.metrics.shared_store_bytes("written", size);
        Ok(true)
    }
}

/// `len` bytes of `file` from `offset`, read on the blocking pool.
async fn read_part(file: &Arc<File>, offset: u64, len: usize) -> Result<Bytes, String> {
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        let mut buffer = vec![0u8; len];
        file.read_exact_at(&mut buffer, offset)
            .map(|()| Bytes::from(buffer))
            .map_err(|e| format!("reading the local copy: {e}"))
    })
    .await
    .map_err(|e| format!("reading the local copy: {e}"))?
}

fn verify(hasher: Hasher, digest: &Digest, size: u64) -> Result<(), String> {
    hasher
        .verify(digest, Some(size))
        .map_err(|m| format!("the local copy no longer matches its digest: {m}"))
}
