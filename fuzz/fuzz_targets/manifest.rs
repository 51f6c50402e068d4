//! Manifests and indexes from upstream: type sniffing and the digests they reference.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::oci::{descriptors, is_media_type, references, sniff_manifest_type};

fuzz_target!(|data: &[u8]| {
    if let Some(media_type) = sniff_manifest_type(data) {
        assert!(is_media_type(&media_type), "{media_type:?}");
    }
    let referenced = references(data);
    for digest in &referenced {
        assert_eq!(digest.hex().len(), 64);
    }
    let described: Vec<_> = descriptors(data).into_iter().map(|(d, _)| d).collect();
    assert_eq!(referenced, described);
});
