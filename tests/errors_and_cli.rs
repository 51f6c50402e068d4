//! Error answers clients understand, restart with a warm cache, and the command line.

mod common;

use common::*;
use http::{Method, StatusCode};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_oci_errors_and_never_touches_the_cache() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let cases: &[(Method, &str, StatusCode, &str)] = &[
        (
            Method::GET,
            "/v2/UPPER/manifests/1",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/a/manifests/-bad",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/a/manifests/.INVALID",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/a/blobs/sha256:1234",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/a/blobs/md5:1234",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/a/blobs/sha256:..%2F..%2Fetc%2Fpasswd",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            Method::PUT,
            "/v2/a/manifests/1",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::POST,
            "/v2/a/blobs/uploads/",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            "/v2/a/manifests/1",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::PATCH,
            "/v2/a/blobs/uploads/x",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
        (
            Method::GET,
            "/v2/a/other/1",
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/a/manifests/1?ns=quay.io",
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
        (
            Method::GET,
            "/nothing/here",
            StatusCode::NOT_FOUND,
            "NAME_UNKNOWN",
        ),
    ];
    for (method, path, status, code) in cases {
        let got = request(method.clone(), &mirror.url(path), &[]).await;
        assert_eq!(got.status, *status, "{method} {path}");
        assert_eq!(
            got.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
        assert_eq!(got.json()["errors"][0]["code"], *code, "{method} {path}");
    }
    let head = request(Method::HEAD, &mirror.url("/v2/a/manifests/.INVALID"), &[]).await;
    assert_eq!(head.status, StatusCode::NOT_FOUND);
    assert_eq!(
        origin.authorizations().len(),
        0,
        "bad input reached upstream"
    );
    assert_eq!(mirror.temp_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_base_health_and_namespace_echo() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let base = get(&mirror.url("/v2/")).await;
    assert_eq!(base.status, StatusCode::OK);
    assert_eq!(
        base.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    assert_eq!(&base.bytes()[..], b"{}");
    assert_eq!(get(&mirror.url("/healthz")).await.status, StatusCode::OK);
    assert_eq!(get(&mirror.url("/readyz")).await.status, StatusCode::OK);
    // containerd's ?ns= is understood and echoed.
    origin.add_empty_image("library/app", "1");
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1?ns=docker.io")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.header("oci-namespace"), Some("docker.io"));
    let catalog = get(&mirror.url("/v2/_catalog")).await;
    assert_eq!(catalog.json()["repositories"][0], "library/app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_503_for_uncached_content() {
    // A port that refuses connections.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mirror = TestMirror::start(&format!("http://{closed}"), |_| {}).await;
    let digest = regmirror::digest::Digest::of(b"x");
    for path in [
        "/v2/library/app/manifests/1.0".to_string(),
        format!("/v2/library/app/blobs/{digest}"),
        format!("/v2/library/app/manifests/{digest}"),
    ] {
        let got = get_manifest(&mirror.url(&path)).await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
        assert_eq!(got.json()["errors"][0]["code"], "UNAVAILABLE");
    }
    assert_eq!(mirror.temp_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_mirror_serves_its_cache_without_upstream() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(100_000, 12);
    let digest = origin.add_blob(blob.clone());
    let config = origin.add_blob(b"{}".to_vec());
    let manifest = schema2_manifest(&config, 2, &[(digest.clone(), blob.len())]);
    let manifest_digest = origin.add_manifest("library/app", Some("1"), DOCKER_MANIFEST, manifest);
    let first = TestMirror::start(&origin.url(), |_| {}).await;
    assert_eq!(
        get_manifest(&first.url("/v2/library/app/manifests/1"))
            .await
            .status,
        StatusCode::OK
    );
    assert!(
        get(&first.url(&format!("/v2/library/app/blobs/{digest}")))
            .await
            .bytes()[..]
            == blob[..]
    );
    let cache = first.cache_dir();
    let mut config = first.app.config().clone();
    let dir = first.stop().await;
    // Leftovers of a crash mid-download are purged at start-up.
    std::fs::write(cache.join("tmp/partial-download"), b"junk").unwrap();
    origin.knobs(|k| k.fail_status = Some(500));
    config.cache.dir = cache.clone();
    let second = TestMirror::start_with(config, dir).await;
    assert_eq!(second.temp_files(), 0);
    let got = get(&second.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    assert!(got.bytes()[..] == blob[..]);
    let got = get_manifest(&second.url("/v2/library/app/manifests/1")).await;
    assert_eq!(got.status, StatusCode::OK);
    got.assert_content(&manifest_digest);
    assert!(got.header("warning").is_some());
}

fn regmirror(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("pw");
    std::fs::write(&secret_file, "s3cret-from-file\n").unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:5999\"\n[[registry]]\nname = \"docker.io\"\ndefault = true\n\
             [[registry.upstream]]\nurl = \"https://registry-1.docker.io\"\nusername = \"me\"\npassword_file = {:?}\n",
            secret_file.display()
        ),
    )
    .unwrap();
    let out = regmirror(&["check-config", "--config", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("127.0.0.1:5999"));
    assert!(stdout.contains("<redacted>"));
    assert!(!stdout.contains("s3cret-from-file"));

    std::fs::write(&path, "[cache]\ndirectory = \"/x\"\n").unwrap();
    let out = regmirror(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("directory"));

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    assert!(regmirror(&["check-config", "--config", example])
        .status
        .success());
}
