//! Three replicas that know each other (`[cluster]`) and share one bucket, with real parts:
//! Debian's `docker-registry` as the origin (behind a relay that counts what it sends),
//! `s3s-fs` as the S3 server, and the regmirror binary three times (own ports, own disks).
//! Clients spread over the replicas pull the same cold blob (or manifest) at once: the origin
//! sends it once for the whole fleet, every client gets it byte-exact and starts receiving it
//! while the origin is still sending. An owner killed mid-download costs the others' clients
//! nothing. A tag is revalidated with the origin once per TTL for the whole fleet, and a tag
//! moved at the origin reaches every replica within the TTL. Peers refuse cluster requests not
//! signed with the secret.

mod common;

use common::e2e::*;
use common::relay::Relay;
use common::s3::S3Server;
use common::{metric_value, random_bytes};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use regmirror::digest::{Digest, Hasher};
use std::path::Path;
use std::time::Instant;

const SECRET: &str = "a-cluster-secret-for-the-tests";
const CLIENTS: usize = 24;
const BLOB_MIB: usize = 256;

/// Three replicas of the Docker Hub mirror in front of `origin`, sharing `s3`, each naming
/// the three as its peers.
async fn fleet(dir: &Path, origin: &str, s3: &S3Server) -> Vec<(Process, u16)> {
    fleet_with(dir, origin, s3, "").await
}

/// [`fleet`], with `cache_extra` added to each replica's `[cache]` section.
async fn fleet_with(
    dir: &Path,
    origin: &str,
    s3: &S3Server,
    cache_extra: &str,
) -> Vec<(Process, u16)> {
    let secret_file = dir.join("cluster.secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let peers: Vec<String> = ports
        .iter()
        .map(|port| format!("http://127.0.0.1:{port}"))
        .collect();
    let mut replicas = Vec::new();
    for (i, &port) in ports.iter().enumerate() {
        let name = format!("replica{i}");
        let cache = dir.join(format!("{name}-cache"));
        let process = spawn_regmirror_on(dir, &name, port, |port| {
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n{cache_extra}\n\
                 [[registry]]\nname = \"docker.io\"\ndefault = true\n\
                 [[registry.upstream]]\nurl = \"{origin}\"\n{}\
                 [cluster]\nself = {:?}\npeers = {peers:?}\nsecret_file = {:?}\n",
                cache.display().to_string(),
                s3.config_section(),
                peers[i],
                secret_file.display().to_string(),
            )
        });
        replicas.push((process, port));
    }
    for (process, port) in &replicas {
        wait_until_up(&format!("http://127.0.0.1:{port}/healthz"), process).await;
    }
    replicas
}

