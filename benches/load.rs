//! The side-by-side load bench: one origin (Debian's `docker-registry`) and three mirrors in front
//! of it — regmirror, distribution in proxy mode and nginx as a caching proxy — plus the direct
//! path and the machine's limits, measured in one run, alternating, over several rounds.
//!
//! Run with: `benches/load.sh` (installs docker-registry, nginx-light, wrk, curl and skopeo,
//! builds release, then runs this). Environment: `ROUNDS` (default 3), `SIZES_MIB` (default
//! `512,2048`), `LAYERS` x `LAYER_MIB` for the image pulled by skopeo (default 10 x 32),
//! `WRK_SECONDS` (default 5), `KEEP=1` to keep the work directory.
//!
//! Mirrors reach the origin directly, as the direct path does; "bytes the origin sent" is read
//! from the origin's access log (the size of every response it logged), so it is measured, not
//! inferred. Clients are curl (bulk transfers), wrk (GETs of small
//! objects at 64 connections), a HEAD driver of its own (64 keep-alive connections; wrk cannot
//! drive HEAD: its parser waits for the body a HEAD answer announces) and skopeo (a whole image).
//! Peak RSS (and, sampled, peak anonymous RSS) and CPU seconds come from /proc.

mod harness;

use harness::*;
use regmirror::digest::{Digest, Hasher};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const REPO: &str = "bench/blob";
/// The repository of the image skopeo pulls.
const IMAGE_REPO: &str = "bench/image";
/// What docker, containerd and podman send for manifests.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

