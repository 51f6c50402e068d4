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
            mirror.stores(blob).await,
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

/// Two origins behind one mirror: `docker.io` (default) with `library/e2e`, and `ghcr.io`
/// with `org/tool`; returns what each holds.
async fn two_registries(dir: &Path) -> (Origin, Seeded, Origin, Seeded, Mirror) {
    std::fs::create_dir_all(dir.join("hub")).unwrap();
    std::fs::create_dir_all(dir.join("ghcr")).unwrap();
    let hub = Origin::start(&dir.join("hub")).await;
    let hub_image = seed(&hub).await;
    let ghcr = Origin::start(&dir.join("ghcr")).await;
    let ghcr_image = seed_repo(&ghcr, "org/tool").await;
    let mirror = Mirror::start_with(
        dir,
        &[
            ("docker.io", &[(hub.url().as_str(), true)]),
            ("ghcr.io", &[(ghcr.url().as_str(), true)]),
        ],
    )
    .await;
    (hub, hub_image, ghcr, ghcr_image, mirror)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and podman: run tests/run.sh"]
async fn podman_pulls_two_registries_through_path_prefix_mirrors() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, hub_image, _ghcr, ghcr_image, mirror) = two_registries(dir.path()).await;
    let conf = dir.path().join("registries.conf");
    install_example("podman/registries.conf", &conf, &mirror.host());
    let podman = |args: &[&str]| {
        let mut c = podman(dir.path());
        c.env("CONTAINERS_REGISTRIES_CONF", &conf).args(args);
        c
    };
    for (image, top, (_, config)) in [
        (
            format!("docker.io/{REPO}:docker"),
            &hub_image.docker_list,
            &hub_image.docker_amd64,
        ),
        (
            format!("docker.io/{REPO}:oci"),
            &hub_image.oci_index,
            &hub_image.oci_amd64,
        ),
        (
            "ghcr.io/org/tool:oci".to_string(),
            &ghcr_image.oci_index,
            &ghcr_image.oci_amd64,
        ),
    ] {
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
            "image ID is not the origin's config ({image})"
        );
        assert_eq!(
            fields.next(),
            Some(top.to_string().as_str()),
            "podman recorded another digest ({image})"
        );
        assert!(
            mirror.stores(top).await,
            "{image} did not go through the mirror"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and containerd: run tests/run.sh"]
async fn containerd_pulls_two_registries_through_hosts_toml_mirrors() {
    let dir = tempfile::tempdir().unwrap();
    let (_hub, hub_image, _ghcr, ghcr_image, mirror) = two_registries(dir.path()).await;
    let hosts = dir.path().join("certs.d");
    install_example("containerd/certs.d", &hosts, &mirror.host());
    let containerd = Containerd::start(dir.path()).await;
    let ctr = |args: &[&str]| containerd.ctr(args);
    let hosts_dir = hosts.display().to_string();
    for (image, top) in [
        (format!("docker.io/{REPO}:oci"), &hub_image.oci_index),
        (format!("docker.io/{REPO}:docker"), &hub_image.docker_list),
        ("ghcr.io/org/tool:oci".to_string(), &ghcr_image.oci_index),
    ] {
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
            .find(|l| l.split_whitespace().next() == Some(image.as_str()))
            .unwrap_or_else(|| panic!("{image} not listed:\n{listed}"));
        assert!(
            line.contains(&top.to_string()),
            "containerd resolved {image} to another digest:\n{line}"
        );
        assert!(
            mirror.stores(top).await,
            "{image} did not go through the mirror"
        );
    }
    // ghcr.io's image went through the mirror (its config is its own, not docker.io's), and
    // the base layer both registries' images share is kept once: asked for under ghcr.io, it
    // is served from the copy the docker.io pull stored (a hit, or, while that copy waits for
    // its commit, a join on its download), never fetched again.
    assert_ne!(ghcr_image.oci_amd64.1, hub_image.oci_amd64.1);
    assert!(mirror.stores(&ghcr_image.oci_amd64.1).await);
    let shared = &ghcr_image.shared_layers[0];
    assert!(hub_image.shared_layers.contains(shared));
    let url = format!(
        "http://{}/v2/org/tool/blobs/{shared}?ns=ghcr.io",
        mirror.host()
    );
    assert_eq!(Digest::of(common::get(&url).await.bytes()), *shared);
    let path = format!("path=/v2/org/tool/blobs/{shared}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = mirror.process.output();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(&path)).collect();
        if !lines.is_empty() {
            for line in lines {
                let stored = line.contains("cache=\"hit\"") || line.contains("cache=\"join\"");
                assert!(stored, "{line}");
            }
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and docker.io (dockerd): run tests/run.sh"]
async fn dockerd_pulls_through_registry_mirrors_anonymously_when_logins_are_on() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(dir.path()).await;
    let seeded = seed(&origin).await;
    let mirror = Mirror::start(dir.path(), &origin.url()).await;
    let d = dir.path();
    let (_dockerd, socket) = start_dockerd(d, &mirror.host()).await;
    let docker = |args: &[&str]| {
        let mut c = Command::new("/usr/bin/docker");
        c.args(["-H", &socket]).args(args);
        c
    };
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
        assert!(
            mirror.stores(top).await,
            "{tag} did not go through the mirror"
        );
    }

    // Logins switched on (SIGHUP): dockerd cannot log in to a mirror, so it pulls what the
    // anonymous rule allows, and nothing else.
    seed_repo(&origin, "library/other").await;
    seed_repo(&origin, "someone/private").await;
    std::fs::write(d.join("tokens"), "ci ci-token-0123456789abcdef\n").unwrap();
    let config = d.join("regmirror.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}\n[auth]\ntokens_file = {:?}\nanonymous = [\"library/*\"]\n",
            d.join("tokens").display().to_string()
        ),
    )
    .unwrap();
    let pid = mirror.process.pid().to_string();
    run("kill -HUP", Command::new("kill").args(["-HUP", &pid]));
    let base = format!("http://{}/v2/", mirror.host());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::get(&base).await.status != http::StatusCode::UNAUTHORIZED {
        assert!(std::time::Instant::now() < deadline, "auth not switched on");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    run(
        "docker pull (anonymous rule)",
        &mut docker(&["pull", "other:oci"]),
    );
    let denied = docker(&["pull", "someone/private:oci"]).output().unwrap();
    assert!(
        !denied.status.success(),
        "dockerd pulled a repository anonymous clients may not"
    );
    // The access log tells what the mirror answered for each repository's manifests.
    let log = mirror.process.output();
    let answered = |repo: &str, status: &str| {
        log.lines().any(|l| {
            l.contains("regmirror::access")
                && l.contains(&format!("path=/v2/{repo}/manifests/"))
                && l.contains(&format!("status={status}"))
        })
    };
    assert!(answered("library/other", "200"), "{log}");
    assert!(answered("someone/private", "401"), "{log}");
    assert!(!answered("someone/private", "200"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry: run tests/run.sh"]
async fn a_public_mirror_killed_mid_pull_is_resumed_from_the_origin() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("origin")).unwrap();
    let origin = Origin::start(&dir.path().join("origin")).await;
    let blob = common::random_bytes(256 * 1024 * 1024, 99);
    let digest = push_blob(&origin, REPO, &blob).await;
    let mut proxy = Origin::start_proxy(&dir.path().join("proxy"), &origin.url()).await;
    let proxy_url = proxy.url();
    let mirror = Mirror::start_with(
        dir.path(),
        &[(
            "docker.io",
            &[(proxy_url.as_str(), false), (origin.url().as_str(), true)],
        )],
    )
    .await;
    let url = format!("http://{}/v2/{REPO}/blobs/{digest}", mirror.host());
    let pull = tokio::spawn(async move { get(&url).await });
    // Kill the public mirror once the download through it is well under way.
    let tmp = mirror.cache.join("tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let written: u64 = std::fs::read_dir(&tmp)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        if written >= 16 * 1024 * 1024 {
            break;
        }
        assert!(
            !mirror.has(&digest),
            "the download finished before the mirror could be killed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the download did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    proxy.process.kill();
    let got = pull.await.unwrap();
    assert!(
        got.body.is_ok(),
        "the client's download broke: {:?}",
        got.body.err()
    );
    assert_eq!(Digest::of(got.bytes()), digest);
    assert!(mirror.stores(&digest).await);
    let log = mirror.process.output();
    assert!(
        log.contains("resuming"),
        "no resume in the mirror's log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and skopeo: run tests/run.sh"]
async fn warmed_images_are_served_with_the_origin_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut origin = Origin::start(dir.path()).await;
    let seeded = seed(&origin).await;
    let mirror = Mirror::start(dir.path(), &origin.url()).await;
    run(
        "regmirror warm",
        Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["warm", "--server"])
            .arg(format!("http://{}", mirror.host()))
            .args(["e2e:oci", "docker.io/library/e2e:docker"]),
    );
    assert!(
        mirror.stores(&seeded.oci_amd64.1).await && mirror.stores(&seeded.docker_amd64.1).await
    );
    origin.process.kill();
    for (tag, top) in [("oci", &seeded.oci_index), ("docker", &seeded.docker_list)] {
        let layout = dir.path().join(format!("offline-{tag}"));
        let image_ref = format!("{}/{REPO}:{tag}", mirror.host());
        skopeo_copy_amd64("skopeo copy with the origin gone", &image_ref, &layout, tag);
        let raw = run(
            "skopeo inspect --raw",
            Command::new("skopeo")
                .args(["inspect", "--raw", "--tls-verify=false"])
                .arg(format!("docker://{}/{REPO}:{tag}", mirror.host())),
        );
        assert_eq!(Digest::of(raw.as_bytes()), *top);
    }
}
