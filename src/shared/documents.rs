//! Manifests and tag records in the bucket, so that a replica with an empty disk knows what the
//! fleet knows: a manifest by digest (`manifests/sha256/<hex>`, its media type as the object's
//! content type) and the last mapping upstream confirmed for a tag
//! (`tags/<registry>/<repository>/<tag>`, the record as JSON).
//!
//! Neither is taken on trust. A manifest must hash to its name and be a manifest document; a
//! tag record only ever stands in for the local record a replica would have had: it is
//! revalidated with upstream like one, and served stale (with a `Warning`) only when upstream
//! cannot be asked.

use super::{Operation, SharedStore};
use crate::cache::store::TagRecord;
use crate::cache::Manifest;
use crate::digest::Digest;
use crate::oci;
use bytes::Bytes;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload};
use std::sync::Arc;

impl SharedStore {
    fn manifest_key(&self, digest: &Digest) -> object_store::path::Path {
        self.key(format!("manifests/{}/{}", digest.algorithm(), digest.hex()))
    }

    fn tag_key(&self, registry: &str, repo: &str, tag: &str) -> object_store::path::Path {
        self.key(format!("tags/{registry}/{repo}/{tag}"))
    }

    /// A small object's bytes, refused beyond `limit`; `None` when missing or unreachable.
    async fn read_small(
        &self,
        key: &object_store::path::Path,
        limit: u64,
    ) -> Option<(Bytes, Attributes)> {
        let _asking = self.health.begin()?;
        let found = self.bucket.get(key).await;
        self.outcome(Operation::Get, &found);
        let found = found.ok()?;
        if found.meta.size > limit {
            tracing::warn!(bucket = %self.label, %key, size = found.meta.size, "an object larger than it may be; ignored");
            return None;
        }
        let attributes = found.attributes.clone();
        let bytes = tokio::time::timeout(self.config.stall_timeout, found.bytes())
            .await
            .ok()?
            .ok()?;
        Some((bytes, attributes))
    }

    /// A manifest the bucket holds under `digest`, checked: it hashes to its name and is a
    /// manifest document; a bad one is deleted.
    pub async fn read_manifest(&self, digest: &Digest) -> Option<Manifest> {
        let key = self.manifest_key(digest);
        let (bytes, attributes) = self
            .read_small(&key, oci::MAX_MANIFEST_BYTES as u64)
            .await?;
        if Digest::of(&bytes) != *digest || !oci::is_manifest_document(&bytes) {
            tracing::error!(bucket = %self.label, %digest, "the shared store holds a bad copy of this manifest; deleting it");
            let deleted = self.bucket.delete(&key).await;
            self.outcome(Operation::Delete, &deleted);
            return None;
        }
        let media_type = attributes
            .get(&Attribute::ContentType)
            .map(|t| t.to_string())
            .filter(|t| !oci::is_generic_type(t))
            .or_else(|| oci::sniff_manifest_type(&bytes))
            .unwrap_or_else(|| oci::OCI_MANIFEST.to_string());
        Some(Manifest {
            digest: digest.clone(),
            media_type,
            bytes,
        })
    }

    /// Uploads a verified manifest in the background.
    pub fn upload_manifest(self: &Arc<Self>, manifest: &Manifest) {
        let store = Arc::clone(self);
        let manifest = manifest.clone();
        self.enqueue(format!("manifest {}", manifest.digest), async move {
            let key = store.manifest_key(&manifest.digest);
            let mut attributes = Attributes::new();
            attributes.insert(Attribute::ContentType, manifest.media_type.clone().into());
            let options = PutOptions {
                attributes,
                ..PutOptions::default()
            };
            let put = store
                .bucket
                .put_opts(&key, PutPayload::from(manifest.bytes.clone()), options)
                .await;
            store.outcome(Operation::Put, &put);
            put.map(|_| true).map_err(|e| e.to_string())
        });
    }

    /// The tag record the bucket holds, if any (a record that does not parse is ignored).
    pub async fn read_tag(&self, registry: &str, repo: &str, tag: &str) -> Option<TagRecord> {
        let key = self.tag_key(registry, repo, tag);
        let (bytes, _) = self.read_small(&key, 64 * 1024).await?;
        let record: TagRecord = serde_json::from_slice(&bytes).ok()?;
        record.digest.parse::<Digest>().ok()?;
        Some(record)
    }

    /// Uploads what upstream last confirmed a tag points to, in the background.
    pub fn upload_tag(self: &Arc<Self>, registry: &str, repo: &str, tag: &str, record: TagRecord) {
        let store = Arc::clone(self);
        let key = self.tag_key(registry, repo, tag);
        self.enqueue(format!("tag {repo}:{tag}"), async move {
            let json = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
            let put = store.bucket.put(&key, PutPayload::from(json)).await;
            store.outcome(Operation::Put, &put);
            put.map(|_| true).map_err(|e| e.to_string())
        });
    }
}
