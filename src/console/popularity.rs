//! Pulls per tag since start-up (`registry/repository:tag` pulled by tag): how many and when
//! the latest, for the console's "most pulled" list and its browse pages. In memory, bounded
//! to [`MAX_TRACKED_IMAGES`] tags (later ones are not counted once full).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Distinct tags remembered.
pub const MAX_TRACKED_IMAGES: usize = 10_000;

/// How often and when an image was pulled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pulls {
    pub count: u64,
    /// Unix seconds of the latest pull.
    pub last: u64,
}

/// Pull counts per image.
#[derive(Default)]
pub struct Popularity {
    counts: Mutex<HashMap<String, Pulls>>,
}

/// `registry/repository:tag`, as popularity keys it.
pub fn image_key(registry: &str, repo: &str, tag: &str) -> String {
    format!("{registry}/{repo}:{tag}")
}

/// The registry, repository and tag of a key.
pub fn split_key(image: &str) -> (&str, &str, &str) {
    let (registry, rest) = image.split_once('/').unwrap_or(("", image));
    let (repo, tag) = rest.rsplit_once(':').unwrap_or((rest, ""));
    (registry, repo, tag)
}

impl Popularity {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pulls>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn pulled(&self, image: &str) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut counts = self.counts();
        if let Some(pulls) = counts.get_mut(image) {
            pulls.count += 1;
            pulls.last = now;
        } else if counts.len() < MAX_TRACKED_IMAGES {
            counts.insert(
                image.to_string(),
                Pulls {
                    count: 1,
                    last: now,
                },
            );
        }
    }

    /// Every image counted, most pulled first.
    pub fn ranked(&self) -> Vec<(String, Pulls)> {
        let mut all: Vec<(String, Pulls)> =
            self.counts().iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(&b.0)));
        all
    }

    /// An image's pulls.
    pub fn of(&self, image: &str) -> Pulls {
        self.counts().get(image).copied().unwrap_or_default()
    }

    /// Pulls summed per repository (`(registry, repository)`).
    pub fn per_repository(&self) -> HashMap<(String, String), Pulls> {
        let mut per = HashMap::<(String, String), Pulls>::new();
        for (image, pulls) in self.counts().iter() {
            let (registry, repo, _) = split_key(image);
            let sum = per
                .entry((registry.to_string(), repo.to_string()))
                .or_default();
            sum.count += pulls.count;
            sum.last = sum.last.max(pulls.last);
        }
        per
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_sums_per_repository_and_splits_keys() {
        let p = Popularity::default();
        for _ in 0..3 {
            p.pulled("docker.io/library/a:1");
        }
        p.pulled("docker.io/library/a:2");
        p.pulled("ghcr.io/o/b:1");
        let ranked = p.ranked();
        assert_eq!(ranked[0].0, "docker.io/library/a:1");
        assert_eq!(ranked[0].1.count, 3);
        assert_eq!(ranked.len(), 3);
        let per = p.per_repository();
        assert_eq!(per[&("docker.io".into(), "library/a".into())].count, 4);
        assert_eq!(
            split_key("localhost:5000/o/b:1"),
            ("localhost:5000", "o/b", "1")
        );
        assert_eq!(image_key("ghcr.io", "o/b", "1"), "ghcr.io/o/b:1");
    }
}
