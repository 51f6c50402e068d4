//! The operator console: what each page shows after a scripted pull sequence, as HTML and as
//! JSON, checked against `/metrics`; browsing the cache; downloads in progress; upstream state
//! changes; and each page rendered by a real headless browser (Debian's chromium) with
//! JavaScript on and off, with a screenshot of each saved under `target/`.

mod common;

use common::*;
use http::{Method, StatusCode};
use regmirror::digest::Digest;
use std::process::Command;

/// A mirror that served an image twice (one miss, one hit) and its layer twice.
async fn busy_mirror(origin: &FakeRegistry) -> (TestMirror, Digest) {
    let layer = origin.add_blob(random_bytes(300_000, 120));
    let config_json = br#"{"os":"linux","architecture":"arm64","variant":"v8"}"#;
    let config = origin.add_blob(config_json.to_vec());
    let manifest = origin.add_manifest(
        "library/app",
        Some("1.0"),
        DOCKER_MANIFEST,
        schema2_manifest(&config, config_json.len(), &[(layer.clone(), 300_000)]),
    );
    origin.knobs(|k| k.rate_limit_headers = true);
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.max_size = Some(100 * 1024 * 1024);
        // Only what the test asks for is fetched.
        c.cache.prefetch_downloads = 0;
        c.cache.pin = vec!["docker.io/library/app:1.0".into()];
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            get_manifest(&mirror.url("/v2/library/app/manifests/1.0"))
                .await
                .status,
            StatusCode::OK
        );
        for blob in [&layer, &config] {
            let got = get(&mirror.url(&format!("/v2/library/app/blobs/{blob}"))).await;
            assert_eq!(got.status, StatusCode::OK);
        }
    }
    // The layer is committed just after its last byte reached the client.
    mirror.settle().await;
    (mirror, manifest)
}

fn assert_shows(page: &str, origin: &FakeRegistry) {
    for expected in [
        "docker.io/library/app:1.0", // most pulled
        "100.0 MiB",                 // the budget
        "50.0%",                     // hit ratio: 3 hits of 6 answers
        &origin.url(),               // the endpoint
        "42 of 100 left",            // Docker Hub's rate-limit headers
        // The layer and config stored; bytes saved: them and the manifest once each.
        "id=\"blob-bytes\" class=\"num\">293.0 KiB<",
        "id=\"bytes-saved\" class=\"num\">293.4 KiB<",
        "<svg class=\"chart\"", // the charts
    ] {
        assert!(
            page.contains(expected),
            "the page lacks {expected:?}:\n{page}"
        );
    }
}

