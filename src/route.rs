//! Request routing: `(method, path, query)` to a typed [`Route`], or a [`RouteError`] that already
//! says which OCI error the client gets.
//!
//! Pure: no I/O and no knowledge of the cache or upstreams. The registry a request is for is chosen
//! in this order: containerd's `?ns=HOST`, a path prefix naming a configured registry
//! (`/v2/ghcr.io/owner/app/...`, as podman's `location = "HOST/ghcr.io"` sends), else the default
//! registry at bare paths (dockerd's `registry-mirrors`).

use crate::digest::Digest;
use crate::oci::{Reference, RepoName, Tag};
use http::Method;

/// A configured registry as routing sees it.
#[derive(Clone, Debug)]
pub struct RegistryName {
    /// The registry's host name as clients spell it (`docker.io`, `ghcr.io`).
    pub name: String,
    /// Served at bare `/v2/<name>/...` paths.
    pub is_default: bool,
    /// Single-component names get `library/` (Docker Hub's official images).
    pub library_prefix: bool,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `GET /v2/`: the API version check.
    ApiBase,
    Manifest {
        repo: RepoName,
        reference: Reference,
    },
    Blob {
        repo: RepoName,
        digest: Digest,
    },
    TagsList {
        repo: RepoName,
        query: Option<String>,
    },
    Referrers {
        repo: RepoName,
        digest: Digest,
    },
    Catalog,
    Healthz,
    Readyz,
    Metrics,
    /// A page of the operator console (`/`, `/browse`, `/downloads`, `/upstreams`), with its
    /// query (filter, page, `format=json`).
    Status {
        page: Page,
        query: Option<String>,
    },
    /// `GET /token`: the token service clients are sent to by the `Bearer` challenge.
    Token,
}

/// The operator console's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// `/`: the last hour, disk use, savings, upstreams, the shared store and the cluster.
    Overview,
    /// `/browse`: registries, their repositories, a repository's tags.
    Browse,
    /// `/downloads`: downloads in progress, prefetches queued, commits waiting.
    Downloads,
    /// `/upstreams`: each endpoint's state changes over the last hour.
    Upstreams,
}

/// A routed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Index into the configured registries; `None` for registry-independent targets.
    pub registry: Option<usize>,
    /// The `ns` query value, echoed as `OCI-Namespace`.
    pub namespace: Option<String>,
    /// The registry was named by a path prefix (`/v2/ghcr.io/...`): links the mirror hands out
    /// for it keep the prefix.
    pub prefixed: bool,
    pub target: Target,
    /// HEAD asks for headers only.
    pub head: bool,
}

impl Route {
    /// A short stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self.target {
            Target::ApiBase => "base",
            Target::Manifest { .. } => "manifest",
            Target::Blob { .. } => "blob",
            Target::TagsList { .. } => "tags",
            Target::Referrers { .. } => "referrers",
            Target::Catalog => "catalog",
            Target::Healthz => "healthz",
            Target::Token => "token",
            Target::Readyz => "readyz",
            Target::Metrics => "metrics",
            Target::Status { .. } => "status",
        }
    }
}

/// Why a request cannot be routed; each maps to one OCI error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("invalid repository name {0:?}")]
    NameInvalid(String),
    /// A manifest reference that is neither a tag nor a digest: no manifest has it (answered
    /// 404, as the distribution-spec's conformance tests expect).
    #[error("no manifest is named {0:?}: it is neither a valid tag nor a digest")]
    ReferenceInvalid(String),
    #[error("invalid digest {0:?}: {1}")]
    DigestInvalid(String, String),
    #[error("regmirror is a read-only mirror: {0} is not supported")]
    Unsupported(Method),
    #[error("registry {0:?} is not configured on this mirror")]
    UnknownRegistry(String),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("request URI longer than {0} bytes")]
    TooLong(usize),
}

