//! One client connection's life: TLS (rustls; HTTP/2 when ALPN picks it) or plain HTTP
//! (HTTP/1.1, or HTTP/2 with prior knowledge, told by its preface), served by hyper until it
//! ends. It is closed gracefully when the server stops, when it has been idle too long or when
//! it has carried its share of requests, and at once when its client stops reading or sends no
//! first request in time. An HTTP/1.1 connection idle for [`PARK_AFTER`] lets go of hyper and
//! its buffers until its client sends again (see [`super::parking`]).

use super::parking::{read_h2_preface, Parkable, Prefixed};
use super::{Limits, Shared};
use crate::body::{WindowSize, WithGuard};
use crate::proxy;
use crate::send_watch::{Progressing, SendProgress, Watched};
use crate::sendfile::SendfileStream;
use crate::window_budget::WindowBudget;
use http::HeaderValue;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, HttpService};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

/// How long an HTTP/1.1 connection stays idle before it lets go of its buffers.
pub const PARK_AFTER: Duration = Duration::from_secs(2);

/// A connection as accepted: who, when, and how it is to be served.
struct Accepted {
    client: SocketAddr,
    at: Instant,
    /// Blob body windows its requests take.
    window: WindowSize,
    http2: bool,
    /// Bytes read while telling the protocol, to be served first.
    first: Vec<u8>,
}

pub(super) async fn serve_connection(
    mut stream: TcpStream,
    client: SocketAddr,
    shared: &Shared,
    stopping: watch::Receiver<bool>,
) {
    let at = Instant::now();
    let header_timeout = shared.limits.header_timeout;
    let Some(tls) = &shared.tls else {
        // A client that sends nothing, or half an HTTP/2 preface, is dropped like a slow header.
        let (http2, first) =
            match tokio::time::timeout(header_timeout, read_h2_preface(&mut stream)).await {
                Ok(Ok(told)) => told,
                Ok(Err(e)) => return tracing::debug!(error = %e, "connection failed"),
                Err(_) => return tracing::debug!(?header_timeout, "no request in time"),
            };
        let sent = shared.live.get().metrics().sendfile_bytes_counter();
        let io = TokioIo::new(SendfileStream::new(stream, sent));
        let accepted = Accepted {
            client,
            at,
            window: WindowSize::PLAIN,
            http2,
            first,
        };
        // Boxed, as the TLS path below: the task itself stays small while its connection is
        // parked, whichever path the connection took.
        return Box::pin(drive(io, accepted, shared, stopping)).await;
    };
    Box::pin(async move {
        // A client that connects and never completes the handshake is dropped like a slow
        // header.
        match tokio::time::timeout(header_timeout, tls.acceptor().accept(stream)).await {
            Ok(Ok(stream)) => {
                let accepted = Accepted {
                    client,
                    at,
                    window: WindowSize::TLS,
                    http2: stream.get_ref().1.alpn_protocol() == Some(b"h2"),
                    first: Vec::new(),
                };
                drive(TokioIo::new(stream), accepted, shared, stopping).await
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!("TLS handshake timed out"),
        }
    })
    .await
}

/// Serves one connection until it ends.
async fn drive<I>(io: I, accepted: Accepted, shared: &Shared, mut stopping: watch::Receiver<bool>)
where
    I: Read + Write + Parkable + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let sending = SendProgress::new();
    // The windows of an HTTP/2 connection's streams share one budget.
    let window = if accepted.http2 {
        let app = shared.live.get();
        let metrics = app.metrics();
        WindowSize::shared(WindowBudget::new(
            shared.limits.h2_window_memory,
            metrics.h2_window_bytes.clone(),
            metrics.h2_window_waits.clone(),
        ))
    } else {
        accepted.window.clone()
    };
    let budget = window.budget().cloned();
    let service = service(shared, &accepted, window, &activity, &sending);
    let mut io = Prefixed::new(Progressing::new(io, Arc::clone(&sending))).replay(&accepted.first);
    let watch = Watch {
        shared,
        client: accepted.client,
        activity: &activity,
        sending: &sending,
        budget: budget.as_deref(),
        opened: accepted.at,
    };
    if accepted.http2 {
        let mut connection = Box::pin(shared.http2.serve_connection(io, service));
        watch.run(&mut connection, &mut stopping, false).await;
        return;
    }
    loop {
        let mut connection = Box::new(shared.http1.serve_connection(io, service.clone()));
        let Some(served) = watch.run(&mut connection, &mut stopping, true).await else {
            return;
        };
        // Parking begins only with no request in progress, and hyper reads no new one after
        // it: a guard, should that ever change.
        if activity.served() != served {
            return;
        }
        let parts = connection.into_parts();
        io = parts.io.replay(&parts.read_buf);
        // The unread bytes are copied: hyper's whole read buffer goes now, not after parking.
        drop(parts.read_buf);
        if io.has_prefix() {
            continue; // the next request has begun: serve it at once
        }
        // Parked: as long as hyper would have waited for the next request's head.
        let Limits {
            idle_timeout,
            header_timeout,
            ..
        } = shared.limits;
        let left = idle_timeout
            .min(header_timeout)
            .saturating_sub(activity.idle_for());
        tokio::select! {
            ready = io.inner().readable() => if ready.is_err() { return },
            _ = tokio::time::sleep(left) => return tracing::debug!("closing an idle connection"),
            _ = stopping.changed() => return,
        }
    }
}

