//! Whether a connection's client still takes what it is sent (`server.send_timeout`).
//!
//! A response body that has handed hyper a frame waits until hyper asks for the next one, which
//! it does once it could send the frame. Each body says here when it started waiting. What
//! counts as the client taking something depends on the protocol:
//! - HTTP/1.1 sends one response at a time: any byte written to the socket (counted by
//!   [`Progressing`], around the connection's I/O) is progress, so a slow but steady reader of a
//!   large window is never cut off.
//! - HTTP/2 shares the socket between streams: a stream progresses only when one of its own
//!   frames is taken (h2 lets go of a frame once it is written, which the client's flow-control
//!   window allows), so frames are handed out at most [`H2_FRAME`] at a time. A stream waits on
//!   the client while its body waits to be asked for a frame or any frame it handed out is
//!   unsent, after its body ended too: the last frame of an answer queued behind a shut window
//!   counts. A client that reads one stream cannot keep its other, never-read streams alive.
//!
//! When a body has waited `send_timeout` without progress, the client stopped reading (or keeps
//! its window shut) and the connection is closed, its windows, streams and files let go. A body
//! waiting on upstream is being asked (and answers "not yet"): a slow upstream never counts.
//! The tail of a response, which hyper holds after its body handed everything over, is
//! watched at the socket: writes that find it full for `send_timeout` close the connection too.
//! [`Progressing`] also says whether everything written has been flushed (an HTTP/1.1
//! connection is parked only then).

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The most an HTTP/2 body hands out at once: a stream whose client reads at 4.4 KiB/s or more
/// is asked for its next frame within a minute.
pub const H2_FRAME: usize = 256 * 1024;

/// One connection's bodies waiting on the client, and its last write.
#[derive(Debug)]
pub struct SendProgress {
    opened: Instant,
    /// Milliseconds since `opened` of the last byte written to the socket.
    last_write_ms: AtomicU64,
    /// The connection speaks HTTP/2: progress is per stream.
    http2: AtomicBool,
    /// The bodies waiting on the client, by body.
    waiting: Mutex<HashMap<u64, Waiting>>,
    next_body: AtomicU64,
    /// Something was written since the connection's I/O last completed a flush: hyper may
    /// still hold bytes to send.
    unflushed: AtomicBool,
    /// Milliseconds since `opened`, plus one, since which writes have found the socket full
    /// without taking a byte; zero when they have not.
    blocked_since_ms: AtomicU64,
}

impl SendProgress {
    pub fn new() -> Arc<SendProgress> {
        Arc::new(SendProgress {
            opened: Instant::now(),
            last_write_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            waiting: Mutex::new(HashMap::new()),
            next_body: AtomicU64::new(0),
            unflushed: AtomicBool::new(false),
            blocked_since_ms: AtomicU64::new(0),
        })
    }

    /// Whether everything written has been flushed: hyper holds nothing more to send.
    pub fn flushed(&self) -> bool {
        !self.unflushed.load(Ordering::Acquire)
    }

