//! The failure model's rules that take more than one request to show: a tag record goes when
//! upstream says the tag is gone, but not on an untrusted mirror's word; a tag that moved during
//! a rate-limit pause keeps its cached image; requests for an endpoint backing off share one
//! probe; a reload keeps what endpoints taught; pagination links stay on the mirror.

mod common;

use common::*;
use http::{Method, StatusCode};
use regmirror::config::RegistryConfig;
use std::time::Duration;

/// `library/app:1.0` pulled through a new mirror of `origin` (tag TTL 50 ms, then `tweak`), so
/// that the tag's record is cached; the mirror and the tag's URL on it.
async fn tag_pulled(
    origin: &FakeRegistry,
    tweak: impl FnOnce(&mut regmirror::config::Config),
) -> (TestMirror, String) {
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.tag_ttl = Duration::from_millis(50);
        tweak(c);
    })
    .await;
    let url = mirror.url("/v2/library/app/manifests/1.0");
    assert_eq!(get_manifest(&url).await.status, StatusCode::OK);
    (mirror, url)
}

/// Asks for the tag until upstream confirms it (no `Warning`) within `patience`; every answer
/// is `digest`.
async fn until_fresh(url: &str, digest: &regmirror::digest::Digest, patience: Duration) {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let got = get_manifest(url).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(
            got.header("docker-content-digest"),
            Some(digest.to_string().as_str())
        );
        if got.header("warning").is_none() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "still stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_upstream_deleted_is_gone_even_when_upstream_goes_down_after() {
    let origin = FakeRegistry::start().await;
    origin.add_empty_image("library/app", "1.0");
    let (mirror, url) = tag_pulled(&origin, |_| {}).await;
    mirror.until_tag_due("library/app", "1.0").await;
    origin.knobs(|k| k.fail_status = Some(404));
    let gone = get_manifest(&url).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(gone.json()["errors"][0]["code"], "MANIFEST_UNKNOWN");
    // The record went with it: with upstream down now there is nothing stale to serve.
    origin.connections(Connections::Refuse).await;
    let down = get_manifest(&url).await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(down.header("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_mirrors_404_neither_wins_over_a_down_origin_nor_removes_the_tag() {
    let origin = FakeRegistry::start().await;
    let digest = origin.add_empty_image("library/app", "1.0");
    let partial = FakeRegistry::start().await; // knows nothing
    let mirror = TestMirror::start_many(&[&origin.url(), &partial.url()], |c| {
        c.cache.tag_ttl = Duration::from_millis(50);
        c.registry[0].upstream[1].resolve_tags = false;
        c.registry[0].allow_untrusted_tags = true;
    })
    .await;
    let url = mirror.url("/v2/library/app/manifests/1.0");
    assert_eq!(get_manifest(&url).await.status, StatusCode::OK);
    mirror.until_tag_due("library/app", "1.0").await;
    origin.knobs(|k| k.fail_status = Some(503));
    let stale = get_manifest(&url).await;
    assert_eq!(stale.status, StatusCode::OK, "the partial mirror's 404 won");
    assert!(stale.header("warning").is_some());
    assert_eq!(
        partial.hits("HEAD", "/v2/library/app/manifests/1.0"),
        1,
        "the untrusted endpoint was asked, and said 404"
    );
    // Upstream back: the record is still there, and confirmed once the origin's back-off is
    // over and a probe (in the background: a client with a known digest does not wait for
    // it) finds it up.
    origin.knobs(|k| k.fail_status = None);
    until_fresh(&url, &digest, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_that_moved_during_a_rate_limit_pause_keeps_serving_the_cached_image() {
    let origin = FakeRegistry::start().await;
    let before = origin.add_empty_image("library/app", "1.0");
    let (mirror, url) = tag_pulled(&origin, |_| {}).await;
    // Docker Hub starts refusing manifest GETs (HEADs still answer), and the tag moves.
    origin.knobs(|k| {
        k.rate_limit_manifests = Some(60);
        k.rate_limit_only_gets = true;
    });
    let config = origin.add_blob(br#"{"moved":true}"#.to_vec());
    let after = origin.add_manifest(
        "library/app",
        Some("1.0"),
        DOCKER_MANIFEST,
        schema2_manifest(&config, 14, &[]),
    );
    let never = get_manifest(&mirror.url("/v2/library/app/manifests/2.0")).await;
    assert_eq!(
        never.status,
        StatusCode::TOO_MANY_REQUESTS,
        "starts the pause"
    );
    mirror.until_tag_due("library/app", "1.0").await;
    for got in [get_manifest(&url).await, head_manifest(&url).await] {
        assert_eq!(got.status, StatusCode::OK, "the cached image is refused");
        assert_eq!(
            got.header("docker-content-digest"),
            Some(before.to_string().as_str())
        );
        assert!(got.header("warning").is_some());
    }
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/manifests/{after}")),
        0,
        "a manifest GET went out during the pause"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_an_endpoint_backing_off_share_one_probe() {
    let origin = FakeRegistry::start().await;
    let digests: Vec<_> = (0..8)
        .map(|i| origin.add_blob(random_bytes(1000, i)))
        .collect();
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.registry[0].upstream[0].response_timeout = Duration::from_millis(800);
    })
    .await;
    let url = |d: &regmirror::digest::Digest| mirror.url(&format!("/v2/library/app/blobs/{d}"));
    // One outage: it backs off. Then it hangs.
    origin.knobs(|k| k.fail_status = Some(503));
    assert_eq!(
        get(&url(&digests[0])).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    origin.knobs(|k| k.fail_status = None);
    origin.connections(Connections::Hold).await;
    origin.reset_counts();
    let urls: Vec<String> = digests[1..].iter().map(url).collect();
    let answers = futures_util::future::join_all(urls.iter().map(|u| get(u))).await;
    for got in &answers {
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(got.header("retry-after").is_some());
    }
    assert_eq!(origin.seen(), 1, "requests piled onto the dead host");
    // It is back: the next request probes it at once, though its back-off has not ended.
    origin.connections(Connections::Serve).await;
    let got = get(&url(&digests[1])).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(mirror.app.upstream(0).status()[0].health.up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_rate_limit_pauses_health_and_tokens_of_unchanged_endpoints() {
    let origin = FakeRegistry::start().await;
    origin.add_empty_image("library/app", "1.0");
    origin.knobs(|k| k.require_token = true);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let tag = |t: &str| mirror.url(&format!("/v2/library/app/manifests/{t}"));
    assert_eq!(get_manifest(&tag("1.0")).await.status, StatusCode::OK);
    origin.knobs(|k| k.rate_limit_manifests = Some(60));
    assert_eq!(
        get_manifest(&tag("2.0")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A reload (SIGHUP, a certificate rotation) with the same endpoint.
    let config = mirror.live.get().config().clone();
    mirror.live.reload(config.clone()).unwrap();
    let gets = origin.hits("GET", "/v2/library/app/manifests/3.0");
    let paused = get_manifest(&tag("3.0")).await;
    assert_eq!(paused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(paused.header("retry-after").is_some());
    assert_eq!(
        origin.hits("GET", "/v2/library/app/manifests/3.0"),
        gets,
        "a manifest GET went straight back to an endpoint that said 429"
    );
    assert_eq!(
        origin.hits("GET", "/token"),
        1,
        "the token was fetched again"
    );
    // Other credentials make it another account: what the old one learnt does not apply.
    let mut changed = config;
    changed.registry[0].upstream[0].username = Some("other".into());
    changed.registry[0].upstream[0].password =
        Some(regmirror::config::Secret::new("password".into()));
    mirror.live.reload(changed).unwrap();
    origin.add_empty_image("library/app", "4.0");
    let gets = origin.hits("GET", "/v2/library/app/manifests/4.0");
    assert_eq!(
        get_manifest(&tag("4.0")).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        origin.hits("GET", "/v2/library/app/manifests/4.0"),
        gets + 2,
        "another account's requests were held by the old one's pause (it learns the challenge anew: a 401, then the GET with its token)"
    );
    assert_eq!(origin.hits("GET", "/token"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_list_pagination_through_a_prefix_or_ns_follows_links_to_the_end() {
    let hub = FakeRegistry::start().await;
    let ghcr = FakeRegistry::start().await;
    let tags = ["a", "b", "c", "d", "e"];
    for tag in tags {
        ghcr.add_empty_image("owner/app", tag);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = regmirror::config::Config::default();
    config.cache.dir = dir.path().join("cache");
    config.registry = vec![
        RegistryConfig::new("docker.io", true, vec![test_upstream(&hub.url())]),
        RegistryConfig::new("ghcr.io", false, vec![test_upstream(&ghcr.url())]),
    ];
    let mirror = TestMirror::start_with(config, dir).await;
    for (first, links_start) in [
        (
            "/v2/ghcr.io/owner/app/tags/list?n=2",
            "</v2/ghcr.io/owner/app/tags/list?",
        ),
        (
            "/v2/owner/app/tags/list?n=2&ns=ghcr.io",
            "</v2/owner/app/tags/list?",
        ),
    ] {
        let mut listed = Vec::new();
        let mut next = Some(first.to_string());
        let mut pages = 0;
        while let Some(path) = next.take() {
            pages += 1;
            assert!(pages <= 5, "pagination does not end");
            let got = request(Method::GET, &mirror.url(&path), &[]).await;
            assert_eq!(got.status, StatusCode::OK, "{path}");
            for tag in got.json()["tags"].as_array().unwrap() {
                listed.push(tag.as_str().unwrap().to_string());
            }
            if let Some(link) = got.header("link") {
                assert!(link.starts_with(links_start), "{link}");
                if path.contains("ns=") {
                    assert!(link.contains("ns=ghcr.io"), "{link}");
                }
                let target = link.trim_start_matches('<').split('>').next().unwrap();
                next = Some(target.to_string());
            }
        }
        assert_eq!(listed, tags, "{first}");
        assert_eq!(pages, 3, "{first}");
    }
    assert_eq!(hub.seen(), 0, "a page went to the default registry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_with_a_known_digest_never_waits_for_an_endpoint_that_is_down() {
    let origin = FakeRegistry::start().await;
    let digest = origin.add_empty_image("library/app", "1.0");
    let timeout = Duration::from_secs(2);
    let (mirror, url) = tag_pulled(&origin, |c| {
        c.registry[0].upstream[0].response_timeout = timeout;
    })
    .await;
    // It stops answering: the first check finds out the hard way (one time-out).
    origin.connections(Connections::Hold).await;
    let first = get_manifest(&url).await;
    assert!(first.header("warning").is_some());
    // Once its back-off is over, a check probes it in the background: the client gets the last
    // known digest without waiting for that probe.
    mirror.until_endpoint_ready(0).await;
    mirror.until_tag_due("library/app", "1.0").await;
    origin.reset_counts();
    let started = std::time::Instant::now();
    let stale = get_manifest(&url).await;
    assert!(stale.header("warning").is_some());
    assert_eq!(
        stale.header("docker-content-digest"),
        Some(digest.to_string().as_str())
    );
    assert!(
        started.elapsed() < timeout / 2,
        "the client waited {:?} for a probe",
        started.elapsed()
    );
    let probed = origin.clone_counter();
    eventually("the background probe reaches the origin", move || {
        probed() == 1
    })
    .await;
    // Back: a probe finds it up, and the tag is confirmed again.
    origin.connections(Connections::Serve).await;
    until_fresh(&url, &digest, Duration::from_secs(8)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrow_accept_gets_the_last_known_digest_when_upstream_is_down() {
    let origin = FakeRegistry::start().await;
    let digest = origin.add_empty_image("library/app", "1.0");
    let (mirror, url) = tag_pulled(&origin, |_| {}).await;
    origin.knobs(|k| k.fail_status = Some(503));
    mirror.until_tag_due("library/app", "1.0").await;
    // A client that takes Docker manifests only (its type): the last digest, marked stale.
    let narrow = [("accept", DOCKER_MANIFEST)];
    for method in [Method::GET, Method::HEAD] {
        let got = request(method.clone(), &url, &narrow).await;
        assert_eq!(got.status, StatusCode::OK, "{method}");
        assert!(got.header("warning").is_some(), "{method}");
        assert_eq!(
            got.header("docker-content-digest"),
            Some(digest.to_string().as_str())
        );
    }
    // One that takes only OCI manifests: nothing it can use is known.
    let oci_only = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    let got = request(Method::GET, &url, &oci_only).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_moved_to_a_manifest_upstream_does_not_serve_yet_keeps_its_previous_digest() {
    let origin = FakeRegistry::start().await;
    let before = origin.add_empty_image("library/app", "1.0");
    let (mirror, url) = tag_pulled(&origin, |_| {}).await;
    // The tag moves, but the new manifest is not served by digest yet (a replica lagging).
    let config = origin.add_blob(br#"{"lagging":true}"#.to_vec());
    let moved = schema2_manifest(&config, 16, &[]);
    origin.add_manifest_as("library/app", "1.0", DOCKER_MANIFEST, moved);
    mirror.until_tag_due("library/app", "1.0").await;
    let got = get_manifest(&url).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.header("warning").is_some());
    assert_eq!(
        got.header("docker-content-digest"),
        Some(before.to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_service_refusing_the_mirrors_credentials_does_not_remove_tags() {
    let origin = FakeRegistry::start().await;
    let digest = origin.add_empty_image("library/app", "1.0");
    let tokens = FakeRegistry::start().await;
    let realm = tokens.url();
    origin.knobs(|k| {
        k.require_token = true;
        k.token_realm = Some(realm);
    });
    let (mirror, url) = tag_pulled(&origin, |_| {}).await;
    // The mirror's credentials are refused (rotated, say): clients are told, the tag stays.
    tokens.knobs(|k| k.fail_status = Some(401));
    origin.knobs(|k| k.accepted_token = Some("tok-renewed".into()));
    mirror.until_tag_due("library/app", "1.0").await;
    let refused = get_manifest(&url).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["errors"][0]["code"], "DENIED");
    // Credentials fixed: the tag's record is still there, so it is confirmed with a HEAD (a
    // removed one would need a GET).
    tokens.knobs(|k| k.fail_status = None);
    origin.knobs(|k| k.accepted_token = None);
    let path = "/v2/library/app/manifests/1.0";
    let (heads, gets) = (origin.hits("HEAD", path), origin.hits("GET", path));
    let fresh = get_manifest(&url).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert!(fresh.header("warning").is_none());
    assert_eq!(
        fresh.header("docker-content-digest"),
        Some(digest.to_string().as_str())
    );
    assert_eq!(
        origin.hits("GET", path),
        gets,
        "the tag's record was removed"
    );
    assert!(origin.hits("HEAD", path) > heads);
}
