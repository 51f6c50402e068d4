//! The in-memory index of stored content: size, kind and last use of every digest, the total
//! against the byte budget (counting verified downloads waiting for their commit, which are on
//! the disk already), and who is reading what. Decides which blobs to evict; deleting the files
//! is the caller's job (through the store).
//!
//! Rebuilt from disk at start-up (recency from file modification times, which hits refresh at
//! most once an hour). Pure bookkeeping: no I/O.

use crate::digest::Digest;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Recency is written back to the file's mtime at most this often (seconds).
const PERSIST_RECENCY_EVERY: u64 = 3600;

/// What a stored digest is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Counted against the budget and evictable.
    Blob,
    /// Small; kept (manifests follow their own policy).
    Manifest,
}

#[derive(Clone, Debug)]
struct Entry {
    size: u64,
    kind: Kind,
    /// Order of last use (a logical clock: ties are impossible).
    tick: u64,
    /// Unix seconds of the last use.
    last_used: u64,
    /// Unix seconds last written to the file's mtime.
    persisted: u64,
    /// Responses reading it now.
    readers: u32,
}

/// A place in the order of use (see [`Index::take_place`]).
#[derive(Clone, Copy, Debug)]
pub struct UsedAt {
    tick: u64,
    /// Unix seconds.
    secs: u64,
}

/// A verified download's place in the order of use, taken before its commit (see
/// [`Index::place`]): its bytes count against the budget from then on, as stored ones once
/// [`Index::insert_placed`] takes it, and not at all if it is dropped (the commit failed).
pub struct Placed {
    index: Arc<Index>,
    used: UsedAt,
    size: u64,
    /// Its bytes are still counted as waiting (not yet inserted).
    waiting: bool,
}

impl Placed {
    /// The blob's size.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        if self.waiting {
            self.index.lock().stop_waiting(self.used.tick);
        }
    }
}

/// The byte budget for blobs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    pub max: Option<u64>,
    pub high: f64,
    pub low: f64,
}

impl Budget {
    pub fn unlimited() -> Budget {
        Budget {
            max: None,
            high: 0.95,
            low: 0.85,
        }
    }
}

/// Usage figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Stored blobs.
    pub blob_bytes: u64,
    /// Verified downloads waiting for their commit: on the disk, under a temporary name.
    pub waiting_bytes: u64,
    pub blobs: u64,
    pub manifests: u64,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Digest, Entry>,
    usage: Usage,
    clock: u64,
    /// Verified downloads waiting for their commit: size by place in the order of use.
    waiting: BTreeMap<u64, u64>,
}

impl Inner {
    /// A verified download's bytes stop counting as waiting (committed, or given up).
    fn stop_waiting(&mut self, tick: u64) {
        if let Some(size) = self.waiting.remove(&tick) {
            self.usage.waiting_bytes = self.usage.waiting_bytes.saturating_sub(size);
        }
    }
}

/// The index; shared.
pub struct Index {
    budget: Mutex<Budget>,
    inner: Mutex<Inner>,
}

/// Holds a blob "in use" while a response reads it; eviction skips it meanwhile.
pub struct ReadGuard {
    index: Arc<Index>,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut inner = self.index.lock();
        if let Some(entry) = inner.entries.get_mut(&self.digest) {
            entry.readers = entry.readers.saturating_sub(1);
        }
    }
}