fn main() {
    let rounds: usize = env("ROUNDS", 3);
    let sizes: Vec<u64> = std::env::var("SIZES_MIB")
        .unwrap_or_else(|_| "512,2048".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let work = tempfile::Builder::new()
        .prefix("regmirror-bench-")
        .tempdir()
        .expect("work dir");
    let dir = work.path().to_path_buf();
    println!("work dir {}", dir.display());

    let origin = Service::docker_registry(&dir.join("origin"), None);
    let origin_log = OriginLog {
        path: dir.join("origin").join("log"),
    };
    let mut blobs = Vec::new();
    for &size in &sizes {
        blobs.push(seed_blob(&dir, &origin, REPO, size * MIB, 1));
    }
    // A second blob of the first size, for the concurrent cold clients.
    let shared = seed_blob(&dir, &origin, REPO, sizes[0] * MIB, 2);
    let small = seed_blob(&dir, &origin, REPO, MIB, 3);
    let manifest = push_manifest(&origin, REPO, &small, &[]);
    let (layer_count, layer_mib): (u64, u64) = (env("LAYERS", 10), env("LAYER_MIB", 32));
    let layers: Vec<Blob> = (0..layer_count)
        .map(|i| seed_blob(&dir, &origin, IMAGE_REPO, layer_mib * MIB, 100 + i))
        .collect();
    push_manifest(
        &origin,
        IMAGE_REPO,
        &small_config(&dir, &origin, &layers),
        &layers,
    );
    println!(
        "origin seeded: {sizes:?} MiB blobs, a 1 MiB blob, a manifest, and a {layer_count} x {layer_mib} MiB image"
    );

    let mut results = Results::default();
    let statics = limits(&dir, &blobs[0], &mut results);
    let image_mib = (layer_count * layer_mib) as f64;
    for round in 0..rounds {
        println!("round {}/{rounds}", round + 1);
        for kind in MirrorKind::ALL {
            let mirror_dir = dir.join(format!("{}-{round}", kind.name()));
            let mirror = Mirror::start(kind, &mirror_dir, origin.port);
            let anon = AnonPeak::start(mirror.service.pid());
            run_workloads(
                round,
                &mirror,
                &origin_log,
                &blobs,
                &shared,
                &small,
                &manifest,
                &mut results,
            );
            // (5) a whole image, cold, pulled by a real client.
            quiesce();
            let seconds = skopeo_pull(&dir, mirror.service.port, kind.name());
            results.record(kind.name(), "skopeo image pull ms", seconds * 1000.0);
            results.record(kind.name(), "skopeo image pull MiB/s", image_mib / seconds);
            results.record(kind.name(), "peak RSS MiB", mirror.service.peak_rss_mib());
            results.record(kind.name(), "peak anonymous RSS MiB", anon.finish());
            drop(mirror);
            // Each mirror holds a copy of every blob: keep the disk from filling up.
            if std::env::var("KEEP").is_err() {
                let _ = std::fs::remove_dir_all(&mirror_dir);
            }
        }
        direct(&origin, &blobs, &shared, &mut results);
        statics.measure(&mut results);
        quiesce();
        let seconds = skopeo_pull(&dir, origin.port, "direct");
        results.record("direct", "skopeo image pull ms", seconds * 1000.0);
        results.record("direct", "skopeo image pull MiB/s", image_mib / seconds);
    }
    results.print();
    results.print_targets(&sizes);
    if std::env::var("KEEP").is_ok() {
        let kept = work.keep();
        println!("kept {}", kept.display());
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MirrorKind {
    Regmirror,
    Distribution,
    Nginx,
}

impl MirrorKind {
    const ALL: [MirrorKind; 3] = [
        MirrorKind::Regmirror,
        MirrorKind::Distribution,
        MirrorKind::Nginx,
    ];

    fn name(self) -> &'static str {
        match self {
            MirrorKind::Regmirror => "regmirror",
            MirrorKind::Distribution => "distribution",
            MirrorKind::Nginx => "nginx",
        }
    }
}

struct Mirror {
    kind: MirrorKind,
    service: Service,
}

impl Mirror {
    fn start(kind: MirrorKind, dir: &Path, origin: u16) -> Mirror {
        std::fs::create_dir_all(dir).unwrap();
        let service = match kind {
            MirrorKind::Regmirror => {
                let port = free_port();
                let config = format!(
                    "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n[log]\nlevel = \"warn\"\n\
                     [[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\nurl = \"http://127.0.0.1:{origin}\"\n",
                    dir.join("cache").display().to_string()
                );
                Service::regmirror(dir, port, &config)
            }
            MirrorKind::Distribution => Service::docker_registry(dir, Some(origin)),
            MirrorKind::Nginx => Service::nginx_proxy_cache(dir, origin),
        };
        Mirror { kind, service }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.service.port)
    }
}

fn blob_path(blob: &Blob) -> String {
    format!("/v2/{REPO}/blobs/{}", blob.digest)
}

/// An image configuration naming `layers` (uncompressed: their digests are their diff IDs).
fn small_config(dir: &Path, origin: &Service, layers: &[Blob]) -> Blob {
    let diff_ids: Vec<String> = layers.iter().map(|l| format!("\"{}\"", l.digest)).collect();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
        diff_ids.join(",")
    );
    push_bytes(dir, origin, IMAGE_REPO, config.as_bytes())
}

/// skopeo copies the image from the registry at `port` to a directory: wall seconds.
fn skopeo_pull(dir: &Path, port: u16, who: &str) -> f64 {
    let dest = dir.join(format!("pulled-{who}"));
    let _ = std::fs::remove_dir_all(&dest);
    let started = Instant::now();
    let status = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--retry-times=0",
        ])
        .arg(format!("docker://127.0.0.1:{port}/{IMAGE_REPO}:latest"))
        .arg(format!("dir:{}", dest.display()))
        .status()
        .expect("skopeo (run benches/load.sh)");
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success(), "skopeo could not pull through {who}");
    std::fs::remove_dir_all(&dest).unwrap();
    seconds
}

/// One download: (time to first byte s, total s, bytes).
fn fetch(url: &str) -> (f64, f64, u64) {
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-H",
        &format!("Accept: {ACCEPT}"),
        "-w",
        "%{time_starttransfer} %{time_total} %{size_download}",
        url,
    ]);
    let mut parts = out
        .split_whitespace()
        .map(|p| p.parse::<f64>().unwrap_or(0.0));
    let (ttfb, total, bytes) = (
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
    );
    (ttfb, total, bytes as u64)
}

