//! Names, tags, digests and image references: whatever parses prints back as itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::digest::Digest;
use regmirror::oci::{ImageRef, RepoName, Tag};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(name) = RepoName::parse(text) {
        assert_eq!(name.as_str(), text);
        assert!(text.len() <= RepoName::MAX_LEN);
    }
    if let Some(tag) = Tag::parse(text) {
        assert_eq!(tag.as_str(), text);
        assert!(text.len() <= 128);
    }
    if let Ok(digest) = text.parse::<Digest>() {
        assert_eq!(digest.to_string(), text);
    }
    if let Some(image) = ImageRef::parse(text, Some("docker.io")) {
        assert!(RepoName::parse(image.repo.as_str()).is_some());
        assert!(
            regmirror::oci::names_registry_host(&image.registry) || image.registry == "docker.io"
        );
    }
});
