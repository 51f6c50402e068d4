//! Prefetch: an image manifest fetched from upstream starts its config and layers downloading
//! before any client asks, a bounded number at once; clients join those downloads or hit the
//! cache, and upstream sends each blob once.

mod common;

use common::*;
use http::StatusCode;
use regmirror::digest::Digest;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Layers with their bytes.
type Layers = Vec<(Digest, Vec<u8>)>;

/// An image of `layers` random layers under `repo:1.0`: (config, layers with their bytes).
/// Images of different repositories share no blob.
fn image(origin: &FakeRegistry, repo: &str, layers: usize) -> (Digest, Layers) {
    let config = format!("{{\"architecture\":\"amd64\",\"comment\":\"{repo}\"}}");
    let config_size = config.len();
    let config = origin.add_blob(config.into_bytes());
    let seed = 130 + repo.bytes().map(u64::from).sum::<u64>() * 100;
    let layers: Layers = (0..layers)
        .map(|i| {
            let bytes = random_bytes(256 * 1024, seed + i as u64);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    let described: Vec<(Digest, usize)> =
        layers.iter().map(|(d, b)| (d.clone(), b.len())).collect();
    origin.add_manifest(
        repo,
        Some("1.0"),
        DOCKER_MANIFEST,
        schema2_manifest(&config, config_size, &described),
    );
    (config, layers)
}

fn blob_gets(origin: &FakeRegistry, repo: &str, digest: &Digest) -> usize {
    origin.hits("GET", &format!("/v2/{repo}/blobs/{digest}"))
}

async fn prefetches(mirror: &TestMirror) -> f64 {
    mirror.metric("regmirror_prefetches_total", &[]).await
}

/// `image` with each blob body held after its first chunk until the returned gate opens.
fn held_image(origin: &FakeRegistry, layers: usize) -> (Digest, Layers, Arc<Semaphore>) {
    let (config, layers) = image(origin, "library/app", layers);
    let gate = Arc::new(Semaphore::new(0));
    origin.knobs(|k| {
        k.gate = Some(Arc::clone(&gate));
        k.chunk = Some(64 * 1024);
    });
    (config, layers, gate)
}

/// A client asking for a blob of `library/app`, in the background.
fn spawn_blob_get(mirror: &TestMirror, digest: &Digest) -> tokio::task::JoinHandle<Got> {
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    tokio::spawn(async move { get(&url).await })
}

/// A mirror with one prefetch slot, a client pulling the first layer of a 4-layer held image,
/// and the prefetch of the second layer started: both held; the config is done (one chunk,
/// never held), and the last two layers wait for the slot.
async fn one_prefetch_held(
    origin: &FakeRegistry,
) -> (
    TestMirror,
    Layers,
    Arc<Semaphore>,
    tokio::task::JoinHandle<Got>,
) {
    let (_, layers, gate) = held_image(origin, 4);
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.prefetch_downloads = 1).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    let client = spawn_blob_get(&mirror, &layers[0].0);
    eventually("one prefetch runs beside the client's download", || {
        mirror.app.cache().downloads_in_flight() == 2
    })
    .await;
    eventually("the prefetch of the second layer has started", || {
        blob_gets(origin, "library/app", &layers[1].0) == 1
    })
    .await;
    (mirror, layers, gate, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_first_layer_starts_the_rest_of_its_image_downloading() {
    let origin = FakeRegistry::start().await;
    let (config, layers) = image(&origin, "library/app", 4);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;

    // What an inspecting tool reads (the manifest, the config) starts nothing.
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{config}"))).await;
    assert_eq!(got.status, StatusCode::OK);
    mirror.prefetches_done().await;
    for (digest, _) in &layers {
        assert_eq!(blob_gets(&origin, "library/app", digest), 0, "{digest}");
    }

    // A pull's first layer starts the other layers: stored, verified, before anyone asks.
    let (first, first_bytes) = &layers[0];
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{first}"))).await;
    assert!(got.bytes()[..] == first_bytes[..], "layer byte-exact");
    eventually("the image's other layers are stored", || {
        layers.iter().all(|(d, _)| mirror.has_blob(d))
    })
    .await;
    mirror.settle().await;
    assert_eq!(prefetches(&mirror).await, 3.0);
    // The client's own requests for them are hits: upstream sent each blob once.
    for (digest, bytes) in &layers {
        let got = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
        assert!(got.bytes()[..] == bytes[..], "layer byte-exact");
        assert_eq!(blob_gets(&origin, "library/app", digest), 1, "{digest}");
    }
    assert_eq!(blob_gets(&origin, "library/app", &config), 1);
    // Each prefetched layer's first client counts as a miss (upstream sent those bytes for it),
    // and only the first layer's second answer as saved.
    let text = get(&mirror.url("/metrics")).await;
    let text = String::from_utf8(text.bytes().to_vec()).unwrap();
    let blob_outcome = |outcome| {
        metric_value(
            &text,
            "regmirror_cache_requests_total",
            &[("kind", "blob"), ("outcome", outcome)],
        )
    };
    assert_eq!((blob_outcome("miss"), blob_outcome("hit")), (5.0, 1.0));
    let saved = metric_value(
        &text,
        "regmirror_served_bytes_total",
        &[("source", "cache")],
    );
    assert_eq!(saved, first_bytes.len() as f64);

    // Once is enough: with everything evicted, the first layer's new download starts nothing.
    mirror.app.cache().lifecycle().evict_to(0, "test");
    assert!(!mirror.has_blob(first));
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{first}"))).await;
    assert!(got.bytes()[..] == first_bytes[..], "layer byte-exact");
    mirror.prefetches_done().await;
    assert_eq!(prefetches(&mirror).await, 3.0);
    assert_eq!(blob_gets(&origin, "library/app", &layers[1].0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetches_are_bounded_and_never_hold_a_client_back() {
    let origin = FakeRegistry::start().await;
    let (config, layers, gate) = held_image(&origin, 6);
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.prefetch_downloads = 2).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    let (first, first_bytes) = layers[0].clone();
    let first_client = spawn_blob_get(&mirror, &first);

    // The client's download and two prefetches at once, no more while they are held up: the
    // config (one chunk, never held) is done, the client's layer and two others are held, both
    // slots are taken and the image's run waits for one.
    let layers_asked = || -> usize {
        layers
            .iter()
            .map(|(d, _)| blob_gets(&origin, "library/app", d))
            .sum()
    };
    eventually(
        "two prefetches hold both slots beside the client's download",
        || layers_asked() >= 3 && mirror.app.prefetcher().free_slots() == 0,
    )
    .await;
    assert_eq!(mirror.app.prefetcher().runs_in_progress(), 1);
    assert_eq!(mirror.app.cache().downloads_in_flight(), 3);
    assert_eq!(blob_gets(&origin, "library/app", &config), 1);
    assert_eq!(
        layers_asked(),
        3,
        "upstream was asked for more than the bound"
    );

    // A client asking for the last layer starts its own download at once.
    let (last, last_bytes) = layers.last().unwrap().clone();
    let client = spawn_blob_get(&mirror, &last);
    eventually("the client's download runs beside the prefetches", || {
        mirror.app.cache().downloads_in_flight() == 4
    })
    .await;
    gate.add_permits(1000);
    let got = client.await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.bytes()[..] == last_bytes[..], "layer byte-exact");
    let got = first_client.await.unwrap();
    assert!(got.bytes()[..] == first_bytes[..], "layer byte-exact");

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
async fn only_a_miss_where_the_manifest_came_from_starts_its_image() {
    let origin = FakeRegistry::start().await;
    let (config, layers) = image(&origin, "library/app", 3);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    // The same layer pulled through another repository: that client's image is not this one.
    let (first, first_bytes) = &layers[0];
    let got = get(&mirror.url(&format!("/v2/library/other/blobs/{first}"))).await;
    assert!(got.bytes()[..] == first_bytes[..], "layer byte-exact");
    mirror.prefetches_done().await;
    assert_eq!(blob_gets(&origin, "library/app", &config), 0);
    assert_eq!(blob_gets(&origin, "library/app", &layers[1].0), 0);
    assert_eq!(prefetches(&mirror).await, 0.0);
    // A miss in the image's own repository starts it.
    let (second, second_bytes) = &layers[1];
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{second}"))).await;
    assert!(got.bytes()[..] == second_bytes[..], "layer byte-exact");
    eventually("the rest of the image is stored", || {
        mirror.has_blob(&config) && mirror.has_blob(&layers[2].0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_downloads_0_turns_it_off() {
    let origin = FakeRegistry::start().await;
    let (config, layers) = image(&origin, "library/app", 2);
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.prefetch_downloads = 0).await;
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{}", layers[0].0))).await;
    assert_eq!(got.status, StatusCode::OK);
    mirror.prefetches_done().await;
    assert_eq!(blob_gets(&origin, "library/app", &config), 0);
    assert_eq!(blob_gets(&origin, "library/app", &layers[1].0), 0);
    assert_eq!(prefetches(&mirror).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_starts_no_more_prefetches() {
    let origin = FakeRegistry::start().await;
    let (mirror, layers, gate, client) = one_prefetch_held(&origin).await;
    let cache = mirror.cache_dir();
    let app = Arc::clone(&mirror.app);
    let stopped = tokio::spawn(mirror.stop());
    eventually("the stopping server stops prefetching", || {
        app.prefetcher().stopped()
    })
    .await;
    gate.add_permits(1000);
    assert!(client.await.unwrap().bytes()[..] == layers[0].1[..]);
    let _kept = stopped.await.unwrap();
    // What ran was finished and kept; what waited never started.
    assert_eq!(blob_gets(&origin, "library/app", &layers[1].0), 1);
    assert!(blob_path(&cache, &layers[1].0).exists());
    for (digest, _) in &layers[2..] {
        assert_eq!(blob_gets(&origin, "library/app", digest), 0, "{digest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_stops_the_old_configurations_prefetches_and_the_new_one_prefetches() {
    let origin = FakeRegistry::start().await;
    let (mirror, layers, gate, client) = one_prefetch_held(&origin).await;
    let next = mirror.app.config().clone();
    mirror
        .live
        .reload(next)
        .expect("a valid configuration is applied");
    gate.add_permits(1000);
    assert!(client.await.unwrap().bytes()[..] == layers[0].1[..]);
    // The old configuration's prefetcher gives up on what it still meant to start.
    mirror.prefetches_done().await;
    // What ran was finished and kept; what the old configuration still meant to start, it did not.
    assert_eq!(blob_gets(&origin, "library/app", &layers[1].0), 1);
    assert!(mirror.has_blob(&layers[1].0));
    for (digest, _) in &layers[2..] {
        assert_eq!(blob_gets(&origin, "library/app", digest), 0, "{digest}");
    }

    // The new configuration prefetches the next image pulled.
    let (config, others) = image(&origin, "library/two", 3);
    let got = get_manifest(&mirror.url("/v2/library/two/manifests/1.0")).await;
    assert_eq!(got.status, StatusCode::OK);
    let got = get(&mirror.url(&format!("/v2/library/two/blobs/{}", others[0].0))).await;
    assert!(got.bytes()[..] == others[0].1[..], "layer byte-exact");
    eventually("the rest of the new image is stored", || {
        mirror.has_blob(&config) && others.iter().all(|(d, _)| mirror.has_blob(d))
    })
    .await;
    for digest in std::iter::once(&config).chain(others.iter().map(|(d, _)| d)) {
        assert_eq!(blob_gets(&origin, "library/two", digest), 1, "{digest}");
    }
}
