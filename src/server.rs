//! The accept loop and each connection's life: TLS (rustls, HTTP/2 by ALPN) or plain HTTP
//! (HTTP/1.1, or h2 with prior knowledge) through hyper-util's auto builder, and the limits that
//! keep hostile or careless clients from holding the server: a bounded number of connections,
//! bounded headers, a deadline for a TLS handshake and for each request's headers, idle
//! connections closed, a bounded number of requests per connection, graceful drain on shutdown.
//!
//! `run` takes an already-bound listener so tests can bind port 0.

use crate::app::Live;
use crate::body::{WindowSize, WithGuard};
use crate::proxy;
use crate::send_watch::{Progressing, SendProgress, Watched};
use crate::sendfile::SendfileStream;
use crate::tls::ServerTls;
use http::HeaderValue;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::Instrument;

/// Request head (line and headers) one HTTP/1.1 request may send; more gets 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Streams one HTTP/2 connection may have open at once (what most servers allow).
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 pings keep a quiet connection's peer honest.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Counts a client connection in `regmirror_connections_open` while it lives.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn counted(live: &Live) -> OpenConnection {
        let gauge = live.get().metrics().connections_open.clone();
        gauge.inc();
        OpenConnection(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Limits every connection runs under (from `[server]`; they change only on restart).
#[derive(Clone, Copy, Debug)]
struct Limits {
    header_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    max_requests: u64,
}

/// What every connection task shares.
struct Shared {
    live: Arc<Live>,
    tls: Option<Arc<ServerTls>>,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
}

/// Serves until `shutdown` resolves, then lets responses and downloads in flight finish for up
/// to `grace`.
pub async fn run(
    listener: TcpListener,
    live: Arc<Live>,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let settings = live.get().config().server.clone();
    let limits = Limits {
        header_timeout: settings.header_timeout,
        idle_timeout: settings.idle_timeout,
        send_timeout: settings.send_timeout,
        max_requests: settings.max_requests_per_connection,
    };
    let shared = Arc::new(Shared {
        live,
        tls,
        builder: builder(&limits),
        limits,
    });
    // `regmirror gc`, `verify` and `ls` act through the server holding the directory.
    let cache_dir = shared.live.get().config().cache.dir.clone();
    let admin = crate::admin::bind(&cache_dir)
        .map(|socket| tokio::spawn(crate::admin::serve(Arc::clone(&shared.live), socket)));
    // Memory a burst needed goes back to the kernel once no download is in flight.
    let trimming = tokio::spawn({
        let live = Arc::clone(&shared.live);
        crate::allocator::trim_when_quiet(move || live.get().cache().fills_in_flight() == 0)
    });
    // Small blobs kept open for hits are closed once idle, quiet server or not; the shared
    // store is asked whether it answers, at start and while it is down.
    let sweeping = tokio::spawn({
        let live = Arc::clone(&shared.live);
        async move {
            let mut every = tokio::time::interval(crate::cache::hot::HOT_SWEEP_EVERY);
            loop {
                every.tick().await;
                let app = live.get();
                app.cache().lifecycle().hot().let_go_of_idle();
                if let Some(bucket) = app.shared().cloned() {
                    tokio::spawn(async move { bucket.check().await });
                }
            }
        }
    });
    // One permit per open connection: the cap while serving, the drain count at shutdown.
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    shared
        .live
        .get()
        .metrics()
        .connections_max
        .set(settings.max_connections as i64);
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::counted(&shared.live);
        let span = tracing::debug_span!("connection", client.addr = %client);
        let (shared, stopping) = (Arc::clone(&shared), stopping.clone());
        tokio::spawn(
            async move {
                serve_connection(stream, client, &shared, stopping).await;
                drop((slot, open));
            }
            .instrument(span),
        );
    }
    drop(listener);
    let _ = stop.send(true);
    // Downloads running go on; none is started ahead of a client any more, and verified ones
    // are committed without waiting for a pause in traffic.
    let app = shared.live.get();
    app.prefetcher().stop();
    app.cache().pacer().stop();
    let deadline = tokio::time::Instant::now() + grace;
    let all = settings.max_connections as u32;
    tokio::select! {
        _ = slots.acquire_many(all) => tracing::info!("all connections drained"),
        _ = tokio::time::sleep_until(deadline) => tracing::warn!(?grace, "grace period over; closing remaining connections"),
    }
    finish_downloads(&shared.live, deadline).await;
    // Both hold the configuration, and through it the cache directory's lock: gone before
    // this returns, so that a new server may open the directory at once.
    for task in [trimming, sweeping] {
        task.abort();
        let _ = task.await;
    }
    if let Some(admin) = admin {
        admin.abort();
        let _ = admin.await;
    }
    let _ = std::fs::remove_file(cache_dir.join(crate::admin::SOCKET));
}

