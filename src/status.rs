//! The status page at `GET /`: server-rendered HTML for people who would rather look than read
//! metrics. Cache use against the budget, hit ratio and bytes saved, upstream endpoints with
//! their health and rate limits, the shared store, the cluster's peers, downloads in progress,
//! and the most pulled images.
//!
//! Reads the same state `/metrics` exposes; no JavaScript.

use crate::app::App;
use crate::config::format_byte_size;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Distinct images remembered for "most pulled" (later ones are not counted once full).
const MAX_TRACKED_IMAGES: usize = 10_000;

/// Pull counts per image (`registry/repository:tag`).
#[derive(Default)]
pub struct Popularity {
    counts: Mutex<HashMap<String, u64>>,
}

impl Popularity {
    pub fn pulled(&self, image: &str) {
        let mut counts = self.counts.lock().expect("popularity lock poisoned");
        if let Some(n) = counts.get_mut(image) {
            *n += 1;
        } else if counts.len() < MAX_TRACKED_IMAGES {
            counts.insert(image.to_string(), 1);
        }
    }

    /// The `n` most pulled images, most first.
    pub fn top(&self, n: usize) -> Vec<(String, u64)> {
        let counts = self.counts.lock().expect("popularity lock poisoned");
        let mut all: Vec<(String, u64)> = counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the page; the most pulled images listed are those `visible(registry, repo)` allows
/// (the viewer's access rules).
pub fn render(app: &App, visible: impl Fn(&str, &str) -> bool) -> String {
    let _ = app.render_metrics(); // brings the gauges up to date
    let stats = app.metrics().snapshot();
    let usage = app.cache().lifecycle().usage();
    let budget = app.cache().lifecycle().budget();
    let mut html = String::with_capacity(8192);
    html.push_str(concat!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>regmirror</title>",
        "<style>body{font:15px system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.4em}",
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}",
        ".num{text-align:right}.up{color:#17803d}.down{color:#b42318}.bar{background:#eee;width:20em;height:.8em}",
        ".fill{background:#2563eb;height:100%}</style></head><body>",
        "<h1>regmirror</h1>"
    ));
    // Cache use.
    html.push_str("<h2>Cache</h2><table>");
    let _ = write!(
        html,
        "<tr><th>blobs</th><td id=\"blob-bytes\" class=\"num\">{}</td><td>{} objects</td></tr>",
        format_byte_size(usage.on_disk()),
        usage.blobs
    );
    match budget.max {
        Some(max) => {
            let share = usage.on_disk() as f64 / max as f64;
            let _ = write!(
                html,
                "<tr><th>budget</th><td id=\"budget\" class=\"num\">{}</td><td><div class=\"bar\"><div class=\"fill\" style=\"width:{:.1}%\"></div></div> {:.1}% used</td></tr>",
                format_byte_size(max),
                (share * 100.0).min(100.0),
                share * 100.0
            );
        }
        None => html.push_str("<tr><th>budget</th><td id=\"budget\">unlimited</td><td></td></tr>"),
    }
    let _ = write!(
        html,
        "<tr><th>manifests</th><td class=\"num\">{}</td><td></td></tr></table>",
        usage.manifests
    );
    // Savings.
    let answered = stats.hits + stats.misses + stats.joins + stats.stale;
    let ratio = if answered == 0 {
        0.0
    } else {
        (stats.hits + stats.joins + stats.stale) as f64 / answered as f64 * 100.0
    };
    html.push_str("<h2>Savings</h2><table>");
    let _ = write!(html, "<tr><th>hit ratio</th><td id=\"hit-ratio\" class=\"num\">{ratio:.1}%</td><td>{} hits, {} joined, {} stale, {} misses</td></tr>", stats.hits, stats.joins, stats.stale, stats.misses);
    let _ = write!(html, "<tr><th>bytes saved</th><td id=\"bytes-saved\" class=\"num\">{}</td><td>served from the cache</td></tr>", format_byte_size(stats.bytes_from_cache));
    let _ = write!(
        html,
        "<tr><th>bytes fetched</th><td class=\"num\">{}</td><td>from upstream</td></tr>",
        format_byte_size(stats.bytes_from_upstream)
    );
    let _ = write!(html, "<tr><th>downloads in flight</th><td id=\"fills\" class=\"num\">{}</td><td></td></tr></table>", app.cache().downloads_in_flight());
    // Upstreams.
    html.push_str("<h2>Upstreams</h2><table><tr><th>registry</th><th>endpoint</th><th>tags</th><th>health</th><th>rate limit</th></tr>");
    for registry in app.routes().iter().enumerate() {
        let (index, route) = registry;
        for endpoint in app.upstream(index).status() {
            let health = if endpoint.health.up {
                "<span class=\"up\">up</span>".to_string()
            } else {
                let backing_off = endpoint
                    .health
                    .backing_off_for
                    .map_or("probing".to_string(), |left| {
                        format!("backing off {}s more", left.as_secs_f64().ceil())
                    });
                format!(
                    "<span class=\"down\">down</span> ({} outages in a row, {backing_off}) {}",
                    endpoint.health.failures,
                    escape(endpoint.health.last_error.as_deref().unwrap_or(""))
                )
            };
            let limit = match (
                &endpoint.health.rate_limit,
                endpoint.health.rate_limited_for,
            ) {
                (_, Some(pause)) => format!("paused {}s", pause.as_secs()),
                (Some(r), None) => format!(
                    "{} of {} left",
                    r.remaining.map_or("?".into(), |v| v.to_string()),
                    r.limit.map_or("?".into(), |v| v.to_string())
                ),
                (None, None) => "-".to_string(),
            };
            let trust = if endpoint.resolve_tags {
                "resolves"
            } else {
                "content only"
            };
            let _ = write!(
                html,
                "<tr class=\"endpoint\"><td>{}</td><td>{}</td><td>{trust}</td><td>{health}</td><td>{}</td></tr>",
                escape(&route.name),
                escape(&endpoint.url),
                escape(&limit)
            );
        }
    }
    html.push_str("</table>");
    if let Some(shared) = app.shared() {
        let state = if shared.is_up() {
            "<span class=\"up\">up</span>"
        } else {
            "<span class=\"down\">down</span> (serving from local disk and upstream)"
        };
        let _ = write!(
            html,
            "<h2>Shared store</h2><table><tr><th>bucket</th><td id=\"bucket\">{}</td></tr>\
             <tr><th>state</th><td>{state}</td></tr>\
             <tr><th>uploads waiting</th><td class=\"num\">{}</td></tr></table>",
            escape(shared.label()),
            shared.uploads_waiting()
        );
    }
    if let Some(cluster) = app.cluster() {
        html.push_str("<h2>Cluster</h2><table id=\"peers\"><tr><th>peer</th><th>state</th></tr>");
        for (peer, own, up) in cluster.peers() {
            let state = match (own, up) {
                (true, _) => "this replica",
                (false, true) => "<span class=\"up\">up</span>",
                (false, false) => {
                    "<span class=\"down\">down</span> (skipped: its blobs come from the next owner or upstream)"
                }
            };
            let _ = write!(html, "<tr><td>{}</td><td>{state}</td></tr>", escape(&peer));
        }
        html.push_str("</table>");
    }
    // Popular images.
    html.push_str("<h2>Most pulled</h2><table id=\"popular\"><tr><th>image</th><th class=\"num\">pulls</th></tr>");
    let shown = app
        .popularity()
        .top(MAX_TRACKED_IMAGES)
        .into_iter()
        .filter(|(image, _)| {
            let (registry, rest) = image.split_once('/').unwrap_or(("", image));
            let repo = rest.rsplit_once(':').map_or(rest, |(repo, _)| repo);
            visible(registry, repo)
        })
        .take(15);
    for (image, pulls) in shown {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"num\">{pulls}</td></tr>",
            escape(&image)
        );
    }
    html.push_str("</table>");
    let _ = write!(
        html,
        "<p><a href=\"/metrics\">metrics</a> · regmirror {}</p></body></html>",
        env!("CARGO_PKG_VERSION")
    );
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn popularity_orders_and_bounds() {
        let p = Popularity::default();
        for _ in 0..3 {
            p.pulled("docker.io/library/a:1");
        }
        p.pulled("docker.io/library/b:1");
        assert_eq!(p.top(1), vec![("docker.io/library/a:1".to_string(), 3)]);
        assert_eq!(p.top(5).len(), 2);
    }

    #[test]
    fn escapes_html() {
        assert_eq!(
            escape("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
        assert_eq!(format_byte_size(1536), "1.5 KiB");
        assert_eq!(format_byte_size(0), "0.0 B");
    }
}
