//! Manifests and tag records in the bucket, so that a replica with an empty disk knows what the
//! fleet knows: a manifest by digest (`manifests/sha256/<hex>`, its media type as the object's
//! content type) and the last mapping upstream confirmed for a tag
//! (`tags/<registry>/<repository>/_tags/<tag>`, the record as JSON).
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
    /// How long the upload of a manifest or a tag record may take, retries included.
    fn small_upload_deadline(&self) -> std::time::Duration {
        4 * self.config.timeout + std::time::Duration::from_secs(16)
    }

    fn manifest_key(&self, digest: &Digest) -> object_store::path::Path {
        self.key(format!("manifests/{}/{}", digest.algorithm(), digest.hex()))
    }

    /// `_tags` cannot be a repository's path component (those start with a letter or digit),
    /// so a tag's key never collides with another repository's prefix.
    fn tag_key(&self, registry: &str, repo: &str, tag: &str) -> object_store::path::Path {
        self.key(format!("tags/{registry}/{repo}/_tags/{tag}"))
    }

    /// A small object's bytes, refused beyond `limit`; `None` when missing or unreachable. A
    /// body that fails or stalls marks the bucket down, as for a blob.
    async fn read_small(&self, key: &object_store::path::Path, limit: u64) -> Option<Bytes> {
        let found = {
            let _asking = self.health.begin()?;
            let found = self.bucket.get(key).await;
            self.outcome(Operation::Get, &found);
            found.ok()?
        };
        if found.meta.size > limit {
            tracing::warn!(bucket = %self.label, %key, size = found.meta.size, "an object larger than it may be; ignored");
            return None;
        }
        match tokio::time::timeout(self.config.stall_timeout, found.bytes()).await {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(e)) => {
                self.body_failed(&e.to_string());
                None
            }
            Err(_) => {
                self.body_failed(&format!("no body within {:?}", self.config.stall_timeout));
                None
            }
        }
    }

    /// A manifest the bucket holds under `digest`, checked: it hashes to its name and is a
    /// manifest document; a bad one is deleted.
    pub async fn read_manifest(self: &Arc<Self>, digest: &Digest) -> Option<Manifest> {
        let key = self.manifest_key(digest);
        let bytes = self
            .read_small(&key, oci::MAX_MANIFEST_BYTES as u64)
            .await?;
        if Digest::of(&bytes) != *digest || !oci::is_manifest_document(&bytes) {
            tracing::error!(bucket = %self.label, %digest, "the shared store holds a bad copy of this manifest; deleting it");
            self.metrics.digest_mismatch();
            let store = Arc::clone(self);
            tokio::spawn(async move {
                let deleted = store.bucket.delete(&key).await;
                store.count(Operation::Delete, &deleted);
            });
            return None;
        }
        // The document says what it is; an object's content type is only a store's word (a
        // bucket copied by other tools may say binary/octet-stream).
        let media_type =
            oci::sniff_manifest_type(&bytes).unwrap_or_else(|| oci::OCI_MANIFEST.to_string());
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
        let deadline = self.small_upload_deadline();
        self.enqueue(
            format!("manifest {}", manifest.digest),
            deadline,
            async move {
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
                store.count(Operation::Put, &put);
                put.map(|_| true).map_err(|e| e.to_string())
            },
        );
    }

    /// The tag record the bucket holds, if any (a record that does not parse is ignored).
    pub async fn read_tag(&self, registry: &str, repo: &str, tag: &str) -> Option<TagRecord> {
        let key = self.tag_key(registry, repo, tag);
        let bytes = self.read_small(&key, 64 * 1024).await?;
        let record: TagRecord = serde_json::from_slice(&bytes).ok()?;
        let valid = record.digest.parse::<Digest>().is_ok()
            && oci::is_media_type(&record.media_type)
            && record.size <= oci::MAX_MANIFEST_BYTES as u64;
        valid.then_some(record)
    }

    /// Uploads what upstream last confirmed a tag points to, in the background: when it
    /// points elsewhere than this replica last uploaded, or that was an hour ago (a tag
    /// revalidated every minute costs one write an hour, not sixty).
    pub fn upload_tag(self: &Arc<Self>, registry: &str, repo: &str, tag: &str, record: TagRecord) {
        let key = self.tag_key(registry, repo, tag);
        if self.tags_shared.get(key.as_ref()).as_deref() == Some(&record.digest) {
            return;
        }
        let store = Arc::clone(self);
        let deadline = self.small_upload_deadline();
        self.enqueue(format!("tag {repo}:{tag}"), deadline, async move {
            let json = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
            let put = store.bucket.put(&key, PutPayload::from(json)).await;
            store.count(Operation::Put, &put);
            put.map_err(|e| e.to_string())?;
            store.tags_shared.insert(key.to_string(), record.digest);
            Ok(true)
        });
    }

    /// Deletes a tag's record in the background: upstream says the tag is gone or refused,
    /// so no replica should answer it from the fleet's memory.
    pub fn delete_tag(self: &Arc<Self>, registry: &str, repo: &str, tag: &str) {
        let key = self.tag_key(registry, repo, tag);
        self.tags_shared.invalidate(key.as_ref());
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let deleted = store.bucket.delete(&key).await;
            store.count(Operation::Delete, &deleted);
        });
    }
}
