//! Several upstream endpoints: ordered failover with health memory, resume by Range, the trust
//! split for tags, rate limits and fast offline answers.

mod common;

use common::*;
use http::{Method, StatusCode};
use std::time::{Duration, Instant};

fn blob_url(mirror: &TestMirror, digest: &regmirror::digest::Digest) -> String {
    mirror.url(&format!("/v2/library/app/blobs/{digest}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_then_stalling_then_good_endpoint_completes_by_range() {
    let dead = DeadEndpoint::start().await;
    let stalling = FakeRegistry::start().await;
    let good = FakeRegistry::start().await;
    let blob = random_bytes(1024 * 1024, 21);
    let other = random_bytes(50_000, 22);
    for fake in [&stalling, &good] {
        fake.add_blob(blob.clone());
        fake.add_blob(other.clone());
    }
    let digest = regmirror::digest::Digest::of(&blob);
    let other_digest = regmirror::digest::Digest::of(&other);
    stalling.knobs(|k| k.stall_after = Some(300 * 1024));
    let mirror = TestMirror::start_many(&[&dead.url(), &stalling.url(), &good.url()], |c| {
        c.registry[0].upstream[1].stall_timeout = Duration::from_millis(300);
    })
    .await;

    let got = get(&blob_url(&mirror, &digest)).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(
        got.body.is_ok(),
        "the client's stream broke: {:?}",
        got.body.err()
    );
    assert!(got.bytes()[..] == blob[..], "resumed body differs");
    assert_eq!(dead.connections(), 1);
    assert_eq!(
        stalling.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        1
    );
    assert_eq!(
        good.ranges(),
        vec![Some(format!("bytes={}-", 300 * 1024))],
        "resume was not by Range"
    );
    mirror.settle().await;
    assert!(mirror.has_blob(&digest));

    // The next request skips both failed endpoints (they are cooling off).
    let got = get(&blob_url(&mirror, &other_digest)).await;
    assert!(got.bytes()[..] == other[..]);
    assert_eq!(dead.connections(), 1, "the dead endpoint was asked again");
    assert_eq!(
        stalling.hits("GET", &format!("/v2/library/app/blobs/{other_digest}")),
        0
    );
    let status = mirror.app.upstream(0).status();
    assert!(!status[0].health.up && !status[1].health.up && status[2].health.up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_range_support_the_resume_skips_what_was_received() {
    let stalling = FakeRegistry::start().await;
    let good = FakeRegistry::start().await;
    let blob = random_bytes(600_000, 23);
    stalling.add_blob(blob.clone());
    let digest = good.add_blob(blob.clone());
    stalling.knobs(|k| k.stall_after = Some(200_000));
    good.knobs(|k| k.ignore_range = true);
    let mirror = TestMirror::start_many(&[&stalling.url(), &good.url()], |c| {
        c.registry[0].upstream[0].stall_timeout = Duration::from_millis(300);
    })
    .await;
    let got = get(&blob_url(&mirror, &digest)).await;
    assert!(got.body.is_ok(), "the client's stream broke");
    assert!(got.bytes()[..] == blob[..]);
    mirror.settle().await;
    assert!(mirror.has_blob(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_only_endpoint_is_never_asked_about_tags() {
    let liar = FakeRegistry::start().await;
    let trusted = FakeRegistry::start().await;
    let config = trusted.add_blob(b"{}".to_vec());
    let real = schema2_manifest(&config, 2, &[]);
    let forged = schema2_manifest(&regmirror::digest::Digest::of(b"evil"), 4, &[]);
    let real_digest =
        trusted.add_manifest("library/app", Some("1.0"), DOCKER_MANIFEST, real.clone());
    liar.add_manifest("library/app", None, DOCKER_MANIFEST, real.clone());
    liar.add_manifest("library/app", Some("1.0"), DOCKER_MANIFEST, forged);
    let mirror = TestMirror::start_many(&[&liar.url(), &trusted.url()], |c| {
        c.registry[0].upstream[0].resolve_tags = false;
    })
    .await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    got.assert_content(&real_digest);
    // The bytes, not only the header, are the trusted endpoint's.
    assert_eq!(got.bytes().as_ref(), real.as_bytes());
    assert_eq!(liar.hits("GET", "/v2/library/app/manifests/1.0"), 0);
    assert_eq!(liar.hits("HEAD", "/v2/library/app/manifests/1.0"), 0);
    // Content by digest may come from the content-only endpoint (it is verified).
    let head =
        head_manifest(&mirror.url(&format!("/v2/library/app/manifests/{real_digest}"))).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some(real.len().to_string().as_str())
    );
    // tags/list is a tag answer too.
    let listed = get(&mirror.url("/v2/library/app/tags/list")).await;
    assert_eq!(listed.json()["tags"], serde_json::json!(["1.0"]));
    assert_eq!(liar.hits("GET", "/v2/library/app/tags/list"), 0);
    assert_eq!(trusted.hits("GET", "/v2/library/app/tags/list"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_tags_only_when_allowed() {
    let mirror_only = FakeRegistry::start().await;
    let digest = mirror_only.add_empty_image("library/app", "1.0");
    let dead = DeadEndpoint::start().await;
    let strict = TestMirror::start_many(&[&mirror_only.url(), &dead.url()], |c| {
        c.registry[0].upstream[0].resolve_tags = false;
    })
    .await;
    let got = get_manifest(&strict.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(mirror_only.hits("GET", "/v2/library/app/manifests/1.0"), 0);

    let lenient = TestMirror::start_many(&[&mirror_only.url(), &dead.url()], |c| {
        c.registry[0].upstream[0].resolve_tags = false;
        c.registry[0].allow_untrusted_tags = true;
    })
    .await;
    let got = get_manifest(&lenient.url("/v2/library/app/manifests/1.0")).await;
    got.assert_content(&digest);
    assert_eq!(regmirror::digest::Digest::of(got.bytes()), digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_upstream_gets_no_manifest_gets_until_retry_after() {
    let (origin, digest) = {
        let origin = FakeRegistry::start().await;
        let d = origin.add_empty_image("library/app", "1.0");
        let config = regmirror::digest::Digest::of(b"{}");
        origin.add_manifest(
            "library/app",
            Some("2.0"),
            DOCKER_MANIFEST,
            schema2_manifest(&config, 2, &[(d.clone(), 1)]),
        );
        (origin, d)
    };
    origin.knobs(|k| k.rate_limit_headers = true);
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(100)
    })
    .await;
    let tag_url = mirror.url("/v2/library/app/manifests/1.0");
    assert_eq!(get_manifest(&tag_url).await.status, StatusCode::OK);
    let seen = mirror.app.upstream(0).status()[0]
        .health
        .rate_limit
        .clone()
        .expect("rate-limit headers recorded");
    assert_eq!((seen.limit, seen.remaining), (Some(100), Some(42)));
    assert_eq!(seen.source.as_deref(), Some("192.0.2.7"));

    origin.knobs(|k| k.rate_limit_manifests = Some(1));
    mirror.until_tag_due("library/app", "1.0").await;
    let stale = get_manifest(&tag_url).await;
    assert_eq!(stale.status, StatusCode::OK);
    stale.assert_content(&digest);
    assert!(stale.header("warning").is_some());
    // A tag never seen: nothing to serve, and no GET is spent while the window lasts.
    let gets_before = origin.hits("GET", "/v2/library/app/manifests/2.0");
    let limited = get_manifest(&mirror.url("/v2/library/app/manifests/2.0")).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.header("retry-after").is_some());
    assert_eq!(
        origin.hits("GET", "/v2/library/app/manifests/2.0"),
        gets_before
    );

    // After the window, GETs go out again.
    origin.knobs(|k| k.rate_limit_manifests = None);
    mirror.until_endpoint_ready(0).await;
    let fresh = get_manifest(&mirror.url("/v2/library/app/manifests/2.0")).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(
        origin.hits("GET", "/v2/library/app/manifests/2.0"),
        gets_before + 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_detection_costs_one_timeout_not_one_per_request() {
    let origin = FakeRegistry::start().await;
    let config = origin.add_blob(b"{}".to_vec());
    for tag in ["a", "b", "c"] {
        origin.add_manifest(
            "library/app",
            Some(tag),
            DOCKER_MANIFEST,
            schema2_manifest(&config, 2, &[]),
        );
    }
    let hole = BlackHole::start().await;
    // The origin is listed first so the tags get cached; then it goes dark and the black hole
    // (which never answers) is all that is left.
    let mirror = TestMirror::start_many(&[&origin.url(), &hole.url()], |c| {
        c.cache.tag_ttl = Duration::from_millis(100);
        c.registry[0].upstream[1].response_timeout = Duration::from_millis(500);
    })
    .await;
    for tag in ["a", "b", "c"] {
        assert_eq!(
            get_manifest(&mirror.url(&format!("/v2/library/app/manifests/{tag}")))
                .await
                .status,
            StatusCode::OK
        );
    }
    origin.knobs(|k| k.fail_status = Some(503));
    for tag in ["a", "b", "c"] {
        mirror.until_tag_due("library/app", tag).await;
    }
    let started = Instant::now();
    let first = get_manifest(&mirror.url("/v2/library/app/manifests/a")).await;
    assert!(first.header("warning").is_some());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "first stale answer took {:?}",
        started.elapsed()
    );
    // The black hole is backing off now: the other tags' checks do not knock on it again.
    let knocks = hole.connections();
    assert!(knocks >= 1, "the first check never reached the black hole");
    for tag in ["b", "c"] {
        let got = get_manifest(&mirror.url(&format!("/v2/library/app/manifests/{tag}"))).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.header("warning").is_some());
    }
    assert_eq!(
        hole.connections(),
        knocks,
        "a check per tag waited on the black hole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_service_that_stalls_mid_answer_fails_the_request_in_time() {
    let origin = FakeRegistry::start().await;
    let config = origin.add_blob(b"{}".to_vec());
    origin.add_manifest(
        "library/app",
        Some("a"),
        DOCKER_MANIFEST,
        schema2_manifest(&config, 2, &[]),
    );
    let token_service = BlackHole::stalling_after(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"token\":",
    )
    .await;
    origin.knobs(|k| {
        k.require_token = true;
        k.token_realm = Some(token_service.url());
    });
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.registry[0].upstream[0].response_timeout = Duration::from_millis(500);
    })
    .await;
    let started = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(10),
        get_manifest(&mirror.url("/v2/library/app/manifests/a")),
    )
    .await
    .expect("the request hung on the token service's body");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(got.status.is_server_error(), "{}", got.status);
    let body: serde_json::Value = serde_json::from_slice(got.bytes()).unwrap();
    assert!(body["errors"][0]["code"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_answers_its_probe_with_a_refusal_is_up_again() {
    let origin = FakeRegistry::start().await;
    origin.add_empty_image("library/app", "1.0");
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.registry[0].failover_cooldown = Duration::from_millis(200);
    })
    .await;
    let url = mirror.url("/v2/library/app/manifests/1.0");
    let up = || mirror.app.upstream(0).status()[0].health.up;
    origin.knobs(|k| k.fail_status = Some(503));
    assert!(get_manifest(&url).await.status.is_server_error());
    assert!(!up(), "a 503 is an outage");
    // It is back, but refuses this client's credentials (none) when probed.
    origin.knobs(|k| {
        k.fail_status = None;
        k.require_basic = Some("Basic bWlycm9yOnNlY3JldA==".into());
    });
    mirror.until_endpoint_ready(0).await;
    let probed = get_manifest(&url).await;
    assert_ne!(probed.status, StatusCode::OK);
    assert!(up(), "the endpoint answered its probe, yet stays down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfigured_registries_are_refused() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    for path in [
        "/v2/quay.io/org/app/manifests/1",
        "/v2/org/app/manifests/1?ns=quay.io",
    ] {
        let got = get(&mirror.url(path)).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(got.json()["errors"][0]["code"], "NAME_UNKNOWN");
    }
    let strict = TestMirror::start(&origin.url(), |c| c.server.unknown_registry_status = 403).await;
    let got = get(&strict.url("/v2/quay.io/org/app/manifests/1")).await;
    assert_eq!(got.status, StatusCode::FORBIDDEN);
    assert_eq!(got.json()["errors"][0]["code"], "DENIED");
    assert!(
        origin.authorizations().is_empty(),
        "an unconfigured registry reached upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_is_cached_briefly() {
    let origin = FakeRegistry::start().await;
    origin.add_empty_image("library/app", "1.0");
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    for _ in 0..3 {
        let got = request(
            Method::GET,
            &mirror.url("/v2/library/app/tags/list?n=10"),
            &[],
        )
        .await;
        assert_eq!(got.json()["tags"][0], "1.0");
    }
    assert_eq!(origin.hits("GET", "/v2/library/app/tags/list"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_mirror_404_falls_through_to_the_next_endpoint() {
    let partial = FakeRegistry::start().await;
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(10_000, 31);
    let digest = origin.add_blob(blob.clone());
    let mirror = TestMirror::start_many(&[&partial.url(), &origin.url()], |c| {
        c.registry[0].upstream[0].resolve_tags = false;
    })
    .await;
    let got = get(&blob_url(&mirror, &digest)).await;
    assert!(got.bytes()[..] == blob[..]);
    assert_eq!(
        partial.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
        1
    );
    // A 404 is not an outage: the partial mirror is still asked first next time.
    assert!(mirror.app.upstream(0).status()[0].health.up);
    // Nobody has it: 404.
    let missing = regmirror::digest::Digest::of(b"nowhere");
    let got = get(&blob_url(&mirror, &missing)).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
}
