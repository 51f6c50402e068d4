//! The fault matrix: every way an upstream fails, for every request a client makes, with the
//! failing endpoint alone and with a healthy endpoint after it: the status, OCI error code,
//! `Warning` and `Retry-After` the client gets, whether a blob's body arrived whole and exact,
//! and how many requests each endpoint saw.
//!
//! The table is printed, and must equal the README's ("What clients see when upstream fails"):
//! a cell that changes must change on purpose. `UPDATE_FAULT_MATRIX=1 cargo test --test
//! fault_matrix` writes the new table into the README for review.

mod common;

use common::*;
use http::StatusCode;
use regmirror::digest::Digest;
use std::time::Duration;

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
const START: &str = "<!-- fault-matrix:start -->";
const END: &str = "<!-- fault-matrix:end -->";
/// Cells run at once (each with its own upstreams and mirror).
const AT_ONCE: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Reset,
    ConnectRefused,
    Timeout,
    Status500,
    Status502,
    RateLimitedRetryAfter,
    RateLimited,
    Status401,
    Status403,
    Status404,
    HeadRefused,
    CorruptBytes,
    StallMidBody,
    TokenServiceDown,
    DownOneSecondThenBack,
}

impl Fault {
    const ALL: [Fault; 15] = [
        Fault::Reset,
        Fault::ConnectRefused,
        Fault::Timeout,
        Fault::Status500,
        Fault::Status502,
        Fault::RateLimitedRetryAfter,
        Fault::RateLimited,
        Fault::Status401,
        Fault::Status403,
        Fault::Status404,
        Fault::HeadRefused,
        Fault::CorruptBytes,
        Fault::StallMidBody,
        Fault::TokenServiceDown,
        Fault::DownOneSecondThenBack,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::Reset => "reset",
            Fault::ConnectRefused => "connection refused",
            Fault::Timeout => "timeout",
            Fault::Status500 => "500",
            Fault::Status502 => "502",
            Fault::RateLimitedRetryAfter => "429 with Retry-After",
            Fault::RateLimited => "429 without Retry-After",
            Fault::Status401 => "401",
            Fault::Status403 => "403",
            Fault::Status404 => "404",
            Fault::HeadRefused => "405 on manifest HEAD",
            Fault::CorruptBytes => "corrupt bytes",
            Fault::StallMidBody => "stall mid-body",
            Fault::TokenServiceDown => "token service down",
            Fault::DownOneSecondThenBack => "down 1 s, then back",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    TagCached,
    TagUncached,
    ManifestByDigest,
    BlobGet,
    BlobHead,
    TagsList,
}

impl Ask {
    const ALL: [Ask; 6] = [
        Ask::TagCached,
        Ask::TagUncached,
        Ask::ManifestByDigest,
        Ask::BlobGet,
        Ask::BlobHead,
        Ask::TagsList,
    ];

    fn name(self) -> &'static str {
        match self {
            Ask::TagCached => "tag cached",
            Ask::TagUncached => "tag uncached",
            Ask::ManifestByDigest => "manifest by digest",
            Ask::BlobGet => "blob GET",
            Ask::BlobHead => "blob HEAD",
            Ask::TagsList => "`tags/list`",
        }
    }
}

/// The image every upstream holds: `library/app:1.0` and `:2.0` (a config and a 256 KiB layer).
struct Image {
    manifest: Digest,
    layer: Digest,
    layer_bytes: Vec<u8>,
}

