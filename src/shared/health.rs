//! Whether the bucket is worth asking: up until a read fails; then down, skipped by every
//! download, with one probe at a time once `recheck_after` has passed (so a bucket that hangs
//! costs one request its time limit per `recheck_after`, not every miss). While up, a read
//! that has waited [`SLOW_READ`] for its answer is a sign of trouble: reads starting then skip
//! the bucket until it answers or fails.
//!
//! Only reads (GET, HEAD) and failures while reading a body decide: an upload refused (a key
//! that may read but not write) or slow (a thin uplink) says nothing of whether reads work.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A read still waiting for its answer after this long holds further reads off.
pub const SLOW_READ: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Health {
    recheck_after: Duration,
    /// A probe that has not reported within this long is taken as lost (its task dropped).
    probe_lost_after: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    up: bool,
    failed_at: Option<Instant>,
    probing_since: Option<Instant>,
    /// Reads waiting for their answer, by number: when each started.
    waiting: BTreeMap<u64, Instant>,
    next: u64,
}

/// A read in flight; it stops counting as waiting when dropped.
pub struct Asking<'a> {
    health: &'a Health,
    number: u64,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.health.state().waiting.remove(&self.number);
    }
}

/// What a report changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    WentDown,
    CameBack,
}

impl Health {
    pub fn new(recheck_after: Duration, probe_lost_after: Duration) -> Health {
        Health {
            recheck_after,
            probe_lost_after,
            state: Mutex::new(State {
                up: true,
                failed_at: None,
                probing_since: None,
                waiting: BTreeMap::new(),
                next: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("bucket health lock poisoned")
    }

    pub fn is_up(&self) -> bool {
        self.state().up
    }

    /// A read may go out now (see [`Health::may_ask`]): counted as waiting until dropped.
    pub fn begin(&self) -> Option<Asking<'_>> {
        if !self.may_ask() {
            return None;
        }
        let mut state = self.state();
        let number = state.next;
        state.next += 1;
        state.waiting.insert(number, Instant::now());
        Some(Asking {
            health: self,
            number,
        })
    }

    /// Whether to send a request now: up, and no read has waited [`SLOW_READ`] for its
    /// answer. While down, `true` for one caller at a time once `recheck_after` has passed
    /// since the last failure: that caller is the probe, and must report how it went.
    fn may_ask(&self) -> bool {
        let mut state = self.state();
        if state.up {
            let slow = state
                .waiting
                .values()
                .next()
                .is_some_and(|t| t.elapsed() >= SLOW_READ);
            return !slow;
        }
        let due = state
            .failed_at
            .is_none_or(|t| t.elapsed() >= self.recheck_after);
        let probing = state
            .probing_since
            .is_some_and(|t| t.elapsed() < self.probe_lost_after);
        if due && !probing {
            state.probing_since = Some(Instant::now());
            return true;
        }
        false
    }

    /// Whether a probe is due: down, `recheck_after` past, and nobody probing.
    pub fn probe_due(&self) -> bool {
        let state = self.state();
        !state.up
            && state
                .failed_at
                .is_none_or(|t| t.elapsed() >= self.recheck_after)
            && state
                .probing_since
                .is_none_or(|t| t.elapsed() >= self.probe_lost_after)
    }

    pub fn succeeded(&self) -> Change {
        let mut state = self.state();
        state.probing_since = None;
        if state.up {
            return Change::None;
        }
        state.up = true;
        Change::CameBack
    }

    pub fn failed(&self) -> Change {
        let mut state = self.state();
        state.probing_since = None;
        state.failed_at = Some(Instant::now());
        if !state.up {
            return Change::None;
        }
        state.up = false;
        Change::WentDown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_means_skipped_then_one_probe_at_a_time() {
        let health = Health::new(Duration::from_millis(50), Duration::from_secs(5));
        assert!(health.may_ask() && health.may_ask(), "up: everyone asks");
        assert_eq!(health.failed(), Change::WentDown);
        assert_eq!(health.failed(), Change::None);
        assert!(!health.may_ask(), "down: skipped");
        assert!(!health.probe_due());
        std::thread::sleep(Duration::from_millis(60));
        assert!(health.probe_due());
        assert!(health.may_ask(), "the probe");
        assert!(!health.may_ask(), "only one probe at a time");
        assert!(!health.probe_due());
        assert_eq!(health.failed(), Change::None);
        assert!(!health.may_ask(), "the probe failed: skipped again");
        std::thread::sleep(Duration::from_millis(60));
        assert!(health.may_ask());
        assert_eq!(health.succeeded(), Change::CameBack);
        assert!(health.is_up() && health.may_ask() && health.may_ask());
    }

    #[test]
    fn a_read_waiting_long_holds_further_reads_off_until_it_ends() {
        let health = Health::new(Duration::ZERO, Duration::from_secs(5));
        let first = health.begin().expect("up");
        assert!(
            health.begin().is_some(),
            "a read just started holds nothing off"
        );
        std::thread::sleep(SLOW_READ + Duration::from_millis(20));
        assert!(
            health.begin().is_none(),
            "a slow read holds further reads off"
        );
        drop(first);
        assert!(health.begin().is_some(), "it answered: reads go on");
    }

    #[test]
    fn a_lost_probe_does_not_stop_probing() {
        let health = Health::new(Duration::ZERO, Duration::from_millis(30));
        health.failed();
        assert!(health.may_ask());
        assert!(!health.may_ask());
        std::thread::sleep(Duration::from_millis(40));
        assert!(health.may_ask(), "the first probe never reported");
    }
}