/// `n` concurrent downloads; returns (wall s, ttfbs, all complete).
fn fetch_concurrently(url: &str, n: usize, size: u64) -> (f64, Vec<f64>, bool) {
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let url = url.to_string();
            std::thread::spawn(move || fetch(&url))
        })
        .collect();
    let results: Vec<(f64, f64, u64)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let complete = results.iter().all(|r| r.2 == size);
    (
        started.elapsed().as_secs_f64(),
        results.iter().map(|r| r.0).collect(),
        complete,
    )
}

/// Workload (3)'s clients: 16 downloads of `blob` from `url` at once; records the wall time
/// until all end and their median time to first byte.
fn sixteen_at_once(results: &mut Results, subject: &str, url: &str, blob: &Blob) {
    let (wall, ttfbs, complete) = fetch_concurrently(url, 16, blob.size);
    assert!(complete, "{subject}: a concurrent download was incomplete");
    let mib = blob.size / MIB;
    results.record(subject, &format!("16 cold x {mib} MiB wall s"), wall);
    results.record(
        subject,
        &format!("16 cold x {mib} MiB ttfb p50 ms"),
        percentile(&ttfbs, 0.5) * 1000.0,
    );
}

#[allow(clippy::too_many_arguments)]
fn run_workloads(
    round: usize,
    mirror: &Mirror,
    origin_log: &OriginLog,
    blobs: &[Blob],
    shared: &Blob,
    small: &Blob,
    manifest: &Digest,
    results: &mut Results,
) {
    let name = mirror.kind.name();
    let cpu_before = mirror.service.cpu_seconds();
    let mut delivered = 0u64;
    // Hits alone (the warm transfers), for the per-GiB CPU target on hits.
    let (mut hit_cpu, mut hit_bytes) = (0.0, 0u64);
    // (3) 16 concurrent cold clients on one blob: wall time, first bytes, what the origin sent.
    quiesce();
    let before = origin_log.bytes_sent(&blob_path(shared));
    sixteen_at_once(results, name, &mirror.url(&blob_path(shared)), shared);
    let mib = shared.size / MIB;
    results.record(
        name,
        &format!("16 cold x {mib} MiB origin sent x"),
        (origin_log.bytes_sent(&blob_path(shared)) - before) as f64 / shared.size as f64,
    );
    delivered += 16 * shared.size;
    // (1) cold miss, one client; (2) warm hits at 1, 8 and 32 clients.
    for blob in blobs {
        let mib = blob.size / MIB;
        quiesce();
        let (ttfb, total, bytes) = fetch(&mirror.url(&blob_path(blob)));
        assert_eq!(
            bytes, blob.size,
            "{name}: cold download of {mib} MiB incomplete"
        );
        results.record(
            name,
            &format!("cold {mib} MiB MiB/s"),
            mib_per_s(bytes, total),
        );
        results.record(name, &format!("cold {mib} MiB ttfb ms"), ttfb * 1000.0);
        delivered += blob.size;
        for clients in [1usize, 8, 32] {
            quiesce();
            let hit_cpu_before = mirror.service.cpu_seconds();
            let (wall, _, complete) =
                fetch_concurrently(&mirror.url(&blob_path(blob)), clients, blob.size);
            hit_cpu += mirror.service.cpu_seconds() - hit_cpu_before;
            hit_bytes += blob.size * clients as u64;
            assert!(complete, "{name}: warm downloads incomplete");
            results.record(
                name,
                &format!("warm {mib} MiB x{clients} MiB/s"),
                mib_per_s(blob.size * clients as u64, wall),
            );
            delivered += blob.size * clients as u64;
        }
    }
    let gib = delivered as f64 / (1u64 << 30) as f64;
    let cpu = mirror.service.cpu_seconds() - cpu_before;
    results.record(name, "CPU s per GiB served (bulk)", cpu / gib);
    let hit_gib = hit_bytes as f64 / (1u64 << 30) as f64;
    results.record(name, "CPU s per GiB served (warm hits)", hit_cpu / hit_gib);
    // (4) small objects at 64 connections.
    let manifest_by_digest = mirror.url(&format!("/v2/{REPO}/manifests/{manifest}"));
    let manifest_by_tag = mirror.url(&format!("/v2/{REPO}/manifests/latest"));
    let small_blob = mirror.url(&blob_path(small));
    // Each round starts the small-object workloads at a different one, so that no workload is
    // always the first after the bulk transfers (or after the other kind of client).
    let mut gets = [
        ("manifest by digest GET", &manifest_by_digest),
        ("manifest by tag GET", &manifest_by_tag),
        ("1 MiB blob GET", &small_blob),
    ];
    let count = gets.len();
    gets.rotate_left(round % count);
    for (label, url) in gets {
        let _ = fetch(url); // warm it
        quiesce();
        if let Some(measured) = wrk(url) {
            measured.record(results, name, label);
        }
    }
    let seconds = env("WRK_SECONDS", 5);
    let mut heads = [
        (
            "manifest by digest HEAD",
            format!("/v2/{REPO}/manifests/{manifest}"),
        ),
        ("1 MiB blob HEAD", blob_path(small)),
    ];
    let count = heads.len();
    heads.rotate_left(round % count);
    for (label, path) in heads {
        quiesce();
        if let Some(measured) = head_load(mirror.service.port, &path, 64, seconds) {
            measured.record(results, name, label);
        }
    }
}

