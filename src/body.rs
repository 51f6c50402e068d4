//! Response bodies: small in-memory ones, and [`follow`], which streams a blob file — complete,
//! or still being written by a fill — from a start offset to an end.
//!
//! The rule that keeps unverified bytes from ever looking complete lives here: while a fill is
//! not verified, a body never sends the final byte of its response (when the response declared
//! its length) nor ends its stream (when it did not). A failed fill ends every body with an
//! error, which makes hyper abort the response (connection reset on HTTP/1.1, RST_STREAM on h2).

use crate::cache::inflight::{FillError, FillState};
use crate::digest::{Digest, Hasher};
use crate::sendfile::Registration;
use crate::window_budget::{self, Charge, READ_CHUNK};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Every response body the server sends.
pub type ResponseBody = UnsyncBoxBody<Bytes, io::Error>;

pub use crate::window_budget::WindowSize;

pub fn empty() -> ResponseBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Keeps a value alive exactly as long as a body (an "in use" mark for eviction).
pub trait WithGuard {
    fn with_guard<G: Send + 'static>(self, guard: G) -> ResponseBody;
}

impl WithGuard for ResponseBody {
    fn with_guard<G: Send + 'static>(self, guard: G) -> ResponseBody {
        let guarded = std::sync::Mutex::new(guard);
        self.map_frame(move |frame| {
            let _ = &guarded;
            frame
        })
        .boxed_unsync()
    }
}

/// Where the rest of a blob comes from when its download could not be stored (disk full):
/// `fetch(offset)` answers the body from `offset` on, the bytes to skip at its start (an
/// upstream that ignored `Range`), and the stall timeout.
pub struct Continuation {
    pub digest: Digest,
    pub total: Option<u64>,
    #[allow(clippy::type_complexity)]
    pub fetch: Box<
        dyn FnOnce(u64) -> BoxFuture<'static, Result<(Incoming, u64, Duration), String>> + Send,
    >,
}

/// Something that yields a body chunk by chunk; an error ends the body (the response is aborted).
trait Chunks: Send + 'static {
    fn next_chunk(&mut self) -> impl Future<Output = io::Result<Option<Bytes>>> + Send;
}

