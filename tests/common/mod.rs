//! Test harness: an in-process fake registry with per-request counters and fault knobs, a
//! mirror on 127.0.0.1:0 in a temp dir, and a small HTTP client.
#![allow(dead_code)]

pub mod e2e;
pub mod pki;

use bytes::Bytes;
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use regmirror::app::App;
use regmirror::config::{Config, RegistryConfig, UpstreamConfig};
use regmirror::digest::Digest;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Faults and behaviours of the fake registry, changeable while it runs.
#[derive(Clone, Default)]
pub struct Knobs {
    /// Answer every request with this status (an upstream that is down).
    pub fail_status: Option<u16>,
    /// Require a bearer token from `/token` on this server.
    pub require_token: bool,
    /// Require this `Authorization: Basic ...` value.
    pub require_basic: Option<String>,
    /// Answer blob GETs with headers, then never send a byte.
    pub stall_blobs: bool,
    /// Send this many bytes of a blob body, then hang.
    pub stall_after: Option<usize>,
    /// Ignore `Range` (answer 200 with the whole blob).
    pub ignore_range: bool,
    /// Answer manifest requests with 429 and this `Retry-After`.
    pub rate_limit_manifests: Option<u64>,
    /// Send Docker Hub's rate-limit headers on manifest answers.
    pub rate_limit_headers: bool,
    /// `expires_in` of issued tokens (absent when `None`).
    pub token_expires_in: Option<u64>,
    /// Redirect blob GETs to `<base>/cdn/<digest>` (another fake).
    pub redirect_blobs_to: Option<String>,
    /// Flip one byte in the middle of every blob body.
    pub corrupt_blobs: bool,
    /// Flip the last byte of every blob body.
    pub corrupt_last_byte: bool,
    /// Fail the connection after this many bytes of a blob body.
    pub reset_after: Option<usize>,
    /// Bytes per body chunk (default 64 KiB).
    pub chunk: Option<usize>,
    /// Pause between body chunks.
    pub chunk_delay: Option<Duration>,
    /// After the first chunk of a blob body, wait for a permit from this gate.
    pub gate: Option<Arc<Semaphore>>,
    /// Omit `Content-Length` on blob bodies (chunked transfer).
    pub no_content_length: bool,
    /// Answer blob GETs with a 302 to exactly this `Location` (a loop, another scheme).
    pub blob_location: Option<String>,
    /// Name this base URL (another server's) as the token realm instead of this server.
    pub token_realm: Option<String>,
    /// After a blob's bytes, send zeros for ever (use with `no_content_length`).
    pub endless_tail: bool,
    /// Blobs exist only in this repository (404 elsewhere), as on a real registry.
    pub blobs_only_in: Option<String>,
}

#[derive(Default)]
struct State {
    blobs: HashMap<String, Bytes>,
    /// (repo, tag or digest) -> (media type, bytes)
    manifests: HashMap<(String, String), (String, Bytes)>,
    /// "METHOD /path" -> count
    hits: HashMap<String, usize>,
    /// (path, Authorization) of every request
    authorizations: Vec<(String, Option<String>)>,
    /// `Range` header of every blob request
    ranges: Vec<Option<String>>,
    knobs: Knobs,
}

/// An in-process registry that serves what it is given and counts what it is asked.
pub struct FakeRegistry {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _stop: oneshot::Sender<()>,
}

impl FakeRegistry {
    pub async fn start() -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let serving = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(p) => p, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                let state = Arc::clone(&serving);
                let service = service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(serve(state, addr, req).await) }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeRegistry {
            addr,
            state,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn knobs(&self, change: impl FnOnce(&mut Knobs)) {
        change(&mut self.state.lock().unwrap().knobs);
    }

    /// Adds a blob; returns its digest.
    pub fn add_blob(&self, bytes: impl Into<Bytes>) -> Digest {
        let bytes = bytes.into();
        let digest = Digest::of(&bytes);
        self.state
            .lock()
            .unwrap()
            .blobs
            .insert(digest.to_string(), bytes);
        digest
    }

    /// Adds a manifest under its digest and, if given, a tag; returns its digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) -> Digest {
        let bytes = bytes.into();
        let digest = Digest::of(&bytes);
        let mut state = self.state.lock().unwrap();
        let entry = (media_type.to_string(), bytes);
        state
            .manifests
            .insert((repo.into(), digest.to_string()), entry.clone());
        if let Some(tag) = tag {
            state.manifests.insert((repo.into(), tag.into()), entry);
        }
        digest
    }

    /// Adds the smallest image: an empty config and a Docker manifest without layers, under
    /// `tag`; returns the manifest's digest.
    pub fn add_empty_image(&self, repo: &str, tag: &str) -> Digest {
        let config = self.add_blob(b"{}".to_vec());
        let manifest = schema2_manifest(&config, 2, &[]);
        self.add_manifest(repo, Some(tag), DOCKER_MANIFEST, manifest)
    }

    /// Serves `bytes` under any reference, even a digest they do not have (a lying upstream).
    pub fn add_manifest_as(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: impl Into<Bytes>,
    ) {
        let entry = (media_type.to_string(), bytes.into());
        self.state
            .lock()
            .unwrap()
            .manifests
            .insert((repo.into(), reference.into()), entry);
    }

    /// How often `METHOD /path` was asked.
    pub fn hits(&self, method: &str, path: &str) -> usize {
        let key = format!("{method} {path}");
        self.state
            .lock()
            .unwrap()
            .hits
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// The `Range` header of every blob request, in order.
    pub fn ranges(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().ranges.clone()
    }

    /// Every request's path and Authorization header.
    pub fn authorizations(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().authorizations.clone()
    }
}

