//! Crash safety: the regmirror binary is killed with SIGKILL and restarted on the same cache,
//! many times, at moments chosen across the whole life of a download: while its bytes arrive,
//! and in the middle of a batch of commits (verified blobs wait for a pause in blob traffic,
//! then are made durable and renamed one by one; the budget evicts older ones as they come).
//! After every kill the store holds only entries whose bytes match their digest, nothing
//! partial is ever served, and leftovers are purged at start-up. The seed is printed
//! (`CRASH_SEED` replays it), and so is what each kill interrupted.

mod common;

use common::e2e::{free_port, wait_until_up, Process};
use common::*;
use regmirror::digest::Digest;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;
/// Blobs of the origin; the budget (40 MiB, evicting from 32 down to 20) holds about three.
const BLOBS: u64 = 6;
const BLOB_SIZE: usize = 8 * MIB;
/// Iterations: half kill while bytes arrive, half in a batch of commits.
const ITERATIONS: usize = 12;

/// Every content file in the store hashes to its name; returns how many there are.
fn assert_store_consistent(cache: &Path) -> usize {
    let mut count = 0;
    let base = cache.join("blobs/sha256");
    let Ok(prefixes) = std::fs::read_dir(&base) else {
        return 0;
    };
    for prefix in prefixes {
        for entry in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".meta") {
                continue;
            }
            let digest: Digest = format!("sha256:{name}")
                .parse()
                .expect("only digests in the store");
            assert_eq!(
                Digest::of(&std::fs::read(&path).unwrap()),
                digest,
                "corrupt entry {name} after a crash"
            );
            count += 1;
        }
    }
    count
}

fn temp_files(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("tmp")).map_or(0, |d| d.count())
}

fn start_mirror(dir: &Path, cache: &Path, origin: &str, log: &str) -> (Process, u16) {
    let port = free_port();
    let config = dir.join("crash.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\nmax_size = \"40MiB\"\nhigh_watermark = 0.8\nlow_watermark = 0.5\n\
             [[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\nurl = \"{origin}\"\n",
            cache.display().to_string()
        ),
    )
    .unwrap();
    let process = Process::spawn(
        "regmirror",
        Command::new(env!("CARGO_BIN_EXE_regmirror"))
            .args(["serve", "--config"])
            .arg(&config),
        dir.join(log),
    );
    (process, port)
}

/// What a kill interrupted.
#[derive(Debug, Default)]
struct Landed {
    /// Downloads still receiving.
    receiving: usize,
    /// A batch of commits with some blobs renamed into the store and others not yet.
    mid_commit: usize,
    /// Anything else (a batch not started, or done).
    other: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_receiving_and_mid_commit_never_leaves_a_bad_entry() {
    let origin = FakeRegistry::start().await;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..BLOBS)
        .map(|i| {
            let bytes = random_bytes(BLOB_SIZE, 90 + i);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed: CRASH_SEED={seed}");
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut landed = Landed::default();
    for iteration in 0..ITERATIONS {
        let receiving = iteration % 2 == 0;
        // Blobs a fetch will download (not stored now); at least three, so a batch of
        // commits has several blobs to interrupt (the mirror is down: a file removed now is
        // as if evicted).
        let mut fresh: Vec<&(Digest, Vec<u8>)> = blobs
            .iter()
            .filter(|(d, _)| !blob_path(&cache, d).exists())
            .collect();
        for (digest, _) in &blobs {
            if fresh.len() >= 3 {
                break;
            }
            if std::fs::remove_file(blob_path(&cache, digest)).is_ok() {
                fresh.push(blobs.iter().find(|(d, _)| d == digest).unwrap());
            }
        }
        origin.knobs(|k| {
            k.chunk = Some(64 * 1024);
            // Receiving: 8 MiB take about half a second, so the kill lands mid-stream.
            k.chunk_delay = receiving.then_some(Duration::from_millis(4));
        });
        let (mut mirror, port) = start_mirror(dir.path(), &cache, &origin.url(), "crash.log");
        wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
        assert_eq!(temp_files(&cache), 0, "tmp/ not purged at start-up");
        let requests: Vec<_> = fresh
            .iter()
            .map(|(digest, bytes)| {
                let url = format!("http://127.0.0.1:{port}/v2/library/app/blobs/{digest}");
                let expected = bytes.clone();
                tokio::spawn(async move {
                    // Whatever arrives whole must be right.
                    if let Some(got) = try_get(&url).await {
                        if let (http::StatusCode::OK, Ok(body)) = (got.status, &got.body) {
                            assert!(body[..] == expected[..], "a wrong body was served whole");
                        }
                    }
                })
            })
            .collect();
        let what = if receiving {
            tokio::time::sleep(Duration::from_millis(50 + random(200))).await;
            mirror.kill();
            landed.receiving += 1;
            "while receiving".to_string()
        } else {
            // Clients have every byte once each blob is verified; the commits come once blob
            // traffic pauses. Kill the moment the first of them is renamed into the store
            // (watched by a thread of its own, so the kill follows within microseconds).
            let watched: Vec<_> = fresh.iter().map(|(d, _)| blob_path(&cache, d)).collect();
            let pid = mirror.pid() as libc::pid_t;
            let began = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                while Instant::now() < deadline {
                    if watched.iter().any(|p| p.exists()) {
                        // SAFETY: signals the child this test started (reaped just after).
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        return true;
                    }
                    std::thread::yield_now();
                }
                false
            })
            .await
            .unwrap();
            assert!(began, "no commit began");
            mirror.kill();
            let committed = fresh
                .iter()
                .filter(|(d, _)| blob_path(&cache, d).exists())
                .count();
            let waiting = temp_files(&cache);
            if waiting > 0 {
                landed.mid_commit += 1;
            } else {
                landed.other += 1;
            }
            format!("in a batch of commits: {committed} renamed, {waiting} waiting")
        };
        for r in requests {
            r.await.expect("a client saw a wrong body");
        }
        let stored = assert_store_consistent(&cache);
        eprintln!("kill {iteration}: {what}; {stored} verified entries after it");
    }
    eprintln!("kills landed: {landed:?}");
    assert_eq!(landed.receiving, ITERATIONS / 2);
    assert!(
        landed.mid_commit >= 2,
        "too few kills landed in a batch of commits: {landed:?}"
    );

    // A last clean start serves everything byte-exact.
    origin.knobs(|k| k.chunk_delay = None);
    let (mirror, port) = start_mirror(dir.path(), &cache, &origin.url(), "final.log");
    wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
    for (digest, bytes) in &blobs {
        let got = get(&format!(
            "http://127.0.0.1:{port}/v2/library/app/blobs/{digest}"
        ))
        .await;
        assert!(
            got.bytes()[..] == bytes[..],
            "{digest} differs after the crashes"
        );
    }
    // Clients get a blob's last byte once it is verified; it is committed once traffic pauses.
    let (last, _) = blobs.last().unwrap();
    eventually("the last blob fetched is committed", || {
        blob_path(&cache, last).exists()
    })
    .await;
    assert!(assert_store_consistent(&cache) >= 1);
}
