//! What the mirror remembers about each upstream endpoint: whether it is backing off after an
//! outage (and until when), whether it is rate limiting us, and the last rate-limit headers it
//! sent.
//!
//! An endpoint that had an outage backs off: a pause of about a second, doubling with each
//! failed probe up to the registry's `failover_cooldown`. The pause only orders endpoints:
//! requests skip it while another endpoint may answer, and one request at a time probes it
//! (when the pause is over, or at once for a request with nowhere else to go), the others
//! joining that probe rather than piling onto a dead host. Any answer but an outage ends the
//! back-off at once. Pure state: times are passed in, nothing here does I/O.

use super::timeline::{Change, EndpointState, Timeline};
use http::HeaderMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio::time::Instant;

/// The first pause after an outage; it doubles with each failed probe, up to the registry's
/// `failover_cooldown`.
pub const FIRST_PAUSE: Duration = Duration::from_secs(1);

/// Wait after a 429 that said nothing about when to come back.
const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(60);
/// The longest pause after a 429, whatever upstream's headers say (a probe follows it).
const LONGEST_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(3600);

/// Docker Hub's rate-limit headers, as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Pulls allowed per window (`ratelimit-limit: 100;w=21600`).
    pub limit: Option<u64>,
    /// The window of the limit.
    pub window: Option<Duration>,
    /// Pulls left (`ratelimit-remaining`).
    pub remaining: Option<u64>,
    /// The address the limit is counted for (`docker-ratelimit-source`).
    pub source: Option<String>,
    pub seen_at: SystemTime,
}

/// Parses the rate-limit headers, if any are present.
pub fn parse_rate_limit(headers: &HeaderMap) -> Option<RateLimit> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (limit_text, remaining_text, source) = (
        text("ratelimit-limit"),
        text("ratelimit-remaining"),
        text("docker-ratelimit-source"),
    );
    if limit_text.is_none() && remaining_text.is_none() {
        return None;
    }
    let (limit, window) = limit_text.map(parse_quota).unwrap_or((None, None));
    let remaining = remaining_text.and_then(|t| parse_quota(t).0);
    Some(RateLimit {
        limit,
        window,
        remaining,
        source: source.map(str::to_string),
        seen_at: SystemTime::now(),
    })
}

/// `100;w=21600` -> (100, 6 h).
fn parse_quota(text: &str) -> (Option<u64>, Option<Duration>) {
    let mut parts = text.split(';');
    let count = parts.next().and_then(|c| c.trim().parse().ok());
    let window = parts
        .filter_map(|p| p.trim().strip_prefix("w="))
        .find_map(|w| w.parse().ok())
        .map(Duration::from_secs);
    (count, window)
}

/// Whether a request may use an endpoint now.
#[derive(Debug)]
pub enum Admission {
    /// Healthy.
    Up,
    /// Backing off, and this request is the one that tries it; the guard releases the probe
    /// when dropped, however the request ends (its client may go away).
    Probe(ProbeGuard),
    /// Backing off while another request probes it: wait for that probe's end
    /// ([`Health::probe_ended`]).
    Joining(watch::Receiver<ProbeEnd>),
    /// Backing off, and no probe is due: skip it while another endpoint may answer.
    Cooling,
}

/// How a probe ended, as the requests that joined it see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeEnd {
    Running,
    /// It has an outcome (the endpoint is up, or still down).
    Answered,
    /// Its request went away before an outcome: whoever joined it probes anew.
    Abandoned,
}

/// The one probe of an endpoint under way; dropping it lets the next request probe. Owns its
/// hold on the endpoint's health, so that a probe can run in the background.
#[derive(Debug)]
pub struct ProbeGuard {
    health: Arc<Health>,
    id: u64,
    answered: bool,
}

