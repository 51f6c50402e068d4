//! End-to-end harness: Debian's `docker-registry` as the origin (seeded by the test with a
//! generated multi-platform image), the `regmirror` binary in front of it, and helpers to run
//! real clients. Every process started here is stopped by its guard.

use http::StatusCode;
use regmirror::digest::Digest;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod seed;
#[allow(unused_imports)]
pub use seed::{push_blob, push_manifest, seed, seed_repo, Seeded, REPO};

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

/// Starts the regmirror binary on a free port with the configuration `config` writes for that
/// port, saved as `<dir>/<name>.toml`; its output goes to `<dir>/<name>.log`.
pub fn spawn_regmirror(
    dir: &Path,
    name: &str,
    config: impl FnOnce(u16) -> String,
) -> (Process, u16) {
    let port = free_port();
    (spawn_regmirror_on(dir, name, port, config), port)
}

/// As [`spawn_regmirror`], on `port` (chosen beforehand: replicas that name each other).
pub fn spawn_regmirror_on(
    dir: &Path,
    name: &str,
    port: u16,
    config: impl FnOnce(u16) -> String,
) -> Process {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config(port)).unwrap();
    Process::spawn(
        "regmirror",
        Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info"),
        dir.join(format!("{name}.log")),
    )
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
        let cache = dir.join("mirror-cache");
        let (process, port) = spawn_regmirror(dir, "regmirror", |port| {
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
            text
        });
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

/// dockerd on its own socket and directories, with `daemon.json` naming the mirror; returns
/// it and its `-H` address.
pub async fn start_dockerd(dir: &Path, mirror_host: &str) -> (Process, String) {
    let socket = format!("unix://{}", dir.join("docker.sock").display());
    let daemon_json = dir.join("daemon.json");
    install_example("docker/daemon.json", &daemon_json, mirror_host);
    let mut dockerd = Process::spawn(
        "dockerd",
        Command::new("dockerd")
            .arg("--config-file")
            .arg(&daemon_json)
            .arg("--data-root")
            .arg(dir.join("docker-root"))
            .arg("--exec-root")
            .arg(dir.join("docker-exec"))
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .args([
                "-H",
                &socket,
                "--storage-driver=vfs",
                "--iptables=false",
                "--bridge=none",
            ]),
        dir.join("dockerd.log"),
    );
    let probe = socket.clone();
    wait_for_daemon(&mut dockerd, 60, || {
        Command::new("/usr/bin/docker")
            .args(["-H", &probe, "version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
    .await;
    (dockerd, socket)
}

/// Copies the linux/amd64 image `image` (`host/repo:tag`, over plain http) into an OCI layout
/// at `layout` under `tag`, with skopeo.
pub fn skopeo_copy_amd64(what: &str, image: &str, layout: &Path, tag: &str) {
    run(
        what,
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .args(["--override-arch", "amd64", "--override-os", "linux"])
            .arg(format!("docker://{image}"))
            .arg(format!("oci:{}:{tag}", layout.display())),
    );
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