/// Requests per second and latency percentiles of a small-object workload.
struct Throughput {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Throughput {
    fn record(&self, results: &mut Results, subject: &str, label: &str) {
        results.record(subject, &format!("{label} req/s"), self.rps);
        results.record(subject, &format!("{label} p50 ms"), self.p50_ms);
        results.record(subject, &format!("{label} p99 ms"), self.p99_ms);
    }
}

/// `connections` keep-alive connections, one thread each, sending HEAD requests back to back
/// for `seconds` (reconnecting when the server closes); `None` if any answer is not 200.
fn head_load(port: u16, path: &str, connections: usize, seconds: u64) -> Option<Throughput> {
    let request =
        format!("HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {ACCEPT}\r\n\r\n");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let request = request.clone();
            std::thread::spawn(move || -> Option<Vec<f64>> {
                let mut latencies = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                let mut stream: Option<TcpStream> = None;
                while Instant::now() < deadline {
                    let connection = match &mut stream {
                        Some(s) => s,
                        None => {
                            let s = TcpStream::connect(("127.0.0.1", port)).ok()?;
                            s.set_nodelay(true).ok()?;
                            stream.insert(s)
                        }
                    };
                    let sent = Instant::now();
                    match head_once(connection, request.as_bytes(), &mut buf) {
                        Some(true) => latencies.push(sent.elapsed().as_secs_f64() * 1000.0),
                        Some(false) => return None,
                        None => stream = None, // closed by the server: reconnect
                    }
                }
                Some(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        match worker.join().ok().flatten() {
            Some(latencies) => all.extend(latencies),
            None => {
                println!("HEAD {path} on port {port}: an answer was not 200; not measured");
                return None;
            }
        }
    }
    Some(Throughput {
        rps: all.len() as f64 / started.elapsed().as_secs_f64(),
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
    })
}

/// One HEAD on a keep-alive connection: `Some(status is 200)`, or `None` when the connection
/// closed (the answer to a HEAD ends with its headers).
fn head_once(stream: &mut TcpStream, request: &[u8], buf: &mut [u8]) -> Option<bool> {
    stream.write_all(request).ok()?;
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).ok()?;
        if n == 0 {
            return None;
        }
        filled += n;
        if buf[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
            return Some(buf.starts_with(b"HTTP/1.1 200"));
        }
        if filled == buf.len() {
            return Some(false);
        }
    }
}

/// wrk GETs at 64 connections for a few seconds.
fn wrk(url: &str) -> Option<Throughput> {
    let script = std::env::temp_dir().join("regmirror-bench-get.lua");
    std::fs::write(&script, format!("wrk.headers[\"Accept\"] = \"{ACCEPT}\"\n")).ok()?;
    let seconds: u64 = env("WRK_SECONDS", 5);
    let out = Command::new("wrk")
        .args(["-t2", "-c64", &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(&script)
        .arg(url)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let latency = |pct: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(pct))
            .map(|v| to_ms(v.trim()))
    };
    Some(Throughput {
        rps,
        p50_ms: latency("50%")?,
        p99_ms: latency("99%")?,
    })
}

fn to_ms(value: &str) -> f64 {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let n: f64 = number.parse().unwrap_or(0.0);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => n,
    }
}

