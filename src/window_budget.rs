//! The windows a connection's blob bodies are sent in: how large ([`WindowSize`]), and what
//! those of one HTTP/2 connection may hold at once ([`WindowBudget`]).
//!
//! A blob's body is sent in windows of its file (mapped, or past `vm.max_map_count` copied; see
//! [`crate::body`]) that live until the client has taken them. An HTTP/1.1 connection sends one
//! response at a time and so holds one window at most; an HTTP/2 connection runs up to 100
//! streams, and a client that keeps their flow-control windows shut would have each hold one.
//! So the windows of one HTTP/2 connection share a budget (`server.h2_window_memory`): a body
//! whose next window does not fit waits until the connection's other bodies have handed theirs
//! to the client — its own streams, never another client's. A client that takes none of them
//! has stopped reading, and `send_timeout` closes its connection as any other's. The bytes
//! held, over every connection, and the waits are exported.

use bytes::Bytes;
use prometheus::{IntCounter, IntGauge};
use std::sync::Arc;
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
    pub fn budget(&self) -> Option<&WindowBudget> {
        self.budget.as_deref()
    }

    /// `bytes` as a window: charged to the budget, if there is one, when they fit now.
    pub fn try_charge(&self, bytes: Bytes) -> Option<Bytes> {
        let Some(budget) = &self.budget else {
            return Some(bytes);
        };
        let charge = budget.try_charge(bytes.len() as u64)?;
        Some(charged(bytes, charge))
    }
}

impl Default for WindowSize {
    fn default() -> WindowSize {
        WindowSize::TLS
    }
}

/// The budget's unit: windows are charged in whole KiB.
const UNIT: u64 = 1024;

/// The window bytes one connection's bodies may hold at once.
#[derive(Debug)]
pub struct WindowBudget {
    units: Arc<Semaphore>,
    max_units: u32,
    held: IntGauge,
    waits: IntCounter,
}

impl WindowBudget {
    /// A budget of `max_bytes` (at least one KiB), counted into `held` (bytes held now, every
    /// connection together) and `waits` (windows that had to wait for it).
    pub fn new(max_bytes: u64, held: IntGauge, waits: IntCounter) -> Arc<WindowBudget> {
        let max_units = (max_bytes / UNIT).clamp(1, u64::from(u32::MAX >> 4)) as u32;
        Arc::new(WindowBudget {
            units: Arc::new(Semaphore::new(max_units as usize)),
            max_units,
            held,
            waits,
        })
    }

    /// Takes `len` bytes of the budget, waiting until they fit (a window larger than the whole
    /// budget waits for all of it).
    pub async fn charge(&self, len: u64) -> Charge {
        let units = self.units_for(len);
        let permit = match Arc::clone(&self.units).try_acquire_many_owned(units) {
            Ok(permit) => permit,
            Err(_) => {
                self.waits.inc();
                Arc::clone(&self.units)
                    .acquire_many_owned(units)
                    .await
                    .expect("the budget's semaphore is never closed")
            }
        };
        self.charged(len, permit)
    }

    /// Takes `len` bytes of the budget if they fit now.
    pub fn try_charge(&self, len: u64) -> Option<Charge> {
        let permit = Arc::clone(&self.units)
            .try_acquire_many_owned(self.units_for(len))
            .ok()?;
        Some(self.charged(len, permit))
    }

    fn units_for(&self, len: u64) -> u32 {
        len.div_ceil(UNIT).clamp(1, u64::from(self.max_units)) as u32
    }

    fn charged(&self, len: u64, permit: OwnedSemaphorePermit) -> Charge {
        self.held.add(len as i64);
        Charge {
            _permit: permit,
            len,
            held: self.held.clone(),
        }
    }
}

/// Part of a budget, held until dropped.
#[derive(Debug)]
pub struct Charge {
    _permit: OwnedSemaphorePermit,
    len: u64,
    held: IntGauge,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.sub(self.len as i64);
    }
}

/// `bytes`, holding `charge` for as long as any view of them lives.
pub fn charged(bytes: Bytes, charge: Charge) -> Bytes {
    Bytes::from_owner(Charged {
        bytes,
        _charge: charge,
    })
}

struct Charged {
    bytes: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for Charged {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_window_that_does_not_fit_waits_until_another_is_let_go() {
        let held = IntGauge::new("held", "held").unwrap();
        let waits = IntCounter::new("waits", "waits").unwrap();
        let budget = WindowBudget::new(3 << 20, held.clone(), waits.clone());
        let first = charged(
            Bytes::from(vec![7u8; 1 << 20]),
            budget.charge(2 << 20).await,
        );
        assert_eq!(held.get(), 2 << 20);
        assert!(
            budget.try_charge(2 << 20).is_none(),
            "2 + 2 MiB exceed 3 MiB"
        );
        let waiting = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { budget.charge(2 << 20).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "it waits while the first window lives"
        );
        let view = first.slice(10..20);
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "a view of the window still holds it"
        );
        drop(view);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the window fits once the first is let go")
            .unwrap();
        assert_eq!((held.get(), waits.get()), (2 << 20, 1));
        drop(second);
        assert_eq!(held.get(), 0);
        // Larger than the whole budget: takes all of it.
        let all = budget
            .try_charge(8 << 20)
            .expect("the whole budget is free");
        assert!(budget.try_charge(1).is_none());
        drop(all);
        assert!(budget.try_charge(1).is_some());
    }
}
