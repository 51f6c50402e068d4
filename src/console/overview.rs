//! `/`: the last hour as charts, disk use against the budget and its watermarks, what the cache
//! saved, the upstream endpoints, the shared store, the cluster and the most pulled images.

use super::chart::{chart, Series};
use super::history::Minute;
use super::{ago, escape};
use crate::app::App;
use crate::config::format_byte_size;
use crate::metrics::Totals;
use serde::Serialize;
use std::fmt::Write;

/// Images listed as most pulled.
const MOST_PULLED: usize = 15;

#[derive(Serialize)]
pub struct Overview {
    pub disk: Disk,
    pub savings: Savings,
    /// The last hour, oldest first, then the minute under way.
    pub history: Vec<Minute>,
    pub upstreams: Vec<super::upstreams::Endpoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_store: Option<SharedStore>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Vec<Peer>>,
    pub most_pulled: Vec<Pulled>,
}

#[derive(Serialize)]
pub struct Disk {
    /// Stored blobs and verified downloads waiting for their commit.
    pub used_bytes: u64,
    pub blobs: u64,
    pub manifests: u64,
    /// `cache.max_size`; none: unlimited.
    pub budget_bytes: Option<u64>,
    /// Eviction starts above this share of the budget, and stops below the low one.
    pub high_watermark: f64,
    pub low_watermark: f64,
    /// The disk filled up lately: misses bypass the cache for a while.
    pub disk_full: bool,
}

#[derive(Serialize)]
pub struct Savings {
    /// Blob and manifest answers the upstream did not send again, of all of them (percent).
    pub hit_ratio: f64,
    pub hits: u64,
    pub joins: u64,
    pub stale: u64,
    pub misses: u64,
    /// Body bytes served from the cache.
    pub bytes_from_cache: u64,
    /// Body bytes served to the clients whose requests fetched them.
    pub bytes_served_from_upstream: u64,
    /// Blob bytes received from upstream.
    pub bytes_fetched: u64,
    pub downloads_in_flight: usize,
}

#[derive(Serialize)]
pub struct SharedStore {
    pub bucket: String,
    pub up: bool,
    pub uploads_waiting: usize,
}

#[derive(Serialize)]
pub struct Peer {
    pub peer: String,
    pub this_replica: bool,
    pub up: bool,
}

#[derive(Serialize)]
pub struct Pulled {
    pub image: String,
    pub pulls: u64,
    /// Unix seconds.
    pub last_pull: u64,
}

pub fn build(app: &App, visible: &impl Fn(&str, &str) -> bool) -> Overview {
    let _ = app.render_metrics(); // brings the gauges up to date
    let lifecycle = app.cache().lifecycle();
    let (usage, budget) = (lifecycle.usage(), lifecycle.budget());
    let stats = app.metrics().snapshot();
    let answered = stats.hits + stats.misses + stats.joins + stats.stale;
    let saved = stats.hits + stats.joins + stats.stale;
    let totals = app.metrics().totals();
    let most_pulled = app
        .console()
        .popularity()
        .ranked()
        .into_iter()
        .filter(|(image, _)| {
            let (registry, repo, _) = super::popularity::split_key(image);
            visible(registry, repo)
        })
        .take(MOST_PULLED)
        .map(|(image, pulls)| Pulled {
            image,
            pulls: pulls.count,
            last_pull: pulls.last,
        })
        .collect();
    Overview {
        disk: Disk {
            used_bytes: usage.on_disk(),
            blobs: usage.blobs,
            manifests: usage.manifests,
            budget_bytes: budget.max,
            high_watermark: budget.high,
            low_watermark: budget.low,
            disk_full: lifecycle.disk_full(),
        },
        savings: Savings {
            hit_ratio: if answered == 0 {
                0.0
            } else {
                saved as f64 / answered as f64 * 100.0
            },
            hits: stats.hits,
            joins: stats.joins,
            stale: stats.stale,
            misses: stats.misses,
            bytes_from_cache: stats.bytes_from_cache,
            bytes_served_from_upstream: stats.bytes_from_upstream,
            bytes_fetched: totals.bytes_from_upstream,
            downloads_in_flight: app.cache().downloads_in_flight(),
        },
        history: app.console().minutes(totals),
        upstreams: super::upstreams::endpoints(app),
        shared_store: app.shared().map(|shared| SharedStore {
            bucket: shared.label().to_string(),
            up: shared.is_up(),
            uploads_waiting: shared.uploads_waiting(),
        }),
        cluster: app.cluster().map(|cluster| {
            cluster
                .peers()
                .into_iter()
                .map(|(peer, this_replica, up)| Peer {
                    peer,
                    this_replica,
                    up,
                })
                .collect()
        }),
        most_pulled,
    }
}