/// The direct path: each blob by one client, and the 16 concurrent clients of workload (3), each
/// straight from the origin (the reference for the mirrors' first bytes under that load).
fn direct(origin: &Service, blobs: &[Blob], shared: &Blob, results: &mut Results) {
    quiesce();
    let url = format!("http://127.0.0.1:{}{}", origin.port, blob_path(shared));
    sixteen_at_once(results, "direct", &url, shared);
    for blob in blobs {
        quiesce();
        let (ttfb, total, bytes) = fetch(&format!(
            "http://127.0.0.1:{}{}",
            origin.port,
            blob_path(blob)
        ));
        let mib = blob.size / MIB;
        results.record(
            "direct",
            &format!("cold {mib} MiB MiB/s"),
            mib_per_s(bytes, total),
        );
        results.record("direct", &format!("cold {mib} MiB ttfb ms"), ttfb * 1000.0);
    }
}

/// The machine's limits measured once: sha256 in memory, writing a new file (buffered, and with
/// fdatasync); starts the static server whose limits are measured each round.
fn limits(dir: &Path, blob: &Blob, results: &mut Results) -> StaticFiles {
    let data = vec![0x5au8; 256 * MIB as usize];
    let started = Instant::now();
    let mut hasher = Hasher::default();
    hasher.update(&data);
    let _ = hasher.finish();
    results.record(
        "limit",
        "sha256 MiB/s",
        mib_per_s(data.len() as u64, started.elapsed().as_secs_f64()),
    );
    results.record(
        "limit",
        "sha256 check",
        f64::from(Digest::of(&data[..1]) == Digest::of(&[0x5a])),
    );
    for (label, sync) in [
        ("file write MiB/s", false),
        ("file write+fdatasync MiB/s", true),
    ] {
        // 1 MiB writes to a new file; the best of three, each on a quiet machine.
        let path = dir.join("write-limit");
        let mut best = 0.0f64;
        for _ in 0..3 {
            quiesce();
            let started = Instant::now();
            let mut file = std::fs::File::create(&path).unwrap();
            for chunk in data.chunks(MIB as usize) {
                file.write_all(chunk).unwrap();
            }
            if sync {
                file.sync_data().unwrap();
            }
            drop(file);
            let seconds = started.elapsed().as_secs_f64();
            best = best.max(mib_per_s(data.len() as u64, seconds));
            std::fs::remove_file(&path).unwrap();
        }
        results.record("limit", label, best);
    }
    StaticFiles::start(dir, &data, blob.size.min(256 * MIB))
}

/// nginx serving a file with `sendfile` from the page cache: the machine's limit for hits,
/// measured every round next to the mirrors (a single sample moved 1.5-3.3 GiB/s between runs).
struct StaticFiles {
    nginx: Service,
    size: u64,
}