impl Index {
    pub fn new(budget: Budget) -> Index {
        Index {
            budget: Mutex::new(budget),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("index lock poisoned")
    }

    pub fn budget(&self) -> Budget {
        *self.budget.lock().expect("budget lock poisoned")
    }

    /// A new budget (configuration reload).
    pub fn set_budget(&self, budget: Budget) {
        *self.budget.lock().expect("budget lock poisoned") = budget;
    }

    /// Records stored content (a commit, or a file found at start-up; insert those oldest
    /// first, so that their order of use is kept).
    pub fn insert(&self, digest: Digest, size: u64, kind: Kind, last_used: u64) {
        let used = self.take_place(last_used);
        self.insert_used(digest, size, kind, used);
    }

    /// A place in the order of use now, for content inserted later with
    /// [`Index::insert_used`].
    pub fn take_place(&self, now: u64) -> UsedAt {
        let mut inner = self.lock();
        inner.clock += 1;
        UsedAt {
            tick: inner.clock,
            secs: now,
        }
    }

    /// A place in the order of use now for a verified download of `size` bytes, counted
    /// against the budget until it is committed ([`Index::insert_placed`]) or dropped.
    pub fn place(self: &Arc<Self>, size: u64, now: u64) -> Placed {
        let used = self.take_place(now);
        let mut inner = self.lock();
        inner.waiting.insert(used.tick, size);
        inner.usage.waiting_bytes += size;
        drop(inner);
        Placed {
            index: Arc::clone(self),
            used,
            size,
            waiting: true,
        }
    }

    /// Records a committed blob at the place it took when it was verified; its bytes count as
    /// stored from now on instead of waiting.
    pub fn insert_placed(&self, digest: Digest, mut placed: Placed) {
        let size = placed.size;
        let mut inner = self.lock();
        inner.stop_waiting(placed.used.tick);
        placed.waiting = false;
        Self::insert_locked(&mut inner, digest, size, Kind::Blob, placed.used);
    }

    /// Records stored content as used at a place taken earlier.
    pub fn insert_used(&self, digest: Digest, size: u64, kind: Kind, used: UsedAt) {
        Self::insert_locked(&mut self.lock(), digest, size, kind, used);
    }

    fn insert_locked(inner: &mut Inner, digest: Digest, size: u64, kind: Kind, used: UsedAt) {
        let mut entry = Entry {
            size,
            kind,
            tick: used.tick,
            last_used: used.secs,
            persisted: used.secs,
            readers: 0,
        };
        if let Some(old) = inner.entries.get(&digest) {
            entry.tick = entry.tick.max(old.tick);
            entry.readers = old.readers;
        }
        if let Some(old) = inner.entries.insert(digest, entry) {
            subtract(&mut inner.usage, old.size, old.kind);
        }
        add(&mut inner.usage, size, kind);
    }

    /// The size of a stored blob this process knows of.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.lock()
            .entries
            .get(digest)
            .filter(|e| e.kind == Kind::Blob)
            .map(|e| e.size)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.lock().entries.contains_key(digest)
    }

    /// A hit, under one lock: records the use (indexing the blob if another process stored it)
    /// and marks it in use until the guard is dropped. The flag says whether the new recency
    /// should be written to disk.
    pub fn hit(self: &Arc<Self>, digest: &Digest, size: u64, now: u64) -> (ReadGuard, bool) {
        self.record_hit(digest, Some(size), now)
            .expect("a hit with a size always records")
    }

    /// A hit on a blob the index holds, as [`Index::hit`]; `None` when it holds none (the blob
    /// was evicted), and then nothing is recorded.
    pub fn hit_if_indexed(
        self: &Arc<Self>,
        digest: &Digest,
        now: u64,
    ) -> Option<(ReadGuard, bool)> {
        self.record_hit(digest, None, now)
    }

    /// A hit; a blob not indexed is indexed when its size is given, else not hit.
    fn record_hit(
        self: &Arc<Self>,
        digest: &Digest,
        size: Option<u64>,
        now: u64,
    ) -> Option<(ReadGuard, bool)> {
        let persist = {
            let mut inner = self.lock();
            inner.clock += 1;
            let tick = inner.clock;
            match (inner.entries.get_mut(digest), size) {
                (Some(entry), _) => {
                    entry.tick = tick;
                    entry.last_used = entry.last_used.max(now);
                    entry.readers += 1;
                    let due = now >= entry.persisted + PERSIST_RECENCY_EVERY;
                    if due {
                        entry.persisted = now;
                    }
                    due
                }
                (None, Some(size)) => {
                    let entry = Entry {
                        size,
                        kind: Kind::Blob,
                        tick,
                        last_used: now,
                        persisted: now,
                        readers: 1,
                    };
                    inner.entries.insert(digest.clone(), entry);
                    add(&mut inner.usage, size, Kind::Blob);
                    false
                }
                (None, None) => return None,
            }
        };
        let guard = ReadGuard {
            index: Arc::clone(self),
            digest: digest.clone(),
        };
        Some((guard, persist))
    }