/// Per second over each minute.
fn rate(history: &[Minute], count: impl Fn(&Totals) -> u64) -> Vec<f64> {
    history
        .iter()
        .map(|m| count(&m.counts) as f64 / m.seconds.max(1) as f64)
        .collect()
}

fn figure(html: &mut String, title: &str, current: &str, svg: &str) {
    let _ = write!(
        html,
        "<figure><figcaption><span>{}</span><b>{}</b></figcaption>{svg}</figure>",
        escape(title),
        escape(current)
    );
}

fn charts(html: &mut String, history: &[Minute]) {
    let Some(now) = history.last() else {
        return;
    };
    html.push_str("<h2>The last hour</h2><div class=\"charts\" id=\"charts\">");
    let requests = rate(history, |t| t.requests);
    let current = format!("{:.1}/s", requests.last().copied().unwrap_or(0.0));
    let svg = chart(
        "requests per second",
        &[Series {
            label: "requests",
            values: &requests,
            color: "#2563eb",
        }],
        1.0,
        |top| format!("{top:.1}/s"),
    );
    figure(html, "requests", &current, &svg);

    let ratio: Vec<f64> = history
        .iter()
        .map(|m| {
            let answered = m.counts.hits + m.counts.misses;
            if answered == 0 {
                0.0
            } else {
                m.counts.hits as f64 / answered as f64 * 100.0
            }
        })
        .collect();
    let answered = now.counts.hits + now.counts.misses;
    let current = if answered == 0 {
        "-".to_string()
    } else {
        format!("{:.0}%", ratio.last().copied().unwrap_or(0.0))
    };
    let svg = chart(
        "hit ratio (blobs and manifests)",
        &[Series {
            label: "hit ratio",
            values: &ratio,
            color: "#17803d",
        }],
        100.0,
        |top| format!("{top:.0}%"),
    );
    figure(html, "hit ratio", &current, &svg);

    let cached = rate(history, |t| t.bytes_from_cache);
    let fetched = rate(history, |t| t.bytes_from_upstream);
    let current = format!(
        "{}/s · {}/s",
        format_byte_size(cached.last().copied().unwrap_or(0.0) as u64),
        format_byte_size(fetched.last().copied().unwrap_or(0.0) as u64)
    );
    let svg = chart(
        "bytes per second served from the cache (blue) and fetched from upstream (orange)",
        &[
            Series {
                label: "served from the cache",
                values: &cached,
                color: "#2563eb",
            },
            Series {
                label: "fetched from upstream",
                values: &fetched,
                color: "#d97706",
            },
        ],
        1024.0,
        |top| format!("{}/s", format_byte_size(top as u64)),
    );
    figure(html, "from cache · from upstream", &current, &svg);

    let errors: Vec<f64> = history
        .iter()
        .map(|m| m.counts.upstream_errors as f64)
        .collect();
    let svg = chart(
        "upstream errors per minute",
        &[Series {
            label: "upstream errors",
            values: &errors,
            color: "#b42318",
        }],
        1.0,
        |top| format!("{top:.0}/min"),
    );
    figure(
        html,
        "upstream errors",
        &format!("{}/min", now.counts.upstream_errors),
        &svg,
    );
    html.push_str("</div>");
}

