//! Prefetch: an image manifest fetched from upstream starts its config and layers downloading
//! before any client asks, a bounded number at once; clients join those downloads or hit the
//! cache, and upstream sends each blob once.

mod common;

use common::*;
use http::StatusCode;
use regmirror::digest::Digest;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// An image of `layers` random layers under `repo:1.0`: (config, layers with their bytes).
fn image(origin: &FakeRegistry, repo: &str, layers: usize) -> (Digest, Vec<(Digest, Vec<u8>)>) {
    let config = origin.add_blob(b"{\"architecture\":\"amd64\"}".to_vec());
    let layers: Vec<(Digest, Vec<u8>)> = (0..layers)
        .map(|i| {
            let bytes = random_bytes(256 * 1024, 130 + i as u64);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    let described: Vec<(Digest, usize)> =
        layers.iter().map(|(d, b)| (d.clone(), b.len())).collect();
    origin.add_manifest(
        repo,
        Some("1.0"),
        DOCKER_MANIFEST,
        schema2_manifest(&config, 25, &described),
    );
    (config, layers)
}

fn blob_gets(origin: &FakeRegistry, repo: &str, digest: &Digest) -> usize {
    origin.hits("GET", &format!("/v2/{repo}/blobs/{digest}"))
}

async fn prefetches(mirror: &TestMirror) -> f64 {
    let text = get(&mirror.url("/metrics")).await;
    let text = String::from_utf8(text.bytes().to_vec()).unwrap();
    metric_value(&text, "regmirror_prefetches_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_manifest_from_upstream_starts_its_blobs_downloading() {
    let origin = FakeRegistry::start().await;
    let (config, layers) = image(&origin, "library/app", 3);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;

    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    // Nobody asked for a blob, yet every one is downloaded, verified and stored.
    let wanted: Vec<&Digest> = std::iter::once(&config)
        .chain(layers.iter().map(|(d, _)| d))
        .collect();
    eventually("the image's blobs are stored", || {
        wanted.iter().all(|d| mirror.has_blob(d))
    })
    .await;
    mirror.settle().await;
    assert_eq!(prefetches(&mirror).await, 4.0);
    // The client's own requests are hits: upstream sent each blob once.
    for (digest, bytes) in &layers {
        let got = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.bytes()[..] == bytes[..], "layer byte-exact");
    }
    for digest in &wanted {
        assert_eq!(blob_gets(&origin, "library/app", digest), 1, "{digest}");
    }
    // A manifest served from the cache starts nothing.
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(prefetches(&mirror).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_starts_nothing_until_a_platform_manifest_is_asked_for() {
    let origin = FakeRegistry::start().await;
    let (config, layers) = image(&origin, "library/multi", 1);
    let child = origin.add_manifest(
        "library/multi",
        None,
        DOCKER_MANIFEST,
        schema2_manifest(&config, 25, &[(layers[0].0.clone(), layers[0].1.len())]),
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": DOCKER_MANIFEST, "digest": child.to_string(), "size": 300,
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    origin.add_manifest(
        "library/multi",
        Some("multi"),
        "application/vnd.oci.image.index.v1+json",
        index.to_string(),
    );
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let got = get_manifest(&mirror.url("/v2/library/multi/manifests/multi")).await;
    assert_eq!(got.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(blob_gets(&origin, "library/multi", &config), 0);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/multi/manifests/{child}")),
        0
    );

    let got = get_manifest(&mirror.url(&format!("/v2/library/multi/manifests/{child}"))).await;
    assert_eq!(got.status, StatusCode::OK);
    eventually("the platform's blobs are stored", || {
        mirror.has_blob(&config) && mirror.has_blob(&layers[0].0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetches_are_bounded_and_never_hold_a_client_back() {
    let origin = FakeRegistry::start().await;
    let (config, layers) = image(&origin, "library/app", 6);
    let gate = Arc::new(Semaphore::new(0));
    origin.knobs(|k| {
        k.gate = Some(Arc::clone(&gate));
        k.chunk = Some(64 * 1024);
    });
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.prefetch_downloads = 2).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);

    // Two downloads at once, and no more while they are held up.
    eventually("two prefetches run", || {
        mirror.app.cache().fills_in_flight() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(mirror.app.cache().fills_in_flight(), 2);
    // The config (one chunk, never held) is done; two layers are held.
    assert_eq!(blob_gets(&origin, "library/app", &config), 1);
    let asked: usize = layers
        .iter()
        .map(|(d, _)| blob_gets(&origin, "library/app", d))
        .sum();
    assert_eq!(asked, 2, "upstream was asked for more than the bound");

    // A client asking for the last layer starts its own download at once.
    let (last, last_bytes) = layers.last().unwrap().clone();
    let client = tokio::spawn({
        let url = mirror.url(&format!("/v2/library/app/blobs/{last}"));
        async move { get(&url).await }
    });
    eventually("the client's download runs beside the prefetches", || {
        mirror.app.cache().fills_in_flight() == 3
    })
    .await;
    gate.add_permits(1000);
    let got = client.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.bytes()[..] == last_bytes[..], "layer byte-exact");

    // Everything arrives, each blob sent once.
    for (digest, bytes) in &layers {
        let got = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
        assert!(got.bytes()[..] == bytes[..], "layer byte-exact");
    }
    mirror.settle().await;
    for digest in std::iter::once(&config).chain(layers.iter().map(|(d, _)| d)) {
        assert!(mirror.has_blob(digest));
        assert_eq!(blob_gets(&origin, "library/app", digest), 1, "{digest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_downloads_0_turns_it_off() {
    let origin = FakeRegistry::start().await;
    let (config, layers) = image(&origin, "library/app", 2);
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.prefetch_downloads = 0).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for digest in std::iter::once(&config).chain(layers.iter().map(|(d, _)| d)) {
        assert_eq!(blob_gets(&origin, "library/app", digest), 0, "{digest}");
    }
    assert_eq!(prefetches(&mirror).await, 0.0);
}
