//! Cache lifecycle: the byte budget and LRU eviction, pins, blobs in use, shared layers, and a
//! disk that fills up.

mod common;

use common::*;
use http::StatusCode;
use regmirror::digest::Digest;
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1024 * 1024;

/// A byte budget of `max_mib` MiB, evicting from `high` of it down to `low`.
fn with_budget(c: &mut regmirror::config::Config, max_mib: u64, high: f64, low: f64) {
    c.cache.max_size = Some(max_mib * MIB as u64);
    c.cache.high_watermark = high;
    c.cache.low_watermark = low;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_recent_pinned_and_in_use_blobs() {
    let origin = FakeRegistry::start().await;
    // A pinned image: config + a 1 MiB layer.
    let config = origin.add_blob(b"{\"architecture\":\"amd64\"}".to_vec());
    let layer = origin.add_blob(random_bytes(MIB, 40));
    let manifest = schema2_manifest(&config, 24, &[(layer.clone(), MIB)]);
    origin.add_manifest("library/pinned", Some("1.0"), DOCKER_MANIFEST, manifest);
    let big = origin.add_blob(random_bytes(32 * MIB, 41));
    let small: Vec<Digest> = (0..7)
        .map(|i| origin.add_blob(random_bytes(4 * MIB, 50 + i)))
        .collect();

    let mirror = TestMirror::start(&origin.url(), |c| {
        with_budget(c, 80, 0.75, 0.6); // evicts past 60 MiB, down to 48
        c.cache.pin = vec!["docker.io/library/pinned:1.0".into()];
    })
    .await;
    let blob = |d: &Digest| mirror.url(&format!("/v2/library/app/blobs/{d}"));
    assert_eq!(
        get_manifest(&mirror.url("/v2/library/pinned/manifests/1.0"))
            .await
            .status,
        StatusCode::OK
    );
    for d in [&config, &layer, &big] {
        assert_eq!(get(&blob(d)).await.status, StatusCode::OK);
        mirror.settle().await;
    }
    // A client reading the big blob slowly keeps it in use.
    let reading = start_get(&blob(&big)).await;
    for (i, d) in small.iter().enumerate() {
        if i == 6 {
            // b0 is used again just before the last pull: it is now the most recent.
            assert_eq!(get(&blob(&small[0])).await.status, StatusCode::OK);
        }
        assert_eq!(get(&blob(d)).await.status, StatusCode::OK);
        mirror.settle().await;
    }
    // 1 + 32 + 7 x 4 = 61 MiB > 60: evicted down to <= 48 MiB, oldest first: b1..b4.
    for (i, d) in small.iter().enumerate() {
        let expect_kept = !(1..=4).contains(&i);
        assert_eq!(mirror.has_blob(d), expect_kept, "small blob {i}");
    }
    assert!(mirror.has_blob(&layer), "pinned layer evicted");
    assert!(mirror.has_blob(&config), "pinned config evicted");
    assert!(mirror.has_blob(&big), "a blob in use was evicted");
    let usage = mirror.app.cache().lifecycle().usage();
    assert!(
        usage.blob_bytes <= 48 * MIB as u64 && usage.blob_bytes > 44 * MIB as u64,
        "usage {usage:?}"
    );
    assert_eq!(mirror.app.cache().lifecycle().evictions(), 4);
    drop(reading);

    // An evicted blob is simply fetched again.
    let again = get(&blob(&small[1])).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{}", small[1])),
        2
    );
}

