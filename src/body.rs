//! Response bodies: small in-memory ones, and [`follow`], which streams a blob file — complete,
//! or still being written by a fill — from a start offset to an end.
//!
//! The rule that keeps unverified bytes from ever looking complete lives here: while a fill is
//! not verified, a body never sends the final byte of its response (when the response declared
//! its length) nor ends its stream (when it did not). A failed fill ends every body with an
//! error, which makes hyper abort the response (connection reset on HTTP/1.1, RST_STREAM on h2).

use crate::cache::inflight::FillState;
use crate::digest::{Digest, Hasher};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Every response body the server sends.
pub type ResponseBody = BoxBody<Bytes, io::Error>;

/// Largest single read from a blob file.
const READ_CHUNK: u64 = 256 * 1024;

pub fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Keeps a value alive exactly as long as a body (an "in use" mark for eviction).
pub trait WithGuard {
    fn with_guard<G: Send + Sync + 'static>(self, guard: G) -> ResponseBody;
}

impl WithGuard for ResponseBody {
    fn with_guard<G: Send + Sync + 'static>(self, guard: G) -> ResponseBody {
        let guarded = Arc::new(guard);
        self.map_frame(move |frame| {
            let _ = &guarded;
            frame
        })
        .boxed()
    }
}

/// Streams an upstream blob body straight to a client, hashing it on the way; the last chunk is
/// held back until size and digest are verified, and a mismatch ends the body with an error.
pub fn verified(
    upstream: hyper::body::Incoming,
    digest: Digest,
    total: Option<u64>,
    stall: Duration,
) -> ResponseBody {
    struct State {
        upstream: hyper::body::Incoming,
        hasher: Hasher,
        held: Option<Bytes>,
        digest: Digest,
        total: Option<u64>,
        stall: Duration,
    }
    let state = State {
        upstream,
        hasher: Hasher::default(),
        held: None,
        digest,
        total,
        stall,
    };
    let stream = futures_util::stream::unfold(Some(state), |state| async move {
        let mut s = state?;
        loop {
            let next = match tokio::time::timeout(s.stall, s.upstream.frame()).await {
                Err(_) => return Some((Err(io::Error::other("upstream stalled")), None)),
                Ok(next) => next,
            };
            match next {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    s.hasher.update(&data);
                    if let Some(previous) = s.held.replace(data) {
                        return Some((Ok(Frame::data(previous)), Some(s)));
                    }
                }
                Some(Err(e)) => return Some((Err(io::Error::other(e)), None)),
                None => {
                    let held = s.held.take();
                    return match s.hasher.clone().verify(&s.digest, s.total) {
                        Ok(()) => held.map(|b| (Ok(Frame::data(b)), None)),
                        Err(m) => {
                            tracing::error!(digest = %s.digest, error = %m, "passed-through blob is corrupt; aborting the response");
                            Some((Err(io::Error::other(m.to_string())), None))
                        }
                    };
                }
            }
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A body that reads `file` from `start` to `end` (exclusive; `None`: to the end of the blob,
/// size not yet known), following `progress` when the file is still being filled.
pub fn follow(
    file: Arc<File>,
    progress: Option<watch::Receiver<FillState>>,
    start: u64,
    end: Option<u64>,
) -> ResponseBody {
    let reader = Follower {
        file,
        progress,
        pos: start,
        end,
    };
    let stream = futures_util::stream::unfold(Some(reader), |state| async move {
        let mut reader = state?;
        match reader.next_chunk().await {
            Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), Some(reader))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

struct Follower {
    file: Arc<File>,
    /// `None` for a file that is complete and verified.
    progress: Option<watch::Receiver<FillState>>,
    pos: u64,
    end: Option<u64>,
}

/// How far a reader may go now.
enum Limit {
    /// Bytes up to here may be sent; more may come.
    Partial(u64),
    /// Bytes up to here may be sent; then the body ends.
    Final(u64),
}

impl Follower {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let limit = self.limit()?;
            let upto = match limit {
                Limit::Partial(n) | Limit::Final(n) => n,
            };
            if self.pos < upto {
                let len = (upto - self.pos).min(READ_CHUNK);
                let bytes = read_at(Arc::clone(&self.file), self.pos, len).await?;
                self.pos += bytes.len() as u64;
                return Ok(Some(bytes));
            }
            if matches!(limit, Limit::Final(_)) {
                return Ok(None);
            }
            self.wait_for_progress().await?;
        }
    }

    fn limit(&self) -> io::Result<Limit> {
        let Some(progress) = &self.progress else {
            return Ok(Limit::Final(self.end.unwrap_or(u64::MAX)));
        };
        let state = progress.borrow().clone();
        match state {
            FillState::Starting => Ok(Limit::Partial(0)),
            FillState::Streaming { written, .. } => {
                // Hold back the response's last byte until the blob is verified.
                let cap = self
                    .end
                    .map_or(written, |end| written.min(end.saturating_sub(1)));
                Ok(Limit::Partial(cap))
            }
            FillState::Complete { size } => {
                Ok(Limit::Final(self.end.map_or(size, |e| e.min(size))))
            }
            FillState::Failed(e) => Err(io::Error::other(e.message)),
        }
    }

    async fn wait_for_progress(&mut self) -> io::Result<()> {
        let progress = self.progress.as_mut().expect("only fills are waited on");
        if progress.changed().await.is_err() {
            // The writer is gone; its last word is final. Anything but Complete is a failure.
            let state = progress.borrow().clone();
            if !matches!(state, FillState::Complete { .. } | FillState::Failed(_)) {
                return Err(io::Error::other("the download ended without a verdict"));
            }
        }
        Ok(())
    }
}

async fn read_at(file: Arc<File>, pos: u64, len: u64) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        let n = file.read_at(&mut buf, pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file is shorter than expected",
            ));
        }
        buf.truncate(n);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|e| io::Error::other(format!("read task failed: {e}")))?
}