impl ProbeGuard {
    /// The probe has its outcome (recorded by `mark_up` or `mark_down`).
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        let mut state = self.health.state();
        if state.probe.as_ref().is_some_and(|p| p.id == self.id) {
            let end = if self.answered {
                ProbeEnd::Answered
            } else {
                // Back to backing off until someone probes again (unless a request that was
                // under way found it up meanwhile).
                if state.down_until.is_some() && state.timeline.latest() == EndpointState::Probing {
                    state
                        .timeline
                        .record(SystemTime::now(), EndpointState::Down, None, None);
                }
                ProbeEnd::Abandoned
            };
            if let Some(probe) = state.probe.take() {
                // Sent, then dropped: every request that joined the probe wakes to its end.
                probe.done.send_replace(end);
            }
        }
    }
}

/// The health of one endpoint.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Outages in a row (a failure counts once per probe, not once per request in flight).
    failures: u32,
    /// Backing off until then; `None` while healthy.
    down_until: Option<Instant>,
    last_error: Option<String>,
    /// The probe under way, if any.
    probe: Option<Probe>,
    /// Numbers probes, so that a finished probe's guard never ends a newer one.
    probes_started: u64,
    rate_limited_until: Option<Instant>,
    rate_limit: Option<RateLimit>,
    /// State changes over the last hour.
    timeline: Timeline,
}

#[derive(Debug)]
struct Probe {
    id: u64,
    /// Tells how the probe ended, then is dropped.
    done: watch::Sender<ProbeEnd>,
}

