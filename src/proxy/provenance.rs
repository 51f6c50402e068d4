//! Content is stored once by digest, but access rules are per repository. With `[auth]` on, a
//! stored blob or manifest is served for a repository only if upstream served it for that
//! repository before (a link in the store), or says now, to a HEAD, that the repository has it.
//! Without this, a client allowed one repository could read content pulled through another by
//! naming its digest.

use super::manifest::canonical_accept;
use crate::app::App;
use crate::digest::Digest;
use crate::error::Error;
use crate::oci::{Reference, RepoName};
use crate::upstream::UpstreamRequest;
use http::Method;

/// What kind of content is asked for.
#[derive(Clone, Copy, Debug)]
pub enum Content {
    Blob,
    Manifest,
}

/// Succeeds when `registry/repo` may be served `digest` from the store.
pub async fn confirm(
    app: &App,
    registry: usize,
    repo: &RepoName,
    digest: &Digest,
    content: Content,
) -> Result<(), Error> {
    if app.access().is_none() {
        return Ok(());
    }
    let name = &app.routes()[registry].name;
    if app.cache().is_linked(name, repo, digest).await {
        return Ok(());
    }
    let accept = canonical_accept();
    let reference = Reference::Digest(digest.clone());
    // Only endpoints trusted with tags say what a repository holds: a public mirror that
    // answers by digest alone would attribute any repository's content to this one.
    let request = match content {
        Content::Blob => UpstreamRequest::blob(Method::HEAD, repo, digest),
        Content::Manifest => UpstreamRequest::manifest(Method::HEAD, repo, &reference, &accept),
    }
    .trusted_only();
    app.upstream(registry).fetch(&request).await?;
    app.cache().link(name, repo, vec![digest.clone()]).await;
    Ok(())
}
