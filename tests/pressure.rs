//! Bounded under load: downloads beyond `cache.max_downloads` wait for a slot (and are dropped
//! when their clients leave first) while lookups and hits keep answering; when the crowd is
//! gone, threads, open files and temp files come back to where they were.

mod common;

use common::process::{open_files, threads};
use common::*;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// `count` distinct random blobs of `size` bytes at the origin.
fn blobs(
    origin: &FakeRegistry,
    count: usize,
    size: usize,
    seed: u64,
) -> Vec<(regmirror::digest::Digest, Vec<u8>)> {
    (0..count)
        .map(|i| {
            let bytes = random_bytes(size, seed + i as u64);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect()
}

fn blob_gets(origin: &FakeRegistry, blobs: &[(regmirror::digest::Digest, Vec<u8>)]) -> usize {
    blobs
        .iter()
        .map(|(d, _)| origin.hits("GET", &format!("/v2/library/app/blobs/{d}")))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_beyond_the_ceiling_wait_and_those_left_by_their_clients_are_dropped() {
    let origin = FakeRegistry::start().await;
    let cold = blobs(&origin, 12, 200_000, 300);
    let cached = blobs(&origin, 1, 50_000, 320);
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.max_downloads = 4;
        c.cache.prefetch_downloads = 0;
    })
    .await;
    let hit_url = mirror.url(&format!("/v2/library/app/blobs/{}", cached[0].0));
    get(&hit_url).await.assert_content(&cached[0].0);
    mirror.settle().await;

    // Twelve cold blobs at once: four download (held after their first chunk), eight wait.
    let gate = Arc::new(Semaphore::new(0));
    origin.knobs(|k| {
        k.gate = Some(Arc::clone(&gate));
        k.chunk = Some(64 * 1024);
    });
    let clients: Vec<_> = cold
        .iter()
        .map(|(digest, _)| {
            let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    let slots = Arc::clone(mirror.app.cache().download_slots());
    // A running download asks upstream just after it takes its slot.
    eventually("four downloads run and eight wait", || {
        slots.running() == 4 && slots.queued() == 8 && blob_gets(&origin, &cold) >= 4
    })
    .await;
    assert_eq!(
        blob_gets(&origin, &cold),
        4,
        "upstream was asked beyond the ceiling"
    );
    assert_eq!(mirror.metric("regmirror_downloads_queued", &[]).await, 8.0);
    assert_eq!(mirror.metric("regmirror_download_slots", &[]).await, 4.0);
    // Hits answer meanwhile.
    let started = Instant::now();
    get(&hit_url).await.assert_content(&cached[0].0);
    assert!(started.elapsed() < Duration::from_secs(1));

    // The clients of four waiting downloads leave: those downloads never start.
    let waiting: Vec<usize> = (0..cold.len())
        .filter(|&i| origin.hits("GET", &format!("/v2/library/app/blobs/{}", cold[i].0)) == 0)
        .take(4)
        .collect();
    for &i in &waiting {
        clients[i].abort();
    }
    let cache = mirror.app.cache();
    eventually("the mirror sees those clients gone", || {
        waiting
            .iter()
            .all(|&i| cache.download_readers(&cold[i].0) == Some(0))
    })
    .await;
    gate.add_permits(10_000);
    for (i, client) in clients.into_iter().enumerate() {
        if waiting.contains(&i) {
            continue;
        }
        let got = client.await.unwrap();
        got.assert_content(&cold[i].0);
    }
    let left_digests: Vec<_> = waiting.iter().map(|&i| cold[i].0.clone()).collect();
    mirror.settle().await;
    for digest in &left_digests {
        assert_eq!(
            origin.hits("GET", &format!("/v2/library/app/blobs/{digest}")),
            0,
            "a download whose clients left while it waited was started"
        );
        assert!(!mirror.has_blob(digest));
    }
    assert_eq!(mirror.temp_files(), 0);
    assert_eq!(slots.running(), 0);
    assert_eq!(slots.queued(), 0);
}

/// The `q` quantile of `samples`.
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_cold_pulls_leaves_hits_fast_and_everything_comes_back() {
    const CROWD: usize = 600;
    let origin = FakeRegistry::start().await;
    let cold = blobs(&origin, CROWD, 32 * 1024, 1000);
    // Larger than one window: every hit opens the file on the blocking pool.
    let cached = blobs(&origin, 1, 3 * 1024 * 1024, 2000);
    let manifest = origin.add_empty_image("library/app", "1.0");
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.prefetch_downloads = 0;
    })
    .await;
    let blob_url = mirror.url(&format!("/v2/library/app/blobs/{}", cached[0].0));
    let manifest_url = mirror.url(&format!("/v2/library/app/manifests/{manifest}"));
    get(&blob_url).await.assert_content(&cached[0].0);
    get_manifest(&manifest_url).await.assert_content(&manifest);
    mirror.settle().await;
    let (threads_before, files_before) = (threads(), open_files());

    // The upstream trickles: 1 KiB every 200 ms, six seconds and more per blob.
    origin.knobs(|k| {
        k.chunk = Some(1024);
        k.chunk_delay = Some(Duration::from_millis(200));
    });
    let crowd: Vec<_> = cold
        .iter()
        .map(|(digest, _)| {
            let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
            tokio::spawn(async move { try_get(&url).await })
        })
        .collect();
    let slots = Arc::clone(mirror.app.cache().download_slots());
    let cache = mirror.app.cache();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cache.fills_in_flight() < CROWD * 9 / 10 {
        assert!(Instant::now() < deadline, "the crowd never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak_threads = threads();

    // A second client asks for what the cache holds, 80 times: every answer fast and right.
    let mut latencies = Vec::new();
    for i in 0..80 {
        let started = Instant::now();
        if i % 2 == 0 {
            get(&blob_url).await.assert_content(&cached[0].0);
        } else {
            get_manifest(&manifest_url).await.assert_content(&manifest);
        }
        latencies.push(started.elapsed());
    }
    let p50 = quantile(&mut latencies, 0.5);
    let p99 = quantile(&mut latencies, 0.99);
    let queued = slots.queued();
    println!(
        "hits beside {CROWD} cold downloads ({} running, {queued} queued): p50 {p50:?}, p99 {p99:?}; \
         threads {threads_before} -> {peak_threads}",
        slots.running()
    );
    assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
    assert!(
        peak_threads < threads_before + 2 * regmirror::config::MAX_DOWNLOADS + 64,
        "threads {threads_before} -> {peak_threads}"
    );

    // The crowd leaves: waiting downloads are dropped, running ones finish; then threads,
    // open files and temp files come back.
    for client in &crowd {
        client.abort();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while cache.fills_in_flight() > 0 {
        assert!(Instant::now() < deadline, "downloads still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = blob_gets(&origin, &cold);
    assert!(
        asked < CROWD,
        "every download of the crowd was started ({asked})"
    );
    assert_eq!(mirror.temp_files(), 0);
    // Idle upstream connections are kept, a few per host; blocking threads leave after 10 s idle.
    let kept = 2 * regmirror::upstream::IDLE_CONNECTIONS_PER_HOST + 8;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (threads_now, files_now) = (threads(), open_files());
        if threads_now <= threads_before + 2 && files_now <= files_before + kept {
            println!(
                "after: {asked} of {CROWD} downloads started; threads {threads_now} (before {threads_before}), \
                 open files {files_now} (before {files_before})"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads {threads_now} (before {threads_before}), open files {files_now} (before {files_before})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still right afterwards.
    get(&blob_url).await.assert_content(&cached[0].0);
}
