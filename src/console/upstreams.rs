//! `/upstreams`: each endpoint's health now and its state changes over the last hour (up, down,
//! probing, rate limited) as a strip, with the rate-limit headers it sent last. The overview
//! shows the same endpoints as a table.

use super::escape;
use crate::app::App;
use crate::upstream::timeline::{Change, EndpointState, KEPT_FOR};
use serde::Serialize;
use std::fmt::Write;

#[derive(Serialize)]
pub struct Upstreams {
    pub endpoints: Vec<Endpoint>,
}

#[derive(Serialize)]
pub struct Endpoint {
    pub registry: String,
    pub url: String,
    /// May say what a tag points to (else serves content by digest only).
    pub resolves_tags: bool,
    pub state: EndpointState,
    /// Outages in a row.
    pub failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_off_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limited_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The state before the first change listed: an hour ago, or `unknown` when more changes
    /// came within the hour than are kept.
    pub state_before: EndpointState,
    /// Changes since, oldest first.
    pub changes: Vec<Change>,
}

/// Docker Hub's rate-limit headers, as last seen.
#[derive(Serialize)]
pub struct RateLimit {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub window_seconds: Option<u64>,
    pub source: Option<String>,
    /// Unix seconds.
    pub seen_at: u64,
}

pub fn endpoints(app: &App) -> Vec<Endpoint> {
    let mut all = Vec::new();
    for (index, route) in app.routes().iter().enumerate() {
        for status in app.upstream(index).status() {
            let health = status.health;
            let state = if health.rate_limited_for.is_some() {
                EndpointState::RateLimited
            } else if health.up {
                EndpointState::Up
            } else if health.backing_off_for.is_none() {
                EndpointState::Probing
            } else {
                EndpointState::Down
            };
            let (state_before, changes) = status.last_hour;
            all.push(Endpoint {
                registry: route.name.clone(),
                url: status.url,
                resolves_tags: status.resolve_tags,
                state,
                failures: health.failures,
                last_error: health.last_error,
                backing_off_seconds: health
                    .backing_off_for
                    .map(|d| d.as_secs_f64().ceil() as u64),
                rate_limited_seconds: health
                    .rate_limited_for
                    .map(|d| d.as_secs_f64().ceil() as u64),
                rate_limit: health.rate_limit.map(|r| RateLimit {
                    limit: r.limit,
                    remaining: r.remaining,
                    window_seconds: r.window.map(|w| w.as_secs()),
                    source: r.source,
                    seen_at: crate::upstream::timeline::unix_ms(r.seen_at) / 1000,
                }),
                state_before,
                changes,
            });
        }
    }
    all
}

pub fn build(app: &App) -> Upstreams {
    Upstreams {
        endpoints: endpoints(app),
    }
}

fn class(state: EndpointState) -> &'static str {
    match state {
        EndpointState::Up => "s-up",
        EndpointState::Down => "s-down",
        EndpointState::Probing => "s-probing",
        EndpointState::RateLimited => "s-rate_limited",
        EndpointState::Unknown => "s-unknown",
    }
}

fn health(e: &Endpoint) -> String {
    match e.state {
        EndpointState::Up => "<span class=\"up\">up</span>".into(),
        EndpointState::RateLimited => format!(
            "<span class=\"warn\">rate limited</span> (manifest GETs paused {}s more)",
            e.rate_limited_seconds.unwrap_or(0)
        ),
        EndpointState::Down | EndpointState::Probing | EndpointState::Unknown => {
            let backing_off = e.backing_off_seconds.map_or("probing".to_string(), |left| {
                format!("backing off {left}s more")
            });
            format!(
                "<span class=\"down\">down</span> ({} in a row, {backing_off}) {}",
                if e.failures == 1 {
                    "1 outage".to_string()
                } else {
                    format!("{} outages", e.failures)
                },
                escape(e.last_error.as_deref().unwrap_or(""))
            )
        }
    }
}

fn limit(e: &Endpoint) -> String {
    match &e.rate_limit {
        Some(r) => format!(
            "{} of {} left",
            r.remaining.map_or("?".into(), |v| v.to_string()),
            r.limit.map_or("?".into(), |v| v.to_string())
        ),
        None => "-".to_string(),
    }
}

/// The endpoints as a table (the overview's).
pub fn table(html: &mut String, endpoints: &[Endpoint]) {
    html.push_str("<h2>Upstreams</h2><table><tr><th>registry</th><th>endpoint</th><th>tags</th><th>health</th><th>rate limit</th></tr>");
    for e in endpoints {
        let trust = if e.resolves_tags {
            "resolves"
        } else {
            "content only"
        };
        let _ = write!(
            html,
            "<tr class=\"endpoint\"><td>{}</td><td>{}</td><td>{trust}</td><td>{}</td><td>{}</td></tr>",
            escape(&e.registry),
            escape(&e.url),
            health(e),
            escape(&limit(e))
        );
    }
    html.push_str("</table>");
}

