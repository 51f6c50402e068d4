//! What the end-to-end tests push to the origin: a two-platform image in both formats (OCI
//! index and Docker manifest list), with layers unique to the run, pushed through the
//! registry's own upload API.

use super::Origin;
use crate::common::random_bytes;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use regmirror::digest::Digest;
use std::io::Write;

/// What the seeded origin holds, with the digests every client must see. Each platform's
/// image has two layers: a base layer every repository seeded in the run shares, and a layer
/// of the repository's own (so images of different repositories differ, as on a real registry,
/// and share a base, as real images do).
pub struct Seeded {
    /// `<repo>:oci`: an OCI index over two OCI manifests.
    pub oci_index: Digest,
    /// `<repo>:docker`: a Docker manifest list over two schema2 manifests.
    pub docker_list: Digest,
    /// Per format, the linux/amd64 manifest digest and its config digest.
    pub oci_amd64: (Digest, Digest),
    pub docker_amd64: (Digest, Digest),
    /// The OCI index's two manifests.
    pub oci_manifests: Vec<Digest>,
    /// The OCI images' blobs (configs and layers).
    pub oci_blobs: Vec<Digest>,
    /// The base layers, shared with every repository seeded in this run.
    pub shared_layers: Vec<Digest>,
    /// Every blob (configs and layers) pushed.
    pub blobs: Vec<Digest>,
}

pub const REPO: &str = "library/e2e";

/// What makes this run's layers (and so every digest seeded) its own. Real clients remember
/// where they saw a digest across runs (skopeo's blob-info cache under /var/lib/containers),
/// and ports are reused: with the same digests a client could mount a layer from an earlier
/// run's location instead of pulling it through the mirror.
fn run_nonce() -> u128 {
    static NONCE: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        now ^ ((std::process::id() as u128) << 64)
    })
}

/// A gzip'd tar layer named `platform` holding a small text file (unique to this run) and 1 MiB
/// of random bytes (seeded by the name).
fn layer(platform: &str) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    };
    add(
        "hello.txt",
        format!("hello from {platform}, run {:x}\n", run_nonce()).as_bytes(),
    );
    add(
        "random.bin",
        &random_bytes(1024 * 1024, name_seed(platform)),
    );
    let raw = tar.into_inner().unwrap();
    let diff_id = Digest::of(&raw);
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    (gz.finish().unwrap(), diff_id)
}

/// A seed for a layer's random bytes, from its name.
fn name_seed(name: &str) -> u64 {
    name.bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
}

fn image_config(arch: &str, diff_ids: &[Digest]) -> Vec<u8> {
    let diff_ids: Vec<String> = diff_ids.iter().map(Digest::to_string).collect();
    serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/hello"], "Env": ["PATH=/"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "regmirror e2e test"}]
    })
    .to_string()
    .into_bytes()
}

