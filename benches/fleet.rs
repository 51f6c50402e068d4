//! The fleet bench: many clients pulling one cold image at once, spread over three regmirror
//! replicas that share a bucket and know each other (`[cluster]`), against the same three
//! without `[cluster]` (bucket only), one regmirror, one nginx (`proxy_cache_lock on`), and the
//! origin directly. One origin (Debian's `docker-registry`, its access log read for the bytes it
//! sent) and one S3 server (`s3s-fs`) on loopback.
//!
//! Each client does what dockerd does: the manifest by tag, the config, then the layers three at
//! a time, each download on a keep-alive connection of its own, read 1 MiB at a time and hashed
//! (pulling clients verify every layer). Client `i` pulls through replica `i % 3`.
//!
//! Reported per subject (medians over rounds, every round cold: fresh disks and bucket):
//! origin bytes sent per image byte (the goal for a fleet is 1.0), wall time until the last
//! client is done, clients' first layer byte after the start (median and slowest), CPU seconds
//! of every process (mirrors and S3 server together) and the largest peak RSS of one mirror
//! process. Every process runs on this one machine: the replicas share its cores and disk, so
//! wall time measures the cost of the cluster, not what three machines would add.
//!
//! Run with: `benches/fleet.sh`. Environment: `ROUNDS` (default 3), `CLIENTS` (default 12),
//! `LAYERS` x `LAYER_MIB` (default 6 x 64).

mod harness;

use harness::client::Connection;
use harness::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const REPO: &str = "bench/fleet";
const SECRET: &str = "a-cluster-secret-for-the-fleet-bench";
/// Layers each client downloads at once (dockerd's default).
const PARALLEL_LAYERS: usize = 3;

fn main() {
    let rounds: usize = env("ROUNDS", 3);
    let clients: usize = env("CLIENTS", 12);
    let (layer_count, layer_mib): (u64, u64) = (env("LAYERS", 6), env("LAYER_MIB", 64));
    let work = tempfile::Builder::new()
        .prefix("regmirror-fleet-")
        .tempdir()
        .expect("work dir");
    let dir = work.path().to_path_buf();
    let origin = Service::docker_registry(&dir.join("origin"), None);
    let origin_log = OriginLog {
        path: dir.join("origin").join("log"),
    };
    let layers: Vec<Blob> = (0..layer_count)
        .map(|i| seed_blob(&dir, &origin, REPO, layer_mib * MIB, 500 + i))
        .collect();
    let config = push_bytes(
        &dir,
        &origin,
        REPO,
        br#"{"architecture":"amd64","os":"linux"}"#,
    );
    push_manifest(&origin, REPO, &config, &layers);
    let image_bytes: u64 = layers.iter().map(|l| l.size).sum::<u64>() + config.size;
    println!(
        "origin seeded: {REPO}:latest, {layer_count} x {layer_mib} MiB layers; {clients} clients \
         pull it at once, {PARALLEL_LAYERS} layers at a time each, {rounds} rounds"
    );
    let mut blobs = layers.clone();
    blobs.push(config.clone());

    let mut results: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        println!("round {}/{rounds}", round + 1);
        for subject in Subject::ALL {
            let subject_dir = dir.join(format!("subject{}-{round}", subject as usize));
            let fleet = Fleet::start(subject, &subject_dir, origin.port);
            let before: u64 = blobs.iter().map(|b| origin_log.sum(&blob_path(b))).sum();
            quiesce();
            let cpu_before = fleet.cpu_seconds();
            let pull = pull_at_once(&fleet.ports, clients, &layers, &config);
            let cpu = fleet.cpu_seconds() - cpu_before;
            let after: u64 = blobs
                .iter()
                .map(|b| origin_log.bytes_sent(&blob_path(b)))
                .sum();
            let name = subject.name();
            let mut record = |measure: &'static str, value: f64| {
                results.entry((measure, name)).or_default().push(value);
            };
            record(
                "origin bytes / image bytes",
                (after - before) as f64 / image_bytes as f64,
            );
            record("wall s", pull.wall);
            record(
                "first byte p50 ms",
                percentile(&pull.first_bytes, 0.5) * 1000.0,
            );
            record(
                "first byte max ms",
                percentile(&pull.first_bytes, 1.0) * 1000.0,
            );
            record(
                "aggregate MiB/s",
                (image_bytes * clients as u64) as f64 / MIB as f64 / pull.wall,
            );
            if subject != Subject::Direct {
                record("CPU s (mirrors and S3 server)", cpu);
                record("peak RSS MiB (largest process)", fleet.peak_rss_mib());
            }
            println!(
                "  {name:<24} wall {:.2} s, origin sent {:.2} x the image",
                pull.wall,
                (after - before) as f64 / image_bytes as f64
            );
            drop(fleet);
            let _ = std::fs::remove_dir_all(&subject_dir);
        }
    }
    print(&results);
}