/// The service every request of a connection goes to.
fn service(
    shared: &Shared,
    accepted: &Accepted,
    window: WindowSize,
    activity: &Arc<Activity>,
    sending: &Arc<SendProgress>,
) -> impl HttpService<Incoming, ResBody = crate::body::ResponseBody, Future: Unpin + Send> + Clone + Unpin
{
    let (live, activity, sending, max_requests) = (
        Arc::clone(&shared.live),
        Arc::clone(activity),
        Arc::clone(sending),
        shared.limits.max_requests,
    );
    let client = accepted.client;
    service_fn(move |mut request: http::Request<Incoming>| {
        let http1 = request.version() < http::Version::HTTP_2;
        // A connection whose client or last answer ends it is never parked.
        if http1 && asks_to_close(&request) {
            activity.closes();
        }
        request.extensions_mut().insert(window.clone());
        // Each request runs on the configuration generation current when it arrived.
        let app = live.get();
        let (busy, last) = activity.begin(max_requests);
        if last {
            activity.closes();
        }
        let sending = Arc::clone(&sending);
        let answer: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
            let mut response = proxy::handle(app, request, client).await;
            if last && http1 {
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response.map(|body| {
                let body = super::head_first::HeadFirst::new(body.with_guard(busy));
                Watched::new(body, sending, !http1).boxed_unsync()
            }))
        });
        answer
    })
}

/// Whether an HTTP/1.x request ends its connection: `Connection: close`, or HTTP/1.0 (which
/// keeps a connection only when asked, and is never parked).
fn asks_to_close(request: &http::Request<Incoming>) -> bool {
    request.version() < http::Version::HTTP_11
        || request
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("close"))
}

/// A hyper connection as [`Watch`] drives it.
trait Served {
    /// Serves until the connection is done: flushed and shut down, or (`keep_io`, an HTTP/1.1
    /// connection being parked) with its I/O kept.
    fn poll_served(&mut self, cx: &mut Context<'_>, keep_io: bool) -> Poll<hyper::Result<()>>;
    fn shut_gracefully(&mut self);
}

impl<I, S> Served for Box<http1::Connection<I, S>>
where
    I: Read + Write + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = crate::body::ResponseBody> + Unpin,
    S::Future: Unpin,
{
    fn poll_served(&mut self, cx: &mut Context<'_>, keep_io: bool) -> Poll<hyper::Result<()>> {
        if keep_io {
            self.poll_without_shutdown(cx)
        } else {
            Pin::new(&mut **self).poll(cx)
        }
    }

    fn shut_gracefully(&mut self) {
        Pin::new(&mut **self).graceful_shutdown();
    }
}

impl<I, S> Served for Pin<Box<http2::Connection<I, S, TokioExecutor>>>
where
    I: Read + Write + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = crate::body::ResponseBody> + Send + 'static,
    S::Future: Send + 'static,
{
    fn poll_served(&mut self, cx: &mut Context<'_>, _keep_io: bool) -> Poll<hyper::Result<()>> {
        self.as_mut().poll(cx)
    }

    fn shut_gracefully(&mut self) {
        self.as_mut().graceful_shutdown();
    }
}

/// What watches a connection while hyper serves it.
struct Watch<'a> {
    shared: &'a Shared,
    client: SocketAddr,
    activity: &'a Arc<Activity>,
    sending: &'a Arc<SendProgress>,
    /// An HTTP/2 connection's window budget.
    budget: Option<&'a WindowBudget>,
    opened: Instant,
}

