//! Tags through their owner: each tag has an owner among the peers like a digest, which alone
//! asks upstream (a HEAD per tag TTL) what the tag points to; the other replicas ask it, so the
//! fleet costs upstream one HEAD per tag per TTL, and every replica's answer runs out when the
//! owner's does.
//!
//! The owner's answer is its answer to a GET of the tag: the manifest, or `304 Not Modified`
//! when it is still the one the asking replica names in `If-None-Match`. What cannot be checked
//! by its bytes — which digest, how long ago upstream confirmed it, whether upstream could be
//! asked at all — the owner signs ([`ANSWER_HEADER`]); an answer not so signed is not the
//! owner's. A peer that refuses tag requests (one of an older version) is only declined.

use super::signature::{SignedAnswer, ANSWER_HEADER};
use super::{peer_path, Asked, Cluster};
use crate::cache::Manifest;
use crate::digest::Digest;
use crate::oci::{self, RepoName, Tag};
use http::{header, Method, Request, StatusCode};

/// What the owner says a tag points to.
pub enum OwnerTag {
    /// Still the manifest this replica named (a 304).
    Unchanged(Digest),
    /// This manifest, checked against its digest.
    Points(Manifest),
}

/// The owner's answer for a tag, and what it signed besides the digest.
pub struct TagFromOwner {
    pub answer: OwnerTag,
    pub signed: SignedAnswer,
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
            let signature = self.signer.sign(&Method::GET, path);
            let response = match self.send(&peer, request, &signature, false).await {
                Ok(response) => response,
                Err(asked) => return asked.nothing(),
            };
            let headers = response.headers();
            let status = response.status();
            let signed = oci::content_digest(headers).and_then(|digest| {
                let answer = headers.get(ANSWER_HEADER)?;
                let digest_text = digest.to_string();
                let checked =
                    self.signer
                        .verify_answer(&signature, status.as_u16(), &digest_text, answer);
                Some((digest, checked.ok()?))
            });
            let Some((digest, signed)) = signed else {
                self.sent(&peer, "corrupt");
                self.mark_down(
                    &peer,
                    "its answer for a tag is not signed with the cluster secret",
                );
                return Asked::Declined;
            };
            let answer = if status == StatusCode::NOT_MODIFIED {
                if Some(&digest) != known {
                    self.sent(&peer, "declined");
                    return Asked::Declined;
                }
                self.sent(&peer, "ok");
                OwnerTag::Unchanged(digest)
            } else {
                match self.manifest_body(&peer, response, &digest).await {
                    Asked::Got(manifest) => OwnerTag::Points(manifest),
                    Asked::Declined => return Asked::Declined,
                    Asked::Unreachable(e) => return Asked::Unreachable(e),
                }
            };
            Asked::Got(TagFromOwner { answer, signed })
        })
        .await
    }
}