struct Pusher {
    base: String,
    repo: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl Pusher {
    async fn send(
        &self,
        method: Method,
        url: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> http::Response<hyper::body::Incoming> {
        let request = Request::builder()
            .method(method)
            .uri(url)
            .header(header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        self.http.request(request).await.unwrap()
    }

    async fn blob(&self, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        let start = self
            .send(
                Method::POST,
                &format!("{}/v2/{}/blobs/uploads/", self.base, self.repo),
                "application/octet-stream",
                vec![],
            )
            .await;
        assert_eq!(start.status(), StatusCode::ACCEPTED, "upload start");
        let location = start.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_string();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let done = self
            .send(
                Method::PUT,
                &format!("{location}{sep}digest={digest}"),
                "application/octet-stream",
                bytes.to_vec(),
            )
            .await;
        assert_eq!(done.status(), StatusCode::CREATED, "blob upload");
        digest
    }

    async fn manifest(&self, reference: &str, media_type: &str, bytes: Vec<u8>) -> Digest {
        let digest = Digest::of(&bytes);
        let response = self
            .send(
                Method::PUT,
                &format!("{}/v2/{}/manifests/{reference}", self.base, self.repo),
                media_type,
                bytes,
            )
            .await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            status,
            StatusCode::CREATED,
            "manifest push: {}",
            String::from_utf8_lossy(&body)
        );
        digest
    }
}

/// Pushes the two-platform image in both formats as `library/e2e`.
pub async fn seed(origin: &Origin) -> Seeded {
    seed_repo(origin, REPO).await
}

/// Pushes `bytes` (a manifest of `media_type`) to `repo` as `reference` (a tag: moves it).
pub async fn push_manifest(
    origin: &Origin,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: Vec<u8>,
) -> Digest {
    let pusher = Pusher {
        base: origin.url(),
        repo: repo.to_string(),
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    };
    pusher.manifest(reference, media_type, bytes).await
}

/// Pushes one blob of `size` random bytes to `repo`; returns its digest.
pub async fn push_blob(origin: &Origin, repo: &str, bytes: &[u8]) -> Digest {
    let pusher = Pusher {
        base: origin.url(),
        repo: repo.to_string(),
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    };
    pusher.blob(bytes).await
}

/// Pushes the two-platform image in both formats as `repo`.
pub async fn seed_repo(origin: &Origin, repo: &str) -> Seeded {
    let pusher = Pusher {
        base: origin.url(),
        repo: repo.to_string(),
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
    };
    let formats = [
        (
            "oci",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        (
            "docker",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    ];
    let mut blobs = Vec::new();
    let mut tops = Vec::new();
    let mut amd64 = Vec::new();
    let (mut oci_manifests, mut oci_blobs, mut shared_layers) =
        (Vec::new(), Vec::new(), Vec::new());
    for (tag, index_type, manifest_type, config_type, layer_type) in formats {
        let mut entries = Vec::new();
        for arch in ["amd64", "arm64"] {
            let (base_bytes, base_diff) = layer(&format!("base {tag}-{arch}"));
            let (own_bytes, own_diff) = layer(&format!("{repo} {tag}-{arch}"));
            let config = image_config(arch, &[base_diff, own_diff]);
            let base_digest = pusher.blob(&base_bytes).await;
            let own_digest = pusher.blob(&own_bytes).await;
            let config_digest = pusher.blob(&config).await;
            let pushed = [
                base_digest.clone(),
                own_digest.clone(),
                config_digest.clone(),
            ];
            if tag == "oci" {
                oci_blobs.extend(pushed.iter().cloned());
            }
            blobs.extend(pushed);
            shared_layers.push(base_digest.clone());
            let layer = |bytes: &[u8], digest: &Digest| serde_json::json!({"mediaType": layer_type, "size": bytes.len(), "digest": digest.to_string()});
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": {"mediaType": config_type, "size": config.len(), "digest": config_digest.to_string()},
                "layers": [layer(&base_bytes, &base_digest), layer(&own_bytes, &own_digest)],
            })
            .to_string()
            .into_bytes();
            let size = manifest.len();
            let digest = pusher
                .manifest(&Digest::of(&manifest).to_string(), manifest_type, manifest)
                .await;
            if arch == "amd64" {
                amd64.push((digest.clone(), config_digest));
            }
            if tag == "oci" {
                oci_manifests.push(digest.clone());
            }
            entries.push(serde_json::json!({
                "mediaType": manifest_type, "size": size, "digest": digest.to_string(),
                "platform": {"architecture": arch, "os": "linux"}
            }));
        }
        let index =
            serde_json::json!({"schemaVersion": 2, "mediaType": index_type, "manifests": entries})
                .to_string()
                .into_bytes();
        tops.push(pusher.manifest(tag, index_type, index).await);
    }
    Seeded {
        oci_index: tops[0].clone(),
        docker_list: tops[1].clone(),
        oci_amd64: amd64[0].clone(),
        docker_amd64: amd64[1].clone(),
        oci_manifests,
        oci_blobs,
        shared_layers,
        blobs,
    }
}
