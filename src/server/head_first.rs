//! Response bodies whose failure waits until the response head is out.
//!
//! hyper buffers a response's head and polls its body in the same turn, flushing only when the
//! body is pending or its buffer fills. A body that fails at once (a download followed by this
//! response failed just after the response was built: corrupt, reset, abandoned) made hyper
//! close the connection with the head still in its buffer: the client saw a connection closed
//! before any answer, not an answer that broke off. [`HeadFirst`] holds a body's error back for
//! one turn (pending, and wakes itself), so what is buffered goes out first; the error then
//! aborts the body as it would have.
//!
//! One turn is enough when the flush it allows completes (hyper then polls the body again at
//! once), which is the case for a fresh answer on a drained socket. Not covered: a socket that
//! would block at that moment (pipelined requests, a previous answer's tail unsent), where hyper
//! may poll the body again before the head is out; on HTTP/2 the stream is reset, and the head
//! goes first only if the connection task took it before.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A body whose error comes one poll late.
pub struct HeadFirst<B> {
    inner: B,
    held: Option<io::Error>,
}

impl<B> HeadFirst<B> {
    pub fn new(inner: B) -> HeadFirst<B> {
        HeadFirst { inner, held: None }
    }
}

impl<B> Body for HeadFirst<B>
where
    B: Body<Data = Bytes, Error = io::Error> + Unpin,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(error) = self.held.take() {
            return Poll::Ready(Some(Err(error)));
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(error))) => {
                // Pending lets hyper flush what it holds; the wake brings it straight back.
                self.held = Some(error);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, StreamBody};
    use hyper::service::service_fn;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::convert::Infallible;

    type Failing =
        StreamBody<futures_util::stream::Iter<std::vec::IntoIter<io::Result<Frame<Bytes>>>>>;

    /// A body that fails at once (of the 100000 bytes its head promises), after handing out
    /// 1000 bytes when `some_first`.
    fn failing(some_first: bool) -> Failing {
        let mut frames = Vec::new();
        if some_first {
            frames.push(Ok(Frame::data(Bytes::from(vec![7u8; 1000]))));
        }
        frames.push(Err(io::Error::other("the download failed")));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    /// Serves one connection with a 200 whose body is `wrap(failing())`; what the client got.
    async fn served<B>(wrap: fn(Failing) -> B, some_first: bool) -> Result<(u16, bool), String>
    where
        B: Body<Data = Bytes, Error = io::Error> + Send + Unpin + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(move |_| async move {
                let response = http::Response::builder()
                    .header(http::header::CONTENT_LENGTH, 100_000)
                    .body(wrap(failing(some_first)))
                    .unwrap();
                Ok::<_, Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let request = http::Request::get(format!("http://{addr}/"))
            .body(Empty::new())
            .unwrap();
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = response.status().as_u16();
        let body_broke = response.into_body().collect().await.is_err();
        Ok((status, body_broke))
    }

    #[tokio::test]
    async fn a_body_that_fails_at_once_still_gets_its_head_out() {
        for some_first in [false, true] {
            assert_eq!(
                served(HeadFirst::new, some_first).await,
                Ok((200, true)),
                "an answer that broke off"
            );
            // Without it, hyper (1.x) closes the connection with the head unsent. Should a
            // later hyper flush before closing, this fails: HeadFirst is then not needed.
            let bare = served(|body| body, some_first).await;
            assert!(
                bare.as_ref()
                    .is_err_and(|e| e.contains("IncompleteMessage")),
                "{bare:?}"
            );
        }
    }
}
