//! An endpoint's state changes over the last hour (up, down, probing, rate limited), for the
//! operator console. Bounded by age ([`KEPT_FOR`]) and count ([`MOST_CHANGES`]: an endpoint
//! flapping every second keeps its latest changes). Pure: times are passed in.

use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far back changes are kept.
pub const KEPT_FOR: Duration = Duration::from_secs(3600);
/// The most changes kept per endpoint.
pub const MOST_CHANGES: usize = 256;

/// What an endpoint was doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    Up,
    /// Backing off after an outage.
    Down,
    /// One request is trying it after its back-off.
    Probing,
    /// Paused after a 429 (manifest GETs wait; `until` says how long).
    RateLimited,
    /// Not known: before the oldest change kept when more than [`MOST_CHANGES`] came within
    /// the hour.
    Unknown,
}

impl EndpointState {
    pub fn name(self) -> &'static str {
        match self {
            EndpointState::Up => "up",
            EndpointState::Down => "down",
            EndpointState::Probing => "probing",
            EndpointState::RateLimited => "rate limited",
            EndpointState::Unknown => "unknown",
        }
    }
}

/// One change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Unix milliseconds.
    pub at: u64,
    pub state: EndpointState,
    /// For a rate-limit pause: when it ends (Unix milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
    /// The error that took it down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The changes kept, and the state before the oldest of them.
#[derive(Clone, Debug)]
pub struct Timeline {
    changes: VecDeque<Change>,
    before: EndpointState,
    /// When `before` is a rate-limit pause: when it ends (Unix milliseconds).
    before_until: Option<u64>,
}

impl Default for Timeline {
    fn default() -> Timeline {
        Timeline {
            changes: VecDeque::new(),
            before: EndpointState::Up,
            before_until: None,
        }
    }
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Timeline {
    /// Records a change at `at`; the same state again is no change (a rate-limit pause
    /// renewed is, since its end moves).
    pub fn record(
        &mut self,
        at: SystemTime,
        state: EndpointState,
        until: Option<SystemTime>,
        error: Option<&str>,
    ) {
        if self.latest() == state && state != EndpointState::RateLimited {
            return;
        }
        let error = error.map(|e| e.chars().take(200).collect());
        self.changes.push_back(Change {
            at: unix_ms(at),
            state,
            until: until.map(unix_ms),
            error,
        });
        self.forget_before(at);
    }

    /// The state after the latest change.
    pub fn latest(&self) -> EndpointState {
        self.changes.back().map_or(self.before, |c| c.state)
    }

    fn forget_before(&mut self, now: SystemTime) {
        let oldest = unix_ms(now).saturating_sub(KEPT_FOR.as_millis() as u64);
        while self.changes.len() > MOST_CHANGES
            || self.changes.front().is_some_and(|c| c.at < oldest)
        {
            let Some(gone) = self.changes.pop_front() else {
                break;
            };
            self.before = if gone.at >= oldest {
                // Dropped for room: what came before the oldest kept is not all known.
                EndpointState::Unknown
            } else if gone.state == EndpointState::RateLimited
                && gone.until.is_some_and(|until| until < oldest)
            {
                // A pause that ended before the hour began (nothing was recorded after it).
                EndpointState::Up
            } else {
                gone.state
            };
            self.before_until = gone
                .until
                .filter(|_| self.before == EndpointState::RateLimited);
        }
    }

    /// The state an hour before `now`, and the changes since, oldest first. A rate-limit
    /// pause that began before the hour and ends within it is listed as a change at the hour's
    /// start, with its end.
    pub fn last_hour(&self, now: SystemTime) -> (EndpointState, Vec<Change>) {
        let mut copy = self.clone();
        copy.forget_before(now);
        let mut changes: Vec<Change> = copy.changes.into_iter().collect();
        if let (EndpointState::RateLimited, Some(until)) = (copy.before, copy.before_until) {
            let start = unix_ms(now).saturating_sub(KEPT_FOR.as_millis() as u64);
            changes.insert(
                0,
                Change {
                    at: start,
                    state: EndpointState::RateLimited,
                    until: Some(until),
                    error: None,
                },
            );
            return (EndpointState::Up, changes);
        }
        (copy.before, changes)
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_changes_of_the_last_hour_and_what_came_before() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut timeline = Timeline::default();
        timeline.record(t0, EndpointState::Down, None, Some("refused"));
        timeline.record(t0, EndpointState::Down, None, Some("refused"));
        assert_eq!(timeline.len(), 1, "the same state is no change");
        timeline.record(
            t0 + Duration::from_secs(2),
            EndpointState::Probing,
            None,
            None,
        );
        timeline.record(t0 + Duration::from_secs(3), EndpointState::Up, None, None);
        let (before, changes) = timeline.last_hour(t0 + Duration::from_secs(60));
        assert_eq!(before, EndpointState::Up);
        assert_eq!(changes.len(), 3);
        assert_eq!(changes[0].error.as_deref(), Some("refused"));
        // An hour and a bit later only the latest state is left, as the state before.
        let later = t0 + Duration::from_secs(3700);
        let (before, changes) = timeline.last_hour(later);
        assert!(changes.is_empty());
        assert_eq!(before, EndpointState::Up);
        timeline.record(
            later,
            EndpointState::RateLimited,
            Some(later + Duration::from_secs(60)),
            None,
        );
        assert_eq!(timeline.len(), 1);
        assert_eq!(timeline.latest(), EndpointState::RateLimited);
        // Idle after the pause: an hour on, it is over, not "rate limited all hour".
        let (before, _) = timeline.last_hour(later + Duration::from_secs(3700));
        assert_eq!(before, EndpointState::Up);
        // A pause that began before the hour and ends within it keeps its end.
        let (_, changes) = timeline.last_hour(later + Duration::from_secs(3630));
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].state, EndpointState::RateLimited);
        assert_eq!(
            changes[0].until,
            Some(unix_ms(later + Duration::from_secs(60)))
        );
    }

    #[test]
    fn a_day_of_flapping_keeps_memory_flat() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut timeline = Timeline::default();
        for second in 0..86_400u64 {
            let state = if second % 2 == 0 {
                EndpointState::Down
            } else {
                EndpointState::Up
            };
            timeline.record(t0 + Duration::from_secs(second), state, None, Some("reset"));
            assert!(timeline.len() <= MOST_CHANGES);
        }
        let (before, changes) = timeline.last_hour(t0 + Duration::from_secs(86_400));
        assert_eq!(changes.len(), MOST_CHANGES);
        assert_eq!(before, EndpointState::Unknown, "changes dropped for room");
        // An hour later the kept ones aged out: the state before is the last one's.
        let later = t0 + Duration::from_secs(86_400 + 3_700);
        assert_eq!(timeline.last_hour(later), (EndpointState::Up, Vec::new()));
    }
}
