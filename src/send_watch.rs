//! Whether a connection's client still reads what it is sent (`server.send_timeout`).
//!
//! hyper asks a response body for its next frame only once it can send more: after the last
//! frame went out (HTTP/1.1), or once the peer opened its flow-control window (h2). A body that
//! has a frame to give and is not asked for it is waiting on the client. Each body of a
//! connection says so here; when bodies have waited and no body of the connection was asked for
//! a frame for `send_timeout`, the client stopped reading, and the connection is closed: its
//! windows, streams and files are let go. A body waiting on upstream is asked (and answers
//! "not yet"), so a slow upstream never counts against the client.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// One connection's bodies: how many wait to be asked for a frame, and when any was last asked.
#[derive(Debug)]
pub struct SendProgress {
    opened: Instant,
    /// Milliseconds since `opened` of the last time any body was asked for a frame.
    last_asked_ms: AtomicU64,
    waiting: AtomicUsize,
}

impl SendProgress {
    pub fn new() -> Arc<SendProgress> {
        Arc::new(SendProgress {
            opened: Instant::now(),
            last_asked_ms: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        })
    }

    /// How long bodies have waited on the client: zero while none waits, or while any body of
    /// the connection was asked for a frame lately.
    pub fn stalled_for(&self) -> Duration {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return Duration::ZERO;
        }
        let now = self.now_ms();
        let last = self.last_asked_ms.load(Ordering::Acquire);
        Duration::from_millis(now.saturating_sub(last))
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn asked(&self) {
        self.last_asked_ms.store(self.now_ms(), Ordering::Release);
    }
}

/// A response body that tells its connection's [`SendProgress`] when it waits to be asked.
pub struct Watched<B> {
    inner: B,
    progress: Arc<SendProgress>,
    /// It has a frame to give (or its first) and was not asked since.
    waiting: bool,
}

impl<B: Body> Watched<B> {
    /// Watches `inner`; a body with nothing to send never waits.
    pub fn new(inner: B, progress: Arc<SendProgress>) -> Watched<B> {
        let waiting = !inner.is_end_stream();
        if waiting {
            // The first body to wait starts the clock; one added beside bodies already waiting
            // does not (a client opening streams it never reads is not reading).
            if progress.waiting.load(Ordering::Acquire) == 0 {
                progress.asked();
            }
            progress.waiting.fetch_add(1, Ordering::AcqRel);
        }
        Watched {
            inner,
            progress,
            waiting,
        }
    }

    fn set_waiting(&mut self, waiting: bool) {
        if waiting != self.waiting {
            self.waiting = waiting;
            if waiting {
                self.progress.waiting.fetch_add(1, Ordering::AcqRel);
            } else {
                self.progress.waiting.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        if self.waiting {
            self.progress.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes, Error = io::Error> + Unpin,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        this.progress.asked();
        this.set_waiting(false);
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !this.inner.is_end_stream() {
            this.set_waiting(true);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};

    #[tokio::test]
    async fn a_body_not_asked_for_its_next_frame_waits_on_the_client() {
        let progress = SendProgress::new();
        let chunks = futures_util::stream::iter(
            [Bytes::from_static(b"a"), Bytes::from_static(b"b")].map(|b| Ok(Frame::data(b))),
        );
        let mut body = Watched::new(
            http_body_util::StreamBody::new(chunks),
            Arc::clone(&progress),
        );
        assert_eq!(progress.waiting.load(Ordering::Acquire), 1);
        // Asked: not waiting while it answers.
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        // It gave a frame and is not asked again: it waits on the client.
        assert_eq!(progress.waiting.load(Ordering::Acquire), 1);
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(progress.waiting.load(Ordering::Acquire), 0);
        assert_eq!(progress.stalled_for(), Duration::ZERO);
    }

    #[test]
    fn empty_and_finished_bodies_never_wait() {
        let progress = SendProgress::new();
        let empty = Watched::new(Empty::<Bytes>::new(), Arc::clone(&progress));
        assert_eq!(progress.waiting.load(Ordering::Acquire), 0);
        drop(empty);
        let _full = Watched::new(Full::new(Bytes::from_static(b"x")), Arc::clone(&progress));
        assert_eq!(progress.waiting.load(Ordering::Acquire), 1);
    }
}
