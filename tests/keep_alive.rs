//! Keep-alive HTTP/1.1 connections across parking: a connection idle for a moment lets go of its
//! buffers (`server::PARK_AFTER`) and still answers its client's next request at once, whole,
//! even one whose first bytes arrived while it was being parked, or several sent back to back;
//! a parked connection is closed after `header_timeout` without a request, as before.

mod common;

use common::*;
use regmirror::server::PARK_AFTER;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads answers from `tcp` until `count` complete ones (each `/v2/`'s `{}`) have arrived.
async fn read_answers(tcp: &mut TcpStream, count: usize) -> String {
    let mut got = Vec::new();
    let complete = |got: &[u8]| {
        String::from_utf8_lossy(got)
            .matches("HTTP/1.1 200 OK")
            .count()
            == count
            && got.ends_with(b"{}")
    };
    while !complete(&got) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(
            n > 0,
            "the connection was closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(got).unwrap()
}

const REQUEST: &[u8] = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_answers_whole_requests_split_or_back_to_back() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let mut tcp = TcpStream::connect(mirror.addr).await.unwrap();
    tcp.write_all(REQUEST).await.unwrap();
    read_answers(&mut tcp, 1).await;

    // Idle long enough to be parked, then asked again.
    let parked = PARK_AFTER + Duration::from_millis(1500);
    tokio::time::sleep(parked).await;
    tcp.write_all(REQUEST).await.unwrap();
    read_answers(&mut tcp, 1).await;

    // Half a request, then the connection is parked, then the rest: one whole answer.
    tcp.write_all(&REQUEST[..20]).await.unwrap();
    tokio::time::sleep(parked).await;
    tcp.write_all(&REQUEST[20..]).await.unwrap();
    read_answers(&mut tcp, 1).await;

    // Three requests at once after parking: three answers, in order, on the same connection.
    tokio::time::sleep(parked).await;
    tcp.write_all(&REQUEST.repeat(3)).await.unwrap();
    read_answers(&mut tcp, 3).await;
    let served = mirror
        .metric(
            "regmirror_http_requests_total",
            &[("route", "base"), ("method", "GET"), ("status", "200")],
        )
        .await;
    assert_eq!(served, 6.0, "every request reached the mirror once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_is_closed_after_the_header_timeout() {
    let origin = FakeRegistry::start().await;
    let header_timeout = PARK_AFTER + Duration::from_secs(2);
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.server.header_timeout = header_timeout;
    })
    .await;
    let mut tcp = TcpStream::connect(mirror.addr).await.unwrap();
    tcp.write_all(REQUEST).await.unwrap();
    read_answers(&mut tcp, 1).await;
    let quiet = Instant::now();
    let mut rest = [0u8; 16];
    let closed = tokio::time::timeout(header_timeout * 2, tcp.read(&mut rest))
        .await
        .expect("a parked connection is closed");
    assert_eq!(closed.unwrap(), 0, "nothing more was sent");
    let after = quiet.elapsed();
    assert!(
        after >= header_timeout - Duration::from_millis(100)
            && after < header_timeout + Duration::from_secs(2),
        "closed {after:?} after its last answer (header timeout {header_timeout:?})"
    );
}
