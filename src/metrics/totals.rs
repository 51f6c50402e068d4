//! Sums over the counters for the operator console: blob and manifest outcomes and bytes
//! ([`Snapshot`]), and the totals its per-minute history samples ([`Totals`]). Read from the
//! same series `/metrics` exports, so the two never disagree.

use super::Metrics;
use prometheus::core::Collector;
use prometheus::IntCounterVec;
use serde::Serialize;

/// Blob and manifest outcomes and bytes since start-up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub hits: u64,
    pub misses: u64,
    pub joins: u64,
    pub stale: u64,
    pub bypass: u64,
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
}

/// What the console's history counts, since start-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Requests answered, every route.
    pub requests: u64,
    /// Blob and manifest answers the upstream did not send again: hits, joins, stale answers.
    pub hits: u64,
    /// Blob and manifest answers fetched from upstream for the asking client.
    pub misses: u64,
    /// Body bytes served to clients from the cache (`regmirror_served_bytes_total{source="cache"}`).
    pub bytes_from_cache: u64,
    /// Blob bytes received from upstream (`regmirror_upstream_bytes_total`).
    pub bytes_from_upstream: u64,
    /// Upstream requests that ended in a connection error, a 429 or a 5xx.
    pub upstream_errors: u64,
}

impl Totals {
    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            requests: self.requests.saturating_sub(earlier.requests),
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            bytes_from_cache: self
                .bytes_from_cache
                .saturating_sub(earlier.bytes_from_cache),
            bytes_from_upstream: self
                .bytes_from_upstream
                .saturating_sub(earlier.bytes_from_upstream),
            upstream_errors: self.upstream_errors.saturating_sub(earlier.upstream_errors),
        }
    }

    pub fn add(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.hits += other.hits;
        self.misses += other.misses;
        self.bytes_from_cache += other.bytes_from_cache;
        self.bytes_from_upstream += other.bytes_from_upstream;
        self.upstream_errors += other.upstream_errors;
    }
}

/// The sum of a counter family's series whose labels `keep` allows.
fn sum(counters: &IntCounterVec, keep: impl Fn(&[(&str, &str)]) -> bool) -> u64 {
    let mut total = 0.0;
    for family in counters.collect() {
        for metric in family.get_metric() {
            let labels: Vec<(&str, &str)> = metric
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if keep(&labels) {
                total += metric.get_counter().get_value();
            }
        }
    }
    total as u64
}

fn label<'a>(labels: &[(&str, &'a str)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, v)| v)
}

/// An upstream request's status label that counts as an error: no answer, a 429 or a 5xx.
fn is_upstream_error(status: &str) -> bool {
    status == "429" || status.starts_with('5') || status.parse::<u16>().is_err()
}

impl Metrics {
    /// Blob and manifest totals.
    pub fn snapshot(&self) -> Snapshot {
        let outcome = |o: &str| {
            ["blob", "manifest"]
                .iter()
                .map(|k| self.cache_requests.with_label_values(&[k, o]).get())
                .sum()
        };
        Snapshot {
            hits: outcome("hit"),
            misses: outcome("miss"),
            joins: outcome("join"),
            stale: outcome("stale"),
            bypass: outcome("bypass"),
            bytes_from_cache: self.served_bytes.with_label_values(&["cache"]).get(),
            bytes_from_upstream: self.served_bytes.with_label_values(&["upstream"]).get(),
        }
    }

    /// The totals the console's history samples.
    pub fn totals(&self) -> Totals {
        let outcomes = self.snapshot();
        Totals {
            requests: sum(&self.requests, |_| true),
            hits: outcomes.hits + outcomes.joins + outcomes.stale,
            misses: outcomes.misses,
            bytes_from_cache: outcomes.bytes_from_cache,
            bytes_from_upstream: sum(&self.upstream_bytes, |_| true),
            upstream_errors: sum(&self.upstream_requests, |labels| {
                is_upstream_error(label(labels, "status"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_sum_the_series_and_count_errors_by_status() {
        let metrics = Metrics::new(&[]);
        metrics.request("blob", &http::Method::GET, 200, 0.1);
        metrics.request("manifest", &http::Method::HEAD, 404, 0.1);
        metrics.cache_outcome("blob", "hit");
        metrics.cache_outcome("manifest", "join");
        metrics.cache_outcome("blob", "miss");
        metrics.upstream_bytes("docker.io", 10);
        metrics.upstream_bytes("ghcr.io", 5);
        for status in ["200", "404", "429", "503", "error"] {
            metrics.upstream_request("docker.io", "https://e", status, 0.1);
        }
        let totals = metrics.totals();
        assert_eq!(totals.requests, 2);
        assert_eq!((totals.hits, totals.misses), (2, 1));
        assert_eq!(totals.bytes_from_upstream, 15);
        assert_eq!(totals.upstream_errors, 3);
        assert_eq!(totals.since(&totals), Totals::default());
    }
}
