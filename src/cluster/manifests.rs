//! Manifests by digest from the peer that owns them: each is fetched from upstream once for
//! the fleet (Docker Hub counts every manifest GET as a pull). What a peer sends is checked as
//! upstream's answer is: at most 4 MiB, hashing to the digest asked for, and a manifest.

use super::{peer_path, Asked, Cluster, Peer};
use crate::cache::Manifest;
use crate::digest::Digest;
use crate::oci::{self, RepoName};
use http::{header, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::sync::Arc;

impl Cluster {
    /// The manifest `digest` of `repo` from the live peer that owns it, unless this replica
    /// does (then `None`: it asks upstream itself), checked.
    pub async fn read_manifest(
        &self,
        registry: &str,
        repo: &RepoName,
        digest: &Digest,
    ) -> Option<Manifest> {
        let path = peer_path(registry, &format!("{repo}/manifests/{digest}"));
        self.ask_owner(&digest.to_string(), |peer| {
            self.ask_manifest(peer, &path, digest)
        })
        .await
    }

    async fn ask_manifest(&self, peer: Arc<Peer>, path: &str, digest: &Digest) -> Asked<Manifest> {
        match self.get(&peer, path).await {
            Ok(response) => self.manifest_body(&peer, response, digest).await,
            Err(asked) => asked.nothing(),
        }
    }

    /// The manifest `digest` that `peer` answered with, checked.
    pub(super) async fn manifest_body(
        &self,
        peer: &Peer,
        response: Response<Incoming>,
        digest: &Digest,
    ) -> Asked<Manifest> {
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .filter(|t| oci::is_media_type(t) && !oci::is_generic_type(t));
        let body = Limited::new(response.into_body(), oci::MAX_MANIFEST_BYTES);
        let bytes = match tokio::time::timeout(self.stall_timeout(), body.collect()).await {
            Ok(Ok(collected)) => Some(collected.to_bytes()),
            // Over 4 MiB: not the manifest asked for.
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => None,
            Ok(Err(e)) => return Asked::Unreachable(format!("its manifest {digest}: {e}")),
            Err(_) => return Asked::Unreachable(format!("its manifest {digest} stalled")),
        };
        let verified = bytes.filter(|b| &Digest::of(b) == digest && oci::is_manifest_document(b));
        let Some(bytes) = verified else {
            self.sent(peer, "corrupt");
            self.mark_down(peer, "it sent a manifest that does not verify");
            return Asked::Declined;
        };
        self.sent(peer, "ok");
        let media_type = content_type
            .or_else(|| oci::sniff_manifest_type(&bytes))
            .unwrap_or_else(|| oci::OCI_MANIFEST.to_string());
        Asked::Got(Manifest {
            digest: digest.clone(),
            media_type,
            bytes,
        })
    }
}
