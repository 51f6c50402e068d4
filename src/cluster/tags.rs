//! Tags through their owner: each tag has an owner among the peers like a digest, which alone
//! asks upstream (a HEAD per tag TTL) what the tag points to; the other replicas ask it, so the
//! fleet costs upstream one HEAD per tag per TTL, and every replica's answer runs out when the
//! owner's does.
//!
//! The owner's answer is its answer to a GET of the tag: the manifest, or `304 Not Modified`
//! when it is still the one the asking replica names in `If-None-Match`; `Age` says how long ago
//! upstream confirmed it, `Warning` that upstream could not.

use super::{peer_path, Asked, Cluster};
use crate::cache::Manifest;
use crate::digest::Digest;
use crate::oci::{RepoName, Tag, DOCKER_CONTENT_DIGEST};
use http::{header, HeaderMap, Request, StatusCode};

/// What the owner says a tag points to.
pub enum OwnerTag {
    /// Still the manifest this replica named (a 304).
    Unchanged(Digest),
    /// This manifest, checked against its digest.
    Points(Manifest),
}

/// The owner's answer for a tag, with its headers (`Age`, `Warning`).
pub struct TagFromOwner {
    pub answer: OwnerTag,
    pub headers: HeaderMap,
}

impl Cluster {
    /// What the owner of `repo:tag` says it points to (asked with `accept`, and `known`, the
    /// manifest this replica has for it, if any), unless this replica owns the tag (then
    /// `None`: it asks upstream itself), or the owner did not answer with the tag.
    pub async fn read_tag(
        &self,
        registry: &str,
        repo: &RepoName,
        tag: &Tag,
        accept: &str,
        known: Option<&Digest>,
    ) -> Option<TagFromOwner> {
        let path = peer_path(registry, &format!("{repo}/manifests/{tag}"));
        let key = format!("tag {registry}/{repo}:{tag}");
        let path = &path;
        self.ask_owner(&key, |peer| async move {
            let mut request = Request::get(path).header(header::ACCEPT, accept);
            if let Some(known) = known {
                request = request.header(header::IF_NONE_MATCH, format!("\"{known}\""));
            }
            let response = match self.send(peer, request).await {
                Ok(response) => response,
                Err(asked) => return asked.nothing(),
            };
            let headers = response.headers().clone();
            let Some(digest) = header_digest(&headers) else {
                self.sent(peer, "declined");
                return Asked::Declined;
            };
            let answer = if response.status() == StatusCode::NOT_MODIFIED {
                if Some(&digest) != known {
                    self.sent(peer, "declined");
                    return Asked::Declined;
                }
                self.sent(peer, "ok");
                OwnerTag::Unchanged(digest)
            } else {
                match self.manifest_body(peer, response, &digest).await {
                    Asked::Got(manifest) => OwnerTag::Points(manifest),
                    Asked::Declined => return Asked::Declined,
                    Asked::Unreachable(e) => return Asked::Unreachable(e),
                }
            };
            Asked::Got(TagFromOwner { answer, headers })
        })
        .await
    }
}

fn header_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get(DOCKER_CONTENT_DIGEST)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