/// Pulls `url` every 100 ms for `lasting`: blob traffic, so verified downloads wait for their
/// commit meanwhile.
async fn keep_pulling(url: &str, lasting: Duration) {
    let until = std::time::Instant::now() + lasting;
    while std::time::Instant::now() < until {
        assert_eq!(get(url).await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_waiting_for_their_commit_count_against_the_budget() {
    let origin = FakeRegistry::start().await;
    let old: Vec<Digest> = (0..3)
        .map(|i| origin.add_blob(random_bytes(8 * MIB, 80 + i)))
        .collect();
    let new: Vec<Digest> = (0..2)
        .map(|i| origin.add_blob(random_bytes(8 * MIB, 90 + i)))
        .collect();
    let small = origin.add_blob(random_bytes(1000, 99));
    // Evicts past 30 MiB, down to 20.
    let mirror = TestMirror::start(&origin.url(), |c| with_budget(c, 40, 0.75, 0.5)).await;
    let blob = |d: &Digest| mirror.url(&format!("/v2/library/app/blobs/{d}"));
    for d in old.iter().chain([&small]) {
        assert_eq!(get(&blob(d)).await.status, StatusCode::OK);
        mirror.settle().await;
    }
    // Two more are pulled while blob traffic goes on: their commits wait, and their bytes,
    // on the disk already, count. The first brings 24 + 8 MiB past 30: the two oldest go.
    assert_eq!(get(&blob(&new[0])).await.status, StatusCode::OK);
    eventually("room is made at verification", || {
        mirror.app.cache().lifecycle().evictions() == 2
    })
    .await;
    assert_eq!(get(&blob(&new[1])).await.status, StatusCode::OK);
    keep_pulling(&blob(&small), Duration::from_millis(1200)).await;
    let usage = mirror.app.cache().lifecycle().usage();
    assert_eq!(usage.waiting_bytes, 16 * MIB as u64, "{usage:?}");
    assert_eq!(usage.blob_bytes, 8 * MIB as u64 + 1000, "{usage:?}");
    assert!(!mirror.has_blob(&old[0]) && !mirror.has_blob(&old[1]));
    assert!(mirror.has_blob(&old[2]));
    assert!(new.iter().all(|d| !mirror.has_blob(d)), "committed early");
    assert_eq!(mirror.app.cache().lifecycle().evictions(), 2);
    // The traffic pauses: committed, and counted as stored.
    mirror.settle().await;
    assert!(new.iter().all(|d| mirror.has_blob(d)));
    let usage = mirror.app.cache().lifecycle().usage();
    assert_eq!(usage.blob_bytes, 24 * MIB as u64 + 1000, "{usage:?}");
    assert_eq!(usage.waiting_bytes, 0);
    assert_eq!(mirror.app.cache().lifecycle().evictions(), 2);
}

/// Files this process holds open that were removed from the disk (their space is not freed).
fn open_removed_files(under: &std::path::Path) -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|target| {
            target.starts_with(&*under.to_string_lossy()) && target.ends_with(" (deleted)")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_blobs_served_from_memory_follow_eviction_and_removal() {
    let origin = FakeRegistry::start().await;
    let contents: Vec<Vec<u8>> = (0..7).map(|i| random_bytes(MIB / 2, 60 + i)).collect();
    let digests: Vec<Digest> = contents
        .iter()
        .map(|c| origin.add_blob(c.clone()))
        .collect();
    // Evicts past 3 MiB, down to 2.
    let mirror = TestMirror::start(&origin.url(), |c| with_budget(c, 4, 0.75, 0.5)).await;
    let blob = |d: &Digest| mirror.url(&format!("/v2/library/app/blobs/{d}"));
    let cache = mirror.cache_dir();
    // Each is fetched, then hit twice (the second hit answered from memory).
    for (d, content) in digests.iter().zip(&contents) {
        for _ in 0..3 {
            let got = get(&blob(d)).await;
            assert_eq!(got.status, StatusCode::OK);
            assert!(got.bytes()[..] == content[..], "{d}");
            mirror.settle().await;
        }
    }
    // 7 x 0.5 MiB passed 3 MiB: the oldest three were evicted down to 2 MiB, and their files,
    // removed, are not held open (the disk space is free at once).
    assert_eq!(mirror.app.cache().lifecycle().evictions(), 3);
    assert!((0..3).all(|i| !mirror.has_blob(&digests[i])));
    assert_eq!(open_removed_files(&cache), Vec::<String>::new());
    // An evicted blob is fetched again, not answered from memory.
    let again = get(&blob(&digests[0])).await;
    assert!(again.bytes()[..] == contents[0][..]);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{}", digests[0])),
        2
    );
    mirror.settle().await;

    let hot = mirror.app.cache().lifecycle().hot();
    assert!(
        hot.get(&digests[6]).is_some(),
        "a small blob hit lately is kept in memory"
    );

    // A blob removed behind the server's back (`regmirror gc` run beside it) is fetched
    // again too, byte-exact.
    let kept = &digests[6];
    std::fs::remove_file(blob_path(&cache, kept)).unwrap();
    let again = get(&blob(kept)).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(again.bytes()[..] == contents[6][..]);
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/app/blobs/{kept}")),
        2
    );
    mirror.settle().await;
    assert!(mirror.has_blob(kept));
    assert_eq!(open_removed_files(&cache), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_shared_by_repositories_is_stored_and_counted_once() {
    let origin = FakeRegistry::start().await;
    let layer = origin.add_blob(random_bytes(MIB, 60));
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    for repo in ["library/one", "library/two", "org/three"] {
        let got = get(&mirror.url(&format!("/v2/{repo}/blobs/{layer}"))).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/one/blobs/{layer}")),
        1
    );
    assert_eq!(
        origin.hits("GET", &format!("/v2/library/two/blobs/{layer}")),
        0
    );
    assert_eq!(
        origin.hits("GET", &format!("/v2/org/three/blobs/{layer}")),
        0
    );
    // The last byte reaches clients before the blob is committed: count once the fill is done.
    mirror.settle().await;
    let usage = mirror.app.cache().lifecycle().usage();
    assert_eq!((usage.blobs, usage.blob_bytes), (1, MIB as u64));
}

/// A size-limited tmpfs mounted for the test, unmounted on drop.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(path: std::path::PathBuf, size_mib: usize) -> SmallDisk {
        std::fs::create_dir_all(&path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot mount a tmpfs (the test needs root)"
        );
        SmallDisk { path }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_evicts_then_passes_through_without_partial_files() {
    let origin = FakeRegistry::start().await;
    let a = random_bytes(3 * MIB, 70);
    let c = random_bytes(6 * MIB, 71);
    let huge = random_bytes(12 * MIB, 72);
    let (a_digest, c_digest, huge_digest) = (
        origin.add_blob(a.clone()),
        origin.add_blob(c.clone()),
        origin.add_blob(huge.clone()),
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path().join("cache"), 8);
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.dir = disk.path.clone()).await;
    let blob = |d: &Digest| mirror.url(&format!("/v2/library/app/blobs/{d}"));

    assert!(get(&blob(&a_digest)).await.bytes()[..] == a[..]);
    mirror.settle().await;
    // 3 + 6 MiB do not fit in 8: the older blob is evicted and the write retried.
    assert!(get(&blob(&c_digest)).await.bytes()[..] == c[..]);
    mirror.settle().await;
    assert!(mirror.has_blob(&c_digest));
    assert!(!mirror.has_blob(&a_digest));

    // 12 MiB never fits: the download cannot be stored, yet the client gets the whole blob
    // (the rest streamed from upstream, verified), and nothing partial stays behind...
    let first = get(&blob(&huge_digest)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        first.body.is_ok(),
        "the client's download broke: {:?}",
        first.body.err()
    );
    assert!(first.bytes()[..] == huge[..]);
    assert!(!mirror.has_blob(&huge_digest));
    eventually("the temp file is removed", || mirror.temp_files() == 0).await;
    // ...and while the disk is full, misses pass through, verified, without caching.
    let second = get(&blob(&huge_digest)).await;
    assert_eq!(second.status, StatusCode::OK);
    assert!(second.bytes()[..] == huge[..]);
    assert!(!mirror.has_blob(&huge_digest));
    assert_eq!(mirror.temp_files(), 0);
    // Cached content is still served.
    assert!(get(&blob(&c_digest)).await.bytes()[..] == c[..]);
    drop(mirror);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_still_serves_a_verified_blob_waiting_for_its_commit() {
    let origin = FakeRegistry::start().await;
    let a = random_bytes(3 * MIB, 74);
    let a_digest = origin.add_blob(a.clone());
    let huge_digest = origin.add_blob(random_bytes(12 * MIB, 75));
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path().join("cache"), 8);
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.dir = disk.path.clone()).await;
    let blob = |d: &Digest| mirror.url(&format!("/v2/library/app/blobs/{d}"));

    // `a` is verified, and its commit waits while the next pull runs...
    assert!(get(&blob(&a_digest)).await.bytes()[..] == a[..]);
    // ...which outgrows the disk: misses pass through from now on.
    assert_eq!(get(&blob(&huge_digest)).await.status, StatusCode::OK);
    assert!(mirror.app.cache().lifecycle().disk_full());
    assert!(!mirror.has_blob(&a_digest), "committed early");
    // `a` is on the disk, verified: served from there, not fetched again.
    assert!(get(&blob(&a_digest)).await.bytes()[..] == a[..]);
    let path = format!("/v2/library/app/blobs/{a_digest}");
    assert_eq!(origin.hits("GET", &path), 1);
    mirror.settle().await;
    assert!(mirror.has_blob(&a_digest));
    drop(mirror);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_passed_through_is_aborted() {
    let origin = FakeRegistry::start().await;
    let huge = random_bytes(12 * MIB, 73);
    let digest = origin.add_blob(huge.clone());
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path().join("cache"), 4);
    let mirror = TestMirror::start(&origin.url(), |c| c.cache.dir = disk.path.clone()).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    origin.knobs(|k| k.corrupt_last_byte = true);
    // The download outgrows the disk and the client carries on from upstream: still verified.
    let first = try_get(&url).await;
    assert!(
        first.is_none_or(|g| g.body.is_err()),
        "a corrupt blob reached the client whole (carry-on path)"
    );
    // Now the mirror passes misses straight through: verified as well.
    assert!(mirror.app.cache().lifecycle().disk_full());
    let second = try_get(&url).await;
    assert!(
        second.is_none_or(|g| g.body.is_err()),
        "a corrupt blob reached the client whole (pass-through)"
    );
    assert!(!mirror.has_blob(&digest));
    drop(mirror);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_passes_misses_through_within_the_download_ceiling() {
    let origin = FakeRegistry::start().await;
    let huge = random_bytes(12 * MIB, 76);
    let other = random_bytes(2 * MIB, 77);
    let (huge_digest, other_digest) = (
        origin.add_blob(huge.clone()),
        origin.add_blob(other.clone()),
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(dir.path().join("cache"), 4);
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.cache.dir = disk.path.clone();
        c.cache.max_downloads = 1;
        c.cache.fill_timeout = Duration::from_secs(1);
    })
    .await;
    let blob = |d: &Digest| mirror.url(&format!("/v2/library/app/blobs/{d}"));
    // The first download outgrows the disk: misses pass through from now on.
    assert!(get(&blob(&huge_digest)).await.bytes()[..] == huge[..]);
    assert!(mirror.app.cache().lifecycle().disk_full());

    // A pass-through whose client has not read its body yet holds the only slot...
    let holding = start_get(&blob(&huge_digest)).await;
    assert_eq!(holding.status(), StatusCode::OK);
    // ...so another miss waits for it, and after `fill_timeout` is told to come back.
    let refused = get(&blob(&other_digest)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("retry-after"), Some("10"));
    assert_eq!(refused.json()["errors"][0]["code"], "UNAVAILABLE");
    let path = format!("/v2/library/app/blobs/{other_digest}");
    assert_eq!(
        origin.hits("GET", &path),
        0,
        "upstream asked beyond the ceiling"
    );
    // Once that client is gone, its slot is free again.
    drop(holding);
    let served = get(&blob(&other_digest)).await;
    assert!(served.bytes()[..] == other[..]);
    drop(mirror);
    drop(disk);
}
