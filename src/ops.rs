//! Operator commands on the cache directory: `verify` (re-hash and drop corrupt content), `gc`
//! (evict down to a target now) and `ls` (what is cached), and the text they print. With a
//! server holding the directory they run inside it, through its admin socket
//! ([`crate::admin`]), so that its index and usage figure stay true; without one they act on
//! the directory directly.

use crate::cache::index::Budget;
use crate::cache::lifecycle::{parse_pin, Lifecycle};
use crate::cache::store::Store;
use crate::digest::{Digest, Hasher};
use crate::oci::{RepoName, Tag};
use crate::progress::{Report, Silent};
use std::io::{self, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// How much of the store `verify` checks.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Check only this many entries, chosen at random.
    pub sample: Option<usize>,
    /// Stop after hashing this many bytes.
    pub max_bytes: Option<u64>,
    /// Move corrupt content to `quarantine/` instead of deleting it.
    pub quarantine: bool,
}

/// What `verify` found.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub checked: usize,
    pub bytes: u64,
    pub corrupt: Vec<Digest>,
    /// Entries left unchecked (sample or byte budget).
    pub skipped: usize,
}

/// Re-hashes stored content; removes (or quarantines) every entry whose bytes do not match
/// its name.
pub fn verify(
    dir: &Path,
    options: &VerifyOptions,
    report: &dyn Report,
) -> io::Result<VerifyReport> {
    let stop = AtomicBool::new(false);
    verify_until(&Store::open_shared(dir)?, options, |_| {}, &stop, report)
}

/// [`verify`] on an open store; `removed` hears of each entry taken out (a server forgets it).
pub fn verify_store(
    store: &Store,
    options: &VerifyOptions,
    removed: impl Fn(&Digest),
) -> io::Result<VerifyReport> {
    verify_until(store, options, removed, &AtomicBool::new(false), &Silent)
}

/// [`verify_store`] that stops before its next entry once `stop` is set (the server stops),
/// telling `progress` how far it is.
pub fn verify_until(
    store: &Store,
    options: &VerifyOptions,
    removed: impl Fn(&Digest),
    stop: &AtomicBool,
    progress: &dyn Report,
) -> io::Result<VerifyReport> {
    let mut found = store.scan()?;
    shuffle(&mut found);
    let total = found.len();
    if let Some(n) = options.sample {
        found.truncate(n);
    }
    let planned: u64 = found.iter().map(|f| f.size).sum();
    let planned = options.max_bytes.map_or(planned, |max| planned.min(max));
    progress.planned(found.len() as u64, planned);
    let mut report = VerifyReport::default();
    for entry in &found {
        if options.max_bytes.is_some_and(|max| report.bytes >= max) || stop.load(Ordering::Relaxed)
        {
            break;
        }
        let actual = match hash_file(&store.content_path(&entry.digest), progress) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // evicted meanwhile
            Err(e) => return Err(e),
        };
        report.checked += 1;
        report.bytes += entry.size;
        progress.done(1, 0);
        if actual != entry.digest {
            tracing::error!(digest = %entry.digest, %actual, "corrupt content in the store");
            let taken_out = if options.quarantine {
                store.quarantine(&entry.digest).map(|_| ())
            } else {
                store.remove_blob(&entry.digest)
            };
            match taken_out {
                // Evicted meanwhile: gone already.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
            removed(&entry.digest);
            report.corrupt.push(entry.digest.clone());
        }
    }
    report.skipped = total - report.checked;
    Ok(report)
}

impl VerifyReport {
    /// What `verify` prints.
    pub fn render(&self, quarantine: bool) -> String {
        let mut text = format!(
            "checked {} objects ({} bytes), {} left unchecked\n",
            self.checked, self.bytes, self.skipped
        );
        for digest in &self.corrupt {
            let what = if quarantine { "quarantined" } else { "removed" };
            text.push_str(&format!("corrupt {digest}: {what}\n"));
        }
        text.push_str(&format!("{} corrupt\n", self.corrupt.len()));
        text
    }
}

