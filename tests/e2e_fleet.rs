//! Two replicas sharing one bucket, with real parts: Debian's `docker-registry` as the origin,
//! `s3s-fs` as the S3 server, the regmirror binary twice (own ports, own disks), and skopeo
//! pulling as users do. What one replica pulled, the other serves with the origin stopped:
//! every manifest and blob from the bucket, digests equal to the origin's.

mod common;

use common::e2e::*;
use common::s3::S3Server;
use regmirror::digest::Digest;
use std::path::Path;
use std::process::Command;

/// A replica of the Docker Hub mirror in front of `origin`, with `s3` as its shared store.
async fn replica(dir: &Path, name: &str, origin: &str, s3: &S3Server) -> (Process, u16) {
    let cache = dir.join(format!("{name}-cache"));
    let (process, port) = spawn_regmirror(dir, name, |port| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n\
             [[registry]]\nname = \"docker.io\"\ndefault = true\n\
             [[registry.upstream]]\nurl = \"{origin}\"\nstall_timeout = \"3s\"\n{}",
            cache.display().to_string(),
            s3.config_section(),
        )
    });
    wait_until_up(&format!("http://127.0.0.1:{port}/healthz"), &process).await;
    (process, port)
}

/// `skopeo copy --all` of `host/<REPO>:<tag>` into a directory (`dir:`, which keeps manifest
/// lists as they are); the digests of everything it wrote, each blob checked against its name.
fn pull_all(host: &str, tag: &str, into: &Path) -> Vec<String> {
    run(
        &format!("skopeo copy --all {host} {tag}"),
        Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--preserve-digests",
                "--src-tls-verify=false",
            ])
            .arg(format!("docker://{host}/{REPO}:{tag}"))
            .arg(format!("dir:{}", into.display())),
    );
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(into).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name == "version" {
            continue;
        }
        let digest = Digest::of(&std::fs::read(&path).unwrap());
        if name.len() == 64 {
            assert_eq!(digest.hex(), name, "{name} is not what its name says");
        }
        stored.push(digest.to_string());
    }
    stored.sort();
    stored.dedup();
    stored
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo and s3s-fs: run tests/run.sh"]
async fn a_second_replica_serves_what_the_first_pulled_from_the_bucket_with_the_origin_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut origin = Origin::start(&dir.path().join("origin")).await;
    let seeded = seed(&origin).await;
    let s3 = S3Server::start().await;
    let (first, first_port) = replica(dir.path(), "first", &origin.url(), &s3).await;
    let first_host = format!("127.0.0.1:{first_port}");

    // Both formats, every platform, through the first replica.
    let oci = pull_all(&first_host, "oci", &dir.path().join("first-oci"));
    let docker = pull_all(&first_host, "docker", &dir.path().join("first-docker"));
    let mut every: Vec<Digest> = seeded.blobs.clone();
    every.extend(seeded.oci_manifests.iter().cloned());
    every.extend([seeded.oci_index.clone(), seeded.docker_list.clone()]);
    for digest in &every {
        assert!(
            oci.contains(&digest.to_string()) || docker.contains(&digest.to_string()),
            "{digest} was not pulled"
        );
    }
    // Everything reaches the bucket (uploads run after the pull).
    let in_bucket = |digest: &Digest| {
        s3.blob(digest).is_some()
            || s3
                .objects()
                .contains(&format!("manifests/sha256/{}", digest.hex()))
    };
    for _ in 0..3000 {
        if every.iter().all(in_bucket) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let missing: Vec<&Digest> = every.iter().filter(|d| !in_bucket(d)).collect();
    assert!(
        missing.is_empty(),
        "not in the bucket: {missing:?}\n{}",
        first.output()
    );
    for tag in ["oci", "docker"] {
        let object = format!("tags/docker.io/{REPO}/_tags/{tag}");
        assert!(s3.objects().contains(&object), "no {object}");
    }

    // The origin stops; a replica with an empty disk serves the same pulls from the bucket.
    origin.stop();
    let (second, second_port) = replica(dir.path(), "second", &origin.url(), &s3).await;
    let second_host = format!("127.0.0.1:{second_port}");
    let again_oci = pull_all(&second_host, "oci", &dir.path().join("second-oci"));
    let again_docker = pull_all(&second_host, "docker", &dir.path().join("second-docker"));
    assert_eq!(again_oci, oci, "the OCI pulls differ");
    assert_eq!(again_docker, docker, "the Docker pulls differ");
    // The tags were answered from the fleet's last confirmed mapping, said to be stale.
    let log = second.output();
    assert!(
        log.contains("serving the last known tag mapping"),
        "the tags were not answered stale:\n{log}"
    );
    drop(first);
}
