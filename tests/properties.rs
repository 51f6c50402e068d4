//! Property tests: round trips of what the mirror parses and prints (digests, names, routes,
//! ranges, sizes and durations in the configuration), over generated inputs.

use proptest::prelude::*;
use regmirror::config::{parse_byte_size, Config};
use regmirror::digest::Digest;
use regmirror::oci::{Reference, RepoName, Tag};
use regmirror::range::{content_range, plan, Plan};
use regmirror::route::{route, RegistryName, Target};
use std::time::Duration;

/// A name component by the distribution grammar: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn component() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-z0-9]{1,8}(([._]|__|-{1,2})[a-z0-9]{1,8}){0,2}").unwrap()
}

fn repo_name() -> impl Strategy<Value = String> {
    proptest::collection::vec(component(), 1..4).prop_map(|c| c.join("/"))
}

fn tag() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}").unwrap()
}

fn registries() -> Vec<RegistryName> {
    vec![
        RegistryName {
            name: "docker.io".into(),
            is_default: true,
            library_prefix: true,
        },
        RegistryName {
            name: "registry.example:5000".into(),
            is_default: false,
            library_prefix: false,
        },
    ]
}

proptest! {
    #[test]
    fn digests_print_as_they_parse(bytes in proptest::array::uniform32(any::<u8>())) {
        let digest = Digest::of(&bytes);
        let text = digest.to_string();
        prop_assert_eq!(text.parse::<Digest>().unwrap(), digest.clone());
        prop_assert!(text.to_uppercase().parse::<Digest>().is_err() || text == text.to_uppercase());
    }

    #[test]
    fn names_and_tags_round_trip(name in repo_name(), tag in tag()) {
        prop_assume!(name.len() <= RepoName::MAX_LEN);
        let (parsed_name, parsed_tag) = (RepoName::parse(&name).unwrap(), Tag::parse(&tag).unwrap());
        prop_assert_eq!(parsed_name.as_str(), name.as_str());
        prop_assert_eq!(parsed_tag.as_str(), tag.as_str());
    }

    #[test]
    fn routes_carry_the_name_and_reference_they_were_given(
        name in repo_name(),
        tag in tag(),
        bytes in proptest::array::uniform32(any::<u8>()),
        by_prefix in any::<bool>(),
    ) {
        prop_assume!(name.len() <= RepoName::MAX_LEN);
        let digest = Digest::of(&bytes);
        let (path, query) = if by_prefix {
            (format!("/v2/registry.example:5000/{name}/manifests/{tag}"), None)
        } else {
            (format!("/v2/{name}/manifests/{tag}"), Some("ns=registry.example:5000"))
        };
        let routed = route(&http::Method::GET, &path, query, &registries()).unwrap();
        prop_assert_eq!(routed.registry, Some(1));
        match routed.target {
            Target::Manifest { repo, reference: Reference::Tag(t) } => {
                prop_assert_eq!(repo.as_str(), name.as_str());
                prop_assert_eq!(t.as_str(), tag.as_str());
            }
            other => prop_assert!(false, "{:?}", other),
        }
        let path = format!("/v2/{name}/blobs/{digest}");
        let routed = route(&http::Method::HEAD, &path, None, &registries());
        // On Docker Hub (the default here) a first component that looks like a host names
        // another registry, one this mirror does not serve; Hub namespaces have no dots.
        let first = name.split('/').next().unwrap();
        if name.contains('/') && first.contains('.') && regmirror::oci::is_host_name(first) {
            prop_assert!(matches!(routed, Err(regmirror::route::RouteError::UnknownRegistry(_))));
        } else {
            match routed.unwrap().target {
                Target::Blob { repo, digest: d } => {
                    prop_assert_eq!(d, digest);
                    let expected = if name.contains('/') { name.clone() } else { format!("library/{name}") };
                    prop_assert_eq!(repo.as_str(), expected.as_str());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }

    #[test]
    fn ranges_inside_the_blob_are_served_exactly(
        size in 1u64..(1 << 44),
        a in any::<u64>(),
        b in any::<u64>(),
    ) {
        let (start, last) = { let (x, y) = (a % size, b % size); (x.min(y), x.max(y)) };
        let header = format!("bytes={start}-{last}");
        prop_assert_eq!(plan(Some(&header), size), Plan::Partial { start, end: last + 1 });
        prop_assert_eq!(content_range(start, last + 1, size), format!("bytes {start}-{last}/{size}"));
        let open = format!("bytes={start}-");
        prop_assert_eq!(plan(Some(&open), size), Plan::Partial { start, end: size });
        let beyond = format!("bytes={size}-");
        prop_assert_eq!(plan(Some(&beyond), size), Plan::Unsatisfiable);
    }

    #[test]
    fn sizes_and_durations_survive_check_config(
        max_size in 1u64..(1 << 60),
        ttl_seconds in 1u64..(400 * 24 * 3600),
        mib in 1u64..(1 << 20),
    ) {
        let mut config = Config::default();
        config.cache.max_size = Some(max_size);
        config.cache.tag_ttl = Duration::from_secs(ttl_seconds);
        let again = Config::parse(&config.to_redacted_toml()).unwrap();
        prop_assert_eq!(again.cache.max_size, Some(max_size));
        prop_assert_eq!(again.cache.tag_ttl, config.cache.tag_ttl);
        prop_assert_eq!(parse_byte_size(&format!("{mib}MiB")).unwrap(), mib << 20);
        prop_assert_eq!(parse_byte_size(&format!("{mib} KiB")).unwrap(), mib << 10);
    }
}
