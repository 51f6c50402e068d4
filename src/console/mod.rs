//! The operator console: server-rendered HTML pages for people who would rather look than read
//! metrics, each also served as JSON (`?format=json` or `Accept: application/json`) for scripts.
//!
//! - `/` ([`overview`]): the last hour as charts, disk use against the budget, savings,
//!   upstreams, the shared store, the cluster, the most pulled images;
//! - `/browse` ([`browse`]): registries, their repositories, a repository's tags;
//! - `/downloads` ([`downloads`]): downloads in progress, prefetches and commits waiting;
//! - `/upstreams` ([`upstreams`]): each endpoint's state changes over the last hour.
//!
//! Owns the state only it needs (pull counts, the per-minute history); reads everything else
//! from the modules that own it. Each page builds one serializable view, and both formats are
//! written from it, so they never disagree. No page needs JavaScript. With `[auth]`, a viewer
//! sees only the repositories their rules let them pull.

mod browse;
mod chart;
mod downloads;
pub mod history;
mod overview;
pub mod popularity;
mod upstreams;

use crate::app::App;
use crate::body::{self, ResponseBody};
use crate::error::Error;
use crate::metrics::{Metrics, Totals};
use crate::route::Page;
use history::{History, Minute};
use http::{header, HeaderMap, Response, StatusCode};
use popularity::Popularity;
use std::fmt::Write;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the history samples the counters.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// What the console keeps across configuration reloads.
pub struct Console {
    popularity: Popularity,
    history: Mutex<History>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Console {
    /// Starts the history at the counters' totals now, sampling them every second for as long
    /// as the console lives (when there is a runtime to sample from).
    pub fn start(metrics: &Arc<Metrics>) -> Arc<Console> {
        let console = Arc::new(Console {
            popularity: Popularity::default(),
            history: Mutex::new(History::new(unix_now(), metrics.totals())),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak: Weak<Console> = Arc::downgrade(&console);
            let metrics = Arc::clone(metrics);
            runtime.spawn(async move {
                let mut tick = tokio::time::interval(SAMPLE_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(console) = weak.upgrade() else {
                        return;
                    };
                    console.history().observe(unix_now(), metrics.totals());
                }
            });
        }
        console
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn popularity(&self) -> &Popularity {
        &self.popularity
    }

    /// The last hour's minutes, then the minute under way.
    pub fn minutes(&self, totals: Totals) -> Vec<Minute> {
        let now = unix_now();
        let mut history = self.history();
        history.observe(now, totals);
        history.minutes(now, totals)
    }
}

/// The query of a console page, decoded.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    pub fn parse(query: Option<&str>) -> Query {
        Query {
            pairs: form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .into_owned()
                .take(32)
                .collect(),
        }
    }

    /// This query with `name` set to `value`, as `?...`.
    pub fn with(&self, name: &str, value: &str) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (n, v) in self.pairs.iter().filter(|(n, _)| n != name) {
            query.append_pair(n, v);
        }
        query.append_pair(name, value);
        format!("?{}", query.finish())
    }

    /// A parameter's value; empty counts as absent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }
}

/// Whether the client asked for JSON: `?format=json`, or an `Accept` naming JSON and not HTML.
fn wants_json(headers: &HeaderMap, query: &Query) -> bool {
    if let Some(format) = query.get("format") {
        return format == "json";
    }
    // Several Accept headers are one list.
    let accept: Vec<&str> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let accept = accept.join(",");
    accept.contains("application/json") && !accept.contains("text/html")
}