    pub fn remove(&self, digest: &Digest) {
        let mut inner = self.lock();
        if let Some(old) = inner.entries.remove(digest) {
            subtract(&mut inner.usage, old.size, old.kind);
        }
    }

    pub fn usage(&self) -> Usage {
        self.lock().usage
    }

    /// Whether blob usage (stored and waiting) passed the high watermark.
    pub fn over_high_watermark(&self) -> bool {
        let budget = self.budget();
        match budget.max {
            Some(max) => self.usage().on_disk() as f64 > max as f64 * budget.high,
            None => false,
        }
    }

    /// Takes out of the index the least recently used blobs (not pinned, not being read) until
    /// usage (stored and waiting) is at most `target` bytes; returns them for deletion. Only
    /// blobs used before every download still waiting for its commit go: commits can finish in
    /// any order, and a blob committed early must not go before an older one still waiting
    /// (that one goes first, once committed).
    pub fn evict_to(&self, target: u64, pinned: &HashSet<Digest>) -> Vec<(Digest, u64)> {
        let mut inner = self.lock();
        if inner.usage.on_disk() <= target {
            return Vec::new();
        }
        let oldest_waiting = inner.waiting.keys().next().copied().unwrap_or(u64::MAX);
        let mut candidates: Vec<(u64, Digest, u64)> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.kind == Kind::Blob && e.readers == 0 && e.tick < oldest_waiting)
            .filter(|(d, _)| !pinned.contains(*d))
            .map(|(d, e)| (e.tick, d.clone(), e.size))
            .collect();
        candidates.sort();
        let mut evicted = Vec::new();
        for (_, digest, size) in candidates {
            if inner.usage.on_disk() <= target {
                break;
            }
            inner.entries.remove(&digest);
            subtract(&mut inner.usage, size, Kind::Blob);
            evicted.push((digest, size));
        }
        evicted
    }

    /// The low-watermark target, when there is a budget.
    pub fn low_target(&self) -> Option<u64> {
        let budget = self.budget();
        budget.max.map(|max| (max as f64 * budget.low) as u64)
    }

    /// Every entry: digest, size, kind, last use (for `ls`).
    pub fn entries(&self) -> Vec<(Digest, u64, Kind, u64)> {
        self.lock()
            .entries
            .iter()
            .map(|(d, e)| (d.clone(), e.size, e.kind, e.last_used))
            .collect()
    }
}

impl Usage {
    /// Bytes of blobs on the disk: stored, and verified downloads waiting for their commit.
    pub fn on_disk(&self) -> u64 {
        self.blob_bytes + self.waiting_bytes
    }
}

fn add(usage: &mut Usage, size: u64, kind: Kind) {
    match kind {
        Kind::Blob => {
            usage.blob_bytes += size;
            usage.blobs += 1;
        }
        Kind::Manifest => usage.manifests += 1,
    }
}

