//! Hostile and idle clients against a mirror process of its own (so its memory is measured
//! alone): HTTP/2 connections that open every stream they may and never read a byte of them (a
//! zero flow-control window) are closed by `server.send_timeout`, each one's windows stay within
//! `server.h2_window_memory` and the mirror's memory stays bounded meanwhile and comes back after, and a normal client is served throughout; an idle
//! fleet of keep-alive connections costs what the README says, and memory comes back once it
//! leaves.

mod common;

use common::e2e::{spawn_regmirror, wait_until_up, Process};
use common::process::{memory_maps, rss_kib};
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECTIONS: usize = 200;
const STREAMS: usize = 100;
const SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// `server.h2_window_memory`: four of a stream's 1 MiB windows per connection.
const H2_WINDOW_MIB: usize = 4;

/// The mirror process's resident memory in KiB, and its memory mappings.
fn memory_of(pid: u32) -> (u64, usize) {
    let pid = pid.to_string();
    (rss_kib(&pid), memory_maps(&pid))
}

/// The mirror's `/metrics` text.
async fn scrape(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    String::from_utf8_lossy(get(&url).await.bytes()).into_owned()
}

/// The mirror in front of `origin`, with the default `max_connections` (4096).
fn start_mirror(dir: &Path, origin: &str) -> (Process, u16) {
    start_mirror_with(dir, origin, "")
}

/// The mirror in front of `origin` with more `[server]` settings.
fn start_mirror_with(dir: &Path, origin: &str, server: &str) -> (Process, u16) {
    spawn_regmirror(dir, "hostile", |port| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nsend_timeout = \"{}s\"\n{server}\
             h2_window_memory = \"{H2_WINDOW_MIB}MiB\"\n\
             [cache]\ndir = {:?}\n[[registry]]\nname = \"docker.io\"\ndefault = true\n\
             [[registry.upstream]]\nurl = \"{origin}\"\n",
            SEND_TIMEOUT.as_secs(),
            dir.join("cache").display().to_string()
        )
    })
}

/// An attacker's connection: the task driving it (it ends when the server closes the
/// connection), the handle that keeps the client's side open, and the responses never read.
type Stalled = (
    tokio::task::JoinHandle<()>,
    hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>,
    Vec<http::Response<hyper::body::Incoming>>,
);

/// An h2c connection (prior knowledge) whose client keeps every stream's flow-control window
/// shut: the task driving it (it ends when the server closes the connection) and its sender.
async fn shut_window_connection(
    port: u16,
) -> (
    tokio::task::JoinHandle<()>,
    hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>,
) {
    h2_connection(port, 0).await
}

/// An h2c connection (prior knowledge) whose client opens each stream with a flow-control
/// window of `stream_window` bytes and never widens it (it reads no body).
async fn h2_connection(
    port: u16,
    stream_window: u32,
) -> (
    tokio::task::JoinHandle<()>,
    hyper::client::conn::http2::SendRequest<Empty<bytes::Bytes>>,
) {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(65_535)
        .adaptive_window(false)
        .handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (driver, sender)
}

