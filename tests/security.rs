//! Security: TLS on the listener (HTTP/2 by ALPN, certificate swaps without restart), client
//! authentication and access rules, credential hygiene towards upstreams, and hostile input from
//! clients and upstreams answered with exact statuses while the server keeps serving.

mod common;

use common::login::{alice_and_anonymous, basic};
use common::pki::{https_request, issue};
use common::*;
use http::{Method, StatusCode, Version};
use regmirror::config::{AccessRule, AuthConfig, TlsConfig};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// An origin with one small image at `library/alpine:3` and `myorg/tool:1`; returns the blob.
fn seed(origin: &FakeRegistry) -> (Vec<u8>, regmirror::digest::Digest) {
    let blob = random_bytes(300_000, 7);
    let digest = origin.add_blob(blob.clone());
    let manifest = schema2_manifest(&digest, blob.len(), &[]);
    origin.add_manifest("library/alpine", Some("3"), MANIFEST, manifest.clone());
    origin.add_manifest("myorg/tool", Some("1"), MANIFEST, manifest);
    (blob, digest)
}

/// The mirror logs in to its (only) upstream as `mirror` / `upstream-secret`.
fn with_upstream_credentials(c: &mut regmirror::config::Config) {
    let upstream = &mut c.registry[0].upstream[0];
    upstream.username = Some("mirror".into());
    upstream.password = Some(regmirror::config::Secret::new("upstream-secret".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_speaks_h2_and_http1_and_swaps_certificates_without_restart() {
    let origin = FakeRegistry::start().await;
    let (blob, digest) = seed(&origin);
    let pki = tempfile::tempdir().unwrap();
    let first = issue(pki.path(), "first");
    let files = TlsConfig {
        cert: pki.path().join("cert.pem"),
        key: pki.path().join("key.pem"),
    };
    std::fs::copy(&first.cert, &files.cert).unwrap();
    std::fs::copy(&first.key, &files.key).unwrap();
    let tls_files = files.clone();
    let mirror = TestMirror::start(&origin.url(), move |c| c.server.tls = Some(tls_files)).await;
    let base = format!("https://localhost:{}", mirror.addr.port());
    let blob_url = format!("{base}/v2/library/alpine/blobs/{digest}");

    let (version, got) = https_request(&blob_url, &first.ca_pem, true, &[])
        .await
        .unwrap();
    assert_eq!((version, got.status), (Version::HTTP_2, StatusCode::OK));
    assert_eq!(got.bytes().as_ref(), blob.as_slice(), "byte-exact over h2");
    let (version, got) = https_request(&blob_url, &first.ca_pem, false, &[])
        .await
        .unwrap();
    assert_eq!((version, got.status), (Version::HTTP_11, StatusCode::OK));
    assert_eq!(
        got.bytes().as_ref(),
        blob.as_slice(),
        "byte-exact over HTTP/1.1"
    );
    // TLS encrypts from the mapped windows; nothing goes out by sendfile.
    let (_, metrics) = https_request(&format!("{base}/metrics"), &first.ca_pem, false, &[])
        .await
        .unwrap();
    let metrics = String::from_utf8(metrics.bytes().to_vec()).unwrap();
    assert_eq!(
        metric_value(&metrics, "regmirror_served_bytes_sendfile_total", &[]),
        0.0
    );
    // Plain HTTP to the TLS port gets no HTTP answer.
    assert!(try_get(&mirror.url("/v2/")).await.is_none());

    // A half-written replacement (key only) is refused; the running certificate stays.
    let tls = mirror.tls.clone().expect("server tls");
    let second = issue(pki.path(), "second");
    std::fs::write(&files.cert, "not a certificate").unwrap();
    assert!(
        tls.refresh(&files).is_err(),
        "a half-written certificate is refused"
    );
    tokio::spawn(std::sync::Arc::clone(&tls).watch(Duration::from_millis(100)));
    let still = https_request(&format!("{base}/v2/"), &first.ca_pem, true, &[]).await;
    assert_eq!(
        still.unwrap().1.status,
        StatusCode::OK,
        "old certificate kept"
    );

    // The complete new pair is picked up by the watcher, no restart.
    std::fs::copy(&second.cert, &files.cert).unwrap();
    std::fs::copy(&second.key, &files.key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let new = https_request(&format!("{base}/v2/"), &second.ca_pem, false, &[]).await;
        if new.is_ok_and(|(_, got)| got.status == StatusCode::OK) {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = https_request(&format!("{base}/v2/"), &first.ca_pem, false, &[]).await;
    assert!(
        old.is_err(),
        "clients trusting only the old CA are now refused"
    );
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/alpine/blobs/{digest}")),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_log_in_and_access_rules_hold() {
    let origin = FakeRegistry::start().await;
    let (_, digest) = seed(&origin);
    let files = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("alice-password", 4).unwrap();
    std::fs::write(
        files.path().join("htpasswd"),
        format!("alice:{hash}\nbob:{hash}\n"),
    )
    .unwrap();
    std::fs::write(
        files.path().join("tokens"),
        "ci ci-token-0123456789abcdef\n",
    )
    .unwrap();
    let auth = AuthConfig {
        realm: "regmirror".into(),
        htpasswd: Some(files.path().join("htpasswd")),
        tokens_file: Some(files.path().join("tokens")),
        anonymous: vec!["library/*".into()],
        rule: vec![
            AccessRule {
                users: vec!["alice".into(), "ci".into()],
                allow: vec!["myorg/*".into()],
            },
            AccessRule {
                users: vec!["bob".into()],
                allow: vec!["library/*".into()],
            },
        ],
    };
    let mirror = TestMirror::start(&origin.url(), move |c| c.auth = Some(auth)).await;
    let alice = basic("alice", "alice-password");
    let bob = basic("bob", "alice-password");
    let wrong = basic("alice", "guess");
    let token_login = basic("ci", "ci-token-0123456789abcdef");
    let bearer = "Bearer ci-token-0123456789abcdef";
    let tool = "/v2/myorg/tool/manifests/1";
    let alpine = "/v2/library/alpine/manifests/3";
    let cases: &[(&str, Option<&str>, StatusCode, &str)] = &[
        ("/v2/", None, StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        ("/v2/", Some(&alice), StatusCode::OK, ""),
        (
            "/v2/",
            Some(&wrong),
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
        ),
        (
            "/v2/",
            Some("Bearer not-a-token"),
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
        ),
        (
            "/v2/",
            Some("Digest x"),
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
        ),
        (alpine, None, StatusCode::OK, ""),
        (
            alpine,
            Some(&wrong),
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
        ),
        (tool, None, StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        (tool, Some(&alice), StatusCode::OK, ""),
        (tool, Some(&token_login), StatusCode::OK, ""),
        (tool, Some(bearer), StatusCode::OK, ""),
        (tool, Some(&bob), StatusCode::FORBIDDEN, "DENIED"),
        ("/", None, StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        ("/healthz", None, StatusCode::OK, ""),
        ("/metrics", None, StatusCode::OK, ""),
    ];
    for (path, authorization, status, code) in cases {
        let mut headers = vec![("accept", MANIFEST)];
        if let Some(value) = authorization {
            headers.push(("authorization", value));
        }
        let got = request(Method::GET, &mirror.url(path), &headers).await;
        assert_eq!(got.status, *status, "{path} with {authorization:?}");
        if *status == StatusCode::UNAUTHORIZED {
            let expected = match *path {
                "/" => "Basic realm=\"regmirror\"".to_string(),
                "/v2/" => format!(
                    "Bearer realm=\"{}\",service=\"regmirror\"",
                    mirror.url("/token")
                ),
                _ => {
                    let repo = path
                        .trim_start_matches("/v2/")
                        .split("/manifests/")
                        .next()
                        .unwrap();
                    format!(
                        "Bearer realm=\"{}\",service=\"regmirror\",scope=\"repository:{repo}:pull\"",
                        mirror.url("/token")
                    )
                }
            };
            assert_eq!(
                got.header("www-authenticate"),
                Some(expected.as_str()),
                "{path}: a challenge clients answer by logging in"
            );
        }
        if !code.is_empty() {
            assert_eq!(got.json()["errors"][0]["code"], *code, "{path}");
        }
    }
    // The token service: a login's token works like the login, an anonymous token like no
    // login at all (but satisfies the API base check), wrong credentials get no token.
    let token_of = |got: Got| got.json()["token"].as_str().unwrap().to_string();
    let alice_token = token_of(
        request(
            Method::GET,
            &mirror.url("/token?service=regmirror&scope=repository:myorg/tool:pull"),
            &[("authorization", &alice)],
        )
        .await,
    );
    let anonymous_token = token_of(get(&mirror.url("/token?service=regmirror")).await);
    let refused = request(
        Method::GET,
        &mirror.url("/token"),
        &[("authorization", &wrong)],
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.header("www-authenticate"),
        Some("Basic realm=\"regmirror\"")
    );
    let renewed = request(
        Method::GET,
        &mirror.url("/token"),
        &[("authorization", &format!("Bearer {alice_token}"))],
    )
    .await;
    assert_eq!(
        renewed.status,
        StatusCode::UNAUTHORIZED,
        "a token cannot renew itself"
    );
    let post = request(Method::POST, &mirror.url("/token"), &[]).await;
    assert_eq!(
        post.status,
        StatusCode::METHOD_NOT_ALLOWED,
        "containerd falls back to GET on 405"
    );
    for (path, token, status) in [
        (tool, &alice_token, StatusCode::OK),
        ("/v2/", &alice_token, StatusCode::OK),
        (tool, &anonymous_token, StatusCode::UNAUTHORIZED),
        (alpine, &anonymous_token, StatusCode::OK),
        ("/v2/", &anonymous_token, StatusCode::OK),
        ("/", &anonymous_token, StatusCode::UNAUTHORIZED),
    ] {
        let bearer = format!("Bearer {token}");
        let got = request(
            Method::GET,
            &mirror.url(path),
            &[("accept", MANIFEST), ("authorization", &bearer)],
        )
        .await;
        assert_eq!(got.status, status, "{path} with an issued token");
    }
    // The catalog: signed-in users only, each seeing what they may pull (of the repositories
    // whose tags the mirror records: pulled with every manifest type accepted).
    for path in [alpine, tool] {
        let got = request(
            Method::GET,
            &mirror.url(path),
            &[("accept", ACCEPT_ALL), ("authorization", &alice)],
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
    }
    let catalog = |authorization: Option<String>| {
        let url = mirror.url("/v2/_catalog");
        async move {
            let mut headers = Vec::new();
            if let Some(value) = &authorization {
                headers.push(("authorization", value.as_str()));
            }
            request(Method::GET, &url, &headers).await
        }
    };
    let anonymous_catalog = catalog(Some(format!("Bearer {anonymous_token}"))).await;
    assert_eq!(anonymous_catalog.status, StatusCode::UNAUTHORIZED);
    let listed = catalog(Some(bob.clone())).await.json();
    assert_eq!(
        listed["repositories"],
        serde_json::json!(["library/alpine"])
    );
    let listed = catalog(Some(alice.clone())).await.json();
    assert_eq!(
        listed["repositories"],
        serde_json::json!(["library/alpine", "myorg/tool"])
    );
    // The status page names only the images its viewer may pull.
    let page = |who: &str| {
        let url = mirror.url("/");
        let who = who.to_string();
        async move {
            let got = request(Method::GET, &url, &[("authorization", &who)]).await;
            assert_eq!(got.status, StatusCode::OK);
            String::from_utf8(got.bytes().to_vec()).unwrap()
        }
    };
    let for_bob = page(&bob).await;
    assert!(for_bob.contains("docker.io/library/alpine:3"), "{for_bob}");
    assert!(
        !for_bob.contains("myorg/tool"),
        "bob sees a repository he may not pull"
    );
    assert!(page(&alice).await.contains("docker.io/myorg/tool:1"));
    // A denied or unauthenticated client learns nothing and costs nothing upstream.
    let blob = format!("/v2/myorg/tool/blobs/{digest}");
    let got = request(Method::GET, &mirror.url(&blob), &[("authorization", &bob)]).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert_eq!(origin.hits("GET", &blob), 0);
    // The client's own credentials never travel upstream.
    assert!(
        origin.authorizations().iter().all(|(_, a)| a.is_none()),
        "{:?}",
        origin.authorizations()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_are_not_forwarded_upstream_without_auth_either() {
    let origin = FakeRegistry::start().await;
    let (_, digest) = seed(&origin);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let secret = basic("someone", "their-docker-hub-password");
    for path in [
        "/v2/library/alpine/manifests/3".to_string(),
        format!("/v2/library/alpine/blobs/{digest}"),
        "/v2/library/alpine/tags/list".to_string(),
    ] {
        request(
            Method::GET,
            &mirror.url(&path),
            &[("authorization", &secret), ("accept", MANIFEST)],
        )
        .await;
    }
    let seen = origin.authorizations();
    assert!(seen.len() >= 3);
    assert!(seen.iter().all(|(_, a)| a.is_none()), "{seen:?}");
}

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
    origin.add_manifest("evil/huge", Some("1"), MANIFEST, huge);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let got = request(
        Method::GET,
        &mirror.url("/v2/evil/huge/manifests/1"),
        &[("accept", MANIFEST)],
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
async fn upstream_tls_trusts_system_roots_plus_a_ca_file_or_nothing_when_told() {
    let origin = FakeRegistry::start().await;
    let (blob, digest) = seed(&origin);
    let pki = tempfile::tempdir().unwrap();
    let issued = issue(pki.path(), "upstream");
    let files = TlsConfig {
        cert: issued.cert.clone(),
        key: issued.key.clone(),
    };
    // An HTTPS upstream: a regmirror with TLS in front of the fake origin.
    let https_upstream =
        TestMirror::start(&origin.url(), move |c| c.server.tls = Some(files)).await;
    let upstream_url = format!("https://localhost:{}", https_upstream.addr.port());
    let blob_path = format!("/v2/library/alpine/blobs/{digest}");

    // System roots only: the private CA is not trusted, the pull fails cleanly.
    let url = upstream_url.clone();
    let untrusting = TestMirror::start(&url, |_| {}).await;
    let got = get(&untrusting.url(&blob_path)).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!untrusting.has_blob(&digest));

    // With the CA as the endpoint's ca_file: verified and served.
    let (url, ca) = (upstream_url.clone(), issued.ca.clone());
    let trusting = TestMirror::start(&url, move |c| {
        c.registry[0].upstream[0].ca_file = Some(ca);
    })
    .await;
    let got = get(&trusting.url(&blob_path)).await;
    assert_eq!(got.bytes().as_ref(), blob.as_slice());

    // tls_verify = false: accepted without a CA (the operator's explicit choice).
    let url = upstream_url.clone();
    let blind = TestMirror::start(&url, |c| {
        c.registry[0].upstream[0].tls_verify = false;
    })
    .await;
    let got = get(&blind.url(&blob_path)).await;
    assert_eq!(got.bytes().as_ref(), blob.as_slice());

    // A CA file that holds no certificate is refused when the configuration is built.
    std::fs::write(pki.path().join("empty.pem"), "nothing here").unwrap();
    let mut config = regmirror::config::Config::default();
    config.cache.dir = pki.path().join("cache");
    config.registry[0].upstream[0].ca_file = Some(pki.path().join("empty.pem"));
    let refused = regmirror::app::App::new(config).err().expect("refused");
    assert!(refused.contains("empty.pem"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_passwords_never_travel_in_the_clear_to_another_host() {
    let origin = FakeRegistry::start().await;
    let (_, digest) = seed(&origin);
    // The origin (at 127.0.0.1) names a plain-http token service on another host: `localhost`
    // is another name, as far as where a password may go is concerned.
    let elsewhere = FakeRegistry::start().await;
    let realm = format!("http://localhost:{}", elsewhere.addr.port());
    origin.knobs(|k| {
        k.require_token = true;
        k.token_realm = Some(realm);
    });
    let mirror = TestMirror::start(&origin.url(), with_upstream_credentials).await;
    let got = get(&mirror.url(&format!("/v2/library/alpine/blobs/{digest}"))).await;
    assert_eq!(got.status, StatusCode::OK, "an anonymous token still works");
    let asked = elsewhere.authorizations();
    assert!(
        asked.iter().any(|(path, _)| path.starts_with("/token")),
        "{asked:?}"
    );
    assert!(
        asked.iter().all(|(_, a)| a.is_none()),
        "password sent in the clear: {asked:?}"
    );
    // The origin itself (where the password belongs) never got it as Basic either: it asked
    // for a token, and got the token.
    assert!(origin
        .authorizations()
        .iter()
        .all(|(_, a)| a.as_deref().is_none_or(|a| a.starts_with("Bearer tok-"))));

    // The same host on another port (a LAN registry with its token service beside it, both
    // plain http, as the operator chose) gets the credentials.
    let beside = FakeRegistry::start().await;
    let realm = beside.url();
    origin.knobs(|k| k.token_realm = Some(realm));
    let mirror = TestMirror::start(&origin.url(), with_upstream_credentials).await;
    let got = get(&mirror.url(&format!("/v2/library/alpine/blobs/{digest}"))).await;
    assert_eq!(got.status, StatusCode::OK);
    let basic = "Basic bWlycm9yOnVwc3RyZWFtLXNlY3JldA=="; // mirror:upstream-secret
    let asked = beside.authorizations();
    assert!(
        asked
            .iter()
            .any(|(path, a)| path == "/token" && a.as_deref() == Some(basic)),
        "{asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_from_a_host_upstream_redirected_to_is_not_followed() {
    let origin = FakeRegistry::start().await;
    let cdn = FakeRegistry::start().await;
    let realm = FakeRegistry::start().await;
    let blob = random_bytes(10_000, 3);
    let digest = origin.add_blob(blob.clone());
    cdn.add_blob(blob);
    // The host the origin redirects to answers 401, naming a token service of its choosing.
    cdn.knobs(|k| {
        k.require_token = true;
        k.token_realm = Some(realm.url());
    });
    origin.knobs(|k| {
        k.blob_location = Some(format!("{}/v2/library/alpine/blobs/{digest}", cdn.url()));
    });
    let mirror = TestMirror::start(&origin.url(), with_upstream_credentials).await;
    let got = get(&mirror.url(&format!("/v2/library/alpine/blobs/{digest}"))).await;
    assert_ne!(got.status, StatusCode::OK);
    assert_eq!(
        cdn.hits("GET", &format!("/v2/library/alpine/blobs/{digest}")),
        1
    );
    assert_eq!(
        realm.hits("GET", "/token"),
        0,
        "a token was asked of the service a redirect target named"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_content_is_served_only_to_repositories_upstream_serves_it_for() {
    let origin = FakeRegistry::start().await;
    let private_layer = random_bytes(150_000, 21);
    let private = origin.add_blob(private_layer.clone());
    let config = origin.add_blob(b"{}".to_vec());
    let manifest = schema2_manifest(&config, 2, &[(private.clone(), private_layer.len())]);
    let manifest_digest = origin.add_manifest("myorg/tool", Some("1"), DOCKER_MANIFEST, manifest);
    origin.knobs(|k| k.blobs_only_in = Some("myorg/tool".into()));
    let files = tempfile::tempdir().unwrap();
    let auth = alice_and_anonymous(files.path());
    let mirror = TestMirror::start(&origin.url(), move |c| c.auth = Some(auth)).await;
    let alice = basic("alice", "alice-password");
    // Alice pulls her private image: it is stored.
    let got = request(
        Method::GET,
        &mirror.url(&format!("/v2/myorg/tool/blobs/{private}")),
        &[("authorization", &alice)],
    )
    .await;
    assert_eq!(got.bytes().as_ref(), private_layer.as_slice());
    let got = request(
        Method::GET,
        &mirror.url(&format!("/v2/myorg/tool/manifests/{manifest_digest}")),
        &[("authorization", &alice), ("accept", DOCKER_MANIFEST)],
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    mirror.settle().await;
    assert!(mirror.has_blob(&private));
    // An anonymous client names the digests under a repository it may pull: upstream does not
    // have them there, so neither does the mirror, for this client.
    for (method, path) in [
        (Method::GET, format!("/v2/library/alpine/blobs/{private}")),
        (Method::HEAD, format!("/v2/library/alpine/blobs/{private}")),
        (
            Method::GET,
            format!("/v2/library/alpine/manifests/{manifest_digest}"),
        ),
        (
            Method::HEAD,
            format!("/v2/library/alpine/manifests/{manifest_digest}"),
        ),
    ] {
        let got = request(
            method.clone(),
            &mirror.url(&path),
            &[("accept", DOCKER_MANIFEST)],
        )
        .await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{method} {path}");
        if method == Method::GET {
            assert_ne!(got.bytes().as_ref(), private_layer.as_slice());
        }
    }
    // Content upstream does serve for another repository is confirmed once, then linked.
    origin.knobs(|k| k.blobs_only_in = None);
    let shared = format!("/v2/library/alpine/blobs/{private}");
    for _ in 0..3 {
        let got = get(&mirror.url(&shared)).await;
        assert_eq!(got.bytes().as_ref(), private_layer.as_slice());
    }
    assert_eq!(
        origin.hits("HEAD", &shared),
        3,
        "two HEADs answered 404 above (for a GET and a HEAD), one confirmed now"
    );
    assert_eq!(
        origin.hits("GET", &shared),
        0,
        "served from the store, not fetched again"
    );
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
