//! The small endpoints: API base, health, readiness, catalog, `tags/list` and referrers.

use super::{body_unless_head, Outcome};
use crate::app::App;
use crate::body::{self, ResponseBody};
use crate::cache::blocking;
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::oci::{self, RepoName};
use crate::upstream::UpstreamError;
use http::{header, Method, Response, StatusCode};
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
pub async fn catalog(app: &App, head: bool) -> Result<Response<ResponseBody>, Error> {
    let store = Arc::clone(app.cache().store());
    let found = blocking(move || store.repositories()).await?;
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

/// `tags/list` from upstream; from the tags the cache knows when upstream cannot be asked.
pub async fn tags_list(
    app: &App,
    registry: usize,
    repo: &RepoName,
    query: Option<&str>,
    head: bool,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let rest = match query {
        Some(q) => format!("tags/list?{q}"),
        None => "tags/list".to_string(),
    };
    let upstream = app.upstream(registry);
    match upstream.fetch(Method::GET, repo, &rest, &[]).await {
        Ok(answer) if answer.status() == StatusCode::NOT_FOUND => Err(Error::coded(
            Code::NameUnknown,
            format!("repository {repo} not found upstream"),
        )),
        Ok(answer) => {
            *outcome = Outcome::Bypass;
            let link = answer.headers().get(header::LINK).cloned();
            let bytes = answer.bytes(MAX_LISTING_BYTES).await?;
            let mut response = json(
                StatusCode::OK,
                String::from_utf8_lossy(&bytes).into_owned(),
                head,
            );
            if let Some(link) = link {
                response.headers_mut().insert(header::LINK, link);
            }
            Ok(response)
        }
        Err(e) => cached_tags(app, &upstream.name, repo, e, head, outcome).await,
    }
}

async fn cached_tags(
    app: &App,
    registry: &str,
    repo: &RepoName,
    error: UpstreamError,
    head: bool,
    outcome: &mut Outcome,
) -> Result<Response<ResponseBody>, Error> {
    let store = Arc::clone(app.cache().store());
    let (registry, name) = (registry.to_string(), repo.clone());
    let tags = blocking(move || store.tags(&registry, &name)).await?;
    if tags.is_empty() {
        return Err(error.into());
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

/// The referrers API, passed through (a 404 tells clients to use the tag schema instead).
pub async fn referrers(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    head: bool,
) -> Result<Response<ResponseBody>, Error> {
    let answer = app
        .upstream(registry)
        .fetch(
            Method::GET,
            repo,
            &format!("referrers/{digest}"),
            &[oci::OCI_INDEX.to_string()],
        )
        .await?;
    if answer.status() == StatusCode::NOT_FOUND {
        return Err(Error::coded(
            Code::ManifestUnknown,
            format!("no referrers API upstream for {repo}"),
        ));
    }
    let bytes = answer.bytes(MAX_LISTING_BYTES).await?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, oci::OCI_INDEX)
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(body_unless_head(bytes, head))
        .expect("static headers are valid"))
}
