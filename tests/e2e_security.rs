//! End to end, secured: the `regmirror` binary serving HTTPS with a test CA to skopeo and curl
//! (and swapping its certificate on SIGHUP without a restart), and requiring logins that skopeo,
//! podman, containerd's ctr and curl make the way their users do. Debian's `docker-registry` is
//! the origin. Ignored by a plain `cargo test`; `tests/run.sh` installs the tools and runs them.

mod common;

use common::e2e::*;
use common::pki::issue;
use regmirror::digest::Digest;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A directory holding `ca.crt`, as skopeo's and podman's `--cert-dir` expect.
fn cert_dir(dir: &Path, name: &str, ca: &Path) -> PathBuf {
    let certs = dir.join(name);
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(ca, certs.join("ca.crt")).unwrap();
    certs
}

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS"])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo and curl: run tests/run.sh"]
async fn skopeo_and_curl_pull_over_tls_and_a_new_certificate_is_served_after_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(dir.path()).await;
    let seeded = seed(&origin).await;
    let first = issue(dir.path(), "first");
    let (cert, key) = (
        dir.path().join("tls-cert.pem"),
        dir.path().join("tls-key.pem"),
    );
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let tls = format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let origin_url = origin.url();
    let registries: &[(&str, &[(&str, bool)])] = &[("docker.io", &[(origin_url.as_str(), true)])];
    let mirror = Mirror::start_configured(dir.path(), registries, &tls, Some(&first.ca_pem)).await;
    let port = mirror.port;
    let host = format!("localhost:{port}");
    let first_certs = cert_dir(dir.path(), "certs-first", &first.ca);

    let raw = run(
        "skopeo inspect --raw over TLS",
        Command::new("skopeo")
            .args(["inspect", "--raw", "--cert-dir"])
            .arg(&first_certs)
            .arg(format!("docker://{host}/{REPO}:oci")),
    );
    assert_eq!(Digest::of(raw.as_bytes()), seeded.oci_index);
    let layout = dir.path().join("layout");
    run(
        "skopeo copy --all over TLS",
        Command::new("skopeo")
            .args(["copy", "--all", "--preserve-digests", "--src-cert-dir"])
            .arg(&first_certs)
            .arg(format!("docker://{host}/{REPO}:oci"))
            .arg(format!("oci:{}:oci", layout.display())),
    );
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let path = entry.unwrap().path();
        let name = format!("sha256:{}", path.file_name().unwrap().to_str().unwrap());
        assert_eq!(Digest::of(&std::fs::read(&path).unwrap()).to_string(), name);
        stored.push(name);
    }
    // Exactly the index, both platforms' manifests, and their configs and layers.
    stored.sort();
    let mut expected: Vec<String> = std::iter::once(&seeded.oci_index)
        .chain(&seeded.oci_manifests)
        .chain(&seeded.oci_blobs)
        .map(|d| d.to_string())
        .collect();
    expected.sort();
    assert_eq!(stored, expected);
    // The health check (container HEALTHCHECK, probes) over TLS.
    let health = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .arg("health")
            .args(args)
            .status()
            .unwrap()
            .success()
    };
    let url = format!("https://{host}/healthz");
    assert!(health(&[
        "--url",
        &url,
        "--ca-file",
        first.ca.to_str().unwrap()
    ]));
    assert!(
        !health(&["--url", &url]),
        "verified against the system roots only"
    );
    let loopback = format!("https://127.0.0.1:{port}/healthz");
    assert!(health(&["--url", &loopback, "--insecure"]));
    // curl with the CA, over HTTP/2.
    let out = dir.path().join("blob.bin");
    let fetched = curl(&[
        "--http2",
        "--cacert",
        first.ca.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "-w",
        "%{http_version} %{http_code}",
        &format!("https://{host}/v2/{REPO}/blobs/{}", seeded.blobs[0]),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&fetched.stdout),
        "2 200",
        "{fetched:?}"
    );
    assert_eq!(Digest::of(&std::fs::read(&out).unwrap()), seeded.blobs[0]);

    // A new certificate from another CA, picked up on SIGHUP: same process, new identity.
    let second = issue(dir.path(), "second");
    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    let pid = mirror.process.pid().to_string();
    run("kill -HUP", Command::new("kill").args(["-HUP", &pid]));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = curl(&[
            "--cacert",
            second.ca.to_str().unwrap(),
            &format!("https://{host}/healthz"),
        ]);
        if probe.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate not served: {probe:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = curl(&[
        "--cacert",
        first.ca.to_str().unwrap(),
        &format!("https://{host}/healthz"),
    ]);
    assert!(
        !old.status.success(),
        "the old CA still verifies the server"
    );
    let second_certs = cert_dir(dir.path(), "certs-second", &second.ca);
    let raw = run(
        "skopeo inspect --raw with the new CA",
        Command::new("skopeo")
            .args(["inspect", "--raw", "--cert-dir"])
            .arg(&second_certs)
            .arg(format!("docker://{host}/{REPO}:docker")),
    );
    assert_eq!(Digest::of(raw.as_bytes()), seeded.docker_list);
    assert_eq!(mirror.process.pid().to_string(), pid, "no restart");
}