fn subtract(usage: &mut Usage, size: u64, kind: Kind) {
    match kind {
        Kind::Blob => {
            usage.blob_bytes = usage.blob_bytes.saturating_sub(size);
            usage.blobs = usage.blobs.saturating_sub(1);
        }
        Kind::Manifest => usage.manifests = usage.manifests.saturating_sub(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    /// An index with a budget of 100 bytes: evicting past 90, down to 50.
    fn budget_of_100() -> Arc<Index> {
        Arc::new(Index::new(Budget {
            max: Some(100),
            high: 0.9,
            low: 0.5,
        }))
    }

    #[test]
    fn evicts_least_recently_used_first_and_skips_pinned_and_read() {
        let index = budget_of_100();
        for i in 0..5u8 {
            index.insert(d(i), 20, Kind::Blob, 100 + i as u64);
        }
        index.insert(d(99), 1000, Kind::Manifest, 0);
        assert_eq!(index.usage().blob_bytes, 100);
        assert!(index.over_high_watermark());
        drop(index.hit(&d(0), 20, 500)); // 0 becomes the most recent
        let _reading = index.hit(&d(1), 20, 500); // 1 is being read
        let pinned: HashSet<Digest> = [d(2)].into();
        let evicted: Vec<Digest> = index
            .evict_to(50, &pinned)
            .into_iter()
            .map(|(d, _)| d)
            .collect();
        assert_eq!(evicted, vec![d(3), d(4), d(0)]);
        assert_eq!(index.usage().blob_bytes, 40);
        assert!(index.contains(&d(99)), "manifests are not evicted");
        drop(_reading);
        let evicted = index.evict_to(0, &HashSet::new());
        assert_eq!(evicted.len(), 2);
    }

    #[test]
    fn recency_is_persisted_at_most_hourly() {
        let index = Arc::new(Index::new(Budget::unlimited()));
        index.insert(d(1), 1, Kind::Blob, 1000);
        assert!(!index.hit(&d(1), 1, 1000 + 10).1);
        assert!(index.hit(&d(1), 1, 1000 + PERSIST_RECENCY_EVERY).1);
        assert!(!index.hit(&d(1), 1, 1000 + PERSIST_RECENCY_EVERY + 5).1);
        // A blob another process stored is counted on its first hit.
        drop(index.hit(&d(2), 7, 2000));
        assert_eq!(index.usage().blob_bytes, 8);
        // Without a size, only what the index holds is hit.
        assert!(index.hit_if_indexed(&d(3), 2000).is_none());
        assert!(!index.contains(&d(3)));
        let (guard, _) = index.hit_if_indexed(&d(2), 2001).unwrap();
        assert!(
            index
                .evict_to(0, &HashSet::new())
                .iter()
                .all(|(evicted, _)| *evicted != d(2)),
            "in use"
        );
        drop(guard);
    }

    #[test]
    fn reinserting_does_not_double_count() {
        let index = Index::new(Budget::unlimited());
        index.insert(d(1), 10, Kind::Blob, 0);
        index.insert(d(1), 10, Kind::Blob, 0);
        assert_eq!(
            index.usage(),
            Usage {
                blob_bytes: 10,
                waiting_bytes: 0,
                blobs: 1,
                manifests: 0
            }
        );
        index.remove(&d(1));
        assert_eq!(index.usage(), Usage::default());
    }

    #[test]
    fn a_verified_download_counts_against_the_budget_until_committed_or_dropped() {
        let index = budget_of_100();
        index.insert(d(1), 50, Kind::Blob, 100);
        let placed = index.place(45, 101);
        assert_eq!(index.usage().waiting_bytes, 45);
        assert!(index.over_high_watermark(), "50 stored + 45 waiting");
        assert_eq!(index.evict_to(50, &HashSet::new()), vec![(d(1), 50)]);
        index.insert_placed(d(2), placed);
        assert_eq!(
            index.usage(),
            Usage {
                blob_bytes: 45,
                waiting_bytes: 0,
                blobs: 1,
                manifests: 0
            }
        );
        drop(index.place(30, 102)); // its commit failed
        assert_eq!(index.usage().on_disk(), 45);
    }

    #[test]
    fn a_blob_committed_before_an_older_one_waiting_is_not_evicted_first() {
        let index = budget_of_100();
        index.insert(d(1), 30, Kind::Blob, 100);
        let older = index.place(30, 101);
        let newer = index.place(30, 102);
        index.insert_placed(d(3), newer); // its commit finished first
                                          // 90 on the disk: only what was used before the older download goes now.
        assert_eq!(index.evict_to(50, &HashSet::new()), vec![(d(1), 30)]);
        index.insert_placed(d(2), older);
        assert_eq!(index.evict_to(50, &HashSet::new()), vec![(d(2), 30)]);
        assert!(index.contains(&d(3)));
    }

    #[test]
    fn content_inserted_at_an_earlier_place_ranks_by_that_place() {
        let index = Arc::new(Index::new(Budget::unlimited()));
        let fetched_first = index.take_place(100);
        index.insert(d(2), 10, Kind::Blob, 101);
        index.insert_used(d(1), 10, Kind::Blob, fetched_first);
        let evicted = index.evict_to(10, &HashSet::new());
        assert_eq!(evicted, vec![(d(1), 10)]);
        // Inserted again while a response reads it: it stays in use.
        let _reading = index.hit(&d(2), 10, 102);
        index.insert(d(2), 10, Kind::Blob, 103);
        assert!(index.evict_to(0, &HashSet::new()).is_empty(), "in use");
    }
}
