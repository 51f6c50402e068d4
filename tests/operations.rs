//! Running it: graceful shutdown with bodies in flight, and logs that never carry a secret.

mod common;

use base64::Engine;
use common::e2e::{free_port, wait_until_up, Process};
use common::*;
use std::process::Command;
use std::sync::Arc;
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
    // Every client has its response headers (so its request was accepted) before shutdown.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(8);
    let mut in_flight = Vec::new();
    for target in [
        url.clone(),
        url.clone(),
        url.clone(),
        url.clone(),
        cached_url.clone(),
    ] {
        let started = started_tx.clone();
        in_flight.push(tokio::spawn(async move {
            let request = http::Request::get(&target)
                .body(http_body_util::Empty::new())
                .unwrap();
            let response = client()
                .request(request)
                .await
                .expect("accepted before shutdown");
            started.send(()).await.unwrap();
            use http_body_util::BodyExt;
            response
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .map_err(|e| e.to_string())
        }));
    }
    for _ in 0..5 {
        started_rx.recv().await.unwrap();
    }
    let addr = mirror.addr;
    let app = Arc::clone(&mirror.app);
    let stopping = tokio::spawn(mirror.stop());
    // The server stops its prefetcher right after it closes its listener.
    eventually("shutdown has begun", || app.prefetcher().stopped()).await;
    // No new connections once shutdown began.
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during shutdown"
    );
    let expected = [&blob, &blob, &blob, &blob, &cached];
    for (client, want) in in_flight.into_iter().zip(expected) {
        let body = client.await.unwrap();
        assert!(
            body.is_ok(),
            "a body in flight was cut short: {:?}",
            body.err()
        );
        assert!(body.unwrap()[..] == want[..]);
    }
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finished")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_a_download_its_client_left() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(1024 * 1024, 113);
    let digest = origin.add_blob(blob.clone());
    origin.knobs(|k| {
        k.chunk = Some(128 * 1024);
        k.chunk_delay = Some(Duration::from_millis(30));
    });
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let response = start_get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    assert_eq!(response.status(), http::StatusCode::OK);
    drop(response); // the client goes away; the download carries on
    let cache = mirror.cache_dir();
    let _dir = tokio::time::timeout(Duration::from_secs(10), mirror.stop())
        .await
        .expect("shutdown finished");
    let stored = std::fs::read(blob_path(&cache, &digest)).expect("the download was committed");
    assert!(stored[..] == blob[..]);
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
    // Clients authenticate to the mirror too: an htpasswd user and a static token.
    let client_password = "client-pa55-never-logged";
    let client_token = "client-token-never-logged-0123";
    let hash = bcrypt::hash(client_password, 4).unwrap();
    std::fs::write(dir.path().join("htpasswd"), format!("alice:{hash}\n")).unwrap();
    std::fs::write(dir.path().join("tokens"), format!("ci {client_token}\n")).unwrap();
    let client_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("alice:{client_password}"))
    );
    let client_bearer = format!("Bearer {client_token}");
    let mut issued_tokens: Vec<String> = Vec::new();
    for format in ["text", "json"] {
        let config = dir.path().join("c.toml");
        // The text run takes the upstream password from the file, the JSON run from the
        // environment.
        let password_line = if format == "text" {
            format!("password = \"{password}\"")
        } else {
            "password_env = \"REGMIRROR_TEST_UPSTREAM_PASSWORD\"".to_string()
        };
        std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n[log]\nlevel = \"trace\"\n\
             [auth]\nhtpasswd = {:?}\ntokens_file = {:?}\n\
             [[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\nurl = \"{}\"\nusername = \"mirror\"\n{password_line}\n",
            dir.path().join(format!("cache-{format}")).display().to_string(),
            dir.path().join("htpasswd").display().to_string(),
            dir.path().join("tokens").display().to_string(),
            origin.url()
        ),
    )
    .unwrap();
        let shown = Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["check-config", "--config"])
            .arg(&config)
            .env("REGMIRROR_TEST_UPSTREAM_PASSWORD", password)
            .output()
            .unwrap();
        assert!(shown.status.success(), "{shown:?}");
        let shown = String::from_utf8_lossy(&shown.stdout);
        for secret in [password, client_token, hash.as_str()] {
            assert!(
                !shown.contains(secret),
                "check-config shows {secret:?}:\n{shown}"
            );
        }
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
                .env_remove("RUST_LOG")
                .env("REGMIRROR_TEST_UPSTREAM_PASSWORD", password),
            log.clone(),
        );
        wait_until_up(&format!("http://127.0.0.1:{port}/healthz"), &mirror).await;
        let base = format!("http://127.0.0.1:{port}/v2/library/app");
        let manifest = request(
            http::Method::GET,
            &format!("{base}/manifests/1.0"),
            &[
                ("accept", DOCKER_MANIFEST),
                ("authorization", &client_basic),
            ],
        )
        .await;
        assert_eq!(manifest.status, http::StatusCode::OK);
        let blob = request(
            http::Method::GET,
            &format!("{base}/blobs/{layer}"),
            &[("authorization", &client_bearer)],
        )
        .await;
        assert_eq!(blob.status, http::StatusCode::OK);
        // The token service's answer is a secret too.
        let issued = request(
            http::Method::GET,
            &format!("http://127.0.0.1:{port}/token?service=regmirror"),
            &[("authorization", &client_basic)],
        )
        .await;
        let issued = issued.json()["token"].as_str().unwrap().to_string();
        let with_issued = request(
            http::Method::GET,
            &format!("{base}/blobs/{layer}"),
            &[("authorization", &format!("Bearer {issued}"))],
        )
        .await;
        assert_eq!(with_issued.status, http::StatusCode::OK);
        issued_tokens.push(issued);
        let wrong = request(
            http::Method::GET,
            &format!("{base}/blobs/{layer}"),
            &[("authorization", "Bearer wrong-token-never-logged")],
        )
        .await;
        assert_eq!(wrong.status, http::StatusCode::UNAUTHORIZED);
        // A raw token without a scheme, and a password typed as the user name.
        for value in [
            "raw-token-never-logged".to_string(),
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode("swapped-secret-never-logged:alice")
            ),
        ] {
            let refused = request(
                http::Method::GET,
                &format!("{base}/blobs/{layer}"),
                &[("authorization", &value)],
            )
            .await;
            assert_eq!(refused.status, http::StatusCode::UNAUTHORIZED);
        }
        mirror.terminate(Duration::from_secs(10));
        let text = std::fs::read_to_string(&log).unwrap();
        // Lines are written by a thread of their own: every one is out when the process ends.
        let pulls = text
            .lines()
            .filter(|l| l.contains("regmirror::access") && l.contains("/v2/library/app/"))
            .count();
        assert_eq!(pulls, 6, "one access line per request ({format}):\n{text}");
        let blob_line = text
            .lines()
            .find(|l| l.contains("regmirror::access") && l.contains("/blobs/"))
            .unwrap_or_else(|| panic!("no access line for the blob ({format}):\n{text}"));
        for field in ["miss", "200", &origin.url()] {
            assert!(
                blob_line.contains(field),
                "the access line lacks {field:?}: {blob_line}"
            );
        }
        let basic = "bWlycm9yOnBhNTUtdzByZC1uZXZlci1sb2dnZWQ"; // base64 of mirror:<password>, unpadded prefix
        let client_basic_value = client_basic.trim_start_matches("Basic ");
        for secret in [
            password,
            "tok-default",
            basic,
            client_password,
            client_token,
            client_basic_value,
            "wrong-token-never-logged",
            "raw-token-never-logged",
            "swapped-secret-never-logged",
            hash.as_str(),
            issued_tokens.last().unwrap().as_str(),
        ] {
            assert!(
                !text.contains(secret),
                "{secret:?} appears in the {format} log: {}",
                text.lines()
                    .find(|l| l.contains(secret))
                    .unwrap_or_default()
            );
        }
    }
    // The token flow did happen (so the check above means something).
    assert!(origin.hits("GET", "/token") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_upstreams_for_new_requests_while_downloads_continue() {
    let first = FakeRegistry::start().await;
    let second = FakeRegistry::start().await;
    let blob = random_bytes(3 * 1024 * 1024, 113);
    let digest = first.add_blob(blob.clone());
    first.knobs(|k| {
        k.chunk = Some(128 * 1024);
        k.chunk_delay = Some(Duration::from_millis(25));
    });
    let tag_digest = second.add_empty_image("library/app", "1.0");
    let mirror = TestMirror::start(&first.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    let download = tokio::spawn(async move { get(&url).await });
    eventually("the download is under way", || {
        mirror.app.cache().fills_in_flight() == 1
    })
    .await;

    let mut next = mirror.app.config().clone();
    next.registry[0].upstream = vec![test_upstream(&second.url())];
    next.cache.tag_ttl = Duration::from_secs(5);
    mirror
        .live
        .reload(next.clone())
        .expect("a valid configuration is applied");
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(
        got.header("docker-content-digest"),
        Some(tag_digest.to_string().as_str())
    );
    assert_eq!(first.hits("GET", "/v2/library/app/manifests/1.0"), 0);

    // An invalid configuration is refused and the running one stays.
    let mut broken = next.clone();
    broken.registry[0].upstream[0].url = "ftp://nowhere".into();
    assert!(mirror.live.reload(broken).is_err());
    assert_eq!(
        mirror.live.get().config().registry[0].upstream[0].url,
        second.url()
    );

    let got = download.await.unwrap();
    assert!(
        got.body.is_ok(),
        "the download in flight broke: {:?}",
        got.body.err()
    );
    assert!(got.bytes()[..] == blob[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_reorders_registries_never_answers_a_tag_from_another() {
    let docker = FakeRegistry::start().await;
    let ghcr = FakeRegistry::start().await;
    let quay = FakeRegistry::start().await;
    let image = |origin: &FakeRegistry, config: &[u8]| {
        let config = origin.add_blob(config.to_vec());
        let manifest = schema2_manifest(&config, 2, &[]);
        origin.add_manifest("owner/app", Some("1.0"), DOCKER_MANIFEST, manifest)
    };
    let on_ghcr = image(&ghcr, b"{\"g\":1}");
    let on_quay = image(&quay, b"{\"q\":1}");
    assert_ne!(on_ghcr, on_quay);
    let mirror = TestMirror::start(&docker.url(), |c| {
        c.cache.tag_ttl = Duration::from_secs(60);
        c.registry.push(regmirror::config::RegistryConfig::new(
            "ghcr.io",
            false,
            vec![test_upstream(&ghcr.url())],
        ));
    })
    .await;
    let tag_url = |registry: &str| mirror.url(&format!("/v2/{registry}/owner/app/manifests/1.0"));
    let digest_of = |got: &Got| got.header("docker-content-digest").map(str::to_string);
    let got = get_manifest(&tag_url("ghcr.io")).await;
    assert_eq!(digest_of(&got), Some(on_ghcr.to_string()));

    // quay.io takes ghcr.io's place in the list; ghcr.io's answer, cached for a minute, stays.
    let mut next = mirror.app.config().clone();
    next.registry.insert(
        1,
        regmirror::config::RegistryConfig::new("quay.io", false, vec![test_upstream(&quay.url())]),
    );
    mirror.live.reload(next).expect("a valid configuration");
    let got = get_manifest(&tag_url("quay.io")).await;
    assert_eq!(
        digest_of(&got),
        Some(on_quay.to_string()),
        "another registry's tag"
    );
    let got = get_manifest(&tag_url("ghcr.io")).await;
    assert_eq!(digest_of(&got), Some(on_ghcr.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_and_refuses_a_broken_one() {
    let first = FakeRegistry::start().await;
    let second = FakeRegistry::start().await;
    let config_blob = first.add_blob(b"{}".to_vec());
    second.add_blob(b"{}".to_vec());
    let one = first.add_manifest(
        "library/app",
        Some("1.0"),
        DOCKER_MANIFEST,
        schema2_manifest(&config_blob, 2, &[]),
    );
    let two = second.add_manifest(
        "library/app",
        Some("1.0"),
        DOCKER_MANIFEST,
        schema2_manifest(&config_blob, 3, &[]),
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = dir.path().join("c.toml");
    let write = |upstream: &str| {
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\ntag_ttl = \"0s\"\n\
                 [[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\nurl = \"{upstream}\"\n",
                dir.path().join("cache").display().to_string()
            ),
        )
        .unwrap()
    };
    write(&first.url());
    let log = dir.path().join("serve.log");
    let mirror = Process::spawn(
        "regmirror",
        Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["serve", "--config"])
            .arg(&path),
        log.clone(),
    );
    wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
    let tag = format!("http://127.0.0.1:{port}/v2/library/app/manifests/1.0");
    let digest_of = |got: Got| got.header("docker-content-digest").unwrap().to_string();
    assert_eq!(digest_of(get_manifest(&tag).await), one.to_string());

    let hup = |pid: u32| {
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
    };
    write(&second.url());
    assert!(hup(mirror.pid()).success());
    let mut switched = false;
    for _ in 0..100 {
        if digest_of(get_manifest(&tag).await) == two.to_string() {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        switched,
        "SIGHUP did not apply the new upstream:\n{}",
        mirror.output()
    );

    std::fs::write(&path, "[server]\nlisten = 5\n").unwrap();
    assert!(hup(mirror.pid()).success());
    eventually("the refusal is logged", || {
        mirror.output().contains("configuration reload refused")
    })
    .await;
    assert_eq!(
        digest_of(get_manifest(&tag).await),
        two.to_string(),
        "a broken file replaced the running config"
    );
}