/// Now, as the mirror's log writes its time: requests logged from here on came after it. (An
/// offset into the log would not do: lines are written by another thread, a moment later.)
fn log_mark() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

/// When a log line was logged.
fn logged_at(line: &str) -> Option<&str> {
    line.get(..27).filter(|t| t.ends_with('Z'))
}

/// The status of an access line.
fn status(line: &str) -> Option<&str> {
    line.split("status=").nth(1)?.split_whitespace().next()
}

/// Checks that the mirror itself refused what a client just failed to do: among its access
/// lines logged since `mark` (from [`log_mark`]), one for a path starting with `path` has one
/// of `statuses` (waited for: the log is written by another thread), every one for such a path
/// is a refusal (4xx), and no request since `mark` was answered with content.
async fn refused_by_the_mirror(mirror: &Mirror, mark: &str, path: &str, statuses: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = mirror.process.output();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("regmirror::access") && logged_at(l) >= Some(mark))
            .collect();
        let matching: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains(&format!("path={path}")))
            .collect();
        if matching
            .iter()
            .any(|l| status(l).is_some_and(|s| statuses.contains(&s)))
        {
            for line in &matching {
                assert!(status(line).is_some_and(|s| s.starts_with('4')), "{line}");
            }
            for line in &lines {
                let content = line.contains("/manifests/") || line.contains("/blobs/");
                assert!(
                    !(content && status(line) == Some("200")),
                    "answered: {line}"
                );
            }
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror never answered {path} (a refusal from elsewhere?):\n{}",
            lines.join("\n")
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry, skopeo, podman, containerd and curl: run tests/run.sh"]
async fn skopeo_podman_ctr_and_curl_log_in_and_denied_repositories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(dir.path()).await;
    let seeded = seed(&origin).await;
    seed_repo(&origin, "private/thing").await;
    let hash = bcrypt::hash("alice-pw", 5).unwrap();
    std::fs::write(dir.path().join("htpasswd"), format!("alice:{hash}\n")).unwrap();
    let token = "ci-token-0123456789abcdef";
    std::fs::write(dir.path().join("tokens"), format!("ci {token}\n")).unwrap();
    let auth = format!(
        "[auth]\nhtpasswd = {:?}\ntokens_file = {:?}\n\
         [[auth.rule]]\nusers = [\"alice\", \"ci\"]\nallow = [\"library/*\"]\n",
        dir.path().join("htpasswd").display().to_string(),
        dir.path().join("tokens").display().to_string(),
    );
    let origin_url = origin.url();
    let registries: &[(&str, &[(&str, bool)])] = &[("docker.io", &[(origin_url.as_str(), true)])];
    let mirror = Mirror::start_configured(dir.path(), registries, &auth, None).await;
    let port = mirror.port;
    let host = format!("127.0.0.1:{port}");
    let image = format!("docker://{host}/{REPO}:oci");

    // skopeo: --creds, a token as the password, a wrong password, a denied repository.
    let skopeo = |creds: &str, image: &str| {
        Command::new("skopeo")
            .args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                "--creds",
                creds,
                image,
            ])
            .output()
            .unwrap()
    };
    let ok = skopeo("alice:alice-pw", &image);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(Digest::of(&ok.stdout), seeded.oci_index);
    let ok = skopeo(&format!("ci:{token}"), &image);
    assert_eq!(Digest::of(&ok.stdout), seeded.oci_index, "{ok:?}");
    // Each refusal must be the mirror's answer (its access log says so), not any failure.
    let mark = log_mark();
    let wrong = skopeo("alice:guess", &image);
    assert!(!wrong.status.success());
    let said = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
    assert!(
        said.contains("unauthorized") || said.contains("authentication required"),
        "{said}"
    );
    refused_by_the_mirror(&mirror, &mark, "/token", &["401"]).await;
    let mark = log_mark();
    let denied = skopeo(
        "alice:alice-pw",
        &format!("docker://{host}/private/thing:oci"),
    );
    assert!(!denied.status.success());
    let said = String::from_utf8_lossy(&denied.stderr).to_lowercase();
    assert!(said.contains("denied"), "{said}");
    refused_by_the_mirror(&mirror, &mark, "/v2/private/thing/manifests/", &["403"]).await;
    let mark = log_mark();
    let anonymous = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &image])
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "anonymous clients may pull nothing here"
    );
    let manifests = format!("/v2/{REPO}/manifests/");
    refused_by_the_mirror(&mirror, &mark, &manifests, &["401", "403"]).await;

    // podman: `podman login`, then a pull with the stored credentials.
    let authfile = dir.path().join("auth.json");
    let podman = |args: &[&str]| {
        let mut c = podman(dir.path());
        c.args(args);
        c
    };
    run(
        "podman login",
        podman(&["login", "--tls-verify=false", "--authfile"])
            .arg(&authfile)
            .args(["-u", "alice", "-p", "alice-pw", &host]),
    );
    let mark = log_mark();
    let refused = podman(&["login", "--tls-verify=false", "--authfile"])
        .arg(dir.path().join("other-auth.json"))
        .args(["-u", "alice", "-p", "guess", &host])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "podman login with a wrong password succeeded"
    );
    refused_by_the_mirror(&mirror, &mark, "/token", &["401"]).await;
    let reference = format!("{host}/{REPO}:oci");
    run(
        "podman pull after login",
        podman(&[
            "pull",
            "--tls-verify=false",
            "--arch",
            "amd64",
            "--authfile",
        ])
        .arg(&authfile)
        .arg(&reference),
    );
    let inspected = run(
        "podman image inspect",
        &mut podman(&["image", "inspect", "--format", "{{.Id}}", &reference]),
    );
    assert_eq!(inspected.trim(), seeded.oci_amd64.1.hex());

    // containerd: ctr --user.
    let containerd = Containerd::start(dir.path()).await;
    let ctr = |args: &[&str]| containerd.ctr(args);
    let pull = |user: &str, reference: &str| {
        ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--user",
            user,
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            reference,
        ])
        .output()
        .unwrap()
    };
    let ctr_reference = format!("{host}/{REPO}:docker");
    let pulled = pull("alice:alice-pw", &ctr_reference);
    assert!(pulled.status.success(), "{pulled:?}");
    let listed = run("ctr images ls", &mut ctr(&["images", "ls"]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with(&ctr_reference) && l.contains(&seeded.docker_list.to_string())),
        "{listed}"
    );
    let mark = log_mark();
    let wrong = pull("alice:guess", &ctr_reference);
    assert!(!wrong.status.success(), "ctr pulled with a wrong password");
    refused_by_the_mirror(&mirror, &mark, "/token", &["401"]).await;
    let mark = log_mark();
    let denied = pull("alice:alice-pw", &format!("{host}/private/thing:oci"));
    assert!(!denied.status.success(), "ctr pulled a denied repository");
    refused_by_the_mirror(&mirror, &mark, "/v2/private/thing/manifests/", &["403"]).await;

    // curl: a static bearer token, as a containerd hosts.toml [header] or a script sends it.
    let out = dir.path().join("manifest.json");
    let fetched = curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "Accept: application/vnd.oci.image.index.v1+json",
        "-o",
        out.to_str().unwrap(),
        "-w",
        "%{http_code}",
        &format!("http://{host}/v2/{REPO}/manifests/oci"),
    ]);
    assert_eq!(String::from_utf8_lossy(&fetched.stdout), "200");
    assert_eq!(Digest::of(&std::fs::read(&out).unwrap()), seeded.oci_index);
    let challenged = curl(&["-i", &format!("http://{host}/v2/")]);
    let text = String::from_utf8_lossy(&challenged.stdout).to_lowercase();
    assert!(text.starts_with("http/1.1 401"), "{text}");
    assert!(
        text.contains(&format!(
            "www-authenticate: bearer realm=\"http://{host}/token\",service=\"regmirror\""
        )),
        "{text}"
    );
    // Every request for the private repository was refused (401 or 403), none answered.
    let log = mirror.process.output();
    let private_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("regmirror::access") && l.contains("/v2/private/thing/"))
        .collect();
    assert!(!private_lines.is_empty(), "{log}");
    for line in private_lines {
        assert!(
            line.contains("status=401") || line.contains("status=403"),
            "{line}"
        );
        assert!(
            line.contains("upstream=\"-\""),
            "asked upstream for a refused request: {line}"
        );
    }
}
