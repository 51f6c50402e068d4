//! Running it: graceful shutdown with bodies in flight, and logs that never carry a secret.

mod common;

use common::e2e::{free_port, wait_until_up, Process};
use common::*;
use std::process::Command;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_bodies_in_flight_finish() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(4 * 1024 * 1024, 110);
    let cached = random_bytes(2 * 1024 * 1024, 111);
    let digest = origin.add_blob(blob.clone());
    let cached_digest = origin.add_blob(cached.clone());
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let cached_url = mirror.url(&format!("/v2/library/app/blobs/{cached_digest}"));
    assert!(get(&cached_url).await.bytes()[..] == cached[..]);
    // Now a slow upstream: the miss takes about a second.
    origin.knobs(|k| {
        k.chunk = Some(128 * 1024);
        k.chunk_delay = Some(Duration::from_millis(30));
    });
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    let mut in_flight = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        in_flight.push(tokio::spawn(async move { get(&url).await }));
    }
    let cached_client = tokio::spawn(async move { get(&cached_url).await });
    eventually("the download is under way", || {
        mirror.app.cache().fills_in_flight() == 1
    })
    .await;
    let addr = mirror.addr;
    let stopping = tokio::spawn(mirror.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // No new connections once shutdown began.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during shutdown"
    );
    for client in in_flight {
        let got = client.await.unwrap();
        assert!(
            got.body.is_ok(),
            "a body in flight was cut short: {:?}",
            got.body.err()
        );
        assert!(got.bytes()[..] == blob[..]);
    }
    assert!(cached_client.await.unwrap().bytes()[..] == cached[..]);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finished")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_tokens_never_reach_the_logs() {
    let origin = FakeRegistry::start().await;
    let config_blob = origin.add_blob(b"{}".to_vec());
    let layer = origin.add_blob(random_bytes(10_000, 112));
    let manifest = schema2_manifest(&config_blob, 2, &[(layer.clone(), 10_000)]);
    origin.add_manifest("library/app", Some("1.0"), DOCKER_MANIFEST, manifest);
    origin.knobs(|k| k.require_token = true);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let password = "pa55-w0rd-never-logged";
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n[log]\nlevel = \"trace\"\n\
             [[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\nurl = \"{}\"\nusername = \"mirror\"\npassword = \"{password}\"\n",
            dir.path().join("cache").display().to_string(),
            origin.url()
        ),
    )
    .unwrap();
    for format in ["text", "json"] {
        let log = dir.path().join(format!("{format}.log"));
        let mut mirror = Process::spawn(
            "regmirror",
            Command::new(env!("CARGO_BIN_EXE_regmirror"))
                .args(["serve", "--config"])
                .arg(&config)
                .args(if format == "json" {
                    vec!["--log-json"]
                } else {
                    vec![]
                })
                .env_remove("RUST_LOG"),
            log.clone(),
        );
        wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
        let base = format!("http://127.0.0.1:{port}/v2/library/app");
        assert_eq!(
            get_manifest(&format!("{base}/manifests/1.0")).await.status,
            http::StatusCode::OK
        );
        assert_eq!(
            get(&format!("{base}/blobs/{layer}")).await.status,
            http::StatusCode::OK
        );
        mirror.terminate(Duration::from_secs(10));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("regmirror::access"),
            "no access log line ({format}):\n{text}"
        );
        let basic = "bWlycm9yOnBhNTUtdzByZC1uZXZlci1sb2dnZWQ"; // base64 of mirror:<password>, unpadded prefix
        for secret in [password, "tok-default", basic] {
            assert!(
                !text.contains(secret),
                "{secret:?} appears in the {format} log"
            );
        }
    }
    // The token flow did happen (so the check above means something).
    assert!(origin.hits("GET", "/token") >= 1);
}
