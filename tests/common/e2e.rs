//! End-to-end harness: Debian's `docker-registry` as the origin (seeded by the test with a
//! generated multi-platform image), the `regmirror` binary in front of it, and helpers to run
//! real clients. Every process started here is stopped by its guard.

use super::random_bytes;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use regmirror::digest::Digest;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) on drop.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
    /// Already waited for.
    reaped: bool,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Process {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {name}: {e} (run tests/run.sh, which installs it)")
            });
        Process {
            name: name.to_string(),
            child,
            log,
            reaped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's output so far (for failure messages).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }

    /// Whether the process has ended on its own.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends SIGTERM and waits up to `grace` before SIGKILL.
    pub fn terminate(&mut self, grace: Duration) {
        if self.reaped || self.exited() {
            self.reaped = true;
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.reaped = true;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(10));
        if std::thread::panicking() {
            // A failing test shows what each of its processes said last.
            let output = self.output();
            let lines: Vec<&str> = output.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            eprintln!("--- the last lines of {}'s log ---\n{tail}", self.name);
        }
    }
}

/// A free loopback port (bound, then released for the child to bind).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `url` until it answers 200.
pub async fn wait_until_up(url: &str, process: &Process) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Ok(r)) = tokio::time::timeout(
            Duration::from_secs(2),
            super::client().get(url.parse().unwrap()),
        )
        .await
        {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{} did not come up at {url}:\n{}",
        process.name,
        process.output()
    );
}

/// Debian's reference registry on a free port.
pub struct Origin {
    pub port: u16,
    pub process: Process,
    /// Its directory (configuration, data, log).
    dir: PathBuf,
}

impl Origin {
    pub async fn start(dir: &Path) -> Origin {
        Origin::start_registry(dir, "").await
    }

    /// Debian's registry in proxy mode (`proxy.remoteurl`), as a public mirror would be.
    pub async fn start_proxy(dir: &Path, remote: &str) -> Origin {
        Origin::start_registry(dir, &format!("proxy:\n  remoteurl: {remote}\n")).await
    }

    async fn start_registry(dir: &Path, extra: &str) -> Origin {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let mut origin = Origin {
            port,
            process: Self::spawn(dir, port, extra),
            dir: dir.to_path_buf(),
        };
        origin.wait_until_up().await;
        origin
    }

