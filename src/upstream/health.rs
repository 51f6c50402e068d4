//! What the mirror remembers about each upstream endpoint: whether it is down (and until when),
//! whether it is rate limiting us, and the last rate-limit headers it sent.
//!
//! A failed endpoint is skipped for a cool-down; when that ends, exactly one request probes it
//! (the others keep skipping), so a dead endpoint costs one failure per cool-down, not one per
//! request. Pure state: times are passed in, nothing here does I/O.

use http::HeaderMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Healthy.
    Up,
    /// Its cool-down is over and this request is the one that probes it.
    Probe,
    /// In its cool-down (or another request is probing it): skip.
    Down,
}

/// The health of one endpoint.
#[derive(Debug)]
pub struct Health {
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    down_until: Option<Instant>,
    last_error: Option<String>,
    rate_limited_until: Option<Instant>,
    rate_limit: Option<RateLimit>,
}

/// A copy of an endpoint's health for status displays and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub up: bool,
    pub last_error: Option<String>,
    /// Time left before manifest GETs are sent again after a 429.
    pub rate_limited_for: Option<Duration>,
    pub rate_limit: Option<RateLimit>,
}

impl Health {
    pub fn new(cooldown: Duration) -> Health {
        Health {
            cooldown,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain figures: a panic elsewhere while the lock was held leaves nothing half-done.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Decides whether a request may use the endpoint; claims the probe when one is due.
    pub fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state();
        match state.down_until {
            None => Admission::Up,
            Some(until) if now < until => Admission::Down,
            Some(_) => {
                state.down_until = Some(now + self.cooldown);
                Admission::Probe
            }
        }
    }

    pub fn mark_up(&self) {
        let mut state = self.state();
        state.down_until = None;
        state.last_error = None;
    }

    pub fn mark_down(&self, now: Instant, error: &str) {
        let mut state = self.state();
        state.down_until = Some(now + self.cooldown);
        state.last_error = Some(error.to_string());
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
        pause
    }

    /// Time left in a rate-limit pause.
    pub fn rate_limit_pause(&self, now: Instant) -> Option<Duration> {
        let until = self.state().rate_limited_until?;
        (now < until).then(|| until - now)
    }

    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let state = self.state();
        HealthSnapshot {
            up: state.down_until.is_none(),
            last_error: state.last_error.clone(),
            rate_limited_for: state
                .rate_limited_until
                .filter(|u| now < *u)
                .map(|u| u - now),
            rate_limit: state.rate_limit.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_per_cooldown() {
        let h = Health::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(h.admit(t0), Admission::Up);
        h.mark_down(t0, "refused");
        assert_eq!(h.admit(t0 + Duration::from_secs(5)), Admission::Down);
        assert_eq!(h.admit(t0 + Duration::from_secs(11)), Admission::Probe);
        assert_eq!(
            h.admit(t0 + Duration::from_secs(12)),
            Admission::Down,
            "only one prober"
        );
        h.mark_up();
        assert_eq!(h.admit(t0 + Duration::from_secs(12)), Admission::Up);
        assert!(h.snapshot(t0).up);
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
        let h = Health::new(Duration::from_secs(10));
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
        let fresh = Health::new(Duration::from_secs(10));
        assert_eq!(fresh.rate_limited(t0, None), DEFAULT_RATE_LIMIT_PAUSE);
    }

    #[test]
    fn absurd_rate_limit_headers_give_a_bounded_pause() {
        let t0 = Instant::now();
        let h = Health::new(Duration::from_secs(10));
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
