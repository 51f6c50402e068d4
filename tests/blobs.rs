//! Blob path against the in-process fake registry: single flight, verification, faults, Range.

mod common;

use common::*;
use http::{Method, StatusCode};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_clients_share_one_upstream_download() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(8 * 1024 * 1024, 1);
    let digest = origin.add_blob(blob.clone());
    // Slow enough that all clients arrive while the download runs.
    origin.knobs(|k| {
        k.chunk = Some(256 * 1024);
        k.chunk_delay = Some(Duration::from_millis(15));
    });
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    for client in spawn_gets(&url, 32) {
        let got = client.await.unwrap().expect("a response");
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(
            got.header("docker-content-digest"),
            Some(digest.to_string().as_str())
        );
        assert!(
            got.bytes()[..] == blob[..],
            "body differs from the origin's blob"
        );
    }
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        1
    );
    // One client's bytes came from upstream; the 31 that joined count as saved.
    let served = "regmirror_served_bytes_total";
    let upstream = mirror.metric(served, &[("source", "upstream")]).await;
    let saved = mirror.metric(served, &[("source", "cache")]).await;
    assert_eq!(
        (upstream, saved),
        (blob.len() as f64, 31.0 * blob.len() as f64)
    );
    mirror.settle().await;
    assert!(mirror.has_blob(&digest));
    // Now a hit: upstream is not asked again.
    let again = get(&url).await;
    assert!(again.bytes()[..] == blob[..]);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        1
    );
    assert_eq!(mirror.temp_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_aborts_every_client_and_stores_nothing() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(2 * 1024 * 1024, 2);
    let digest = origin.add_blob(blob.clone());
    origin.knobs(|k| {
        k.corrupt_blobs = true;
        k.chunk_delay = Some(Duration::from_millis(5));
    });
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    for client in spawn_gets(&url, 8) {
        // No answer at all (the verdict came before the headers went out) is safe too.
        let Some(got) = client.await.unwrap() else {
            continue;
        };
        // Headers may already be out; the body must never arrive complete.
        if let Ok(body) = &got.body {
            assert!(
                got.status != StatusCode::OK && body[..] != blob[..],
                "a client received a complete body for a corrupt blob (status {})",
                got.status
            );
        }
    }
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        1
    );
    assert!(!mirror.has_blob(&digest), "a corrupt blob was stored");
    eventually("the temp file is removed", || mirror.temp_files() == 0).await;

    // Once the origin is healthy, the next request fetches again and succeeds.
    origin.knobs(|k| k.corrupt_blobs = false);
    let got = get(&url).await;
    assert!(got.bytes()[..] == blob[..]);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_stream_before_the_download_ends() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(300 * 1024, 3);
    let digest = origin.add_blob(blob.clone());
    let gate = Arc::new(Semaphore::new(0));
    origin.knobs(|k| {
        k.chunk = Some(blob.len() - 1); // everything but the last byte, then wait
        k.gate = Some(Arc::clone(&gate));
    });
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    let response = start_get(&url).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0usize;
    use http_body_util::BodyExt;
    // Read what is offered before the origin sends its last byte.
    loop {
        match tokio::time::timeout(Duration::from_millis(500), body.frame()).await {
            Ok(Some(Ok(frame))) => received += frame.into_data().map(|d| d.len()).unwrap_or(0),
            Ok(other) => panic!("body ended early: {:?}", other.map(|r| r.map(|_| ()))),
            Err(_) => break, // nothing more until the origin continues
        }
    }
    assert_eq!(
        received,
        blob.len() - 1,
        "clients must get the bytes as they arrive"
    );
    gate.add_permits(1);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(received + rest.len(), blob.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_does_not_cancel_the_fill() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(1024 * 1024, 5);
    let digest = origin.add_blob(blob.clone());
    let gate = Arc::new(Semaphore::new(0));
    origin.knobs(|k| k.gate = Some(Arc::clone(&gate)));
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    {
        let response = start_get(&url).await;
        assert_eq!(response.status(), StatusCode::OK);
        // The client goes away with the download paused mid-body.
    }
    gate.add_permits(1);
    eventually("the blob is committed", || mirror.has_blob(&digest)).await;
    let got = get(&url).await;
    assert!(got.bytes()[..] == blob[..]);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_blob_is_committed_once_blob_traffic_pauses_and_served_meanwhile() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(1024 * 1024, 8);
    let digest = origin.add_blob(blob.clone());
    let other = origin.add_blob(random_bytes(10_000, 9));
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    let other_url = mirror.url(&format!("/v2/library/app/blobs/{other}"));
    assert!(get(&url).await.bytes()[..] == blob[..]);
    // Another blob is pulled every 100 ms for 1.5 s: the commit waits. Timed by design: the
    // commit waits for a real 500 ms pause in traffic (the pacer's paused-clock tests cover its
    // logic); this checks the server wires it up, and fails only if a request takes 400 ms.
    let busy_until = std::time::Instant::now() + Duration::from_millis(1500);
    while std::time::Instant::now() < busy_until {
        assert_eq!(get(&other_url).await.status, StatusCode::OK);
        assert!(!mirror.has_blob(&digest), "committed during blob traffic");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // This blob and the other one's first download.
    assert_eq!(mirror.metric("regmirror_commits_waiting", &[]).await, 2.0);
    // Meanwhile it is served from its download, upstream not asked again.
    let again = get(&url).await;
    assert!(again.bytes()[..] == blob[..]);
    let head = head(&url).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-length"), Some("1048576"));
    let path = format!("/v2/library/app/blobs/{digest}");
    assert_eq!(origin.hits("GET", &path), 1);
    assert_eq!(origin.hits("HEAD", &path), 0);
    // The traffic pauses: committed.
    eventually("the blob is committed", || mirror.has_blob(&digest)).await;
    mirror.settle().await;
    assert_eq!(mirror.metric("regmirror_commits_waiting", &[]).await, 0.0);
    assert_eq!(mirror.temp_files(), 0);
    assert!(get(&url).await.bytes()[..] == blob[..]);
    assert_eq!(origin.hits("GET", &path), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_on_hit_and_in_flight() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(500_000, 6);
    let digest = origin.add_blob(blob.clone());
    let gate = Arc::new(Semaphore::new(0));
    origin.knobs(|k| {
        k.gate = Some(Arc::clone(&gate));
        k.chunk = Some(100_000);
    });
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));

    // In flight: a range inside the part already written, and one beyond it.
    let leader = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    eventually("the fill has started", || {
        mirror.app.cache().fills_in_flight() == 1
    })
    .await;
    let early = tokio::spawn({
        let url = url.clone();
        async move { request(Method::GET, &url, &[("range", "bytes=10-99")]).await }
    });
    let late = tokio::spawn({
        let url = url.clone();
        async move { request(Method::GET, &url, &[("range", "bytes=400000-")]).await }
    });
    // Both follow the download beside the leader's client; neither is answered whole before
    // the blob is verified (a response's last byte waits for the digest), not even the range
    // whose bytes are all written.
    eventually("both ranges follow the download", || {
        mirror.app.cache().download_readers(&digest) == Some(3)
    })
    .await;
    assert!(
        !early.is_finished(),
        "a range was answered before the blob was verified"
    );
    assert!(!late.is_finished(), "a range not yet written was answered");
    gate.add_permits(1);
    let early = early.await.unwrap();
    assert_eq!(early.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(early.header("content-range"), Some("bytes 10-99/500000"));
    assert!(early.bytes()[..] == blob[10..100]);
    let late = late.await.unwrap();
    assert_eq!(late.status, StatusCode::PARTIAL_CONTENT);
    assert!(late.bytes()[..] == blob[400_000..]);
    assert!(leader.await.unwrap().bytes()[..] == blob[..]);

    // Hit (the first window of the file is read with the opening: a range from 0 gets a slice).
    mirror.settle().await;
    let got = request(Method::GET, &url, &[("range", "bytes=0-99")]).await;
    assert_eq!(got.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(got.header("content-length"), Some("100"));
    assert!(got.bytes()[..] == blob[..100]);
    let got = request(Method::GET, &url, &[("range", "bytes=-5")]).await;
    assert_eq!(got.status, StatusCode::PARTIAL_CONTENT);
    assert!(got.bytes()[..] == blob[blob.len() - 5..]);
    assert_eq!(got.header("content-length"), Some("5"));
    let got = request(Method::GET, &url, &[("range", "bytes=500000-")]).await;
    assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(got.header("content-range"), Some("bytes */500000"));
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_carries_length_and_digest_without_a_download() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(12_345, 7);
    let digest = origin.add_blob(blob.clone());
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    for round in ["miss", "hit"] {
        let got = head(&url).await;
        assert_eq!(got.status, StatusCode::OK, "{round}");
        assert_eq!(got.header("content-length"), Some("12345"), "{round}");
        assert_eq!(
            got.header("docker-content-digest"),
            Some(digest.to_string().as_str())
        );
        assert!(got.bytes().is_empty());
        if round == "miss" {
            assert_eq!(
                origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
                0
            );
            assert!(get(&url).await.bytes()[..] == blob[..]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upstream_bodies_are_verified_too() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(700_000, 8);
    let digest = origin.add_blob(blob.clone());
    origin.knobs(|k| k.no_content_length = true);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    let got = get(&url).await;
    assert!(got.bytes()[..] == blob[..]);
    mirror.settle().await;
    assert!(mirror.has_blob(&digest));

    let other = random_bytes(300_000, 9);
    let other_digest = origin.add_blob(other);
    origin.knobs(|k| k.corrupt_blobs = true);
    let got = try_get(&mirror.url(&format!("/v2/library/app/blobs/{other_digest}"))).await;
    // No answer at all, or an answer whose body breaks: never a clean end.
    assert!(
        got.is_none_or(|g| g.body.is_err()),
        "a chunked corrupt body ended cleanly"
    );
    assert!(!mirror.has_blob(&other_digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_blob_is_404_blob_unknown() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let missing = regmirror::digest::Digest::of(b"nothing");
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{missing}"))).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.json()["errors"][0]["code"], "BLOB_UNKNOWN");
    assert_eq!(mirror.temp_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdn_redirects_are_followed_without_our_credentials() {
    let origin = FakeRegistry::start().await;
    let cdn = FakeRegistry::start().await;
    let blob = random_bytes(200_000, 10);
    let digest = origin.add_blob(blob.clone());
    cdn.add_blob(blob.clone());
    origin.knobs(|k| {
        k.require_token = true;
        k.redirect_blobs_to = Some(cdn.url());
    });
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    assert!(got.bytes()[..] == blob[..]);
    assert_eq!(cdn.hits("GET", &format!("/cdn/{digest}")), 1);
    let origin_auth = origin.authorizations();
    assert!(
        origin_auth.iter().any(|(p, a)| p.contains("/blobs/")
            && a.as_deref().is_some_and(|a| a.starts_with("Bearer "))),
        "the origin got no token"
    );
    for (path, auth) in cdn.authorizations() {
        assert_eq!(auth, None, "Authorization leaked to the CDN on {path}");
    }
}

/// `n` clients asking for `url` at once.
/// Bytes sent by `sendfile` so far, from `/metrics`.
async fn sendfile_bytes(mirror: &TestMirror) -> f64 {
    mirror
        .metric("regmirror_served_bytes_sendfile_total", &[])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_sends_blob_windows_by_sendfile_byte_exact() {
    const MIB: usize = 1024 * 1024;
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(3 * MIB + 4321, 9);
    let digest = origin.add_blob(blob.clone());
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));

    // The download's own client follows the temp file, window by window.
    assert!(get(&url).await.bytes()[..] == blob[..], "miss byte-exact");
    mirror.settle().await;
    let before = sendfile_bytes(&mirror).await;
    assert!(before > 0.0, "the miss went out by sendfile");

    // A hit: the first MiB (kept from the opening), then the rest in one 4 MiB window of a plain
    // connection, its 4321-byte tail included: every byte by sendfile.
    assert!(get(&url).await.bytes()[..] == blob[..], "hit byte-exact");
    let after = sendfile_bytes(&mirror).await;
    assert_eq!(after - before, blob.len() as f64);

    // Ranges that start and end inside windows and cross their boundaries.
    for (first, last) in [
        (1, 2 * MIB + 17),
        (MIB - 5, MIB + 5),
        (2 * MIB + 100, blob.len() - 1),
    ] {
        let range = format!("bytes={first}-{last}");
        let got = request(Method::GET, &url, &[("range", &range)]).await;
        assert_eq!(got.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert!(got.bytes()[..] == blob[first..=last], "{range} byte-exact");
    }

    // A client with a small receive window that reads slowly: each window goes out in many
    // partial sends, each resumed mid-window at the right offset.
    let path = format!("/v2/library/app/blobs/{digest}");
    let before = sendfile_bytes(&mirror).await;
    assert!(
        slow_raw_get(mirror.addr, &path).await == blob,
        "slow reader byte-exact"
    );
    assert_eq!(sendfile_bytes(&mirror).await - before, blob.len() as f64);

    // Many at once.
    for client in spawn_gets(&url, 8) {
        let got = client.await.unwrap().expect("a response");
        assert!(got.bytes()[..] == blob[..], "concurrent hit byte-exact");
    }
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        1
    );
}

/// The body of a GET over a socket with a 4 KiB receive buffer, read 4 KiB at a time.
async fn slow_raw_get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: mirror\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&response[..head_end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    response.split_off(head_end)
}

fn spawn_gets(url: &str, n: usize) -> Vec<tokio::task::JoinHandle<Option<Got>>> {
    (0..n)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move { try_get(&url).await })
        })
        .collect()
}
