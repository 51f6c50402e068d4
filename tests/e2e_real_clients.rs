//! End to end with real parts: Debian's `docker-registry` as the origin, the `regmirror` binary
//! in front of it, and real clients configured as users configure them. Ignored by a plain
//! `cargo test`; `tests/run.sh` installs the tools and runs them.

mod common;

use common::e2e::*;
use common::{get, get_manifest, head_manifest};
use regmirror::digest::Digest;
use std::path::Path;
use std::process::Command;

/// Every blob file in an OCI layout hashes to its name; returns the names.
fn layout_blobs(dir: &Path) -> Vec<Digest> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let name = format!("sha256:{}", entry.file_name().to_string_lossy());
        let digest: Digest = name.parse().unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            Digest::of(&bytes),
            digest,
            "blob {name} in the layout is corrupt"
        );
        found.push(digest);
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and skopeo: run tests/run.sh"]
async fn skopeo_copies_every_platform_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(dir.path()).await;
    let seeded = seed(&origin).await;
    let mirror = Mirror::start(dir.path(), &origin.url()).await;

    for (tag, top) in [("oci", &seeded.oci_index), ("docker", &seeded.docker_list)] {
        let raw = run(
            "skopeo inspect --raw",
            Command::new("skopeo")
                .args(["inspect", "--raw", "--tls-verify=false"])
                .arg(format!("docker://{}/{REPO}:{tag}", mirror.host())),
        );
        assert_eq!(
            Digest::of(raw.as_bytes()),
            *top,
            "index/list bytes differ from the origin's ({tag})"
        );
        // Into a fresh copy on the origin registry, which checks every digest it receives.
        let copy = format!(
            "docker://127.0.0.1:{}/library/copy-{tag}:{tag}",
            origin.port
        );
        run(
            "skopeo copy --all",
            Command::new("skopeo")
                .args([
                    "copy",
                    "--all",
                    "--preserve-digests",
                    "--src-tls-verify=false",
                    "--dest-tls-verify=false",
                ])
                .arg(format!("docker://{}/{REPO}:{tag}", mirror.host()))
                .arg(&copy),
        );
        let copied = run(
            "skopeo inspect --raw (copy)",
            Command::new("skopeo")
                .args(["inspect", "--raw", "--tls-verify=false"])
                .arg(&copy),
        );
        assert_eq!(
            Digest::of(copied.as_bytes()),
            *top,
            "the copy differs from the origin ({tag})"
        );
    }
    // And into an OCI layout on disk, where every file is checked against its name.
    let layout = dir.path().join("layout");
    run(
        "skopeo copy --all to an OCI layout",
        Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--preserve-digests",
                "--src-tls-verify=false",
            ])
            .arg(format!("docker://{}/{REPO}:oci", mirror.host()))
            .arg(format!("oci:{}:oci", layout.display())),
    );
    assert!(layout_blobs(&layout).contains(&seeded.oci_index));
    for blob in &seeded.blobs {
        assert!(
            mirror.has(blob),
            "blob {blob} did not go through the mirror's cache"
        );
    }
    // By digest, HEAD and GET agree with the origin.
    let url = format!(
        "http://{}/v2/{REPO}/manifests/{}",
        mirror.host(),
        seeded.oci_index
    );
    let head = head_manifest(&url).await;
    assert_eq!(
        head.header("docker-content-digest"),
        Some(seeded.oci_index.to_string().as_str())
    );
    let got = get_manifest(&url).await;
    assert_eq!(Digest::of(got.bytes()), seeded.oci_index);
    let blob = get(&format!(
        "http://{}/v2/{REPO}/blobs/{}",
        mirror.host(),
        seeded.blobs[0]
    ))
    .await;
    assert_eq!(Digest::of(blob.bytes()), seeded.blobs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and podman: run tests/run.sh"]
async fn podman_pulls_through_a_registries_conf_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(dir.path()).await;
    let seeded = seed(&origin).await;
    let mirror = Mirror::start(dir.path(), &origin.url()).await;
    let conf = dir.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
            mirror.host()
        ),
    )
    .unwrap();
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_REGISTRIES_CONF", &conf)
            .arg("--root")
            .arg(dir.path().join("podman-root"))
            .arg("--runroot")
            .arg(dir.path().join("podman-run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args);
        c
    };
    for (tag, top, (_, config)) in [
        ("docker", &seeded.docker_list, &seeded.docker_amd64),
        ("oci", &seeded.oci_index, &seeded.oci_amd64),
    ] {
        let image = format!("docker.io/{REPO}:{tag}");
        run(
            "podman pull",
            &mut podman(&["pull", "--arch", "amd64", &image]),
        );
        let inspected = run(
            "podman image inspect",
            &mut podman(&[
                "image",
                "inspect",
                "--format",
                "{{.Id}} {{.Digest}}",
                &image,
            ]),
        );
        let mut fields = inspected.split_whitespace();
        assert_eq!(
            fields.next(),
            Some(config.hex()),
            "image ID is not the origin's config ({tag})"
        );
        assert_eq!(
            fields.next(),
            Some(top.to_string().as_str()),
            "podman recorded another digest ({tag})"
        );
        assert!(mirror.has(top), "{tag} did not go through the mirror");
    }
}

