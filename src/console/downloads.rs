//! `/downloads`: the downloads in progress, each with its progress (bytes so far of the
//! expected size), rate, source and the clients following it; then the downloads waiting for a
//! slot, the images whose blobs are still being fetched ahead of their clients, and the
//! verified blobs waiting for their commit. The HTML page refreshes itself every few seconds.
//! A viewer sees only the downloads started for repositories they may pull.

use super::escape;
use crate::app::App;
use crate::cache::inflight::FillState;
use crate::config::format_byte_size;
use serde::Serialize;
use std::fmt::Write;

#[derive(Serialize)]
pub struct Downloads {
    pub downloads: Vec<Download>,
    /// Downloads waiting for one of the `cache.max_downloads` slots.
    pub waiting_for_a_slot: usize,
    /// Images whose blobs are still being handed to downloads ahead of their clients.
    pub prefetches_queued: usize,
    /// Verified blobs waiting for their commit.
    pub commits_waiting: usize,
}

#[derive(Serialize)]
pub struct Download {
    pub digest: String,
    /// The registry and repository it was started for.
    pub registry: String,
    pub repository: String,
    /// `starting` (waiting for upstream's answer), `downloading`, `committing` (verified).
    pub state: &'static str,
    pub bytes: u64,
    /// Upstream's `Content-Length`, else the size a manifest declared.
    pub expected_bytes: Option<u64>,
    pub bytes_per_second: f64,
    pub seconds: f64,
    /// The endpoint (or peer, or bucket) it comes from, once known.
    pub source: Option<String>,
    /// Clients following it now.
    pub clients: usize,
}

pub fn build(app: &App, visible: &impl Fn(&str, &str) -> bool) -> Downloads {
    let cache = app.cache();
    let downloads = cache
        .downloads()
        .into_iter()
        .filter_map(|fill| {
            let (registry, repository) = fill.wanted_by.filter(|(r, p)| visible(r, p))?;
            let (state, bytes, total) = match fill.state {
                FillState::Starting => ("starting", 0, None),
                FillState::Streaming { written, total } => ("downloading", written, total),
                FillState::Complete { size } => ("committing", size, Some(size)),
                FillState::Failed(_) | FillState::Abandoned => return None,
            };
            let seconds = fill.started.elapsed().as_secs_f64();
            Some(Download {
                expected_bytes: total.or_else(|| cache.declared_size(&fill.digest)),
                digest: fill.digest.to_string(),
                registry,
                repository,
                state,
                bytes,
                bytes_per_second: bytes as f64 / seconds.max(0.001),
                seconds,
                source: fill.source,
                clients: fill.readers,
            })
        })
        .collect();
    Downloads {
        downloads,
        waiting_for_a_slot: cache.download_slots().queued(),
        prefetches_queued: app.prefetcher().runs_in_progress(),
        commits_waiting: cache.pacer().waiting(),
    }
}

pub fn html(view: &Downloads) -> String {
    let mut html = String::with_capacity(4096);
    let downloading = view
        .downloads
        .iter()
        .filter(|d| d.state != "committing")
        .count();
    let _ = write!(
        html,
        "<h2>Downloads in progress</h2><p><span id=\"downloads-count\">{downloading}</span> downloading · \
         {} waiting for a slot · {} images being fetched ahead of their clients · {} commits waiting</p>",
        view.waiting_for_a_slot,
        view.prefetches_queued,
        view.commits_waiting
    );
    if view.downloads.is_empty() {
        html.push_str("<p class=\"muted\">Nothing is downloading.</p>");
        return html;
    }
    html.push_str("<table id=\"downloads\"><tr><th>blob</th><th>progress</th><th class=\"num\">bytes</th><th class=\"num\">rate</th><th>from</th><th class=\"num\">clients</th></tr>");
    for d in &view.downloads {
        let share = d
            .expected_bytes
            .filter(|total| *total > 0)
            .map(|total| (d.bytes as f64 / total as f64 * 100.0).min(100.0));
        let bar = match share {
            Some(share) => format!(
                "<div class=\"bar small\" title=\"{share:.0}%\"><div class=\"fill\" style=\"width:{share:.1}%\"></div></div> {share:.0}%"
            ),
            None => format!("<span class=\"muted\">{}</span>", d.state),
        };
        let of = d
            .expected_bytes
            .map_or(String::new(), |t| format!(" of {}", format_byte_size(t)));
        let _ = write!(
            html,
            "<tr><td>{}/{}<br><code title=\"{}\">{}…</code> <span class=\"muted\">{}</span></td><td>{bar}</td><td class=\"num\">{}{of}</td>\
             <td class=\"num\">{}/s</td><td>{}</td><td class=\"num\">{}</td></tr>",
            escape(&d.registry),
            escape(&d.repository),
            escape(&d.digest),
            escape(super::short(&d.digest)),
            d.state,
            format_byte_size(d.bytes),
            format_byte_size(d.bytes_per_second as u64),
            escape(d.source.as_deref().unwrap_or("-")),
            d.clients
        );
    }
    html.push_str("</table>");
    html
}
