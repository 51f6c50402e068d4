//! Zero-copy sends of blob bytes on plain TCP connections.
//!
//! A blob body hands hyper windows of the blob file mapped into memory (see [`crate::body`]).
//! While such a mapping is alive it is registered here, with the file and offset it shows. The
//! connection wrapper [`SendfileStream`] looks at the buffers hyper asks it to write: one that
//! lies inside a registered window goes out with `sendfile(2)` from the file, so the kernel
//! moves page-cache pages to the socket and the process never copies them. The bytes are the
//! same either way (a blob file never changes under a live mapping), so anything not found
//! here — TLS records, small buffers, windows that were copied instead of mapped — is written
//! as usual, and any `sendfile` failure falls back to the plain write of the same buffer.
//!
//! What hyper writes just before a window (a response head) goes with `MSG_MORE`: the kernel
//! holds it and sends it in one packet with the window's first bytes. Sent alone, on a
//! connection with `TCP_NODELAY`, it cost a packet and a wake-up of the client per response;
//! 1 MiB hits at 64 connections went from about 3,000 to 3,700-4,300 a second.

use prometheus::IntCounter;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Windows, and buffers inside one, shorter than this are written as usual: a syscall of their
/// own would cost more than the copy (tiny blobs, and HTTP/2's 16 KiB DATA frames, which go out
/// with their frame heads in one write). A buffer that ends where its window ends (the rest of
/// a window after a partial send) still goes by `sendfile`.
const MIN_SENDFILE: usize = 64 * 1024;

/// A window of `file` mapped at some address, from `offset` on.
struct Window {
    len: usize,
    file: Arc<File>,
    offset: u64,
}

/// Live windows by their start address. Mappings never overlap while alive, so an address
/// belongs to at most one window.
static WINDOWS: Mutex<BTreeMap<usize, Window>> = Mutex::new(BTreeMap::new());

/// Keeps a window registered while the mapping it describes is alive; dropped just before it.
pub struct Registration {
    start: Option<usize>,
}

impl Registration {
    /// Registers `bytes` (a live mapping) as showing `file` from `offset` on. The caller keeps
    /// the mapping alive at least as long as the returned registration.
    pub fn new(bytes: &[u8], file: Arc<File>, offset: u64) -> Registration {
        if bytes.len() < MIN_SENDFILE {
            return Registration { start: None };
        }
        let start = bytes.as_ptr() as usize;
        let window = Window {
            len: bytes.len(),
            file,
            offset,
        };
        windows().insert(start, window);
        Registration { start: Some(start) }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(start) = self.start {
            windows().remove(&start);
        }
    }
}

fn windows() -> std::sync::MutexGuard<'static, BTreeMap<usize, Window>> {
    // A panic while holding the lock cannot leave the map half-updated (single insert/remove).
    WINDOWS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The file and offset behind `buf`, if it lies wholly inside a registered window and is worth
/// a `sendfile` (long enough, or the window's rest).
fn lookup(buf: &[u8]) -> Option<(Arc<File>, u64)> {
    window_of(&windows(), buf)
}

