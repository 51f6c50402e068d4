//! End to end, upstream trouble with the real parts: Debian's `docker-registry` as the only
//! upstream is stopped and started again, and dockerd, containerd and podman pull through the
//! mirror right after; a LAN registry whose token service runs on another port of the same host
//! serves a private image through the mirror's credentials. Ignored by a plain `cargo test`;
//! `tests/run.sh` installs the tools and runs them.

mod common;

use common::e2e::*;
use common::get_manifest;
use common::token_service::TokenService;
use http::StatusCode;
use regmirror::digest::Digest;
use std::process::Command;
use std::time::{Duration, Instant};

/// The access log lines for manifests of `repo`, as `(status, line)`.
fn manifest_answers(log: &str, repo: &str) -> Vec<(String, String)> {
    log.lines()
        .filter(|l| l.contains("regmirror::access"))
        .filter(|l| l.contains(&format!("path=/v2/{repo}/manifests/")))
        .filter_map(|l| {
            let status = l.split("status=").nth(1)?.split_whitespace().next()?;
            Some((status.to_string(), l.to_string()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, docker.io (dockerd), containerd and podman: run tests/run.sh"]
async fn an_origin_back_after_two_seconds_serves_every_client_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut origin = Origin::start(d).await;
    let for_docker = seed_repo(&origin, "library/e2e").await;
    let for_ctr = seed_repo(&origin, "library/ctr").await;
    let for_podman = seed_repo(&origin, "library/pod").await;
    let mirror = Mirror::start(d, &origin.url()).await;
    // Every client is up and configured before the origin goes.
    let (_dockerd, socket) = start_dockerd(d, &mirror.host()).await;
    let hosts = d.join("certs.d");
    install_example("containerd/certs.d", &hosts, &mirror.host());
    let containerd = Containerd::start(d).await;
    let conf = d.join("registries.conf");
    install_example("podman/registries.conf", &conf, &mirror.host());

    origin.stop();
    let stopped = Instant::now();
    // The mirror finds it down (these clients would fall back to the origin): twice, so that it
    // backs off for a while.
    let nothing = format!("http://{}/v2/library/nothing/manifests/1", mirror.host());
    for _ in 0..2 {
        assert_eq!(
            get_manifest(&nothing).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(stopped.elapsed())).await;
    origin.start_again("").await;
    let back = Instant::now();

    let unknown = get_manifest(&nothing).await;
    assert_eq!(
        unknown.status,
        StatusCode::NOT_FOUND,
        "unknown names are 404 again"
    );
    assert!(
        back.elapsed() < Duration::from_secs(1),
        "404 only after {:?}",
        back.elapsed()
    );
    run(
        "docker pull",
        Command::new("/usr/bin/docker").args(["-H", &socket, "pull", "e2e:oci"]),
    );
    let hosts_dir = hosts.display().to_string();
    run(
        "ctr images pull",
        &mut containerd.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            &hosts_dir,
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            "docker.io/library/ctr:oci",
        ]),
    );
    run(
        "podman pull",
        podman(d).env("CONTAINERS_REGISTRIES_CONF", &conf).args([
            "pull",
            "--arch",
            "amd64",
            "docker.io/library/pod:oci",
        ]),
    );
    println!(
        "three pulls done {:?} after the origin was back",
        back.elapsed()
    );
    // Each went through the mirror (the origin these clients would fall back to is unreachable
    // here), and the mirror answered each manifest request it got.
    let log = mirror.process.output();
    for (repo, image) in [
        ("library/e2e", &for_docker),
        ("library/ctr", &for_ctr),
        ("library/pod", &for_podman),
    ] {
        let answers = manifest_answers(&log, repo);
        assert!(
            !answers.is_empty(),
            "{repo} never reached the mirror:\n{log}"
        );
        for (status, line) in &answers {
            assert_eq!(status, "200", "{line}");
        }
        assert!(mirror.stores(&image.oci_index).await, "{repo}");
        assert!(mirror.stores(&image.oci_amd64.1).await, "{repo}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and skopeo: run tests/run.sh"]
async fn skopeo_pulls_a_private_image_from_a_lan_registry_with_its_token_service_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut origin = Origin::start(d).await;
    let image = seed_repo(&origin, "team/private").await;
    // Token auth switched on: the token service runs on another port of the same host, both
    // plain http, as on a LAN.
    let tokens = TokenService::start(d, "mirror", "lan-s3cret").await;
    origin.start_again(&tokens.registry_yaml()).await;
    let anonymous = common::get(&format!("{}/v2/team/private/tags/list", origin.url())).await;
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "the registry requires a token"
    );

    let config = d.join("regmirror.toml");
    let mirror = Mirror::start(d, &origin.url()).await;
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "resolve_tags = true\n",
            "resolve_tags = true\nusername = \"mirror\"\npassword = \"lan-s3cret\"\n",
        ),
    )
    .unwrap();
    let pid = mirror.process.pid().to_string();
    run("kill -HUP", Command::new("kill").args(["-HUP", &pid]));
    let log_has_reload = || mirror.process.output().contains("configuration reloaded");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log_has_reload() {
        assert!(Instant::now() < deadline, "{}", mirror.process.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let layout = d.join("layout");
    let image_ref = format!("{}/team/private:oci", mirror.host());
    skopeo_copy_amd64("skopeo copy through the mirror", &image_ref, &layout, "oci");
    // Every blob in the layout is what its name says; the image is the origin's.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let copied: Digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(copied, image.oci_amd64.0, "skopeo got another manifest");
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            Digest::of(&bytes).hex(),
            entry.file_name().to_string_lossy()
        );
    }
    assert!(mirror.stores(&image.oci_amd64.1).await);
    // The mirror's credentials went to the token service beside the registry.
    let basic = "Basic bWlycm9yOmxhbi1zM2NyZXQ="; // mirror:lan-s3cret
    let asked = tokens.authorizations();
    assert!(
        asked.iter().any(|a| a.as_deref() == Some(basic)),
        "{asked:?}"
    );
    assert!(
        !mirror
            .process
            .output()
            .contains("asking for an anonymous token"),
        "{}",
        mirror.process.output()
    );
}
