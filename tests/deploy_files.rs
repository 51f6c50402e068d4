//! deploy/: each piece checked as far as this machine allows — the systemd unit by
//! `systemd-analyze verify`, every shipped configuration by the config parser, the Dockerfile
//! against the repository and the binary, the Grafana dashboard and Prometheus config against
//! the metrics the server really exports, the Kubernetes probes against real routes.

mod common;

use common::*;
use http::StatusCode;
use regmirror::config::Config;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The TOML block of the Kubernetes ConfigMap.
fn configmap_toml(manifest: &str) -> String {
    let mut lines = manifest
        .lines()
        .skip_while(|l| !l.contains("config.toml: |"));
    lines.next();
    lines
        .take_while(|l| l.starts_with("    "))
        .map(|l| format!("{}\n", &l[4..]))
        .collect()
}

#[test]
fn every_shipped_configuration_is_valid() {
    for path in [
        "deploy/systemd/config.toml",
        "deploy/container/config.toml",
        "config.example.toml",
    ] {
        Config::parse(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
    let k8s = Config::parse(&configmap_toml(&read("deploy/kubernetes/regmirror.yaml")))
        .expect("the ConfigMap's config.toml");
    assert_eq!(k8s.server.listen.port(), 5000);
    assert!(read("deploy/kubernetes/regmirror.yaml").contains("containerPort: 5000"));
}

/// The replicated examples (Kubernetes and Compose): valid configurations in which every
/// replica, named as its orchestrator names it, finds itself among the peers.
#[test]
fn every_replica_of_the_replicated_examples_finds_itself_among_its_peers() {
    let manifest = read("deploy/kubernetes/regmirror-replicated.yaml");
    let compose = read("deploy/compose/compose-replicated.yaml");
    for (what, text) in [
        ("kubernetes", configmap_toml(&manifest)),
        ("compose", read("deploy/compose/replicated.toml")),
    ] {
        let config = Config::parse(&text).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(config.shared_store.is_some(), "{what}: no shared store");
        let cluster = config.cluster.expect("a [cluster]");
        assert_eq!(cluster.peers.len(), 3, "{what}");
        for (i, peer) in cluster.peers.iter().enumerate() {
            let name = format!("regmirror-{i}");
            assert_eq!(cluster.own_address(&name).unwrap(), peer, "{what}: {name}");
        }
    }
    assert!(manifest.contains("replicas: 3") && manifest.contains("serviceName: regmirror-peers"));
    assert!(manifest.contains("clusterIP: None") && manifest.contains("readinessProbe"));
    for i in 0..3 {
        assert!(compose.contains(&format!("hostname: regmirror-{i}")));
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = read("deploy/systemd/regmirror.service")
        .replace("/usr/local/bin/regmirror", env!("CARGO_BIN_EXE_regmirror"));
    for required in [
        "DynamicUser=yes",
        "StateDirectory=regmirror",
        "ProtectSystem=strict",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(required), "unit lacks {required}");
    }
    let path = dir.path().join("regmirror.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("regmirror.service:"),
        "systemd-analyze verify:\n{text}"
    );
    let config = read("deploy/systemd/config.toml");
    assert!(
        config.contains("dir = \"/var/lib/regmirror\""),
        "the cache must live in the StateDirectory"
    );
}

#[test]
fn the_dockerfile_matches_the_repository_and_the_binary() {
    let dockerfile = read("deploy/container/Dockerfile");
    let stages =
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM "));
    assert!(stages >= 2, "multi-stage build expected");
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(repo(source).exists(), "COPY source {source} does not exist");
        }
    }
    let final_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    let user = final_stage
        .lines()
        .find(|l| l.starts_with("USER "))
        .expect("USER in the final stage");
    assert!(
        !user.contains("root") && !user.ends_with(" 0") && !user.contains(" 0:"),
        "runs as root: {user}"
    );
    assert!(final_stage.contains("HEALTHCHECK"), "no HEALTHCHECK");
    assert!(final_stage.contains("EXPOSE 5000"));
    // The health check and the default command are real subcommands of this binary.
    let health = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["health", "--help"])
        .output()
        .unwrap();
    assert!(health.status.success());
    let check = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["check-config", "--config"])
        .arg(repo("deploy/container/config.toml"))
        .output()
        .unwrap();
    assert!(check.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_subcommand_and_the_probes_hit_real_routes() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let k8s = read("deploy/kubernetes/regmirror.yaml");
    for probe in ["/readyz", "/healthz"] {
        assert!(k8s.contains(&format!("path: {probe}")));
        assert_eq!(
            get(&mirror.url(probe)).await.status,
            StatusCode::OK,
            "{probe}"
        );
    }
    let url = mirror.url("/healthz");
    let ok = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["health", "--url", &url])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(ok.success());
    let down = tokio::task::spawn_blocking(|| {
        Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["health", "--url", "http://127.0.0.1:1/healthz"])
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!down.success());
}

/// Metric names an expression uses.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("regmirror_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.push(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_only_uses_metrics_the_server_exports() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let text = String::from_utf8(get(&mirror.url("/metrics")).await.bytes().to_vec()).unwrap();
    // The exact series names exported (a name is not matched by a longer one it begins).
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/regmirror-dashboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 8);
    let mut used = 0;
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            for name in metric_names(target["expr"].as_str().unwrap()) {
                assert!(
                    exported.contains(name.as_str()),
                    "the dashboard uses {name}, which is not exported"
                );
                used += 1;
            }
        }
    }
    assert!(used >= 12);
    for title in [
        "Hit ratio",
        "Bytes saved",
        "Upstream health",
        "Upstream latency",
    ] {
        assert!(
            panels
                .iter()
                .any(|p| p["title"].as_str().unwrap().starts_with(title)),
            "no {title} panel"
        );
    }
    let provisioning = read("deploy/compose/grafana/provisioning/dashboards/regmirror.yml");
    assert!(provisioning.contains("/var/lib/grafana/dashboards"));
    assert!(read("deploy/compose/compose.yaml").contains("../grafana:/var/lib/grafana/dashboards"));
}

#[test]
#[ignore = "needs promtool (Debian's prometheus): run tests/run.sh"]
fn promtool_accepts_the_prometheus_config() {
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(repo("deploy/compose/prometheus.yml"))
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
