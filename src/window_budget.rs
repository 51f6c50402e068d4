//! The windows a connection's blob bodies are sent in: how large ([`WindowSize`]), and what
//! those of one HTTP/2 connection may hold at once ([`WindowBudget`]).
//!
//! A blob's body is sent in windows of its file (mapped, or past `vm.max_map_count` copied; see
//! [`crate::body`]) that live until the client has taken them. An HTTP/1.1 connection sends one
//! response at a time and so holds one window at most; an HTTP/2 connection runs up to 100
//! streams, and a client that keeps their flow-control windows shut would have each hold one.
//! So the windows of one HTTP/2 connection share a budget (`server.h2_window_memory`): each
//! body takes one window's share with its first window and keeps it to its end (letting it go
//! while it waits on a slow upstream with nothing unsent), and a body not
//! yet begun waits, in order, until another's share is let go — its own connection's streams,
//! never another client's. A body already sending never waits again, whichever stream the
//! client reads first. A connection whose waiting bodies see none of its windows go for as long
//! as `send_timeout` gives a whole window is closed (the connection watch asks
//! [`WindowBudget::starved_for`]). The shares held, over every connection, and the waits are
//! exported.

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest single read from a blob file into memory, and the window a blob's body starts with.
pub(crate) const READ_CHUNK: u64 = 1024 * 1024;

/// How much of a blob file one window of a response body shows: what each trip to the blocking
/// pool loads and maps; on HTTP/2, with the budget its connection's windows share. A request
/// carries it as an extension set by its connection.
#[derive(Clone, Debug)]
pub struct WindowSize {
    bytes: u64,
    budget: Option<Arc<WindowBudget>>,
}

impl WindowSize {
    /// Under TLS (and HTTP/2, whose frames are copied), every byte of a window is read by the
    /// process, so the whole window is resident while it is sent: kept small.
    pub const TLS: WindowSize = WindowSize {
        bytes: READ_CHUNK,
        budget: None,
    };
    /// On a plain HTTP/1 connection windows go out by `sendfile` and the process never touches
    /// their pages; larger windows mean fewer loads, mappings and wake-ups per byte served.
    pub const PLAIN: WindowSize = WindowSize {
        bytes: 4 * READ_CHUNK,
        budget: None,
    };

    /// HTTP/2's windows: as TLS's, all of one connection's within `budget`.
    pub fn shared(budget: Arc<WindowBudget>) -> WindowSize {
        WindowSize {
            budget: Some(budget),
            ..WindowSize::TLS
        }
    }

    /// The most one window shows.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The budget this connection's windows share, if they share one.
    pub fn budget(&self) -> Option<&Arc<WindowBudget>> {
        self.budget.as_ref()
    }

    /// A body's share of the budget, one window's worth, if it fits now.
    pub fn try_charge(&self) -> Option<Arc<Charge>> {
        self.budget.as_ref()?.try_charge(self.bytes)
    }

    /// A body's share of the budget, one window's worth, once it fits; `None` without a
    /// budget.
    pub async fn charge(&self) -> Option<Arc<Charge>> {
        Some(self.budget.as_ref()?.charge(self.bytes).await)
    }
}

impl Default for WindowSize {
    fn default() -> WindowSize {
        WindowSize::TLS
    }
}

/// The budget's unit: windows are charged in whole KiB.
const UNIT: u64 = 1024;

/// The window bytes one connection's bodies may hold at once. A body takes its share, one
/// window's worth, with its first window and keeps it until it and its windows are gone: so a
/// stream the client reads never waits again (it holds its last window and its next, two
/// windows at most), and only streams not yet begun wait, in order.
#[derive(Debug)]
pub struct WindowBudget {
    units: Arc<Semaphore>,
    max_units: u32,
    held: IntGauge,
    waits: IntCounter,
    opened: Instant,
    /// Bodies waiting for their share now.
    waiting: AtomicUsize,
    /// Milliseconds since `opened` at which bodies began to wait (the oldest of those waiting).
    waiting_since_ms: AtomicU64,
    /// Milliseconds since `opened` at which a window last went (was sent, or let go).
    progress_ms: AtomicU64,
}

