//! The accept loop and the limits every connection runs under: a bounded number of connections,
//! bounded headers, a deadline for a TLS handshake and for each request's headers, idle
//! connections closed, a bounded number of requests per connection, graceful drain on shutdown.
//! Each connection's life is [`connection`]'s; what an idle one keeps, [`parking`]'s.
//!
//! `run` takes an already-bound listener so tests can bind port 0.

mod connection;
mod head_first;
mod parking;

pub use connection::PARK_AFTER;

use crate::app::Live;
use crate::tls::ServerTls;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
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
    /// What the body windows of one HTTP/2 connection may hold at once.
    h2_window_memory: u64,
}

/// What every connection task shares.
struct Shared {
    live: Arc<Live>,
    tls: Option<Arc<ServerTls>>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
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
        h2_window_memory: settings.h2_window_memory,
    };
    let shared = Arc::new(Shared {
        live,
        tls,
        http1: http1(&limits),
        http2: http2(&limits),
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
                connection::serve_connection(stream, client, &shared, stopping).await;
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

fn http1(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
}

fn http2(_limits: &Limits) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(H2_KEEP_ALIVE)
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}
