//! `/browse`: what the cache holds, registry by registry. Without parameters, the registries;
//! with `registry`, its repositories; with `registry` and `repo`, the repository's tags, each
//! with the digest it resolves to, when upstream last confirmed it, its platforms and size, its
//! pulls and whether it is pinned. Lists are filtered (`filter`, a substring), sorted (`sort`:
//! `pulled`, the default, most recently pulled first; or `name`) and paginated (`page`,
//! [`PAGE_SIZE`] rows each). Only repositories `visible(registry, repo)` allows are listed or
//! shown: another is answered as if it were not cached.

use super::popularity::{image_key, Pulls};
use super::{ago, escape, Query};
use crate::app::App;
use crate::cache::blocking;
use crate::cache::store::Store;
use crate::config::format_byte_size;
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::oci::{self, RepoName, Tag};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;
use std::io::Read;
use std::sync::Arc;

/// Rows per page.
pub const PAGE_SIZE: usize = 50;
/// The largest image config read to find its platform.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

#[derive(Serialize)]
#[serde(tag = "level", rename_all = "snake_case")]
pub enum Browse {
    Registries { registries: Vec<RegistryRow> },
    Repositories(Listing<RepositoryRow>),
    Tags(Listing<TagRow>),
}

/// One page of a filtered, sorted list.
#[derive(Serialize)]
pub struct Listing<T> {
    pub registry: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    pub filter: Option<String>,
    pub sort: &'static str,
    pub page: usize,
    pub pages: usize,
    /// Rows that pass the filter, on every page.
    pub total: usize,
    pub rows: Vec<T>,
}

#[derive(Serialize)]
pub struct RegistryRow {
    pub registry: String,
    pub repositories: usize,
    pub pulls: u64,
    pub last_pull: u64,
}

#[derive(Serialize)]
pub struct RepositoryRow {
    pub repository: String,
    pub tags: usize,
    /// Pulls by tag since start-up.
    pub pulls: u64,
    /// Unix seconds; 0: not since start-up.
    pub last_pull: u64,
}

#[derive(Serialize)]
pub struct TagRow {
    pub tag: String,
    pub digest: String,
    pub media_type: String,
    /// Unix seconds when upstream last confirmed the tag.
    pub confirmed_at: u64,
    /// `os/arch[/variant]`: an index's platforms, or an image's own when its config is cached.
    pub platforms: Vec<String>,
    /// Config and layers as the manifests declare them (of an index: its platforms whose
    /// manifests are cached).
    pub bytes: u64,
    pub pulls: u64,
    pub last_pull: u64,
    pub pinned: bool,
}

fn not_cached() -> Error {
    Error::coded(Code::NameUnknown, "no such repository in the cache")
}

