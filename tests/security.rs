//! Security towards clients: TLS on the listener (HTTP/2 by ALPN, certificate swaps without
//! restart), client authentication and access rules, clients' credentials never forwarded
//! upstream, and stored content served only to repositories upstream serves it for.

mod common;

use common::login::{alice_and_anonymous, basic};
use common::pki::{https_request, issue};
use common::small_image::seed;
use common::*;
use http::{Method, StatusCode, Version};
use regmirror::config::{AccessRule, AuthConfig, TlsConfig};
use std::time::{Duration, Instant};

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
        let mut headers = vec![("accept", OCI_MANIFEST)];
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
            &[("accept", OCI_MANIFEST), ("authorization", &bearer)],
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
    // Browsing the cache, in HTML and JSON, at every level: bob never sees myorg/tool, not
    // even by naming it or filtering for it.
    let browse = |who: &str, query: &str| {
        let url = mirror.url(&format!("/browse?{query}"));
        let who = who.to_string();
        async move { request(Method::GET, &url, &[("authorization", &who)]).await }
    };
    for (who, repos) in [
        (&bob, vec!["library/alpine"]),
        (&alice, vec!["library/alpine", "myorg/tool"]),
    ] {
        let registries = browse(who, "format=json").await.json();
        assert_eq!(registries["registries"][0]["registry"], "docker.io");
        assert_eq!(registries["registries"][0]["repositories"], repos.len());
        let listed = browse(who, "registry=docker.io&sort=name&format=json")
            .await
            .json();
        let names: Vec<&str> = listed["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["repository"].as_str().unwrap())
            .collect();
        assert_eq!(names, repos, "the repositories listed");
        let html = browse(who, "registry=docker.io").await;
        let html = String::from_utf8_lossy(html.bytes());
        assert_eq!(html.contains("myorg/tool"), repos.len() == 2, "{html}");
    }
    let tool_tags = browse(&alice, "registry=docker.io&repo=myorg/tool&format=json").await;
    assert_eq!(tool_tags.status, StatusCode::OK);
    assert_eq!(tool_tags.json()["rows"][0]["tag"], "1");
    for query in [
        "registry=docker.io&repo=myorg/tool",
        "registry=docker.io&repo=myorg/tool&format=json",
        "registry=docker.io&repo=myorg/nothing-here",
    ] {
        let got = browse(&bob, query).await;
        assert_eq!(
            got.status,
            StatusCode::NOT_FOUND,
            "{query}: as if not cached"
        );
    }
    // The overview's most pulled images, as JSON and for HEAD, and downloads in progress:
    // only what the viewer may pull.
    let most_pulled = |who: &str| {
        let url = mirror.url("/?format=json");
        let who = who.to_string();
        async move {
            request(Method::GET, &url, &[("authorization", &who)])
                .await
                .json()
        }
    };
    let images = |view: &serde_json::Value| -> Vec<String> {
        view["most_pulled"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["image"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        images(&most_pulled(&bob).await),
        ["docker.io/library/alpine:3"]
    );
    assert!(images(&most_pulled(&alice).await).contains(&"docker.io/myorg/tool:1".to_string()));
    let head = request(
        Method::HEAD,
        &mirror.url("/browse?registry=docker.io&repo=myorg/tool"),
        &[("authorization", &bob)],
    )
    .await;
    assert_eq!(head.status, StatusCode::NOT_FOUND);
    assert!(head.bytes().is_empty());
    let slow = origin.add_blob(random_bytes(300_000, 77));
    origin.knobs(|k| k.stall_after = Some(100_000));
    let download = tokio::spawn({
        let url = mirror.url(&format!("/v2/myorg/tool/blobs/{slow}"));
        let alice = alice.clone();
        async move { request(Method::GET, &url, &[("authorization", &alice)]).await }
    });
    let downloads = |who: &str| {
        let url = mirror.url("/downloads?format=json");
        let who = who.to_string();
        async move {
            request(Method::GET, &url, &[("authorization", &who)])
                .await
                .json()
        }
    };
    let mut seen = serde_json::Value::Null;
    for _ in 0..100 {
        seen = downloads(&alice).await;
        if seen["downloads"][0]["bytes"] == 100_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen["downloads"][0]["repository"], "myorg/tool", "{seen}");
    assert_eq!(seen["downloads"][0]["digest"], slow.to_string());
    let for_bob = downloads(&bob).await;
    assert_eq!(for_bob["downloads"], serde_json::json!([]), "{for_bob}");
    let still = downloads(&alice).await;
    assert_eq!(
        still["downloads"][0]["digest"],
        slow.to_string(),
        "still in progress"
    );
    // A registry that is not a host name never names a directory, whatever the rules match.
    for registry in [
        "docker.io/library/alpine/../..",
        "docker.io%2Flibrary%2Falpine%2F..%2F..",
    ] {
        let query = format!("registry={registry}&repo=myorg/tool&format=json");
        let got = browse(&bob, &query).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{query}");
    }
    let page = request(
        Method::GET,
        &mirror.url("/downloads"),
        &[("authorization", &bob)],
    )
    .await;
    assert!(!String::from_utf8_lossy(page.bytes()).contains(&slow.to_string()));
    download.abort();
    origin.knobs(|k| k.stall_after = None);
    let filtered = browse(&bob, "registry=docker.io&filter=tool&format=json")
        .await
        .json();
    assert_eq!(filtered["total"], 0);
    assert_eq!(
        browse(&format!("Bearer {anonymous_token}"), "registry=docker.io")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
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
            &[("authorization", &secret), ("accept", OCI_MANIFEST)],
        )
        .await;
    }
    let seen = origin.authorizations();
    assert!(seen.len() >= 3);
    assert!(seen.iter().all(|(_, a)| a.is_none()), "{seen:?}");
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