/// Routes one request.
pub fn route(
    method: &Method,
    path: &str,
    query: Option<&str>,
    registries: &[RegistryName],
) -> Result<Route, RouteError> {
    let head = method == Method::HEAD;
    let plain = |target| {
        Ok(Route {
            registry: None,
            namespace: None,
            prefixed: false,
            target,
            head,
        })
    };
    match path {
        "/healthz" => return plain(Target::Healthz),
        "/readyz" => return plain(Target::Readyz),
        "/metrics" => return plain(Target::Metrics),
        "/" | "/browse" | "/downloads" | "/upstreams"
            if method == Method::GET || method == Method::HEAD =>
        {
            let page = match path {
                "/" => Page::Overview,
                "/browse" => Page::Browse,
                "/downloads" => Page::Downloads,
                _ => Page::Upstreams,
            };
            let query = query.map(str::to_string);
            return plain(Target::Status { page, query });
        }
        "/token" if method == Method::GET || method == Method::HEAD => return plain(Target::Token),
        // containerd tries an OAuth2 POST first and falls back to GET on 405.
        "/token" => return Err(RouteError::Unsupported(method.clone())),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2") else {
        return Err(RouteError::NotFound(path.to_string()));
    };
    if method != Method::GET && method != Method::HEAD {
        return Err(RouteError::Unsupported(method.clone()));
    }
    let rest = rest.trim_start_matches('/');
    if rest.is_empty() {
        return plain(Target::ApiBase);
    }
    if rest == "_catalog" {
        return plain(Target::Catalog);
    }
    let namespace = query.and_then(|q| query_value(q, "ns"));
    let (raw_name, target) = split_target(rest, path)?;
    let (registry, name, prefixed) = pick_registry(namespace.as_deref(), raw_name, registries)?;
    let mut repo = RepoName::parse(name).ok_or_else(|| RouteError::NameInvalid(name.into()))?;
    if registries[registry].library_prefix {
        repo = repo
            .with_library_prefix()
            .ok_or_else(|| RouteError::NameInvalid(name.into()))?;
    }
    let target = match target {
        RawTarget::Manifest(r) => Target::Manifest {
            repo,
            reference: parse_reference(r)?,
        },
        RawTarget::Blob(d) => Target::Blob {
            repo,
            digest: parse_digest(d)?,
        },
        RawTarget::Referrers(d) => Target::Referrers {
            repo,
            digest: parse_digest(d)?,
        },
        RawTarget::TagsList => Target::TagsList {
            repo,
            query: query.and_then(tags_query),
        },
    };
    Ok(Route {
        registry: Some(registry),
        namespace,
        prefixed,
        target,
        head,
    })
}

enum RawTarget<'a> {
    Manifest(&'a str),
    Blob(&'a str),
    Referrers(&'a str),
    TagsList,
}

/// Splits `<name>/<kind>/<ref>` from the end, since names may contain slashes.
fn split_target<'a>(rest: &'a str, path: &str) -> Result<(&'a str, RawTarget<'a>), RouteError> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok((name, RawTarget::TagsList));
    }
    let not_found = || RouteError::NotFound(path.to_string());
    let (head, reference) = rest.rsplit_once('/').ok_or_else(not_found)?;
    let (name, kind) = head.rsplit_once('/').ok_or_else(not_found)?;
    let target = match kind {
        "manifests" => RawTarget::Manifest(reference),
        "blobs" => RawTarget::Blob(reference),
        "referrers" => RawTarget::Referrers(reference),
        _ => return Err(not_found()),
    };
    Ok((name, target))
}