pub async fn build(
    app: &App,
    query: &Query,
    visible: &impl Fn(&str, &str) -> bool,
) -> Result<Browse, Error> {
    let store = Arc::clone(app.cache().store());
    let mut found = blocking(move || store.repositories()).await?;
    found.retain(|(registry, repo)| visible(registry, repo));
    let pulls = app.console().popularity().per_repository();
    let pulled = |registry: &str, repo: &str| {
        pulls
            .get(&(registry.to_string(), repo.to_string()))
            .copied()
            .unwrap_or_default()
    };
    let Some(registry) = query.get("registry") else {
        let mut registries = BTreeMap::<String, RegistryRow>::new();
        for route in app.routes() {
            registries.insert(route.name.clone(), row(&route.name));
        }
        for (registry, repo) in &found {
            let entry = registries
                .entry(registry.clone())
                .or_insert_with(|| row(registry));
            let p = pulled(registry, repo);
            entry.repositories += 1;
            entry.pulls += p.count;
            entry.last_pull = entry.last_pull.max(p.last);
        }
        return Ok(Browse::Registries {
            registries: registries.into_values().collect(),
        });
    };
    let by_name = query.get("sort") == Some("name");
    let sort = if by_name { "name" } else { "pulled" };
    let filter = query.get("filter").map(str::to_string);
    let page = query
        .get("page")
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let Some(repo) = query.get("repo") else {
        let mut repos: Vec<(String, Pulls)> = found
            .into_iter()
            .filter(|(r, name)| r == registry && matches(filter.as_deref(), name))
            .map(|(r, name)| {
                let p = pulled(&r, &name);
                (name, p)
            })
            .collect();
        if !by_name {
            repos.sort_by(|a, b| b.1.last.cmp(&a.1.last).then_with(|| a.0.cmp(&b.0)));
        }
        let (total, pages, shown) = paginate(repos, page);
        let store = Arc::clone(app.cache().store());
        let registry_name = registry.to_string();
        let rows = blocking(move || {
            let rows = shown
                .into_iter()
                .map(|(repository, p)| RepositoryRow {
                    tags: RepoName::parse(&repository)
                        .and_then(|name| store.tags(&registry_name, &name).ok())
                        .map_or(0, |tags| tags.len()),
                    repository,
                    pulls: p.count,
                    last_pull: p.last,
                })
                .collect();
            Ok::<_, std::io::Error>(rows)
        })
        .await?;
        return Ok(Browse::Repositories(Listing {
            registry: registry.to_string(),
            repository: None,
            filter,
            sort,
            page: page.min(pages),
            pages,
            total,
            rows,
        }));
    };
    if !found.iter().any(|(r, name)| r == registry && name == repo) {
        return Err(not_cached());
    }
    let name = RepoName::parse(repo).ok_or_else(not_cached)?;
    let (store, lifecycle) = (
        Arc::clone(app.cache().store()),
        Arc::clone(app.cache().lifecycle()),
    );
    let registry_name = registry.to_string();
    let tags = blocking({
        let name = name.clone();
        move || store.tags(&registry_name, &name)
    })
    .await?;
    let popularity = app.console().popularity();
    let mut tags: Vec<(String, Pulls)> = tags
        .into_iter()
        .filter(|tag| matches(filter.as_deref(), tag))
        .map(|tag| {
            let p = popularity.of(&image_key(registry, repo, &tag));
            (tag, p)
        })
        .collect();
    if !by_name {
        tags.sort_by(|a, b| b.1.last.cmp(&a.1.last).then_with(|| a.0.cmp(&b.0)));
    }
    let (total, pages, shown) = paginate(tags, page);
    let store = Arc::clone(app.cache().store());
    let registry_name = registry.to_string();
    let rows = blocking(move || {
        let pinned = lifecycle.pinned();
        let rows = shown
            .into_iter()
            .filter_map(|(tag, p)| tag_row(&store, &registry_name, &name, tag, p, &pinned))
            .collect();
        Ok::<_, std::io::Error>(rows)
    })
    .await?;
    Ok(Browse::Tags(Listing {
        registry: registry.to_string(),
        repository: Some(repo.to_string()),
        filter,
        sort,
        page: page.min(pages),
        pages,
        total,
        rows,
    }))
}

fn row(registry: &str) -> RegistryRow {
    RegistryRow {
        registry: registry.to_string(),
        repositories: 0,
        pulls: 0,
        last_pull: 0,
    }
}

fn matches(filter: Option<&str>, name: &str) -> bool {
    filter.is_none_or(|f| name.to_lowercase().contains(&f.to_lowercase()))
}

/// Rows passing, pages, and the rows of `page` (the last page when past it).
fn paginate<T>(rows: Vec<T>, page: usize) -> (usize, usize, Vec<T>) {
    let total = rows.len();
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let skip = (page.min(pages) - 1) * PAGE_SIZE;
    (
        total,
        pages,
        rows.into_iter().skip(skip).take(PAGE_SIZE).collect(),
    )
}