/// One client's pull: when its first body byte came, and the digest and length of what it got.
async fn pull(url: String) -> (Instant, Digest, u64) {
    try_pull(&url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// [`pull`], or why it failed.
async fn try_pull(url: &str) -> Result<(Instant, Digest, u64), String> {
    let response = common::client()
        .get(url.parse().unwrap())
        .await
        .map_err(|e| e.to_string())?;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let (mut hasher, mut first_byte) = (Hasher::default(), None);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
            first_byte.get_or_insert_with(Instant::now);
            hasher.update(&data);
        }
    }
    let length = hasher.len();
    let first_byte = first_byte.ok_or("an empty body")?;
    Ok((first_byte, hasher.finish(), length))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and s3s-fs: run tests/run.sh"]
async fn clients_of_three_replicas_pulling_one_cold_blob_leave_the_origin_once() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(&dir.path().join("origin")).await;
    let blob = random_bytes(BLOB_MIB << 20, 2026);
    let digest = push_blob(&origin, REPO, &blob).await;
    drop(blob);
    let relay = Relay::start(origin.port).await;
    let s3 = S3Server::start().await;
    let replicas = fleet(dir.path(), &relay.url(), &s3).await;

    let started = Instant::now();
    let pulls: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let port = replicas[i % replicas.len()].1;
            tokio::spawn(pull(format!(
                "http://127.0.0.1:{port}/v2/{REPO}/blobs/{digest}"
            )))
        })
        .collect();
    let mut first_bytes = Vec::new();
    for pull in pulls {
        let (first_byte, got, length) = pull.await.unwrap();
        assert_eq!((&got, length), (&digest, (BLOB_MIB << 20) as u64));
        first_bytes.push(first_byte);
    }
    let done = started.elapsed();
    let origin_sent = relay.sent();
    let origin_done = relay.last_sent_at().unwrap();
    let latest_first_byte = first_bytes.iter().max().unwrap();
    println!(
        "{CLIENTS} clients over 3 replicas, one cold {BLOB_MIB} MiB blob: origin sent {:.2} \
         times its size; last first byte {:?} after the start, origin done {:?} after it; \
         all byte-exact {done:?} after the start",
        origin_sent as f64 / (BLOB_MIB << 20) as f64,
        latest_first_byte.duration_since(started),
        origin_done.duration_since(started),
    );
    assert!(
        origin_sent >= (BLOB_MIB << 20) as u64 && origin_sent < (BLOB_MIB << 20) as u64 * 3 / 2,
        "the origin sent {origin_sent} bytes for one {BLOB_MIB} MiB blob"
    );
    assert!(
        *latest_first_byte < origin_done,
        "a client's first byte came after the origin had sent everything"
    );
    // Each replica that does not own the digest asked its owner once, and nobody else.
    let mut asked = 0.0;
    for (_, port) in &replicas {
        let text = common::get(&format!("http://127.0.0.1:{port}/metrics")).await;
        let text = String::from_utf8_lossy(text.bytes()).into_owned();
        for (_, peer) in &replicas {
            let peer = format!("http://127.0.0.1:{peer}");
            asked += metric_value(
                &text,
                "regmirror_peer_requests_sent_total",
                &[("peer", &peer), ("outcome", "ok")],
            );
        }
    }
    assert_eq!(asked, 2.0, "peer requests sent");

    // A cluster request not signed with the secret is refused, whatever it asks.
    let port = replicas[0].1;
    for signature in ["1.00", "not a signature"] {
        let request = Request::get(format!("http://127.0.0.1:{port}/v2/{REPO}/blobs/{digest}"))
            .header("x-regmirror-peer", signature)
            .body(Empty::new())
            .unwrap();
        let response = common::client().request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        // Said to be the cluster's refusal: the asking replica stops asking this peer.
        assert!(response.headers().contains_key("x-regmirror-peer-refused"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("DENIED"),
            "{body:?}"
        );
    }
}

