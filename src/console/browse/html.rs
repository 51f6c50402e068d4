//! The browse pages as HTML: tables of registries, repositories and tags, the filter form
//! and the pager. Every name shown is escaped; links are built by encoding, then escaping.

use super::{Browse, Listing};
use crate::config::format_byte_size;
use crate::console::{ago, escape, short};
use std::fmt::Write;

/// A link to this page with some parameters changed.
pub(super) fn link(base: &[(&str, Option<&str>)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (name, value) in base {
        if let Some(value) = value {
            query.append_pair(name, value);
        }
    }
    format!("/browse?{}", escape(&query.finish()))
}

fn filter_form(
    html: &mut String,
    registry: &str,
    repo: Option<&str>,
    filter: Option<&str>,
    sort: &str,
) {
    let _ = write!(
        html,
        "<form method=\"get\" action=\"/browse\"><input type=\"hidden\" name=\"registry\" value=\"{}\">",
        escape(registry)
    );
    if let Some(repo) = repo {
        let _ = write!(
            html,
            "<input type=\"hidden\" name=\"repo\" value=\"{}\">",
            escape(repo)
        );
    }
    let _ = write!(
        html,
        "<input type=\"search\" name=\"filter\" placeholder=\"filter\" value=\"{}\"> \
         <select name=\"sort\"><option value=\"pulled\"{}>most recently pulled</option><option value=\"name\"{}>name</option></select> \
         <button type=\"submit\">Show</button></form>",
        escape(filter.unwrap_or("")),
        if sort == "pulled" { " selected" } else { "" },
        if sort == "name" { " selected" } else { "" },
    );
}

fn pager<T>(html: &mut String, listing: &Listing<T>) {
    let page = |n: usize| n.to_string();
    let params = |n: usize| {
        let p = page(n);
        link(&[
            ("registry", Some(&listing.registry)),
            ("repo", listing.repository.as_deref()),
            ("filter", listing.filter.as_deref()),
            ("sort", Some(listing.sort)),
            ("page", Some(&p)),
        ])
    };
    let _ = write!(
        html,
        "<nav class=\"pages\"><span id=\"page\">page {} of {}</span> · {} in all ",
        listing.page, listing.pages, listing.total
    );
    if listing.page > 1 {
        let _ = write!(
            html,
            "<a href=\"{}\" rel=\"prev\">previous</a>",
            params(listing.page - 1)
        );
    }
    if listing.page < listing.pages {
        let _ = write!(
            html,
            "<a href=\"{}\" rel=\"next\">next</a>",
            params(listing.page + 1)
        );
    }
    html.push_str("</nav>");
}

pub fn html(view: &Browse) -> String {
    let mut html = String::with_capacity(16 * 1024);
    match view {
        Browse::Registries { registries } => {
            html.push_str("<h2>Registries</h2><table id=\"registries\"><tr><th>registry</th><th class=\"num\">repositories</th><th class=\"num\">pulls</th><th>last pull</th></tr>");
            for r in registries {
                let _ = write!(
                    html,
                    "<tr><td><a href=\"{}\">{}</a></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    link(&[("registry", Some(&r.registry))]),
                    escape(&r.registry),
                    r.repositories,
                    r.pulls,
                    ago(r.last_pull)
                );
            }
            html.push_str(
                "</table><p class=\"muted\">Pulls are counted by tag since start-up.</p>",
            );
        }
        Browse::Repositories(listing) => {
            let _ = write!(
                html,
                "<h2><a href=\"/browse\">Registries</a> / {}</h2>",
                escape(&listing.registry)
            );
            filter_form(
                &mut html,
                &listing.registry,
                None,
                listing.filter.as_deref(),
                listing.sort,
            );
            html.push_str("<table id=\"repositories\"><tr><th>repository</th><th class=\"num\">tags</th><th class=\"num\">pulls</th><th>last pull</th></tr>");
            for r in &listing.rows {
                let _ = write!(
                    html,
                    "<tr><td><a href=\"{}\">{}</a></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    link(&[("registry", Some(&listing.registry)), ("repo", Some(&r.repository))]),
                    escape(&r.repository),
                    r.tags,
                    r.pulls,
                    ago(r.last_pull)
                );
            }
            html.push_str("</table>");
            pager(&mut html, listing);
        }
        Browse::Tags(listing) => {
            let repo = listing.repository.as_deref().unwrap_or("");
            let _ = write!(
                html,
                "<h2><a href=\"/browse\">Registries</a> / <a href=\"{}\">{}</a> / {}</h2>",
                link(&[("registry", Some(&listing.registry))]),
                escape(&listing.registry),
                escape(repo)
            );
            filter_form(
                &mut html,
                &listing.registry,
                Some(repo),
                listing.filter.as_deref(),
                listing.sort,
            );
            html.push_str("<table id=\"tags\"><tr><th>tag</th><th>digest</th><th>confirmed</th><th>platforms</th><th class=\"num\">size</th><th class=\"num\">pulls</th><th>last pull</th><th>pinned</th></tr>");
            for t in &listing.rows {
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td><code title=\"{}\">{}…</code></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&t.tag),
                    escape(&t.digest),
                    escape(short(&t.digest)),
                    ago(t.confirmed_at),
                    escape(&t.platforms.join(", ")),
                    t.bytes.map_or("-".into(), format_byte_size),
                    t.pulls,
                    ago(t.last_pull),
                    if t.pinned { "pinned" } else { "" }
                );
            }
            html.push_str("</table>");
            pager(&mut html, listing);
        }
    }
    html
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_encoded_and_escaped() {
        assert_eq!(
            link(&[
                ("registry", Some("docker.io")),
                ("repo", Some("a/b&c")),
                ("page", None)
            ]),
            "/browse?registry=docker.io&amp;repo=a%2Fb%26c"
        );
    }
}
