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
//! The bucket never holds a request up for long: its requests have their own time limits, and
//! a failed read marks it down ([`health`]: logged once, shown by `/readyz`, the console
//! and the metrics); a replica whose bucket is down serves from its disk and upstream as a
//! single node does.
//!
//! Keys, under the configured prefix: `blobs/sha256/<hex>` ([`blobs`]), `manifests/sha256/<hex>`
//! and `tags/<registry>/<repository>/<tag>` ([`documents`]).

mod blobs;
mod documents;
mod health;
mod http;

pub use blobs::BucketBlob;

use crate::config::SharedStoreConfig;
use crate::metrics::Metrics;
use health::{Change, Health};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::ObjectStoreExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Uploads waiting for their turn, at most; newer ones are dropped beyond it (the content
/// stays local; the next replica to fetch it uploads it).
const MAX_QUEUED_UPLOADS: usize = 1024;

/// The variables that name credentials, read when the configuration names no key (as the
/// AWS tools do; other `AWS_*` settings — endpoints, signing — are not taken from the
/// environment: the configuration says where the bucket is).
const CREDENTIAL_VARIABLES: [&str; 9] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
];

/// The bucket and what this replica knows of it.
pub struct SharedStore {
    bucket: AmazonS3,
    prefix: String,
    /// `s3://bucket/prefix`, for logs and metrics.
    label: String,
    config: SharedStoreConfig,
    health: Health,
    /// Asked once at least (by [`SharedStore::check`]).
    checked: AtomicBool,
    /// A refused read was logged (once: a key without `s3:ListBucket` is refused every miss).
    denial_logged: AtomicBool,
    uploads: Arc<Semaphore>,
    queued: AtomicUsize,
    /// Tag records this replica uploaded lately: key -> digest (see
    /// [`SharedStore::upload_tag`]).
    tags_shared: moka::sync::Cache<String, String>,
    /// Blobs the bucket sent bad lately: downloads skip the bucket for them, and an upload
    /// replaces the object even when its size looks right (its delete may have failed).
    bad_blobs: moka::sync::Cache<crate::digest::Digest, ()>,
    metrics: Arc<Metrics>,
}

/// Why the bucket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SharedStoreError {
    #[error("shared_store: {0}")]
    Config(String),
}

/// How a request to the bucket went, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Missing,
    Denied,
    Error,
}

impl Outcome {
    fn of<T>(result: &object_store::Result<T>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(object_store::Error::NotFound { .. }) => Outcome::Missing,
            Err(
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. },
            ) => Outcome::Denied,
            Err(_) => Outcome::Error,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// What a request was, for the metrics and for health (only reads decide it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Get,
    Head,
    Put,
    Delete,
}