fn seed(registry: &FakeRegistry) -> Image {
    let layer_bytes = random_bytes(256 * 1024, 18);
    let layer = registry.add_blob(layer_bytes.clone());
    let config = registry.add_blob(br#"{"architecture":"amd64","os":"linux"}"#.to_vec());
    let body = schema2_manifest(&config, 38, &[(layer.clone(), layer_bytes.len())]);
    let manifest = registry.add_manifest("library/app", Some("1.0"), DOCKER_MANIFEST, body);
    registry.add_empty_image("library/app", "2.0");
    Image {
        manifest,
        layer,
        layer_bytes,
    }
}

/// What the client got, and what the endpoints saw.
#[derive(Debug)]
struct Cell {
    status: StatusCode,
    code: Option<String>,
    warning: bool,
    retry_after: bool,
    /// For a blob GET answered 200: its body did not arrive whole and exact.
    aborted: bool,
    seen: Vec<usize>,
}

impl Cell {
    fn text(&self) -> String {
        let mut text = self.status.as_u16().to_string();
        if let Some(code) = &self.code {
            text.push(' ');
            text.push_str(code);
        }
        if self.aborted {
            text.push_str(" aborted");
        }
        if self.warning {
            text.push_str(" W");
        }
        if self.retry_after {
            text.push_str(" R");
        }
        let seen: Vec<String> = self.seen.iter().map(|n| n.to_string()).collect();
        format!("{text} · {}", seen.join("+"))
    }
}

async fn run(fault: Fault, endpoints: usize, ask: Ask) -> Cell {
    let failing = FakeRegistry::start().await;
    let image = seed(&failing);
    let healthy = FakeRegistry::start().await;
    seed(&healthy);
    let token_service = FakeRegistry::start().await;
    if fault == Fault::TokenServiceDown {
        let realm = token_service.url();
        failing.knobs(|k| {
            k.require_token = true;
            k.token_realm = Some(realm);
        });
    }
    let upstreams = [failing.url(), healthy.url()];
    let upstreams: Vec<&str> = upstreams[..endpoints].iter().map(|u| u.as_str()).collect();
    let mirror = TestMirror::start_many(&upstreams, |c| {
        c.cache.tag_ttl = Duration::from_millis(50);
        c.cache.prefetch_downloads = 0;
        for upstream in &mut c.registry[0].upstream {
            upstream.connect_timeout = Duration::from_secs(1);
            upstream.response_timeout = Duration::from_secs(1);
            upstream.stall_timeout = Duration::from_secs(1);
        }
    })
    .await;
    let tag_url = mirror.url("/v2/library/app/manifests/1.0");
    if ask == Ask::TagCached {
        assert_eq!(get_manifest(&tag_url).await.status, StatusCode::OK);
        mirror.settle().await;
        mirror.until_tag_due("library/app", "1.0").await;
    }
    inject(fault, &failing, &token_service, &mirror).await;
    failing.reset_counts();
    healthy.reset_counts();
    let got = match ask {
        Ask::TagCached | Ask::TagUncached => get_manifest(&tag_url).await,
        Ask::ManifestByDigest => {
            get_manifest(&mirror.url(&format!("/v2/library/app/manifests/{}", image.manifest)))
                .await
        }
        Ask::BlobGet => get(&mirror.url(&format!("/v2/library/app/blobs/{}", image.layer))).await,
        Ask::BlobHead => head(&mirror.url(&format!("/v2/library/app/blobs/{}", image.layer))).await,
        Ask::TagsList => get(&mirror.url("/v2/library/app/tags/list")).await,
    };
    // Downloads go on after the client's answer (resumes); count once they are over.
    mirror.settle().await;
    if fault == Fault::CorruptBytes && endpoints == 1 {
        assert!(!mirror.has_blob(&image.layer), "a corrupt blob was stored");
        let manifest = blob_path(&mirror.cache_dir(), &image.manifest);
        let stored_manifest = ask != Ask::TagCached && manifest.exists();
        assert!(!stored_manifest, "a corrupt manifest was stored ({ask:?})");
    }
    let aborted = ask == Ask::BlobGet
        && got.status == StatusCode::OK
        && got
            .body
            .as_ref()
            .map_or(true, |b| b[..] != image.layer_bytes[..]);
    let code = (got.status.as_u16() >= 400).then(|| {
        got.body.as_ref().ok().and_then(|b| {
            let json: serde_json::Value = serde_json::from_slice(b).ok()?;
            json["errors"][0]["code"].as_str().map(str::to_string)
        })
    });
    Cell {
        status: got.status,
        code: code.flatten(),
        warning: got.header("warning").is_some(),
        retry_after: got.header("retry-after").is_some(),
        aborted,
        seen: [&failing, &healthy][..endpoints]
            .iter()
            .map(|r| r.seen())
            .collect(),
    }
}

/// Makes the first endpoint fail as `fault` says.
async fn inject(fault: Fault, failing: &FakeRegistry, tokens: &FakeRegistry, mirror: &TestMirror) {
    let status = |code: u16, retry: Option<u64>| {
        failing.knobs(|k| {
            k.fail_status = Some(code);
            k.fail_retry_after = retry;
        })
    };
    match fault {
        Fault::Reset => failing.connections(Connections::Reset).await,
        Fault::ConnectRefused => failing.connections(Connections::Refuse).await,
        Fault::Timeout => failing.connections(Connections::Hold).await,
        Fault::Status500 => status(500, None),
        Fault::Status502 => status(502, None),
        Fault::RateLimitedRetryAfter => status(429, Some(7)),
        Fault::RateLimited => status(429, None),
        Fault::Status401 => status(401, None),
        Fault::Status403 => status(403, None),
        Fault::Status404 => status(404, None),
        Fault::HeadRefused => failing.knobs(|k| k.refuse_manifest_head = true),
        Fault::CorruptBytes => failing.knobs(|k| {
            k.corrupt_blobs = true;
            k.corrupt_manifests = true;
        }),
        Fault::StallMidBody => failing.knobs(|k| {
            k.stall_after = Some(100 * 1024);
            k.stall_listings = true;
        }),
        Fault::TokenServiceDown => {
            // Tokens issued so far are refused (they expired), and no new one can be had.
            tokens.connections(Connections::Refuse).await;
            failing.knobs(|k| k.accepted_token = Some("tok-renewed".into()));
        }
        Fault::DownOneSecondThenBack => {
            // Down: three requests for something else find it so (the later ones probe it, so
            // it backs off for 4 s from then), and it is back at once, well within that
            // back-off: the mirror still believes it down.
            failing.connections(Connections::Refuse).await;
            let elsewhere = mirror.url("/v2/library/other/manifests/x");
            for _ in 0..3 {
                get_manifest(&elsewhere).await;
            }
            failing.connections(Connections::Serve).await;
        }
    }
    // Connections the mirror keeps open are closed by a change of mode: let it notice. Timed by
    // necessity: its connection pool learns of a closed idle connection only when it polls it.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn render(rows: &[(Fault, usize, Vec<Cell>)]) -> String {
    let mut table = String::from("| upstream fault | endpoints |");
    for ask in Ask::ALL {
        table.push_str(&format!(" {} |", ask.name()));
    }
    table.push_str("\n|---|---|");
    table.push_str(&"---|".repeat(Ask::ALL.len()));
    table.push('\n');
    for (fault, endpoints, cells) in rows {
        let shape = if *endpoints == 1 {
            "failing only"
        } else {
            "failing, healthy"
        };
        table.push_str(&format!("| {} | {shape} |", fault.name()));
        for cell in cells {
            table.push_str(&format!(" {} |", cell.text()));
        }
        table.push('\n');
    }
    table
}

/// The table between the markers in the README.
fn readme_table(readme: &str) -> &str {
    let start = readme
        .find(START)
        .expect("README has the fault-matrix start marker")
        + START.len();
    let end = readme
        .find(END)
        .expect("README has the fault-matrix end marker");
    readme[start..end].trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_fault_gets_the_answer_the_readme_promises() {
    let mut jobs = Vec::new();
    for fault in Fault::ALL {
        for endpoints in [1, 2] {
            for ask in Ask::ALL {
                jobs.push((fault, endpoints, ask));
            }
        }
    }
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let handles: Vec<_> = jobs
        .iter()
        .map(|&(fault, endpoints, ask)| {
            let gate = std::sync::Arc::clone(&gate);
            tokio::spawn(async move {
                let _turn = gate.acquire_owned().await.unwrap();
                let cell =
                    tokio::time::timeout(Duration::from_secs(60), run(fault, endpoints, ask))
                        .await
                        .unwrap_or_else(|_| panic!("{fault:?} x{endpoints} {ask:?} hung"));
                (fault, endpoints, ask, cell)
            })
        })
        .collect();
    let mut rows: Vec<(Fault, usize, Vec<Cell>)> = Vec::new();
    for handle in handles {
        let (fault, endpoints, _ask, cell) = handle.await.unwrap();
        match rows.last_mut() {
            Some((f, e, cells)) if *f == fault && *e == endpoints => cells.push(cell),
            _ => rows.push((fault, endpoints, vec![cell])),
        }
    }
    let table = render(&rows);
    println!("{table}");
    let readme = std::fs::read_to_string(README).unwrap();
    if std::env::var_os("UPDATE_FAULT_MATRIX").is_some() {
        let start = readme.find(START).unwrap() + START.len();
        let end = readme.find(END).unwrap();
        let updated = format!("{}\n{}\n{}", &readme[..start], table.trim(), &readme[end..]);
        std::fs::write(README, updated).unwrap();
        return;
    }
    let promised = readme_table(&readme);
    let differ: Vec<String> = promised
        .lines()
        .zip(table.trim().lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("README: {a}\nnow:    {b}"))
        .collect();
    assert!(
        differ.is_empty() && promised.lines().count() == table.trim().lines().count(),
        "the fault matrix differs from the README's (UPDATE_FAULT_MATRIX=1 rewrites it):\n{}\n\nREADME:\n{promised}\n\nnow:\n{table}",
        differ.join("\n")
    );
    // What users depend on, whatever the table says: with a healthy endpoint there, every blob
    // arrived whole and exact (unless the failing one corrupted it, which `run` checks was not
    // stored).
    for (fault, endpoints, cells) in &rows {
        let blob_get = &cells[3];
        if *endpoints == 2 && *fault != Fault::CorruptBytes {
            assert_eq!(
                blob_get.status,
                StatusCode::OK,
                "{fault:?}: a healthy endpoint was there"
            );
            assert!(!blob_get.aborted, "{fault:?}");
        }
    }
}
