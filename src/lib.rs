//! regmirror: a pull-through caching mirror for OCI / Docker registries.
//!
//! # Layout (in data-path order)
//! - [`server`]: accept loop, HTTP/1.1 and h2, graceful drain; [`send_watch`]: closes the
//!   connections of clients that stopped reading.
//! - [`proxy`]: the data path; routes a request and answers it from the cache or upstream.
//! - [`route`]: `(method, path, query)` -> typed route (pure).
//! - [`oci`]: names, tags, references, media types, `Accept` (pure).
//! - [`digest`]: digests and the streaming verifier (pure).
//! - [`range`]: `Range` requests on blobs (pure).
//! - [`cache`]: store on disk, manifests and small blobs in memory, tag records, single-flight
//!   table.
//! - [`fill`]: the one download of an uncached blob: upstream -> temp file + sha256 -> commit.
//! - [`body`]: response bodies, including one that follows a download in progress.
//! - [`sendfile`]: plain connections send mapped blob windows with `sendfile(2)`.
//! - [`upstream`]: endpoints, failover, redirects, token auth.
//! - [`shared`]: the S3-compatible bucket replicas share as a second cache level.
//! - [`error`]: errors by source and the OCI error table.
//! - [`metrics`]: every Prometheus series; [`console`]: the operator console at `/` (HTML and JSON).
//! - [`ops`], [`warm`]: operator commands (`verify`, `gc`, `ls`, `warm`); [`admin`]: the socket
//!   through which they act on a running server; [`progress`]: their bar on a terminal.
//! - [`config`], [`app`], [`shutdown`], [`telemetry`], [`allocator`]: set-up.
//!
//! # Life of a request
//! 1. `server` accepts the connection; hyper parses the request.
//! 2. `route` picks the registry (`?ns=`, a path prefix, or the default) and validates the
//!    repository name, tag or digest; bad input ends here with a 400.
//! 3. A blob: `cache` answers from the store, or joins the download in progress, or makes this
//!    request the leader, which starts a `fill`. Every client then reads the growing temp file;
//!    the last byte of every response waits until the fill verified size and sha256 (the commit,
//!    fsync and rename, follows). A mismatch aborts every response and stores nothing.
//! 4. A manifest by digest: memory, disk, or one verified upstream GET for all waiters.
//!    A manifest by tag: the tag answer lives for the TTL; after it, a HEAD upstream revalidates it;
//!    when upstream cannot be asked, the last known mapping is served with a `Warning`.
//! 5. `proxy` turns errors into OCI error JSON, adds the common headers and logs one access line.

pub mod access;
pub mod admin;
pub mod allocator;
pub mod app;
pub mod body;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod console;
pub mod digest;
pub mod error;
pub mod fill;
pub mod metrics;
pub mod oci;
pub mod ops;
pub mod progress;
pub mod proxy;
pub mod range;
pub mod route;
pub mod send_watch;
pub mod sendfile;
pub mod server;
pub mod shared;
pub mod signals;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod warm;
pub mod window_budget;