/// A response body over a chunk source.
fn body_of(source: impl Chunks) -> ResponseBody {
    let stream = futures_util::stream::unfold(Some(source), |state| async move {
        let mut source = state?;
        match source.next_chunk().await {
            Ok(Some(bytes)) => Some((Ok(Frame::data(bytes)), Some(source))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// An upstream body passed through to a client, hashed on the way; the last chunk is held
/// back until size and digest are verified, and a mismatch ends it with an error.
struct Verifying {
    upstream: Incoming,
    hasher: Hasher,
    held: Option<Bytes>,
    skip: u64,
    digest: Digest,
    total: Option<u64>,
    stall: Duration,
}

impl Chunks for Verifying {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let next = tokio::time::timeout(self.stall, self.upstream.frame())
                .await
                .map_err(|_| io::Error::other("upstream stalled"))?;
            match next {
                Some(Ok(frame)) => {
                    let Ok(mut data) = frame.into_data() else {
                        continue;
                    };
                    if self.skip > 0 {
                        let n = self.skip.min(data.len() as u64);
                        let _ = data.split_to(n as usize);
                        self.skip -= n;
                    }
                    if data.is_empty() {
                        continue;
                    }
                    self.hasher.update(&data);
                    if let Some(previous) = self.held.replace(data) {
                        return Ok(Some(previous));
                    }
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => {
                    if let Err(m) = self.hasher.clone().verify(&self.digest, self.total) {
                        tracing::error!(digest = %self.digest, error = %m, "passed-through blob is corrupt; aborting the response");
                        return Err(io::Error::other(m.to_string()));
                    }
                    return Ok(self.held.take());
                }
            }
        }
    }
}

/// Streams an upstream blob body straight to a client, verified (see [`Verifying`]).
pub fn verified(
    upstream: Incoming,
    digest: Digest,
    total: Option<u64>,
    stall: Duration,
) -> ResponseBody {
    let state = Verifying {
        upstream,
        hasher: Hasher::default(),
        held: None,
        skip: 0,
        digest,
        total,
        stall,
    };
    body_of(state)
}

/// A body over a complete, verified blob file from `start` to `end` (exclusive), in windows of
/// `window`. `first`, the blob's first bytes (see [`read_first`]), saves a trip to the blocking
/// pool when the response starts at the blob's start.
pub fn stored(
    file: Arc<File>,
    start: u64,
    end: u64,
    first: Bytes,
    window: WindowSize,
) -> ResponseBody {
    let ready = (start == 0).then(|| first.slice(..first.len().min(end as usize)));
    body_of(Follower {
        ready,
        ..Follower::new(file, None, start, Some(end), window)
    })
}

/// The first bytes of a blob file (at most one read's worth), for [`stored`]. Blocks.
pub fn read_first(file: &Arc<File>, size: u64) -> io::Result<Bytes> {
    let len = size.min(READ_CHUNK);
    if len == 0 {
        return Ok(Bytes::new());
    }
    window(file, 0, len)
}

/// A body that reads `file` from `start` to `end` (exclusive; `None`: to the end of the blob,
/// size not yet known) in windows of `window`, following `progress` when the file is still
/// being filled. With a `continuation`, a whole-blob response whose download could not be
/// stored carries on from upstream instead of failing.
pub fn follow(
    file: Arc<File>,
    progress: Option<watch::Receiver<FillState>>,
    start: u64,
    end: Option<u64>,
    window: WindowSize,
    continuation: Option<Continuation>,
) -> ResponseBody {
    body_of(Follower {
        continuation: continuation.filter(|_| start == 0),
        ..Follower::new(file, progress, start, end, window)
    })
}

struct Follower {
    file: Arc<File>,
    /// `None` for a file that is complete and verified.
    progress: Option<watch::Receiver<FillState>>,
    pos: u64,
    end: Option<u64>,
    window: WindowSize,
    /// Bytes from `pos` on, already read.
    ready: Option<Bytes>,
    /// On HTTP/2, this body's share of its connection's window budget, taken with its first
    /// window (or before the first bytes, if they fit at once: else they are let go), and let
    /// go while it waits on upstream with no window left unsent.
    charge: Option<Arc<Charge>>,
    continuation: Option<Continuation>,
    /// Set once the body carries on from upstream.
    upstream: Option<Verifying>,
}

/// How far a reader may go now.
enum Limit {
    /// Bytes up to here may be sent; more may come.
    Partial(u64),
    /// Bytes up to here may be sent; then the body ends.
    Final(u64),
    Failed(FillError),
}

impl Chunks for Follower {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if let Some(upstream) = &mut self.upstream {
            return upstream.next_chunk().await;
        }
        // The first bytes, read with the lookup, go first if they fit the budget now; else they
        // are let go, to be read again once they fit.
        if let Some(bytes) = self.ready.take().filter(|b| !b.is_empty()) {
            if self.window.budget().is_some() && self.charge.is_none() {
                self.charge = self.window.try_charge();
            }
            if self.window.budget().is_none() || self.charge.is_some() {
                self.pos += bytes.len() as u64;
                return Ok(Some(self.held(bytes)));
            }
        }
        loop {
            let (upto, last) = match self.limit() {
                Limit::Partial(n) => (n, false),
                Limit::Final(n) => (n, true),
                Limit::Failed(e) if e.resumable && self.continuation.is_some() => {
                    return self.carry_on_from_upstream().await;
                }
                Limit::Failed(e) => return Err(io::Error::other(e.message)),
            };
            if self.pos < upto {
                let len = (upto - self.pos).min(self.window.bytes());
                // The body's share is taken before its first window is loaded: a body
                // waiting for it holds nothing.
                if self.charge.is_none() {
                    self.charge = self.window.charge().await;
                }
                let bytes = read_at(Arc::clone(&self.file), self.pos, len).await?;
                self.pos += bytes.len() as u64;
                return Ok(Some(self.held(bytes)));
            }
            if last {
                return Ok(None);
            }
            // Waiting on upstream with every window sent, the share goes to streams that can
            // send: a slow upstream never holds up a hit on the same connection.
            if self
                .charge
                .as_ref()
                .is_some_and(|c| Arc::strong_count(c) == 1)
            {
                self.charge = None;
            }
            self.wait_for_progress().await?;
        }
    }
}

impl Follower {
    fn new(
        file: Arc<File>,
        progress: Option<watch::Receiver<FillState>>,
        start: u64,
        end: Option<u64>,
        window: WindowSize,
    ) -> Follower {
        Follower {
            file,
            progress,
            pos: start,
            end,
            window,
            ready: None,
            charge: None,
            continuation: None,
            upstream: None,
        }
    }

    /// The download failed to be stored, not to be fetched: hash what this client already got
    /// (still readable through the open file) and fetch the rest for it alone.
    async fn carry_on_from_upstream(&mut self) -> io::Result<Option<Bytes>> {
        let continuation = self.continuation.take().expect("checked by the caller");
        let hasher = hash_prefix(Arc::clone(&self.file), self.pos).await?;
        let (upstream, skip, stall) = (continuation.fetch)(self.pos)
            .await
            .map_err(io::Error::other)?;
        tracing::warn!(digest = %continuation.digest, offset = self.pos, "cannot cache the blob (disk full); passing the rest through");
        self.upstream = Some(Verifying {
            upstream,
            hasher,
            held: None,
            skip,
            digest: continuation.digest,
            total: continuation.total,
            stall,
        });
        self.upstream.as_mut().expect("just set").next_chunk().await
    }

    /// `bytes`, holding this body's share of the budget while they live.
    fn held(&self, bytes: Bytes) -> Bytes {
        match &self.charge {
            Some(charge) => window_budget::charged(bytes, charge),
            None => bytes,
        }
    }

    fn limit(&self) -> Limit {
        let Some(progress) = &self.progress else {
            return Limit::Final(self.end.unwrap_or(u64::MAX));
        };
        let state = progress.borrow().clone();
        match state {
            FillState::Starting => Limit::Partial(0),
            FillState::Streaming { written, .. } => {
                // Hold back the response's last byte until the blob is verified.
                let cap = self
                    .end
                    .map_or(written, |end| written.min(end.saturating_sub(1)));
                Limit::Partial(cap)
            }
            FillState::Complete { size } => Limit::Final(self.end.map_or(size, |e| e.min(size))),
            FillState::Failed(e) => Limit::Failed(e),
            // Readers follow only downloads that started; this cannot be seen here.
            FillState::Abandoned => Limit::Failed(crate::cache::inflight::FillError {
                code: crate::error::Code::Unavailable,
                message: "the download was abandoned".into(),
                resumable: false,
                retry_after: None,
            }),
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

/// The hash of the first `len` bytes of a file.
async fn hash_prefix(file: Arc<File>, len: u64) -> io::Result<Hasher> {
    tokio::task::spawn_blocking(move || {
        let mut hasher = Hasher::default();
        let mut buf = vec![0u8; READ_CHUNK as usize];
        while hasher.len() < len {
            let want = (len - hasher.len()).min(READ_CHUNK) as usize;
            let n = file.read_at(&mut buf[..want], hasher.len())?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file is shorter than sent",
                ));
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher)
    })
    .await
    .map_err(|e| io::Error::other(format!("hash task failed: {e}")))?
}

/// `len` bytes of `file` from `pos` (fewer at its end). The bytes are mapped, not copied: a
/// plain connection sends them with `sendfile` (see [`crate::sendfile`]), a TLS one encrypts
/// straight from the page cache. Pages not yet in the page cache are read from disk here, on the
/// blocking pool, so a cold disk never stalls a runtime thread (a window already cached needs
/// no trip there); where a file cannot be mapped, it is read into a buffer instead.
async fn read_at(file: Arc<File>, pos: u64, len: u64) -> io::Result<Bytes> {
    // An `fstat` of an open file never waits on the disk.
    let meta = file.metadata()?;
    let available = meta.len().saturating_sub(pos).min(len);
    if available == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file is shorter than expected",
        ));
    }
    if let Some(bytes) = map_if_cached(&file, &meta, pos, available) {
        return Ok(bytes);
    }
    tokio::task::spawn_blocking(move || window(&file, pos, available))
        .await
        .map_err(|e| io::Error::other(format!("read task failed: {e}")))?
}

/// `len` bytes of `file` (described by `meta`) from `pos`, which must lie within the file,
/// mapped without blocking when every page is already in the page cache (warm hits; a
/// download's followers, who read what was just written); `None` otherwise.
fn map_if_cached(file: &Arc<File>, meta: &std::fs::Metadata, pos: u64, len: u64) -> Option<Bytes> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: as in `map_at`: the range lies within the file, which never shrinks below it.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(pos)
            .len(len as usize)
            .map(&**file)
            .ok()?
    };
    crate::sendfile::is_cached(&map, meta.uid()).then(|| registered(file, pos, map))
}

