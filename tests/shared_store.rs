//! The shared store, against a real S3-compatible server (`s3s-fs`) on loopback: what one
//! replica fetched from upstream reaches the bucket whole and verified, and another replica
//! with an empty disk serves it from there with the origin down; a corrupt object is never
//! served whole and is replaced; a bucket that is down or hangs costs a miss nothing, or one
//! time limit, and is used again once back.

mod common;

use common::s3::S3Server;
use common::*;
use http::{Method, StatusCode};
use regmirror::digest::Digest;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1024 * 1024;

/// A mirror of `origin` using `s3` as its shared store.
async fn replica(origin: &FakeRegistry, s3: &S3Server) -> TestMirror {
    let shared = s3.config();
    TestMirror::start(&origin.url(), move |c| c.shared_store = Some(shared)).await
}

fn blob_url(mirror: &TestMirror, digest: &Digest) -> String {
    mirror.url(&format!("/v2/library/app/blobs/{digest}"))
}

fn hits(origin: &FakeRegistry, digest: &Digest) -> usize {
    origin.hits("GET", &format!("/v2/library/app/blobs/{digest}"))
}

/// Waits until the bucket holds `digest` with exactly `bytes`.
async fn until_in_bucket(s3: &S3Server, digest: &Digest, bytes: &[u8]) {
    eventually(&format!("{digest} reaches the bucket"), || {
        s3.blob(digest).is_some_and(|b| b == bytes)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_an_empty_disk_serves_what_another_fetched_with_the_origin_down() {
    let s3 = S3Server::start().await;
    let origin = FakeRegistry::start().await;
    // A config (one request up), a layer just over a part, one of several parts.
    let blobs: Vec<(Digest, Vec<u8>)> = [300_000, 8 * MIB + 1, 21 * MIB]
        .into_iter()
        .enumerate()
        .map(|(i, size)| {
            let bytes = random_bytes(size, 900 + i as u64);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    let layers: Vec<(Digest, usize)> = blobs[1..]
        .iter()
        .map(|(d, b)| (d.clone(), b.len()))
        .collect();
    let manifest = schema2_manifest(&blobs[0].0, blobs[0].1.len(), &layers);
    let manifest_digest =
        origin.add_manifest("library/app", Some("1"), DOCKER_MANIFEST, manifest.clone());
    let first = replica(&origin, &s3).await;
    let tag_url = |m: &TestMirror| m.url("/v2/library/app/manifests/1");
    let by_digest = |m: &TestMirror| m.url(&format!("/v2/library/app/manifests/{manifest_digest}"));
    let pulled = request(Method::GET, &tag_url(&first), &[("accept", ACCEPT_ALL)]).await;
    pulled.assert_content(&manifest_digest);
    for (digest, bytes) in &blobs {
        let got = get(&blob_url(&first, digest)).await;
        assert!(got.bytes()[..] == bytes[..], "{digest} through the first");
    }
    for (digest, bytes) in &blobs {
        until_in_bucket(&s3, digest, bytes).await;
    }
    let tag_object = "tags/docker.io/library/app/_tags/1";
    let manifest_object = format!("manifests/sha256/{}", manifest_digest.hex());
    eventually("the manifest and the tag reach the bucket", || {
        let objects = s3.objects();
        objects.contains(&manifest_object) && objects.iter().any(|o| o == tag_object)
    })
    .await;
    // Exactly these objects, and no upload left behind anywhere on the server (s3s-fs keeps
    // the parts of unfinished multipart uploads beside the buckets).
    let mut expected: Vec<String> = blobs
        .iter()
        .map(|(d, _)| format!("blobs/sha256/{}", d.hex()))
        .chain([manifest_object.clone(), tag_object.to_string()])
        .collect();
    expected.sort();
    assert_eq!(s3.objects(), expected);
    assert_eq!(s3.unfinished_uploads(), Vec::<String>::new());
    let written: usize = blobs.iter().map(|(_, b)| b.len()).sum();
    let first = &first;
    eventually_async("every blob byte is counted as written", || async move {
        let counted = first
            .metric(
                "regmirror_shared_store_bytes_total",
                &[("direction", "written")],
            )
            .await;
        counted == written as f64
    })
    .await;

    // The origin goes down; a replica that never saw this image serves all of it: the tag
    // from the fleet's last confirmed mapping (stale, with a Warning), the manifest and every
    // blob from the bucket, byte-exact.
    origin.knobs(|k| k.fail_status = Some(503));
    let second = replica(&origin, &s3).await;
    let pulled = request(Method::GET, &tag_url(&second), &[("accept", ACCEPT_ALL)]).await;
    assert_eq!(pulled.status, StatusCode::OK);
    pulled.assert_content(&manifest_digest);
    assert!(
        pulled.header("warning").is_some_and(|w| w.contains("299")),
        "not marked stale"
    );
    assert_eq!(pulled.header("content-type"), Some(DOCKER_MANIFEST));
    let pulled = request(Method::GET, &by_digest(&second), &[("accept", ACCEPT_ALL)]).await;
    pulled.assert_content(&manifest_digest);
    for (digest, bytes) in &blobs {
        let got = get(&blob_url(&second, digest)).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.bytes()[..] == bytes[..], "{digest} through the second");
        assert_eq!(hits(&origin, digest), 1, "the origin was asked again");
    }
    second.settle().await;
    for (digest, _) in &blobs {
        assert!(second.has_blob(digest), "not kept on the second's disk");
    }
    assert_eq!(
        second
            .metric(
                "regmirror_shared_store_bytes_total",
                &[("direction", "read")]
            )
            .await,
        written as f64
    );
    // What came from the bucket is not uploaded back.
    assert_eq!(
        second
            .metric(
                "regmirror_shared_store_bytes_total",
                &[("direction", "written")]
            )
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_object_in_the_bucket_is_never_served_whole_and_is_replaced() {
    let s3 = S3Server::start().await;
    let origin = FakeRegistry::start().await;
    let bytes = random_bytes(3 * MIB, 910);
    let digest = origin.add_blob(bytes.clone());
    let first = replica(&origin, &s3).await;
    assert!(get(&blob_url(&first, &digest)).await.bytes()[..] == bytes[..]);
    until_in_bucket(&s3, &digest, &bytes).await;

    // Same size, a few bytes flipped, as a bad disk under the bucket would leave it.
    let mut corrupt = bytes.clone();
    corrupt[MIB] ^= 0xff;
    std::fs::write(s3.blob_file(&digest), &corrupt).unwrap();
    let second = replica(&origin, &s3).await;
    let got = try_get(&blob_url(&second, &digest)).await;
    assert!(
        got.is_none_or(|g| g.body.is_err() || g.status != StatusCode::OK),
        "a corrupt blob from the bucket reached the client whole"
    );
    assert_eq!(hits(&origin, &digest), 1);
    assert!(!second.has_blob(&digest), "the corrupt blob was stored");
    eventually("the bad copy is deleted", || s3.blob(&digest).is_none()).await;
    second.settle().await;
    assert_eq!(second.temp_files(), 0);

    // The next pull fetches it from the origin, and a good copy replaces the bad one.
    let got = get(&blob_url(&second, &digest)).await;
    assert!(got.bytes()[..] == bytes[..]);
    assert_eq!(hits(&origin, &digest), 2);
    until_in_bucket(&s3, &digest, &bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bucket_down_misses_come_from_upstream_and_it_is_used_again_once_back() {
    let mut s3 = S3Server::start().await;
    let origin = FakeRegistry::start().await;
    let (a, b) = (random_bytes(2 * MIB, 920), random_bytes(2 * MIB, 921));
    let (a_digest, b_digest) = (origin.add_blob(a.clone()), origin.add_blob(b.clone()));
    let mirror = replica(&origin, &s3).await;

    s3.stop();
    let started = Instant::now();
    assert!(get(&blob_url(&mirror, &a_digest)).await.bytes()[..] == a[..]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a bucket that refuses connections held a miss up for {:?}",
        started.elapsed()
    );
    mirror.settle().await;
    assert!(mirror.has_blob(&a_digest));
    assert_eq!(mirror.metric("regmirror_shared_store_up", &[]).await, 0.0);
    let ready = get(&mirror.url("/readyz")).await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "a replica without its bucket is still ready"
    );
    let said = String::from_utf8_lossy(ready.bytes()).into_owned();
    assert!(
        said.contains("shared store") && said.contains("down"),
        "{said}"
    );

    // Back: after `recheck_after`, the next miss asks it again and its blob reaches it.
    s3.resume().await;
    tokio::time::sleep(s3.config().recheck_after).await;
    assert!(get(&blob_url(&mirror, &b_digest)).await.bytes()[..] == b[..]);
    until_in_bucket(&s3, &b_digest, &b).await;
    assert_eq!(mirror.metric("regmirror_shared_store_up", &[]).await, 1.0);
    let ready = get(&mirror.url("/readyz")).await;
    assert_eq!(String::from_utf8_lossy(ready.bytes()), "ready\n");
    let page = get(&mirror.url("/")).await;
    let page = String::from_utf8_lossy(page.bytes()).into_owned();
    assert!(
        page.contains("<tr><th>state</th><td><span class=\"up\">up</span>"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_never_answers_costs_a_miss_one_time_limit_at_most_then_is_skipped() {
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let held = tokio::spawn({
        let accepted = Arc::clone(&accepted);
        async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                open.push(stream);
            }
        }
    });
    let origin = FakeRegistry::start().await;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..4)
        .map(|i| {
            let bytes = random_bytes(MIB, 930 + i);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    let s3 = S3Server::start().await;
    let mut shared = s3.config();
    shared.endpoint = Some(format!("http://127.0.0.1:{port}"));
    let limit = Duration::from_secs(4);
    shared.timeout = limit;
    shared.recheck_after = Duration::from_secs(60);
    let mirror = TestMirror::start(&origin.url(), move |c| c.shared_store = Some(shared)).await;
    let timed_get = |digest: &Digest, bytes: &[u8]| {
        let (url, bytes) = (blob_url(&mirror, digest), bytes.to_vec());
        async move {
            let started = Instant::now();
            let got = get(&url).await;
            assert!(got.bytes()[..] == bytes[..]);
            started.elapsed()
        }
    };

    // The first miss asks and waits; it costs one time limit at most (no retry of it).
    let first = tokio::spawn(timed_get(&blobs[0].0, &blobs[0].1));
    // A miss once the bucket has kept a read waiting a second: it does not wait on it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let meanwhile = timed_get(&blobs[1].0, &blobs[1].1).await;
    assert!(
        meanwhile < Duration::from_secs(1),
        "a miss waited {meanwhile:?} behind a read the bucket left unanswered"
    );
    let first = first.await.unwrap();
    assert!(
        first < limit + Duration::from_secs(2),
        "the first miss waited {first:?}, over its one time limit of {limit:?}"
    );
    let mirror = &mirror;
    eventually_async("the bucket is down", || async move {
        mirror.metric("regmirror_shared_store_up", &[]).await == 0.0
    })
    .await;

    // Down now: more misses (and their uploads) do not even connect to it.
    let connected = accepted.load(Ordering::SeqCst);
    assert!(connected >= 1, "the bucket was never asked");
    for (digest, bytes) in &blobs[2..] {
        let waited = timed_get(digest, bytes).await;
        assert!(waited < Duration::from_secs(1), "a miss waited {waited:?}");
    }
    mirror.settle().await;
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        connected,
        "a down bucket was asked again"
    );
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_understates_a_layer_never_costs_the_bucket_its_good_copy() {
    let s3 = S3Server::start().await;
    let origin = FakeRegistry::start().await;
    let bytes = random_bytes(2 * MIB, 950);
    let digest = origin.add_blob(bytes.clone());
    let first = replica(&origin, &s3).await;
    assert!(get(&blob_url(&first, &digest)).await.bytes()[..] == bytes[..]);
    until_in_bucket(&s3, &digest, &bytes).await;

    // Someone publishes a manifest that says the layer has 1 byte.
    let config = origin.add_blob(b"{}".to_vec());
    let lying = schema2_manifest(&config, 2, &[(digest.clone(), 1)]);
    let lying_digest = origin.add_manifest("library/app", Some("lie"), DOCKER_MANIFEST, lying);
    let second = replica(&origin, &s3).await;
    let url = second.url(&format!("/v2/library/app/manifests/{lying_digest}"));
    request(Method::GET, &url, &[("accept", ACCEPT_ALL)])
        .await
        .assert_content(&lying_digest);
    // The bucket's copy is larger than that: not read, but not deleted either.
    let _ = try_get(&blob_url(&second, &digest)).await;
    second.settle().await;
    assert!(
        s3.blob(&digest).is_some_and(|b| b == bytes),
        "a lying manifest cost the bucket its good copy"
    );
    assert_eq!(
        second
            .metric(
                "regmirror_shared_store_bytes_total",
                &[("direction", "read")]
            )
            .await,
        0.0,
        "a copy larger than declared was read"
    );
}
