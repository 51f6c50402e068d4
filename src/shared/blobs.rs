//! Blobs in the bucket (`blobs/sha256/<hex>`): read as a download's source, deleted when found
//! bad, uploaded once committed locally.

use super::{Operation, Outcome, SharedStore};
use crate::digest::{Digest, Hasher};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStoreExt, PutPayload};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

/// Blobs up to this size are uploaded in one request; larger ones in parts of this size (at
/// most 10,000 parts: 78 GiB).
const PART_SIZE: usize = 8 << 20;

/// A blob as the bucket sends it.
pub struct BucketBlob {
    pub size: u64,
    pub bytes: BoxStream<'static, Result<Bytes, String>>,
}

/// Opens the local copy of a blob when its upload's turn comes: the file and its size, or
/// `None` when it is no longer stored.
pub type OpenLocal = Box<dyn FnOnce() -> std::io::Result<Option<(File, u64)>> + Send>;

impl SharedStore {
    fn blob_key(&self, digest: &Digest) -> Key {
        self.key(format!("blobs/{}/{}", digest.algorithm(), digest.hex()))
    }

    /// Starts reading a blob; `None` when the bucket does not hold it, cannot be reached, is
    /// down (see [`super::health`]), or sent it bad lately. A blob larger than `at_most` (what
    /// manifests declared) is not taken (a manifest may lie about a layer's size: that is no
    /// reason to delete the object).
    pub async fn read_blob(&self, digest: &Digest, at_most: Option<u64>) -> Option<BucketBlob> {
        if self.bad_blobs.contains_key(digest) {
            return None;
        }
        let _asking = self.health.begin()?;
        let key = self.blob_key(digest);
        let result = self.bucket.get(&key).await;
        if let (Outcome::Error, Err(e)) = (self.outcome(Operation::Get, &result), &result) {
            tracing::debug!(bucket = %self.label, %digest, error = %e, "reading from the shared store failed");
        }
        let found = result.ok()?;
        let size = found.meta.size;
        if at_most.is_some_and(|limit| size > limit) {
            tracing::warn!(bucket = %self.label, %digest, size, "the shared store's copy is larger than manifests declare; fetched from upstream");
            return None;
        }
        let metrics = Arc::clone(&self.metrics);
        let bytes = found
            .into_stream()
            .map(move |chunk| {
                let chunk = chunk.map_err(|e| e.to_string())?;
                metrics.shared_store_bytes("read", chunk.len() as u64);
                Ok(chunk)
            })
            .boxed();
        Some(BucketBlob { size, bytes })
    }

    /// Deletes, in the background, a blob the bucket sent bad, so that a good copy replaces
    /// it.
    pub fn discard_blob(self: &Arc<Self>, digest: &Digest, why: &str) {
        tracing::error!(bucket = %self.label, %digest, problem = why, "the shared store holds a bad copy of this blob; deleting it");
        self.metrics.digest_mismatch();
        self.bad_blobs.insert(digest.clone(), ());
        let (store, digest) = (Arc::clone(self), digest.clone());
        tokio::spawn(async move {
            let result = store.bucket.delete(&store.blob_key(&digest)).await;
            store.count(Operation::Delete, &result);
            if let Err(e) = result {
                tracing::warn!(bucket = %store.label, %digest, error = %e, "could not delete the bad copy");
            }
        });
    }

    /// Uploads a verified local blob in the background, unless the bucket has it already. The
    /// local copy is opened when the upload's turn comes (a blob evicted meanwhile is not
    /// uploaded), and hashed again on the way.
    pub fn upload_blob(self: &Arc<Self>, digest: Digest, size: u64, open: OpenLocal) {
        let store = Arc::clone(self);
        // Its HEAD, each part at a quarter of the upload rate the time limits assume, and the
        // completion.
        let deadline = 8 * self.config.timeout + Duration::from_secs(4 * size / (256 * 1024));
        self.enqueue(format!("blob {digest}"), deadline, async move {
            let opened = tokio::task::spawn_blocking(open)
                .await
                .map_err(|e| format!("opening the local copy: {e}"))?
                .map_err(|e| format!("opening the local copy: {e}"))?;
            match opened {
                Some((file, stored)) if stored == size => {
                    store.upload(&digest, Arc::new(file), size).await
                }
                _ => Ok(false),
            }
        });
    }

    /// Uploads unless present: `Ok(false)` when the bucket had it.
    async fn upload(&self, digest: &Digest, file: Arc<File>, size: u64) -> Result<bool, String> {
        let key = self.blob_key(digest);
        let present = self.bucket.head(&key).await;
        let replace = self.bad_blobs.contains_key(digest);
        match (self.count(Operation::Head, &present), present) {
            (Outcome::Ok, Ok(meta)) if meta.size == size && !replace => return Ok(false),
            // Missing, the wrong size, or a key that may write but not look: upload.
            (Outcome::Ok | Outcome::Missing | Outcome::Denied, _) => {}
            (_, Err(e)) => return Err(e.to_string()),
            (_, Ok(_)) => {}
        }
        let mut hasher = Hasher::default();
        if size <= PART_SIZE as u64 {
            let bytes;
            (bytes, hasher) = read_part(&file, 0, size as usize, hasher).await?;
            verify(hasher, digest, size)?;
            let result = self.bucket.put(&key, PutPayload::from(bytes)).await;
            self.count(Operation::Put, &result);
            result.map_err(|e| e.to_string())?;
        } else {
            let started = self.bucket.put_multipart(&key).await;
            self.count(Operation::Put, &started);
            let mut upload = started.map_err(|e| e.to_string())?;
            let sent = async {
                let mut offset = 0u64;
                while offset < size {
                    let len = (size - offset).min(PART_SIZE as u64) as usize;
                    let bytes;
                    (bytes, hasher) = read_part(&file, offset, len, hasher).await?;
                    offset += len as u64;
                    let part = upload.put_part(PutPayload::from(bytes)).await;
                    self.count(Operation::Put, &part);
                    part.map_err(|e| e.to_string())?;
                }
                verify(hasher, digest, size)?;
                let done = upload.complete().await;
                self.count(Operation::Put, &done);
                done.map(|_| ()).map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = sent {
                let aborted = upload.abort().await;
                self.count(Operation::Delete, &aborted);
                return Err(e);
            }
        }
        self.metrics.shared_store_bytes("written", size);
        self.bad_blobs.invalidate(digest);
        tracing::info!(bucket = %self.label, %digest, size, "blob uploaded to the shared store");
        Ok(true)
    }
}

/// `len` bytes of `file` from `offset`, read and hashed on the blocking pool.
async fn read_part(
    file: &Arc<File>,
    offset: u64,
    len: usize,
    mut hasher: Hasher,
) -> Result<(Bytes, Hasher), String> {
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        let mut buffer = vec![0u8; len];
        file.read_exact_at(&mut buffer, offset)
            .map_err(|e| format!("reading the local copy: {e}"))?;
        hasher.update(&buffer);
        Ok((Bytes::from(buffer), hasher))
    })
    .await
    .map_err(|e| format!("reading the local copy: {e}"))?
}

fn verify(hasher: Hasher, digest: &Digest, size: u64) -> Result<(), String> {
    hasher.verify(digest, Some(size)).map_err(|m| {
        tracing::error!(%digest, problem = %m, "the local copy of this blob no longer matches its digest (run regmirror verify); not uploaded");
        format!("the local copy no longer matches its digest: {m}")
    })
}
