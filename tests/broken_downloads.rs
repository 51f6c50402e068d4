//! Downloads that break: a wrong last byte, connections reset mid-body (with and without
//! progress), a body that stalls. Whatever breaks, no client gets a wrong blob whole, nothing
//! partial is stored, and a download that keeps making progress completes.

mod common;

use common::*;
use http::StatusCode;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_last_byte_never_reaches_the_client() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(400 * 1024, 11);
    let digest = origin.add_blob(blob.clone());
    origin.knobs(|k| k.corrupt_last_byte = true);
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    let request = http::Request::get(&url)
        .body(http_body_util::Empty::new())
        .unwrap();
    // When the verdict comes before the first byte goes out, the connection is dropped before
    // even the headers: the client gets nothing at all, which is just as safe.
    let Ok(response) = client().request(request).await else {
        assert!(!mirror.has_blob(&digest));
        return;
    };
    use http_body_util::BodyExt;
    let mut body = response.into_body();
    let mut received = 0usize;
    let ended_with_error = loop {
        match body.frame().await {
            Some(Ok(frame)) => received += frame.into_data().map(|d| d.len()).unwrap_or(0),
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(ended_with_error, "the response ended cleanly");
    assert!(received < blob.len(), "the wrong last byte was sent");
    assert!(!mirror.has_blob(&digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_breaks_every_300_kib_still_delivers_the_blob() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(1024 * 1024, 4);
    let digest = origin.add_blob(blob.clone());
    origin.knobs(|k| {
        k.reset_after = Some(300 * 1024);
        k.chunk = Some(100 * 1024);
    });
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    let got = get(&url).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.bytes()[..] == blob[..], "not the blob");
    // Each resume asked from where the last answer broke: 300 KiB further each time (a reset
    // can also cost the bytes still in flight, and the same start is asked again).
    let starts: Vec<usize> = origin
        .ranges()
        .iter()
        .map(|r| {
            r.as_deref()
                .map_or(0, |r| r[6..r.len() - 1].parse().unwrap())
        })
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] <= w[1])
            && starts.iter().all(|s| s % (300 * 1024) == 0)
            && starts.last() == Some(&(900 * 1024)),
        "{starts:?}"
    );
    eventually("the blob is committed", || mirror.has_blob(&digest)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_that_bring_nothing_abort_clients_and_store_nothing() {
    let origin = FakeRegistry::start().await;
    let blob = random_bytes(1024 * 1024, 4);
    let digest = origin.add_blob(blob.clone());
    // Every answer breaks before its first byte.
    origin.knobs(|k| k.reset_after = Some(0));
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    let url = mirror.url(&format!("/v2/library/app/blobs/{digest}"));
    let got = get(&url).await;
    assert!(
        got.body.is_err() || got.status != StatusCode::OK,
        "a cut download looked complete"
    );
    assert!(!mirror.has_blob(&digest));
    eventually("the temp file is removed", || mirror.temp_files() == 0).await;
    // The first answer and two resumes (two failures in a row per endpoint), then no more.
    assert_eq!(origin.ranges().len(), 3, "{:?}", origin.ranges());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_body_fails_the_fill_within_the_stall_timeout() {
    let origin = FakeRegistry::start().await;
    let digest = origin.add_blob(random_bytes(10_000, 13));
    origin.knobs(|k| k.stall_blobs = true);
    let mirror = TestMirror::start(&origin.url(), |c| {
        c.registry[0].upstream[0].stall_timeout = Duration::from_millis(300);
    })
    .await;
    let started = std::time::Instant::now();
    let got = get(&mirror.url(&format!("/v2/library/app/blobs/{digest}"))).await;
    assert!(got.body.is_err(), "a stalled download ended cleanly");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(!mirror.has_blob(&digest));
    eventually("the fill is gone", || {
        mirror.app.cache().fills_in_flight() == 0
    })
    .await;
    eventually("the temp file is removed", || mirror.temp_files() == 0).await;
}
