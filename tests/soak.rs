//! Soak: a mixed workload against one mirror for a while (90 s; `SOAK_SECS` sets it):
//! clients pulling whole blobs and ranges, leaving mid-body, asking HEADs and manifests, and
//! real skopeo pulls of whole images, and blobs new to the origin asked all along (misses), while
//! the upstream misbehaves at random (resets, stalls, 503s, corrupt bytes, a trickle), a small
//! byte budget keeps evicting, and a SIGHUP every few seconds reloads the configuration. At the end:
//! every answer that arrived whole was byte-exact, every file in the store hashes to its name,
//! no temp file is left, and once idle, threads and open files are back where they were
//! (upstream connections and small blobs kept open for hits are let go). The figures are
//! printed; `SOAK_SEED` replays a run.

mod common;

use common::chaos::Random;
use common::process::{open_files_described, rss_kib, threads};
use common::*;
use http::{Method, StatusCode};
use regmirror::digest::Digest;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 12;
const BLOBS: usize = 24;

/// What the clients saw.
#[derive(Default)]
struct Seen {
    whole: AtomicUsize,
    ranges: AtomicUsize,
    left_mid_body: AtomicUsize,
    heads: AtomicUsize,
    manifests: AtomicUsize,
    errors: AtomicUsize,
    /// Requests whose connection closed before any answer (the mirror should always send a
    /// head; printed, to be looked into when not 0).
    unanswered: AtomicUsize,
    /// skopeo pulls that completed (each checked byte for byte) and that failed.
    skopeo_pulls: AtomicUsize,
    skopeo_failures: AtomicUsize,
    /// Cold misses: blobs new to the origin, asked by two clients at once (one whole, one a
    /// range); those that arrived whole and byte-exact and those that failed, and how many of
    /// each while a fault was in force.
    cold: AtomicUsize,
    cold_failed: AtomicUsize,
    cold_in_fault: AtomicUsize,
    cold_failed_in_fault: AtomicUsize,
}

/// Open files, but `/dev/null`: the server opens it once, for its whole life, the first time
/// it loads a cold file's pages (see `sendfile::load_into_page_cache`).
fn open_files() -> usize {
    open_files_described()
        .iter()
        .filter(|f| *f != "/dev/null")
        .count()
}

