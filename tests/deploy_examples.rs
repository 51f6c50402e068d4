//! The client configuration examples in `deploy/clients/` point at routes a mirror configured
//! like `config.example.toml` really serves: each is turned into the requests its client sends
//! and answered by a mirror (the end-to-end tests then use the same files with real clients).

mod common;

use common::*;
use http::StatusCode;
use regmirror::config::Config;
use std::path::Path;

const EXAMPLE_HOST: &str = "mirror.lan:5000";

fn deploy(path: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/clients")
            .join(path),
    )
    .unwrap()
}

/// A mirror configured with config.example.toml's registries, each served by `origin`.
async fn example_mirror(origin: &FakeRegistry) -> TestMirror {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap();
    let example = Config::parse(&text).unwrap();
    TestMirror::start(&origin.url(), |c| {
        c.registry = example.registry.clone();
        for registry in &mut c.registry {
            registry.upstream = vec![test_upstream(&origin.url())];
        }
    })
    .await
}

/// Asks the mirror as a client would, through the example's mirror host and path.
async fn pull_tag(mirror: &TestMirror, example_base: &str, repo: &str, query: &str) -> StatusCode {
    let base = example_base.replace(EXAMPLE_HOST, &mirror.addr.to_string());
    let base = if base.starts_with("http") {
        base
    } else {
        format!("http://{base}")
    };
    let path_prefix = base
        .trim_end_matches('/')
        .splitn(4, '/')
        .nth(3)
        .map(|p| format!("/{p}"))
        .unwrap_or_default();
    let url = format!(
        "http://{}/v2{path_prefix}/{repo}/manifests/1.0{query}",
        mirror.addr
    );
    get_manifest(&url).await.status
}

async fn origin() -> FakeRegistry {
    let origin = FakeRegistry::start().await;
    let config = origin.add_blob(b"{}".to_vec());
    let manifest = schema2_manifest(&config, 2, &[]);
    origin.add_manifest(
        "library/alpine",
        Some("1.0"),
        DOCKER_MANIFEST,
        manifest.clone(),
    );
    origin.add_manifest("org/tool", Some("1.0"), DOCKER_MANIFEST, manifest);
    origin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_daemon_json_mirror_serves_docker_hub_names() {
    let origin = origin().await;
    let mirror = example_mirror(&origin).await;
    let json: serde_json::Value = serde_json::from_str(&deploy("docker/daemon.json")).unwrap();
    let mirrors = json["registry-mirrors"].as_array().unwrap();
    assert!(!mirrors.is_empty());
    for m in mirrors {
        // dockerd sends library/ itself; bare single names work too.
        assert_eq!(
            pull_tag(&mirror, m.as_str().unwrap(), "library/alpine", "").await,
            StatusCode::OK
        );
        assert_eq!(
            pull_tag(&mirror, m.as_str().unwrap(), "alpine", "").await,
            StatusCode::OK
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_hosts_toml_mirrors_route_by_namespace() {
    let origin = origin().await;
    let mirror = example_mirror(&origin).await;
    for (dir, repo, expect) in [
        ("docker.io", "library/alpine", StatusCode::OK),
        ("ghcr.io", "org/tool", StatusCode::OK),
        // _default applies to every registry; one regmirror does not serve answers 404, so
        // containerd moves on to the registry itself.
        ("_default", "org/tool", StatusCode::NOT_FOUND),
    ] {
        let hosts: toml::Value =
            toml::from_str(&deploy(&format!("containerd/certs.d/{dir}/hosts.toml"))).unwrap();
        let table = hosts["host"].as_table().unwrap();
        assert_eq!(table.len(), 1, "{dir}");
        for (host, settings) in table {
            let caps: Vec<&str> = settings["capabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            assert_eq!(caps, ["pull", "resolve"], "{dir}");
            let ns = if dir == "_default" { "quay.io" } else { dir };
            let status = pull_tag(&mirror, host, repo, &format!("?ns={ns}")).await;
            assert_eq!(status, expect, "{dir}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_registries_conf_mirrors_route_by_path_prefix() {
    let origin = origin().await;
    let mirror = example_mirror(&origin).await;
    let conf: toml::Value = toml::from_str(&deploy("podman/registries.conf")).unwrap();
    let registries = conf["registry"].as_array().unwrap();
    assert_eq!(registries.len(), 2);
    for registry in registries {
        let prefix = registry["prefix"].as_str().unwrap();
        let repo = if prefix == "docker.io" {
            "library/alpine"
        } else {
            "org/tool"
        };
        for m in registry["mirror"].as_array().unwrap() {
            assert_eq!(m["insecure"].as_bool(), Some(true));
            let status = pull_tag(&mirror, m["location"].as_str().unwrap(), repo, "").await;
            assert_eq!(status, StatusCode::OK, "{prefix}");
        }
    }
}