    /// Writes the configuration (with `extra` YAML appended) and starts the registry.
    fn spawn(dir: &Path, port: u16, extra: &str) -> Process {
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                dir.join("registry-data").display()
            ),
        )
        .unwrap();
        Process::spawn(
            "docker-registry",
            Command::new("docker-registry").arg("serve").arg(&config),
            dir.join("registry.log"),
        )
    }

    /// Stops the registry (SIGTERM).
    pub fn stop(&mut self) {
        self.process.terminate(Duration::from_secs(10));
    }

    /// Starts it again on the same port and data, with `extra` YAML in its configuration
    /// (`auth:`, say); returns once it answers.
    pub async fn start_again(&mut self, extra: &str) {
        self.stop();
        self.process = Self::spawn(&self.dir, self.port, extra);
        self.wait_until_up().await;
    }

    /// Waits until the registry answers (200, or 401 when it requires a token).
    async fn wait_until_up(&mut self) {
        let url = format!("{}/v2/", self.url());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = tokio::time::timeout(
                Duration::from_secs(2),
                super::client().get(url.parse().unwrap()),
            )
            .await;
            if let Ok(Ok(r)) = got {
                if matches!(r.status(), StatusCode::OK | StatusCode::UNAUTHORIZED) {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline && !self.process.exited(),
                "docker-registry did not come up at {url}:\n{}",
                self.process.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The regmirror binary, configured as users do, in front of `upstream`.
pub struct Mirror {
    pub port: u16,
    pub cache: PathBuf,
    pub process: Process,
}

impl Mirror {
    /// A Docker Hub mirror whose only upstream is `upstream`.
    pub async fn start(dir: &Path, upstream: &str) -> Mirror {
        Self::start_with(dir, &[("docker.io", &[(upstream, true)])]).await
    }

    /// A mirror of these registries (the first is the default), each with its upstreams as
    /// (URL, resolve_tags), in order.
    pub async fn start_with(dir: &Path, registries: &[(&str, &[(&str, bool)])]) -> Mirror {
        Self::start_configured(dir, registries, "", None).await
    }

    /// Like `start_with`, with `extra` TOML appended (`[auth]`, `[server.tls]`); with `tls_ca`,
    /// the mirror serves HTTPS and is awaited through a client trusting that CA.
    pub async fn start_configured(
        dir: &Path,
        registries: &[(&str, &[(&str, bool)])],
        extra: &str,
        tls_ca: Option<&str>,
    ) -> Mirror {
        let port = free_port();
        let cache = dir.join("mirror-cache");
        let config = dir.join("regmirror.toml");
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n",
            cache.display().to_string()
        );
        for (i, (name, upstreams)) in registries.iter().enumerate() {
            text.push_str(&format!(
                "\n[[registry]]\nname = \"{name}\"\ndefault = {}\n",
                i == 0
            ));
            for (url, resolve_tags) in upstreams.iter() {
                text.push_str(&format!(
                    "[[registry.upstream]]\nurl = \"{url}\"\nresolve_tags = {resolve_tags}\nstall_timeout = \"3s\"\n"
                ));
            }
        }
        text.push_str(extra);
        std::fs::write(&config, text).unwrap();
        let process = Process::spawn(
            "regmirror",
            Command::new(env!("CARGO_BIN_EXE_regmirror"))
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "info"),
            dir.join("regmirror.log"),
        );
        match tls_ca {
            None => wait_until_up(&format!("http://127.0.0.1:{port}/healthz"), &process).await,
            Some(ca) => {
                let url = format!("https://localhost:{port}/healthz");
                let deadline = Instant::now() + Duration::from_secs(30);
                while !super::pki::https_request(&url, ca, false, &[])
                    .await
                    .is_ok_and(|(_, got)| got.status == StatusCode::OK)
                {
                    assert!(
                        Instant::now() < deadline,
                        "no TLS answer:\n{}",
                        process.output()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Mirror {
            port,
            cache,
            process,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Whether the mirror's store holds this content now.
    pub fn has(&self, digest: &Digest) -> bool {
        super::blob_path(&self.cache, digest).exists()
    }

    /// Whether the mirror's store holds this content within 30 s: a client gets a blob's last
    /// byte once it is verified, and the blob is committed just after (made durable first,
    /// which takes a while for a large blob on a busy disk).
    pub async fn stores(&self, digest: &Digest) -> bool {
        for _ in 0..3000 {
            if self.has(digest) {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        false
    }
}

/// What the seeded origin holds, with the digests every client must see.
pub struct Seeded {
    /// `library/e2e:oci`: an OCI index over two OCI manifests.
    pub oci_index: Digest,
    /// `library/e2e:docker`: a Docker manifest list over two schema2 manifests.
    pub docker_list: Digest,
    /// Per format, the linux/amd64 manifest digest and its config digest.
    pub oci_amd64: (Digest, Digest),
    pub docker_amd64: (Digest, Digest),
    /// Every blob (configs and layers) pushed.
    pub blobs: Vec<Digest>,
}

pub const REPO: &str = "library/e2e";

/// Copies a file or directory from `deploy/clients/` to `dest`, pointing it at `mirror_host`
/// instead of the examples' `mirror.lan:5000`.
pub fn install_example(example: &str, dest: &Path, mirror_host: &str) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/clients")
        .join(example);
    copy_replacing(&source, dest, mirror_host);
}

fn copy_replacing(source: &Path, dest: &Path, mirror_host: &str) {
    if source.is_dir() {
        std::fs::create_dir_all(dest).unwrap();
        for entry in std::fs::read_dir(source).unwrap() {
            let entry = entry.unwrap();
            copy_replacing(&entry.path(), &dest.join(entry.file_name()), mirror_host);
        }
    } else {
        let text = std::fs::read_to_string(source).unwrap();
        std::fs::write(dest, text.replace("mirror.lan:5000", mirror_host)).unwrap();
    }
}

/// What makes this run's layers (and so every digest seeded) its own. Real clients remember
/// where they saw a digest across runs (skopeo's blob-info cache under /var/lib/containers),
/// and ports are reused: with the same digests a client could mount a layer from an earlier
/// run's location instead of pulling it through the mirror.
fn run_nonce() -> u128 {
    static NONCE: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        now ^ ((std::process::id() as u128) << 64)
    })
}

/// A gzip'd tar layer holding a small text file (unique to this run) and 1 MiB of random
/// bytes.
fn layer(platform: &str) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    add(
        "hello.txt",
        format!("hello from {platform}, run {:x}\n", run_nonce()).as_bytes(),
    );
    add(
        "random.bin",
        &random_bytes(1024 * 1024, platform.len() as u64 + 7),
    );
    let raw = tar.into_inner().unwrap();
    let diff_id = Digest::of(&raw);
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    (gz.finish().unwrap(), diff_id)
}

fn image_config(arch: &str, diff_id: &Digest) -> Vec<u8> {
    serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/hello"], "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
        "history": [{"created_by": "regmirror e2e test"}]
    })
    .to_string()
    .into_bytes()
}

struct Pusher {
    base: String,
    repo: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Pusher {
    async fn send(
        &self,
        method: Method,
        url: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> http::Response<hyper::body::Incoming> {
        let request = Request::builder()
            .method(method)
            .uri(url)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.http.request(request).await.unwrap()
    }

    async fn blob(&self, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        let start = self
            .send(
                Method::POST,
                &format!("{}/v2/{}/blobs/uploads/", self.base, self.repo),
                "application/octet-stream",
                vec![],
            )
            .await;
        assert_eq!(start.status(), StatusCode::ACCEPTED, "upload start");
        let location = start.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let done = self
            .send(
                Method::PUT,
                &format!("{location}{sep}digest={digest}"),
                "application/octet-stream",
                bytes.to_vec(),
            )
            .await;
        assert_eq!(done.status(), StatusCode::CREATED, "blob upload");
        digest
    }

    async fn manifest(&self, reference: &str, media_type: &str, bytes: Vec<u8>) -> Digest {
        let digest = Digest::of(&bytes);
        let response = self
            .send(
                Method::PUT,
                &format!("{}/v2/{}/manifests/{reference}", self.base, self.repo),
                media_type,
                bytes,
            )
            .await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "manifest push: {}",
            String::from_utf8_lossy(&body)
        );
        digest
    }
}

/// Pushes the two-platform image in both formats as `library/e2e`.
pub async fn seed(origin: &Origin) -> Seeded {
    seed_repo(origin, REPO).await
}

/// Pushes one blob of `size` random bytes to `repo`; returns its digest.
pub async fn push_blob(origin: &Origin, repo: &str, bytes: &[u8]) -> Digest {
    let pusher = Pusher {
        base: origin.url(),
        repo: repo.to_string(),
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    };
    pusher.blob(bytes).await
}

/// Pushes the two-platform image in both formats as `repo`.
pub async fn seed_repo(origin: &Origin, repo: &str) -> Seeded {
    let pusher = Pusher {
        base: origin.url(),
        repo: repo.to_string(),
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    };
    let formats = [
        (
            "oci",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            "docker",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    ];
    let mut blobs = Vec::new();
    let mut tops = Vec::new();
    let mut amd64 = Vec::new();
    for (tag, index_type, manifest_type, config_type, layer_type) in formats {
        let mut entries = Vec::new();
        for arch in ["amd64", "arm64"] {
            let (layer_bytes, diff_id) = layer(&format!("{tag}-{arch}"));
            let config = image_config(arch, &diff_id);
            let layer_digest = pusher.blob(&layer_bytes).await;
            let config_digest = pusher.blob(&config).await;
            blobs.extend([layer_digest.clone(), config_digest.clone()]);
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": {"mediaType": config_type, "size": config.len(), "digest": config_digest.to_string()},
                "layers": [{"mediaType": layer_type, "size": layer_bytes.len(), "digest": layer_digest.to_string()}],
            })
            .to_string()
            .into_bytes();
            let size = manifest.len();
            let digest = pusher
                .manifest(&Digest::of(&manifest).to_string(), manifest_type, manifest)
                .await;
            if arch == "amd64" {
                amd64.push((digest.clone(), config_digest));
            }
            entries.push(serde_json::json!({
                "mediaType": manifest_type, "size": size, "digest": digest.to_string(),
                "platform": {"architecture": arch, "os": "linux"}
            }));
        }
        let index =
            serde_json::json!({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
                .to_string()
                .into_bytes();
        tops.push(pusher.manifest(tag, index_type, index).await);
    }
    Seeded {
        oci_index: tops[0].clone(),
        docker_list: tops[1].clone(),
        oci_amd64: amd64[0].clone(),
        docker_amd64: amd64[1].clone(),
        blobs,
    }
}

/// Runs a command to completion, panicking with its output on failure.
pub fn run(what: &str, command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// Waits (up to `seconds`) until `probe` succeeds, failing early if the daemon exits.
pub async fn wait_for_daemon(daemon: &mut Process, seconds: u64, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !probe() {
        assert!(
            Instant::now() < deadline && !daemon.exited(),
            "{} did not start:\n{}",
            daemon.name,
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a program is on PATH (or at this path).
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A containerd daemon of the test's own, on its own socket and directories.
pub struct Containerd {
    pub process: Process,
    socket: String,
}

impl Containerd {
    /// Starts it and waits until `ctr` reaches it.
    pub async fn start(dir: &Path) -> Containerd {
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
        let mut containerd = Containerd { process, socket };
        let socket = containerd.socket.clone();
        wait_for_daemon(&mut containerd.process, 30, || {
            ctr_command(&socket, &["version"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .await;
        containerd
    }

    /// `ctr` on this daemon, in the namespace `e2e`.
    pub fn ctr(&self, args: &[&str]) -> Command {
        ctr_command(&self.socket, args)
    }
}

fn ctr_command(socket: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ctr");
    c.args(["--address", socket, "--namespace", "e2e"])
        .args(args);
    c
}

/// `podman` with storage, state and events of the test's own (vfs, no systemd).
pub fn podman(dir: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(dir.join("podman-root"))
        .arg("--runroot")
        .arg(dir.join("podman-run"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
    c
}