fn disk(html: &mut String, disk: &Disk) {
    html.push_str("<h2>Disk</h2>");
    if let Some(max) = disk.budget_bytes {
        let share = disk.used_bytes as f64 / max.max(1) as f64 * 100.0;
        let _ = write!(
            html,
            "<div class=\"bar\" title=\"{share:.1}% of the budget\"><div class=\"fill\" style=\"width:{:.1}%\"></div>\
             <span class=\"mark low\" style=\"left:{:.1}%\" title=\"low watermark\"></span>\
             <span class=\"mark\" style=\"left:{:.1}%\" title=\"high watermark\"></span></div>",
            share.min(100.0),
            disk.low_watermark * 100.0,
            disk.high_watermark * 100.0,
        );
        let _ = write!(
            html,
            "<p><span id=\"disk-used\">{}</span> of <span id=\"budget\">{}</span> ({share:.1}%) · eviction from {:.0}% down to {:.0}%</p>",
            format_byte_size(disk.used_bytes),
            format_byte_size(max),
            disk.high_watermark * 100.0,
            disk.low_watermark * 100.0
        );
    } else {
        let _ = write!(
            html,
            "<p><span id=\"disk-used\">{}</span> · <span id=\"budget\">no budget</span> (cache.max_size unset)</p>",
            format_byte_size(disk.used_bytes)
        );
    }
    if disk.disk_full {
        html.push_str(
            "<p class=\"down\">The disk filled up: misses bypass the cache for a while.</p>",
        );
    }
    let _ = write!(
        html,
        "<table><tr><th>blobs</th><td id=\"blob-bytes\" class=\"num\">{}</td><td>{} objects</td></tr>\
         <tr><th>manifests</th><td class=\"num\">{}</td><td></td></tr></table>",
        format_byte_size(disk.used_bytes),
        disk.blobs,
        disk.manifests
    );
}

fn savings(html: &mut String, s: &Savings) {
    html.push_str("<h2>Savings since start-up</h2><table>");
    let _ = write!(html, "<tr><th>hit ratio</th><td id=\"hit-ratio\" class=\"num\">{:.1}%</td><td>{} hits, {} joined, {} stale, {} misses</td></tr>", s.hit_ratio, s.hits, s.joins, s.stale, s.misses);
    let _ = write!(html, "<tr><th>bytes saved</th><td id=\"bytes-saved\" class=\"num\">{}</td><td>served from the cache</td></tr>", format_byte_size(s.bytes_from_cache));
    let _ = write!(html, "<tr><th>bytes fetched</th><td id=\"bytes-fetched\" class=\"num\">{}</td><td>from upstream</td></tr>", format_byte_size(s.bytes_fetched));
    let _ = write!(html, "<tr><th>downloads in flight</th><td id=\"fills\" class=\"num\">{}</td><td><a href=\"/downloads\">see them</a></td></tr></table>", s.downloads_in_flight);
}

pub fn html(view: &Overview) -> String {
    let mut html = String::with_capacity(16 * 1024);
    charts(&mut html, &view.history);
    disk(&mut html, &view.disk);
    savings(&mut html, &view.savings);
    super::upstreams::table(&mut html, &view.upstreams);
    if let Some(shared) = &view.shared_store {
        let state = if shared.up {
            "<span class=\"up\">up</span>"
        } else {
            "<span class=\"down\">down</span> (serving from local disk and upstream)"
        };
        let _ = write!(
            html,
            "<h2>Shared store</h2><table><tr><th>bucket</th><td id=\"bucket\">{}</td></tr>\
             <tr><th>state</th><td>{state}</td></tr>\
             <tr><th>uploads waiting</th><td class=\"num\">{}</td></tr></table>",
            escape(&shared.bucket),
            shared.uploads_waiting
        );
    }
    if let Some(peers) = &view.cluster {
        html.push_str("<h2>Cluster</h2><table id=\"peers\"><tr><th>peer</th><th>state</th></tr>");
        for peer in peers {
            let state = match (peer.this_replica, peer.up) {
                (true, _) => "this replica",
                (false, true) => "<span class=\"up\">up</span>",
                (false, false) => {
                    "<span class=\"down\">down</span> (skipped: its blobs come from the next owner or upstream)"
                }
            };
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{state}</td></tr>",
                escape(&peer.peer)
            );
        }
        html.push_str("</table>");
    }
    html.push_str("<h2>Most pulled</h2><table id=\"popular\"><tr><th>image</th><th class=\"num\">pulls</th><th>last pull</th></tr>");
    for pulled in &view.most_pulled {
        let _ = write!(
            html,
            "<tr><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            escape(&pulled.image),
            pulled.pulls,
            ago(pulled.last_pull)
        );
    }
    html.push_str("</table>");
    html
}
