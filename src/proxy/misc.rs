//! The small endpoints: API base, health, readiness, catalog, `tags/list` and referrers.

use super::{body_unless_head, Outcome};
use crate::app::App;
use crate::body::{self, ResponseBody};
use crate::cache::blocking;
use crate::cache::Listing;
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::oci::{self, RepoName};
use crate::upstream::{Answer, UpstreamRequest};
use http::{header, Response, StatusCode};
use std::sync::Arc;

/// Largest `tags/list` or referrers answer passed on from upstream.
const MAX_LISTING_BYTES: usize = 4 * 1024 * 1024;

pub fn json(status: StatusCode, text: String, head: bool) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, text.len())
        .body(body_unless_head(text.into(), head))
        .expect("static headers are valid")
}

pub fn text(status: StatusCode, text: impl Into<bytes::Bytes>) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body::full(text))
        .expect("static headers are valid")
}

/// The Prometheus text format.
pub fn metrics(app: &App) -> Response<ResponseBody> {
    let text = app.render_metrics();
    Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .header(header::CONTENT_LENGTH, text.len())
        .body(body::full(text))
        .expect("static headers are valid")
}

/// Ready when the store accepts writes.
pub fn readiness(app: &App) -> Response<ResponseBody> {
    if app.cache().store().is_writable() {
        // A shared store or peers that are down degrade the replica to a single node: still
        // ready.
        let mut degraded = Vec::new();
        if let Some(shared) = app.shared().filter(|shared| !shared.is_up()) {
            degraded.push(format!(
                "the shared store {} is down: serving from local disk and upstream",
                shared.label()
            ));
        }
        if let Some(cluster) = app.cluster() {
            let down: Vec<String> = cluster
                .peers()
                .into_iter()
                .filter_map(|(peer, _, up)| (!up).then_some(peer))
                .collect();
            if !down.is_empty() {
                degraded.push(format!(
                    "peers down: {}: their blobs come from the next owner or upstream",
                    down.join(", ")
                ));
            }
        }
        if degraded.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::OK, format!("ready ({})\n", degraded.join("; ")))
        }
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "cache directory is not writable\n",
        )
    }
}

/// Repositories with a tag in the cache (bare for the default registry, else prefixed).
/// `/v2/_catalog`: the repositories the cache holds that `visible(registry, repo)` allows.
pub async fn catalog(
    app: &App,
    head: bool,
    visible: impl Fn(&str, &str) -> bool,
) -> Result<Response<ResponseBody>, Error> {
    let store = Arc::clone(app.cache().store());
    let mut found = blocking(move || store.repositories()).await?;
    found.retain(|(registry, repo)| visible(registry, repo));
    let default = app
        .routes()
        .iter()
        .find(|r| r.is_default)
        .map(|r| r.name.clone());
    let names: Vec<String> = found
        .into_iter()
        .map(|(registry, repo)| {
            if Some(&registry) == default.as_ref() {
                repo
            } else {
                format!("{registry}/{repo}")
            }
        })
        .collect();
    let text = serde_json::json!({ "repositories": names }).to_string();
    Ok(json(StatusCode::OK, text, head))
}

/// How a client named the registry of a request, so that links handed back to it lead to the
/// same registry through the mirror.
pub struct Addressed<'a> {
    pub registry: &'a str,
    /// By containerd's `?ns=`.
    pub namespace: bool,
    /// By a path prefix (`/v2/ghcr.io/...`).
    pub prefixed: bool,
}

/// `tags/list` from the upstreams trusted with tags, kept for the tag TTL; from the tags the
/// cache knows when upstream cannot be asked (an outage or a rate limit). Upstream's
/// pagination `Link` is rewritten to the mirror's own path for the registry, or dropped.
pub async fn tags_list(
    app: &App,
    registry: usize,
    repo: &RepoName,
    query: Option<&str>,
    addressed: &Addressed<'_>,
    head: bool,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let upstream = app.upstream(registry);
    let key = format!("tags {} {} {}", upstream.name, repo, query.unwrap_or(""));
    let load = listing(upstream, UpstreamRequest::tags_list(repo, query));
    *outcome = Outcome::Hit;
    match app.cache().listing(key, load).await {
        Ok(found) if !found.found => Err(Error::coded(
            Code::NameUnknown,
            format!("repository {repo} not found upstream"),
        )),
        Ok(found) => {
            let mut response = json(
                StatusCode::OK,
                String::from_utf8_lossy(&found.body).into_owned(),
                head,
            );
            let link = found
                .link
                .as_deref()
                .and_then(|l| mirror_link(l, repo, addressed))
                .and_then(|l| http::HeaderValue::from_str(&l).ok());
            if let Some(link) = link {
                response.headers_mut().insert(header::LINK, link);
            }
            Ok(response)
        }
        Err(e) if e.serves_stale() => {
            cached_tags(app, &upstream.name, repo, e, head, outcome).await
        }
        Err(e) => Err(e),
    }
}