/// Answers a console page; `visible(registry, repo)` says which repositories the viewer may see.
pub async fn serve(
    app: &App,
    page: Page,
    query: Option<&str>,
    headers: &HeaderMap,
    head: bool,
    visible: impl Fn(&str, &str) -> bool,
) -> Result<Response<ResponseBody>, Error> {
    let query = Query::parse(query);
    let json = wants_json(headers, &query);
    let (title, value, html) = match page {
        Page::Overview => {
            let view = overview::build(app, &visible);
            (None, serde_json::to_value(&view), overview::html(&view))
        }
        Page::Browse => {
            let view = browse::build(app, &query, &visible).await?;
            (
                Some("Browse"),
                serde_json::to_value(&view),
                browse::html(&view),
            )
        }
        Page::Downloads => {
            let view = downloads::build(app, &visible);
            (
                Some("Downloads"),
                serde_json::to_value(&view),
                downloads::html(&view),
            )
        }
        Page::Upstreams => {
            let view = upstreams::build(app);
            (
                Some("Upstreams"),
                serde_json::to_value(&view),
                upstreams::html(&view),
            )
        }
    };
    let (content_type, text) = if json {
        let value = value
            .map_err(|e| Error::coded(crate::error::Code::Unknown, format!("console view: {e}")))?;
        ("application/json", value.to_string())
    } else {
        (
            "text/html; charset=utf-8",
            page_html(page, title, &html, app, &query),
        )
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, text.len())
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::VARY, "Accept")
        .body(if head {
            body::empty()
        } else {
            body::full(text)
        })
        .expect("static headers are valid"))
}

const STYLE: &str = concat!(
    "body{font:15px system-ui,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}",
    "header{background:#1f2328;color:#fff;padding:.6em 2em;display:flex;gap:2em;align-items:baseline}",
    "header a{color:#c9d1d9;text-decoration:none}header a.here{color:#fff;font-weight:600}",
    "header h1{font-size:1.2em;margin:0}main{padding:1em 2em;max-width:80em}",
    "h2{font-size:1.1em;margin:1.4em 0 .4em}",
    "table{border-collapse:collapse;margin:.3em 0 1em;background:#fff}",
    "td,th{padding:.3em .8em;border-bottom:1px solid #d0d7de;text-align:left;vertical-align:top}",
    ".num{text-align:right;font-variant-numeric:tabular-nums}.up{color:#17803d}.down{color:#b42318}",
    ".warn{color:#9a6700}.muted{color:#656d76}code{font-size:.9em}",
    ".charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(20em,1fr));gap:1em}",
    "figure{margin:0;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:.6em .8em}",
    "figcaption{display:flex;justify-content:space-between;font-size:.9em;margin-bottom:.3em}",
    "figcaption b{font-size:1.2em}svg.chart{width:100%;height:5.5em;display:block}",
    ".axis{stroke:#8c959f;stroke-width:1}.grid{stroke:#d0d7de;stroke-dasharray:3 3}",
    ".tick{font-size:9px;fill:#656d76}",
    ".bar{position:relative;background:#eaeef2;width:100%;max-width:40em;height:1.1em;border-radius:3px}",
    ".fill{background:#2563eb;height:100%;border-radius:3px}.mark{position:absolute;top:-.2em;bottom:-.2em;border-left:2px solid #b42318}",
    ".mark.low{border-color:#9a6700}.small{max-width:14em;height:.8em;display:inline-block;vertical-align:middle}",
    ".timeline{display:flex;width:100%;max-width:40em;height:1em;border-radius:3px;overflow:hidden}",
    ".timeline span{display:block;height:100%;min-width:2px}.s-up{background:#2da44e}.s-down{background:#cf222e}",
    ".s-probing{background:#bf8700}.s-rate_limited{background:#8250df}.s-unknown{background:#d0d7de}",
    "form{margin:.5em 0}input{font:inherit;padding:.2em .4em}nav.pages a{margin-right:1em}"
);

/// The one script: swaps the page's content for a fresh copy every few seconds (no reload, no
/// flicker). The pages are complete without it.
const LIVE: &str = concat!(
    "document.documentElement.dataset.live='on';",
    "setInterval(function(){fetch(location.href,{headers:{accept:'text/html'}})",
    ".then(function(r){return r.ok?r.text():null}).then(function(t){if(!t)return;",
    "var m=new DOMParser().parseFromString(t,'text/html').querySelector('main');",
    "if(m)document.querySelector('main').innerHTML=m.innerHTML}).catch(function(){})},SECONDS*1000);"
);

