//! Request routing: any method, path and query. Every accepted route names a valid repository
//! and a valid digest or tag (what the cache builds paths from), and the registry it picked exists.
#![no_main]

use libfuzzer_sys::fuzz_target;
use regmirror::oci::{RepoName, Tag};
use regmirror::route::{route, RegistryName, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (method, rest) = match text.as_bytes().first() {
        Some(b'H') => (http::Method::HEAD, &text[1..]),
        Some(b'P') => (http::Method::PUT, &text[1..]),
        _ => (http::Method::GET, text),
    };
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let registries = [
        RegistryName {
            name: "docker.io".into(),
            is_default: true,
            library_prefix: true,
        },
        RegistryName {
            name: "ghcr.io".into(),
            is_default: false,
            library_prefix: false,
        },
    ];
    let Ok(routed) = route(&method, path, query, &registries) else {
        return;
    };
    assert!(routed.registry.is_none_or(|i| i < registries.len()));
    let repo = match &routed.target {
        Target::Manifest { repo, reference } => {
            if let regmirror::oci::Reference::Tag(tag) = reference {
                assert!(Tag::parse(tag.as_str()).is_some());
            }
            repo
        }
        Target::Blob { repo, digest } | Target::Referrers { repo, digest } => {
            let hex = digest.hex();
            assert_eq!(hex.len(), 64);
            assert!(hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            repo
        }
        Target::TagsList { repo, .. } => repo,
        _ => return,
    };
    assert!(
        RepoName::parse(repo.as_str()).is_some(),
        "{:?}",
        repo.as_str()
    );
    assert!(!repo.as_str().split('/').any(|c| c == ".." || c == "."));
});
