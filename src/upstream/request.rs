//! What the mirror asks an upstream ([`UpstreamRequest`]) and what comes back from the endpoint
//! that answered ([`Answer`]). Vocabulary: no I/O beyond reading an answer's body.

use super::failure::UpstreamError;
use crate::digest::Digest;
use crate::oci::{Reference, RepoName};
use bytes::Bytes;
use http::{header, HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::time::Duration;

/// What a request asks for (it decides, among other things, the error code of a 404).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Manifest,
    Blob,
    TagsList,
    Referrers,
    /// Anything else (a token, a probe).
    Other,
}

/// What to ask an upstream for.
#[derive(Clone, Debug)]
pub struct UpstreamRequest {
    pub method: Method,
    pub resource: Resource,
    pub repo: RepoName,
    /// The path after `/v2/<repo>/`, with its query (`manifests/latest`, `tags/list?n=10`).
    pub rest: String,
    pub accept: Vec<String>,
    /// Asks what a tag means (or what a repository holds): only endpoints trusted to resolve
    /// tags are asked, others only with `allow_untrusted_tags`.
    pub needs_trust: bool,
    /// Only endpoints trusted with tags may answer, `allow_untrusted_tags` or not (what a
    /// repository holds, for access rules).
    pub only_trusted: bool,
    /// A manifest GET, which counts against Docker Hub's pull limit: not sent to an endpoint
    /// that is rate limiting us.
    pub counts_as_pull: bool,
    /// The caller has an answer of its own should upstream be unreachable (a tag's last known
    /// mapping): endpoints backing off are not tried before their pause ends.
    pub has_fallback: bool,
    /// The content asked for, when it is addressed by digest: endpoints that served bad
    /// content for it lately are asked last.
    pub digest: Option<Digest>,
    /// Resume a blob: `Range: bytes=N-`.
    pub range_from: Option<u64>,
}

impl UpstreamRequest {
    pub fn manifest(
        method: Method,
        repo: &RepoName,
        reference: &Reference,
        accept: &[String],
    ) -> Self {
        let digest = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => None,
        };
        UpstreamRequest {
            counts_as_pull: method == Method::GET,
            method,
            resource: Resource::Manifest,
            repo: repo.clone(),
            rest: format!("manifests/{reference}"),
            accept: accept.to_vec(),
            needs_trust: digest.is_none(),
            has_fallback: false,
            only_trusted: false,
            digest,
            range_from: None,
        }
    }

    pub fn blob(method: Method, repo: &RepoName, digest: &Digest) -> Self {
        UpstreamRequest {
            method,
            resource: Resource::Blob,
            repo: repo.clone(),
            rest: format!("blobs/{digest}"),
            accept: Vec::new(),
            needs_trust: false,
            counts_as_pull: false,
            has_fallback: false,
            only_trusted: false,
            digest: Some(digest.clone()),
            range_from: None,
        }
    }

    pub fn tags_list(repo: &RepoName, query: Option<&str>) -> Self {
        let rest = match query {
            Some(q) => format!("tags/list?{q}"),
            None => "tags/list".to_string(),
        };
        UpstreamRequest {
            method: Method::GET,
            resource: Resource::TagsList,
            repo: repo.clone(),
            rest,
            accept: Vec::new(),
            needs_trust: true,
            counts_as_pull: false,
            has_fallback: false,
            only_trusted: false,
            digest: None,
            range_from: None,
        }
    }

    pub fn referrers(repo: &RepoName, digest: &Digest, accept: &[String]) -> Self {
        UpstreamRequest {
            method: Method::GET,
            resource: Resource::Referrers,
            repo: repo.clone(),
            rest: format!("referrers/{digest}"),
            accept: accept.to_vec(),
            needs_trust: false,
            counts_as_pull: false,
            has_fallback: false,
            only_trusted: false,
            digest: None,
            range_from: None,
        }
    }

    /// The same request for the bytes from `offset` on.
    pub fn resume_from(mut self, offset: u64) -> Self {
        self.range_from = (offset > 0).then_some(offset);
        self
    }

    /// The same request from a caller that can answer without upstream (see `has_fallback`).
    pub fn with_fallback(mut self) -> Self {
        self.has_fallback = true;
        self
    }

    /// The same request asked only of endpoints trusted with tags, whatever
    /// `allow_untrusted_tags` says (what a repository holds).
    pub fn trusted_only(mut self) -> Self {
        self.needs_trust = true;
        self.only_trusted = true;
        self
    }

    /// A manifest HEAD, which an endpoint that refuses HEAD is sent as a GET.
    pub fn is_manifest_head(&self) -> bool {
        self.resource == Resource::Manifest && self.method == Method::HEAD
    }
}

/// A successful (2xx) answer, with what it came from.
pub struct Answer {
    pub response: Response<Incoming>,
    /// Which endpoint answered (its index in the registry's list).
    pub endpoint_index: usize,
    /// The endpoint's base URL, for logs.
    pub endpoint: String,
    /// How long the body may go without a byte.
    pub stall_timeout: Duration,
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    pub fn headers(&self) -> &HeaderMap {
        self.response.headers()
    }

    /// The declared `Content-Length`, if any.
    pub fn content_length(&self) -> Option<u64> {
        content_length(self.headers())
    }

    /// Reads the whole body, refusing more than `limit` bytes (bad content) and a body that
    /// stalls or breaks (an outage).
    pub async fn bytes(self, limit: usize) -> Result<Bytes, UpstreamError> {
        let endpoint = self.endpoint;
        let stall = self.stall_timeout;
        let body = Limited::new(self.response.into_body(), limit);
        match tokio::time::timeout(stall, body.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(
                UpstreamError::bad_content(format!("{endpoint}: answer larger than {limit} bytes")),
            ),
            Ok(Err(e)) => Err(UpstreamError::outage(format!("{endpoint}: {e}"))),
            Err(_) => Err(UpstreamError::outage(format!("{endpoint}: body stalled"))),
        }
    }
}

/// A `Content-Length` header's value.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