/// What serves the clients.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Subject {
    /// Three replicas sharing a bucket, with `[cluster]`.
    Cluster,
    /// The same three without `[cluster]`: the bucket alone.
    BucketOnly,
    /// One regmirror.
    Single,
    /// One nginx with `proxy_cache_lock on`.
    Nginx,
    /// The origin itself.
    Direct,
}

impl Subject {
    const ALL: [Subject; 5] = [
        Subject::Cluster,
        Subject::BucketOnly,
        Subject::Single,
        Subject::Nginx,
        Subject::Direct,
    ];

    fn name(self) -> &'static str {
        match self {
            Subject::Cluster => "3 replicas, cluster",
            Subject::BucketOnly => "3 replicas, bucket only",
            Subject::Single => "1 regmirror",
            Subject::Nginx => "1 nginx",
            Subject::Direct => "direct",
        }
    }
}

/// The processes of one subject and the ports clients pull from.
struct Fleet {
    /// What clients pull from.
    services: Vec<Service>,
    /// The S3 server the replicas share.
    s3: Option<Service>,
    ports: Vec<u16>,
}

impl Fleet {
    fn start(subject: Subject, dir: &Path, origin: u16) -> Fleet {
        std::fs::create_dir_all(dir).unwrap();
        match subject {
            Subject::Cluster | Subject::BucketOnly => {
                let s3 = s3_server(dir);
                let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
                let mut services = Vec::new();
                for (i, &port) in ports.iter().enumerate() {
                    let replica_dir = dir.join(format!("replica{i}"));
                    let mut config = regmirror_config(&replica_dir, port, origin);
                    config += &format!(
                        "[shared_store]\nurl = \"s3://regmirror/fleet\"\nendpoint = \"http://127.0.0.1:{}\"\n\
                         region = \"us-east-1\"\nallow_http = true\naccess_key_id = \"bench\"\n\
                         secret_access_key = \"bench-secret\"\n",
                        s3.port
                    );
                    if subject == Subject::Cluster {
                        let peers: Vec<String> = ports
                            .iter()
                            .map(|p| format!("http://127.0.0.1:{p}"))
                            .collect();
                        config += &format!(
                            "[cluster]\nself = {:?}\npeers = {peers:?}\nsecret = {SECRET:?}\n",
                            peers[i]
                        );
                    }
                    services.push(Service::regmirror(&replica_dir, port, &config));
                }
                Fleet {
                    services,
                    s3: Some(s3),
                    ports,
                }
            }
            Subject::Single => {
                let port = free_port();
                let config = regmirror_config(dir, port, origin);
                let service = Service::regmirror(dir, port, &config);
                Fleet {
                    services: vec![service],
                    s3: None,
                    ports: vec![port],
                }
            }
            Subject::Nginx => {
                let service = Service::nginx_proxy_cache(dir, origin);
                let port = service.port;
                Fleet {
                    services: vec![service],
                    s3: None,
                    ports: vec![port],
                }
            }
            Subject::Direct => Fleet {
                services: Vec::new(),
                s3: None,
                ports: vec![origin],
            },
        }
    }

    /// CPU seconds of every process, the S3 server's included.
    fn cpu_seconds(&self) -> f64 {
        self.services
            .iter()
            .chain(&self.s3)
            .map(Service::cpu_seconds)
            .sum()
    }

    fn peak_rss_mib(&self) -> f64 {
        self.services
            .iter()
            .map(Service::peak_rss_mib)
            .fold(0.0, f64::max)
    }
}

