//! Keep-alive HTTP/1.1 connections across parking: a connection idle for a moment lets go of its
//! buffers (`server::PARK_AFTER`) and still answers its client's next request at once, whole,
//! even one whose first bytes arrived while it was being parked, or several sent back to back;
//! a parked connection is closed after `header_timeout` without a request, as before; a
//! connection is never parked with part of an answer unsent.

mod common;

use common::pki::{issue, tls_connect};
use common::*;
use regmirror::server::PARK_AFTER;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads answers from `tcp` until `count` complete ones (each `/v2/`'s `{}`) have arrived.
async fn read_answers(tcp: &mut (impl AsyncRead + Unpin), count: usize) -> String {
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

/// Reads one answer's head and its `Content-Length` body from `tcp`, after the bytes already
/// in `got`; leaves in `got` what came after the body.
async fn read_whole_answer(tcp: &mut TcpStream, got: &mut Vec<u8>) -> (String, Vec<u8>) {
    let head_end = loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("a head within 10 s")
            .unwrap();
        assert!(n > 0, "closed before the head ended");
        got.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .parse()
        .unwrap();
    let mut body = got.split_off(head_end);
    got.clear();
    while body.len() < length {
        let mut chunk = vec![0u8; 1 << 20];
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut chunk))
            .await
            .expect("the body keeps coming")
            .unwrap();
        assert!(n > 0, "closed after {} of {length} body bytes", body.len());
        body.extend_from_slice(&chunk[..n]);
    }
    *got = body.split_off(length);
    (head, body)
}

/// A client that stops reading for longer than `PARK_AFTER` while answers still wait to be sent
/// (its socket's buffers are full) gets every byte of them when it reads again, on a connection
/// kept alive and on one its request closes: a blob and the small answer after it, and a large
/// manifest, which the server holds whole once its body has handed it over. No connection is
/// parked or closed with bytes unsent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pauses_mid_answer_gets_every_byte() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(6 << 20, 23);
    let digest = origin.add_blob(blob.clone());
    let config = origin.add_blob(b"{}".to_vec());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2, "digest": config.to_string()},
        "layers": [],
        "annotations": {"padding": "x".repeat(3 << 20)},
    })
    .to_string();
    origin.add_manifest(
        "library/paused",
        Some("big"),
        OCI_MANIFEST,
        manifest.clone(),
    );
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let ask_blob =
        format!("GET /v2/library/paused/blobs/{digest} HTTP/1.1\r\nHost: mirror\r\n\r\n");
    let ask_manifest = |close: &str| {
        format!(
            "GET /v2/library/paused/manifests/big HTTP/1.1\r\nHost: mirror\r\n\
             Accept: {OCI_MANIFEST}\r\n{close}\r\n"
        )
    };
    let pause = PARK_AFTER + Duration::from_millis(1500);
    let connect = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 << 10).unwrap();
        socket.connect(mirror.addr).await.unwrap()
    };
    let v2 = |answer: (String, Vec<u8>)| answer.0.starts_with("HTTP/1.1 200") && answer.1 == b"{}";

    // Kept alive: a blob missed (streamed from the fill) and then hit, each with a small answer
    // after it; a large manifest; then, after a pause, a request like any other.
    let mut tcp = connect().await;
    for round in ["miss", "hit"] {
        tcp.write_all(&[ask_blob.as_bytes(), REQUEST].concat())
            .await
            .unwrap();
        tokio::time::sleep(pause).await;
        let mut after = Vec::new();
        let (head, body) = read_whole_answer(&mut tcp, &mut after).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{round}: {head}");
        assert!(body == blob, "{round}: the body is the blob, byte for byte");
        assert!(v2(read_whole_answer(&mut tcp, &mut after).await), "{round}");
    }
    tcp.write_all(ask_manifest("").as_bytes()).await.unwrap();
    tokio::time::sleep(pause).await;
    let (head, body) = read_whole_answer(&mut tcp, &mut Vec::new()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body == manifest.as_bytes(), "the manifest, byte for byte");
    tokio::time::sleep(pause).await;
    tcp.write_all(REQUEST).await.unwrap();
    read_answers(&mut tcp, 1).await;

    // Asked to close: the whole answer, then the end of the connection.
    for asked in [
        [
            ask_blob.as_bytes(),
            b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n",
        ]
        .concat(),
        ask_manifest("Connection: close\r\n").into_bytes(),
    ] {
        let mut tcp = connect().await;
        tcp.write_all(&asked).await.unwrap();
        tokio::time::sleep(pause).await;
        let mut after = Vec::new();
        let (_, body) = read_whole_answer(&mut tcp, &mut after).await;
        if body.len() == blob.len() {
            assert!(body == blob, "the body is the blob, byte for byte");
            assert!(v2(read_whole_answer(&mut tcp, &mut after).await));
        } else {
            assert!(body == manifest.as_bytes(), "the manifest, byte for byte");
        }
        assert!(after.is_empty(), "nothing after the answer");
        let mut rest = [0u8; 16];
        let end = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut rest))
            .await
            .expect("the connection ends after its answer");
        assert_eq!(end.unwrap(), 0, "nothing after the answer");
    }
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/paused/blobs/{digest}")),
        1
    );
}

/// Over TLS, a parked connection answers its next request too, and one whose request asks to
/// close ends with TLS's own close (`close_notify`), which clients check to tell a whole answer
/// from a cut one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_parked_connection_answers_and_a_closed_one_ends_cleanly() {
    let origin = FakeRegistry::start().await;
    let pki = tempfile::tempdir().unwrap();
    let issued = issue(pki.path(), "mirror");
    let files = regmirror::config::TlsConfig {
        cert: issued.cert.clone(),
        key: issued.key.clone(),
    };
    let mirror = TestMirror::start(&origin.url(), move |c| c.server.tls = Some(files)).await;
    let mut tls = tls_connect(mirror.addr, &issued.ca_pem).await;
    tls.write_all(REQUEST).await.unwrap();
    read_answers(&mut tls, 1).await;
    tokio::time::sleep(PARK_AFTER + Duration::from_millis(1500)).await;
    tls.write_all(REQUEST).await.unwrap();
    read_answers(&mut tls, 1).await;

    tls.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest))
        .await
        .expect("the connection ends after its answer");
    read.expect("the connection ends with close_notify, not a bare close");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.ends_with("{}"),
        "{rest}"
    );
}
