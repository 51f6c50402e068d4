//! The distribution-spec vocabulary: repository names, tags, references, manifest media types
//! and header names, each validated against the spec's grammar before anything else sees it.
//!
//! Pure: no I/O.

use crate::digest::Digest;
use std::fmt;

mod document;
pub use document::{
    config_platform, descriptors, image_blobs, is_manifest_document, outline, references,
    served_references, sniff_manifest_type, Outline,
};

/// `Docker-Content-Digest`, set on every manifest and blob answer.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// The digest an answer's `Docker-Content-Digest` header names, if it is one.
pub fn content_digest(headers: &http::HeaderMap) -> Option<Digest> {
    headers
        .get(DOCKER_CONTENT_DIGEST)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
/// `Docker-Distribution-API-Version: registry/2.0`, set on every answer.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The manifest media types every modern client accepts. A tag answer obtained with all of them
/// in `Accept` is the registry's canonical answer, the same for every such client.
pub const CANONICAL_MANIFEST_TYPES: [&str; 4] =
    [OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

/// Largest manifest accepted from upstream, as distribution and containerd limit them.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// A repository name such as `library/alpine` (spec: path components of
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` joined by `/`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    /// Longest name accepted; clients cap host plus name at 255 characters.
    pub const MAX_LEN: usize = 255;

    pub fn parse(s: &str) -> Option<RepoName> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return None;
        }
        s.split('/')
            .all(is_path_component)
            .then(|| RepoName(s.to_string()))
    }

    /// Docker Hub stores single-name official images under `library/`; `None` when the
    /// prefixed name would be longer than a name may be.
    pub fn with_library_prefix(self) -> Option<RepoName> {
        if self.0.contains('/') {
            Some(self)
        } else {
            RepoName::parse(&format!("library/{}", self.0))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

fn is_path_component(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__", or one or more "-".
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &s[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A tag (spec: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Option<Tag> {
        let b = s.as_bytes();
        let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
        let valid = !b.is_empty()
            && b.len() <= 128
            && word(b[0])
            && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-');
        valid.then(|| Tag(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Whether the first component of an image name names a registry host (`ghcr.io`,
/// `localhost:5000`) rather than a Docker Hub namespace.
pub fn names_registry_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// `host[.domain][:port]` as a registry is named.
pub fn is_host_name(name: &str) -> bool {
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (name, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
        });
    host_ok && port.is_none_or(|p| p.parse::<u16>().is_ok())
}

/// An image reference: `[registry/]repository[:tag|@digest]` (tag `latest` when absent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repo: RepoName,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses a reference; one that names no registry is for `default_registry`, or invalid
    /// without one. Docker Hub single names get `library/`.
    pub fn parse(text: &str, default_registry: Option<&str>) -> Option<ImageRef> {
        let (registry, rest) = match text.split_once('/') {
            Some((first, rest)) if names_registry_host(first) => (first, rest),
            _ => (default_registry?, text),
        };
        let (name, reference) = match rest.split_once('@') {
            Some((name, digest)) => (name, Reference::Digest(digest.parse().ok()?)),
            None => match rest.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name, Reference::Tag(Tag::parse(tag)?)),
                _ => (rest, Reference::Tag(Tag::parse("latest")?)),
            },
        };
        let mut repo = RepoName::parse(name)?;
        if registry == "docker.io" {
            repo = repo.with_library_prefix()?;
        }
        Some(ImageRef {
            registry: registry.to_string(),
            repo,
            reference,
        })
    }
}

/// The media types a client said it accepts, parameters stripped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AcceptSet {
    types: Vec<String>,
    /// `*/*` or `application/*` was among them.
    wildcard: bool,
}

impl AcceptSet {
    /// Collects every `Accept` header value (clients send several, or one comma-separated).
    pub fn from_headers(headers: &http::HeaderMap) -> AcceptSet {
        let mut set = AcceptSet::default();
        for value in headers.get_all(http::header::ACCEPT) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let media = item
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                if media == "*/*" || media == "application/*" {
                    set.wildcard = true;
                } else if !media.is_empty() {
                    set.types.push(media);
                }
            }
        }
        set
    }

    pub fn accepts(&self, media_type: &str) -> bool {
        self.wildcard || self.types.iter().any(|t| t == media_type)
    }

    /// Whether the client accepts every modern manifest type, so that the registry's answer
    /// for a tag is the same one every such client gets.
    pub fn is_canonical(&self) -> bool {
        CANONICAL_MANIFEST_TYPES.iter().all(|t| self.accepts(t))
    }

    /// The explicit types, in the client's order (for passing upstream).
    pub fn types(&self) -> &[String] {
        &self.types
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty() && !self.wildcard
    }
}

/// Whether a media type says nothing of which manifest it is (only the JSON then does).
pub fn is_generic_type(media_type: &str) -> bool {
    media_type == "application/json" || media_type == "text/plain"
}

/// Whether a string is a plausible media type (`type/subtype+suffix`), safe to send as a header.
pub fn is_media_type(s: &str) -> bool {
    let Some((kind, sub)) = s.split_once('/') else {
        return false;
    };
    let token = |t: &str| {
        !t.is_empty()
            && t.len() <= 127
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    token(kind) && token(sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_the_spec() {
        for good in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-org/app_1",
            "a__b",
            "a--b",
            "x.y/z9",
        ] {
            assert!(RepoName::parse(good).is_some(), "{good}");
        }
        for bad in [
            "", "Alpine", "a//b", "/a", "a/", "-a", "a-", "a___b", "a..b", "a/../b", "a b",
        ] {
            assert!(RepoName::parse(bad).is_none(), "{bad:?}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_none());
    }

    #[test]
    fn single_names_map_to_library() {
        let name = RepoName::parse("alpine")
            .unwrap()
            .with_library_prefix()
            .unwrap();
        assert_eq!(name.as_str(), "library/alpine");
        let name = RepoName::parse("org/app")
            .unwrap()
            .with_library_prefix()
            .unwrap();
        assert_eq!(name.as_str(), "org/app");
    }

    #[test]
    fn tags_follow_the_spec() {
        for good in ["latest", "3.20", "_x", "v1.0-rc_1", &"a".repeat(128)] {
            assert!(Tag::parse(good).is_some(), "{good}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn accept_headers_are_merged_and_stripped() {
        let mut h = http::HeaderMap::new();
        h.append(
            "accept",
            format!("{OCI_INDEX}, {OCI_MANIFEST};q=0.9")
                .parse()
                .unwrap(),
        );
        h.append("accept", DOCKER_LIST.parse().unwrap());
        let set = AcceptSet::from_headers(&h);
        assert!(set.accepts(OCI_MANIFEST));
        assert!(!set.is_canonical());
        h.append("accept", DOCKER_MANIFEST.parse().unwrap());
        assert!(AcceptSet::from_headers(&h).is_canonical());
        let mut w = http::HeaderMap::new();
        w.append("accept", "*/*".parse().unwrap());
        assert!(AcceptSet::from_headers(&w).is_canonical());
    }

    #[test]
    fn image_references() {
        let d = Digest::of(b"x");
        let r = ImageRef::parse("alpine:3.20", Some("docker.io")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repo.as_str()),
            ("docker.io", "library/alpine")
        );
        assert_eq!(r.reference, Reference::Tag(Tag::parse("3.20").unwrap()));
        let r = ImageRef::parse(&format!("localhost:5000/app@{d}"), Some("docker.io")).unwrap();
        assert_eq!(
            (r.registry.as_str(), r.reference),
            ("localhost:5000", Reference::Digest(d))
        );
        assert!(ImageRef::parse("alpine", None).is_none());
        assert!(ImageRef::parse("ghcr.io/Org/app", None).is_none());
    }
}