impl WindowBudget {
    /// A budget of `max_bytes` (at least one KiB), counted into `held` (bytes held now, every
    /// connection together) and `waits` (bodies that had to wait for their share).
    pub fn new(max_bytes: u64, held: IntGauge, waits: IntCounter) -> Arc<WindowBudget> {
        let max_units = (max_bytes / UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        Arc::new(WindowBudget {
            units: Arc::new(Semaphore::new(max_units as usize)),
            max_units,
            held,
            waits,
            opened: Instant::now(),
            waiting: AtomicUsize::new(0),
            waiting_since_ms: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
        })
    }

    /// How long bodies have waited for their share while no window of the connection went:
    /// the client takes nothing of what the budget holds. Zero when none waits.
    pub fn starved_for(&self) -> Duration {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return Duration::ZERO;
        }
        let since = self
            .waiting_since_ms
            .load(Ordering::Acquire)
            .max(self.progress_ms.load(Ordering::Acquire));
        Duration::from_millis(self.now_ms().saturating_sub(since))
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Takes `len` bytes of the budget, waiting until they fit (more than the whole budget
    /// waits for all of it).
    async fn charge(self: &Arc<Self>, len: u64) -> Arc<Charge> {
        if let Some(charge) = self.try_charge(len) {
            return charge;
        }
        self.waits.inc();
        if self.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            self.waiting_since_ms
                .store(self.now_ms(), Ordering::Release);
        }
        let _waiting = Waiting(self);
        let permit = Arc::clone(&self.units)
            .acquire_many_owned(self.units_for(len))
            .await
            .expect("the budget's semaphore is never closed");
        self.charged(len, permit)
    }

    /// Takes `len` bytes of the budget if they fit now.
    fn try_charge(self: &Arc<Self>, len: u64) -> Option<Arc<Charge>> {
        let permit = Arc::clone(&self.units)
            .try_acquire_many_owned(self.units_for(len))
            .ok()?;
        Some(self.charged(len, permit))
    }

    fn units_for(&self, len: u64) -> u32 {
        len.div_ceil(UNIT).clamp(1, u64::from(self.max_units)) as u32
    }

    fn charged(self: &Arc<Self>, len: u64, permit: OwnedSemaphorePermit) -> Arc<Charge> {
        self.held.add(len as i64);
        Arc::new(Charge {
            _permit: permit,
            len,
            budget: Arc::clone(self),
        })
    }
}

/// One body waiting for its share, counted while it waits (and when its wait is dropped).
struct Waiting<'a>(&'a WindowBudget);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A body's share of a budget, held until the body and every window it sent are gone.
#[derive(Debug)]
pub struct Charge {
    _permit: OwnedSemaphorePermit,
    len: u64,
    budget: Arc<WindowBudget>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.held.sub(self.len as i64);
    }
}

/// `bytes`, holding `charge` for as long as any view of them lives; their going counts as
/// progress.
pub fn charged(bytes: Bytes, charge: &Arc<Charge>) -> Bytes {
    Bytes::from_owner(Charged {
        bytes,
        charge: Arc::clone(charge),
    })
}

struct Charged {
    bytes: Bytes,
    charge: Arc<Charge>,
}

impl Drop for Charged {
    fn drop(&mut self) {
        let budget = &self.charge.budget;
        budget.progress_ms.store(budget.now_ms(), Ordering::Release);
    }
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_keeps_its_share_and_those_not_begun_wait_until_one_is_let_go() {
        let held = IntGauge::new("held", "held").unwrap();
        let waits = IntCounter::new("waits", "waits").unwrap();
        let budget = WindowBudget::new(2 << 20, held.clone(), waits.clone());
        let window = WindowSize::shared(Arc::clone(&budget));
        let first = window.charge().await.expect("a budget");
        let second = window.try_charge().expect("a 1 MiB share of 2 MiB");
        assert_eq!(held.get(), 2 << 20);
        assert!(
            window.try_charge().is_none(),
            "a third share would exceed 2 MiB"
        );
        // The first body's windows come and go under its one share.
        let sent = charged(Bytes::from(vec![7u8; 4096]), &first);
        let view = sent.slice(10..20);
        drop(sent);
        let waiting = {
            let window = window.clone();
            tokio::spawn(async move { window.charge().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "it waits while two shares are held");
        assert!(budget.starved_for() > Duration::ZERO);
        drop(view); // a window went: progress
        assert!(budget.starved_for() < Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "the share is the body's: its windows going do not let it go"
        );
        drop(first); // the body ends
        let third = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the share fits once another is let go")
            .unwrap();
        assert_eq!((held.get(), waits.get()), (2 << 20, 1));
        assert_eq!(budget.starved_for(), Duration::ZERO, "none waits");
        drop((second, third));
        assert_eq!(held.get(), 0);
        // More than the whole budget takes all of it.
        let all = budget
            .try_charge(8 << 20)
            .expect("the whole budget is free");
        assert!(budget.try_charge(1).is_none());
        drop(all);
        assert!(budget.try_charge(1).is_some());
    }
}
