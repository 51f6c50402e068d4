//! Large layers at wire speed: one client pulling one big blob, as registry clients read (a
//! keep-alive connection, 1 MiB reads, the body not hashed in the timed path), next to curl.
//! Subjects: regmirror, distribution in proxy mode, nginx `proxy_cache`, the origin directly
//! (Debian's `docker-registry`), and nginx serving the same number of bytes from a file with
//! `sendfile` (the machine's limit for hits).
//!
//! Each round, for each size: every mirror starts with an empty cache and is read cold once,
//! then warm three times on the same connection, then warm once by curl; the subjects' order
//! rotates from round to round. Reported: medians of MiB/s and of the subject's CPU seconds per
//! GiB (its process and children: nginx's workers), with regmirror's ratios to each peer.
//!
//! Run with: `benches/large.sh`. Environment: `ROUNDS` (default 5), `SIZES_MIB` (default
//! 512,2048,4096), `SUBJECTS` (default all but `baseline`, e.g. `regmirror,nginx`), `BASELINE`
//! (another build of regmirror, run as the subject `baseline`: an A/B of a change),
//! `MEMORY` (`warm`, the default, or `cold`: the free memory each cold fill writes into, see
//! `settle_memory`).

mod harness;

use harness::client::Connection;
use harness::*;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

const REPO: &str = "bench/large";
/// The subjects; `baseline` (regmirror built from another revision, `BASELINE=path/to/binary`)
/// runs only when named, for a paired A/B of a change.
const SUBJECTS: [&str; 6] = [
    "regmirror",
    "distribution",
    "nginx",
    "direct",
    "static",
    "baseline",
];

fn main() {
    let rounds: usize = env("ROUNDS", 5);
    let sizes: Vec<u64> = std::env::var("SIZES_MIB")
        .unwrap_or_else(|_| "512,2048,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let work = tempfile::Builder::new()
        .prefix("regmirror-large-")
        .tempdir()
        .expect("work dir");
    let dir = work.path().to_path_buf();
    let origin = Service::docker_registry(&dir.join("origin"), None);
    let blobs: Vec<Blob> = sizes
        .iter()
        .map(|&mib| seed_blob(&dir, &origin, REPO, mib * MIB, 7))
        .collect();
    let statics = static_files(&dir, &sizes);
    println!("origin seeded: {sizes:?} MiB; static files written");
    // SUBJECTS narrows the run (a profile of one subject, an A/B of two builds).
    let only = std::env::var("SUBJECTS").unwrap_or_default();
    let wanted = |s: &&str| match only.as_str() {
        "" => *s != "baseline",
        only => only.split(',').any(|o| o == *s),
    };
    let mut results = Results::default();
    for round in 0..rounds {
        println!("round {}/{rounds}", round + 1);
        // The subjects run take turns at going first (two of them alternate: a paired A/B).
        let mut order: Vec<&str> = SUBJECTS.into_iter().filter(wanted).collect();
        let turn = round % order.len().max(1);
        order.rotate_left(turn);
        for subject in order {
            for blob in &blobs {
                measure(subject, &dir, &origin, &statics, blob, round, &mut results);
            }
        }
    }
    results.print(&sizes);
}

/// nginx serving a file of each size (the bytes do not matter: they come from the page cache).
fn static_files(dir: &Path, sizes: &[u64]) -> Service {
    let root = dir.join("static");
    std::fs::create_dir_all(&root).unwrap();
    let chunk = vec![0x5au8; MIB as usize];
    for mib in sizes {
        let mut file = std::fs::File::create(root.join(format!("{mib}"))).unwrap();
        for _ in 0..*mib {
            file.write_all(&chunk).unwrap();
        }
    }
    Service::nginx(
        &dir.join("nginx-static"),
        &format!("  root {};", root.display()),
    )
}

/// One subject, one blob: cold (mirrors only), warm on one connection, warm by curl.
fn measure(
    subject: &str,
    dir: &Path,
    origin: &Service,
    statics: &Service,
    blob: &Blob,
    round: usize,
    results: &mut Results,
) {
    let mib = blob.size / MIB;
    let subject_dir = dir.join(format!("{subject}-{round}-{mib}"));
    let (service, path) = match subject {
        "regmirror" | "baseline" => {
            let port = free_port();
            let config = format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n[log]\nlevel = \"warn\"\n\
                 [[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\nurl = \"http://127.0.0.1:{}\"\n",
                subject_dir.join("cache").display().to_string(),
                origin.port
            );
            let service = match subject {
                "baseline" => {
                    let binary = std::env::var("BASELINE").expect("BASELINE names a binary");
                    Service::regmirror_binary(Path::new(&binary), &subject_dir, port, &config)
                }
                _ => Service::regmirror(&subject_dir, port, &config),
            };
            (Some(service), blob_path(blob))
        }
        "distribution" => (
            Some(Service::docker_registry(&subject_dir, Some(origin.port))),
            blob_path(blob),
        ),
        "nginx" => (
            Some(Service::nginx_proxy_cache(&subject_dir, origin.port)),
            blob_path(blob),
        ),
        "direct" => (None, blob_path(blob)),
        _ => (None, format!("/{mib}")),
    };
    let measured = match (&service, subject) {
        (Some(s), _) => s,
        (None, "direct") => origin,
        (None, _) => statics,
    };
    let port = measured.port;
    let gib = blob.size as f64 / (1u64 << 30) as f64;
    let mut connection = Connection::open(port);
    let mut transfer = |label: &str, connection: &mut Connection| {
        quiesce();
        if label == "cold" {
            settle_memory(blob.size);
        }
        let cpu = measured.cpu_seconds();
        let started = Instant::now();
        let (_, bytes) = connection.read_through(&path);
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(bytes, blob.size, "{subject}: {label} incomplete");
        // The work a transfer caused, including what the subject does after the client has
        // its last byte (distribution fetches the blob a second time to store it, nginx
        // renames its file, regmirror commits).
        let cpu = (measured.settled_cpu_seconds() - cpu) / gib;
        let rate = mib_per_s(bytes, seconds);
        println!("  {subject:<12} {label} {mib} MiB: {rate:>6.0} MiB/s {cpu:.2} CPU s/GiB");
        results.record(subject, &format!("{label} {mib} MiB MiB/s"), rate);
        results.record(subject, &format!("{label} {mib} MiB CPU s/GiB"), cpu);
    };
    if service.is_some() || subject == "direct" {
        // A mirror's first read is its miss; the origin's and a file's are just reads.
        transfer("cold", &mut connection);
    }
    if service.is_some() {
        // A hit once the blob is committed (regmirror commits when traffic pauses).
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    for _ in 0..3 {
        transfer("warm", &mut connection);
    }
    quiesce();
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{time_total} %{size_download}",
        &format!("http://127.0.0.1:{port}{path}"),
    ]);
    let mut parts = out
        .split_whitespace()
        .map(|p| p.parse::<f64>().unwrap_or(0.0));
    let (seconds, bytes) = (parts.next().unwrap_or(0.0), parts.next().unwrap_or(0.0));
    assert_eq!(bytes as u64, blob.size, "{subject}: curl incomplete");
    results.record(
        subject,
        &format!("warm {mib} MiB curl MiB/s"),
        mib_per_s(blob.size, seconds),
    );
    drop(service);
    let _ = std::fs::remove_dir_all(&subject_dir);
}

