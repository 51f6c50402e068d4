//! Single flight for blob downloads: the table `digest -> fill in progress`.
//!
//! The first request for an uncached blob becomes the leader and gets a [`FillPermit`]; everyone
//! else (the leader's own client included) follows the fill by reading the growing temp file up to
//! the published [`FillState`]. A permit dropped before it finished marks the fill `Failed`, so a
//! dropped writer never reads as a finished body. Knows nothing of HTTP or upstreams.

use crate::digest::Digest;
use crate::error::Code;
use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::watch;

/// Where a fill stands, as its readers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FillState {
    /// Waiting for upstream's answer.
    Starting,
    /// Bytes `0..written` are in the file; `total` is upstream's `Content-Length`, if sent.
    Streaming { written: u64, total: Option<u64> },
    /// Verified: the file holds exactly `size` bytes, all of which may be sent. Published before
    /// the blob is committed (made durable), which the fill then does before leaving the table.
    Complete { size: u64 },
    /// Abandoned; readers must abort their responses.
    Failed(FillError),
    /// The leader went away before the download started (its client disconnected): nothing
    /// was fetched, and followers start over (one of them leads).
    Abandoned,
}

/// Why a fill failed, in the form a client is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FillError {
    pub code: Code,
    pub message: String,
    /// The bytes were fine but could not be stored (disk full): readers may fetch the rest
    /// from upstream themselves.
    pub resumable: bool,
    /// Seconds after which asking again may do better (upstream down or rate limiting).
    pub retry_after: Option<u64>,
}

/// A fill as a reader sees it: the temp file (shared handle, valid across the final rename)
/// and the progress of the writer.
#[derive(Clone, Debug)]
pub struct Fill {
    pub file: Arc<File>,
    pub progress: watch::Receiver<FillState>,
    /// The endpoint the download comes from, once known (for access lines).
    pub source: Arc<OnceLock<String>>,
    /// When the fill began.
    pub started: std::time::Instant,
    /// The registry and repository it was started for (who may see it on the console).
    pub wanted_by: Arc<OnceLock<(String, String)>>,
}

/// A fill in progress, as the operator console lists it.
#[derive(Clone, Debug)]
pub struct InProgress {
    pub digest: Digest,
    pub state: FillState,
    /// The endpoint (or peer, or bucket) it comes from, once known.
    pub source: Option<String>,
    /// Clients following it now.
    pub readers: usize,
    pub started: std::time::Instant,
    /// The registry and repository it was started for, once the download began.
    pub wanted_by: Option<(String, String)>,
}

/// The right and duty to perform a fill. Dropping it unfinished fails the fill.
#[derive(Debug)]
pub struct FillPermit {
    digest: Digest,
    source: Arc<OnceLock<String>>,
    wanted_by: Arc<OnceLock<(String, String)>>,
    table: Arc<Inflight>,
    progress: watch::Sender<FillState>,
    finished: bool,
}

impl FillPermit {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Clients following this fill now (see [`Inflight::readers`]).
    pub fn readers(&self) -> usize {
        self.table.readers(&self.digest).unwrap_or(0)
    }

    /// Records the registry and repository the download is for.
    pub fn set_wanted_by(&self, registry: &str, repo: &str) {
        let _ = self.wanted_by.set((registry.to_string(), repo.to_string()));
    }

    /// Records which endpoint the download comes from.
    pub fn set_source(&self, endpoint: &str) {
        let _ = self.source.set(endpoint.to_string());
    }

    /// Publishes progress to every reader.
    pub fn publish(&self, state: FillState) {
        self.progress.send_replace(state);
    }

    /// A sender for publishing progress from another thread (the disk writer).
    pub fn progress_sender(&self) -> watch::Sender<FillState> {
        self.progress.clone()
    }

    /// Ends the fill with its final state and leaves the table. Call only after the blob
    /// is committed (or for a failure), so that a newcomer finds it in the store.
    pub fn finish(mut self, state: FillState) {
        self.progress.send_replace(state);
        self.table.remove(&self.digest);
        self.finished = true;
    }
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        if !self.finished {
            // Out of the table first, so that followers starting over find no stale entry.
            self.table.remove(&self.digest);
            if matches!(*self.progress.borrow(), FillState::Complete { .. }) {
                return; // verified bytes stay sendable
            }
            let started = !matches!(*self.progress.borrow(), FillState::Starting);
            self.progress.send_replace(if started {
                FillState::Failed(FillError {
                    code: Code::Unavailable,
                    message: "the download was abandoned".into(),
                    resumable: false,
                    retry_after: None,
                })
            } else {
                FillState::Abandoned
            });
        }
    }
}

