//! Manifests and indexes from upstream: type sniffing and the digests they reference.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::oci::{is_media_type, references, sniff_manifest_type};

fuzz_target!(|data: &[u8]| {
    if let Some(media_type) = sniff_manifest_type(data) {
        assert!(is_media_type(&media_type), "{media_type:?}");
    }
    for digest in references(data) {
        assert_eq!(digest.hex().len(), 64);
    }
});