/// The registry, the name within it, and whether a path prefix named the registry.
fn pick_registry<'a>(
    namespace: Option<&str>,
    name: &'a str,
    registries: &[RegistryName],
) -> Result<(usize, &'a str, bool), RouteError> {
    if let Some(ns) = namespace {
        let index = registries
            .iter()
            .position(|r| r.name == ns)
            .ok_or_else(|| RouteError::UnknownRegistry(ns.to_string()))?;
        return Ok((index, name, false));
    }
    if let Some((first, rest)) = name.split_once('/') {
        if let Some(index) = registries.iter().position(|r| r.name == first) {
            return Ok((index, rest, true));
        }
    }
    let index = registries
        .iter()
        .position(|r| r.is_default)
        .ok_or_else(|| RouteError::NotFound(format!("no default registry serves {name:?}")))?;
    // Docker Hub names never start with a host name (`ghcr.io/...`, `localhost:5000/...`):
    // such a prefix names another registry, one this mirror does not serve.
    if let Some((first, _)) = name.split_once('/') {
        let host = crate::oci::names_registry_host(first) && crate::oci::is_host_name(first);
        if host && registries[index].library_prefix {
            return Err(RouteError::UnknownRegistry(first.to_string()));
        }
    }
    Ok((index, name, false))
}

fn parse_reference(raw: &str) -> Result<Reference, RouteError> {
    if raw.contains(':') || raw.contains("%3A") || raw.contains("%3a") {
        return parse_digest(raw).map(Reference::Digest);
    }
    Tag::parse(raw)
        .map(Reference::Tag)
        .ok_or_else(|| RouteError::ReferenceInvalid(raw.to_string()))
}

fn parse_digest(raw: &str) -> Result<Digest, RouteError> {
    let decoded = raw.replace("%3A", ":").replace("%3a", ":");
    decoded.parse().map_err(|e: crate::digest::DigestError| {
        RouteError::DigestInvalid(raw.into(), e.to_string())
    })
}

/// The first value of `key` in a query string, percent-decoded: containerd encodes its query
/// (`ns=registry.lan%3A5000` for a registry with a port). `None` when absent, empty, or not
/// UTF-8 once decoded.
fn query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key && !v.is_empty())
            .then(|| percent_decode(v))
            .flatten()
    })
}

/// `%XX` escapes decoded; anything else (a `%` without two hex digits too) kept as it is.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).ok()
}