/// The sum of every series of a counter in the Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn json(mirror: &TestMirror, path: &str) -> serde_json::Value {
    let got = get(&mirror.url(path)).await;
    assert_eq!(got.status, StatusCode::OK, "{path}");
    assert_eq!(got.header("content-type"), Some("application/json"));
    got.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_reports_the_last_hour_use_savings_upstreams_and_popular_images() {
    let origin = FakeRegistry::start().await;
    let (mirror, _) = busy_mirror(&origin).await;
    let page = get(&mirror.url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_shows(&String::from_utf8_lossy(page.bytes()), &origin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_view_is_json_too_and_its_numbers_are_those_of_metrics() {
    let origin = FakeRegistry::start().await;
    let (mirror, _) = busy_mirror(&origin).await;
    let overview = json(&mirror, "/?format=json").await;
    // Read right after: it counts the JSON request too (each request is counted once
    // answered, so /metrics does not count itself).
    let metrics = String::from_utf8(get(&mirror.url("/metrics")).await.bytes().to_vec()).unwrap();
    let history = overview["history"].as_array().unwrap();
    assert!(!history.is_empty() && history.len() <= 61);
    let summed = |field: &str| -> f64 { history.iter().map(|m| m[field].as_f64().unwrap()).sum() };
    assert_eq!(
        summed("requests") + 1.0,
        metric_sum(&metrics, "regmirror_http_requests_total"),
        "every request in the history once"
    );
    let cache_bytes = metric_value(
        &metrics,
        "regmirror_served_bytes_total",
        &[("source", "cache")],
    );
    assert_eq!(summed("bytes_from_cache"), cache_bytes);
    assert_eq!(
        overview["savings"]["bytes_from_cache"].as_f64(),
        Some(cache_bytes)
    );
    let fetched = metric_sum(&metrics, "regmirror_upstream_bytes_total");
    assert!(fetched >= 300_000.0);
    assert_eq!(summed("bytes_from_upstream"), fetched);
    assert_eq!(overview["savings"]["bytes_fetched"].as_f64(), Some(fetched));
    let outcome = |o: &str| {
        metric_value(
            &metrics,
            "regmirror_cache_requests_total",
            &[("kind", "blob"), ("outcome", o)],
        ) + metric_value(
            &metrics,
            "regmirror_cache_requests_total",
            &[("kind", "manifest"), ("outcome", o)],
        )
    };
    assert_eq!(overview["savings"]["hits"].as_f64(), Some(outcome("hit")));
    assert_eq!(
        overview["savings"]["misses"].as_f64(),
        Some(outcome("miss"))
    );
    assert_eq!((summed("hits"), summed("misses")), (3.0, 3.0));
    assert_eq!(overview["savings"]["hit_ratio"], 50.0);
    assert_eq!(
        overview["disk"]["used_bytes"].as_f64(),
        Some(metric_value(&metrics, "regmirror_cache_size_bytes", &[]))
    );
    assert_eq!(overview["disk"]["budget_bytes"], 100 * 1024 * 1024);
    assert_eq!(
        overview["most_pulled"][0]["image"],
        "docker.io/library/app:1.0"
    );
    assert_eq!(overview["most_pulled"][0]["pulls"], 2);
    assert_eq!(overview["upstreams"][0]["rate_limit"]["remaining"], 42);
    // Asked for by Accept, the same view; a browser's Accept gets HTML.
    let by_accept = request(
        Method::GET,
        &mirror.url("/"),
        &[("accept", "application/json")],
    )
    .await;
    assert_eq!(by_accept.json()["savings"], overview["savings"]);
    let browser = request(
        Method::GET,
        &mirror.url("/upstreams"),
        &[(
            "accept",
            "text/html,application/xhtml+xml,application/json;q=0.9,*/*;q=0.8",
        )],
    )
    .await;
    assert_eq!(
        browser.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    for path in [
        "/browse?format=json",
        "/downloads?format=json",
        "/upstreams?format=json",
    ] {
        json(&mirror, path).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsing_lists_registries_repositories_and_tags_filtered_sorted_and_paginated() {
    let origin = FakeRegistry::start().await;
    let (mirror, manifest) = busy_mirror(&origin).await;
    // 55 more tags of another repository, pulled in order: t54 last.
    let other = origin.add_empty_image("library/other", "t0");
    // Pull times are kept in seconds: t54 a second after the others, the application a
    // second after t54.
    let second = std::time::Duration::from_millis(1100);
    for n in 0..55 {
        let tag = format!("t{n}");
        let manifest = schema2_manifest(&Digest::of(b"{}"), 2, &[]);
        origin.add_manifest("library/other", Some(&tag), DOCKER_MANIFEST, manifest);
        if n == 54 {
            tokio::time::sleep(second).await;
        }
        let got = get_manifest(&mirror.url(&format!("/v2/library/other/manifests/{tag}"))).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    tokio::time::sleep(second).await;
    get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;

    let registries = json(&mirror, "/browse?format=json").await;
    assert_eq!(registries["level"], "registries");
    assert_eq!(registries["registries"][0]["registry"], "docker.io");
    assert_eq!(registries["registries"][0]["repositories"], 2);
    assert_eq!(registries["registries"][0]["pulls"], 3 + 55);

    let repos = json(&mirror, "/browse?registry=docker.io&format=json").await;
    assert_eq!(
        repos["rows"][0]["repository"], "library/app",
        "most recently pulled first"
    );
    assert_eq!(repos["rows"][0]["pulls"], 3);
    assert_eq!(repos["rows"][1]["repository"], "library/other");
    assert_eq!(repos["rows"][1]["tags"], 55);

    let tags = json(
        &mirror,
        "/browse?registry=docker.io&repo=library/other&format=json",
    )
    .await;
    assert_eq!(
        (tags["total"].as_u64(), tags["pages"].as_u64()),
        (Some(55), Some(2))
    );
    assert_eq!(tags["rows"].as_array().unwrap().len(), 50);
    assert_eq!(tags["rows"][0]["tag"], "t54", "most recently pulled first");
    assert_eq!(tags["rows"][0]["digest"], other.to_string());
    let second = json(
        &mirror,
        "/browse?registry=docker.io&repo=library/other&page=2&format=json",
    )
    .await;
    assert_eq!(second["rows"].as_array().unwrap().len(), 5);
    let by_name = json(
        &mirror,
        "/browse?registry=docker.io&repo=library/other&sort=name&format=json",
    )
    .await;
    assert_eq!(by_name["rows"][0]["tag"], "t0");
    let filtered = json(
        &mirror,
        "/browse?registry=docker.io&repo=library/other&filter=T5&format=json",
    )
    .await;
    assert_eq!(filtered["total"], 6, "t5 and t50 to t54");

    let app = json(
        &mirror,
        "/browse?registry=docker.io&repo=library/app&format=json",
    )
    .await;
    let row = &app["rows"][0];
    assert_eq!(row["tag"], "1.0");
    assert_eq!(
        row["digest"],
        manifest.to_string(),
        "the digest the origin has"
    );
    assert_eq!(row["platforms"], serde_json::json!(["linux/arm64/v8"]));
    let config_len = br#"{"os":"linux","architecture":"arm64","variant":"v8"}"#.len() as u64;
    assert_eq!(row["bytes"].as_u64(), Some(300_000 + config_len));
    assert_eq!(row["pulls"], 3);
    assert_eq!(row["pinned"], true);
    let unpinned = json(
        &mirror,
        "/browse?registry=docker.io&repo=library/other&format=json",
    )
    .await;
    assert_eq!(unpinned["rows"][0]["pinned"], false);
    assert!(row["confirmed_at"].as_u64().unwrap() > 1_700_000_000);
    let html = get(&mirror.url("/browse?registry=docker.io&repo=library/app")).await;
    let html = String::from_utf8_lossy(html.bytes());
    for expected in [
        "linux/arm64/v8",
        "<td>pinned</td>",
        &manifest.to_string()[..19],
        "293.0 KiB",
    ] {
        assert!(
            html.contains(expected),
            "the tags page lacks {expected:?}:\n{html}"
        );
    }
    let page = get(&mirror.url("/browse?registry=docker.io&repo=library/other")).await;
    let page = String::from_utf8_lossy(page.bytes());
    assert!(
        page.contains("page 1 of 2") && page.contains("rel=\"next\""),
        "{page}"
    );
    let missing = get(&mirror.url("/browse?registry=docker.io&repo=library/none")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json()["errors"][0]["code"], "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_in_progress_shows_its_progress_source_and_clients() {
    let origin = FakeRegistry::start().await;
    let layer = origin.add_blob(random_bytes(300_000, 7));
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    origin.knobs(|k| k.stall_after = Some(100_000));
    let client = tokio::spawn({
        let url = mirror.url(&format!("/v2/library/app/blobs/{layer}"));
        async move { start_get(&url).await }
    });
    let mut seen = serde_json::Value::Null;
    for _ in 0..100 {
        seen = json(&mirror, "/downloads?format=json").await;
        if seen["downloads"][0]["bytes"] == 100_000 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let download = &seen["downloads"][0];
    assert_eq!(download["bytes"], 100_000, "{seen}");
    assert_eq!(download["expected_bytes"], 300_000);
    assert_eq!(download["digest"], layer.to_string());
    assert_eq!(download["state"], "downloading");
    assert_eq!(download["source"], origin.url());
    assert_eq!(download["clients"], 1);
    let html = get(&mirror.url("/downloads")).await;
    let html = String::from_utf8_lossy(html.bytes());
    assert!(
        html.contains("width:33.3%") && html.contains("97.7 KiB of 293.0 KiB"),
        "{html}"
    );
    client.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_went_down_shows_it_on_its_hour() {
    let dead = DeadEndpoint::start().await;
    let origin = FakeRegistry::start().await;
    origin.add_empty_image("library/app", "1");
    let mirror = TestMirror::start_many(&[&dead.url(), &origin.url()], |_| {}).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1")).await;
    assert_eq!(got.status, StatusCode::OK, "from the second endpoint");
    let view = json(&mirror, "/upstreams?format=json").await;
    let endpoints = view["endpoints"].as_array().unwrap();
    assert_eq!(endpoints[0]["url"], dead.url());
    // Down, or probing once its first pause (a second) is over.
    assert_ne!(endpoints[0]["state"], "up");
    assert_eq!(endpoints[0]["changes"][0]["state"], "down");
    assert!(endpoints[0]["changes"][0]["error"].as_str().is_some());
    assert_eq!(endpoints[1]["state"], "up");
    assert_eq!(endpoints[1]["changes"], serde_json::json!([]));
    let html = get(&mirror.url("/upstreams")).await;
    let html = String::from_utf8_lossy(html.bytes());
    assert!(html.contains("class=\"s-down\""), "{html}");
}

fn chromium(args: &[&str], profile: &std::path::Path) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium (run tests/run.sh, which installs it)")
}

/// Runs chromium on a fresh profile, with JavaScript allowed or blocked by the profile's
/// content settings (as a user turns it off; `--blink-settings=scriptEnabled=false` would stop
/// chromium's own `--dump-dom` and `--screenshot` too).
async fn browser(args: Vec<String>, javascript: bool) -> String {
    let profile = tempfile::tempdir().unwrap();
    if !javascript {
        let settings = profile.path().join("Default");
        std::fs::create_dir_all(&settings).unwrap();
        std::fs::write(
            settings.join("Preferences"),
            r#"{"profile":{"default_content_setting_values":{"javascript":2}}}"#,
        )
        .unwrap();
    }
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        chromium(&args, profile.path())
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium: run tests/run.sh"]
async fn a_headless_browser_renders_every_page_with_javascript_on_and_off() {
    let origin = FakeRegistry::start().await;
    let (mirror, manifest) = busy_mirror(&origin).await;
    let overview = json(&mirror, "/?format=json").await;
    let pages = [
        ("overview", "/".to_string()),
        ("browse", "/browse?registry=docker.io".to_string()),
        (
            "tags",
            "/browse?registry=docker.io&repo=library/app".to_string(),
        ),
        ("downloads", "/downloads".to_string()),
        ("upstreams", "/upstreams".to_string()),
    ];
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&shots).unwrap();
    for (name, path) in pages {
        let url = mirror.url(&path);
        for javascript in [true, false] {
            let dom = browser(vec!["--dump-dom".to_string(), url.clone()], javascript).await;
            assert!(
                dom.contains("<h1>regmirror</h1>"),
                "{name}, JavaScript {javascript}: not rendered:\n{dom}"
            );
            // The pages that refresh themselves do it with a script when it runs (and the
            // browser ran it only when allowed), by reloading when not.
            if name != "browse" && name != "tags" {
                assert_eq!(
                    dom.contains("data-live=\"on\""),
                    javascript,
                    "{name}: JavaScript {javascript}"
                );
            }
            match name {
                "overview" => {
                    assert_shows(&dom, &origin);
                    // The figures the browser shows are those of the JSON view.
                    let ratio =
                        format!("{:.1}%", overview["savings"]["hit_ratio"].as_f64().unwrap());
                    assert!(dom.contains(&ratio), "{ratio}");
                    assert_eq!(dom.matches("<svg class=\"chart\"").count(), 4);
                }
                "browse" => assert!(dom.contains(">library/app<"), "{dom}"),
                "tags" => {
                    assert!(dom.contains(&manifest.to_string()), "{dom}");
                    assert!(dom.contains("linux/arm64/v8") && dom.contains("<td>pinned</td>"));
                }
                "downloads" => assert!(dom.contains("Nothing is downloading"), "{dom}"),
                _ => assert!(dom.contains(&origin.url()) && dom.contains("s-up"), "{dom}"),
            }
        }
        let shot = shots.join(format!("{name}.png"));
        let _ = std::fs::remove_file(&shot);
        browser(
            vec![
                "--window-size=1200,1000".into(),
                format!("--screenshot={}", shot.display()),
                url,
            ],
            false,
        )
        .await;
        let png = std::fs::read(&shot).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{name}: the screenshot is not a rendered page"
        );
        eprintln!("{name}: {}", shot.display());
    }
}
