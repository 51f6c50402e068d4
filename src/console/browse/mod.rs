//! `/browse`: what the cache holds, registry by registry. Without parameters, the registries;
//! with `registry`, its repositories; with `registry` and `repo`, the repository's tags, each
//! with the digest it resolves to, when upstream last confirmed it, its platforms and size, its
//! pulls and whether it is pinned. Lists are filtered (`filter`, a substring), sorted (`sort`:
//! `pulled`, the default, most recently pulled first; or `name`) and paginated (`page`,
//! [`PAGE_SIZE`] rows each). Only repositories `visible(registry, repo)` allows are listed or
//! shown: another is answered as if it were not cached.
//!
//! The work per page is bounded: [`PAGE_SIZE`] rows, each reading its tag record, its manifest
//! and at most [`MOST_PLATFORMS`] platform manifests, all within [`MANIFEST_BYTES_PER_PAGE`]
//! (sizes are checked before reading; rows past it show no platforms or size).

mod html;

pub use html::html;

use super::popularity::{image_key, Pulls};
use super::Query;
use crate::app::App;
use crate::cache::blocking;
use crate::cache::store::Store;
use crate::digest::Digest;
use crate::error::{Code, Error};
use crate::oci::{self, RepoName, Tag};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::sync::Arc;

/// Rows per page.
pub const PAGE_SIZE: usize = 50;
/// The largest image config read to find its platform.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// Platform manifests of an index read for its size (and platforms named).
pub const MOST_PLATFORMS: usize = 64;
/// Manifest and config bytes one page reads at most.
pub const MANIFEST_BYTES_PER_PAGE: u64 = 16 * 1024 * 1024;
/// The longest platform name shown.
const LONGEST_PLATFORM: usize = 64;

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
    /// manifests are cached); none when the manifests were not read.
    pub bytes: Option<u64>,
    pub pulls: u64,
    pub last_pull: u64,
    pub pinned: bool,
}

fn not_cached() -> Error {
    Error::coded(Code::NameUnknown, "no such repository in the cache")
}

/// What a list page asks for.
struct Params<'a> {
    registry: &'a str,
    /// Lower-cased.
    filter: Option<String>,
    shown_filter: Option<String>,
    by_name: bool,
    page: usize,
}

impl Params<'_> {
    /// Keeps the rows whose name passes the filter, sorts them, and returns how many passed,
    /// the pages, and this page's rows.
    fn page(&self, mut rows: Vec<(String, Pulls)>) -> (usize, usize, Vec<(String, Pulls)>) {
        if let Some(filter) = &self.filter {
            rows.retain(|(name, _)| name.to_lowercase().contains(filter));
        }
        if !self.by_name {
            rows.sort_by(|a, b| b.1.last.cmp(&a.1.last).then_with(|| a.0.cmp(&b.0)));
        }
        paginate(rows, self.page)
    }

    fn listing<T>(
        &self,
        repository: Option<&str>,
        (total, pages): (usize, usize),
        rows: Vec<T>,
    ) -> Listing<T> {
        Listing {
            registry: self.registry.to_string(),
            repository: repository.map(str::to_string),
            filter: self.shown_filter.clone(),
            sort: if self.by_name { "name" } else { "pulled" },
            page: self.page.min(pages),
            pages,
            total,
            rows,
        }
    }
}

pub async fn build(
    app: &App,
    query: &Query,
    visible: &impl Fn(&str, &str) -> bool,
) -> Result<Browse, Error> {
    let Some(registry) = query.get("registry") else {
        return registries(app, visible).await;
    };
    let shown_filter = query.get("filter").map(str::to_string);
    let params = Params {
        registry,
        filter: shown_filter.as_deref().map(str::to_lowercase),
        shown_filter,
        by_name: query.get("sort") == Some("name"),
        page: query
            .get("page")
            .and_then(|p| p.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1),
    };
    match query.get("repo") {
        None => repositories(app, &params, visible).await,
        Some(repo) => tags(app, &params, repo, visible).await,
    }
}

/// Every repository with a tag record that the viewer may see.
async fn visible_repositories(
    app: &App,
    visible: &impl Fn(&str, &str) -> bool,
) -> Result<Vec<(String, String)>, Error> {
    let store = Arc::clone(app.cache().store());
    let mut found = blocking(move || store.repositories()).await?;
    found.retain(|(registry, repo)| visible(registry, repo));
    Ok(found)
}