/// A copy of an endpoint's health for status displays and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub up: bool,
    pub last_error: Option<String>,
    /// Outages in a row.
    pub failures: u32,
    /// Time left in the back-off (requests with nowhere else to go try it anyway).
    pub backing_off_for: Option<Duration>,
    /// Time left before manifest GETs are sent again after a 429.
    pub rate_limited_for: Option<Duration>,
    pub rate_limit: Option<RateLimit>,
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain figures: a panic elsewhere while the lock was held leaves nothing half-done.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides whether a request may use the endpoint. A backing-off endpoint is probed by one
    /// request at a time: when its pause is over, or at once when `force` (the request has
    /// nowhere else to go); other requests join that probe or skip the endpoint.
    pub fn admit(self: &Arc<Self>, now: Instant, force: bool) -> Admission {
        let mut state = self.state();
        let Some(until) = state.down_until else {
            return Admission::Up;
        };
        if let Some(probe) = &state.probe {
            return Admission::Joining(probe.done.subscribe());
        }
        if now < until && !force {
            return Admission::Cooling;
        }
        state.probes_started += 1;
        state
            .timeline
            .record(SystemTime::now(), EndpointState::Probing, None, None);
        let id = state.probes_started;
        let (done, _) = watch::channel(ProbeEnd::Running);
        state.probe = Some(Probe { id, done });
        Admission::Probe(ProbeGuard {
            health: Arc::clone(self),
            id,
            answered: false,
        })
    }

    /// Waits (up to `patience`) for the probe another request runs; whether it was abandoned
    /// (its request went away before an outcome).
    pub async fn probe_ended(
        mut joined: watch::Receiver<ProbeEnd>,
        patience: std::time::Duration,
    ) -> bool {
        let _ = tokio::time::timeout(patience, joined.wait_for(|e| *e != ProbeEnd::Running)).await;
        let end = *joined.borrow();
        end == ProbeEnd::Abandoned
    }

    /// Whether the endpoint is healthy now.
    pub fn is_up(&self) -> bool {
        self.state().down_until.is_none()
    }

    /// The endpoint answered (any answer but an outage shows it is there).
    pub fn mark_up(&self) {
        let mut state = self.state();
        state.down_until = None;
        state.failures = 0;
        state.last_error = None;
        // Answers go on during a rate-limit pause (only manifest GETs wait): it stays the
        // latest change until it ends.
        let pausing = state
            .rate_limited_until
            .is_some_and(|until| Instant::now() < until);
        if !pausing || state.timeline.latest() != EndpointState::RateLimited {
            state
                .timeline
                .record(SystemTime::now(), EndpointState::Up, None, None);
        }
    }

    /// The endpoint had an outage: it backs off for a pause that doubles with each failed
    /// probe, from [`FIRST_PAUSE`] up to `longest`. Requests that were already under way when
    /// it went down do not lengthen the pause. Returns the pause.
    pub fn mark_down(
        &self,
        now: Instant,
        longest: Duration,
        probed: bool,
        error: &str,
    ) -> Duration {
        let mut state = self.state();
        if state.down_until.is_none() {
            state.failures = 1;
        } else if probed {
            state.failures = state.failures.saturating_add(1);
        }
        let pause = back_off(state.failures, longest);
        state.down_until = Some(now + pause);
        state.last_error = Some(error.to_string());
        state
            .timeline
            .record(SystemTime::now(), EndpointState::Down, None, Some(error));
        pause
    }

    /// Time left in the back-off, if the endpoint is backing off.
    pub fn back_off_left(&self, now: Instant) -> Option<Duration> {
        let until = self.state().down_until?;
        Some(until.saturating_duration_since(now))
    }

    /// Records rate-limit headers from any answer.
    pub fn observe(&self, headers: &HeaderMap) {
        if let Some(limit) = parse_rate_limit(headers) {
            self.state().rate_limit = Some(limit);
        }
    }

    /// After a 429: no manifest GETs until `Retry-After`, else until one pull frees up in the
    /// advertised window, else a minute; an hour at most. Returns the pause.
    pub fn rate_limited(&self, now: Instant, retry_after: Option<u64>) -> Duration {
        let mut state = self.state();
        let from_window = state.rate_limit.as_ref().and_then(|r| {
            let (window, limit) = (r.window?, r.limit?);
            (limit > 0).then(|| window / u32::try_from(limit).unwrap_or(u32::MAX))
        });
        let pause = retry_after
            .map(Duration::from_secs)
            .or(from_window)
            .unwrap_or(DEFAULT_RATE_LIMIT_PAUSE)
            .min(LONGEST_RATE_LIMIT_PAUSE);
        state.rate_limited_until = Some(now + pause);
        let at = SystemTime::now();
        state
            .timeline
            .record(at, EndpointState::RateLimited, Some(at + pause), None);
        pause
    }

    /// Time left in a rate-limit pause.
    pub fn rate_limit_pause(&self, now: Instant) -> Option<Duration> {
        let until = self.state().rate_limited_until?;
        (now < until).then(|| until - now)
    }

    /// The state an hour ago and the changes since.
    pub fn last_hour(&self) -> (EndpointState, Vec<Change>) {
        self.state().timeline.last_hour(SystemTime::now())
    }

    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let state = self.state();
        HealthSnapshot {
            up: state.down_until.is_none(),
            last_error: state.last_error.clone(),
            failures: state.failures,
            backing_off_for: state.down_until.filter(|u| now < *u).map(|u| u - now),
            rate_limited_for: state
                .rate_limited_until
                .filter(|u| now < *u)
                .map(|u| u - now),
            rate_limit: state.rate_limit.clone(),
        }
    }
}

