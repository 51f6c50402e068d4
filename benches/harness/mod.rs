//! What the benches share: processes they start and stop (the origin, distribution, nginx,
//! regmirror), what the origin sent (its access log), seeding the origin with blobs and
//! manifests, and reading a process's CPU and memory from /proc.

#![allow(dead_code)]

pub mod client;

use regmirror::digest::{Digest, Hasher};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1024 * 1024;

pub fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process the bench started; stopped on drop.
pub struct Service {
    child: Child,
    pub port: u16,
}

impl Drop for Service {
    /// SIGTERM first, so that nginx's master stops its workers (a SIGKILLed master leaves them
    /// running, and serving, through the rounds that follow); SIGKILL after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    pub fn spawn(command: &mut Command, port: u16, log: &Path) -> Service {
        let out = std::fs::File::create(log).unwrap();
        let child = command
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e} (run benches/load.sh)"));
        let service = Service { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{command:?} did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        service
    }

    /// The origin (`proxy_to: None`, access log on: see [`OriginLog`]), or distribution in
    /// proxy mode in front of it (access log off, like the other mirrors').
    pub fn docker_registry(dir: &Path, proxy_to: Option<u16>) -> Service {
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let proxy = proxy_to.map_or(String::new(), |p| {
            format!("proxy:\n  remoteurl: http://127.0.0.1:{p}\n")
        });
        let access_log_disabled = proxy_to.is_some();
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: {access_log_disabled}\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{proxy}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        Service::spawn(
            Command::new("docker-registry").arg("serve").arg(&config),
            port,
            &dir.join("log"),
        )
    }

    pub fn nginx(dir: &Path, body: &str) -> Service {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
                 http {{\n access_log off;\n sendfile on;\n tcp_nopush on;\n keepalive_requests 100000;\n\
                 client_body_temp_path {d}/tmp/body;\n proxy_temp_path {d}/tmp/proxy;\n fastcgi_temp_path {d}/tmp/fcgi;\n\
                 uwsgi_temp_path {d}/tmp/uwsgi;\n scgi_temp_path {d}/tmp/scgi;\n\
                 server {{\n  listen 127.0.0.1:{port};\n{body}\n }}\n}}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        Service::spawn(
            Command::new("nginx").arg("-c").arg(&conf),
            port,
            &dir.join("stdout.log"),
        )
    }

    /// regmirror (the release build) on `port`, configured with `config`.
    pub fn regmirror(dir: &Path, port: u16, config: &str) -> Service {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/regmirror");
        Service::regmirror_binary(&binary, dir, port, config)
    }

    /// regmirror from another build (`binary`), for a paired A/B of two builds.
    pub fn regmirror_binary(binary: &Path, dir: &Path, port: u16, config: &str) -> Service {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("regmirror.toml");
        std::fs::write(&path, config).unwrap();
        Service::spawn(
            Command::new(binary).args(["serve", "--config"]).arg(&path),
            port,
            &dir.join("log"),
        )
    }

    /// nginx as a caching proxy in front of the registry at `origin` (`proxy_cache_lock`: one
    /// fetch for all waiters).
    pub fn nginx_proxy_cache(dir: &Path, origin: u16) -> Service {
        Service::nginx(
            dir,
            &format!(
                "  location / {{\n   proxy_pass http://127.0.0.1:{origin};\n   proxy_http_version 1.1;\n   proxy_cache reg;\n\
                 proxy_cache_lock on;\n   proxy_cache_lock_timeout 10m;\n   proxy_cache_lock_age 10m;\n   proxy_cache_valid 200 1d;\n\
                 proxy_buffering on;\n  }}\n }}\n proxy_cache_path {}/cache levels=1:2 keys_zone=reg:10m max_size=50g inactive=1d use_temp_path=off;\n server {{\n  listen 127.0.0.1:{};\n  return 404;",
                dir.display(),
                free_port()
            ),
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory of the process (and its children, for nginx's workers).
    pub fn peak_rss_mib(&self) -> f64 {
        status_field_mib(self.pid(), "VmHWM:")
    }

    /// [`Service::cpu_seconds`] once the process has gone quiet: less than 1 % of a core over
    /// its last second (or after 30 s).
    pub fn settled_cpu_seconds(&self) -> f64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut last = self.cpu_seconds();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = self.cpu_seconds();
            if now - last < 0.01 || std::time::Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// User + system CPU seconds of the process and its children.
    pub fn cpu_seconds(&self) -> f64 {
        let ticks = 100.0; // USER_HZ on Linux
        std::iter::once(self.pid())
            .chain(children(self.pid()))
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .map(|stat| {
                let fields: Vec<&str> = stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                let field = |i: usize| {
                    fields
                        .get(i)
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                (field(11) + field(12)) / ticks
            })
            .sum()
    }
}

/// A `/proc/<pid>/status` field in MiB, summed over the process and its children.
pub fn status_field_mib(pid: u32, field: &str) -> f64 {
    let mut total = 0.0;
    for pid in std::iter::once(pid).chain(children(pid)) {
        total += file_field_mib(&format!("/proc/{pid}/status"), field);
    }
    total
}

/// A `field:  N kB` line of a `/proc` file (`/proc/meminfo`, a `status`) in MiB; 0 if absent.
pub fn file_field_mib(path: &str, field: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Samples a process's anonymous resident memory (its own heap and stacks, not the page-cache
/// pages it maps) every 20 ms and keeps the peak: the kernel keeps no high-water mark for it.
pub struct AnonPeak {
    stop: Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<f64>,
}

impl AnonPeak {
    pub fn start(pid: u32) -> AnonPeak {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let sampler = std::thread::spawn(move || {
            let mut peak = 0.0f64;
            while !stopping.load(Ordering::Relaxed) {
                peak = peak.max(status_field_mib(pid, "RssAnon:"));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        AnonPeak { stop, sampler }
    }

    pub fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap_or(0.0)
    }
}

pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The origin's access log (combined format, one line per request, written when the request
/// ends): what the origin sent is read from it, so mirrors reach the origin directly, on the same
/// path as the direct measurements.
pub struct OriginLog {
    pub path: PathBuf,
}

impl OriginLog {
    /// Bytes the origin has sent for requests of `request_path`, once its log stops growing (a
    /// request is logged when it ends).
    pub fn bytes_sent(&self, request_path: &str) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.sum(request_path);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.sum(request_path);
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// The size field of every logged request for `request_path`:
    /// `host - - [time] "GET /path HTTP/1.1" 200 SIZE "referer" "agent"`.
    pub fn sum(&self, request_path: &str) -> u64 {
        let needle = format!(" {request_path} HTTP/");
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&needle))
            .filter_map(|line| {
                line.split('"')
                    .nth(2)?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }
}

/// A seeded blob: digest and size.
#[derive(Clone)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

/// Writes `size` incompressible bytes to a file, hashing on the way, and pushes them to `repo`.
pub fn seed_blob(dir: &Path, origin: &Service, repo: &str, size: u64, salt: u64) -> Blob {
    let file = dir.join(format!("blob-{size}-{salt}"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
    let mut hasher = Hasher::default();
    let mut x: u64 = (size ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
    let mut chunk = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for word in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        hasher.update(&chunk);
        out.write_all(&chunk).unwrap();
    }
    out.flush().unwrap();
    drop(out);
    let digest = hasher.finish();
    upload(origin, repo, &file, &digest);
    std::fs::remove_file(&file).unwrap();
    Blob { digest, size }
}

/// Pushes the file at `path` as blob `digest` of `repo`: the registry API's POST then PUT.
pub fn upload(origin: &Service, repo: &str, path: &Path, digest: &Digest) {
    let location = curl(&[
        "-s",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        &format!("http://127.0.0.1:{}/v2/{repo}/blobs/uploads/", origin.port),
    ]);
    let location = location
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .expect("upload location")
        .trim()
        .to_string();
    let sep = if location.contains('?') { '&' } else { '?' };
    let code = curl_status(&[
        "-X",
        "PUT",
        "-T",
        path.to_str().unwrap(),
        &format!("{location}{sep}digest={digest}"),
    ]);
    assert_eq!(code.trim(), "201", "pushing blob {digest}");
}

/// Pushes an image manifest as `repo:latest`; returns its digest.
pub fn push_manifest(origin: &Service, repo: &str, config: &Blob, layers: &[Blob]) -> Digest {
    let layers: Vec<String> = layers
        .iter()
        .map(|l| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","size":{},"digest":"{}"}}"#,
                l.size, l.digest
            )
        })
        .collect();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":{},"digest":"{}"}},"layers":[{}]}}"#,
        config.size,
        config.digest,
        layers.join(",")
    );
    let code = curl_status(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &manifest,
        &format!(
            "http://127.0.0.1:{}/v2/{repo}/manifests/latest",
            origin.port
        ),
    ]);
    assert_eq!(code.trim(), "201", "pushing the manifest");
    Digest::of(manifest.as_bytes())
}

/// Pushes `bytes` as one blob.
pub fn push_bytes(dir: &Path, origin: &Service, repo: &str, bytes: &[u8]) -> Blob {
    let file = dir.join("upload");
    std::fs::write(&file, bytes).unwrap();
    let digest = Digest::of(bytes);
    upload(origin, repo, &file, &digest);
    Blob {
        digest,
        size: bytes.len() as u64,
    }
}

/// The HTTP status of a curl request, its body discarded.
pub fn curl_status(args: &[&str]) -> String {
    let quiet = ["-s", "-o", "/dev/null", "-w", "%{http_code}"];
    curl(&[&quiet[..], args].concat())
}

pub fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(args).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every workload starts on a quiet machine: dirty pages written back (the previous workload's
/// cache writes, whoever made them), then a moment for background work to end.
pub fn quiesce() {
    let _ = Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(500));
}

/// Puts free memory in one state before a workload that writes `bytes` into the page cache.
/// On a VM whose host takes back guest memory that stays free (free page reporting, as on this
/// VM kind, at about 128 MiB/s), the first write into such a page costs the guest a fault in the
/// host: writing 4 GiB into the page cache took 3.3-3.9 s of system time into memory free for
/// 10 s or more, and 1.5-1.8 s into pages freed a moment before. A mirror filling right after
/// another freed its cache ran at up to twice the speed of one filling after a subject that
/// writes nothing. So before each cold fill, `MEMORY` decides: `warm` (the default) touches
/// `bytes` and a quarter more of memory and frees it at once, so every subject writes into
/// pages just freed, as on a busy cache whose page cache recycles its own pages; `cold` rests
/// 10 s, so every subject writes into memory the host has taken back, as on a quiet VM.
pub fn settle_memory(bytes: u64) {
    match std::env::var("MEMORY").as_deref() {
        Ok("cold") => std::thread::sleep(Duration::from_secs(10)),
        _ => {
            // Never more than half of what the machine has available.
            let available = file_field_mib("/proc/meminfo", "MemAvailable:") * MIB as f64;
            let len = (bytes + bytes / 4).min((available / 2.0) as u64) as usize;
            let mut touched = vec![0u8; len];
            for page in touched.chunks_mut(4096) {
                page[0] = 1;
            }
            std::hint::black_box(&touched);
        }
    }
}

pub fn mib_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB as f64 / seconds.max(1e-9)
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Samples of each measure of each subject, over rounds; their medians are what benches print.
#[derive(Default)]
pub struct Samples {
    samples: std::collections::BTreeMap<(String, String), Vec<f64>>,
}

impl Samples {
    pub fn record(&mut self, subject: &str, measure: &str, value: f64) {
        self.samples
            .entry((measure.to_string(), subject.to_string()))
            .or_default()
            .push(value);
    }

    pub fn median(&self, measure: &str, subject: &str) -> Option<f64> {
        let mut v = self
            .samples
            .get(&(measure.to_string(), subject.to_string()))?
            .clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        Some(v[v.len() / 2])
    }

    /// Every measure recorded, in order (once per subject that has it).
    pub fn measures(&self) -> Vec<String> {
        self.samples.keys().map(|(m, _)| m.clone()).collect()
    }
}