/// A regmirror configuration: Docker Hub's name, the origin as its upstream.
fn regmirror_config(dir: &Path, port: u16, origin: u16) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n[log]\nlevel = \"warn\"\n\
         [[registry]]\nname = \"docker.io\"\ndefault = true\n\
         [[registry.upstream]]\nurl = \"http://127.0.0.1:{origin}\"\n",
        dir.join("cache").display().to_string()
    )
}

/// `s3s-fs` over a fresh directory holding the bucket `regmirror`.
fn s3_server(dir: &Path) -> Service {
    let root = dir.join("s3");
    std::fs::create_dir_all(root.join("regmirror")).unwrap();
    let port = free_port();
    let binary = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/s3s-fs"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("s3s-fs"));
    Service::spawn(
        Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", "bench", "--secret-key", "bench-secret"])
            .arg(&root),
        port,
        &dir.join("s3s-fs.log"),
    )
}

fn blob_path(blob: &Blob) -> String {
    format!("/v2/{REPO}/blobs/{}", blob.digest)
}

/// How one concurrent pull went.
struct Pull {
    wall: f64,
    /// Each client's first layer byte, seconds after the start.
    first_bytes: Vec<f64>,
}

/// `clients` clients pulling the image at once, client `i` through `ports[i % len]`; panics
/// when any download is incomplete or does not hash to its digest.
fn pull_at_once(ports: &[u16], clients: usize, layers: &[Blob], config: &Blob) -> Pull {
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let port = ports[i % ports.len()];
            let (layers, config) = (layers.to_vec(), config.clone());
            std::thread::spawn(move || pull_image(port, &layers, &config, started))
        })
        .collect();
    let first_bytes = handles.into_iter().map(|h| h.join().unwrap()).collect();
    Pull {
        wall: started.elapsed().as_secs_f64(),
        first_bytes,
    }
}

/// One client's pull, as dockerd does it; returns its first layer byte, seconds after `started`.
fn pull_image(port: u16, layers: &[Blob], config: &Blob, started: Instant) -> f64 {
    let mut connection = Connection::open(port);
    let manifest = connection.get(&format!("/v2/{REPO}/manifests/latest"), None);
    assert!(
        layers
            .iter()
            .all(|l| String::from_utf8_lossy(&manifest.body).contains(&l.digest.to_string())),
        "the manifest names every layer"
    );
    connection.get(&blob_path(config), Some(config));
    let queue = Arc::new(Mutex::new(layers.to_vec()));
    let first = Arc::new(Mutex::new(None::<Instant>));
    let workers: Vec<_> = (0..PARALLEL_LAYERS)
        .map(|_| {
            let (queue, first) = (Arc::clone(&queue), Arc::clone(&first));
            std::thread::spawn(move || {
                let mut connection = Connection::open(port);
                loop {
                    let Some(layer) = queue.lock().unwrap().pop() else {
                        return;
                    };
                    let got = connection.get(&blob_path(&layer), Some(&layer));
                    let mut first = first.lock().unwrap();
                    *first = Some(first.map_or(got.first_byte, |f| f.min(got.first_byte)));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let first = first.lock().unwrap().expect("a layer byte");
    (first - started).as_secs_f64()
}

fn print(results: &BTreeMap<(&str, &str), Vec<f64>>) {
    let subjects: Vec<&str> = Subject::ALL.iter().map(|s| s.name()).collect();
    let measures: Vec<&str> = {
        let mut m: Vec<&str> = results.keys().map(|(m, _)| *m).collect();
        m.dedup();
        m
    };
    print!("\n{:<32}", "measure (median)");
    for subject in &subjects {
        print!("{subject:>26}");
    }
    println!("  ratios cluster/…");
    for measure in measures {
        let median = |subject: &str| {
            results
                .get(&(measure, subject))
                .map(|values| percentile(values, 0.5))
        };
        print!("{measure:<32}");
        for subject in &subjects {
            match median(subject) {
                Some(value) => print!("{value:>26.2}"),
                None => print!("{:>26}", "-"),
            }
        }
        if let Some(cluster) = median(Subject::Cluster.name()) {
            for subject in &subjects[1..] {
                if let Some(other) = median(subject).filter(|v| *v > 0.0) {
                    print!("  {subject} {:.2}", cluster / other);
                }
            }
        }
        println!();
    }
}