/// Upstream's `Link: </v2/<repo>/tags/list?n=..&last=..>; rel="next"` as the mirror's own
/// link for the same page; `None` when it names anything else (another repository, another
/// path), so a client never follows a link to upstream or to another registry.
pub fn mirror_link(link: &str, repo: &RepoName, addressed: &Addressed<'_>) -> Option<String> {
    // The link-value whose relation is `next` (a header may list `prev` too).
    let target = link.split('<').skip(1).find_map(|value| {
        let (target, params) = value.split_once('>')?;
        let is_next = params.split(';').any(|param| {
            let param = param.trim().trim_end_matches(',').trim();
            param
                .strip_prefix("rel=")
                .is_some_and(|r| r.trim_matches('"').split_whitespace().any(|r| r == "next"))
        });
        is_next.then_some(target)
    })?;
    // An absolute link: only its path and query matter.
    let path_and_query = match target.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => target,
    };
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    if path != format!("/v2/{repo}/tags/list") {
        return None;
    }
    let safe = |c: char| c.is_ascii_alphanumeric() || "-._~%".contains(c);
    let mut kept: Vec<String> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, v)| matches!(*k, "n" | "last") && v.chars().all(safe))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if addressed.namespace {
        kept.push(format!("ns={}", addressed.registry));
    }
    let prefix = if addressed.prefixed && !addressed.namespace {
        format!("{}/", addressed.registry)
    } else {
        String::new()
    };
    let query = kept.join("&");
    Some(format!(
        "</v2/{prefix}{repo}/tags/list?{query}>; rel=\"next\""
    ))
}

/// Loads a small listing (or remembers that upstream has none: a 404).
async fn listing(
    upstream: &crate::upstream::RegistryUpstream,
    request: UpstreamRequest,
) -> Result<Listing, Error> {
    // The body is read as part of each endpoint's try: one that stalls or sends too much
    // fails over like one that does not answer.
    let read = |answer: Answer| async move {
        let link = answer
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = answer.bytes(MAX_LISTING_BYTES).await?;
        Ok(Listing {
            body,
            link,
            found: true,
        })
    };
    match upstream.fetch_with(&request, read).await {
        Ok(listing) => Ok(listing),
        Err(e) if e.is_not_found() => Ok(Listing::default()),
        Err(e) => Err(e.into()),
    }
}

async fn cached_tags(
    app: &App,
    registry: &str,
    repo: &RepoName,
    error: Error,
    head: bool,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let store = Arc::clone(app.cache().store());
    let (registry, name) = (registry.to_string(), repo.clone());
    let tags = blocking(move || store.tags(&registry, &name)).await?;
    if tags.is_empty() {
        return Err(error);
    }
    *outcome = Outcome::Stale;
    let text = serde_json::json!({ "name": repo.as_str(), "tags": tags }).to_string();
    let mut response = json(StatusCode::OK, text, head);
    let warning = r#"299 - "regmirror: upstream unreachable; tags known to the cache""#;
    response
        .headers_mut()
        .insert(header::WARNING, http::HeaderValue::from_static(warning));
    Ok(response)
}

/// The referrers API, passed through and kept for the tag TTL. Where upstream lacks the API
/// (Docker Hub, distribution), its 404 is passed on too: that is what tells clients to look
/// for the `sha256-<hex>` tag schema instead, where such registries keep signatures.
pub async fn referrers(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    head: bool,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let upstream = app.upstream(registry);
    let key = format!("referrers {} {} {}", upstream.name, repo, digest);
    let accept = [oci::OCI_INDEX.to_string()];
    let load = listing(upstream, UpstreamRequest::referrers(repo, digest, &accept));
    *outcome = Outcome::Hit;
    let found = app.cache().listing(key, load).await?;
    if !found.found {
        return Err(Error::coded(
            Code::ManifestUnknown,
            format!("no referrers API upstream for {repo}"),
        ));
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, oci::OCI_INDEX)
        .header(header::CONTENT_LENGTH, found.body.len())
        .body(body_unless_head(found.body, head))
        .expect("static headers are valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_links_stay_on_the_mirror_for_the_same_registry() {
        let repo = RepoName::parse("owner/app").unwrap();
        let next = r#"</v2/owner/app/tags/list?last=1.2&n=2>; rel="next""#;
        let bare = Addressed {
            registry: "docker.io",
            namespace: false,
            prefixed: false,
        };
        let prefixed = Addressed {
            registry: "ghcr.io",
            namespace: false,
            prefixed: true,
        };
        let by_ns = Addressed {
            registry: "registry.lan:5000",
            namespace: true,
            prefixed: false,
        };
        let cases = [
            (
                next,
                &bare,
                Some(r#"</v2/owner/app/tags/list?last=1.2&n=2>; rel="next""#),
            ),
            (
                next,
                &prefixed,
                Some(r#"</v2/ghcr.io/owner/app/tags/list?last=1.2&n=2>; rel="next""#),
            ),
            (
                next,
                &by_ns,
                Some(r#"</v2/owner/app/tags/list?last=1.2&n=2&ns=registry.lan:5000>; rel="next""#),
            ),
            // Absolute: upstream's host goes.
            (
                r#"<https://ghcr.io/v2/owner/app/tags/list?n=2&last=b>; rel="next""#,
                &prefixed,
                Some(r#"</v2/ghcr.io/owner/app/tags/list?n=2&last=b>; rel="next""#),
            ),
            // Anything but the same listing's next page is dropped.
            (r#"</v2/other/app/tags/list?n=2>; rel="next""#, &bare, None),
            (r#"<https://evil.example/steal>; rel="next""#, &bare, None),
            (r#"</v2/owner/app/tags/list?n=2>; rel="prev""#, &bare, None),
            (
                r#"</v2/owner/app/tags/list?n=2&last=a"b>; rel="next""#,
                &bare,
                Some(r#"</v2/owner/app/tags/list?n=2>; rel="next""#),
            ),
            ("garbage", &bare, None),
            (
                r#"</v2/owner/app/tags/list?n=2&last=a>; rel="prev", </v2/owner/app/tags/list?n=2&last=e>; rel="next""#,
                &bare,
                Some(r#"</v2/owner/app/tags/list?n=2&last=e>; rel="next""#),
            ),
        ];
        for (link, addressed, expected) in cases {
            assert_eq!(
                mirror_link(link, &repo, addressed).as_deref(),
                expected,
                "{link}"
            );
        }
    }
}