    /// How long the socket has taken no byte of what waits to be written (the tail of a
    /// response, once its body has handed hyper everything); zero when nothing waits.
    pub fn blocked_for(&self) -> Duration {
        match self.blocked_since_ms.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            since => Duration::from_millis(self.now_ms().saturating_sub(since - 1)),
        }
    }

    /// What one write to the connection's I/O did.
    fn write_done(&self, written: &Poll<io::Result<usize>>) {
        self.unflushed.store(true, Ordering::Release);
        match written {
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.blocked_since_ms.store(0, Ordering::Release);
                self.wrote();
            }
            Poll::Pending => self.blocked(),
            Poll::Ready(_) => {}
        }
    }

    /// What one flush of the connection's I/O did.
    fn flush_done(&self, flushed: &Poll<io::Result<()>>) {
        match flushed {
            Poll::Ready(Ok(())) => {
                self.blocked_since_ms.store(0, Ordering::Release);
                self.unflushed.store(false, Ordering::Release);
            }
            Poll::Pending => self.blocked(),
            Poll::Ready(Err(_)) => {}
        }
    }

    fn blocked(&self) {
        let now = self.now_ms() + 1;
        let _ = self
            .blocked_since_ms
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
    }

    /// How long a body has waited on the client without progress; zero when none waits.
    pub fn stalled_for(&self) -> Duration {
        let oldest = {
            let waiting = self.waiting.lock().expect("send progress lock");
            match waiting.values().map(|w| w.since_ms).min() {
                Some(oldest) => oldest,
                None => return Duration::ZERO,
            }
        };
        let since = if self.http2.load(Ordering::Acquire) {
            oldest
        } else {
            oldest.max(self.last_write_ms.load(Ordering::Acquire))
        };
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn wrote(&self) {
        self.last_write_ms.store(self.now_ms(), Ordering::Release);
    }

    /// `body` waits to be asked for its next frame, from now.
    fn start_waiting(&self, body: u64) {
        let now = self.now_ms();
        let mut waiting = self.waiting.lock().expect("send progress lock");
        let entry = waiting.entry(body).or_default();
        (entry.since_ms, entry.asked) = (now, false);
    }

    /// `body` was asked for its next frame (or is gone); it still waits for the frames it
    /// handed out.
    fn stop_waiting(&self, body: u64) {
        let mut waiting = self.waiting.lock().expect("send progress lock");
        if let Some(entry) = waiting.get_mut(&body) {
            entry.asked = true;
            if entry.frames == 0 {
                waiting.remove(&body);
            }
        }
    }

    /// `body` handed out a frame (HTTP/2): it waits until the frame is taken.
    fn handed_out(&self, body: u64) {
        let now = self.now_ms();
        let mut waiting = self.waiting.lock().expect("send progress lock");
        let entry = waiting.entry(body).or_insert(Waiting {
            since_ms: now,
            frames: 0,
            asked: true,
        });
        entry.frames += 1;
    }

    /// A frame of `body` was taken: progress for it.
    fn taken(&self, body: u64) {
        let now = self.now_ms();
        let mut waiting = self.waiting.lock().expect("send progress lock");
        if let Some(entry) = waiting.get_mut(&body) {
            entry.frames -= 1;
            entry.since_ms = now;
            if entry.frames == 0 && entry.asked {
                waiting.remove(&body);
            }
        }
    }
}

/// One body waiting on the client.
#[derive(Debug, Default)]
struct Waiting {
    /// Milliseconds since the connection opened at which it began waiting, or last progressed.
    since_ms: u64,
    /// Frames it handed out that are not yet taken (HTTP/2).
    frames: usize,
    /// It was asked for its next frame, or has none: only its frames keep it waiting.
    asked: bool,
}

/// A frame handed out on HTTP/2: its being let go (once h2 wrote it) is its stream's
/// progress.
struct Outgoing {
    bytes: Bytes,
    progress: Arc<SendProgress>,
    body: u64,
}

impl AsRef<[u8]> for Outgoing {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        self.progress.taken(self.body);
    }
}

/// A response body that tells its connection's [`SendProgress`] when it waits on the client.
pub struct Watched<B> {
    inner: B,
    progress: Arc<SendProgress>,
    id: u64,
    waiting: bool,
    /// HTTP/2: frames are handed out at most [`H2_FRAME`] at a time; what is left of one.
    sliced: bool,
    rest: Option<Bytes>,
}

impl<B: Body> Watched<B> {
    /// Watches `inner`, a body of an HTTP/2 stream when `http2`; one with nothing to send
    /// never waits.
    pub fn new(inner: B, progress: Arc<SendProgress>, http2: bool) -> Watched<B> {
        if http2 {
            progress.http2.store(true, Ordering::Release);
        }
        let id = progress.next_body.fetch_add(1, Ordering::Relaxed);
        let mut body = Watched {
            inner,
            progress,
            id,
            waiting: false,
            sliced: http2,
            rest: None,
        };
        body.set_waiting(!body.inner.is_end_stream());
        body
    }

    fn set_waiting(&mut self, waiting: bool) {
        if waiting != self.waiting {
            self.waiting = waiting;
            if waiting {
                self.progress.start_waiting(self.id);
            } else {
                self.progress.stop_waiting(self.id);
            }
        }
    }

    /// Hands out at most [`H2_FRAME`] of `data` when slicing (HTTP/2), keeping the rest and
    /// watching the frame until it is taken.
    fn hand_out(&mut self, mut data: Bytes) -> Bytes {
        if !self.sliced || data.is_empty() {
            return data;
        }
        if data.len() > H2_FRAME {
            self.rest = Some(data.split_off(H2_FRAME));
        }
        self.progress.handed_out(self.id);
        Bytes::from_owner(Outgoing {
            bytes: data,
            progress: Arc::clone(&self.progress),
            body: self.id,
        })
    }
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        if self.waiting {
            self.progress.stop_waiting(self.id);
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
        this.set_waiting(false);
        let polled = match this.rest.take() {
            Some(rest) => Poll::Ready(Some(Ok(Frame::data(this.hand_out(rest))))),
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => Poll::Ready(Some(Ok(Frame::data(this.hand_out(data))))),
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            },
        };
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            let more = this.rest.is_some() || !this.inner.is_end_stream();
            this.set_waiting(more);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let Some(rest) = &self.rest else {
            return inner;
        };
        let extra = rest.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + extra);
        }
        hint.set_lower(inner.lower() + extra);
        hint
    }
}

