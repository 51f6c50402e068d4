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

/// One origin per registry of config.example.toml, each holding only its own repository
/// (docker.io: `library/alpine`; ghcr.io: `org/tool`): a request routed to the wrong registry
/// is answered 404 by the wrong origin, and each origin counts what it was asked.
struct Origins(Vec<(String, FakeRegistry)>);

impl Origins {
    async fn start(example: &Config) -> Origins {
        let mut origins = Vec::new();
        for registry in &example.registry {
            let origin = FakeRegistry::start().await;
            let config = origin.add_blob(b"{}".to_vec());
            let manifest = schema2_manifest(&config, 2, &[]);
            let repo = match registry.name.as_str() {
                "docker.io" => "library/alpine",
                "ghcr.io" => "org/tool",
                other => {
                    panic!("config.example.toml has a registry this test does not know: {other}")
                }
            };
            origin.add_manifest(repo, Some("1.0"), DOCKER_MANIFEST, manifest);
            origins.push((registry.name.clone(), origin));
        }
        Origins(origins)
    }

    /// How many manifest requests for `repo`'s tag each registry's origin saw, by name.
    fn asked(&self, repo: &str) -> Vec<(&str, usize)> {
        let path = format!("/v2/{repo}/manifests/1.0");
        self.0
            .iter()
            .map(|(name, o)| (name.as_str(), o.hits("GET", &path) + o.hits("HEAD", &path)))
            .collect()
    }

    /// Checks that only `registry`'s origin was asked for `repo` (or none, with `None`).
    fn only(&self, registry: Option<&str>, repo: &str) {
        for (name, asked) in self.asked(repo) {
            let expected = Some(name) == registry;
            assert_eq!(
                asked > 0,
                expected,
                "{name}'s origin asked {asked} times for {repo}"
            );
        }
    }
}

/// A mirror configured with config.example.toml's registries, each served by its origin.
async fn example_mirror() -> (Origins, TestMirror) {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
        .unwrap();
    let example = Config::parse(&text).unwrap();
    let origins = Origins::start(&example).await;
    let first = origins.0[0].1.url();
    let mirror = TestMirror::start(&first, |c| {
        c.registry = example.registry.clone();
        for (registry, (_, origin)) in c.registry.iter_mut().zip(&origins.0) {
            registry.upstream = vec![test_upstream(&origin.url())];
        }
    })
    .await;
    (origins, mirror)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dockerd_daemon_json_mirror_serves_docker_hub_names() {
    let (origins, mirror) = example_mirror().await;
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
    origins.only(Some("docker.io"), "library/alpine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_hosts_toml_mirrors_route_by_namespace() {
    for (dir, repo, expect, routed_to) in [
        (
            "docker.io",
            "library/alpine",
            StatusCode::OK,
            Some("docker.io"),
        ),
        ("ghcr.io", "org/tool", StatusCode::OK, Some("ghcr.io")),
        // _default applies to every registry; one regmirror does not serve answers 404, so
        // containerd moves on to the registry itself (and no origin is asked).
        ("_default", "org/tool", StatusCode::NOT_FOUND, None),
    ] {
        let (origins, mirror) = example_mirror().await;
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
        origins.only(routed_to, repo);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_registries_conf_mirrors_route_by_path_prefix() {
    let (origins, mirror) = example_mirror().await;
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
        origins.only(Some(prefix), repo);
    }
}