/// The replica whose metrics say it served a peer's request: the owner of what was asked.
async fn owner(replicas: &[(Process, u16)]) -> Option<usize> {
    for (i, (_, port)) in replicas.iter().enumerate() {
        let text = common::get(&format!("http://127.0.0.1:{port}/metrics")).await;
        let text = String::from_utf8_lossy(text.bytes()).into_owned();
        let served = metric_value(
            &text,
            "regmirror_peer_requests_served_total",
            &[("outcome", "served")],
        );
        if served > 0.0 {
            return Some(i);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and s3s-fs: run tests/run.sh"]
async fn when_the_owner_is_killed_mid_download_the_other_replicas_clients_still_complete() {
    const MIB: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(&dir.path().join("origin")).await;
    let blob = random_bytes(MIB << 20, 2027);
    let digest = push_blob(&origin, REPO, &blob).await;
    drop(blob);
    // A slow origin: the download takes about 4 s.
    let relay = Relay::paced(origin.port, Some(((MIB as u64) << 20) / 4)).await;
    let s3 = S3Server::start().await;
    let mut replicas = fleet(dir.path(), &relay.url(), &s3).await;

    let pulls: Vec<_> = replicas
        .iter()
        .map(|(_, port)| {
            let url = format!("http://127.0.0.1:{port}/v2/{REPO}/blobs/{digest}");
            tokio::spawn(async move { try_pull(&url).await })
        })
        .collect();
    let mut owner_index = None;
    for _ in 0..100 {
        owner_index = owner(&replicas).await;
        if owner_index.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let owner_index = owner_index.expect("no replica served a peer's request");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        relay.sent() < (MIB << 20) as u64,
        "the download ended before the kill"
    );
    replicas[owner_index].0.kill();

    for (i, pull) in pulls.into_iter().enumerate() {
        if i == owner_index {
            // Its own client lost its connection with it.
            let _ = pull.await;
            continue;
        }
        let (_, got, length) = pull
            .await
            .unwrap()
            .expect("a client of a surviving replica failed");
        assert_eq!((&got, length), (&digest, (MIB << 20) as u64));
    }
    // The survivors resumed from upstream where the owner left off, and skip it from now on.
    let survivor = replicas
        .iter()
        .enumerate()
        .find(|(i, _)| *i != owner_index)
        .unwrap()
        .1;
    let text = common::get(&format!("http://127.0.0.1:{}/metrics", survivor.1)).await;
    let text = String::from_utf8_lossy(text.bytes()).into_owned();
    let dead = format!("http://127.0.0.1:{}", replicas[owner_index].1);
    assert_eq!(
        metric_value(&text, "regmirror_peer_up", &[("peer", &dead)]),
        0.0,
        "the killed owner is not marked down"
    );
    // Readiness and the status page say so; the replica stays ready.
    let ready = common::get(&format!("http://127.0.0.1:{}/readyz", survivor.1)).await;
    let ready = String::from_utf8_lossy(ready.bytes()).into_owned();
    assert!(
        ready.starts_with("ready (peers down: ") && ready.contains(&dead),
        "{ready}"
    );
    let page = common::get(&format!("http://127.0.0.1:{}/", survivor.1)).await;
    let page = String::from_utf8_lossy(page.bytes()).into_owned();
    assert!(
        page.contains(&format!("<tr><td>{dead}</td><td><span class=\"down\">")),
        "{page}"
    );
    println!(
        "owner killed 1 s into a {MIB} MiB download: the two other replicas' clients complete \
         byte-exact; the origin sent {:.2} times the blob",
        relay.sent() as f64 / (MIB << 20) as f64
    );
    // Nothing partial is visible in the bucket: the blob is whole or absent.
    for _ in 0..300 {
        if s3.blob(&digest).is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if let Some(object) = s3.blob(&digest) {
        assert_eq!(
            Digest::of(&object),
            digest,
            "a partial object in the bucket"
        );
    }
    // A new pull through a survivor is a hit or comes whole from the bucket or upstream.
    let (_, got, _) = pull(format!(
        "http://127.0.0.1:{}/v2/{REPO}/blobs/{digest}",
        survivor.1
    ))
    .await;
    assert_eq!(got, digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and s3s-fs: run tests/run.sh"]
async fn a_manifest_asked_of_three_replicas_at_once_is_fetched_from_the_origin_once() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(&dir.path().join("origin")).await;
    let seeded = seed(&origin).await;
    let relay = Relay::start(origin.port).await;
    let s3 = S3Server::start().await;
    let replicas = fleet(dir.path(), &relay.url(), &s3).await;

    // The index, then its manifests: each asked of the three replicas at once.
    let mut asked = vec![seeded.oci_index.clone()];
    asked.extend(seeded.oci_manifests.iter().cloned());
    for digest in &asked {
        let gets: Vec<_> = replicas
            .iter()
            .map(|(_, port)| {
                let url = format!("http://127.0.0.1:{port}/v2/{REPO}/manifests/{digest}");
                tokio::spawn(async move { common::get(&url).await })
            })
            .collect();
        for get in gets {
            let got = get.await.unwrap();
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(&Digest::of(got.bytes()), digest);
        }
        let line = format!("GET /v2/{REPO}/manifests/{digest}");
        assert_eq!(
            relay.requests(&line),
            1,
            "{line}: the origin was asked more than once"
        );
    }
    println!(
        "{} manifests, each asked of 3 replicas at once: the origin was asked each once",
        asked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and s3s-fs: run tests/run.sh"]
async fn a_tag_is_revalidated_once_per_ttl_for_the_whole_fleet_and_its_move_reaches_every_replica()
{
    const TTL_SECS: f64 = 2.0;
    const RUN_SECS: f64 = 8.0;
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(&dir.path().join("origin")).await;
    let seeded = seed(&origin).await;
    // `rolling` points to the OCI index first, then (half way) to the Docker list.
    let manifest_of = |digest: &Digest| {
        let url = format!("{}/v2/{REPO}/manifests/{digest}", origin.url());
        async move { common::get_manifest(&url).await }
    };
    let (oci, docker) = (
        manifest_of(&seeded.oci_index).await,
        manifest_of(&seeded.docker_list).await,
    );
    let tag = |got: &common::Got| {
        let media_type = got.header("content-type").unwrap().to_string();
        (media_type, got.bytes().to_vec())
    };
    let ((oci_type, oci_bytes), (docker_type, docker_bytes)) = (tag(&oci), tag(&docker));
    push_manifest(&origin, REPO, "rolling", &oci_type, oci_bytes).await;
    let relay = Relay::start(origin.port).await;
    let s3 = S3Server::start().await;
    let ttl = format!("tag_ttl = \"{TTL_SECS}s\"");
    let replicas = fleet_with(dir.path(), &relay.url(), &s3, &ttl).await;

    // Clients of every replica ask for the tag every 100 ms.
    let started = Instant::now();
    let mut moved_at = None;
    let mut answers = Vec::new();
    while started.elapsed().as_secs_f64() < RUN_SECS {
        if moved_at.is_none() && started.elapsed().as_secs_f64() >= RUN_SECS / 2.0 {
            push_manifest(&origin, REPO, "rolling", &docker_type, docker_bytes.clone()).await;
            moved_at = Some(Instant::now());
        }
        for (_, port) in &replicas {
            let got = common::get_manifest(&format!(
                "http://127.0.0.1:{port}/v2/{REPO}/manifests/rolling"
            ))
            .await;
            assert_eq!(got.status, StatusCode::OK);
            let digest = Digest::of(got.bytes());
            assert_eq!(
                got.header("docker-content-digest"),
                Some(digest.to_string().as_str())
            );
            answers.push((Instant::now(), digest));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let moved_at = moved_at.unwrap();

    // Every answer is the tag's digest at the origin then, or, within a TTL of the move (and
    // the time the origin takes to answer a HEAD), the one before.
    let grace = std::time::Duration::from_secs_f64(TTL_SECS + 0.5);
    for (at, digest) in &answers {
        if *at < moved_at {
            assert_eq!(digest, &seeded.oci_index, "before the move");
        } else if *at > moved_at + grace {
            assert_eq!(digest, &seeded.docker_list, "a TTL after the move");
        } else {
            assert!(digest == &seeded.oci_index || digest == &seeded.docker_list);
        }
    }
    let tag_requests = relay.requests(&format!("HEAD /v2/{REPO}/manifests/rolling"))
        + relay.requests(&format!("GET /v2/{REPO}/manifests/rolling"));
    let new_manifest = relay.requests(&format!("GET /v2/{REPO}/manifests/{}", seeded.docker_list));
    println!(
        "{} tag answers from 3 replicas over {RUN_SECS} s, tag TTL {TTL_SECS} s: the origin was \
         asked for the tag {tag_requests} times, for the manifest it moved to {new_manifest}",
        answers.len()
    );
    // Once at the start, then once per TTL at most (3 replicas each asking would be 3 times).
    let most = (RUN_SECS / TTL_SECS).ceil() as usize + 1;
    assert!(
        tag_requests <= most,
        "{tag_requests} tag requests, at most {most} expected"
    );
    assert!(
        new_manifest <= 1,
        "the new manifest was fetched {new_manifest} times"
    );
    // Owners told the others the tag was unchanged without sending the manifest again.
    let unchanged = replicas
        .iter()
        .filter(|(process, _)| process.output().contains("status=304"))
        .count();
    assert!(unchanged > 0, "no owner answered a peer 304 Not Modified");
    // A client naming the digest it has in If-None-Match is told it is unchanged too.
    for (_, port) in &replicas {
        let url = format!("http://127.0.0.1:{port}/v2/{REPO}/manifests/rolling");
        let etag = format!("\"{}\"", seeded.docker_list);
        let accept = ("accept", common::ACCEPT_ALL);
        let got = common::request(Method::GET, &url, &[accept, ("if-none-match", &etag)]).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED);
        assert!(got.bytes().is_empty());
        let digest = seeded.docker_list.to_string();
        assert_eq!(got.header("docker-content-digest"), Some(digest.as_str()));
        assert!(got.header("age").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_given_peers_by_dns_finds_itself_among_the_addresses_the_name_has() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cache = dir.path().join("cache");
    let process = spawn_regmirror_on(dir.path(), "dns", port, |port| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\n\
             [[registry]]\nname = \"docker.io\"\ndefault = true\n\
             [[registry.upstream]]\nurl = \"http://127.0.0.1:1\"\n\
             [cluster]\npeers_dns = \"localhost:{port}\"\nsecret = {SECRET:?}\n",
            cache.display().to_string(),
        )
    });
    let base = format!("http://127.0.0.1:{port}");
    wait_until_up(&format!("{base}/healthz"), &process).await;
    // `localhost` is 127.0.0.1 here: the one peer, this replica, found without `self`.
    let own = format!("http://127.0.0.1:{port}");
    common::eventually_async("the name is looked up", || {
        let url = format!("{base}/metrics");
        let own = own.clone();
        async move {
            let metrics = common::get(&url).await;
            let text = String::from_utf8_lossy(metrics.bytes()).to_string();
            metric_value(&text, "regmirror_peer_up", &[("peer", own.as_str())]) == 1.0
        }
    })
    .await;
    let status = common::get(&format!("{base}/")).await;
    let page = String::from_utf8_lossy(status.bytes()).to_string();
    let row = format!("<tr><td>{own}</td><td>this replica</td></tr>");
    assert!(page.contains(&row), "{page}");
}