impl StaticFiles {
    /// Writes a `size`-byte file and a 1 MiB one from `data`, and serves them.
    fn start(dir: &Path, data: &[u8], size: u64) -> StaticFiles {
        let root = dir.join("static");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("small"), &data[..MIB as usize]).unwrap();
        std::fs::write(root.join("file"), &data[..size as usize]).unwrap();
        let nginx = Service::nginx(
            &dir.join("nginx-static"),
            &format!("  root {};", root.display()),
        );
        let _ = fetch(&format!("http://127.0.0.1:{}/file", nginx.port));
        StaticFiles { nginx, size }
    }

    /// One round of the static workloads: the file to 1, 8 and 32 clients, then the 1 MiB file
    /// by GET and HEAD at 64 connections.
    fn measure(&self, results: &mut Results) {
        let url = format!("http://127.0.0.1:{}/file", self.nginx.port);
        for clients in [1usize, 8, 32] {
            quiesce();
            let (wall, _, _) = fetch_concurrently(&url, clients, self.size);
            results.record(
                "limit",
                &format!("static x{clients} MiB/s"),
                mib_per_s(self.size * clients as u64, wall),
            );
        }
        quiesce();
        let small = format!("http://127.0.0.1:{}/small", self.nginx.port);
        if let Some(measured) = wrk(&small) {
            measured.record(results, "limit", "1 MiB blob GET");
        }
        quiesce();
        let seconds = env("WRK_SECONDS", 5);
        if let Some(measured) = head_load(self.nginx.port, "/small", 64, seconds) {
            measured.record(results, "limit", "1 MiB blob HEAD");
        }
    }
}

/// Medians per (subject, measure) over rounds.
type Results = Samples;

impl Results {
    /// The targets that compare regmirror with a limit rather than with a peer.
    fn print_targets(&self, sizes: &[u64]) {
        println!("\nregmirror against the limits (medians):");
        let ours = |m: &str| self.median(m, "regmirror");
        for mib in sizes {
            let cold = format!("cold {mib} MiB MiB/s");
            let limit = [
                self.median(&cold, "direct"),
                self.median("sha256 MiB/s", "limit"),
                self.median("file write MiB/s", "limit"),
            ]
            .into_iter()
            .flatten()
            .fold(f64::INFINITY, f64::min);
            if let Some(v) = ours(&cold) {
                println!(
                    "  {cold}: {v:.0} = {:.2} x the fill limit {limit:.0} (min of direct, sha256, file write)",
                    v / limit
                );
            }
        }
        let first_bytes = format!("16 cold x {} MiB ttfb p50 ms", sizes[0]);
        if let (Some(v), Some(d)) = (ours(&first_bytes), self.median(&first_bytes, "direct")) {
            println!(
                "  {first_bytes}: {v:.1} = {:.2} x direct's {d:.1} (16 clients straight to the origin)",
                v / d
            );
        }
        for (measure, limit) in [
            (format!("warm {} MiB x1 MiB/s", sizes[0]), "static x1 MiB/s"),
            ("1 MiB blob GET req/s".to_string(), "1 MiB blob GET req/s"),
        ] {
            if let (Some(v), Some(l)) = (ours(&measure), self.median(limit, "limit")) {
                println!("  {measure}: {v:.0} = {:.2} x static {l:.0}", v / l);
            }
        }
    }

    fn print(&self) {
        let measures: Vec<String> = {
            let mut m: Vec<String> = self.measures();
            m.dedup();
            m
        };
        println!(
            "\n{:<28} {:>11} {:>13} {:>11} {:>11} {:>11}  ratios regmirror/…",
            "measure (median)", "regmirror", "distribution", "nginx", "direct", "limit"
        );
        for measure in measures {
            let cell = |s: &str| {
                self.median(&measure, s).map_or("-".to_string(), |v| {
                    // Figures below 1 (CPU seconds per GiB) need a second decimal.
                    if v.abs() < 1.0 {
                        format!("{v:.2}")
                    } else {
                        format!("{v:.1}")
                    }
                })
            };
            let ours = self.median(&measure, "regmirror");
            let ratio = |s: &str| match (ours, self.median(&measure, s)) {
                (Some(a), Some(b)) if b > 0.0 => format!("{s} {:.2}", a / b),
                _ => String::new(),
            };
            println!(
                "{:<28} {:>11} {:>13} {:>11} {:>11} {:>11}  {} {} {}",
                measure,
                cell("regmirror"),
                cell("distribution"),
                cell("nginx"),
                cell("direct"),
                cell("limit"),
                ratio("distribution"),
                ratio("nginx"),
                ratio("direct")
            );
        }
    }
}