/// A containerd daemon of the test's own, on its own socket and directories.
fn start_containerd(dir: &Path) -> (Process, String) {
    let socket = dir.join("containerd.sock").display().to_string();
    let config = dir.join("containerd.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = {:?}\nstate = {:?}\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = {socket:?}\n[ttrpc]\n  address = \"{socket}.ttrpc\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {:?}\n",
            dir.join("containerd-root").display().to_string(),
            dir.join("containerd-state").display().to_string(),
            dir.join("containerd-opt").display().to_string(),
        ),
    )
    .unwrap();
    let process = Process::spawn(
        "containerd",
        Command::new("containerd").arg("--config").arg(&config),
        dir.join("containerd.log"),
    );
    (process, socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and containerd: run tests/run.sh"]
async fn containerd_pulls_through_a_hosts_toml_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(dir.path()).await;
    let seeded = seed(&origin).await;
    let mirror = Mirror::start(dir.path(), &origin.url()).await;
    let hosts = dir.path().join("certs.d");
    std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
    std::fs::write(
        hosts.join("docker.io/hosts.toml"),
        format!(
            "server = \"https://registry-1.docker.io\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            mirror.host()
        ),
    )
    .unwrap();
    let (containerd, socket) = start_containerd(dir.path());
    let ctr = |args: &[&str]| {
        let mut c = Command::new("ctr");
        c.args(["--address", &socket, "--namespace", "e2e"])
            .args(args);
        c
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ctr(&["version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "containerd did not start:\n{}",
            containerd.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    for (tag, top) in [("oci", &seeded.oci_index), ("docker", &seeded.docker_list)] {
        let image = format!("docker.io/{REPO}:{tag}");
        let hosts_dir = hosts.display().to_string();
        run(
            "ctr images pull",
            &mut ctr(&[
                "images",
                "pull",
                "--hosts-dir",
                &hosts_dir,
                "--snapshotter",
                "native",
                "--platform",
                "linux/amd64",
                &image,
            ]),
        );
        let listed = run("ctr images ls", &mut ctr(&["images", "ls"]));
        let line = listed
            .lines()
            .find(|l| l.starts_with(&image))
            .unwrap_or_else(|| panic!("{image} not listed:\n{listed}"));
        assert!(
            line.contains(&top.to_string()),
            "containerd resolved {tag} to another digest:\n{line}"
        );
        assert!(mirror.has(top), "{tag} did not go through the mirror");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and docker.io (dockerd): run tests/run.sh"]
async fn dockerd_pulls_through_registry_mirrors() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(dir.path()).await;
    let seeded = seed(&origin).await;
    let mirror = Mirror::start(dir.path(), &origin.url()).await;
    let d = dir.path();
    let socket = format!("unix://{}", d.join("docker.sock").display());
    let daemon_json = d.join("daemon.json");
    std::fs::write(&daemon_json, "{}").unwrap();
    let dockerd = Process::spawn(
        "dockerd",
        Command::new("dockerd")
            .arg("--config-file")
            .arg(&daemon_json)
            .arg("--data-root")
            .arg(d.join("docker-root"))
            .arg("--exec-root")
            .arg(d.join("docker-exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .args([
                "-H",
                &socket,
                "--storage-driver=vfs",
                "--iptables=false",
                "--bridge=none",
            ])
            .arg(format!("--registry-mirror=http://{}", mirror.host())),
        d.join("dockerd.log"),
    );
    let docker = |args: &[&str]| {
        let mut c = Command::new("/usr/bin/docker");
        c.args(["-H", &socket]).args(args);
        c
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !docker(&["version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "dockerd did not start:\n{}",
            dockerd.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    for (tag, top, (_, config)) in [
        ("docker", &seeded.docker_list, &seeded.docker_amd64),
        ("oci", &seeded.oci_index, &seeded.oci_amd64),
    ] {
        // As users type it: a Docker Hub short name.
        let image = format!("e2e:{tag}");
        run("docker pull", &mut docker(&["pull", &image]));
        let inspected = run(
            "docker image inspect",
            &mut docker(&[
                "image",
                "inspect",
                "--format",
                "{{.Id}} {{range .RepoDigests}}{{.}} {{end}}",
                &image,
            ]),
        );
        assert!(
            inspected.starts_with(&config.to_string()),
            "image ID is not the origin's config ({tag}): {inspected}"
        );
        assert!(
            inspected.contains(&format!("e2e@{top}")),
            "dockerd recorded another digest ({tag}): {inspected}"
        );
        assert!(mirror.has(top), "{tag} did not go through the mirror");
    }
}
