//! Prometheus metrics: every series regmirror exports, with domain-named recording methods,
//! bounded labels (route kinds, outcomes, configured registries and endpoints) and every series
//! present from start-up. An injected registry, so tests need no global state.
//!
//! Gauges that mirror state owned elsewhere (cache size, fills in flight, endpoint health,
//! rate limits) are read when `/metrics` is scraped.

mod totals;

pub use totals::{Snapshot, Totals};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Route kinds, as `route::Route::kind` names them.
pub const ROUTES: [&str; 11] = [
    "base",
    "manifest",
    "blob",
    "tags",
    "referrers",
    "catalog",
    "healthz",
    "readyz",
    "metrics",
    "status",
    "invalid",
];
/// Cache outcomes, as `proxy::Outcome` names them.
pub const OUTCOMES: [&str; 5] = ["hit", "miss", "join", "stale", "bypass"];

/// One registry's endpoints, for labels.
pub struct EndpointLabels {
    pub registry: String,
    pub endpoints: Vec<String>,
}

/// Every metric.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    cache_requests: IntCounterVec,
    served_bytes: IntCounterVec,
    sendfile_bytes: IntCounter,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_bytes: IntCounterVec,
    pub(crate) fills_in_flight: IntGauge,
    pub(crate) downloads_queued: IntGauge,
    pub(crate) download_slots: IntGauge,
    pub(crate) commits_waiting: IntGauge,
    pub(crate) connections_open: IntGauge,
    pub(crate) connections_max: IntGauge,
    pub(crate) h2_window_bytes: IntGauge,
    pub(crate) h2_window_waits: IntCounter,
    fill_joins: IntCounter,
    prefetches: IntCounter,
    digest_mismatches: IntCounter,
    pub(crate) cache_size: IntGauge,
    pub(crate) cache_objects: IntGaugeVec,
    pub(crate) evictions: IntCounter,
    stale_answers: IntCounter,
    shared_store_requests: IntCounterVec,
    shared_store_bytes: IntCounterVec,
    pub(crate) shared_store_up: IntGauge,
    pub(crate) peer_up: IntGaugeVec,
    peer_requests_sent: IntCounterVec,
    peer_requests_served: IntCounterVec,
    pub(crate) upstream_up: IntGaugeVec,
    pub(crate) ratelimit_remaining: IntGaugeVec,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let metric = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

/// How a request to a peer went.
const PEER_OUTCOMES: [&str; 6] = ["ok", "declined", "slow", "refused", "failed", "corrupt"];

