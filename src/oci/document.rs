//! What a manifest's JSON says: its media type when upstream did not say, the descriptors it
//! lists, the blobs its registry serves for it, and an image's blobs in pull order.
//!
//! Pure: no I/O.

use super::{is_media_type, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::digest::Digest;

/// Docker's long-gone signed schema 1, still served by a few old registries.
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The fields that tell a manifest's kind.
#[derive(serde::Deserialize)]
struct Probe {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u64>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
    config: Option<serde_json::Value>,
    #[serde(rename = "fsLayers")]
    fs_layers: Option<serde_json::Value>,
}

/// Guesses a manifest's media type from its JSON when upstream did not say (or said
/// something generic). Docker schema2 and OCI documents carry `mediaType`; OCI may omit it.
pub fn sniff_manifest_type(body: &[u8]) -> Option<String> {
    let probe: Probe = serde_json::from_slice(body).ok()?;
    if let Some(t) = probe.media_type {
        return is_media_type(&t).then_some(t);
    }
    if probe.manifests.is_some() {
        return Some(OCI_INDEX.to_string());
    }
    if probe.fs_layers.is_some() {
        return Some(DOCKER_SCHEMA1.to_string());
    }
    probe.layers.map(|_| OCI_MANIFEST.to_string())
}

/// Whether `body` is a manifest document at all: JSON with a `schemaVersion` that lists
/// manifests (an index), a config or layers (an image or artifact), or `fsLayers` (schema 1).
/// A layer or a config asked for as a manifest is not one, whatever its digest.
pub fn is_manifest_document(body: &[u8]) -> bool {
    let Ok(probe) = serde_json::from_slice::<Probe>(body) else {
        return false;
    };
    probe.schema_version.is_some()
        && (probe.manifests.is_some()
            || probe.layers.is_some()
            || probe.config.is_some()
            || probe.fs_layers.is_some())
}

/// The digests a manifest refers to: child manifests of an index, or config and layers.
pub fn references(body: &[u8]) -> Vec<Digest> {
    descriptors(body)
        .into_iter()
        .map(|(digest, _)| digest)
        .collect()
}

/// A descriptor as a manifest lists it.
#[derive(serde::Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: Option<u64>,
    #[serde(default)]
    urls: Vec<String>,
}

impl Descriptor {
    /// Whether the registry serves it: foreign and non-distributable layers are fetched from
    /// their own URLs.
    fn served(&self) -> bool {
        self.urls.is_empty()
            && !self.media_type.contains("foreign")
            && !self.media_type.contains("nondistributable")
    }
}

/// What an index or a manifest lists.
#[derive(serde::Deserialize)]
struct Document {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

impl Document {
    fn parse(body: &[u8]) -> Option<Document> {
        serde_json::from_slice(body).ok()
    }

    fn all(&self) -> impl Iterator<Item = &Descriptor> {
        self.manifests
            .iter()
            .chain(self.config.iter())
            .chain(self.layers.iter())
    }
}

/// The descriptors of a manifest (child manifests of an index, or config and layers): each
/// digest with the size the manifest declares for it, when it declares one.
pub fn descriptors(body: &[u8]) -> Vec<(Digest, Option<u64>)> {
    let Some(doc) = Document::parse(body) else {
        return Vec::new();
    };
    doc.all()
        .filter_map(|d| Some((d.digest.parse().ok()?, d.size)))
        .collect()
}

/// The digests a manifest refers to that its registry serves, and so holds in the manifest's
/// repository: child manifests, the config, and the layers but foreign and non-distributable
/// ones.
pub fn served_references(body: &[u8]) -> Vec<Digest> {
    let Some(doc) = Document::parse(body) else {
        return Vec::new();
    };
    doc.all()
        .filter(|d| d.served())
        .filter_map(|d| d.digest.parse().ok())
        .collect()
}

/// What an index or an image manifest holds, for people browsing the cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outline {
    /// An index's platform manifests: `os/arch[/variant]` (or `unknown`) and digest.
    pub platforms: Vec<(String, Digest)>,
    /// An image's config.
    pub config: Option<Digest>,
    /// An image's config and layers, in bytes as declared.
    pub bytes: u64,
}

/// A platform as an index or an image config names it.
#[derive(serde::Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    variant: Option<String>,
}

