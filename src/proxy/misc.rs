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

pub fn text(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body::full(text))
        .expect("static headers are valid")
}

/// The HTML status page; the images it names are those `visible(registry, repo)` allows.
pub fn status_page(
    app: &App,
    head: bool,
    visible: impl Fn(&str, &str) -> bool,
) -> Response<ResponseBody> {
    let html = crate::status::render(app, visible);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CONTENT_LENGTH, html.len())
        .body(body_unless_head(html.into(), head))
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
        text(StatusCode::OK, "ready\n")
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

/// `tags/list` from the upstreams trusted with tags, kept for the tag TTL; from the tags the
/// cache knows when upstream cannot be asked.
pub async fn tags_list(
    app: &App,
    registry: usize,
    repo: &RepoName,
    query: Option<&str>,
    head: bool,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let upstream = app.upstream(registry);
    let key = format!("tags {} {} {}", upstream.name, repo, query.unwrap_or(""));
    let load = async {
        let answer = upstream
            .fetch(&UpstreamRequest::tags_list(repo, query))
            .await?;
        listing(answer).await
    };
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
            if let Some(link) = found
                .link
                .and_then(|l| http::HeaderValue::from_str(&l).ok())
            {
                response.headers_mut().insert(header::LINK, link);
            }
            Ok(response)
        }
        Err(e) => cached_tags(app, &upstream.name, repo, e, head, outcome).await,
    }
}

/// Reads a small listing answer (or remembers that there is none).
async fn listing(answer: Answer) -> Result<Listing, Error> {
    if answer.status() == StatusCode::NOT_FOUND {
        return Ok(Listing::default());
    }
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
    let load = async {
        let answer = upstream
            .fetch(&UpstreamRequest::referrers(repo, digest, &accept))
            .await?;
        listing(answer).await
    };
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