/// The first of `bufs` that [`lookup`] finds, with its index; the registry is locked once.
fn first_window(bufs: &[IoSlice<'_>]) -> Option<(usize, Arc<File>, u64)> {
    let windows = windows();
    bufs.iter()
        .enumerate()
        .find_map(|(i, buf)| window_of(&windows, buf).map(|(file, offset)| (i, file, offset)))
}

/// [`lookup`] in an already locked registry.
fn window_of(windows: &BTreeMap<usize, Window>, buf: &[u8]) -> Option<(Arc<File>, u64)> {
    if buf.is_empty() {
        return None;
    }
    let addr = buf.as_ptr() as usize;
    let (&start, window) = windows.range(..=addr).next_back()?;
    let skip = addr - start;
    let end = skip + buf.len();
    if end > window.len || (buf.len() < MIN_SENDFILE && end < window.len) {
        return None;
    }
    Some((Arc::clone(&window.file), window.offset + skip as u64))
}

/// Reads `len` bytes of `file` from `offset` into the page cache, neither copying nor mapping
/// them: a `sendfile` to `/dev/null`, which waits until the pages are read and then drops
/// them. Blocks (call it on the blocking pool), so that sending those pages later never waits
/// on the disk. False where it cannot (no `/dev/null`, or the file ended early).
pub fn load_into_page_cache(file: &File, mut offset: u64, len: usize) -> bool {
    static DEV_NULL: OnceLock<Option<File>> = OnceLock::new();
    let Some(dev_null) =
        DEV_NULL.get_or_init(|| File::options().write(true).open("/dev/null").ok())
    else {
        return false;
    };
    let end = offset + len as u64;
    while offset < end {
        let left = (end - offset) as usize;
        match rustix::fs::sendfile(dev_null, file, Some(&mut offset), left) {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    true
}

/// Whether every page of `map`, a mapping of a file owned by `owner`, is in the page cache
/// (`mincore(2)`; the mapping itself need not be populated). The kernel tells only for files the
/// process owns (or may write); for others it would say "cached" regardless, so this says false.
/// A window whose pages are all cached can be sent without reading the disk, so it needs no
/// trip to the blocking pool.
pub fn is_cached(map: &memmap2::Mmap, owner: u32) -> bool {
    static EUID: OnceLock<u32> = OnceLock::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = *EUID.get_or_init(|| unsafe { libc::geteuid() });
    if (owner != me && me != 0) || map.is_empty() {
        return false;
    }
    // Asked a batch of pages at a time, into a buffer on the stack: no allocation per window,
    // and the first page not cached ends the question.
    const BATCH: usize = 256;
    let mut resident = [0u8; BATCH];
    let page = page_size();
    let start = map.as_ptr() as usize;
    let mut at = start & !(page - 1);
    let end = start + map.len();
    while at < end {
        let len = (end - at).min(BATCH * page);
        // SAFETY: `at..at + len` lies within the live mapping `map` (mappings start on a page
        // boundary), and `resident` has a byte for each of its at most `BATCH` pages.
        let status = unsafe { libc::mincore(at as *mut libc::c_void, len, resident.as_mut_ptr()) };
        if status != 0
            || resident[..len.div_ceil(page)]
                .iter()
                .any(|page| page & 1 == 0)
        {
            return false;
        }
        at += len;
    }
    true
}

fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
}

/// A plain TCP connection that sends registered blob windows with `sendfile(2)`.
pub struct SendfileStream {
    inner: TcpStream,
    sent: IntCounter,
}

impl SendfileStream {
    /// Wraps `inner`; `sent` counts the bytes that went out with `sendfile`.
    pub fn new(inner: TcpStream, sent: IntCounter) -> SendfileStream {
        SendfileStream { inner, sent }
    }

    /// The connection itself.
    pub fn tcp(&self) -> &TcpStream {
        &self.inner
    }

    /// Sends `buf`, which shows `file` from `offset` on: by `sendfile` where it can, else by a
    /// plain write of the mapped bytes.
    fn poll_send_window(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
        file: &File,
        offset: u64,
    ) -> Poll<io::Result<usize>> {
        match ready!(self.poll_sendfile(cx, file, offset, buf.len())) {
            Some(Ok(n)) => {
                self.sent.inc_by(n as u64);
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(e)),
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    /// Writes `bufs` (what precedes a window: a response head) with `MSG_MORE`, so that it
    /// leaves with the window's bytes that the next call sends.
    fn poll_write_before_window(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let written = self.inner.try_io(Interest::WRITABLE, || {
                rustix::net::sendmsg(
                    &self.inner,
                    bufs,
                    &mut rustix::net::SendAncillaryBuffer::default(),
                    rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL,
                )
                .map_err(Into::into)
            });
            match written {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    /// Sends up to `len` bytes of `file` from `offset`. `None`: not possible here (the file
    /// system refuses, or the file ended early); the caller writes the mapped bytes instead.
    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &File,
        mut offset: u64,
        len: usize,
    ) -> Poll<Option<io::Result<usize>>> {
        loop {
            if let Err(e) = ready!(self.inner.poll_write_ready(cx)) {
                return Poll::Ready(Some(Err(e)));
            }
            let sent = self.inner.try_io(Interest::WRITABLE, || {
                rustix::fs::sendfile(&self.inner, file, Some(&mut offset), len).map_err(Into::into)
            });
            return Poll::Ready(match sent {
                Ok(0) => None,
                Ok(n) => Some(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if is_connection_error(&e) => Some(Err(e)),
                Err(_) => None,
            });
        }
    }
}

/// Errors about the socket, which a plain write would meet too.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
    )
}

impl AsyncRead for SendfileStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendfileStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match lookup(buf) {
            Some((file, offset)) => self.poll_send_window(cx, buf, &file, offset),
            None => Pin::new(&mut self.inner).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // What precedes the first window (a response head) is written as usual; the window
        // goes out on the next call, which starts with it.
        match first_window(bufs) {
            // Only empty buffers before it (writing those would report 0 bytes: a dead socket).
            Some((i, file, offset)) if bufs[..i].iter().all(|buf| buf.is_empty()) => {
                self.poll_send_window(cx, &bufs[i], &file, offset)
            }
            // A window follows: the kernel holds the head back to send it with the window's
            // first bytes (one packet, one wakeup of the client, not two).
            Some((i, _, _)) => self.poll_write_before_window(cx, &bufs[..i]),
            None => Pin::new(&mut self.inner).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_cached_only_while_all_its_pages_are_in_the_page_cache() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        // On disk (not a tmpfs, whose pages cannot be dropped), unnamed: gone when closed.
        let mut file = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        file.write_all(&vec![3u8; 4 << 20]).unwrap();
        let owner = file.metadata().unwrap().uid();
        // An offset off a page boundary, as body windows have.
        let mapped = |len: usize| {
            // SAFETY: the range lies within the file, which nothing truncates.
            unsafe {
                memmap2::MmapOptions::new()
                    .offset(5000)
                    .len(len)
                    .map(&file)
                    .unwrap()
            }
        };
        let map = mapped(300_000);
        // More pages than one `mincore` batch asks about.
        let wide = mapped(3 << 20);
        assert!(is_cached(&map, owner), "just written");
        assert!(is_cached(&wide, owner), "just written, every batch");
        file.sync_all().unwrap();
        // From 2 MiB on (whole folios: the kernel drops no part of one), past the first batches.
        rustix::fs::fadvise(&file, 2 << 20, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(!is_cached(&wide, owner), "its later pages dropped");
        assert!(is_cached(&map, owner), "its pages all still cached");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(!is_cached(&map, owner), "dropped from the page cache");
        // Cached again: the kernel tells a file's owner, and root (who may write any file);
        // anyone else is not told, and hears "not cached".
        let mut back = vec![0u8; 4 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0).unwrap();
        assert!(is_cached(&map, owner), "read back into the page cache");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert_eq!(
            is_cached(&map, owner + 1),
            root,
            "someone else's cached file: told only as root (running as root: {root})"
        );
    }

    #[test]
    fn a_buffer_is_found_only_inside_a_live_window() {
        const MIN: usize = MIN_SENDFILE;
        let file = Arc::new(tempfile::tempfile().unwrap());
        let bytes = vec![7u8; 4 * MIN];
        let registration = Registration::new(&bytes, Arc::clone(&file), 1000);

        let (_, offset) = lookup(&bytes).expect("the whole window");
        assert_eq!(offset, 1000);
        let (_, offset) = lookup(&bytes[MIN..2 * MIN]).expect("a long part of it");
        assert_eq!(offset, 1000 + MIN as u64);
        let (_, offset) = lookup(&bytes[4 * MIN - 10..]).expect("its rest, however short");
        assert_eq!(offset, 1000 + 4 * MIN as u64 - 10);
        assert!(
            lookup(&bytes[..MIN - 1]).is_none(),
            "short, with more after it"
        );

        // A buffer that runs past the window's end is not the window's.
        let larger = vec![0u8; 8 * MIN];
        let inner = Registration::new(&larger[..2 * MIN], Arc::clone(&file), 0);
        assert!(lookup(&larger[MIN..3 * MIN]).is_none());
        assert!(lookup(&larger[..2 * MIN]).is_some());
        drop(inner);
        assert!(
            lookup(&larger[..2 * MIN]).is_none(),
            "gone with its registration"
        );

        // Small windows are not registered at all.
        let small = vec![0u8; MIN - 1];
        let _unregistered = Registration::new(&small, Arc::clone(&file), 0);
        assert!(lookup(&small).is_none());

        drop(registration);
        assert!(lookup(&bytes).is_none());
    }

    #[tokio::test]
    async fn a_window_goes_out_by_sendfile_even_after_empty_buffers() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (file, map, content) = mapped_file();
        let _registration = Registration::new(&map[MIN_SENDFILE..], Arc::clone(&file), 0);
        let (mut client, mut stream, sent) = connected().await;
        let window = &map[MIN_SENDFILE..];
        let n = stream
            .write_vectored(&[IoSlice::new(&[]), IoSlice::new(window)])
            .await
            .unwrap();
        assert!(n > 0);
        assert_eq!(sent.get(), n as u64, "went out by sendfile");
        let mut received = vec![0u8; n];
        client.read_exact(&mut received).await.unwrap();
        // The registration says the window shows the file from offset 0: sendfile sent the
        // file's first bytes, which differ from the mapped bytes at MIN_SENDFILE.
        assert_eq!(received, content[..n]);
    }

    #[tokio::test]
    async fn a_head_before_a_window_leaves_with_it_and_is_never_held_back() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (file, map, content) = mapped_file();
        let _registration = Registration::new(&map, Arc::clone(&file), 0);
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 131072\r\n\r\n";

        for window_follows in [true, false] {
            let (mut client, mut stream, sent) = connected().await;
            let n = stream
                .write_vectored(&[IoSlice::new(head), IoSlice::new(&map)])
                .await
                .unwrap();
            assert_eq!(n, head.len(), "the head goes first, alone");
            assert_eq!(sent.get(), 0);
            let mut expected = head.to_vec();
            if window_follows {
                stream.write_all(&map).await.unwrap();
                assert_eq!(sent.get(), map.len() as u64, "the window went by sendfile");
                expected.extend_from_slice(&content);
            } else {
                // The window never comes (the body failed): the head still leaves.
                stream.shutdown().await.unwrap();
            }
            let mut received = vec![0u8; expected.len()];
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                client.read_exact(&mut received),
            )
            .await
            .expect("nothing is held back")
            .unwrap();
            assert_eq!(received, expected);
        }
    }

    /// A temp file of patterned bytes (two minimum windows long), mapped whole, and its bytes.
    fn mapped_file() -> (Arc<File>, memmap2::Mmap, Vec<u8>) {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        let content: Vec<u8> = (0..2 * MIN_SENDFILE).map(|i| (i % 251) as u8).collect();
        file.write_all(&content).unwrap();
        let file = Arc::new(file);
        // SAFETY: a private temp file, not changed while mapped.
        let map = unsafe { memmap2::Mmap::map(&*file) }.unwrap();
        (file, map, content)
    }

    /// A loopback connection: the client's end, and the server's end wrapped as the server
    /// wraps its connections (`TCP_NODELAY` on), with its `sendfile` byte counter.
    async fn connected() -> (TcpStream, SendfileStream, IntCounter) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        server.set_nodelay(true).unwrap();
        let sent = IntCounter::new("sent", "sent").unwrap();
        (client, SendfileStream::new(server, sent.clone()), sent)
    }
}