impl Watch<'_> {
    /// Drives `connection` until it ends, closing it gracefully when the server stops, when it
    /// has been idle too long, or when it has carried its share of requests; at once when its
    /// client stops reading or sends no first request in time. With `may_park`, a connection
    /// idle for [`PARK_AFTER`] after serving a request is ended so that it can be parked: then
    /// the requests served so far are returned.
    async fn run(
        &self,
        connection: &mut impl Served,
        stopping: &mut watch::Receiver<bool>,
        may_park: bool,
    ) -> Option<u64> {
        let Limits {
            idle_timeout,
            header_timeout,
            send_timeout,
            ..
        } = self.shared.limits;
        let activity = self.activity;
        let served_before = activity.served();
        let every = idle_timeout.min(header_timeout).min(send_timeout) / 4;
        let every = if may_park {
            every.min(PARK_AFTER / 2)
        } else {
            every
        };
        let mut checks =
            tokio::time::interval(every.clamp(Duration::from_millis(50), Duration::from_secs(5)));
        let mut closing = false;
        let mut parking = None;
        loop {
            tokio::select! {
                result = std::future::poll_fn(|cx| connection.poll_served(cx, parking.is_some())) => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection ended with an error");
                        return None;
                    }
                    return parking;
                }
                _ = stopping.changed(), if !closing => {
                    connection.shut_gracefully();
                    (closing, parking) = (true, None);
                }
                _ = activity.exhausted.notified(), if !closing => {
                    tracing::debug!(max = self.shared.limits.max_requests, "connection carried its share of requests; closing it");
                    connection.shut_gracefully();
                    (closing, parking) = (true, None);
                }
                _ = checks.tick() => {
                    // Bodies wait to be sent and the client takes nothing: it stopped reading.
                    // Closed at once, closing gracefully or not (that would wait on those very
                    // bodies).
                    // Or streams wait for window budget while no window of the connection
                    // goes (their windows may be queued whole, their bodies ended): at the
                    // pace `send_timeout` asks of a stream (one H2_FRAME per send_timeout), a
                    // window goes within `window / H2_FRAME` of them.
                    let starved_after = send_timeout
                        * (crate::window_budget::READ_CHUNK as usize / crate::send_watch::H2_FRAME)
                            as u32;
                    if self.sending.stalled_for() >= send_timeout
                        || self.sending.blocked_for() >= send_timeout
                        || self.budget.is_some_and(|b| b.starved_for() >= starved_after)
                    {
                        tracing::info!(client = %self.client, ?send_timeout, "the client stopped reading; closing the connection");
                        return None;
                    }
                    if closing {
                        continue;
                    }
                    // No first request within the header timeout (a client that sends nothing
                    // after its TLS handshake, or half an HTTP/2 preface): drop it.
                    if activity.served() == 0 && self.opened.elapsed() >= header_timeout {
                        tracing::debug!(?header_timeout, "no request in time; closing the connection");
                        return None;
                    }
                    let idle = activity.idle_for();
                    if idle >= idle_timeout {
                        tracing::debug!(?idle_timeout, "closing an idle connection");
                        connection.shut_gracefully();
                        (closing, parking) = (true, None);
                    } else if may_park
                        && idle >= PARK_AFTER
                        && activity.served() > served_before
                        && !activity.closing()
                        && self.sending.flushed()
                    {
                        // Neither side asked to close, and everything written is flushed
                        // (hyper would flush before ending; parking does not even begin while
                        // a client that paused holds part of an answer up): hyper ends the
                        // idle connection at once, keeping its I/O.
                        parking = Some(activity.served());
                        connection.shut_gracefully();
                        closing = true;
                    }
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
    /// A request or answer said the connection ends with it.
    closing: AtomicBool,
    quiet_since: Mutex<Instant>,
    exhausted: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            closing: AtomicBool::new(false),
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

    /// The connection ends after its current request.
    fn closes(&self) {
        self.closing.store(true, Ordering::Release);
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Requests begun on this connection.
    fn served(&self) -> u64 {
        self.served.load(Ordering::Acquire)
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
