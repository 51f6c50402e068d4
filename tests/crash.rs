//! Crash safety: the regmirror binary is killed with SIGKILL and restarted on the same cache,
//! many times, at moments aimed at each phase of a download's life, in turn:
//! - **receiving**: at a random moment while its bytes arrive;
//! - **verifying**: the moment a client has every byte but the last (the mirror releases the
//!   last only once the digest is checked): the whole blob is in `tmp/`, being verified or
//!   just verified, not yet committed;
//! - **committing**: the moment the first of a batch of verified blobs (they wait for a pause
//!   in blob traffic, then are made durable and renamed one by one) appears in the store;
//! - **evicting**: the moment the budget's eviction removes its first blob to make room.
//!
//! After every kill the store holds only entries whose bytes match their digest, no client was
//! ever served a wrong body whole, and leftovers are purged at start-up. The seed is printed
//! (`CRASH_SEED` replays it), and so is what each kill interrupted; each phase must have been
//! hit more than once.

mod common;

use common::chaos::Random;
use common::e2e::{spawn_regmirror, wait_until_up, Process};
use common::*;
use regmirror::digest::Digest;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1024 * 1024;
/// Blobs of the origin; the budget (40 MiB, evicting from 32 down to 20) holds about three.
const BLOBS: u64 = 6;
const BLOB_SIZE: usize = 8 * MIB;
/// Iterations: the phases in turn, four kills each.
const ITERATIONS: usize = 16;

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

fn start_mirror(dir: &Path, cache: &Path, origin: &str, name: &str) -> (Process, u16) {
    spawn_regmirror(dir, name, |port| {
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[cache]\ndir = {:?}\nmax_size = \"40MiB\"\nhigh_watermark = 0.8\nlow_watermark = 0.5\n\
             [[registry]]\nname = \"docker.io\"\ndefault = true\n[[registry.upstream]]\nurl = \"{origin}\"\n",
            cache.display().to_string()
        )
    })
}

/// The phase of a download's life a kill is aimed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Receiving,
    Verifying,
    Committing,
    Evicting,
}

const PHASES: [Phase; 4] = [
    Phase::Receiving,
    Phase::Verifying,
    Phase::Committing,
    Phase::Evicting,
];

/// Kills that landed in the phase they were aimed at, per phase, and those that did not.
#[derive(Debug, Default)]
struct Landed {
    receiving: usize,
    verifying: usize,
    committing: usize,
    evicting: usize,
    missed: Vec<String>,
}

impl Landed {
    fn count(&mut self, phase: Phase, landed: bool, what: &str) {
        if !landed {
            self.missed.push(format!("{phase:?}: {what}"));
            return;
        }
        *match phase {
            Phase::Receiving => &mut self.receiving,
            Phase::Verifying => &mut self.verifying,
            Phase::Committing => &mut self.committing,
            Phase::Evicting => &mut self.evicting,
        } += 1;
    }
}

/// SIGKILLs `pid` the moment one of `watched` meets `now` (checked by a thread of its own, so
/// the kill follows within microseconds); whether it did within 30 s.
async fn kill_when(pid: u32, watched: Vec<PathBuf>, now: fn(&Path) -> bool) -> bool {
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if watched.iter().any(|p| now(p)) {
                // SAFETY: signals the child this test started (reaped by the caller).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return true;
            }
            std::thread::yield_now();
        }
        false
    })
    .await
    .unwrap()
}