/// One client's loop until `until`: each answer that arrives whole must be byte-exact.
async fn client(
    mirror: String,
    blobs: Arc<Vec<(Digest, Vec<u8>)>>,
    manifests: Arc<Vec<Digest>>,
    random: Random,
    seen: Arc<Seen>,
    until: Instant,
) {
    while Instant::now() < until {
        let (digest, bytes) = &blobs[random.below(blobs.len() as u64) as usize];
        let url = format!("{mirror}/v2/library/app/blobs/{digest}");
        match random.below(10) {
            0..=3 => match try_get(&url).await {
                Some(got) if got.status == StatusCode::OK && got.body.is_ok() => {
                    assert!(got.bytes()[..] == bytes[..], "a wrong blob arrived whole");
                    seen.whole.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    seen.errors.fetch_add(1, Ordering::Relaxed);
                }
            },
            4 | 5 => {
                let start = random.below(bytes.len() as u64) as usize;
                let end = (start + 1 + random.below(200_000) as usize).min(bytes.len());
                let range = format!("bytes={start}-{}", end - 1);
                match try_request(Method::GET, &url, &[("range", &range)]).await {
                    Some(got) if got.status == StatusCode::PARTIAL_CONTENT && got.body.is_ok() => {
                        assert!(
                            got.bytes()[..] == bytes[start..end],
                            "a wrong range arrived"
                        );
                        seen.ranges.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(got) if got.status == StatusCode::OK && got.body.is_ok() => {
                        assert!(got.bytes()[..] == bytes[..], "a wrong blob arrived whole");
                        seen.whole.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        seen.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            6 => {
                // Leaves after the head (and whatever came with it). No head at all counts as
                // an error, as it does for the other clients.
                let started =
                    tokio::time::timeout(Duration::from_secs(5), try_start_get(&url)).await;
                match started {
                    Ok(Some(response)) => {
                        drop(response);
                        seen.left_mid_body.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {
                        seen.unanswered.fetch_add(1, Ordering::Relaxed);
                        seen.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        seen.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            7 => match try_request(Method::HEAD, &url, &[]).await {
                Some(got) if got.status == StatusCode::OK => {
                    let length = bytes.len().to_string();
                    assert_eq!(got.header("content-length"), Some(length.as_str()));
                    seen.heads.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    seen.errors.fetch_add(1, Ordering::Relaxed);
                }
            },
            _ => {
                let digest = &manifests[random.below(manifests.len() as u64) as usize];
                let url = format!("{mirror}/v2/library/app/manifests/{digest}");
                let accept = [("accept", ACCEPT_ALL)];
                match try_request(Method::GET, &url, &accept).await {
                    Some(got) if got.status == StatusCode::OK && got.body.is_ok() => {
                        got.assert_content(digest);
                        seen.manifests.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        seen.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Real skopeo pulls of the images, one after another until `until`: each that completes must
/// hold exactly the origin's manifest and blobs (skopeo checks digests too; this checks that
/// what it wrote is the origin's content).
async fn skopeo_pulls(
    host: String,
    blobs: Arc<Vec<(Digest, Vec<u8>)>>,
    manifests: Arc<Vec<Digest>>,
    random: Random,
    seen: Arc<Seen>,
    until: Instant,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut pulls = 0;
    while Instant::now() < until {
        let i = random.below(manifests.len() as u64) as usize;
        let into = dir.path().join(format!("pull-{pulls}"));
        pulls += 1;
        let (image, target) = (
            format!("docker://{host}/library/app:{i}"),
            format!("dir:{}", into.display()),
        );
        let pulled = tokio::task::spawn_blocking(move || {
            std::process::Command::new("skopeo")
                .args(["--command-timeout", "60s", "copy", "--quiet"])
                .args(["--src-tls-verify=false", "--retry-times", "0"])
                .arg(image)
                .arg(target)
                .output()
                .expect("skopeo runs (tests/run.sh installs it)")
        })
        .await
        .unwrap();
        if pulled.status.success() {
            let manifest = std::fs::read(into.join("manifest.json")).unwrap();
            assert_eq!(
                Digest::of(&manifest),
                manifests[i],
                "skopeo got another manifest"
            );
            for (digest, bytes) in [&blobs[i], &blobs[i + 6]] {
                let got = std::fs::read(into.join(digest.hex())).unwrap();
                assert!(got == *bytes, "skopeo got another {digest}");
            }
            seen.skopeo_pulls.fetch_add(1, Ordering::Relaxed);
        } else {
            seen.skopeo_failures.fetch_add(1, Ordering::Relaxed);
        }
        let _ = std::fs::remove_dir_all(&into);
    }
}

/// Blobs the mirror has never seen, one after another until `until`, each asked whole and as a
/// range by two clients at once: misses, whatever fault is in force, so that faults meet
/// downloads all through the run (the clients above mostly hit: their blobs are cached, or
/// verified and waiting for a pause in traffic to be committed). Each blob leaves the origin
/// afterwards, so its memory stays flat.
async fn cold_misses(
    origin: &FakeRegistry,
    mirror: String,
    random: Random,
    faulty: &AtomicBool,
    seen: &Seen,
    until: Instant,
) {
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        let bytes = random_bytes(20_000 + random.below(600_000) as usize, 90_000 + n);
        let digest = origin.add_blob(bytes.clone());
        let url = format!("{mirror}/v2/library/app/blobs/{digest}");
        let in_fault = faulty.load(Ordering::Relaxed);
        let start = random.below(bytes.len() as u64) as usize;
        let range = format!("bytes={start}-");
        let range = [("range", range.as_str())];
        let (whole, part) = tokio::join!(try_get(&url), try_request(Method::GET, &url, &range));
        let whole_ok = match whole {
            Some(got) if got.status == StatusCode::OK && got.body.is_ok() => {
                assert!(
                    got.bytes()[..] == bytes[..],
                    "a wrong cold blob arrived whole"
                );
                true
            }
            _ => false,
        };
        let part_ok = match part {
            Some(got) if got.status == StatusCode::PARTIAL_CONTENT && got.body.is_ok() => {
                assert!(
                    got.bytes()[..] == bytes[start..],
                    "a wrong cold range arrived"
                );
                true
            }
            Some(got) if got.status == StatusCode::OK && got.body.is_ok() => {
                assert!(
                    got.bytes()[..] == bytes[..],
                    "a wrong cold blob arrived whole"
                );
                true
            }
            _ => false,
        };
        let counter = match (whole_ok && part_ok, in_fault) {
            (true, false) => &seen.cold,
            (true, true) => &seen.cold_in_fault,
            (false, false) => &seen.cold_failed,
            (false, true) => &seen.cold_failed_in_fault,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        origin.remove_blob(&digest);
        tokio::time::sleep(Duration::from_millis(random.below(100))).await;
    }
}

/// Changes the upstream's behaviour every half second to a second, at random; counts faults
/// and says in `faulty` whether one is in force.
async fn misbehave(
    origin: &FakeRegistry,
    random: Random,
    faulty: &AtomicBool,
    until: Instant,
) -> usize {
    let mut faults = 0;
    while Instant::now() < until {
        let fault = random.below(8);
        faulty.store(fault < 5, Ordering::Relaxed);
        origin.knobs(|k| {
            behave(k);
            match fault {
                0 => k.reset_after = Some(100_000),
                1 => k.stall_after = Some(50_000),
                2 => k.fail_status = Some(503),
                3 => k.corrupt_blobs = true,
                4 => k.chunk_delay = Some(Duration::from_millis(5)),
                _ => {}
            }
        });
        faults += usize::from(fault < 5);
        tokio::time::sleep(Duration::from_millis(500 + random.below(500))).await;
    }
    origin.knobs(behave);
    faulty.store(false, Ordering::Relaxed);
    faults
}

/// No fault.
fn behave(k: &mut Knobs) {
    k.reset_after = None;
    k.stall_after = None;
    k.fail_status = None;
    k.corrupt_blobs = false;
    k.chunk_delay = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_workload_with_faults_stays_exact_and_bounded() {
    let lasting = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(90),
    );
    let random = Random::from_env("SOAK_SEED");
    let origin = FakeRegistry::start().await;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..BLOBS)
        .map(|i| {
            let size = [40_000, 300_000, 1_500_000, 3_000_000][i % 4];
            let bytes = random_bytes(size, 700 + i as u64);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    let manifests: Vec<Digest> = (0..6)
        .map(|i| {
            let config = &blobs[i].0;
            let layers = [(blobs[i + 6].0.clone(), blobs[i + 6].1.len())];
            let manifest = schema2_manifest(config, blobs[i].1.len(), &layers);
            origin.add_manifest(
                "library/app",
                Some(&format!("{i}")),
                DOCKER_MANIFEST,
                manifest,
            )
        })
        .collect();
    let mirror = TestMirror::start(&origin.url(), |c| {
        // About a third of the blobs fit: eviction runs all the time.
        c.cache.max_size = Some(12 * 1024 * 1024);
        c.cache.max_downloads = 6;
        c.server.send_timeout = Duration::from_secs(2);
        for upstream in &mut c.registry[0].upstream {
            upstream.stall_timeout = Duration::from_millis(500);
            upstream.response_timeout = Duration::from_secs(2);
        }
        c.registry[0].failover_cooldown = Duration::from_secs(1);
    })
    .await;
    // A SIGHUP every few seconds, handled as the command handles it: the configuration is
    // loaded again and a new generation takes over.
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hangup_handler = tokio::spawn(regmirror::signals::reload_on_hangup(
        Arc::clone(&mirror.live),
        None,
        {
            let (config, loads) = (mirror.app.config().clone(), Arc::clone(&loads));
            move || {
                loads.fetch_add(1, Ordering::AcqRel);
                Ok(config.clone())
            }
        },
    ));
    let (threads_before, files_before, rss_before) =
        (threads(), open_files(), (rss_kib("self") / 1024));
    let files_before_described = open_files_described();
    let until = Instant::now() + lasting;
    let seen = Arc::new(Seen::default());
    let (blobs, manifests) = (Arc::new(blobs), Arc::new(manifests));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(client(
                mirror.url(""),
                Arc::clone(&blobs),
                Arc::clone(&manifests),
                random.clone(),
                Arc::clone(&seen),
                until,
            ))
        })
        .collect();
    let skopeo = tokio::spawn(skopeo_pulls(
        mirror.url("").trim_start_matches("http://").to_string(),
        Arc::clone(&blobs),
        Arc::clone(&manifests),
        random.clone(),
        Arc::clone(&seen),
        until,
    ));
    // A SIGHUP every few seconds (below).
    let reloads = tokio::spawn({
        let (live, loads, random) = (Arc::clone(&mirror.live), Arc::clone(&loads), random.clone());
        async move {
            let mut reloads = 0;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(2000 + random.below(2000))).await;
                let running = live.get();
                // SAFETY: kill(2) with this process's own id and a signal it handles.
                assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
                let asked = Instant::now();
                while loads.load(Ordering::Acquire) == reloads || Arc::ptr_eq(&live.get(), &running)
                {
                    assert!(
                        asked.elapsed() < Duration::from_secs(10),
                        "SIGHUP not acted on, or its reload refused (see the log)"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                reloads += 1;
            }
            reloads
        }
    });
    let mut rss_peak = rss_before;
    let watching = async {
        while Instant::now() < until {
            rss_peak = rss_peak.max(rss_kib("self") / 1024);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let faulty = AtomicBool::new(false);
    let (faults, (), ()) = tokio::join!(
        misbehave(&origin, random.clone(), &faulty, until),
        watching,
        cold_misses(
            &origin,
            mirror.url(""),
            random.clone(),
            &faulty,
            &seen,
            until
        )
    );
    for client in clients {
        client.await.expect("a client saw a wrong answer");
    }
    skopeo.await.expect("skopeo got a wrong answer");
    let reloads = reloads.await.unwrap();
    hangup_handler.abort();

    // Quiet again: everything is committed or gone, and the store holds only whole blobs.
    mirror.settle().await;
    let cache = mirror.cache_dir();
    // Every blob in the store, the cold ones included, hashes to its name.
    let mut stored = 0;
    for fan in std::fs::read_dir(cache.join("blobs/sha256")).unwrap() {
        for file in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if name.ends_with(".meta") {
                continue; // what the store knows of the blob, beside it
            }
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(
                Digest::of(&bytes).hex(),
                name,
                "a corrupt entry in the store"
            );
            stored += 1;
        }
    }
    assert!(stored > 0, "nothing stored");
    assert_eq!(mirror.temp_files(), 0, "temp files left");
    // Everything is served right once the upstream behaves.
    for (digest, bytes) in blobs.iter().take(4) {
        let got = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
        assert!(got.bytes()[..] == bytes[..], "{digest} after the soak");
    }
    mirror.settle().await;
    // Back where it was once idle: blocking threads leave after 10 s, upstream connections
    // after 30 s, small blobs kept open for hits after 30 s (and the next sweep).
    // The pool looks for idle connections once per timeout: one may stay for up to two.
    let idle = (2 * regmirror::upstream::IDLE_CONNECTION_TIMEOUT)
        .max(regmirror::cache::hot::HOT_IDLE + regmirror::cache::hot::HOT_SWEEP_EVERY)
        + Duration::from_secs(10);
    // The quiet server's memory check runs on a blocking thread every 10 s, and such a thread
    // lives 10 s idle: one may be there at any moment.
    let threads_allowed = threads_before + 1;
    let settled = Instant::now();
    let (mut threads_after, mut files_after) = (threads(), open_files());
    while (threads_after > threads_allowed || files_after > files_before)
        && settled.elapsed() < idle
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        (threads_after, files_after) = (threads(), open_files());
    }
    let s = &seen;
    println!(
        "soak {lasting:?}: {} whole blobs, {} ranges, {} left mid-body, {} HEADs, {} manifests \
         byte-exact; {} skopeo pulls byte-exact, {} failed; cold misses: {} byte-exact ({} while \
         a fault was in force), {} failed ({} while a fault was in force); {} errors during \
         {faults} upstream faults and {reloads} reloads ({} left-after-head requests unanswered); {} \
         evictions; {stored} blobs stored, all whole; threads {threads_before} -> \
         {threads_after}, open files {files_before} -> {files_after}, RSS {rss_before} -> peak \
         {rss_peak} MiB (test process and fake upstream included)",
        s.whole.load(Ordering::Relaxed),
        s.ranges.load(Ordering::Relaxed),
        s.left_mid_body.load(Ordering::Relaxed),
        s.heads.load(Ordering::Relaxed),
        s.manifests.load(Ordering::Relaxed),
        s.skopeo_pulls.load(Ordering::Relaxed),
        s.skopeo_failures.load(Ordering::Relaxed),
        s.cold.load(Ordering::Relaxed) + s.cold_in_fault.load(Ordering::Relaxed),
        s.cold_in_fault.load(Ordering::Relaxed),
        s.cold_failed.load(Ordering::Relaxed) + s.cold_failed_in_fault.load(Ordering::Relaxed),
        s.cold_failed_in_fault.load(Ordering::Relaxed),
        s.errors.load(Ordering::Relaxed),
        s.unanswered.load(Ordering::Relaxed),
        mirror.app.cache().lifecycle().evictions(),
    );
    assert!(s.whole.load(Ordering::Relaxed) > 0 && s.ranges.load(Ordering::Relaxed) > 0);
    // Faults met downloads, and downloads still completed byte-exact.
    assert!(
        s.cold_in_fault.load(Ordering::Relaxed) + s.cold_failed_in_fault.load(Ordering::Relaxed)
            > 0,
        "no cold miss met a fault"
    );
    assert!(s.cold.load(Ordering::Relaxed) > 0, "no cold miss completed");
    assert!(
        s.skopeo_pulls.load(Ordering::Relaxed) > 0,
        "no skopeo pull completed"
    );
    assert!(
        mirror.app.cache().lifecycle().evictions() > 0,
        "nothing was evicted"
    );
    assert!(
        threads_after <= threads_allowed,
        "threads {threads_before} -> {threads_after}"
    );
    assert!(
        files_after <= files_before,
        "open files {files_before} -> {files_after} (origin {}, mirror {}): {:#?}, before: {:#?}",
        origin.url(),
        mirror.url(""),
        open_files_described(),
        files_before_described
    );
    assert!(
        rss_peak < rss_before + 256,
        "RSS {rss_before} -> {rss_peak} MiB"
    );
}