/// What `gc` prints for (blobs, bytes) evicted.
pub fn render_gc((blobs, bytes): (usize, u64)) -> String {
    format!("evicted {blobs} blobs ({bytes} bytes)\n")
}

/// What `ls` prints.
pub fn render_ls(tags: &[TagLine], objects: &[ObjectLine]) -> String {
    let mut text = format!(
        "{:<16} {:<40} {:<20} {:<71} CHECKED\n",
        "REGISTRY", "REPOSITORY", "TAG", "DIGEST"
    );
    for t in tags {
        text.push_str(&format!(
            "{:<16} {:<40} {:<20} {:<71} {}\n",
            t.registry, t.repository, t.tag, t.digest, t.checked_at
        ));
    }
    text.push_str(&format!(
        "\n{:<71} {:>14} {:<8} LAST USED\n",
        "DIGEST", "SIZE", "KIND"
    ));
    for o in objects {
        text.push_str(&format!(
            "{:<71} {:>14} {:<8} {}\n",
            o.digest.to_string(),
            o.size,
            kind_name(o.manifest),
            o.last_used
        ));
    }
    text
}

/// Hashes a file, telling `progress` of each MiB as it goes (a large layer takes seconds).
fn hash_file(path: &Path, progress: &dyn Report) -> io::Result<Digest> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buf[..n]);
        progress.done(0, n as u64);
    }
}

/// Evicts least recently used blobs (pins respected) until blobs use at most `target` bytes.
/// Returns (blobs, bytes) evicted.
pub fn gc(
    dir: &Path,
    target: u64,
    pins: &[String],
    progress: &dyn Report,
) -> io::Result<(usize, u64)> {
    let pins = pins.iter().filter_map(|p| parse_pin(p)).collect();
    let store = Arc::new(Store::open_shared(dir)?);
    let lifecycle = Lifecycle::open(store, Budget::unlimited(), pins)?;
    Ok(lifecycle.evict_reporting(target, "gc", progress))
}

/// One cached tag.
#[derive(Clone, Debug)]
pub struct TagLine {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    pub checked_at: u64,
}

/// One stored object.
#[derive(Clone, Debug)]
pub struct ObjectLine {
    pub digest: Digest,
    pub size: u64,
    pub manifest: bool,
    pub last_used: u64,
}

/// What is cached: tags, and every stored object, most recently used first.
pub fn ls(dir: &Path) -> io::Result<(Vec<TagLine>, Vec<ObjectLine>)> {
    ls_store(&Store::open_shared(dir)?)
}

/// [`ls`] on an open store.
pub fn ls_store(store: &Store) -> io::Result<(Vec<TagLine>, Vec<ObjectLine>)> {
    let mut tags = Vec::new();
    for (registry, repository) in store.repositories()? {
        let Some(repo) = RepoName::parse(&repository) else {
            continue;
        };
        for tag in store.tags(&registry, &repo)? {
            let Some(parsed) = Tag::parse(&tag) else {
                continue;
            };
            if let Some(record) = store.get_tag(&registry, &repo, &parsed)? {
                tags.push(TagLine {
                    registry: registry.clone(),
                    repository: repository.clone(),
                    tag,
                    digest: record.digest,
                    checked_at: record.checked_at,
                });
            }
        }
    }
    let mut objects: Vec<ObjectLine> = store
        .scan()?
        .into_iter()
        .map(|f| ObjectLine {
            digest: f.digest,
            size: f.size,
            manifest: f.manifest,
            last_used: f.modified,
        })
        .collect();
    objects.sort_by_key(|o| std::cmp::Reverse(o.last_used));
    Ok((tags, objects))
}

/// `Kind` as `ls` prints it.
fn kind_name(manifest: bool) -> &'static str {
    if manifest {
        "manifest"
    } else {
        "blob"
    }
}

/// A cheap shuffle (no need for cryptographic randomness to pick a sample).
fn shuffle<T>(items: &mut [T]) {
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
}
