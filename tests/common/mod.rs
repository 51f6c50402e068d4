//! Test harness: an in-process fake registry with per-request counters and fault knobs, a
//! mirror on 127.0.0.1:0 in a temp dir, and a small HTTP client.
#![allow(dead_code)]

pub mod chaos;
pub mod e2e;
mod fake;
pub mod login;
pub mod pki;
pub mod process;
pub mod relay;
pub mod s3;
pub mod small_image;
pub mod token_service;

#[allow(unused_imports)]
pub use fake::{Connections, FakeRegistry, Knobs};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use regmirror::app::App;
use regmirror::config::{Config, RegistryConfig, UpstreamConfig};
use regmirror::digest::Digest;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// An endpoint that accepts connections and closes them at once, counting them.
pub struct DeadEndpoint {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl DeadEndpoint {
    pub async fn start() -> DeadEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&connections);
        let (stop, mut stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = listener.accept() => if let Ok((stream, _)) = r {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        drop(stream);
                    },
                    _ = &mut stopped => return,
                }
            }
        });
        DeadEndpoint {
            addr,
            connections,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An endpoint that accepts connections and never answers, or answers only a first part.
pub struct BlackHole {
    pub addr: SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    _stop: oneshot::Sender<()>,
}

impl BlackHole {
    /// Accepts connections and never answers.
    pub async fn start() -> BlackHole {
        Self::serve(None).await
    }

    /// Reads each request, sends `first` (a head and part of a body, say) and then nothing
    /// more, holding the connection open.
    pub async fn stalling_after(first: &'static [u8]) -> BlackHole {
        Self::serve(Some(first)).await
    }

    async fn serve(first: Option<&'static [u8]>) -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    r = listener.accept() => if let Ok((mut stream, _)) = r {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if let Some(first) = first {
                            let mut request = [0u8; 4096];
                            let _ = stream.read(&mut request).await;
                            let _ = stream.write_all(first).await;
                        }
                        held.push(stream);
                    },
                    _ = &mut stopped => return,
                }
            }
        });
        BlackHole {
            addr,
            accepted,
            _stop: stop,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A mirror on 127.0.0.1:0 with its own cache directory.
pub struct TestMirror {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The first configuration generation (cache and counters are shared by all).
    pub app: Arc<App>,
    /// For reloads.
    pub live: Arc<regmirror::app::Live>,
    /// The listener's certificate, when the configuration has `[server.tls]`.
    pub tls: Option<Arc<regmirror::tls::ServerTls>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestMirror {
    /// A mirror of one default registry `docker.io` whose only upstream is `upstream`.
    pub async fn start(upstream: &str, tweak: impl FnOnce(&mut Config)) -> TestMirror {
        Self::start_many(&[upstream], tweak).await
    }

    /// A mirror of one default registry `docker.io` with these upstreams, in order.
    pub async fn start_many(upstreams: &[&str], tweak: impl FnOnce(&mut Config)) -> TestMirror {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.cache.dir = dir.path().join("cache");
        let ups = upstreams.iter().map(|u| test_upstream(u)).collect();
        config.registry = vec![RegistryConfig::new("docker.io", true, ups)];
        tweak(&mut config);
        config.validate().unwrap();
        Self::start_with(config, dir).await
    }

    pub async fn start_with(config: Config, dir: tempfile::TempDir) -> TestMirror {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = config
            .server
            .tls
            .as_ref()
            .map(|files| Arc::new(regmirror::tls::ServerTls::load(files).unwrap()));
        let app = App::new(config).unwrap();
        let live = regmirror::app::Live::new(Arc::clone(&app));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(regmirror::server::run(
            listener,
            Arc::clone(&live),
            tls.clone(),
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        // Serving: its admin socket is made before the first request is taken.
        let socket = app.config().cache.dir.join(regmirror::admin::SOCKET);
        eventually("the server is up", || socket.exists()).await;
        TestMirror {
            addr,
            dir,
            app,
            live,
            tls,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.app.config().cache.dir.clone()
    }

    /// Whether the store holds this blob.
    pub fn has_blob(&self, digest: &Digest) -> bool {
        blob_path(&self.cache_dir(), digest).exists()
    }

    /// Waits until no download is in flight: clients get a blob's last byte once it is verified,
    /// and it is committed to the store once blob traffic pauses.
    pub async fn settle(&self) {
        let app = Arc::clone(&self.app);
        eventually("downloads in flight are committed", move || {
            app.cache().fills_in_flight() == 0
        })
        .await;
    }

    /// Waits until the mirror's answer for `repo:tag` (first registry) is no longer fresh: the
    /// next request for it asks upstream (its TTL, or a stale answer's recheck time, is over).
    /// A wait on the mirror's own state rather than a sleep guessed from its settings.
    pub async fn until_tag_due(&self, repo: &str, tag: &str) {
        let repo = regmirror::oci::RepoName::parse(repo).expect("a repository name");
        let tag = regmirror::oci::Tag::parse(tag).expect("a tag");
        let key = regmirror::cache::TagKey::new(&self.app, 0, &repo, &tag);
        for _ in 0..1000 {
            if self.app.cache().peek_tag(&key).await.is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the answer for {repo}:{tag} stayed fresh for 5 s");
    }

    /// Waits until endpoint `endpoint` of the first registry is admitted again without a
    /// probe being forced: its back-off and any rate-limit pause are over.
    pub async fn until_endpoint_ready(&self, endpoint: usize) {
        let app = Arc::clone(&self.app);
        eventually(
            "the endpoint's back-off and rate-limit pause are over",
            move || {
                let health = &app.upstream(0).status()[endpoint].health;
                health.backing_off_for.is_none() && health.rate_limited_for.is_none()
            },
        )
        .await;
    }

    /// Waits until the prefetcher has started every download it meant to (or given up on them)
    /// and every download has an outcome. A request that starts an image's prefetch counts
    /// before its response begins, so "nothing was prefetched" is certain once this returns.
    pub async fn prefetches_done(&self) {
        let app = Arc::clone(&self.app);
        eventually(
            "prefetches have started everything they meant to",
            move || app.prefetcher().runs_in_progress() == 0,
        )
        .await;
        self.settle().await;
    }

    /// The value of one series on `/metrics` now.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = get(&self.url("/metrics")).await;
        metric_value(&String::from_utf8_lossy(text.bytes()), name, labels)
    }

    /// Files left under `tmp/`.
    pub fn temp_files(&self) -> usize {
        std::fs::read_dir(self.cache_dir().join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Stops the server, letting responses in flight finish; returns the cache's directory.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.dir
    }
}

/// An upstream with timeouts short enough for tests.
pub fn test_upstream(url: &str) -> UpstreamConfig {
    let mut up = UpstreamConfig::new(url);
    up.connect_timeout = Duration::from_secs(2);
    up.response_timeout = Duration::from_secs(5);
    up.stall_timeout = Duration::from_secs(5);
    up
}

pub fn blob_path(cache: &Path, digest: &Digest) -> PathBuf {
    let hex = digest.hex();
    cache.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// What a test client received.
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body, or why it did not arrive whole.
    pub body: Result<Bytes, String>,
}

impl Got {
    /// Reads a response whole (the body, or why it did not arrive whole).
    pub async fn receive(response: Response<hyper::body::Incoming>) -> Got {
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string());
        Got {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn bytes(&self) -> &Bytes {
        self.body.as_ref().expect("body arrived whole")
    }

    /// Checks a GET's answer is `digest`'s content: the `Docker-Content-Digest` header names
    /// it and the body hashes to it (a header alone could front other bytes).
    pub fn assert_content(&self, digest: &Digest) {
        assert_eq!(self.status, StatusCode::OK);
        assert_eq!(
            self.header("docker-content-digest"),
            Some(digest.to_string().as_str())
        );
        assert_eq!(
            Digest::of(self.bytes()),
            *digest,
            "the body is other content"
        );
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.bytes()).expect("JSON body")
    }
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A GET whose answer's body is left unread (a client that stops, or reads slowly).
pub async fn start_get(url: &str) -> Response<Incoming> {
    try_start_get(url)
        .await
        .unwrap_or_else(|| panic!("GET {url}: no response"))
}

/// [`start_get`] that may fail before any response (the server died, or dropped the
/// connection before the headers): `None` then.
pub async fn try_start_get(url: &str) -> Option<Response<Incoming>> {
    client()
        .request(Request::get(url).body(Empty::new()).unwrap())
        .await
        .ok()
}

/// One request with a fresh connection pool; `None` when it fails before any response (the
/// server died, or dropped the connection before the headers).
pub async fn try_request(method: Method, url: &str, headers: &[(&str, &str)]) -> Option<Got> {
    let mut builder = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = client()
        .request(builder.body(Empty::new()).unwrap())
        .await
        .ok()?;
    Some(Got::receive(response).await)
}

/// One request that must get a response.
pub async fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Got {
    try_request(method.clone(), url, headers)
        .await
        .unwrap_or_else(|| panic!("{method} {url}: no response"))
}

/// A GET that may fail before any response: `None` then.
pub async fn try_get(url: &str) -> Option<Got> {
    try_request(Method::GET, url, &[]).await
}

pub async fn get(url: &str) -> Got {
    request(Method::GET, url, &[]).await
}

pub async fn head(url: &str) -> Got {
    request(Method::HEAD, url, &[]).await
}

/// The `Accept` every modern client sends for manifests.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

pub async fn get_manifest(url: &str) -> Got {
    request(Method::GET, url, &[("accept", ACCEPT_ALL)]).await
}

pub async fn head_manifest(url: &str) -> Got {
    request(Method::HEAD, url, &[("accept", ACCEPT_ALL)]).await
}

/// The value of the series `name` whose labels include `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, number) = line.rsplit_once(' ').unwrap();
        let (metric, label_text) = series
            .split_once('{')
            .map_or((series, ""), |(m, l)| (m, l.trim_end_matches('}')));
        if metric != name {
            continue;
        }
        let found: BTreeMap<&str, &str> = label_text
            .split("\",")
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
        if labels.iter().all(|(k, v)| found.get(k) == Some(v)) {
            return number.parse().unwrap();
        }
    }
    panic!("no series {name} {labels:?} in:\n{text}");
}

/// Incompressible test bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Waits (bounded) for a condition the server reaches in the background.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Waits (bounded) for a condition that takes a request to check.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    mut condition: impl FnMut() -> F,
) {
    for _ in 0..500 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A simple schema2 image manifest referencing a config and layers.
pub fn schema2_manifest(config: &Digest, config_size: usize, layers: &[(Digest, usize)]) -> String {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, s)| serde_json::json!({"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": s, "digest": d.to_string()}))
        .collect();
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": config_size, "digest": config.to_string()},
        "layers": layers,
    })
    .to_string()
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