/// The pause after `failures` outages in a row.
fn back_off(failures: u32, longest: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_PAUSE.saturating_mul(1 << doublings).min(longest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_at_a_time_and_the_others_join_it() {
        let h = Arc::new(Health::default());
        let longest = Duration::from_secs(10);
        let t0 = Instant::now();
        assert!(matches!(h.admit(t0, false), Admission::Up));
        assert_eq!(h.mark_down(t0, longest, false, "refused"), FIRST_PAUSE);
        let soon = t0 + Duration::from_millis(500);
        assert!(matches!(h.admit(soon, false), Admission::Cooling));
        // A request with nowhere else to go probes at once; the next one joins it.
        let probe = h.admit(soon, true);
        assert!(matches!(probe, Admission::Probe(_)));
        let Admission::Joining(joined) = h.admit(soon, true) else {
            panic!("a second prober")
        };
        assert!(matches!(
            h.admit(t0 + longest, false),
            Admission::Joining(_)
        ));
        h.mark_up();
        let Admission::Probe(guard) = probe else {
            unreachable!()
        };
        guard.answered();
        assert!(
            joined.has_changed().is_err(),
            "the probe is over: its joiners wake"
        );
        assert_eq!(*joined.borrow(), ProbeEnd::Answered);
        assert!(matches!(h.admit(soon, false), Admission::Up));
        assert!(h.snapshot(t0).up);
    }

    #[test]
    fn a_probe_whose_request_goes_away_releases_its_slot() {
        let h = Arc::new(Health::default());
        let t0 = Instant::now();
        h.mark_down(t0, Duration::from_secs(10), false, "reset");
        let probe = h.admit(t0 + FIRST_PAUSE, false);
        assert!(matches!(probe, Admission::Probe(_)));
        let Admission::Joining(joined) = h.admit(t0, true) else {
            panic!("no probe to join")
        };
        drop(probe); // the client went away mid-probe
        assert_eq!(
            *joined.borrow(),
            ProbeEnd::Abandoned,
            "joiners must probe anew"
        );
        assert!(matches!(
            h.admit(t0 + FIRST_PAUSE, false),
            Admission::Probe(_)
        ));
    }

    #[test]
    fn the_pause_doubles_per_failed_probe_not_per_request_in_flight() {
        let h = Health::default();
        let longest = Duration::from_secs(15);
        let t0 = Instant::now();
        assert_eq!(h.mark_down(t0, longest, false, "x"), Duration::from_secs(1));
        // Requests that were in flight when it went down fail too: no longer pause.
        for _ in 0..10 {
            assert_eq!(h.mark_down(t0, longest, false, "x"), Duration::from_secs(1));
        }
        let pauses: Vec<u64> = (0..5)
            .map(|_| h.mark_down(t0, longest, true, "x").as_secs())
            .collect();
        assert_eq!(pauses, [2, 4, 8, 15, 15]);
        h.mark_up();
        assert_eq!(h.mark_down(t0, longest, true, "x"), Duration::from_secs(1));
    }

    #[test]
    fn parses_docker_hub_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        headers.insert("ratelimit-remaining", "76;w=21600".parse().unwrap());
        headers.insert("docker-ratelimit-source", "192.0.2.1".parse().unwrap());
        let r = parse_rate_limit(&headers).unwrap();
        assert_eq!(r.limit, Some(100));
        assert_eq!(r.window, Some(Duration::from_secs(21600)));
        assert_eq!(r.remaining, Some(76));
        assert_eq!(r.source.as_deref(), Some("192.0.2.1"));
        assert_eq!(parse_rate_limit(&HeaderMap::new()), None);
    }

    #[test]
    fn rate_limit_pause_prefers_retry_after_then_window() {
        let h = Health::default();
        let t0 = Instant::now();
        assert_eq!(h.rate_limited(t0, Some(7)), Duration::from_secs(7));
        assert_eq!(
            h.rate_limit_pause(t0 + Duration::from_secs(2)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(h.rate_limit_pause(t0 + Duration::from_secs(8)), None);
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        h.observe(&headers);
        assert_eq!(h.rate_limited(t0, None), Duration::from_secs(216));
        let fresh = Health::default();
        assert_eq!(fresh.rate_limited(t0, None), DEFAULT_RATE_LIMIT_PAUSE);
    }

    #[test]
    fn absurd_rate_limit_headers_give_a_bounded_pause() {
        let t0 = Instant::now();
        let h = Health::default();
        assert_eq!(h.rate_limited(t0, Some(u64::MAX)), LONGEST_RATE_LIMIT_PAUSE);
        let mut headers = HeaderMap::new();
        // 2^32 pulls per window: as a u32, 0.
        headers.insert("ratelimit-limit", "4294967296;w=60".parse().unwrap());
        h.observe(&headers);
        assert!(h.rate_limited(t0, None) < Duration::from_secs(1));
        headers.insert(
            "ratelimit-limit",
            "1;w=18446744073709551615".parse().unwrap(),
        );
        h.observe(&headers);
        assert_eq!(h.rate_limited(t0, None), LONGEST_RATE_LIMIT_PAUSE);
        assert!(h.rate_limit_pause(t0).is_some());
    }
}