/// Reads a blob's body as a client does and SIGKILLs `pid` once every byte but the last has
/// arrived (the mirror holds the last back until the digest is checked; it often comes in the
/// same read, the check takes microseconds); the bytes read by then. Every byte read must
/// equal `expected`'s.
async fn kill_one_byte_short(port: u16, digest: &Digest, expected: &[u8], pid: u32) -> usize {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "GET /v2/library/app/blobs/{digest} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = vec![0u8; 1024 * 1024];
    let mut body_at = None;
    loop {
        let read = stream.read(&mut buffer).await.unwrap_or(0);
        if read == 0 {
            break;
        }
        received.extend_from_slice(&buffer[..read]);
        if body_at.is_none() {
            body_at = received
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|at| at + 4);
            if let Some(at) = body_at {
                let head = String::from_utf8_lossy(&received[..at]);
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            }
        }
        let Some(at) = body_at else { continue };
        let body = &received[at..];
        assert!(
            body[..] == expected[..body.len()],
            "a wrong byte was served"
        );
        if body.len() + 1 >= expected.len() {
            // SAFETY: signals the child this test started (reaped by the caller).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return body.len();
        }
    }
    body_at.map_or(0, |at| received.len() - at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_every_phase_of_a_download_never_leaves_a_bad_entry() {
    let origin = FakeRegistry::start().await;
    let blobs: Vec<(Digest, Vec<u8>)> = (0..BLOBS)
        .map(|i| {
            let bytes = random_bytes(BLOB_SIZE, 90 + i);
            (origin.add_blob(bytes.clone()), bytes)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let random = Random::from_env("CRASH_SEED");
    let url = |port: u16, digest: &Digest| {
        format!("http://127.0.0.1:{port}/v2/library/app/blobs/{digest}")
    };
    let mut landed = Landed::default();
    for iteration in 0..ITERATIONS {
        let phase = PHASES[iteration % PHASES.len()];
        // The mirror is down: a blob file removed now is as if evicted. Evicting: the store
        // starts empty, the first half is pulled and committed, then the second half pushes
        // the budget past its high watermark. Otherwise at least three blobs are fresh (not
        // stored), so a batch of commits has several to interrupt.
        let (old, fresh): (Vec<_>, Vec<_>) = if phase == Phase::Evicting {
            for (digest, _) in &blobs {
                let _ = std::fs::remove_file(blob_path(&cache, digest));
            }
            let (old, fresh) = blobs.split_at(blobs.len() / 2);
            (old.iter().collect(), fresh.iter().collect())
        } else {
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
            (Vec::new(), fresh)
        };
        origin.knobs(|k| {
            k.chunk = Some(64 * 1024);
            // Receiving: 8 MiB take about half a second, so the kill lands mid-stream.
            // Verifying: the client keeps up with the bytes as they arrive.
            k.chunk_delay = match phase {
                Phase::Receiving => Some(Duration::from_millis(4)),
                Phase::Verifying => Some(Duration::from_millis(1)),
                _ => None,
            };
        });
        let (mut mirror, port) = start_mirror(dir.path(), &cache, &origin.url(), "crash");
        wait_until_up(&format!("http://127.0.0.1:{port}/v2/"), &mirror).await;
        assert_eq!(temp_files(&cache), 0, "tmp/ not purged at start-up");
        let pid = mirror.pid();
        for (digest, bytes) in &old {
            let got = get(&url(port, digest)).await;
            assert!(got.bytes()[..] == bytes[..], "{digest} byte-exact");
        }
        let old_paths: Vec<PathBuf> = old.iter().map(|(d, _)| blob_path(&cache, d)).collect();
        if !old.is_empty() {
            let paths = old_paths.clone();
            eventually("the first half is committed", || {
                paths.iter().all(|p| p.exists())
            })
            .await;
        }
        // The verifying kill reads the first fresh blob itself.
        let followed = usize::from(phase == Phase::Verifying);
        let requests: Vec<_> = fresh[followed..]
            .iter()
            .map(|(digest, bytes)| {
                let url = url(port, digest);
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
        let fresh_paths: Vec<PathBuf> = fresh.iter().map(|(d, _)| blob_path(&cache, d)).collect();
        let (aimed, what) = match phase {
            Phase::Receiving => {
                tokio::time::sleep(Duration::from_millis(50 + random.below(200))).await;
                mirror.kill();
                let committed = fresh_paths.iter().filter(|p| p.exists()).count();
                let downloading = temp_files(&cache);
                (
                    committed == 0 && downloading > 0,
                    format!("{downloading} downloads in tmp/, {committed} committed"),
                )
            }
            Phase::Verifying => {
                let (digest, bytes) = fresh[0];
                let read = kill_one_byte_short(port, digest, bytes, pid).await;
                mirror.kill();
                let committed = blob_path(&cache, digest).exists();
                let in_tmp = temp_files(&cache);
                (
                    read + 1 >= bytes.len() && !committed && in_tmp > 0,
                    format!(
                        "the client had {read} of {} bytes, {in_tmp} files in tmp/, committed: {committed}",
                        bytes.len()
                    ),
                )
            }
            Phase::Committing => {
                assert!(
                    kill_when(pid, fresh_paths.clone(), |p| p.exists()).await,
                    "no commit began"
                );
                mirror.kill();
                let committed = fresh_paths.iter().filter(|p| p.exists()).count();
                let waiting = temp_files(&cache);
                (
                    waiting > 0,
                    format!("{committed} renamed, {waiting} waiting"),
                )
            }
            Phase::Evicting => {
                assert!(
                    kill_when(pid, old_paths.clone(), |p| !p.exists()).await,
                    "no eviction began"
                );
                mirror.kill();
                // Making room takes all three older blobs (the budget evicts down to 20 MiB):
                // with some of them left, the kill landed while it was removing them.
                let kept = old_paths.iter().filter(|p| p.exists()).count();
                let committed = fresh_paths.iter().filter(|p| p.exists()).count();
                (
                    kept > 0,
                    format!(
                        "{kept} of {} older blobs left, {committed} new committed",
                        old.len()
                    ),
                )
            }
        };
        for r in requests {
            r.await.expect("a client saw a wrong body");
        }
        landed.count(phase, aimed, &what);
        let stored = assert_store_consistent(&cache);
        eprintln!("kill {iteration} ({phase:?}): {what}; {stored} verified entries after it");
    }
    eprintln!("kills landed: {landed:?}");
    for (phase, hits) in [
        ("receiving", landed.receiving),
        ("verifying", landed.verifying),
        ("committing", landed.committing),
        ("evicting", landed.evicting),
    ] {
        assert!(hits >= 2, "too few kills landed while {phase}: {landed:?}");
    }

    // A last clean start serves everything byte-exact.
    origin.knobs(|k| k.chunk_delay = None);
    let (mirror, port) = start_mirror(dir.path(), &cache, &origin.url(), "final");
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
