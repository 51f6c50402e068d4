//! The fake registry: an in-process registry on 127.0.0.1:0 that serves what it is given,
//! counts what it is asked, and injects faults (statuses, stalls, resets, corrupt bytes,
//! refused or held connections, redirects, token trouble) on command.

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use regmirror::digest::Digest;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::{schema2_manifest, TestBody, DOCKER_MANIFEST};

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
    /// With `rate_limit_manifests`: only GETs are refused (Docker Hub counts GETs, not HEADs).
    pub rate_limit_only_gets: bool,
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
    /// With `fail_status`: the `Retry-After` sent.
    pub fail_retry_after: Option<u64>,
    /// Answer manifest HEADs with 405 (GET works).
    pub refuse_manifest_head: bool,
    /// Flip one byte of every manifest body (its `Docker-Content-Digest` stays the true one).
    pub corrupt_manifests: bool,
    /// Send half of every manifest and `tags/list` body, then hang.
    pub stall_listings: bool,
    /// With `require_token`: accept only `Bearer <this>` (tokens issued before are refused,
    /// as when they expire).
    pub accepted_token: Option<String>,
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
    /// Connections reset or held without an answer.
    unanswered_connections: usize,
    /// The listener is bound.
    listening: bool,
    knobs: Knobs,
}

/// Accepts connections as the mode says: serves them, resets them, holds them, or stops
/// listening (and binds the same address again when the mode changes back).
async fn accept_loop(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    mut modes: watch::Receiver<Connections>,
    mut stopped: oneshot::Receiver<()>,
) {
    let addr = listener.local_addr().unwrap();
    let mut listener = Some(listener);
    let mut held = Vec::new();
    loop {
        let mode = *modes.borrow_and_update();
        if mode != Connections::Hold {
            held.clear();
        }
        if mode == Connections::Refuse {
            listener = None;
        } else if listener.is_none() {
            listener = Some(rebind(addr).await);
        }
        state.lock().unwrap().listening = listener.is_some();
        let accepted = async {
            match &listener {
                Some(l) => l.accept().await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            accepted = accepted => {
                let Some((stream, _)) = accepted else { continue };
                match mode {
                    Connections::Serve => serve_connection(stream, &state, addr, modes.clone()),
                    Connections::Reset => {
                        state.lock().unwrap().unanswered_connections += 1;
                        drop(stream);
                    }
                    Connections::Hold => {
                        state.lock().unwrap().unanswered_connections += 1;
                        held.push(stream);
                    }
                    Connections::Refuse => {}
                }
            }
            _ = modes.changed() => {}
            _ = &mut stopped => return,
        }
    }
}

/// Binds `addr` again after a pause in listening (retrying while the port is briefly taken).
async fn rebind(addr: SocketAddr) -> TcpListener {
    for _ in 0..200 {
        if let Ok(listener) = TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("cannot listen on {addr} again");
}

/// Serves one connection until it ends or the connection mode changes.
fn serve_connection(
    stream: tokio::net::TcpStream,
    state: &Arc<Mutex<State>>,
    addr: SocketAddr,
    mut modes: watch::Receiver<Connections>,
) {
    let state = Arc::clone(state);
    let service = service_fn(move |req| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(serve(state, addr, req).await) }
    });
    tokio::spawn(async move {
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            _ = connection => {}
            _ = modes.changed() => {}
        }
    });
}

/// What the fake does with connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Connections {
    /// Serve HTTP.
    #[default]
    Serve,
    /// Accept each connection and close it at once (a reset before any answer).
    Reset,
    /// Accept each connection and never answer (a timeout).
    Hold,
    /// Stop listening: connections are refused (the process is down).
    Refuse,
}

/// An in-process registry that serves what it is given and counts what it is asked.
pub struct FakeRegistry {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// The connection mode; a change closes every open connection (a restart).
    mode: watch::Sender<Connections>,
    _stop: oneshot::Sender<()>,
}

