//! `/metrics`: exact values after a scripted pull sequence, every family present from start-up,
//! and the exposition accepted by Prometheus' own `promtool`.

mod common;

use common::*;
use http::{Method, StatusCode};

/// A metric name, labels to match, and the value expected.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_a_scripted_pull_sequence() {
    let origin = FakeRegistry::start().await;
    let layer = random_bytes(1000, 100);
    let layer_digest = origin.add_blob(layer.clone());
    let manifest = schema2_manifest(&layer_digest, 1000, &[]);
    origin.add_manifest(
        "library/app",
        Some("1.0"),
        DOCKER_MANIFEST,
        manifest.clone(),
    );
    // No prefetch: every blob request below is answered as scripted, by itself.
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.prefetch_downloads = 0).await;

    let fresh = get(&mirror.url("/metrics")).await;
    assert_eq!(fresh.status, StatusCode::OK);
    let text = String::from_utf8(fresh.bytes().to_vec()).unwrap();
    for family in [
        "regmirror_build_info",
        "regmirror_cache_requests_total",
        "regmirror_served_bytes_total",
        "regmirror_served_bytes_sendfile_total",
        "regmirror_upstream_up",
        "regmirror_upstream_ratelimit_remaining",
        "regmirror_fills_in_flight",
        "regmirror_commits_waiting",
        "regmirror_digest_mismatches_total",
        "regmirror_cache_size_bytes",
        "regmirror_cache_objects",
        "regmirror_cache_evictions_total",
        "regmirror_stale_answers_total",
        "regmirror_fill_joins_total",
        "regmirror_prefetches_total",
        "regmirror_http_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(family), "{family} missing at start-up");
    }
    assert_eq!(
        metric_value(
            &text,
            "regmirror_cache_requests_total",
            &[("kind", "blob"), ("outcome", "miss")]
        ),
        0.0
    );

    let tag = mirror.url("/v2/library/app/manifests/1.0");
    let blob = mirror.url(&format!("/v2/library/app/blobs/{layer_digest}"));
    assert_eq!(get_manifest(&tag).await.status, StatusCode::OK); // miss
    assert_eq!(get_manifest(&tag).await.status, StatusCode::OK); // hit
    assert!(get(&blob).await.bytes()[..] == layer[..]); // miss
    mirror.settle().await;
    assert!(get(&blob).await.bytes()[..] == layer[..]); // hit
    assert_eq!(
        request(Method::HEAD, &blob, &[]).await.status,
        StatusCode::OK
    ); // hit, no body
    assert_eq!(
        get(&mirror.url("/v2/UPPER/blobs/x")).await.status,
        StatusCode::BAD_REQUEST
    );

    let text = String::from_utf8(get(&mirror.url("/metrics")).await.bytes().to_vec()).unwrap();
    let m = manifest.len() as f64;
    let cases: &[Expected] = &[
        (
            "regmirror_cache_requests_total",
            &[("kind", "manifest"), ("outcome", "miss")],
            1.0,
        ),
        (
            "regmirror_cache_requests_total",
            &[("kind", "manifest"), ("outcome", "hit")],
            1.0,
        ),
        (
            "regmirror_cache_requests_total",
            &[("kind", "blob"), ("outcome", "miss")],
            1.0,
        ),
        (
            "regmirror_cache_requests_total",
            &[("kind", "blob"), ("outcome", "hit")],
            2.0,
        ),
        (
            "regmirror_cache_requests_total",
            &[("kind", "blob"), ("outcome", "join")],
            0.0,
        ),
        (
            "regmirror_served_bytes_total",
            &[("source", "upstream")],
            1000.0 + m,
        ),
        (
            "regmirror_served_bytes_total",
            &[("source", "cache")],
            1000.0 + m,
        ),
        (
            "regmirror_http_requests_total",
            &[("route", "blob"), ("method", "GET"), ("status", "200")],
            2.0,
        ),
        (
            "regmirror_http_requests_total",
            &[("route", "blob"), ("method", "HEAD"), ("status", "200")],
            1.0,
        ),
        (
            "regmirror_http_requests_total",
            &[("route", "invalid"), ("method", "GET"), ("status", "400")],
            1.0,
        ),
        (
            "regmirror_upstream_requests_total",
            &[("registry", "docker.io"), ("status", "200")],
            2.0,
        ),
        (
            "regmirror_upstream_bytes_total",
            &[("registry", "docker.io")],
            1000.0,
        ),
        ("regmirror_cache_size_bytes", &[], 1000.0),
        ("regmirror_cache_objects", &[("kind", "blob")], 1.0),
        ("regmirror_cache_objects", &[("kind", "manifest")], 1.0),
        (
            "regmirror_upstream_up",
            &[("registry", "docker.io"), ("endpoint", &origin.url())],
            1.0,
        ),
        ("regmirror_digest_mismatches_total", &[], 0.0),
        (
            "regmirror_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        ),
    ];
    for (name, labels, expected) in cases {
        assert_eq!(
            metric_value(&text, name, labels),
            *expected,
            "{name} {labels:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatches_and_stale_answers_are_counted() {
    let origin = FakeRegistry::start().await;
    let digest = origin.add_blob(random_bytes(5000, 101));
    origin.add_empty_image("library/app", "1.0");
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.tag_ttl = std::time::Duration::from_millis(50)
    })
    .await;
    assert_eq!(
        get_manifest(&mirror.url("/v2/library/app/manifests/1.0"))
            .await
            .status,
        StatusCode::OK
    );
    origin.knobs(|k| {
        k.corrupt_blobs = true;
        k.fail_status = None;
    });
    let _ = try_get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    eventually("the failed download is over", || {
        mirror.app.cache().fills_in_flight() == 0
    })
    .await;
    origin.knobs(|k| k.fail_status = Some(503));
    mirror.until_tag_due("library/app", "1.0").await;
    let stale = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert!(stale.header("warning").is_some());
    let text = String::from_utf8(get(&mirror.url("/metrics")).await.bytes().to_vec()).unwrap();
    assert_eq!(
        metric_value(&text, "regmirror_digest_mismatches_total", &[]),
        1.0
    );
    assert_eq!(
        metric_value(&text, "regmirror_stale_answers_total", &[]),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            "regmirror_upstream_up",
            &[("endpoint", &origin.url())]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs promtool (Debian's prometheus): run tests/run.sh"]
async fn promtool_accepts_the_exposition() {
    let origin = FakeRegistry::start().await;
    let digest = origin.add_blob(random_bytes(100, 102));
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let _ = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    let text = get(&mirror.url("/metrics")).await.bytes().to_vec();
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (run tests/run.sh, which installs it)");
    child.stdin.take().unwrap().write_all(&text).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejected /metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