/// A tag's row, from its record and the manifests and config the store holds.
fn tag_row(
    store: &Store,
    registry: &str,
    repo: &RepoName,
    tag: String,
    pulls: Pulls,
    pinned: &HashSet<Digest>,
) -> Option<TagRow> {
    let record = store.get_tag(registry, repo, &Tag::parse(&tag)?).ok()??;
    let digest: Option<Digest> = record.digest.parse().ok();
    let manifest = digest
        .as_ref()
        .and_then(|d| store.get_manifest(d).ok().flatten())
        .and_then(|(bytes, _)| oci::outline(&bytes));
    let (platforms, bytes) = match manifest {
        Some(outline) if !outline.platforms.is_empty() => {
            let bytes = outline
                .platforms
                .iter()
                .filter_map(|(_, child)| store.get_manifest(child).ok().flatten())
                .filter_map(|(body, _)| oci::outline(&body))
                .map(|child| child.bytes)
                .sum();
            let names = outline
                .platforms
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            (names, bytes)
        }
        Some(outline) => {
            let platform = outline
                .config
                .and_then(|config| image_platform(store, &config));
            (platform.into_iter().collect(), outline.bytes)
        }
        None => (Vec::new(), 0),
    };
    Some(TagRow {
        pinned: digest.as_ref().is_some_and(|d| pinned.contains(d)),
        tag,
        digest: record.digest,
        media_type: record.media_type,
        confirmed_at: record.checked_at,
        platforms,
        bytes,
        pulls: pulls.count,
        last_pull: pulls.last,
    })
}

fn image_platform(store: &Store, config: &Digest) -> Option<String> {
    let (file, size) = store.open_blob(config).ok()??;
    if size > MAX_CONFIG_BYTES {
        return None;
    }
    let mut text = Vec::with_capacity(size as usize);
    file.take(MAX_CONFIG_BYTES).read_to_end(&mut text).ok()?;
    oci::config_platform(&text)
}