/// One h2c connection (prior knowledge) that opens `STREAMS` requests for `path` and never
/// reads their bodies: its windows stay shut. Returns once every stream has its response head.
async fn stalled_connection(port: u16, path: &str) -> Stalled {
    let (driver, mut sender) = shut_window_connection(port).await;
    let mut pending = Vec::new();
    for _ in 0..STREAMS {
        sender.ready().await.unwrap();
        let request = Request::get(format!("http://127.0.0.1:{port}{path}"))
            .body(Empty::new())
            .unwrap();
        pending.push(sender.send_request(request));
    }
    let mut responses = Vec::new();
    for response in pending {
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        responses.push(response);
    }
    (driver, sender, responses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_that_never_read_are_closed_and_memory_stays_bounded() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(16 * 1024 * 1024, 500);
    let digest = origin.add_blob(blob.clone());
    let dir = tempfile::tempdir().unwrap();
    let (mirror, port) = start_mirror(dir.path(), &origin.url());
    wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
    let path = format!("/v2/library/app/blobs/{digest}");
    let url = format!("http://127.0.0.1:{port}{path}");
    get(&url).await.assert_content(&digest);
    let pid = mirror.pid();
    let (rss_before, maps_before) = memory_of(pid);

    // Every attacker's streams are open and shut at once.
    let started = Instant::now();
    let mut attackers = Vec::new();
    for _ in 0..CONNECTIONS {
        attackers.push(stalled_connection(port, &path).await);
    }
    let opened_in = started.elapsed();
    let (rss_peak, maps_peak) = memory_of(pid);
    // Each connection's windows stay within its budget; its other streams wait for it.
    let metrics = scrape(port).await;
    let held = metric_value(&metrics, "regmirror_h2_window_bytes", &[]) as usize;
    let waits = metric_value(&metrics, "regmirror_h2_window_waits_total", &[]) as usize;
    println!("h2 windows held: {} MiB, waits: {waits}", held >> 20);
    assert!(
        held > 0 && held <= (CONNECTIONS * H2_WINDOW_MIB) << 20,
        "{held} bytes of windows held"
    );
    assert!(
        waits >= CONNECTIONS * (STREAMS - H2_WINDOW_MIB),
        "{waits} waits"
    );
    // One map per window held, and up to two per blocking thread (a stack and its guard):
    // without the budget, every stream's window was a map of its own.
    assert!(
        maps_peak < maps_before + CONNECTIONS * H2_WINDOW_MIB + 2 * 512 + 64,
        "memory maps {maps_before} -> {maps_peak}"
    );
    // A normal client is served meanwhile, byte-exact.
    get(&url).await.assert_content(&digest);

    // The send timeout closes every stalled connection.
    let deadline = Instant::now() + SEND_TIMEOUT * 3 + Duration::from_secs(10);
    for (driver, _sender, _responses) in &mut attackers {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::timeout(left, driver)
            .await
            .expect("a connection that never read is still open")
            .unwrap();
    }
    let closed_after = started.elapsed();
    drop(attackers);
    // Memory comes back: blocking threads leave after 10 s idle, and the quiet server hands
    // free memory back to the kernel every 10 s.
    let settled = Instant::now();
    let (mut rss_after, mut maps_after) = memory_of(pid);
    while (rss_after > rss_before + 16 * 1024 || maps_after >= maps_before + 64)
        && settled.elapsed() < Duration::from_secs(25)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        (rss_after, maps_after) = memory_of(pid);
    }
    println!(
        "{CONNECTIONS} h2 connections x {STREAMS} streams that never read (opened in {opened_in:?}, \
         all closed {closed_after:?} after the first): mirror RSS {} -> {} -> {} MiB \
         ({:?} after), memory maps {maps_before} -> {maps_peak} -> {maps_after}",
        rss_before / 1024,
        rss_peak / 1024,
        rss_after / 1024,
        settled.elapsed()
    );
    assert!(
        rss_peak < rss_before + 192 * 1024,
        "RSS {rss_before} -> {rss_peak} KiB"
    );
    assert!(
        maps_after < maps_before + 64,
        "memory maps {maps_before} -> {maps_after}"
    );
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB once they are gone"
    );
    get(&url).await.assert_content(&digest);
    let metrics = scrape(port).await;
    assert_eq!(
        metric_value(&metrics, "regmirror_h2_window_bytes", &[]),
        0.0,
        "every window's share is let go with its connection"
    );
    assert!(mirror.output().contains("the client stopped reading"));
}