impl Platform {
    fn name(&self) -> String {
        if self.os.is_empty() && self.architecture.is_empty() {
            return "unknown".into();
        }
        match &self.variant {
            Some(variant) => format!("{}/{}/{variant}", self.os, self.architecture),
            None => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// The outline of a manifest, or `None` when it is not one.
pub fn outline(body: &[u8]) -> Option<Outline> {
    #[derive(serde::Deserialize)]
    struct Child {
        digest: String,
        platform: Option<Platform>,
    }
    #[derive(serde::Deserialize)]
    struct Sized {
        digest: String,
        #[serde(default)]
        size: u64,
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        manifests: Vec<Child>,
        config: Option<Sized>,
        #[serde(default)]
        layers: Vec<Sized>,
    }
    let doc: Doc = serde_json::from_slice(body).ok()?;
    let platforms = doc
        .manifests
        .iter()
        .filter_map(|c| {
            let name = c.platform.as_ref().map_or("unknown".into(), Platform::name);
            Some((name, c.digest.parse().ok()?))
        })
        .collect();
    let bytes = doc
        .config
        .iter()
        .chain(doc.layers.iter())
        .fold(0u64, |sum, d| sum.saturating_add(d.size));
    Some(Outline {
        platforms,
        config: doc.config.and_then(|c| c.digest.parse().ok()),
        bytes,
    })
}

/// The platform an image config names (`os/arch[/variant]`).
pub fn config_platform(config: &[u8]) -> Option<String> {
    let platform: Platform = serde_json::from_slice(config).ok()?;
    (!platform.os.is_empty()).then(|| platform.name())
}

/// Most layers an image may have for [`image_blobs`] to list them (Docker allows 127).
const MAX_IMAGE_LAYERS: usize = 256;

/// The blobs an image manifest references that its registry serves: the config, then the
/// layers in order, each once. Foreign and non-distributable layers (fetched from their own
/// URLs) are left out; an index, a manifest whose config digest does not parse, one of more
/// than [`MAX_IMAGE_LAYERS`] layers, or anything else, has none.
pub fn image_blobs(media_type: &str, body: &[u8]) -> Vec<Digest> {
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
    let mut blobs = vec![config];
    for layer in image.layers.iter().filter(|d| d.served()) {
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

    #[test]
    fn only_manifest_documents_are_manifests() {
        for manifest in [
            r#"{"schemaVersion":2,"manifests":[]}"#,
            r#"{"schemaVersion":2,"config":{"digest":"x"},"layers":[]}"#,
            r#"{"schemaVersion":1,"name":"a","fsLayers":[]}"#,
        ] {
            assert!(is_manifest_document(manifest.as_bytes()), "{manifest}");
        }
        for other in [
            &b"\x1f\x8b\x08 a gzip layer"[..],
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}"#,
            br#"{"layers":[]}"#,
            b"[]",
        ] {
            assert!(!is_manifest_document(other), "{other:?}");
        }
        assert_eq!(
            sniff_manifest_type(br#"{"schemaVersion":1,"fsLayers":[]}"#).as_deref(),
            Some(DOCKER_SCHEMA1)
        );
    }

    #[test]
    fn served_references_leave_out_foreign_and_nondistributable_layers() {
        let [c, l1, foreign, nondist, remote] =
            [b"c", b"1", b"f", b"n", b"r"].map(|b| Digest::of(b));
        let image = format!(
            r#"{{"config":{{"digest":"{c}"}},"layers":[{{"digest":"{l1}"}},
            {{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{foreign}"}},
            {{"mediaType":"application/vnd.oci.image.layer.nondistributable.v1.tar+gzip","digest":"{nondist}"}},
            {{"digest":"{remote}","urls":["https://example.com/r"]}}]}}"#
        );
        assert_eq!(served_references(image.as_bytes()), vec![c, l1]);
        assert_eq!(references(image.as_bytes()).len(), 5);
    }

    #[test]
    fn outlines_name_platforms_and_sum_an_image() {
        let [c, l1, l2] = [b"c", b"1", b"2"].map(|b| Digest::of(b));
        let image = format!(
            r#"{{"config":{{"digest":"{c}","size":10}},"layers":[{{"digest":"{l1}","size":100}},{{"digest":"{l2}","size":1000}}]}}"#
        );
        let outline = outline(image.as_bytes()).unwrap();
        assert_eq!((outline.bytes, outline.config), (1110, Some(c.clone())));
        let index = format!(
            r#"{{"manifests":[{{"digest":"{l1}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},{{"digest":"{l2}"}}]}}"#
        );
        let platforms = super::outline(index.as_bytes()).unwrap().platforms;
        assert_eq!(
            platforms,
            vec![("linux/arm64/v8".into(), l1), ("unknown".into(), l2)]
        );
        assert_eq!(
            config_platform(br#"{"os":"linux","architecture":"amd64"}"#).as_deref(),
            Some("linux/amd64")
        );
        assert!(super::outline(b"not json").is_none());
    }
}