/// A link to this page with some parameters changed.
fn link(base: &[(&str, Option<&str>)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in base {
        if let Some(value) = value {
            query.append_pair(name, value);
        }
    }
    format!("/browse?{}", escape(&query.finish()))
}

fn filter_form(
    html: &mut String,
    registry: &str,
    repo: Option<&str>,
    filter: Option<&str>,
    sort: &str,
) {
    let _ = write!(
        html,
        "<form method=\"get\" action=\"/browse\"><input type=\"hidden\" name=\"registry\" value=\"{}\">",
        escape(registry)
    );
    if let Some(repo) = repo {
        let _ = write!(
            html,
            "<input type=\"hidden\" name=\"repo\" value=\"{}\">",
            escape(repo)
        );
    }
    let _ = write!(
        html,
        "<input type=\"search\" name=\"filter\" placeholder=\"filter\" value=\"{}\"> \
         <select name=\"sort\"><option value=\"pulled\"{}>most recently pulled</option><option value=\"name\"{}>name</option></select> \
         <button type=\"submit\">Show</button></form>",
        escape(filter.unwrap_or("")),
        if sort == "pulled" { " selected" } else { "" },
        if sort == "name" { " selected" } else { "" },
    );
}

fn pager<T>(html: &mut String, listing: &Listing<T>) {
    let page = |n: usize| n.to_string();
    let params = |n: usize| {
        let p = page(n);
        link(&[
            ("registry", Some(&listing.registry)),
            ("repo", listing.repository.as_deref()),
            ("filter", listing.filter.as_deref()),
            ("sort", Some(listing.sort)),
            ("page", Some(&p)),
        ])
    };
    let _ = write!(
        html,
        "<nav class=\"pages\"><span id=\"page\">page {} of {}</span> · {} in all ",
        listing.page, listing.pages, listing.total
    );
    if listing.page > 1 {
        let _ = write!(
            html,
            "<a href=\"{}\" rel=\"prev\">previous</a>",
            params(listing.page - 1)
        );
    }
    if listing.page < listing.pages {
        let _ = write!(
            html,
            "<a href=\"{}\" rel=\"next\">next</a>",
            params(listing.page + 1)
        );
    }
    html.push_str("</nav>");
}

pub fn html(view: &Browse) -> String {
    let mut html = String::with_capacity(16 * 1024);
    match view {
        Browse::Registries { registries } => {
            html.push_str("<h2>Registries</h2><table id=\"registries\"><tr><th>registry</th><th class=\"num\">repositories</th><th class=\"num\">pulls</th><th>last pull</th></tr>");
            for r in registries {
                let _ = write!(
                    html,
                    "<tr><td><a href=\"{}\">{}</a></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    link(&[("registry", Some(&r.registry))]),
                    escape(&r.registry),
                    r.repositories,
                    r.pulls,
                    ago(r.last_pull)
                );
            }
            html.push_str(
                "</table><p class=\"muted\">Pulls are counted by tag since start-up.</p>",
            );
        }
        Browse::Repositories(listing) => {
            let _ = write!(
                html,
                "<h2><a href=\"/browse\">Registries</a> / {}</h2>",
                escape(&listing.registry)
            );
            filter_form(
                &mut html,
                &listing.registry,
                None,
                listing.filter.as_deref(),
                listing.sort,
            );
            html.push_str("<table id=\"repositories\"><tr><th>repository</th><th class=\"num\">tags</th><th class=\"num\">pulls</th><th>last pull</th></tr>");
            for r in &listing.rows {
                let _ = write!(
                    html,
                    "<tr><td><a href=\"{}\">{}</a></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    link(&[("registry", Some(&listing.registry)), ("repo", Some(&r.repository))]),
                    escape(&r.repository),
                    r.tags,
                    r.pulls,
                    ago(r.last_pull)
                );
            }
            html.push_str("</table>");
            pager(&mut html, listing);
        }
        Browse::Tags(listing) => {
            let repo = listing.repository.as_deref().unwrap_or("");
            let _ = write!(
                html,
                "<h2><a href=\"/browse\">Registries</a> / <a href=\"{}\">{}</a> / {}</h2>",
                link(&[("registry", Some(&listing.registry))]),
                escape(&listing.registry),
                escape(repo)
            );
            filter_form(
                &mut html,
                &listing.registry,
                Some(repo),
                listing.filter.as_deref(),
                listing.sort,
            );
            html.push_str("<table id=\"tags\"><tr><th>tag</th><th>digest</th><th>confirmed</th><th>platforms</th><th class=\"num\">size</th><th class=\"num\">pulls</th><th>last pull</th><th>pinned</th></tr>");
            for t in &listing.rows {
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td><code title=\"{}\">{}…</code></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&t.tag),
                    escape(&t.digest),
                    escape(&t.digest[..t.digest.len().min(19)]),
                    ago(t.confirmed_at),
                    escape(&t.platforms.join(", ")),
                    format_byte_size(t.bytes),
                    t.pulls,
                    ago(t.last_pull),
                    if t.pinned { "pinned" } else { "" }
                );
            }
            html.push_str("</table>");
            pager(&mut html, listing);
        }
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_hold_page_size_rows_and_past_the_end_is_the_last() {
        let rows: Vec<usize> = (0..120).collect();
        let (total, pages, shown) = paginate(rows.clone(), 3);
        assert_eq!((total, pages, shown.len(), shown[0]), (120, 3, 20, 100));
        let (_, _, shown) = paginate(rows, 9);
        assert_eq!(shown[0], 100);
        let (total, pages, shown) = paginate(Vec::<usize>::new(), 1);
        assert_eq!((total, pages, shown.len()), (0, 1, 0));
        assert!(matches(Some("PINE"), "library/alpine"));
        assert!(!matches(Some("x"), "library/alpine"));
    }

    #[test]
    fn links_are_encoded_and_escaped() {
        assert_eq!(
            link(&[
                ("registry", Some("docker.io")),
                ("repo", Some("a/b&c")),
                ("page", None)
            ]),
            "/browse?registry=docker.io&amp;repo=a%2Fb%26c"
        );
    }
}