impl Operation {
    fn label(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Head => "head",
            Operation::Put => "put",
            Operation::Delete => "delete",
        }
    }
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
            connect_timeout: config.connect_timeout,
            timeout: config.timeout,
        };
        // One retry: a bucket that fails twice in a row is down, and downloads go on without
        // it rather than wait.
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig::default(),
            max_retries: 1,
            retry_timeout: config.timeout,
        };
        let mut builder = AmazonS3Builder::new()
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
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder
                    .with_access_key_id(id)
                    .with_secret_access_key(secret.expose());
            }
            // No key configured: the environment's credentials, else the instance's role.
            _ => {
                for variable in CREDENTIAL_VARIABLES {
                    let key = variable.to_ascii_lowercase().parse::<AmazonS3ConfigKey>();
                    if let (Ok(key), Ok(value)) = (key, std::env::var(variable)) {
                        builder = builder.with_config(key, value);
                    }
                }
            }
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
            health: Health::new(config.recheck_after, 3 * config.timeout),
            config: config.clone(),
            checked: AtomicBool::new(false),
            denial_logged: AtomicBool::new(false),
            uploads: Arc::new(Semaphore::new(config.max_uploads)),
            queued: AtomicUsize::new(0),
            tags_shared: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            bad_blobs: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
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

    /// Whether its last read went through (true until one failed).
    pub fn is_up(&self) -> bool {
        self.health.is_up()
    }

    /// Uploads waiting for their turn.
    pub fn uploads_waiting(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// How long a blob read from it may go without a byte.
    pub fn stall_timeout(&self) -> Duration {
        self.config.stall_timeout
    }

    /// `key` under the prefix.
    fn key(&self, key: String) -> Key {
        if self.prefix.is_empty() {
            Key::from(key)
        } else {
            Key::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Asks the bucket whether it answers, when it never was asked or a probe is due: called
    /// every few seconds by the server, so its state is known before the first miss and a
    /// bucket that came back is seen without waiting for traffic.
    pub async fn check(&self) {
        let first = !self.checked.swap(true, Ordering::Relaxed);
        if !first && !self.health.probe_due() {
            return;
        }
        let Some(_asking) = self.health.begin() else {
            return;
        };
        let probe = self.bucket.head(&self.key(".regmirror-probe".into())).await;
        self.outcome(Operation::Head, &probe);
    }

    /// Counts a request that says nothing of whether reads work (writes, deletes, an upload's
    /// look before it writes).
    fn count<T>(&self, operation: Operation, result: &object_store::Result<T>) -> Outcome {
        let outcome = Outcome::of(result);
        self.metrics
            .shared_store_request(operation.label(), outcome.label());
        outcome
    }

    /// Records how a request went: the counters, and for reads, whether the bucket is up (a
    /// change is logged once). A refusal is not an outage: it is logged once, and reads go on.
    fn outcome<T>(&self, operation: Operation, result: &object_store::Result<T>) -> Outcome {
        let outcome = self.count(operation, result);
        if !matches!(operation, Operation::Get | Operation::Head) {
            return outcome;
        }
        let change = if outcome == Outcome::Error {
            self.health.failed()
        } else {
            self.health.succeeded()
        };
        match (change, result) {
            (Change::WentDown, Err(e)) => {
                tracing::warn!(bucket = %self.label, error = %e, "the shared store is down; serving from local disk and upstream")
            }
            (Change::CameBack, _) => {
                tracing::info!(bucket = %self.label, "the shared store is back")
            }
            _ => {}
        }
        if outcome == Outcome::Denied && !self.denial_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(bucket = %self.label, "the shared store refuses a read: check the key, and that it may list the bucket (S3 answers a missing object with 403 to a key that may not)");
        }
        outcome
    }

    /// A download reading from the bucket found its body failing (a stall, a reset): down,
    /// as a failed request would have made it.
    pub fn body_failed(&self, error: &str) {
        if self.health.failed() == Change::WentDown {
            tracing::warn!(bucket = %self.label, error, "the shared store is down; serving from local disk and upstream");
        }
    }

    /// Runs an upload in the background when its turn comes (`max_uploads` at once), for at
    /// most `deadline`; dropped when too many are waiting, or when the bucket is down by then.
    /// `job` says whether it wrote anything.
    fn enqueue(
        self: &Arc<Self>,
        what: String,
        deadline: Duration,
        job: impl std::future::Future<Output = Result<bool, String>> + Send + 'static,
    ) {
        if self.queued.fetch_add(1, Ordering::SeqCst) >= MAX_QUEUED_UPLOADS {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(bucket = %self.label, what, "too many uploads waiting; this one stays local");
            return;
        }
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let turn = Arc::clone(&store.uploads).acquire_owned().await;
            store.queued.fetch_sub(1, Ordering::SeqCst);
            let Ok(_turn) = turn else { return };
            if !store.is_up() {
                tracing::debug!(bucket = %store.label, what, "the shared store is down; this stays local");
                return;
            }
            let done = tokio::time::timeout(deadline, job)
                .await
                .unwrap_or_else(|_| Err(format!("not done within {deadline:?}")));
            match done {
                Ok(true) => {
                    tracing::debug!(bucket = %store.label, what, "uploaded to the shared store")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(bucket = %store.label, what, error = %e, "uploading to the shared store failed; it stays local")
                }
            }
        });
    }
}
