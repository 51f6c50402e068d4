//! Crash safety: the regmirror binary is killed with SIGKILL at random moments — mid-fill,
//! mid-commit, mid-eviction — and restarted on the same cache, many times. The store never
//! holds an entry whose bytes differ from its digest, nothing partial is ever served, and
//! leftovers are purged at start-up.

mod common;

use common::e2e::{free_port, wait_until_up, Process};
use common::*;
use regmirror::digest::Digest;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// Every content file in the store hashes to its name.
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

fn start_mirror(dir: &Path, cache: &Path, origin: &str, log: &str) -> (Process, u16) {
    let port = free_port();
    let config = dir.join("crash.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\nmax_size = \"10MiB\"\nhigh_watermark = 0.8\nlow_watermark = 0.5\n\
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_leaves_a_bad_entry() {
    let origin = FakeRegistry::start().await;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..6)
        .map(|i| {
            let bytes = random_bytes(2 * MIB, 90 + i);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    origin.knobs(|k| {
        k.chunk = Some(64 * 1024);
        k.chunk_delay = Some(Duration::from_millis(2));
    });
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut seed = Instant::now().elapsed().as_nanos() as u64 | 0x5eed;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut iterations = 0;
    while Instant::now() < deadline && iterations < 25 {
        let (mut mirror, port) = start_mirror(dir.path(), &cache, &origin.url(), "crash.log");
        wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
        assert_eq!(
            std::fs::read_dir(cache.join("tmp")).unwrap().count(),
            0,
            "tmp/ not purged at start-up"
        );
        let requests: Vec<_> = blobs
            .iter()
            .filter(|_| random(2) == 0)
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
        tokio::time::sleep(Duration::from_millis(random(150))).await;
        mirror.kill();
        for r in requests {
            r.await.expect("a client saw a wrong body");
        }
        assert_store_consistent(&cache);
        iterations += 1;
    }
    assert!(iterations >= 5, "only {iterations} crash iterations ran");

    // A last clean start serves everything byte-exact.
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
    // Clients get a blob's last byte once it is verified; it is committed just after.
    let (last, _) = blobs.last().unwrap();
    eventually("the last blob fetched is committed", || {
        blob_path(&cache, last).exists()
    })
    .await;
    let stored = assert_store_consistent(&cache);
    assert!(stored >= 1);
    eprintln!("{iterations} SIGKILLs survived; {stored} verified entries at the end");
}