/// A connection's I/O that tells its [`SendProgress`] of every byte written.
pub struct Progressing<I> {
    inner: I,
    progress: Arc<SendProgress>,
}

impl<I> Progressing<I> {
    pub fn new(inner: I, progress: Arc<SendProgress>) -> Progressing<I> {
        Progressing { inner, progress }
    }

    pub fn inner(&self) -> &I {
        &self.inner
    }

    fn note(&self, written: &Poll<io::Result<usize>>) {
        self.progress.write_done(written);
    }
}

impl<I: hyper::rt::Read + Unpin> hyper::rt::Read for Progressing<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Write + Unpin> hyper::rt::Write for Progressing<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress.flush_done(&flushed);
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};

    fn waiting(progress: &SendProgress) -> usize {
        progress.waiting.lock().unwrap().len()
    }

    #[tokio::test]
    async fn a_body_not_asked_for_its_next_frame_waits_on_the_client() {
        let progress = SendProgress::new();
        let chunks = futures_util::stream::iter(
            [Bytes::from_static(b"a"), Bytes::from_static(b"b")].map(|b| Ok(Frame::data(b))),
        );
        let mut body = Watched::new(StreamBody::new(chunks), Arc::clone(&progress), false);
        assert_eq!(waiting(&progress), 1);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "a");
        // It gave a frame and is not asked again: it waits on the client.
        assert_eq!(waiting(&progress), 1);
        body.frame().await.unwrap().unwrap();
        assert!(body.frame().await.is_none());
        drop(body);
        assert_eq!(waiting(&progress), 0);
        assert_eq!(progress.stalled_for(), Duration::ZERO);
    }

    #[test]
    fn empty_and_finished_bodies_never_wait() {
        let progress = SendProgress::new();
        drop(Watched::new(
            Empty::<Bytes>::new(),
            Arc::clone(&progress),
            false,
        ));
        assert_eq!(waiting(&progress), 0);
        let _full = Watched::new(
            Full::new(Bytes::from_static(b"x")),
            Arc::clone(&progress),
            false,
        );
        assert_eq!(waiting(&progress), 1);
    }

    #[tokio::test]
    async fn http2_bodies_hand_out_small_frames_and_keep_their_length() {
        let progress = SendProgress::new();
        let whole = Bytes::from(vec![7u8; 3 * H2_FRAME + 10]);
        let full = Full::new(whole.clone()).map_err(|never| -> io::Error { match never {} });
        let mut body = Watched::new(full, Arc::clone(&progress), true);
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= H2_FRAME);
            got.extend_from_slice(&data);
            frames += 1;
            assert_eq!(
                body.size_hint().exact(),
                Some((whole.len() - got.len()) as u64)
            );
        }
        assert_eq!((frames, &got[..]), (4, &whole[..]));
    }

    #[tokio::test]
    async fn on_http2_a_frame_handed_out_waits_until_taken_after_its_body_ended() {
        let progress = SendProgress::new();
        let full =
            Full::new(Bytes::from_static(b"{}")).map_err(|never| -> io::Error { match never {} });
        let mut body = Watched::new(full, Arc::clone(&progress), true);
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(body.frame().await.is_none());
        drop(body);
        // The body ended, but its last frame is not taken: the stream waits on the client.
        assert_eq!(waiting(&progress), 1);
        std::thread::sleep(Duration::from_millis(30));
        assert!(progress.stalled_for() >= Duration::from_millis(30));
        let view = frame.slice(1..);
        drop(frame);
        assert_eq!(waiting(&progress), 1, "a view of it is still unsent");
        drop(view);
        assert_eq!(
            (waiting(&progress), progress.stalled_for()),
            (0, Duration::ZERO)
        );
    }

    #[test]
    fn on_http1_a_byte_written_is_progress_and_on_http2_it_is_not() {
        let progress = SendProgress::new();
        progress.start_waiting(1);
        progress
            .waiting
            .lock()
            .unwrap()
            .get_mut(&1)
            .unwrap()
            .since_ms = 0;
        std::thread::sleep(Duration::from_millis(30));
        progress.wrote();
        assert!(progress.stalled_for() < Duration::from_millis(20));
        progress.http2.store(true, Ordering::Release);
        assert!(progress.stalled_for() >= Duration::from_millis(30));
    }
}