/// A 200 KiB manifest: each answer is one frame, handed to h2 whole.
fn large_manifest(origin: &FakeRegistry) -> regmirror::digest::Digest {
    let config = origin.add_blob(b"{}".to_vec());
    let mut manifest: serde_json::Value =
        serde_json::from_str(&schema2_manifest(&config, 2, &[])).unwrap();
    manifest["annotations"] = serde_json::json!({ "padding": "x".repeat(200 * 1024) });
    origin.add_manifest(
        "library/big",
        Some("v1"),
        DOCKER_MANIFEST,
        manifest.to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_answers_handed_over_whole_but_never_taken_end_the_connection() {
    let origin = FakeRegistry::start().await;
    let digest = large_manifest(&origin);
    let dir = tempfile::tempdir().unwrap();
    let (mirror, port) = start_mirror(dir.path(), &origin.url());
    wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
    let path = format!("/v2/library/big/manifests/{digest}");
    get(&format!("http://127.0.0.1:{port}{path}"))
        .await
        .assert_content(&digest);
    let request = |p: &str| {
        Request::get(format!("http://127.0.0.1:{port}{p}"))
            .body(Empty::new())
            .unwrap()
    };
    // Within the send timeout of the last answer, with room for the checks' pace.
    let deadline = SEND_TIMEOUT + Duration::from_secs(4);

    // 16 streams whose windows take one KiB each: every answer is handed over whole and its
    // body ends, but the client takes nothing more.
    let (driver, mut sender) = h2_connection(port, 1024).await;
    let mut responses = Vec::new();
    for _ in 0..16 {
        sender.ready().await.unwrap();
        let response = sender.send_request(request(&path)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        responses.push(response);
    }
    let started = Instant::now();
    tokio::time::timeout(deadline, driver)
        .await
        .expect("a connection whose client takes none of its answers is still open")
        .unwrap();
    println!(
        "16 answers queued whole, never taken: closed after {:?}",
        started.elapsed()
    );
    drop((responses, sender));

    // A window shut from the start: even the smallest answer is never taken.
    let (driver, mut sender) = shut_window_connection(port).await;
    sender.ready().await.unwrap();
    let response = sender.send_request(request("/v2/")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::timeout(deadline, driver)
        .await
        .expect("a connection that never takes a two-byte answer is still open")
        .unwrap();
    drop((response, sender));

    // A client that takes what it is sent keeps its connection: the same answers, read.
    let (driver, mut sender) = h2_connection(port, 1024 * 1024).await;
    for _ in 0..16 {
        sender.ready().await.unwrap();
        let response = sender.send_request(request(&path)).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(regmirror::digest::Digest::of(&body), digest);
    }
    tokio::time::sleep(SEND_TIMEOUT + Duration::from_secs(1)).await;
    assert!(
        !driver.is_finished(),
        "a client that read everything was cut off"
    );
    sender.ready().await.expect("its connection still serves");
    assert!(mirror.output().contains("the client stopped reading"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_fleet_costs_what_the_readme_says_and_memory_comes_back() {
    const IDLE: usize = 3000;
    const HALF_SENT: usize = 500;
    let origin = FakeRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mirror, port) = start_mirror(dir.path(), &origin.url());
    wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
    let pid = mirror.pid();
    let (rss_before, _) = memory_of(pid);

    // Nodes and runners keep a connection open to their mirror after a request.
    let mut idle = Vec::new();
    for _ in 0..IDLE {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 12];
        tcp.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200");
        idle.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_active, _) = memory_of(pid);
    // Idle a moment, each lets go of its buffers; a quiet server hands them to the kernel.
    let parked_by = Instant::now()
        + regmirror::server::PARK_AFTER
        + regmirror::allocator::QUIET_TRIM_EVERY
        + Duration::from_secs(5);
    let mut rss_idle = rss_active;
    while rss_idle > rss_before + (IDLE * 12) as u64 && Instant::now() < parked_by {
        tokio::time::sleep(Duration::from_millis(500)).await;
        (rss_idle, _) = memory_of(pid);
    }
    // Parked connections still answer their next request at once.
    for tcp in idle.iter_mut().step_by(100) {
        tcp.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n\r\n")
            .await
            .unwrap();
        // After the rest of the first answer (its first 12 bytes were read above).
        let mut got = Vec::new();
        let answers = |got: &[u8]| got.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
        while answers(&got) < 1 {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk))
                .await
                .expect("a parked connection answers its next request")
                .unwrap();
            assert!(n > 0, "a parked connection was closed");
            got.extend_from_slice(&chunk[..n]);
        }
    }
    // And some send half a request, then nothing.
    let mut half = Vec::new();
    for _ in 0..HALF_SENT {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(b"GET /v2/library/app/manifests/1 HTTP/1.1\r\nHost: mir")
            .await
            .unwrap();
        half.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_half, _) = memory_of(pid);
    let open = |text: &str| metric_value(text, "regmirror_connections_open", &[]) as usize;
    let scrape = || scrape(port);
    let metrics = scrape().await;
    // Every one is counted, and the scrape's own connection.
    assert_eq!(open(&metrics), IDLE + HALF_SENT + 1);
    assert_eq!(
        metric_value(&metrics, "regmirror_connections_max", &[]),
        4096.0
    );
    let per_active = (rss_active.saturating_sub(rss_before)) as f64 / IDLE as f64;
    let per_idle = (rss_idle.saturating_sub(rss_before)) as f64 / IDLE as f64;
    let per_half = (rss_half.saturating_sub(rss_idle)) as f64 / HALF_SENT as f64;

    drop(idle);
    drop(half);
    let settled = Instant::now();
    let (mut rss_after, _) = memory_of(pid);
    while rss_after > rss_before + 8 * 1024 && settled.elapsed() < Duration::from_secs(25) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        (rss_after, _) = memory_of(pid);
    }
    println!(
        "{IDLE} keep-alive connections: {per_active:.1} KiB each just after their request, \
         {per_idle:.1} KiB each once idle; {HALF_SENT} half-sent requests: {per_half:.1} KiB \
         each; mirror RSS {} -> {} -> {} -> {} -> {} MiB ({:?} after they closed)",
        rss_before / 1024,
        rss_active / 1024,
        rss_idle / 1024,
        rss_half / 1024,
        rss_after / 1024,
        settled.elapsed()
    );
    // A normal client is served afterwards, and the gauge comes back to its connection alone.
    let mut still_open = open(&scrape().await);
    while still_open > 1 && settled.elapsed() < Duration::from_secs(35) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        still_open = open(&scrape().await);
    }
    assert_eq!(still_open, 1, "connections counted after they all closed");
    // The bounds documented in the README: 4096 clients (the default max_connections) fit in
    // 128 MiB while they send requests, and in 48 MiB once idle.
    assert!(per_active < 32.0, "{per_active:.1} KiB per connection");
    assert!(per_idle < 12.0, "{per_idle:.1} KiB per idle connection");
    assert!(per_half < 32.0, "{per_half:.1} KiB per half-sent request");
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "RSS {rss_before} -> {rss_after} KiB once they closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_reader_is_never_cut_off_and_a_trickle_of_requests_keeps_no_stream_alive()
{
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(12 * 1024 * 1024, 501);
    let digest = origin.add_blob(blob.clone());
    let dir = tempfile::tempdir().unwrap();
    // A send timeout of 1 s, far shorter than the time one 4 MiB window takes at this pace.
    let (mirror, port) = spawn_regmirror(dir.path(), "steady", |port| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nsend_timeout = \"1s\"\n\
             [cache]\ndir = {:?}\n[[registry]]\nname = \"docker.io\"\ndefault = true\n\
             [[registry.upstream]]\nurl = \"{}\"\n",
            dir.path().join("cache").display().to_string(),
            origin.url()
        )
    });
    wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
    let path = format!("/v2/library/app/blobs/{digest}");
    get(&format!("http://127.0.0.1:{port}{path}"))
        .await
        .assert_content(&digest);

    // HTTP/1.1 at about 2 MiB/s, through a small receive buffer: every byte arrives.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: mirror\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let started = Instant::now();
    loop {
        let read = tcp.read(&mut buffer).await.unwrap();
        if read == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..read]);
        let head = received.windows(4).position(|w| w == b"\r\n\r\n");
        if head.is_some_and(|at| received.len() - at - 4 == blob.len()) {
            break;
        }
        // 64 KiB every 30 ms.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let at = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(
        received[at..] == blob[..],
        "a steady reader was cut off after {} of {} bytes ({:?})",
        received.len() - at,
        blob.len(),
        started.elapsed()
    );

    // HTTP/2: a stream never read is not kept alive by small requests on the same connection.
    let (driver, mut sender) = shut_window_connection(port).await;
    let request = move |p: &str| {
        Request::get(format!("http://127.0.0.1:{port}{p}"))
            .body(Empty::new())
            .unwrap()
    };
    sender.ready().await.unwrap();
    let stalled = sender.send_request(request(&path)).await.unwrap();
    assert_eq!(stalled.status(), StatusCode::OK);
    let trickle = tokio::spawn(async move {
        // A small answer every 300 ms: the socket sees bytes written all along.
        loop {
            if sender.ready().await.is_err() {
                return;
            }
            match sender.send_request(request("/v2/")).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(300)).await,
                Err(_) => return,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), driver)
        .await
        .expect("a never-read stream was kept alive by a trickle of requests")
        .unwrap();
    trickle.abort();
    drop(stalled);
}