impl FakeRegistry {
    pub async fn start() -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (stop, stopped) = oneshot::channel::<()>();
        let (mode, modes) = watch::channel(Connections::Serve);
        tokio::spawn(accept_loop(listener, Arc::clone(&state), modes, stopped));
        FakeRegistry {
            addr,
            state,
            mode,
            _stop: stop,
        }
    }

    /// Changes what happens to connections; every connection open now is closed.
    pub async fn connections(&self, mode: Connections) {
        self.mode.send_replace(mode);
        // Wait until the accept loop has (un)bound its listener accordingly.
        for _ in 0..200 {
            if self.state.lock().unwrap().listening == (mode != Connections::Refuse) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the fake registry did not switch to {mode:?}");
    }

    /// Every request it was sent, plus connections it reset or held without answering.
    pub fn seen(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.hits.values().sum::<usize>() + s.unanswered_connections
    }

    /// Forgets the counts (hits, connections, ranges, authorizations).
    pub fn reset_counts(&self) {
        let mut s = self.state.lock().unwrap();
        s.hits.clear();
        s.unanswered_connections = 0;
        s.ranges.clear();
        s.authorizations.clear();
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
    let query = req.uri().query().map(str::to_string);
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
        let retry = knobs.fail_retry_after.map(|s| s.to_string());
        let headers: Vec<(&str, &str)> =
            retry.iter().map(|r| ("retry-after", r.as_str())).collect();
        return respond(
            status,
            "application/json",
            Bytes::from_static(b"{\"errors\":[]}"),
            &headers,
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
    let token_ok = |a: &str| match &knobs.accepted_token {
        Some(only) => a.strip_prefix("Bearer ") == Some(only.as_str()),
        None => a.starts_with("Bearer tok-"),
    };
    if knobs.require_token && !auth.as_deref().is_some_and(token_ok) {
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
        let limited = knobs
            .rate_limit_manifests
            .filter(|_| !(knobs.rate_limit_only_gets && method == Method::HEAD));
        if let Some(retry_after) = limited {
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
        if knobs.refuse_manifest_head && method == Method::HEAD {
            return respond(405, "application/json", Bytes::new(), &[]);
        }
        let digest = Digest::of(&bytes).to_string();
        let body = if method == Method::HEAD {
            Bytes::new()
        } else if knobs.corrupt_manifests {
            let mut flipped = bytes.to_vec();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 0x01;
            Bytes::from(flipped)
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
        if knobs.stall_listings && method == Method::GET {
            return stalling(r, bytes);
        }
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
        if tags.is_empty() {
            return respond(404, "application/json", Bytes::new(), &[]);
        }
        tags.sort();
        // Pagination as distribution does it: `n` per page, from after `last`, with a `Link`
        // to the next page.
        let param = |key: &str| {
            query.as_deref().and_then(|q| {
                q.split('&')
                    .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
                    .map(str::to_string)
            })
        };
        if let Some(last) = param("last") {
            tags.retain(|t| t.as_str() > last.as_str());
        }
        let mut link = None;
        if let Some(n) = param("n").and_then(|n| n.parse::<usize>().ok()) {
            if tags.len() > n {
                tags.truncate(n);
                let last = tags.last().unwrap();
                link = Some(format!(
                    "</v2/{repo}/tags/list?last={last}&n={n}>; rel=\"next\""
                ));
            }
        }
        let body = Bytes::from(serde_json::json!({"name": repo, "tags": tags}).to_string());
        let headers: Vec<(&str, &str)> = link.iter().map(|l| ("link", l.as_str())).collect();
        let r = respond(200, "application/json", body.clone(), &headers);
        if knobs.stall_listings {
            return stalling(r, body);
        }
        return r;
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

/// `response` with a body that sends the first half of `bytes`, then hangs.
fn stalling(response: Response<TestBody>, bytes: Bytes) -> Response<TestBody> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
    tokio::spawn(async move {
        let half = bytes.slice(..bytes.len() / 2);
        let _ = tx.send(Ok(Frame::data(half))).await;
        tx.closed().await;
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, StreamBody::new(stream).boxed())
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
