//! The distribution-spec vocabulary: repository names, tags, references, manifest media types
//! and header names, each validated against the spec's grammar before anything else sees it.
//!
//! Pure: no I/O.

use crate::digest::Digest;
use std::fmt;

/// `Docker-Content-Digest`, set on every manifest and blob answer.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";
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

/// Guesses a manifest's media type from its JSON when upstream did not say (or said
/// something generic). Docker schema2 and OCI documents carry `mediaType`; OCI may omit it.
pub fn sniff_manifest_type(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(body).ok()?;
    if let Some(t) = probe.media_type {
        return is_media_type(&t).then_some(t);
    }
    if probe.manifests.is_some() {
        return Some(OCI_INDEX.to_string());
    }
    probe.layers.map(|_| OCI_MANIFEST.to_string())
}

/// The digests a manifest refers to: child manifests of an index, or config and layers.
pub fn references(body: &[u8]) -> Vec<Digest> {
    descriptors(body)
        .into_iter()
        .map(|(digest, _)| digest)
        .collect()
}

/// The descriptors of a manifest (child manifests of an index, or config and layers): each
/// digest with the size the manifest declares for it, when it declares one.
pub fn descriptors(body: &[u8]) -> Vec<(Digest, Option<u64>)> {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: String,
        size: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct Document {
        #[serde(default)]
        manifests: Vec<Descriptor>,
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    let Ok(doc) = serde_json::from_slice::<Document>(body) else {
        return Vec::new();
    };
    doc.manifests
        .iter()
        .chain(doc.config.iter())
        .chain(doc.layers.iter())
        .filter_map(|d| Some((d.digest.parse().ok()?, d.size)))
        .collect()
}

/// Most layers an image may have for [`image_blobs`] to list them (Docker allows 127).
const MAX_IMAGE_LAYERS: usize = 256;

/// The blobs an image manifest references that its registry serves: the config, then the
/// layers in order, each once. Foreign and non-distributable layers (fetched from their own
/// URLs) are left out; an index, a manifest whose config digest does not parse, one of more
/// than [`MAX_IMAGE_LAYERS`] layers, or anything else, has none.
pub fn image_blobs(media_type: &str, body: &[u8]) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        #[serde(rename = "mediaType", default)]
        media_type: String,
        digest: String,
        #[serde(default)]
        urls: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct Image {
        config: Descriptor,
        #[serde(default)]
        layers: Vec<Descriptor>,
    }
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Vec::new();
    }
    let Ok(image) = serde_json::from_slice::<Image>(body) else {
        return Vec::new();
    };
    if image.layers.len() > MAX_IMAGE_LAYERS {
        return Vec::new();
    }
    let Ok(config) = image.config.digest.parse::<Digest>() else {
        return Vec::new();
    };
    let served = |d: &Descriptor| {
        d.urls.is_empty()
            && !d.media_type.contains("foreign")
            && !d.media_type.contains("nondistributable")
    };
    let mut blobs = vec![config];
    for layer in image.layers.iter().filter(|d| served(d)) {
        if let Ok(digest) = layer.digest.parse::<Digest>() {
            if !blobs.contains(&digest) {
                blobs.push(digest);
            }
        }
    }
    blobs
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

    #[test]
    fn finds_references() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let image = format!(
            r#"{{"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}},{{"digest":"bad"}}]}}"#
        );
        assert_eq!(references(image.as_bytes()), vec![a.clone(), b]);
        let index = format!(r#"{{"manifests":[{{"digest":"{a}"}}]}}"#);
        assert_eq!(references(index.as_bytes()), vec![a]);
        assert!(references(b"junk").is_empty());
    }

    #[test]
    fn sniffs_media_types() {
        assert_eq!(
            sniff_manifest_type(br#"{"manifests":[]}"#).as_deref(),
            Some(OCI_INDEX)
        );
        assert_eq!(
            sniff_manifest_type(br#"{"layers":[]}"#).as_deref(),
            Some(OCI_MANIFEST)
        );
        let docker = format!(r#"{{"mediaType":"{DOCKER_MANIFEST}","layers":[]}}"#);
        assert_eq!(
            sniff_manifest_type(docker.as_bytes()).as_deref(),
            Some(DOCKER_MANIFEST)
        );
        assert_eq!(sniff_manifest_type(b"not json"), None);
        assert_eq!(sniff_manifest_type(br#"{"mediaType":"a\r\nb"}"#), None);
        assert!(is_media_type(OCI_INDEX));
        assert!(!is_media_type("text"));
        assert!(!is_media_type("a/b c"));
    }

    #[test]
    fn image_blobs_are_the_config_then_the_served_layers() {
        let [c, l1, foreign, l2] = [b"c", b"1", b"f", b"2"].map(|b| Digest::of(b));
        let image = format!(
            r#"{{"config":{{"digest":"{c}"}},"layers":[{{"digest":"{l1}"}},
            {{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{foreign}","urls":["https://example.com/x"]}},
            {{"digest":"{l2}"}}]}}"#
        );
        assert_eq!(
            image_blobs(DOCKER_MANIFEST, image.as_bytes()),
            vec![c.clone(), l1.clone(), l2.clone()]
        );
        assert_eq!(
            image_blobs(OCI_MANIFEST, image.as_bytes()),
            vec![c.clone(), l1.clone(), l2]
        );
        // An index references manifests, not blobs; a body of another type counts for nothing.
        let index = format!(r#"{{"manifests":[{{"digest":"{c}"}}]}}"#);
        assert!(image_blobs(OCI_INDEX, index.as_bytes()).is_empty());
        assert!(image_blobs(OCI_MANIFEST, index.as_bytes()).is_empty());
        assert!(image_blobs(OCI_INDEX, image.as_bytes()).is_empty());
        assert!(image_blobs(OCI_MANIFEST, b"junk").is_empty());
        // Each blob once; a config that does not parse leaves nothing to go by.
        let repeated = format!(
            r#"{{"config":{{"digest":"{c}"}},"layers":[{{"digest":"{l1}"}},{{"digest":"{l1}"}}]}}"#
        );
        assert_eq!(
            image_blobs(OCI_MANIFEST, repeated.as_bytes()),
            vec![c, l1.clone()]
        );
        let bad_config = format!(r#"{{"config":{{"digest":"x"}},"layers":[{{"digest":"{l1}"}}]}}"#);
        assert!(image_blobs(OCI_MANIFEST, bad_config.as_bytes()).is_empty());
    }
}
