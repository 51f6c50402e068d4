//! What an idle HTTP/1.1 connection keeps while it waits for its client's next request: the
//! socket and nothing else. hyper's connection holds an 8 KiB read buffer and an 8 KiB write
//! buffer for its whole life, which is most of what a keep-alive connection costs; a connection
//! idle for a moment is taken back from hyper ([`Prefixed`] carries any bytes hyper had read
//! but not used into the next one) and waits on [`Parkable::readable`], with no buffer at all.

use bytes::{Buf, Bytes};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// A connection that can wait for its peer to send something without a buffer.
pub trait Parkable {
    /// Resolves once the peer sent bytes or closed the connection.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
}

impl Parkable for crate::sendfile::SendfileStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.tcp().readable()
    }
}

/// TLS: hyper read until the stream had no plaintext left before the connection went idle, so
/// anything new arrives on the socket first.
impl Parkable for tokio_rustls::server::TlsStream<TcpStream> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.get_ref().0.readable()
    }
}

impl<I: Parkable> Parkable for crate::send_watch::Progressing<I> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.inner().readable()
    }
}

impl<I: Parkable> Parkable for TokioIo<I> {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        self.inner().readable()
    }
}

/// A connection's I/O that first replays bytes read from it earlier.
pub struct Prefixed<I> {
    prefix: Bytes,
    inner: I,
}

impl<I> Prefixed<I> {
    pub fn new(inner: I) -> Prefixed<I> {
        Prefixed {
            prefix: Bytes::new(),
            inner,
        }
    }

    /// Puts `read` (bytes read from the connection but not used) before what is left to
    /// replay. They are copied: `read` may be a view into a whole read buffer, which a parked
    /// connection must not keep.
    pub fn replay(mut self, read: &[u8]) -> Prefixed<I> {
        if !read.is_empty() {
            self.prefix = [read, &self.prefix[..]].concat().into();
        }
        self
    }

    /// Whether bytes wait to be replayed (the client's next request has begun).
    pub fn has_prefix(&self) -> bool {
        !self.prefix.is_empty()
    }

    pub fn inner(&self) -> &I {
        &self.inner
    }
}

impl<I: Read + Unpin> Read for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            self.prefix = Bytes::new(); // lets go of the copy
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: Write + Unpin> Write for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether a plain connection speaks HTTP/2 with prior knowledge: its first bytes are the
/// HTTP/2 preface. Nearly every connection tells at once, and its bytes are left on the socket
/// for hyper to read whole; only a preface that arrives in pieces is read away (peeking again
/// would answer at once, and spin) and returned, to be replayed.
pub async fn read_h2_preface(stream: &mut TcpStream) -> io::Result<(bool, Vec<u8>)> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut seen = [0u8; PREFACE.len()];
    let peeked = stream.peek(&mut seen).await?;
    if peeked == 0 || seen[..peeked] != PREFACE[..peeked] {
        return Ok((false, Vec::new()));
    }
    if peeked == PREFACE.len() {
        return Ok((true, Vec::new()));
    }
    let mut n = 0;
    while n < PREFACE.len() {
        let read = stream.read(&mut seen[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
        if seen[..n] != PREFACE[..n] {
            break;
        }
    }
    Ok((seen[..n] == *PREFACE, seen[..n].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replayed_bytes_come_before_those_still_to_replay() {
        let io = Prefixed::new(()).replay(b"world");
        let io = io.replay(b"hello ");
        assert_eq!(&io.prefix[..], b"hello world");
        assert!(io.has_prefix());
        assert!(!Prefixed::new(()).replay(b"").has_prefix());
    }
}
