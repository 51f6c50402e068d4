//! What the store keeps per repository: tag records (the last mapping upstream confirmed)
//! and links (content upstream served for the repository), under
//! `tags/<registry>/<repository>/{_tags,_links}/`, and the listings built from them.

use super::{read_dir_names, Store, TagRecord};
use crate::digest::Digest;
use crate::oci::{RepoName, Tag};
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

impl Store {
    fn tag_path(&self, registry: &str, repo: &RepoName, tag: &Tag) -> PathBuf {
        self.root
            .join("tags")
            .join(registry)
            .join(repo.as_str())
            .join("_tags")
            .join(tag.as_str())
    }

    fn link_path(&self, registry: &str, repo: &RepoName, digest: &Digest) -> PathBuf {
        self.root
            .join("tags")
            .join(registry)
            .join(repo.as_str())
            .join("_links")
            .join(digest.hex())
    }

    /// Records that upstream served `digest` for `registry/repo`.
    pub fn link(&self, registry: &str, repo: &RepoName, digest: &Digest) -> io::Result<()> {
        let path = self.link_path(registry, repo, digest);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether upstream served `digest` for `registry/repo` before.
    pub fn is_linked(&self, registry: &str, repo: &RepoName, digest: &Digest) -> bool {
        self.link_path(registry, repo, digest).exists()
    }

    pub fn get_tag(
        &self,
        registry: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> io::Result<Option<TagRecord>> {
        match fs::read(self.tag_path(registry, repo, tag)) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn put_tag(
        &self,
        registry: &str,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
    ) -> io::Result<()> {
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        self.write_atomically(&self.tag_path(registry, repo, tag), &json)
    }

    pub fn remove_tag(&self, registry: &str, repo: &RepoName, tag: &Tag) -> io::Result<()> {
        match fs::remove_file(self.tag_path(registry, repo, tag)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Repositories with at least one tag record, as `<registry>/<repository>`.
    pub fn repositories(&self) -> io::Result<Vec<(String, String)>> {
        let mut found = Vec::new();
        let tags = self.root.join("tags");
        for registry in read_dir_names(&tags)? {
            collect_repos(&tags.join(&registry), String::new(), &registry, &mut found)?;
        }
        found.sort();
        Ok(found)
    }

    /// Tags recorded for a repository.
    pub fn tags(&self, registry: &str, repo: &RepoName) -> io::Result<Vec<String>> {
        let dir = self
            .root
            .join("tags")
            .join(registry)
            .join(repo.as_str())
            .join("_tags");
        let mut names = read_dir_names(&dir)?;
        names.sort();
        Ok(names)
    }
}

fn collect_repos(
    dir: &Path,
    prefix: String,
    registry: &str,
    out: &mut Vec<(String, String)>,
) -> io::Result<()> {
    for name in read_dir_names(dir)? {
        if name == "_tags" {
            out.push((registry.to_string(), prefix.clone()));
            continue;
        }
        if name == "_links" {
            continue;
        }
        let child = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        collect_repos(&dir.join(&name), child, registry, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_repositories() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = TagRecord {
            digest: Digest::of(b"m").to_string(),
            media_type: "t".into(),
            size: 1,
            checked_at: 0,
        };
        let a = RepoName::parse("library/a").unwrap();
        let ab = RepoName::parse("library/a/b").unwrap();
        let tag = Tag::parse("1.0").unwrap();
        store.put_tag("docker.io", &a, &tag, &record).unwrap();
        store.put_tag("docker.io", &ab, &tag, &record).unwrap();
        assert_eq!(store.get_tag("docker.io", &a, &tag).unwrap(), Some(record));
        assert_eq!(
            store.tags("docker.io", &a).unwrap(),
            vec!["1.0".to_string()]
        );
        let repos = store.repositories().unwrap();
        assert_eq!(
            repos,
            vec![
                ("docker.io".to_string(), "library/a".to_string()),
                ("docker.io".to_string(), "library/a/b".to_string())
            ]
        );
    }
}
