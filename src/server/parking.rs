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
    /// replay.
    pub fn replay(mut self, read: Bytes) -> Prefixed<I> {
        if !read.is_empty() {
            self.prefix = if self.prefix.is_empty() {
                read
            } else {
                [&read[..], &self.prefix[..]].concat().into()
            };
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
/// HTTP/2 preface. Waits (without reading anything away) until they match it or cannot.
pub async fn sends_h2_preface(stream: &TcpStream) -> io::Result<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut seen = [0u8; PREFACE.len()];
    loop {
        let n = stream.peek(&mut seen).await?;
        if n == 0 || seen[..n] != PREFACE[..n] {
            return Ok(false);
        }
        if n == PREFACE.len() {
            return Ok(true);
        }
        // Part of the preface: the rest is on its way (peek would answer at once again).
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replayed_bytes_come_before_those_still_to_replay() {
        let io = Prefixed::new(()).replay(Bytes::from_static(b"world"));
        let io = io.replay(Bytes::from_static(b"hello "));
        assert_eq!(&io.prefix[..], b"hello world");
        assert!(io.has_prefix());
        assert!(!Prefixed::new(()).replay(Bytes::new()).has_prefix());
    }
}