/// What a request for a blob turns out to be.
pub enum Role<H, T> {
    /// Already in the store.
    Hit(H),
    /// Another request is downloading it: follow.
    Follower(Fill),
    /// Nobody is: download it into `T` (and follow like everyone else).
    Leader(FillPermit, Fill, T),
}

/// The table of fills in progress.
#[derive(Debug, Default)]
pub struct Inflight {
    fills: Mutex<HashMap<Digest, Fill>>,
}

impl Inflight {
    /// Joins a fill in progress, else finds the blob in the store (`lookup`), else starts a
    /// fill in a fresh temp file (`create`, which returns the leader's destination and a
    /// handle readers use to follow it). The lock on the table is held only to look into it
    /// and to insert: never across `lookup` or `create`, which touch the disk. A blob whose
    /// fill committed (`committed` says so from memory: its commit is recorded before its fill
    /// leaves the table) between the lookup and the insert is looked up again, never fetched
    /// twice; one recorded as committed before the lookup that still missed it (removed behind
    /// the index's back) is fetched again. A temp file made for a fill someone else started
    /// meanwhile is dropped.
    pub fn join_or_lead<H, T, E>(
        self: &Arc<Self>,
        digest: &Digest,
        lookup: impl Fn() -> Result<Option<H>, E>,
        create: impl Fn() -> Result<(T, File), E>,
        committed: impl Fn() -> bool,
    ) -> Result<Role<H, T>, E> {
        loop {
            if let Some(fill) = self.fill(digest) {
                return Ok(Role::Follower(fill));
            }
            let committed_before = committed();
            if let Some(hit) = lookup()? {
                return Ok(Role::Hit(hit));
            }
            let (temp, reader) = create()?;
            let mut fills = self.fills.lock().expect("inflight lock poisoned");
            if let Some(fill) = fills.get(digest) {
                let fill = fill.clone();
                drop(fills);
                drop(temp);
                return Ok(Role::Follower(fill));
            }
            if !committed_before && committed() {
                drop(fills);
                drop(temp);
                continue;
            }
            let (permit, fill) = self.insert(&mut fills, digest, reader);
            return Ok(Role::Leader(permit, fill, temp));
        }
    }

    fn fill(&self, digest: &Digest) -> Option<Fill> {
        let fills = self.fills.lock().expect("inflight lock poisoned");
        fills.get(digest).cloned()
    }

    /// Starts the fill of `digest` in the table: the leader's permit, and the fill every reader
    /// follows.
    fn insert(
        self: &Arc<Self>,
        fills: &mut HashMap<Digest, Fill>,
        digest: &Digest,
        reader: File,
    ) -> (FillPermit, Fill) {
        let (tx, rx) = watch::channel(FillState::Starting);
        let source = Arc::new(OnceLock::new());
        let fill = Fill {
            file: Arc::new(reader),
            progress: rx,
            source: Arc::clone(&source),
            started: std::time::Instant::now(),
            wanted_by: Arc::new(OnceLock::new()),
        };
        fills.insert(digest.clone(), fill.clone());
        let permit = FillPermit {
            digest: digest.clone(),
            source,
            wanted_by: Arc::clone(&fill.wanted_by),
            table: Arc::clone(self),
            progress: tx,
            finished: false,
        };
        (permit, fill)
    }

    /// The fill of `digest` once it is verified (its commit may still wait), and its size.
    pub fn verified(&self, digest: &Digest) -> Option<(Fill, u64)> {
        let fills = self.fills.lock().expect("inflight lock poisoned");
        let fill = fills.get(digest)?;
        let size = verified_size(fill)?;
        Some((fill.clone(), size))
    }

    /// Fills not yet verified: downloads under way.
    pub fn downloading(&self) -> usize {
        let fills = self.fills.lock().expect("inflight lock poisoned");
        fills
            .values()
            .filter(|f| verified_size(f).is_none())
            .count()
    }

    /// Clients reading the growing file of `digest`'s fill now (each holds its handle; the
    /// table's own is not counted); `None` when no fill of it is in progress.
    pub fn readers(&self, digest: &Digest) -> Option<usize> {
        let fills = self.fills.lock().expect("inflight lock poisoned");
        let fill = fills.get(digest)?;
        Some(Arc::strong_count(&fill.file) - 1)
    }