/// The hour as segments: (state, share of the hour in percent, from, to in Unix ms).
fn segments(e: &Endpoint, now_ms: u64) -> Vec<(EndpointState, f64, u64, u64)> {
    let hour = KEPT_FOR.as_millis() as u64;
    let start = now_ms.saturating_sub(hour);
    let mut spans: Vec<(EndpointState, u64, u64)> = Vec::new();
    let mut state = e.state_before;
    let mut from = start;
    let mut rate_limit_ends: Option<u64> = None;
    let push = |spans: &mut Vec<(EndpointState, u64, u64)>, state, from: u64, to: u64| {
        if to > from {
            spans.push((state, from, to));
        }
    };
    for change in &e.changes {
        let at = change.at.clamp(start, now_ms);
        if let (EndpointState::RateLimited, Some(end)) = (state, rate_limit_ends) {
            if end < at {
                push(&mut spans, state, from, end.max(from));
                state = EndpointState::Up;
                from = end.max(from);
            }
        }
        push(&mut spans, state, from, at);
        state = change.state;
        from = at;
        rate_limit_ends = change.until;
    }
    if let (EndpointState::RateLimited, Some(end)) = (state, rate_limit_ends) {
        if end < now_ms {
            push(&mut spans, state, from, end.max(from));
            state = EndpointState::Up;
            from = end.max(from);
        }
    }
    push(&mut spans, state, from, now_ms);
    spans
        .into_iter()
        .map(|(s, from, to)| (s, (to - from) as f64 / hour as f64 * 100.0, from, to))
        .collect()
}

pub fn html(view: &Upstreams) -> String {
    let now_ms = crate::upstream::timeline::unix_ms(std::time::SystemTime::now());
    let mut html = String::with_capacity(8192);
    table(&mut html, &view.endpoints);
    html.push_str("<h2>The last hour</h2><p class=\"muted\"><span class=\"up\">■</span> up · <span class=\"down\">■</span> down · <span class=\"warn\">■</span> probing · <span style=\"color:#8250df\">■</span> rate limited; oldest left</p>");
    for e in &view.endpoints {
        let _ = write!(
            html,
            "<h3>{} · <code>{}</code></h3><div class=\"timeline\" role=\"img\" aria-label=\"states over the last hour\">",
            escape(&e.registry),
            escape(&e.url)
        );
        for (state, share, from, to) in segments(e, now_ms) {
            let _ = write!(
                html,
                "<span class=\"{}\" style=\"width:{share:.2}%\" title=\"{} for {} s\"></span>",
                class(state),
                state.name(),
                (to - from) / 1000
            );
        }
        html.push_str("</div>");
        if e.changes.is_empty() {
            let _ = write!(
                html,
                "<p class=\"muted\">{} all hour</p>",
                e.state_before.name()
            );
            continue;
        }
        html.push_str("<table class=\"changes\"><tr><th>when</th><th>became</th><th>why</th></tr>");
        for change in e.changes.iter().rev() {
            let _ = write!(
                html,
                "<tr><td>{}</td><td class=\"{}-text\">{}</td><td>{}</td></tr>",
                super::ago(change.at / 1000),
                class(change.state),
                change.state.name(),
                escape(change.error.as_deref().unwrap_or(""))
            );
        }
        html.push_str("</table>");
    }
    if let Some(limited) = view.endpoints.iter().find(|e| e.rate_limit.is_some()) {
        let r = limited.rate_limit.as_ref().expect("found");
        let _ = write!(
            html,
            "<p class=\"muted\">Rate-limit headers last seen from {} {}: {} of {} left{}.</p>",
            escape(&limited.url),
            super::ago(r.seen_at),
            r.remaining.map_or("?".into(), |v| v.to_string()),
            r.limit.map_or("?".into(), |v| v.to_string()),
            r.window_seconds
                .map_or(String::new(), |w| format!(" per {} h", w / 3600)),
        );
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hour_is_cut_into_segments_that_fill_it() {
        let now = 10_000_000_000;
        let at = |seconds_ago: u64| now - seconds_ago * 1000;
        let change = |seconds_ago, state, until: Option<u64>| Change {
            at: at(seconds_ago),
            state,
            until,
            error: None,
        };
        let endpoint = Endpoint {
            registry: "docker.io".into(),
            url: "https://e".into(),
            resolves_tags: true,
            state: EndpointState::Up,
            failures: 0,
            last_error: None,
            backing_off_seconds: None,
            rate_limited_seconds: None,
            rate_limit: None,
            state_before: EndpointState::Up,
            changes: vec![
                change(1800, EndpointState::Down, None),
                change(1790, EndpointState::Probing, None),
                change(1780, EndpointState::Up, None),
                change(600, EndpointState::RateLimited, Some(at(540))),
            ],
        };
        let spans = segments(&endpoint, now);
        let states: Vec<EndpointState> = spans.iter().map(|s| s.0).collect();
        use EndpointState::*;
        assert_eq!(states, [Up, Down, Probing, Up, RateLimited, Up]);
        let total: f64 = spans.iter().map(|s| s.1).sum();
        assert!((total - 100.0).abs() < 1e-9, "{total}");
        assert_eq!(spans[4].3 - spans[4].2, 60_000, "the pause's minute");
    }
}
