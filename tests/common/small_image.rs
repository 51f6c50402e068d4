//! The smallest image most tests need: one blob, one manifest, under two repositories.

use super::{random_bytes, schema2_manifest, FakeRegistry, OCI_MANIFEST};

/// An origin with one small image at `library/alpine:3` and `myorg/tool:1`; returns the blob.
pub fn seed(origin: &FakeRegistry) -> (Vec<u8>, regmirror::digest::Digest) {
    let blob = random_bytes(300_000, 7);
    let digest = origin.add_blob(blob.clone());
    let manifest = schema2_manifest(&digest, blob.len(), &[]);
    origin.add_manifest("library/alpine", Some("3"), OCI_MANIFEST, manifest.clone());
    origin.add_manifest("myorg/tool", Some("1"), OCI_MANIFEST, manifest);
    (blob, digest)
}
