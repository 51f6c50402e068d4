//! Hostile input from clients and upstreams: exact statuses for crafted requests, refusals of
//! upstream answers that break the rules (nothing cached from them), slow, idle and silent
//! clients cut off, connections capped, while the server keeps serving.

mod common;

use common::small_image::seed;
use common::*;
use http::{Method, StatusCode};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_exact_statuses_and_the_server_keeps_serving() {
    let origin = FakeRegistry::start().await;
    let (blob, digest) = seed(&origin);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    // Everything in the test's directory (the cache directory and around it) before.
    let before = walk(mirror.dir.path());
    let long_name = "a/".repeat(3000) + "b";
    let cases: Vec<(String, StatusCode, &str)> = vec![
        (
            "/v2/../../etc/passwd/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/library/../../../etc/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/library%2F..%2F..%2Fetc/manifests/latest".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/library/alpine/manifests/..%2F..%2Fx".into(),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/alpine/blobs/sha256:%2e%2e%2f%2e%2e".into(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/library/alpine/blobs/sha256:{}", "0".repeat(63)),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            format!("/v2/library/alpine/blobs/sha256:{}", "A".repeat(64)),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/alpine%00/manifests/3".into(),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            format!("/v2/{long_name}/manifests/3"),
            StatusCode::URI_TOO_LONG,
            "NAME_INVALID",
        ),
        (
            format!("/v2/{}/manifests/3", "a".repeat(256)),
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            format!("/v2/library/alpine/manifests/{}", "t".repeat(129)),
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
    ];
    for (path, status, code) in &cases {
        let got = get(&mirror.url(path)).await;
        assert_eq!(got.status, *status, "{path}");
        assert_eq!(got.json()["errors"][0]["code"], *code, "{path}");
    }
    // A header block larger than the limit: 431 from the HTTP layer.
    let huge = "x".repeat(100 * 1024);
    let got = request(Method::GET, &mirror.url("/v2/"), &[("x-filler", &huge)]).await;
    assert_eq!(got.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Nothing reached upstream or the disk (no file or directory appeared, in the cache or
    // around it), and good requests are still served.
    assert_eq!(
        origin.authorizations().len(),
        0,
        "no hostile request went upstream"
    );
    assert_eq!(
        walk(mirror.dir.path()),
        before,
        "a hostile request wrote to the disk"
    );
    let got = get(&mirror.url(&format!("/v2/library/alpine/blobs/{digest}"))).await;
    assert_eq!(got.bytes().as_ref(), blob.as_slice());
    mirror.settle().await;
    assert!(walk(mirror.dir.path()).contains(&blob_path(&mirror.cache_dir(), &digest)));
}

/// Every file and directory below `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_upstreams_are_refused_and_nothing_is_cached() {
    let origin = FakeRegistry::start().await;
    let (blob, digest) = seed(&origin);
    // A manifest over 4 MiB.
    let huge = format!(
        "{{\"schemaVersion\":2,\"pad\":\"{}\"}}",
        "x".repeat(5 << 20)
    );
    origin.add_manifest("evil/huge", Some("1"), OCI_MANIFEST, huge);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let got = request(
        Method::GET,
        &mirror.url("/v2/evil/huge/manifests/1"),
        &[("accept", OCI_MANIFEST)],
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "oversized manifest");
    assert_eq!(got.json()["errors"][0]["code"], "MANIFEST_INVALID");

    let blob_path = format!("/v2/library/alpine/blobs/{digest}");
    for (location, what) in [
        (format!("{}{blob_path}", origin.url()), "a redirect loop"),
        ("file:///etc/passwd".to_string(), "a redirect to file://"),
        (
            "ftp://example.invalid/blob".to_string(),
            "a redirect to ftp://",
        ),
    ] {
        origin.knobs(|k| k.blob_location = Some(location.clone()));
        let got = get(&mirror.url(&blob_path)).await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{what}");
        assert_eq!(got.json()["errors"][0]["code"], "UNAVAILABLE", "{what}");
        assert!(!mirror.has_blob(&digest), "{what}");
    }
    // Corrupt bytes never reach a client whole, and the upstream recovering is served at once.
    origin.knobs(|k| {
        k.blob_location = None;
        k.corrupt_blobs = true;
    });
    let got = try_get(&mirror.url(&blob_path)).await;
    assert!(got.is_none_or(|g| g.body.is_err() || g.status != StatusCode::OK));
    assert!(!mirror.has_blob(&digest));
    origin.knobs(|k| k.corrupt_blobs = false);
    mirror.settle().await;
    let got = get(&mirror.url(&blob_path)).await;
    assert_eq!(got.bytes().as_ref(), blob.as_slice());
    mirror.settle().await;
    assert_eq!(mirror.temp_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_longer_than_its_descriptor_is_cut_off_at_the_first_byte_too_many() {
    let origin = FakeRegistry::start().await;
    let layer = random_bytes(200_000, 9);
    let layer_digest = origin.add_blob(layer.clone());
    let config = origin.add_blob(b"{}".to_vec());
    let manifest = schema2_manifest(&config, 2, &[(layer_digest.clone(), layer.len())]);
    origin.add_manifest("library/alpine", Some("3"), DOCKER_MANIFEST, manifest);
    // No Content-Length, and after the blob's bytes an endless stream of zeros.
    origin.knobs(|k| {
        k.no_content_length = true;
        k.endless_tail = true;
    });
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.fill_timeout = Duration::from_secs(60);
    })
    .await;
    // A client reads the manifest first, as every client does.
    let got = request(
        Method::GET,
        &mirror.url("/v2/library/alpine/manifests/3"),
        &[("accept", ACCEPT_ALL)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    let started = Instant::now();
    let got = try_get(&mirror.url(&format!("/v2/library/alpine/blobs/{layer_digest}"))).await;
    // The download may be cut off before this client joins it (the tail arrives fast): then
    // it gets an error answer, which is as good. What must never come is a whole 200.
    assert!(
        got.as_ref()
            .is_none_or(|g| g.status != StatusCode::OK || g.body.is_err()),
        "an over-long body reached the client whole ({:?})",
        got.map(|g| g.status)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the download was not cut off at its declared size ({:?})",
        started.elapsed()
    );
    assert!(!mirror.has_blob(&layer_digest));
    eventually("the temp file goes", || mirror.temp_files() == 0).await;
}

/// Reads until the server closes the connection; the time it took.
async fn time_until_closed(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_off_and_connections_are_capped() {
    let origin = FakeRegistry::start().await;
    seed(&origin);
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.server.header_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(1);
        c.server.max_connections = 4;
        c.server.max_requests_per_connection = 3;
    })
    .await;
    // Slowloris: a header line trickled out one byte every 200 ms never completes.
    let mut slow = TcpStream::connect(mirror.addr).await.unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        for byte in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
            .iter()
            .cycle()
        {
            if slow.write_all(&[*byte]).await.is_err() {
                return slow;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        unreachable!()
    });
    let mut slow = tokio::time::timeout(Duration::from_secs(5), trickle)
        .await
        .expect("slow client cut off within the header timeout")
        .unwrap();
    let _ = time_until_closed(&mut slow, Duration::from_secs(2)).await;

    // Idle HTTP/2 connection (prior knowledge): closed with GOAWAY once quiet for idle_timeout.
    let tcp = TcpStream::connect(mirror.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(mirror.url("/v2/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(
        sender.send_request(request).await.unwrap().status(),
        StatusCode::OK
    );
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("idle h2 connection closed")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));

    // An HTTP/1.1 connection carries at most max_requests_per_connection requests.
    let tcp = TcpStream::connect(mirror.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let mut answered = 0;
    for _ in 0..5 {
        // Ready once the previous exchange is complete; an error once the server closed.
        if sender.ready().await.is_err() {
            break;
        }
        let request = http::Request::get("/v2/")
            .header("host", "mirror")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        match sender.send_request(request).await {
            Ok(response) if response.status() == StatusCode::OK => {
                use http_body_util::BodyExt;
                response.into_body().collect().await.unwrap();
                answered += 1;
            }
            other => panic!("request {} failed: {other:?}", answered + 1),
        }
    }
    assert_eq!(answered, 3);
    tokio::time::timeout(Duration::from_secs(2), connection)
        .await
        .expect("connection closed after its share")
        .unwrap()
        .unwrap();

    // At most 4 connections: a fifth waits until one of the four goes away.
    let mut holders = Vec::new();
    for _ in 0..4 {
        let mut tcp = TcpStream::connect(mirror.addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        tcp.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        holders.push(tcp);
    }
    let waiting = tokio::spawn(get(mirror.url("/healthz").leak()));
    // Timed by necessity: the fifth connection waits in the kernel's accept queue, where the
    // server cannot report it. A broken cap serves it within milliseconds, so 300 ms without
    // an answer is a fair sign of the cap; a slow machine can only hide a break, never fail it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a fifth connection was served beside four"
    );
    drop(holders.pop());
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_no_request_is_dropped_after_the_header_timeout() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.server.header_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(60);
    })
    .await;
    // Nothing at all, or half an HTTP/2 preface, while the protocol is still being detected.
    for opening in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut silent = TcpStream::connect(mirror.addr).await.unwrap();
        silent.write_all(opening).await.unwrap();
        let took = time_until_closed(&mut silent, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(900), "{took:?}");
    }
}