/// `len` bytes of `file` from `pos`, which must lie within the file: mapped, or read into a
/// buffer where the file cannot be mapped. Blocks.
fn window(file: &Arc<File>, pos: u64, len: u64) -> io::Result<Bytes> {
    map_at(file, pos, len).or_else(|_| copy_at(file, pos, len))
}

fn map_at(file: &Arc<File>, pos: u64, len: u64) -> io::Result<Bytes> {
    // The pages are read here (into the page cache, not into this process: a plain connection
    // sends them with `sendfile` and never maps them in), or else faulted in with the mapping.
    let loaded = crate::sendfile::load_into_page_cache(file, pos, len as usize);
    let mut options = memmap2::MmapOptions::new();
    options.offset(pos).len(len as usize);
    if !loaded {
        options.populate();
    }
    // SAFETY: the mapped range lies within the file (checked by the caller just before), and
    // blob files never shrink below what readers were told exists: complete blobs are
    // immutable, removed or quarantined only by unlink or rename (which keep a mapping valid),
    // and a fill truncates only bytes it has not yet published.
    let map = unsafe { options.map(&**file)? };
    Ok(registered(file, pos, map))
}

/// `map`, a window of `file` from `pos`, as bytes registered for `sendfile` while they live.
fn registered(file: &Arc<File>, pos: u64, map: memmap2::Mmap) -> Bytes {
    let registration = Registration::new(&map, Arc::clone(file), pos);
    Bytes::from_owner(MappedWindow {
        _registration: registration,
        map,
    })
}

