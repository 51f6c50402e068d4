//! Manifest and tag path against the in-process fake registry.

mod common;

use common::*;
use http::{Method, StatusCode};
use std::time::Duration;

/// An origin holding one schema2 image under `library/app:1.0`; returns (origin, manifest digest, bytes).
async fn origin_with_image() -> (FakeRegistry, regmirror::digest::Digest, String) {
    let origin = FakeRegistry::start().await;
    let config = origin.add_blob(b"{\"architecture\":\"amd64\"}".to_vec());
    let layer = origin.add_blob(random_bytes(1000, 42));
    let manifest = schema2_manifest(&config, 24, &[(layer, 1000)]);
    let digest = origin.add_manifest(
        "library/app",
        Some("1.0"),
        DOCKER_MANIFEST,
        manifest.clone(),
    );
    (origin, digest, manifest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_and_digest_answers_are_byte_exact_with_headers() {
    let (origin, digest, manifest) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    for path in [
        "/v2/library/app/manifests/1.0",
        &format!("/v2/library/app/manifests/{digest}"),
    ] {
        let got = get_manifest(&mirror.url(path)).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        assert_eq!(got.bytes()[..], *manifest.as_bytes(), "{path}");
        got.assert_content(&digest);
        assert_eq!(got.header("content-type"), Some(DOCKER_MANIFEST));
        assert_eq!(
            got.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
        let head = head_manifest(&mirror.url(path)).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(
            head.header("content-length"),
            Some(manifest.len().to_string().as_str())
        );
        assert_eq!(
            head.header("docker-content-digest"),
            Some(digest.to_string().as_str())
        );
        assert!(head.bytes().is_empty());
    }
    // The digest was learnt with the tag: GET by digest never went upstream.
    assert_eq!(origin.hits("GET", "/v2/library/app/manifests/1.0"), 1);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/manifests/{digest}")),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_names_map_to_library() {
    let (origin, digest, _) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let got = get_manifest(&mirror.url("/v2/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    got.assert_content(&digest);
    assert_eq!(origin.hits("GET", "/v2/library/app/manifests/1.0"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_revalidated_with_head_after_the_ttl() {
    let (origin, digest, _) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(300)
    })
    .await;
    let url = mirror.url("/v2/library/app/manifests/1.0");
    for _ in 0..5 {
        assert_eq!(get_manifest(&url).await.status, StatusCode::OK);
    }
    assert_eq!(origin.hits("GET", "/v2/library/app/manifests/1.0"), 1);
    assert_eq!(origin.hits("HEAD", "/v2/library/app/manifests/1.0"), 0);

    mirror.until_tag_due("library/app", "1.0").await;
    for _ in 0..5 {
        let got = get_manifest(&url).await;
        got.assert_content(&digest);
    }
    assert_eq!(
        origin.hits("HEAD", "/v2/library/app/manifests/1.0"),
        1,
        "one HEAD per TTL"
    );
    assert_eq!(
        origin.hits("GET", "/v2/library/app/manifests/1.0"),
        1,
        "no GET when HEAD answers"
    );

    // A re-pushed tag shows through after the TTL.
    let config = origin.add_blob(b"{\"architecture\":\"arm64\"}".to_vec());
    let repushed = schema2_manifest(&config, 24, &[]);
    let new_digest = origin.add_manifest(
        "library/app",
        Some("1.0"),
        DOCKER_MANIFEST,
        repushed.clone(),
    );
    mirror.until_tag_due("library/app", "1.0").await;
    let got = get_manifest(&url).await;
    got.assert_content(&new_digest);
    assert_eq!(got.bytes()[..], *repushed.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_upstream_serves_stale_tags_with_a_warning() {
    let (origin, digest, manifest) = origin_with_image().await;
    let config_digest = {
        let parsed: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        parsed["config"]["digest"].as_str().unwrap().to_string()
    };
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(200)
    })
    .await;
    let tag_url = mirror.url("/v2/library/app/manifests/1.0");
    assert_eq!(get_manifest(&tag_url).await.status, StatusCode::OK);
    assert_eq!(
        get(&mirror.url(&format!("/v2/library/app/blobs/{config_digest}")))
            .await
            .status,
        StatusCode::OK
    );

    origin.knobs(|k| k.fail_status = Some(503));
    mirror.until_tag_due("library/app", "1.0").await;
    let got = get_manifest(&tag_url).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.bytes()[..], *manifest.as_bytes());
    assert!(
        got.header("warning").is_some_and(|w| w.starts_with("299 ")),
        "no Warning on a stale answer"
    );
    let head = head_manifest(&tag_url).await;
    assert_eq!(
        head.header("docker-content-digest"),
        Some(digest.to_string().as_str())
    );
    // By digest: always served, no warning.
    let by_digest = get_manifest(&mirror.url(&format!("/v2/library/app/manifests/{digest}"))).await;
    assert_eq!(by_digest.status, StatusCode::OK);
    assert!(by_digest.header("warning").is_none());
    let blob = get(&mirror.url(&format!("/v2/library/app/blobs/{config_digest}"))).await;
    assert_eq!(blob.status, StatusCode::OK);
    // Not cached at all: 503 with an OCI error, so clients fall back.
    let missing = get_manifest(&mirror.url("/v2/library/other/manifests/1.0")).await;
    assert_eq!(missing.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(missing.json()["errors"][0]["code"], "UNAVAILABLE");
    // Tags known to the cache stand in for tags/list.
    let tags = get(&mirror.url("/v2/library/app/tags/list")).await;
    assert_eq!(tags.status, StatusCode::OK);
    assert_eq!(tags.json()["tags"][0], "1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_serves_many_requests() {
    let (origin, digest, manifest) = origin_with_image().await;
    origin.knobs(|k| {
        k.require_token = true;
        k.token_expires_in = None; // 60 s by the spec
    });
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.tag_ttl = Duration::ZERO).await;
    let parsed: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let config_digest = parsed["config"]["digest"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = match i % 3 {
            0 => mirror.url("/v2/library/app/manifests/1.0"),
            1 => mirror.url(&format!("/v2/library/app/manifests/{digest}")),
            _ => mirror.url(&format!("/v2/library/app/blobs/{config_digest}")),
        };
        tasks.push(tokio::spawn(async move { get_manifest(&url).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(
        origin.hits("GET", "/token"),
        1,
        "token fetched more than once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_manifest_misses_coalesce() {
    let (origin, digest, _) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let url = mirror.url(&format!("/v2/library/app/manifests/{digest}"));
        tasks.push(tokio::spawn(async move { get_manifest(&url).await.status }));
        let url = mirror.url("/v2/library/app/manifests/1.0");
        tasks.push(tokio::spawn(async move { get_manifest(&url).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let by_digest = origin.hits("GET", &format!("/v2/library/app/manifests/{digest}"));
    let by_tag = origin.hits("GET", "/v2/library/app/manifests/1.0");
    assert_eq!(by_tag, 1);
    assert!(
        by_digest <= 1,
        "manifest by digest fetched {by_digest} times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrow_accept_reuses_a_fresh_answer_of_an_accepted_type() {
    let (origin, digest, _) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url("/v2/library/app/manifests/1.0");
    assert_eq!(get_manifest(&url).await.status, StatusCode::OK); // records the tag: schema2
    let narrow = request(Method::GET, &url, &[("accept", DOCKER_MANIFEST)]).await;
    narrow.assert_content(&digest);
    let oci_only = "application/vnd.oci.image.manifest.v1+json";
    let other = request(Method::GET, &url, &[("accept", oci_only)]).await;
    assert_eq!(other.status, StatusCode::OK); // the fake ignores Accept; asked upstream
    assert_eq!(
        origin.hits("GET", "/v2/library/app/manifests/1.0"),
        2,
        "only the non-matching Accept goes upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrow_accept_passes_through_without_recording_the_tag() {
    let (origin, digest, _) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url("/v2/library/app/manifests/1.0");
    for _ in 0..2 {
        let got = request(Method::GET, &url, &[("accept", DOCKER_MANIFEST)]).await;
        assert_eq!(got.status, StatusCode::OK);
        got.assert_content(&digest);
    }
    assert_eq!(origin.hits("GET", "/v2/library/app/manifests/1.0"), 2);
    // The manifest itself was stored by digest.
    let got = get_manifest(&mirror.url(&format!("/v2/library/app/manifests/{digest}"))).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/manifests/{digest}")),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_does_not_match_its_digest_is_refused() {
    let origin = FakeRegistry::start().await;
    let real = schema2_manifest(&regmirror::digest::Digest::of(b"c"), 1, &[]);
    let claimed = regmirror::digest::Digest::of(b"something else");
    origin.add_manifest_as("library/app", &claimed.to_string(), DOCKER_MANIFEST, real);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/manifests/{claimed}"));
    let got = get_manifest(&url).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.json()["errors"][0]["code"], "MANIFEST_INVALID");
    // Nothing was stored: the next request asks upstream again, and is refused again.
    let again = get_manifest(&url).await;
    assert_eq!(again.status, StatusCode::BAD_GATEWAY);
    assert!(
        !mirror.has_blob(&claimed),
        "the mismatching manifest was stored"
    );
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/manifests/{claimed}")),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tag_is_404_manifest_unknown() {
    let (origin, _, _) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/nope")).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.json()["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert_eq!(got.header("content-type"), Some("application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_by_digest_of_an_uncached_manifest_is_a_head_upstream() {
    let (origin, digest, manifest) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/manifests/{digest}"));
    let got = head_manifest(&url).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(
        got.header("content-length"),
        Some(manifest.len().to_string().as_str())
    );
    assert_eq!(
        got.header("docker-content-digest"),
        Some(digest.to_string().as_str())
    );
    assert_eq!(got.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/manifests/{digest}")),
        0
    );
    assert_eq!(
        origin.hits("HEAD", &format!("/v2/library/app/manifests/{digest}")),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_over_4_mib_are_refused() {
    let origin = FakeRegistry::start().await;
    let padding = "x".repeat(4 * 1024 * 1024 + 1);
    let huge = format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","annotations":{{"pad":"{padding}"}}}}"#
    );
    origin.add_manifest("library/app", Some("huge"), DOCKER_MANIFEST, huge);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/huge")).await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert_eq!(got.json()["errors"][0]["code"], "MANIFEST_INVALID");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_upstreams_get_the_configured_credentials() {
    let (origin, digest, _) = origin_with_image().await;
    origin.knobs(|k| k.require_basic = Some("Basic bWlycm9yOnMzY3JldA==".into())); // mirror:s3cret
    let mirror = TestMirror::start(&origin.url(), |c| {
        let upstream = &mut c.registry[0].upstream[0];
        upstream.username = Some("mirror".into());
        upstream.password = Some(regmirror::config::Secret::new("s3cret".into()));
    })
    .await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    got.assert_content(&digest);
    // After the first challenge, credentials go along up front: one 401 in all.
    let by_digest = get_manifest(&mirror.url(&format!("/v2/library/app/manifests/{digest}"))).await;
    assert_eq!(by_digest.status, StatusCode::OK);
    let unauthenticated = origin
        .authorizations()
        .iter()
        .filter(|(_, a)| a.is_none())
        .count();
    assert_eq!(unauthenticated, 1);

    // Without credentials upstream's refusal is passed on as one (clients fall back on it),
    // naming what upstream answered.
    let anonymous = TestMirror::start(&origin.url(), |_| {}).await;
    let got = get_manifest(&anonymous.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert_eq!(got.json()["errors"][0]["code"], "DENIED");
    let message = got.json()["errors"][0]["message"].to_string();
    assert!(message.contains("401"), "{message}");
}

/// Every request in flight holds its future: a hit's must stay small (it is also moved on every
/// poll that hyper and tokio wrap). The upstream exchange and the loads it carries are boxed off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_future_stays_small() {
    let (origin, digest, _) = origin_with_image().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let client: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    for path in [
        format!("/v2/library/app/manifests/{digest}"),
        "/v2/library/app/manifests/1.0".to_string(),
    ] {
        let request = http::Request::get(path.as_str()).body(()).unwrap();
        let future = regmirror::proxy::handle(mirror.app.clone(), request, client);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 8 * 1024, "{path}: {size} bytes");
        assert_eq!(future.await.status(), StatusCode::OK, "{path}");
    }
}
