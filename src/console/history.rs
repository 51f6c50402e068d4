//! The last hour, minute by minute: what the counters added in each minute, kept in a ring of
//! [`MINUTES`] entries (plus the minute under way), so its memory is the same after a minute
//! and after a year. Pure: the caller passes the time and the counters' totals.

use crate::metrics::Totals;
use serde::Serialize;
use std::collections::VecDeque;

/// Complete minutes kept.
pub const MINUTES: usize = 60;

/// What the counters added in one minute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// Unix seconds of the minute's start.
    pub start: u64,
    /// Seconds of the minute the counts cover: 60, or fewer for the minute under way.
    pub seconds: u64,
    #[serde(flatten)]
    pub counts: Totals,
}

/// The ring of minutes.
#[derive(Debug)]
pub struct History {
    minutes: VecDeque<Minute>,
    /// The minute under way (Unix seconds / 60).
    current: u64,
    /// The totals when it began.
    at_start: Totals,
    /// When counting began (Unix seconds): the first minute covers only the rest of it.
    since: u64,
}

impl History {
    /// Starts counting at `now` (Unix seconds) from `totals`.
    pub fn new(now: u64, totals: Totals) -> History {
        History {
            minutes: VecDeque::with_capacity(MINUTES),
            current: now / 60,
            at_start: totals,
            since: now,
        }
    }

    /// Records the counters' totals at `now`: minutes that ended since the last observation are
    /// closed (what the counters added since goes to the first of them; a gap of minutes
    /// nobody observed, such as a suspended machine, counts as idle). A clock that went back
    /// changes nothing.
    pub fn observe(&mut self, now: u64, totals: Totals) {
        let minute = now / 60;
        if minute <= self.current {
            return;
        }
        let start = self.current * 60;
        self.push(Minute {
            start,
            seconds: (start + 60).saturating_sub(self.since.max(start)).max(1),
            counts: totals.since(&self.at_start),
        });
        let idle_from = (self.current + 1).max(minute.saturating_sub(MINUTES as u64));
        for idle in idle_from..minute {
            self.push(Minute {
                start: idle * 60,
                seconds: 60,
                counts: Totals::default(),
            });
        }
        self.current = minute;
        self.at_start = totals;
    }

    fn push(&mut self, minute: Minute) {
        if self.minutes.len() == MINUTES {
            self.minutes.pop_front();
        }
        self.minutes.push_back(minute);
    }

    /// The complete minutes kept, oldest first, then the minute under way at `now` with what
    /// the counters added in it so far.
    pub fn minutes(&self, now: u64, totals: Totals) -> Vec<Minute> {
        let mut all: Vec<Minute> = self.minutes.iter().copied().collect();
        let start = self.current * 60;
        all.push(Minute {
            start,
            seconds: now.saturating_sub(self.since.max(start)).clamp(1, 60),
            counts: totals.since(&self.at_start),
        });
        all
    }

    /// Complete minutes kept.
    pub fn len(&self) -> usize {
        self.minutes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
    }

    /// Entries the ring has room for without growing.
    pub fn capacity(&self) -> usize {
        self.minutes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(requests: u64) -> Totals {
        Totals {
            requests,
            ..Totals::default()
        }
    }

    #[test]
    fn each_minute_gets_what_the_counters_added_in_it() {
        let t0 = 1_000_040; // 20 s into a minute
        let mut history = History::new(t0, totals(0));
        history.observe(t0 + 10, totals(3));
        history.observe(t0 + 50, totals(5)); // next minute, 10 s in
        history.observe(t0 + 70, totals(9));
        let minutes = history.minutes(t0 + 75, totals(10));
        assert_eq!(minutes.len(), 2);
        assert_eq!(minutes[0].counts.requests, 5);
        assert_eq!(minutes[0].start % 60, 0);
        assert_eq!(minutes[0].seconds, 40, "counting began 20 s into it");
        assert_eq!(minutes[1].counts.requests, 5, "the minute under way");
        assert_eq!(minutes[1].seconds, 35);
        let sum: u64 = minutes.iter().map(|m| m.counts.requests).sum();
        assert_eq!(sum, 10, "every request counted once");
    }

    #[test]
    fn a_gap_is_idle_minutes_and_a_clock_going_back_changes_nothing() {
        let t0 = 600_000;
        let mut history = History::new(t0, totals(0));
        history.observe(t0 + 5 * 60, totals(4));
        let minutes = history.minutes(t0 + 5 * 60, totals(4));
        assert_eq!(minutes.len(), 6);
        assert_eq!(minutes[0].counts.requests, 4);
        assert!(minutes[1..].iter().all(|m| m.counts.requests == 0));
        history.observe(t0, totals(7));
        assert_eq!(history.len(), 5);
        // A gap of days adds an hour of idle minutes, not days of them.
        history.observe(t0 + 3 * 86_400, totals(8));
        assert_eq!(history.len(), MINUTES);
    }

    #[test]
    fn a_day_of_minutes_keeps_memory_flat() {
        let t0 = 1_700_000_000 / 60 * 60;
        let mut history = History::new(t0, totals(0));
        let mut capacity_after_an_hour = 0;
        for second in (0..86_400).step_by(7) {
            history.observe(t0 + second, totals(second));
            if second == 3_605 {
                capacity_after_an_hour = history.capacity();
            }
            assert!(history.len() <= MINUTES);
        }
        assert_eq!(history.len(), MINUTES);
        assert_eq!(
            history.capacity(),
            capacity_after_an_hour,
            "the ring never grew"
        );
        history.observe(t0 + 86_400, totals(86_400));
        let minutes = history.minutes(t0 + 86_400, totals(86_400));
        assert_eq!(minutes.len(), MINUTES + 1);
        assert_eq!(minutes[0].start, t0 + 86_400 - 60 * 60);
        // Every minute of the last hour counted its own 60 seconds (sampled every 7 s).
        assert!(minutes[..MINUTES]
            .iter()
            .all(|m| (53..=67).contains(&m.counts.requests)));
    }
}