async fn registries(app: &App, visible: &impl Fn(&str, &str) -> bool) -> Result<Browse, Error> {
    let found = visible_repositories(app, visible).await?;
    let pulls = app.console().popularity().per_repository();
    let row = |registry: &str| RegistryRow {
        registry: registry.to_string(),
        repositories: 0,
        pulls: 0,
        last_pull: 0,
    };
    let mut registries = BTreeMap::<String, RegistryRow>::new();
    for route in app.routes() {
        registries.insert(route.name.clone(), row(&route.name));
    }
    for (registry, repo) in found {
        let p = pulls
            .get(&(registry.clone(), repo))
            .copied()
            .unwrap_or_default();
        let entry = registries
            .entry(registry.clone())
            .or_insert_with(|| row(&registry));
        entry.repositories += 1;
        entry.pulls += p.count;
        entry.last_pull = entry.last_pull.max(p.last);
    }
    Ok(Browse::Registries {
        registries: registries.into_values().collect(),
    })
}

async fn repositories(
    app: &App,
    params: &Params<'_>,
    visible: &impl Fn(&str, &str) -> bool,
) -> Result<Browse, Error> {
    let found = visible_repositories(app, visible).await?;
    let pulls = app.console().popularity().per_repository();
    let repos = found
        .into_iter()
        .filter(|(registry, _)| registry == params.registry)
        .map(|key| {
            let p = pulls.get(&key).copied().unwrap_or_default();
            (key.1, p)
        })
        .collect();
    let (total, pages, shown) = params.page(repos);
    let store = Arc::clone(app.cache().store());
    let registry = params.registry.to_string();
    let rows = blocking(move || {
        let rows = shown
            .into_iter()
            .map(|(repository, p)| RepositoryRow {
                tags: RepoName::parse(&repository)
                    .and_then(|name| store.tags(&registry, &name).ok())
                    .map_or(0, |tags| tags.len()),
                repository,
                pulls: p.count,
                last_pull: p.last,
            })
            .collect();
        Ok::<_, std::io::Error>(rows)
    })
    .await?;
    Ok(Browse::Repositories(params.listing(
        None,
        (total, pages),
        rows,
    )))
}