impl Metrics {
    /// Registers every metric and creates its series for the configured endpoints.
    pub fn new(endpoints: &[EndpointLabels]) -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            requests: counter_vec(
                &r,
                "regmirror_http_requests_total",
                "Requests answered, by route kind, method and status.",
                &["route", "method", "status"],
            ),
            request_duration: histogram_vec(
                &r,
                "regmirror_http_request_duration_seconds",
                "Time from request to response headers.",
                &["route"],
            ),
            cache_requests: counter_vec(
                &r,
                "regmirror_cache_requests_total",
                "Blob and manifest requests by cache outcome.",
                &["kind", "outcome"],
            ),
            served_bytes: counter_vec(
                &r,
                "regmirror_served_bytes_total",
                "Body bytes sent to clients: source=\"cache\" for answers the upstream did not \
                 send again (hits, stale answers, and clients that joined a download in \
                 progress), source=\"upstream\" for the download's own client and pass-through.",
                &["source"],
            ),
            sendfile_bytes: counter(
                &r,
                "regmirror_served_bytes_sendfile_total",
                "Body bytes sent with sendfile(2), straight from the page cache (plain-HTTP \
                 connections); a part of regmirror_served_bytes_total.",
            ),
            upstream_requests: counter_vec(
                &r,
                "regmirror_upstream_requests_total",
                "Requests sent upstream, by registry, endpoint and status (or error).",
                &["registry", "endpoint", "status"],
            ),
            upstream_duration: histogram_vec(
                &r,
                "regmirror_upstream_request_duration_seconds",
                "Time from an upstream request to its response headers.",
                &["registry", "endpoint"],
            ),
            upstream_bytes: counter_vec(
                &r,
                "regmirror_upstream_bytes_total",
                "Blob bytes received from upstream.",
                &["registry"],
            ),
            fills_in_flight: gauge(
                &r,
                "regmirror_fills_in_flight",
                "Blob downloads in progress.",
            ),
            downloads_queued: gauge(
                &r,
                "regmirror_downloads_queued",
                "Blob downloads waiting for a slot (cache.max_downloads are running).",
            ),
            download_slots: gauge(
                &r,
                "regmirror_download_slots",
                "The ceiling on blob downloads at once (cache.max_downloads).",
            ),
            connections_open: gauge(
                &r,
                "regmirror_connections_open",
                "Client connections open (TCP, TLS or not, any protocol).",
            ),
            connections_max: gauge(
                &r,
                "regmirror_connections_max",
                "The ceiling on client connections at once (server.max_connections).",
            ),
            h2_window_bytes: gauge(
                &r,
                "regmirror_h2_window_bytes",
                "Bytes of blob file windows HTTP/2 response bodies hold now, every connection \
                 together; each connection's within server.h2_window_memory.",
            ),
            h2_window_waits: counter(
                &r,
                "regmirror_h2_window_waits_total",
                "HTTP/2 body windows that waited for their connection's server.h2_window_memory \
                 (the client had not yet taken the windows its other streams hold).",
            ),
            commits_waiting: gauge(
                &r,
                "regmirror_commits_waiting",
                "Blobs downloaded and verified, served from their download file until blob traffic pauses and they are committed.",
            ),
            fill_joins: counter(
                &r,
                "regmirror_fill_joins_total",
                "Requests that joined a download already in progress.",
            ),
            prefetches: counter(
                &r,
                "regmirror_prefetches_total",
                "Blob downloads started ahead of any client: the rest of an image, when a \
                 client's request for one of its layers started a download.",
            ),
            digest_mismatches: counter(
                &r,
                "regmirror_digest_mismatches_total",
                "Content from upstream or the shared store whose digest or size did not match (never served whole).",
            ),
            cache_size: gauge(
                &r,
                "regmirror_cache_size_bytes",
                "Bytes of blobs in the cache, counting verified downloads waiting for their commit.",
            ),
            cache_objects: gauge_vec(
                &r,
                "regmirror_cache_objects",
                "Objects in the cache.",
                &["kind"],
            ),
            evictions: counter(
                &r,
                "regmirror_cache_evictions_total",
                "Blobs evicted to keep within the byte budget.",
            ),
            stale_answers: counter(
                &r,
                "regmirror_stale_answers_total",
                "Tags answered from the last known mapping because upstream could not be asked.",
            ),
            shared_store_requests: counter_vec(
                &r,
                "regmirror_shared_store_requests_total",
                "Requests to the shared store by operation (get, head, put, delete) and outcome (ok, missing, denied, error).",
                &["operation", "outcome"],
            ),
            shared_store_bytes: counter_vec(
                &r,
                "regmirror_shared_store_bytes_total",
                "Blob bytes read from the shared store (as they arrive, before the download verifies them) and written to it (uploads completed).",
                &["direction"],
            ),
            shared_store_up: gauge(
                &r,
                "regmirror_shared_store_up",
                "1 when the shared store's last request went through, 0 when it failed, -1 without a shared store.",
            ),
            peer_up: gauge_vec(
                &r,
                "regmirror_peer_up",
                "1 when a peer of the cluster answered its last request, 0 while it is skipped after a failure.",
                &["peer"],
            ),
            peer_requests_sent: counter_vec(
                &r,
                "regmirror_peer_requests_sent_total",
                "Requests (blobs, manifests by digest, tags) sent to the peer that owns them, by outcome (ok: it sent it, or said the tag is unchanged; declined: it answered without it; slow: no answer within cluster.timeout; refused: it refused this replica's cluster request; failed: it could not be reached, or its body broke; corrupt: what it sent did not verify).",
                &["peer", "outcome"],
            ),
            peer_requests_served: counter_vec(
                &r,
                "regmirror_peer_requests_served_total",
                "Cluster requests from peers, by outcome (served, refused: unsigned or badly signed, or not a blob).",
                &["outcome"],
            ),
            upstream_up: gauge_vec(
                &r,
                "regmirror_upstream_up",
                "1 when an endpoint is healthy, 0 while it is skipped after a failure.",
                &["registry", "endpoint"],
            ),
            ratelimit_remaining: gauge_vec(
                &r,
                "regmirror_upstream_ratelimit_remaining",
                "Docker Hub pulls left (ratelimit-remaining), -1 until seen.",
                &["registry", "endpoint"],
            ),
            registry: r,
        };
        let build = gauge_vec(
            &m.registry,
            "regmirror_build_info",
            "Build information.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for route in ROUTES {
            m.request_duration.with_label_values(&[route]);
            m.requests.with_label_values(&[route, "GET", "200"]);
        }
        for route in ["manifest", "blob"] {
            m.requests.with_label_values(&[route, "HEAD", "200"]);
        }
        for kind in ["blob", "manifest"] {
            for outcome in OUTCOMES {
                m.cache_requests.with_label_values(&[kind, outcome]);
            }
            m.cache_objects.with_label_values(&[kind]);
        }
        for source in ["cache", "upstream"] {
            m.served_bytes.with_label_values(&[source]);
        }
        for e in endpoints {
            m.upstream_bytes.with_label_values(&[&e.registry]);
            for url in &e.endpoints {
                m.upstream_up.with_label_values(&[&e.registry, url]).set(1);
                m.ratelimit_remaining
                    .with_label_values(&[&e.registry, url])
                    .set(-1);
                m.upstream_duration.with_label_values(&[&e.registry, url]);
                m.upstream_requests
                    .with_label_values(&[&e.registry, url, "200"]);
            }
        }
        m
    }

    /// Creates the series of endpoints added by a reload.
    pub fn add_endpoints(&self, endpoints: &[EndpointLabels]) {
        for e in endpoints {
            self.upstream_bytes.with_label_values(&[&e.registry]);
            for url in &e.endpoints {
                self.upstream_up.with_label_values(&[&e.registry, url]);
                self.upstream_duration
                    .with_label_values(&[&e.registry, url]);
                self.upstream_requests
                    .with_label_values(&[&e.registry, url, "200"]);
            }
        }
    }

    /// One answered request.
    pub fn request(&self, route: &str, method: &http::Method, status: u16, seconds: f64) {
        let method = match *method {
            http::Method::GET => "GET",
            http::Method::HEAD => "HEAD",
            _ => "other",
        };
        self.requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
        self.request_duration
            .with_label_values(&[route])
            .observe(seconds);
    }

    /// A blob or manifest request's cache outcome.
    pub fn cache_outcome(&self, kind: &str, outcome: &str) {
        self.cache_requests
            .with_label_values(&[kind, outcome])
            .inc();
        match outcome {
            "join" => self.fill_joins.inc(),
            "stale" => self.stale_answers.inc(),
            _ => {}
        }
    }

    /// Counts body bytes sent to a client; `saved` when the upstream did not send them again
    /// for this answer.
    pub fn served_bytes_counter(&self, saved: bool) -> IntCounter {
        self.served_bytes
            .with_label_values(&[if saved { "cache" } else { "upstream" }])
    }

    /// Counts blob downloads started ahead of any client.
    pub fn prefetches_counter(&self) -> IntCounter {
        self.prefetches.clone()
    }

    /// Counts body bytes sent with `sendfile(2)`.
    pub fn sendfile_bytes_counter(&self) -> IntCounter {
        self.sendfile_bytes.clone()
    }

    /// One upstream request, with its status (or `error`) and time to headers.
    pub fn upstream_request(&self, registry: &str, endpoint: &str, status: &str, seconds: f64) {
        self.upstream_requests
            .with_label_values(&[registry, endpoint, status])
            .inc();
        self.upstream_duration
            .with_label_values(&[registry, endpoint])
            .observe(seconds);
    }

    pub fn upstream_bytes(&self, registry: &str, bytes: u64) {
        self.upstream_bytes
            .with_label_values(&[registry])
            .inc_by(bytes);
    }

    /// Starts the shared store's series at zero, so they exist from start-up.
    pub fn shared_store_configured(&self) {
        for operation in ["get", "head", "put", "delete"] {
            for outcome in ["ok", "missing", "denied", "error"] {
                self.shared_store_requests
                    .with_label_values(&[operation, outcome]);
            }
        }
        for direction in ["read", "written"] {
            self.shared_store_bytes.with_label_values(&[direction]);
        }
    }

    /// A peer left the cluster (looked up again): its series go.
    pub fn peer_gone(&self, peer: &str) {
        let _ = self.peer_up.remove_label_values(&[peer]);
        for outcome in PEER_OUTCOMES {
            let _ = self
                .peer_requests_sent
                .remove_label_values(&[peer, outcome]);
        }
    }

    /// Starts the cluster's series at zero, so they exist from start-up (or from when a peer
    /// is looked up).
    pub fn cluster_configured(&self, peers: &[String]) {
        for peer in peers {
            self.peer_up.with_label_values(&[peer.as_str()]).set(1);
            for outcome in PEER_OUTCOMES {
                self.peer_requests_sent
                    .with_label_values(&[peer.as_str(), outcome]);
            }
        }
        for outcome in ["served", "refused"] {
            self.peer_requests_served.with_label_values(&[outcome]);
        }
    }

    pub fn peer_request_sent(&self, peer: &str, outcome: &str) {
        self.peer_requests_sent
            .with_label_values(&[peer, outcome])
            .inc();
    }

    pub fn peer_request_served(&self, outcome: &str) {
        self.peer_requests_served
            .with_label_values(&[outcome])
            .inc();
    }

    pub fn shared_store_request(&self, operation: &str, outcome: &str) {
        self.shared_store_requests
            .with_label_values(&[operation, outcome])
            .inc();
    }

    pub fn shared_store_bytes(&self, direction: &str, bytes: u64) {
        self.shared_store_bytes
            .with_label_values(&[direction])
            .inc_by(bytes);
    }

    pub fn digest_mismatch(&self) {
        self.digest_mismatches.inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}