/// Keeps only the pagination parameters of a `tags/list` query, for passing upstream.
fn tags_query(query: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| pair.starts_with("n=") || pair.starts_with("last="))
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registries() -> Vec<RegistryName> {
        vec![
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
            RegistryName {
                name: "registry.lan:5000".into(),
                is_default: false,
                library_prefix: false,
            },
        ]
    }

    fn get(path: &str, query: Option<&str>) -> Result<Route, RouteError> {
        route(&Method::GET, path, query, &registries())
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(query_value("ns=a%3Ab%3a1", "ns").as_deref(), Some("a:b:1"));
        assert_eq!(query_value("x=1&ns=%zz%4", "ns").as_deref(), Some("%zz%4"));
        assert_eq!(query_value("ns=%2B1%+1", "ns").as_deref(), Some("+1%+1"));
        assert_eq!(query_value("ns=%FF", "ns"), None);
        assert_eq!(query_value("ns=", "ns"), None);
    }

    #[test]
    fn routes_table() {
        let cases: &[(&str, Option<&str>, usize, &str, &str)] = &[
            (
                "/v2/alpine/manifests/3.20",
                None,
                0,
                "library/alpine",
                "manifest",
            ),
            (
                "/v2/library/alpine/manifests/latest",
                None,
                0,
                "library/alpine",
                "manifest",
            ),
            ("/v2/a/b/c/blobs/D", None, 0, "a/b/c", "blob"),
            (
                "/v2/ghcr.io/owner/app/manifests/1.0",
                None,
                1,
                "owner/app",
                "manifest",
            ),
            (
                "/v2/owner/app/manifests/1.0",
                Some("ns=ghcr.io"),
                1,
                "owner/app",
                "manifest",
            ),
            (
                "/v2/alpine/manifests/1",
                Some("ns=docker.io"),
                0,
                "library/alpine",
                "manifest",
            ),
            // containerd encodes the query: a registry with a port arrives escaped.
            (
                "/v2/team/app/manifests/1",
                Some("ns=registry.lan%3A5000"),
                2,
                "team/app",
                "manifest",
            ),
            (
                "/v2/team/app/blobs/D",
                Some("ns=registry.lan:5000"),
                2,
                "team/app",
                "blob",
            ),
            ("/v2/org/blobs/x/tags/list", None, 0, "org/blobs/x", "tags"),
            (
                "/v2/org/manifests/blobs/D",
                None,
                0,
                "org/manifests",
                "blob",
            ),
            ("/v2/org/app/referrers/D", None, 0, "org/app", "referrers"),
        ];
        for (path, query, registry, repo, kind) in cases {
            let path = path.replace("/D", &format!("/{D}"));
            let r = get(&path, *query).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert_eq!(r.registry, Some(*registry), "{path}");
            assert_eq!(r.kind(), *kind, "{path}");
            let name = match &r.target {
                Target::Manifest { repo, .. }
                | Target::Blob { repo, .. }
                | Target::TagsList { repo, .. }
                | Target::Referrers { repo, .. } => repo.as_str().to_string(),
                _ => String::new(),
            };
            assert_eq!(name, *repo, "{path}");
        }
    }

    #[test]
    fn references_are_typed() {
        let r = get(&format!("/v2/alpine/manifests/{D}"), None).unwrap();
        assert!(matches!(
            r.target,
            Target::Manifest {
                reference: Reference::Digest(_),
                ..
            }
        ));
        let r = get("/v2/alpine/manifests/3.20", None).unwrap();
        assert!(matches!(
            r.target,
            Target::Manifest {
                reference: Reference::Tag(_),
                ..
            }
        ));
    }

    #[test]
    fn bad_input_gets_typed_errors() {
        assert!(matches!(
            get("/v2/Alpine/manifests/1", None),
            Err(RouteError::NameInvalid(_))
        ));
        assert!(matches!(
            get("/v2/alpine/manifests/-x", None),
            Err(RouteError::ReferenceInvalid(_))
        ));
        assert!(matches!(
            get("/v2/alpine/blobs/sha256:zz", None),
            Err(RouteError::DigestInvalid(..))
        ));
        assert!(matches!(
            get("/v2/alpine/blobs/../../etc/passwd", None),
            Err(RouteError::NotFound(_)
                | RouteError::DigestInvalid(..)
                | RouteError::NameInvalid(_))
        ));
        assert!(matches!(
            get("/v2/a/manifests/1", Some("ns=quay.io")),
            Err(RouteError::UnknownRegistry(_))
        ));
        assert!(matches!(
            get("/v2/quay.io/org/app/manifests/1", None),
            Err(RouteError::UnknownRegistry(_))
        ));
        assert!(matches!(
            get("/v2/alpine/other/x", None),
            Err(RouteError::NotFound(_))
        ));
        assert!(matches!(get("/v3/", None), Err(RouteError::NotFound(_))));
        let put = route(&Method::PUT, "/v2/a/manifests/1", None, &registries());
        assert!(matches!(put, Err(RouteError::Unsupported(_))));
    }

    #[test]
    fn base_and_catalog_and_health() {
        assert_eq!(get("/v2/", None).unwrap().target, Target::ApiBase);
        assert_eq!(get("/v2", None).unwrap().target, Target::ApiBase);
        assert_eq!(get("/v2/_catalog", None).unwrap().target, Target::Catalog);
        assert_eq!(get("/healthz", None).unwrap().target, Target::Healthz);
    }

    #[test]
    fn tags_list_keeps_pagination_only() {
        let r = get("/v2/alpine/tags/list", Some("n=10&ns=docker.io&last=b")).unwrap();
        assert_eq!(
            r.target,
            Target::TagsList {
                repo: RepoName::parse("library/alpine").unwrap(),
                query: Some("n=10&last=b".into())
            }
        );
        assert_eq!(r.namespace.as_deref(), Some("docker.io"));
    }
}
