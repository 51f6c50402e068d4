//! Exact and bounded under hostile requests: the manifest endpoints serve only content stored
//! as a manifest, a reference that names no manifest is a 404, and only endpoints trusted with
//! tags say what a repository holds.

mod common;

use common::login::{alice_and_anonymous, basic};
use common::*;
use http::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_layer_is_never_served_as_a_manifest() {
    let origin = FakeRegistry::start().await;
    let layer = random_bytes(1024 * 1024, 190);
    let digest = origin.add_blob(layer.clone());
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    get(&mirror.url(&format!("/v2/library/app/blobs/{digest}")))
        .await
        .assert_content(&digest);
    mirror.settle().await;
    assert!(mirror.has_blob(&digest));

    // Asked for as a manifest, the layer is not one: upstream is asked for a manifest with
    // that digest, has none, and the client is told so. The layer's bytes never go out.
    let url = mirror.url(&format!("/v2/library/app/manifests/{digest}"));
    let got = get_manifest(&url).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.json()["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let head = request(Method::HEAD, &url, &[]).await;
    assert_eq!(head.status, StatusCode::NOT_FOUND);
    assert_ne!(
        head.header("content-length"),
        Some(layer.len().to_string().as_str()),
        "a HEAD described the layer as a manifest"
    );
    let asked = origin.hits("GET", &format!("/v2/library/app/manifests/{digest}"))
        + origin.hits("HEAD", &format!("/v2/library/app/manifests/{digest}"));
    assert!(asked >= 1, "upstream was not asked for a manifest");
    // A public mirror (content only) that answers the layer's digest as a manifest with the
    // layer's bytes: they match the digest, but are no manifest; nothing is stored as one.
    let careless = FakeRegistry::start().await;
    careless.add_manifest(
        "library/app",
        None,
        "application/octet-stream",
        layer.clone(),
    );
    let mirror = TestMirror::start_many(&[&origin.url(), &careless.url()], |c| {
        c.registry[0].upstream[1].resolve_tags = false;
    })
    .await;
    for _ in 0..2 {
        let got = get_manifest(&mirror.url(&format!("/v2/library/app/manifests/{digest}"))).await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.json()["errors"][0]["code"], "MANIFEST_INVALID");
        let message = got.json()["errors"][0]["message"].to_string();
        assert!(message.contains("is not one"), "{message}");
    }
    // The layer itself is still served, whole, as a blob.
    get(&mirror.url(&format!("/v2/library/app/blobs/{digest}")))
        .await
        .assert_content(&digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reference_that_names_no_manifest_is_a_404() {
    let origin = FakeRegistry::start().await;
    let mirror = TestMirror::start(&origin.url(), |_| {}).await;
    for reference in [".INVALID", "-x", "..%2F..%2Fx", &"t".repeat(129)] {
        let url = mirror.url(&format!("/v2/library/app/manifests/{reference}"));
        let got = get_manifest(&url).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{reference}");
        assert_eq!(got.json()["errors"][0]["code"], "MANIFEST_UNKNOWN");
        let head = request(Method::HEAD, &url, &[]).await;
        assert_eq!(head.status, StatusCode::NOT_FOUND, "{reference}");
    }
    // A malformed digest stays a clear 400.
    let got = get_manifest(&mirror.url("/v2/library/app/manifests/sha256:totallywrong")).await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.json()["errors"][0]["code"], "DIGEST_INVALID");
    assert_eq!(origin.authorizations().len(), 0, "upstream was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_only_endpoint_links_nothing_to_a_repository() {
    // The origin (trusted with tags) holds a private image, served only in its repository; a
    // public mirror (content only) serves its manifest by digest for any repository.
    let origin = FakeRegistry::start().await;
    let private_layer = random_bytes(150_000, 191);
    let private = origin.add_blob(private_layer.clone());
    let config = origin.add_blob(b"{}".to_vec());
    let manifest = schema2_manifest(&config, 2, &[(private.clone(), private_layer.len())]);
    let digest = origin.add_manifest("myorg/tool", Some("1"), DOCKER_MANIFEST, manifest.clone());
    origin.knobs(|k| k.blobs_only_in = Some("myorg/tool".into()));
    let public_mirror = FakeRegistry::start().await;
    public_mirror.add_manifest("library/alpine", None, DOCKER_MANIFEST, manifest);
    let files = tempfile::tempdir().unwrap();
    let auth = alice_and_anonymous(files.path());
    let mirror = TestMirror::start_many(&[&origin.url(), &public_mirror.url()], move |c| {
        c.auth = Some(auth);
        c.registry[0].upstream[1].resolve_tags = false;
    })
    .await;
    // Alice pulls her private layer: it is stored.
    let alice = basic("alice", "alice-password");
    let got = request(
        Method::GET,
        &mirror.url(&format!("/v2/myorg/tool/blobs/{private}")),
        &[("authorization", &alice)],
    )
    .await;
    assert!(got.bytes()[..] == private_layer[..]);
    mirror.settle().await;
    // An anonymous client asks for the manifest through a public repository: the public
    // mirror has it (by digest, for any repository), but that says nothing of what
    // library/alpine holds, and the origin says it does not hold it.
    let got = get_manifest(&mirror.url(&format!("/v2/library/alpine/manifests/{digest}"))).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(
        public_mirror.hits("GET", &format!("/v2/library/alpine/manifests/{digest}")),
        1
    );
    // Nor does the stored private layer become library/alpine's through it.
    let blob = mirror.url(&format!("/v2/library/alpine/blobs/{private}"));
    let got = get(&blob).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert!(got.bytes()[..] != private_layer[..]);
    assert_eq!(
        origin.hits("HEAD", &format!("/v2/library/alpine/blobs/{private}")),
        1,
        "the origin was asked whether library/alpine holds it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_on_a_miss_never_passes_on_a_content_only_endpoints_headers() {
    // The origin is down; a public mirror (content only) answers HEADs carelessly: one byte
    // too long, and manifests as application/json.
    let origin = FakeRegistry::start().await;
    let public_mirror = FakeRegistry::start().await;
    let layer = random_bytes(10_000, 192);
    let blob = public_mirror.add_blob(layer.clone());
    let config = public_mirror.add_blob(b"{}".to_vec());
    let manifest = schema2_manifest(&config, 2, &[(blob.clone(), layer.len())]);
    let digest = public_mirror.add_manifest("library/app", None, DOCKER_MANIFEST, manifest.clone());
    public_mirror.knobs(|k| k.lying_heads = true);
    origin.knobs(|k| k.fail_status = Some(503));
    let mirror = TestMirror::start_many(&[&origin.url(), &public_mirror.url()], |c| {
        c.registry[0].upstream[1].resolve_tags = false;
    })
    .await;

    // A manifest: fetched, verified and stored; the HEAD tells its true size and type.
    let url = mirror.url(&format!("/v2/library/app/manifests/{digest}"));
    let head = request(Method::HEAD, &url, &[("accept", DOCKER_MANIFEST)]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some(manifest.len().to_string().as_str())
    );
    assert_eq!(head.header("content-type"), Some(DOCKER_MANIFEST));
    assert_eq!(
        public_mirror.hits("HEAD", &format!("/v2/library/app/manifests/{digest}")),
        0,
        "a content-only endpoint's HEAD was asked"
    );
    get_manifest(&url).await.assert_content(&digest);

    // A blob: only the origin may say its size. Down, the client is told to come back (as
    // going direct it would be); back, it says.
    let blob_url = mirror.url(&format!("/v2/library/app/blobs/{blob}"));
    let head = request(Method::HEAD, &blob_url, &[]).await;
    assert_eq!(head.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(head.header("retry-after").is_some());
    origin.add_blob(layer.clone());
    origin.knobs(|k| k.fail_status = None);
    mirror.until_endpoint_ready(0).await;
    let head = request(Method::HEAD, &blob_url, &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some(layer.len().to_string().as_str())
    );
    assert_eq!(
        public_mirror.hits("HEAD", &format!("/v2/library/app/blobs/{blob}")),
        0,
        "a content-only endpoint's HEAD was asked"
    );
}