/// A mapped window, registered for `sendfile` while it lives.
struct MappedWindow {
    // Dropped first: never registered without its mapping.
    _registration: Registration,
    map: memmap2::Mmap,
}

impl AsRef<[u8]> for MappedWindow {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

fn copy_at(file: &File, pos: u64, len: u64) -> io::Result<Bytes> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn a_window_shows_the_same_bytes_whether_its_pages_are_cached_or_not() {
        let bytes: Vec<u8> = (0..2u32 << 20).map(|i| (i * 31 % 251) as u8).collect();
        // On disk (not a tmpfs, whose pages cannot be dropped), unnamed: gone when closed.
        let mut file = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        file.write_all(&bytes).unwrap();
        let file = Arc::new(file);
        let window = 5000..5000 + (1 << 20);
        let cached = read_at(Arc::clone(&file), 5000, 1 << 20).await.unwrap();
        assert!(
            cached[..] == bytes[window.clone()],
            "mapped from the page cache"
        );
        // Pages still mapped cannot be dropped from the page cache.
        drop(cached);
        file.sync_all().unwrap();
        rustix::fs::fadvise(&*file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        {
            use std::os::unix::fs::MetadataExt;
            let owner = file.metadata().unwrap().uid();
            // SAFETY: the range lies within the file, which nothing truncates.
            let map = unsafe {
                memmap2::MmapOptions::new()
                    .offset(4096)
                    .len(1 << 20)
                    .map(&*file)
                    .unwrap()
            };
            assert!(
                !crate::sendfile::is_cached(&map, owner),
                "the window is still cached: this file system ignores fadvise(DONTNEED), so the read from disk goes untested here"
            );
        }
        let loaded = read_at(Arc::clone(&file), 5000, 1 << 20).await.unwrap();
        assert!(loaded[..] == bytes[window], "read from disk first");
        let end = bytes.len() as u64;
        let tail = read_at(Arc::clone(&file), end - 10, 1 << 20).await.unwrap();
        assert!(tail[..] == bytes[bytes.len() - 10..], "fewer at the end");
        assert!(read_at(file, end, 1).await.is_err(), "nothing past the end");
    }
}
