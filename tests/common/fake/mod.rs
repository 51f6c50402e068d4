//! The fake registry: an in-process registry on 127.0.0.1:0 that serves what it is given,
//! counts what it is asked, and injects faults (statuses, stalls, resets, corrupt bytes,
//! refused or held connections, redirects, token trouble) on command.

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use regmirror::digest::Digest;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch, Semaphore};

use super::{schema2_manifest, DOCKER_MANIFEST};
use answers::serve;

mod answers;

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
    /// Answer HEADs with a `Content-Length` one byte too long, and manifest HEADs with a
    /// generic `application/json` type (a careless public mirror; GETs stay right).
    pub lying_heads: bool,
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
    // While refusing, the port stays bound but does not listen (connections are refused, and
    // nobody else can take the port meanwhile).
    let mut reserved: Option<TcpSocket> = None;
    let mut held = Vec::new();
    loop {
        let mode = *modes.borrow_and_update();
        if mode != Connections::Hold {
            held.clear();
        }
        if mode == Connections::Refuse {
            if listener.take().is_some() {
                reserved = Some(reserve(addr).await);
            }
        } else if listener.is_none() {
            let socket = match reserved.take() {
                Some(socket) => socket,
                None => reserve(addr).await,
            };
            listener = Some(socket.listen(1024).unwrap());
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

/// A socket bound to `addr` that does not listen yet (retrying while the port is briefly
/// taken).
async fn reserve(addr: SocketAddr) -> TcpSocket {
    for _ in 0..200 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        if socket.bind(addr).is_ok() {
            return socket;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("cannot bind {addr} again");
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
                // Clients keeping connections open see them closed before their next request.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the fake registry did not switch to {mode:?}");
    }

    /// Every request it was sent, plus connections it reset or held without answering.
    pub fn seen(&self) -> usize {
        (self.clone_counter())()
    }

    /// A function that reads `seen()` later (for `eventually`).
    pub fn clone_counter(&self) -> impl Fn() -> usize + 'static {
        let state = Arc::clone(&self.state);
        move || {
            let s = state.lock().unwrap();
            s.hits.values().sum::<usize>() + s.unanswered_connections
        }
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

    /// Removes a blob: upstream no longer has it.
    pub fn remove_blob(&self, digest: &Digest) {
        self.state.lock().unwrap().blobs.remove(&digest.to_string());
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