fn blob_path(blob: &Blob) -> String {
    format!("/v2/{REPO}/blobs/{}", blob.digest)
}

/// Samples per (measure, subject); medians printed.
type Results = Samples;

impl Results {
    fn print(&self, sizes: &[u64]) {
        println!(
            "\n{:<26} {:>10} {:>13} {:>8} {:>8} {:>8} {:>9}  ratios regmirror/…",
            "measure (median)",
            "regmirror",
            "distribution",
            "nginx",
            "direct",
            "static",
            "baseline"
        );
        let mut measures: Vec<String> = Vec::new();
        for mib in sizes {
            for label in ["cold", "warm"] {
                measures.push(format!("{label} {mib} MiB MiB/s"));
                measures.push(format!("{label} {mib} MiB CPU s/GiB"));
            }
            measures.push(format!("warm {mib} MiB curl MiB/s"));
        }
        for measure in measures {
            let cell = |s: &str| {
                self.median(&measure, s).map_or("-".to_string(), |v| {
                    if v.abs() < 10.0 {
                        format!("{v:.2}")
                    } else {
                        format!("{v:.0}")
                    }
                })
            };
            let ours = self.median(&measure, "regmirror");
            let ratios: Vec<String> = SUBJECTS[1..]
                .iter()
                .filter_map(|s| match (ours, self.median(&measure, s)) {
                    (Some(a), Some(b)) if b > 0.0 => Some(format!("{s} {:.2}", a / b)),
                    _ => None,
                })
                .collect();
            println!(
                "{:<26} {:>10} {:>13} {:>8} {:>8} {:>8} {:>9}  {}",
                measure,
                cell("regmirror"),
                cell("distribution"),
                cell("nginx"),
                cell("direct"),
                cell("static"),
                cell("baseline"),
                ratios.join(" ")
            );
        }
    }
}
