//! Small charts as inline SVG, drawn on the server: a page shows them with JavaScript off, and
//! they are text (no image files, no client-side library). Pure string building.

use std::fmt::Write;

/// Plot size in SVG units.
const WIDTH: f64 = 300.0;
const HEIGHT: f64 = 64.0;
/// Room for the axis labels.
const LABELS: f64 = 14.0;
/// Points across: the history's complete minutes and the one under way. Shorter series are
/// drawn at the right, so the axis always spans the hour.
const SLOTS: usize = super::history::MINUTES + 1;

/// One line of a chart.
pub struct Series<'a> {
    pub label: &'a str,
    pub values: &'a [f64],
    /// A CSS colour.
    pub color: &'a str,
}

/// A chart of `series` over equally spaced points (the oldest left, the latest at the right
/// end), scaled to the largest
/// value (`floor` at least, so that a quiet hour does not look busy); `format` writes the
/// scale's top value.
pub fn chart(title: &str, series: &[Series], floor: f64, format: impl Fn(f64) -> String) -> String {
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(floor, f64::max);
    let mut svg = String::with_capacity(2048);
    let _ = write!(
        svg,
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {}\" role=\"img\" aria-label=\"{}\" preserveAspectRatio=\"none\"><title>{}</title>",
        HEIGHT + LABELS,
        super::escape(title),
        super::escape(title)
    );
    let _ = write!(
        svg,
        "<line x1=\"0\" y1=\"{HEIGHT}\" x2=\"{WIDTH}\" y2=\"{HEIGHT}\" class=\"axis\"/>\
         <line x1=\"0\" y1=\"0.5\" x2=\"{WIDTH}\" y2=\"0.5\" class=\"grid\"/>"
    );
    for s in series {
        let points = polyline(s.values, top);
        if points.is_empty() {
            continue;
        }
        let (first, last) = (
            x_of(0, s.values.len()),
            x_of(s.values.len() - 1, s.values.len()),
        );
        let _ = write!(
            svg,
            "<polygon points=\"{first:.1},{HEIGHT} {points} {last:.1},{HEIGHT}\" fill=\"{}\" fill-opacity=\"0.15\"/>\
             <polyline points=\"{points}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"><title>{}</title></polyline>",
            s.color,
            s.color,
            super::escape(s.label)
        );
        // The latest value as a dot: visible even while the hour has one point.
        if let Some(latest) = points.rsplit(' ').next().and_then(|p| p.split_once(',')) {
            let _ = write!(
                svg,
                "<circle cx=\"{}\" cy=\"{}\" r=\"2.5\" fill=\"{}\"/>",
                latest.0, latest.1, s.color
            );
        }
    }
    let _ = write!(
        svg,
        "<text x=\"2\" y=\"{:.0}\" class=\"tick\">-60 min</text>\
         <text x=\"{WIDTH}\" y=\"{:.0}\" class=\"tick\" text-anchor=\"end\">now</text>\
         <text x=\"2\" y=\"10\" class=\"tick\">{}</text></svg>",
        HEIGHT + LABELS - 2.0,
        HEIGHT + LABELS - 2.0,
        super::escape(&format(top))
    );
    svg
}

/// Where the `index`th of `count` points goes, the last at the right end.
fn x_of(index: usize, count: usize) -> f64 {
    let slots = count.max(SLOTS);
    let slot = slots - count + index;
    slot as f64 * WIDTH / (slots - 1) as f64
}

fn polyline(values: &[f64], top: f64) -> String {
    let mut points = String::with_capacity(values.len() * 12);
    for (i, value) in values.iter().enumerate() {
        let value = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        let y = HEIGHT - value / top * (HEIGHT - 2.0);
        let _ = write!(points, "{:.1},{y:.1} ", x_of(i, values.len()));
    }
    points.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_each_series_scaled_to_the_largest_value() {
        let svg = chart(
            "requests <per> second",
            &[
                Series {
                    label: "served",
                    values: &[0.0, 5.0, 10.0],
                    color: "#2563eb",
                },
                Series {
                    label: "fetched",
                    values: &[f64::NAN, 1.0],
                    color: "#d97706",
                },
            ],
            1.0,
            |top| format!("{top:.0}/s"),
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("requests &lt;per&gt; second"), "escaped title");
        assert!(svg.contains(">10/s<"), "the scale's top");
        // The largest value touches the top, zero the axis.
        assert!(svg.contains("290.0,64.0 295.0,33.0 300.0,2.0"), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 2);
        // A quiet hour is drawn against the floor, not stretched.
        let quiet = chart(
            "q",
            &[Series {
                label: "x",
                values: &[0.0, 0.0],
                color: "red",
            }],
            1.0,
            |t| format!("{t}"),
        );
        assert!(quiet.contains("295.0,64.0 300.0,64.0"));
        // A full hour spans the width.
        let hour = [1.0; SLOTS];
        let full = chart(
            "h",
            &[Series {
                label: "x",
                values: &hour,
                color: "red",
            }],
            1.0,
            |t| format!("{t}"),
        );
        assert!(full.contains("\"0.0,2.0 5.0,2.0"), "{full}");
    }
}