async fn tags(
    app: &App,
    params: &Params<'_>,
    repo: &str,
    visible: &impl Fn(&str, &str) -> bool,
) -> Result<Browse, Error> {
    // The registry names a directory: only a host name (no `/`, no `..`) may.
    if !oci::is_host_name(params.registry) || !visible(params.registry, repo) {
        return Err(not_cached());
    }
    let name = RepoName::parse(repo).ok_or_else(not_cached)?;
    let (store, lifecycle) = (
        Arc::clone(app.cache().store()),
        Arc::clone(app.cache().lifecycle()),
    );
    let registry = params.registry.to_string();
    let tags = blocking({
        let (store, registry, name) = (Arc::clone(&store), registry.clone(), name.clone());
        move || store.tags(&registry, &name)
    })
    .await?;
    if tags.is_empty() {
        return Err(not_cached());
    }
    let popularity = app.console().popularity();
    let tags = tags
        .into_iter()
        .map(|tag| {
            let p = popularity.of(&image_key(params.registry, repo, &tag));
            (tag, p)
        })
        .collect();
    let (total, pages, shown) = params.page(tags);
    let rows = blocking(move || {
        let pinned = lifecycle.pinned();
        let mut budget = MANIFEST_BYTES_PER_PAGE;
        let rows = shown
            .into_iter()
            .filter_map(|(tag, p)| {
                tag_row(&store, (&registry, &name), tag, p, &pinned, &mut budget)
            })
            .collect();
        Ok::<_, std::io::Error>(rows)
    })
    .await?;
    Ok(Browse::Tags(params.listing(
        Some(repo),
        (total, pages),
        rows,
    )))
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

/// What reading a stored manifest within the page's budget gave.
enum Reading {
    Outline(oci::Outline),
    /// Not stored (or not a manifest).
    Missing,
    /// The budget does not cover it: not read.
    OverBudget,
}

/// A stored manifest's outline, read only if `budget` covers its size (which it then pays).
fn outline_within(store: &Store, digest: &Digest, budget: &mut u64) -> Reading {
    let Ok(size) = std::fs::metadata(store.content_path(digest)).map(|m| m.len()) else {
        return Reading::Missing;
    };
    let Some(left) = budget.checked_sub(size) else {
        return Reading::OverBudget;
    };
    *budget = left;
    match store.get_manifest(digest).ok().flatten() {
        Some((bytes, _)) => oci::outline(&bytes).map_or(Reading::Missing, Reading::Outline),
        None => Reading::Missing,
    }
}

fn platform_name(name: String) -> String {
    name.chars().take(LONGEST_PLATFORM).collect()
}

/// A tag's row, from its record and the manifests and config the store holds.
fn tag_row(
    store: &Store,
    (registry, repo): (&str, &RepoName),
    tag: String,
    pulls: Pulls,
    pinned: &HashSet<Digest>,
    budget: &mut u64,
) -> Option<TagRow> {
    let record = store.get_tag(registry, repo, &Tag::parse(&tag)?).ok()??;
    let digest: Option<Digest> = record.digest.parse().ok();
    let manifest = digest
        .as_ref()
        .map_or(Reading::Missing, |d| outline_within(store, d, budget));
    let (platforms, bytes) = match manifest {
        Reading::Outline(outline) if !outline.platforms.is_empty() => {
            // The size of an index: its platforms whose manifests are cached; unknown when
            // some were not read (too many, or past the page's budget).
            let mut read = HashSet::new();
            let mut bytes = Some(0u64);
            for (index, (_, child)) in outline.platforms.iter().enumerate() {
                if index == MOST_PLATFORMS {
                    bytes = None;
                    break;
                }
                if !read.insert(child) {
                    continue;
                }
                match outline_within(store, child, budget) {
                    Reading::Outline(child) => bytes = bytes.map(|b| b.saturating_add(child.bytes)),
                    Reading::Missing => {}
                    Reading::OverBudget => bytes = None,
                }
            }
            let names = outline
                .platforms
                .into_iter()
                .take(MOST_PLATFORMS)
                .map(|(name, _)| platform_name(name))
                .collect();
            (names, bytes)
        }
        Reading::Outline(outline) => {
            let platform = outline
                .config
                .and_then(|config| image_platform(store, &config, budget));
            (
                platform.map(platform_name).into_iter().collect(),
                Some(outline.bytes),
            )
        }
        Reading::Missing | Reading::OverBudget => (Vec::new(), None),
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

fn image_platform(store: &Store, config: &Digest, budget: &mut u64) -> Option<String> {
    let (file, size) = store.open_blob(config).ok()??;
    if size > MAX_CONFIG_BYTES {
        return None;
    }
    *budget = budget.checked_sub(size)?;
    let mut text = Vec::with_capacity(size as usize);
    file.take(MAX_CONFIG_BYTES).read_to_end(&mut text).ok()?;
    oci::config_platform(&text)
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
    }

    #[test]
    fn manifests_are_read_only_within_the_page_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_shared(dir.path()).unwrap();
        let child = br#"{"schemaVersion":2,"config":{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":7},"layers":[]}"#;
        let child_digest = Digest::of(child);
        let meta = crate::cache::store::ManifestMeta {
            media_type: oci::OCI_MANIFEST.into(),
        };
        store.put_manifest(&child_digest, child, &meta).unwrap();
        let mut budget = child.len() as u64 - 1;
        assert!(matches!(
            outline_within(&store, &child_digest, &mut budget),
            Reading::OverBudget
        ));
        assert_eq!(
            budget,
            child.len() as u64 - 1,
            "nothing paid for what was not read"
        );
        let mut budget = child.len() as u64;
        let Reading::Outline(outline) = outline_within(&store, &child_digest, &mut budget) else {
            panic!("within the budget")
        };
        assert_eq!((outline.bytes, budget), (7, 0));
        assert!(matches!(
            outline_within(&store, &Digest::of(b"absent"), &mut budget),
            Reading::Missing
        ));
        assert_eq!(platform_name("x".repeat(500)).len(), LONGEST_PLATFORM);
    }

    #[test]
    fn filters_ignore_case_and_sort_by_last_pull_then_name() {
        let pulls = |last| Pulls { count: 1, last };
        let params = Params {
            registry: "docker.io",
            filter: Some("pine".into()),
            shown_filter: Some("PINE".into()),
            by_name: false,
            page: 1,
        };
        let rows = vec![
            ("library/alpine".to_string(), pulls(5)),
            ("library/Pinecone".to_string(), pulls(9)),
            ("library/busybox".to_string(), pulls(10)),
            ("library/apine".to_string(), pulls(5)),
        ];
        let (total, _, shown) = params.page(rows);
        let names: Vec<&str> = shown.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(total, 3);
        assert_eq!(
            names,
            ["library/Pinecone", "library/alpine", "library/apine"]
        );
    }
}
