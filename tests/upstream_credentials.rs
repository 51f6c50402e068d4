//! Credential hygiene towards upstreams: TLS trust (system roots, a CA file, or nothing when
//! told), passwords never sent in the clear or to another host, challenges from hosts a
//! redirect leads to never followed.

mod common;

use common::login::with_upstream_credentials;
use common::pki::issue;
use common::small_image::seed;
use common::*;
use http::StatusCode;
use regmirror::config::TlsConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_trusts_system_roots_plus_a_ca_file_or_nothing_when_told() {
    let origin = FakeRegistry::start().await;
    let (blob, digest) = seed(&origin);
    let pki = tempfile::tempdir().unwrap();
    let issued = issue(pki.path(), "upstream");
    let files = TlsConfig {
        cert: issued.cert.clone(),
        key: issued.key.clone(),
    };
    // An HTTPS upstream: a regmirror with TLS in front of the fake origin.
    let https_upstream =
        TestMirror::start(&origin.url(), move |c| c.server.tls = Some(files)).await;
    let upstream_url = format!("https://localhost:{}", https_upstream.addr.port());
    let blob_path = format!("/v2/library/alpine/blobs/{digest}");

    // System roots only: the private CA is not trusted, the pull fails cleanly.
    let url = upstream_url.clone();
    let untrusting = TestMirror::start(&url, |_| {}).await;
    let got = get(&untrusting.url(&blob_path)).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!untrusting.has_blob(&digest));

    // With the CA as the endpoint's ca_file: verified and served.
    let (url, ca) = (upstream_url.clone(), issued.ca.clone());
    let trusting = TestMirror::start(&url, move |c| {
        c.registry[0].upstream[0].ca_file = Some(ca);
    })
    .await;
    let got = get(&trusting.url(&blob_path)).await;
    assert_eq!(got.bytes().as_ref(), blob.as_slice());

    // tls_verify = false: accepted without a CA (the operator's explicit choice).
    let url = upstream_url.clone();
    let blind = TestMirror::start(&url, |c| {
        c.registry[0].upstream[0].tls_verify = false;
    })
    .await;
    let got = get(&blind.url(&blob_path)).await;
    assert_eq!(got.bytes().as_ref(), blob.as_slice());

    // A CA file that holds no certificate is refused when the configuration is built.
    std::fs::write(pki.path().join("empty.pem"), "nothing here").unwrap();
    let mut config = regmirror::config::Config::default();
    config.cache.dir = pki.path().join("cache");
    config.registry[0].upstream[0].ca_file = Some(pki.path().join("empty.pem"));
    let refused = regmirror::app::App::new(config).err().expect("refused");
    assert!(refused.contains("empty.pem"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_passwords_never_travel_in_the_clear_to_another_host() {
    let origin = FakeRegistry::start().await;
    let (_, digest) = seed(&origin);
    // The origin (at 127.0.0.1) names a plain-http token service on another host: `localhost`
    // is another name, as far as where a password may go is concerned.
    let elsewhere = FakeRegistry::start().await;
    let realm = format!("http://localhost:{}", elsewhere.addr.port());
    origin.knobs(|k| {
        k.require_token = true;
        k.token_realm = Some(realm);
    });
    let mirror = TestMirror::start(&origin.url(), with_upstream_credentials).await;
    let got = get(&mirror.url(&format!("/v2/library/alpine/blobs/{digest}"))).await;
    assert_eq!(got.status, StatusCode::OK, "an anonymous token still works");
    let asked = elsewhere.authorizations();
    assert!(
        asked.iter().any(|(path, _)| path.starts_with("/token")),
        "{asked:?}"
    );
    assert!(
        asked.iter().all(|(_, a)| a.is_none()),
        "password sent in the clear: {asked:?}"
    );
    // The origin itself (where the password belongs) never got it as Basic either: it asked
    // for a token, and got the token.
    assert!(origin
        .authorizations()
        .iter()
        .all(|(_, a)| a.as_deref().is_none_or(|a| a.starts_with("Bearer tok-"))));

    // The same host on another port (a LAN registry with its token service beside it, both
    // plain http, as the operator chose) gets the credentials.
    let beside = FakeRegistry::start().await;
    let realm = beside.url();
    origin.knobs(|k| k.token_realm = Some(realm));
    let mirror = TestMirror::start(&origin.url(), with_upstream_credentials).await;
    let got = get(&mirror.url(&format!("/v2/library/alpine/blobs/{digest}"))).await;
    assert_eq!(got.status, StatusCode::OK);
    let basic = "Basic bWlycm9yOnVwc3RyZWFtLXNlY3JldA=="; // mirror:upstream-secret
    let asked = beside.authorizations();
    assert!(
        asked
            .iter()
            .any(|(path, a)| path == "/token" && a.as_deref() == Some(basic)),
        "{asked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_from_a_host_upstream_redirected_to_is_not_followed() {
    let origin = FakeRegistry::start().await;
    let cdn = FakeRegistry::start().await;
    let realm = FakeRegistry::start().await;
    let blob = random_bytes(10_000, 3);
    let digest = origin.add_blob(blob.clone());
    cdn.add_blob(blob);
    // The host the origin redirects to answers 401, naming a token service of its choosing.
    cdn.knobs(|k| {
        k.require_token = true;
        k.token_realm = Some(realm.url());
    });
    origin.knobs(|k| {
        k.blob_location = Some(format!("{}/v2/library/alpine/blobs/{digest}", cdn.url()));
    });
    let mirror = TestMirror::start(&origin.url(), with_upstream_credentials).await;
    let got = get(&mirror.url(&format!("/v2/library/alpine/blobs/{digest}"))).await;
    assert_ne!(got.status, StatusCode::OK);
    assert_eq!(
        cdn.hits("GET", &format!("/v2/library/alpine/blobs/{digest}")),
        1
    );
    assert_eq!(
        realm.hits("GET", "/token"),
        0,
        "a token was asked of the service a redirect target named"
    );
}