    /// Every fill in the table, oldest first.
    pub fn list(&self) -> Vec<InProgress> {
        let fills = self.fills.lock().expect("inflight lock poisoned");
        let mut all: Vec<InProgress> = fills
            .iter()
            .map(|(digest, fill)| InProgress {
                digest: digest.clone(),
                state: fill.progress.borrow().clone(),
                source: fill.source.get().cloned(),
                readers: Arc::strong_count(&fill.file) - 1,
                started: fill.started,
                wanted_by: fill.wanted_by.get().cloned(),
            })
            .collect();
        drop(fills);
        all.sort_by_key(|f| f.started);
        all
    }

    /// Fills in progress.
    pub fn len(&self) -> usize {
        self.fills.lock().expect("inflight lock poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, digest: &Digest) {
        self.fills
            .lock()
            .expect("inflight lock poisoned")
            .remove(digest);
    }
}

/// The size of a verified fill; `None` while it downloads or once it failed.
fn verified_size(fill: &Fill) -> Option<u64> {
    match *fill.progress.borrow() {
        FillState::Complete { size } => Some(size),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> Result<((), File), ()> {
        Ok(((), tempfile::tempfile().unwrap()))
    }

    #[test]
    fn first_leads_then_others_follow_then_hit() {
        let table = Arc::new(Inflight::default());
        let d = Digest::of(b"a");
        let Ok(Role::Leader(permit, _, ())) =
            table.join_or_lead(&d, || Ok::<Option<()>, ()>(None), temp, || false)
        else {
            panic!("first must lead")
        };
        let Ok(Role::Follower(fill)) = table.join_or_lead(&d, || Ok(None::<()>), temp, || false)
        else {
            panic!("second must follow")
        };
        permit.finish(FillState::Complete { size: 1 });
        assert_eq!(*fill.progress.borrow(), FillState::Complete { size: 1 });
        assert!(table.is_empty());
        assert!(matches!(
            table.join_or_lead(&d, || Ok(Some(())), temp, || false),
            Ok(Role::Hit(()))
        ));
    }

    #[test]
    fn dropped_permit_abandons_or_fails_the_fill() {
        let table = Arc::new(Inflight::default());
        let d = Digest::of(b"b");
        let Ok(Role::Leader(permit, fill, ())) =
            table.join_or_lead(&d, || Ok::<Option<()>, ()>(None), temp, || false)
        else {
            panic!()
        };
        drop(permit);
        assert_eq!(*fill.progress.borrow(), FillState::Abandoned);
        assert!(table.is_empty());
        // Once under way, a dropped permit is a failure readers must abort on.
        let Ok(Role::Leader(permit, fill, ())) =
            table.join_or_lead(&d, || Ok::<Option<()>, ()>(None), temp, || false)
        else {
            panic!()
        };
        permit.publish(FillState::Streaming {
            written: 0,
            total: None,
        });
        drop(permit);
        assert!(matches!(*fill.progress.borrow(), FillState::Failed(_)));
    }

    #[test]
    fn the_table_is_not_locked_while_the_disk_is_read_and_a_commit_in_between_is_a_hit() {
        use std::cell::Cell;
        let table = Arc::new(Inflight::default());
        let d = Digest::of(b"c");
        let lookups = Cell::new(0);
        // The lookup takes the table's lock itself: it would deadlock if the lock were held.
        let lookup = || {
            lookups.set(lookups.get() + 1);
            assert!(table.is_empty());
            Ok::<_, ()>((lookups.get() > 1).then_some(()))
        };
        // A fill committed (and left the table) between the first lookup and the insert:
        // not recorded before it, recorded after.
        let asked = Cell::new(0);
        let committed = || {
            asked.set(asked.get() + 1);
            asked.get() == 2
        };
        let role = table.join_or_lead(&d, lookup, temp, committed);
        assert!(matches!(role, Ok(Role::Hit(()))), "looked up again");
        assert_eq!(lookups.get(), 2);
        assert!(table.is_empty());
        // Recorded as committed, yet not found (removed behind the index's back): fetched.
        let role = table.join_or_lead(&d, || Ok::<Option<()>, ()>(None), temp, || true);
        assert!(matches!(role, Ok(Role::Leader(..))), "no endless lookups");
    }
}
