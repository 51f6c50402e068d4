//! The status page at `/`: what it shows after some pulls, read by plain HTTP and rendered by a
//! real headless browser (Debian's chromium), with a screenshot saved in the test output.

mod common;

use common::*;
use http::StatusCode;
use std::process::Command;

/// A mirror that served an image twice (one miss, one hit) and its layer twice.
async fn busy_mirror(origin: &FakeRegistry) -> TestMirror {
    let layer = origin.add_blob(random_bytes(300_000, 120));
    let config = origin.add_blob(b"{}".to_vec());
    origin.add_manifest(
        "library/app",
        Some("1.0"),
        DOCKER_MANIFEST,
        schema2_manifest(&config, 2, &[(layer.clone(), 300_000)]),
    );
    origin.knobs(|k| k.rate_limit_headers = true);
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.max_size = Some(100 * 1024 * 1024);
        // Only what the test asks for is fetched.
        c.cache.prefetch_downloads = 0;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            get_manifest(&mirror.url("/v2/library/app/manifests/1.0"))
                .await
                .status,
            StatusCode::OK
        );
        assert_eq!(
            get(&mirror.url(&format!("/v2/library/app/blobs/{layer}")))
                .await
                .status,
            StatusCode::OK
        );
    }
    // The layer is committed just after its last byte reached the client.
    mirror.settle().await;
    mirror
}

fn assert_shows(page: &str, origin: &FakeRegistry) {
    for expected in [
        "docker.io/library/app:1.0", // most pulled
        "100.0 MiB",                 // the budget
        "50.0%",                     // hit ratio: 2 hits of 4 answers
        &origin.url(),               // the endpoint
        "42 of 100 left",            // Docker Hub's rate-limit headers
        // The layer stored; bytes saved: the layer and the manifest once each from cache.
        "id=\"blob-bytes\" class=\"num\">293.0 KiB<",
        "id=\"bytes-saved\" class=\"num\">293.4 KiB<",
    ] {
        assert!(
            page.contains(expected),
            "the status page lacks {expected:?}:\n{page}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_reports_use_savings_upstreams_and_popular_images() {
    let origin = FakeRegistry::start().await;
    let mirror = busy_mirror(&origin).await;
    let page = get(&mirror.url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_shows(&String::from_utf8_lossy(page.bytes()), &origin);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium: run tests/run.sh"]
async fn a_headless_browser_renders_the_status_page() {
    let origin = FakeRegistry::start().await;
    let mirror = busy_mirror(&origin).await;
    let url = mirror.url("/");
    let profile = tempfile::tempdir().unwrap();
    let dom = tokio::task::spawn_blocking({
        let (url, profile) = (url.clone(), profile.path().to_owned());
        move || chromium(&["--dump-dom", &url], &profile)
    })
    .await
    .unwrap();
    assert!(
        dom.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.contains("<h1>regmirror</h1>"), "not rendered:\n{dom}");
    assert_shows(&dom, &origin);

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = tokio::task::spawn_blocking({
        let (url, profile, shot) = (url.clone(), profile.path().to_owned(), shot.clone());
        move || {
            chromium(
                &[
                    "--window-size=1100,900",
                    &format!("--screenshot={}", shot.display()),
                    &url,
                ],
                &profile,
            )
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "chromium screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot is not a rendered page"
    );
    eprintln!("status page screenshot: {}", shot.display());
}