async fn serve(
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    req: Request<Incoming>,
) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_string());
    let range = req
        .headers()
        .get(header::RANGE)
        .map(|v| v.to_str().unwrap().to_string());
    let knobs = {
        let mut s = state.lock().unwrap();
        if path.contains("/blobs/") || path.starts_with("/cdn/") {
            s.ranges.push(range.clone());
        }
        *s.hits.entry(format!("{method} {path}")).or_default() += 1;
        s.authorizations.push((path.clone(), auth.clone()));
        s.knobs.clone()
    };
    if let Some(status) = knobs.fail_status {
        return respond(
            status,
            "application/json",
            Bytes::from_static(b"{\"errors\":[]}"),
            &[],
        );
    }
    if path == "/token" {
        let body = match knobs.token_expires_in {
            Some(s) => format!(r#"{{"token":"tok-{s}","expires_in":{s}}}"#),
            None => r#"{"token":"tok-default"}"#.to_string(),
        };
        return respond(200, "application/json", Bytes::from(body), &[]);
    }
    if let Some(digest) = path.strip_prefix("/cdn/") {
        let blob = state.lock().unwrap().blobs.get(digest).cloned();
        return match blob {
            Some(b) => blob_response(b, &knobs, method == Method::HEAD),
            None => respond(404, "application/json", Bytes::new(), &[]),
        };
    }
    if knobs.require_token
        && !auth
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer tok-"))
    {
        let realm = knobs
            .token_realm
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let challenge =
            format!(r#"Bearer realm="{realm}/token",service="fake",scope="repository:x:pull""#);
        return respond(
            401,
            "application/json",
            Bytes::new(),
            &[("www-authenticate", &challenge)],
        );
    }
    if let Some(expected) = &knobs.require_basic {
        if auth.as_deref() != Some(expected.as_str()) {
            return respond(
                401,
                "application/json",
                Bytes::new(),
                &[("www-authenticate", r#"Basic realm="fake""#)],
            );
        }
    }
    if path == "/v2/" {
        return respond(200, "application/json", Bytes::from_static(b"{}"), &[]);
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return respond(404, "text/plain", Bytes::new(), &[]);
    };
    if let Some((repo, reference)) = rest.split_once("/manifests/") {
        if let Some(retry_after) = knobs.rate_limit_manifests {
            let retry = retry_after.to_string();
            return respond(
                429,
                "application/json",
                Bytes::from_static(br#"{"errors":[{"code":"TOOMANYREQUESTS"}]}"#),
                &[
                    ("retry-after", &retry),
                    ("ratelimit-limit", "100;w=21600"),
                    ("ratelimit-remaining", "0;w=21600"),
                ],
            );
        }
        let found = state
            .lock()
            .unwrap()
            .manifests
            .get(&(repo.to_string(), reference.to_string()))
            .cloned();
        let Some((media_type, bytes)) = found else {
            return respond(
                404,
                "application/json",
                Bytes::from_static(br#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#),
                &[],
            );
        };
        let digest = Digest::of(&bytes).to_string();
        let body = if method == Method::HEAD {
            Bytes::new()
        } else {
            bytes.clone()
        };
        let mut r = respond(
            200,
            &media_type,
            body,
            &[("docker-content-digest", &digest)],
        );
        if knobs.rate_limit_headers {
            let h = r.headers_mut();
            h.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
            h.insert("ratelimit-remaining", "42;w=21600".parse().unwrap());
            h.insert("docker-ratelimit-source", "192.0.2.7".parse().unwrap());
        }
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, bytes.len().into());
        return r;
    }
    if let Some((repo, digest)) = rest.split_once("/blobs/") {
        let elsewhere = knobs
            .blobs_only_in
            .as_deref()
            .is_some_and(|only| only != repo);
        let blob = match elsewhere {
            true => None,
            false => state.lock().unwrap().blobs.get(digest).cloned(),
        };
        let Some(blob) = blob else {
            return respond(
                404,
                "application/json",
                Bytes::from_static(br#"{"errors":[{"code":"BLOB_UNKNOWN"}]}"#),
                &[],
            );
        };
        if let (Some(location), true) = (&knobs.blob_location, method == Method::GET) {
            return respond(302, "text/plain", Bytes::new(), &[("location", location)]);
        }
        if let (Some(cdn), true) = (&knobs.redirect_blobs_to, method == Method::GET) {
            let location = format!("{cdn}/cdn/{digest}");
            return respond(307, "text/plain", Bytes::new(), &[("location", &location)]);
        }
        let offset = range.filter(|_| !knobs.ignore_range).and_then(|r| {
            r.strip_prefix("bytes=")
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|n| n.parse::<usize>().ok())
        });
        if let (Some(offset), false) = (offset, method == Method::HEAD) {
            let total = blob.len();
            let mut r = blob_response(blob.slice(offset.min(total)..), &knobs, false);
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let value = format!("bytes {offset}-{}/{total}", total.saturating_sub(1));
            r.headers_mut()
                .insert(header::CONTENT_RANGE, value.parse().unwrap());
            return r;
        }
        return blob_response(blob, &knobs, method == Method::HEAD);
    }
    if let Some(repo) = rest.strip_suffix("/tags/list") {
        let s = state.lock().unwrap();
        let mut tags: Vec<&String> = s
            .manifests
            .keys()
            .filter(|(r, t)| r == repo && !t.starts_with("sha256:"))
            .map(|(_, t)| t)
            .collect();
        tags.sort();
        let body = serde_json::json!({"name": repo, "tags": tags}).to_string();
        return respond(200, "application/json", Bytes::from(body), &[]);
    }
    respond(404, "text/plain", Bytes::new(), &[])
}

fn respond(
    status: u16,
    content_type: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Response<TestBody> {
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder
        .body(
            http_body_util::Full::new(body)
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap()
}

/// A blob body with the configured faults.
fn blob_response(blob: Bytes, knobs: &Knobs, head: bool) -> Response<TestBody> {
    let mut builder = Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("docker-content-digest", Digest::of(&blob).to_string());
    if !knobs.no_content_length {
        builder = builder.header(header::CONTENT_LENGTH, blob.len());
    }
    if head {
        return builder
            .body(
                http_body_util::Empty::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap();
    }
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let knobs = knobs.clone();
    tokio::spawn(async move {
        if knobs.stall_blobs {
            tx.closed().await;
            return;
        }
        if let Some(n) = knobs.stall_after {
            let n = n.min(blob.len());
            let _ = tx.send(Ok(Frame::data(blob.slice(..n)))).await;
            tx.closed().await;
            return;
        }
        let mut data = blob.to_vec();
        if knobs.corrupt_blobs && !data.is_empty() {
            let mid = data.len() / 2;
            data[mid] ^= 0xff;
        }
        if knobs.corrupt_last_byte {
            if let Some(last) = data.last_mut() {
                *last ^= 0xff;
            }
        }
        let chunk = knobs.chunk.unwrap_or(64 * 1024).max(1);
        let mut sent = 0usize;
        for (i, piece) in data.chunks(chunk).enumerate() {
            if let Some(limit) = knobs.reset_after {
                if sent + piece.len() > limit {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::copy_from_slice(
                            &piece[..limit - sent],
                        ))))
                        .await;
                    let _ = tx.send(Err(std::io::Error::other("injected reset"))).await;
                    return;
                }
            }
            if tx
                .send(Ok(Frame::data(Bytes::copy_from_slice(piece))))
                .await
                .is_err()
            {
                return;
            }
            sent += piece.len();
            if i == 0 {
                if let Some(gate) = &knobs.gate {
                    let _ = gate.acquire().await.map(|p| p.forget());
                }
            }
            if let Some(delay) = knobs.chunk_delay {
                tokio::time::sleep(delay).await;
            }
        }
        if knobs.endless_tail {
            let garbage = Bytes::from(vec![0u8; 64 * 1024]);
            while tx.send(Ok(Frame::data(garbage.clone()))).await.is_ok() {}
        }
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    builder.body(StreamBody::new(stream).boxed()).unwrap()
}

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
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                tokio::select! {
                    r = listener.accept() => if let Ok((mut stream, _)) = r {
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
        BlackHole { addr, _stop: stop }
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

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.bytes()).expect("JSON body")
    }
}

pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A GET whose answer's body is left unread (a client that stops, or reads slowly).
pub async fn start_get(url: &str) -> Response<Incoming> {
    client()
        .request(Request::get(url).body(Empty::new()).unwrap())
        .await
        .unwrap()
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

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