/// Lets downloads still running finish within the grace period: a blob whose clients already
/// got every byte is then committed to the cache rather than lost with the process.
async fn finish_downloads(live: &Live, deadline: tokio::time::Instant) {
    let app = live.get();
    while app.cache().fills_in_flight() > 0 {
        if tokio::time::Instant::now() >= deadline {
            let left = app.cache().fills_in_flight();
            tracing::warn!(
                downloads = left,
                "grace period over; dropping downloads in flight"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

async fn serve_connection(
    stream: TcpStream,
    client: SocketAddr,
    shared: &Shared,
    stopping: watch::Receiver<bool>,
) {
    let Some(tls) = &shared.tls else {
        let sent = shared.live.get().metrics().sendfile_bytes_counter();
        let stream = SendfileStream::new(stream, sent);
        let io = TokioIo::new(stream);
        return drive(io, client, WindowSize::PLAIN, shared, stopping).await;
    };
    // A client that connects and never completes the handshake is dropped like a slow header.
    match tokio::time::timeout(shared.limits.header_timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => {
            let io = TokioIo::new(stream);
            drive(io, client, WindowSize::TLS, shared, stopping).await
        }
        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!("TLS handshake timed out"),
    }
}

/// Serves one connection until it ends, closing it gracefully when the server stops, when it
/// has been idle too long, or when it has carried its share of requests. Its requests carry the
/// blob body windows it takes.
async fn drive<I>(
    io: I,
    client: SocketAddr,
    window: WindowSize,
    shared: &Shared,
    mut stopping: watch::Receiver<bool>,
) where
    I: Read + Write + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let sending = SendProgress::new();
    let service = {
        let (live, activity, sending, max_requests) = (
            Arc::clone(&shared.live),
            Arc::clone(&activity),
            Arc::clone(&sending),
            shared.limits.max_requests,
        );
        service_fn(move |mut request: http::Request<Incoming>| {
            let http1 = request.version() < http::Version::HTTP_2;
            // HTTP/2 frames are copied, never sent by `sendfile`: its windows stay small.
            request
                .extensions_mut()
                .insert(if http1 { window } else { WindowSize::TLS });
            // Each request runs on the configuration generation current when it arrived.
            let app = live.get();
            let (busy, last) = activity.begin(max_requests);
            let sending = Arc::clone(&sending);
            async move {
                let mut response = proxy::handle(app, request, client).await;
                if last && http1 {
                    response
                        .headers_mut()
                        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, Infallible>(response.map(|body| {
                    Watched::new(body.with_guard(busy), sending, !http1).boxed_unsync()
                }))
            }
        })
    };
    let io = Progressing::new(io, Arc::clone(&sending));
    let connection = shared.builder.serve_connection(io, service);
    tokio::pin!(connection);
    let Limits {
        idle_timeout,
        header_timeout,
        send_timeout,
        ..
    } = shared.limits;
    let opened = Instant::now();
    let mut checks = tokio::time::interval(
        (idle_timeout.min(header_timeout).min(send_timeout) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5)),
    );
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stopping.changed(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = activity.exhausted.notified(), if !closing => {
                tracing::debug!(max = shared.limits.max_requests, "connection carried its share of requests; closing it");
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = checks.tick() => {
                // Bodies wait to be sent and the client takes nothing: it stopped reading.
                // Closed at once, closing gracefully or not (that would wait on those very
                // bodies).
                if sending.stalled_for() >= send_timeout {
                    tracing::info!(client = %client, ?send_timeout, "the client stopped reading; closing the connection");
                    return;
                }
                if closing {
                    continue;
                }
                // No first request within the header timeout (a client that sends nothing,
                // or half an HTTP/2 preface, while the protocol is being detected): drop it.
                if activity.served.load(Ordering::Acquire) == 0 && opened.elapsed() >= header_timeout {
                    tracing::debug!(?header_timeout, "no request in time; closing the connection");
                    return;
                }
                if activity.idle_for() >= idle_timeout {
                    tracing::debug!(?idle_timeout, "closing an idle connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// What a connection is doing: requests in progress (until their bodies are sent or dropped),
/// requests served, and when it last had none in progress.
struct Activity {
    in_flight: AtomicUsize,
    served: AtomicU64,
    quiet_since: Mutex<Instant>,
    exhausted: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            quiet_since: Mutex::new(Instant::now()),
            exhausted: Notify::new(),
        }
    }

    /// Marks a request in progress until the returned guard drops; says whether it is the last
    /// one this connection may carry (HTTP/1.1 answers it with `Connection: close`, HTTP/2
    /// connections are sent a GOAWAY).
    fn begin(self: &Arc<Self>, max_requests: u64) -> (Busy, bool) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let last = self.served.fetch_add(1, Ordering::AcqRel) + 1 == max_requests;
        if last {
            self.exhausted.notify_one();
        }
        (Busy(Arc::clone(self)), last)
    }

    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.quiet_since.lock().expect("activity lock").elapsed()
    }
}

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut quiet_since = self.0.quiet_since.lock().expect("activity lock");
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *quiet_since = Instant::now();
        }
    }
}