/// A whole page: the header with the console's pages, then `main`.
fn page_html(page: Page, title: Option<&str>, main: &str, app: &App, query: &Query) -> String {
    let mut html = String::with_capacity(main.len() + 4096);
    html.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">");
    html.push_str("<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">");
    let refresh = match page {
        Page::Downloads => Some(2),
        Page::Overview | Page::Upstreams => Some(15),
        Page::Browse => None,
    };
    if let Some(seconds) = refresh {
        // Without JavaScript the page reloads itself; with it, only its content is swapped.
        let _ = write!(
            html,
            "<noscript><meta http-equiv=\"refresh\" content=\"{seconds}\"></noscript>"
        );
    }
    html.push_str("<title>regmirror");
    if let Some(title) = title {
        html.push_str(" · ");
        html.push_str(title);
    }
    html.push_str("</title><style>");
    html.push_str(STYLE);
    html.push_str("</style></head><body><header><h1>regmirror</h1>");
    for (target, path, label) in [
        (Page::Overview, "/", "Overview"),
        (Page::Browse, "/browse", "Browse"),
        (Page::Downloads, "/downloads", "Downloads"),
        (Page::Upstreams, "/upstreams", "Upstreams"),
    ] {
        let class = if target == page {
            " class=\"here\""
        } else {
            ""
        };
        html.push_str(&format!("<a href=\"{path}\"{class}>{label}</a>"));
    }
    html.push_str("<a href=\"/metrics\">Metrics</a></header><main>");
    html.push_str(main);
    if let Some(seconds) = refresh {
        let _ = write!(
            html,
            "<script>{}</script>",
            LIVE.replace("SECONDS", &seconds.to_string())
        );
    }
    html.push_str(&format!(
        "<p class=\"muted\">regmirror {} · listening on {} · <a href=\"{}\">this page as JSON</a></p></main></body></html>",
        env!("CARGO_PKG_VERSION"),
        escape(&app.config().server.listen.to_string()),
        escape(&query.with("format", "json"))
    ));
    html
}

pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The first characters of a digest, for tables (the whole one goes in a `title`).
pub fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

/// `3 s ago`, `5 min ago`, `2 h ago`, `4 d ago` for a Unix time.
pub fn ago(unix: u64) -> String {
    if unix == 0 {
        return "-".into();
    }
    let seconds = unix_now().saturating_sub(unix);
    match seconds {
        0..=119 => format!("{seconds} s ago"),
        120..=7199 => format!("{} min ago", seconds / 60),
        7200..=172_799 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_html_and_parses_queries() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let query = Query::parse(Some("filter=al%2Fpine+x&page=2&format="));
        assert_eq!(query.get("filter"), Some("al/pine x"));
        assert_eq!(query.get("page"), Some("2"));
        assert_eq!(query.get("format"), None);
        assert_eq!(
            query.with("format", "json"),
            "?filter=al%2Fpine+x&page=2&format=json"
        );
    }

    #[test]
    fn json_when_asked_by_query_or_accept() {
        let mut headers = HeaderMap::new();
        assert!(!wants_json(&headers, &Query::default()));
        headers.insert(header::ACCEPT, "application/json".parse().unwrap());
        assert!(wants_json(&headers, &Query::default()));
        assert!(!wants_json(&headers, &Query::parse(Some("format=html"))));
        headers.insert(
            header::ACCEPT,
            "text/html,application/json;q=0.9,*/*".parse().unwrap(),
        );
        assert!(!wants_json(&headers, &Query::default()));
        assert!(wants_json(&headers, &Query::parse(Some("format=json"))));
    }
}
