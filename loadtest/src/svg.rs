//! Ack latency as a picture: over time (p50, p99 and max of each half second) and as a
//! histogram, in one SVG a README can link. Pure: samples in, text out.

use std::fmt::Write;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 380.0;
const PANEL: f64 = 420.0;
const TOP: f64 = 50.0;
const PLOT_HEIGHT: f64 = 270.0;
const WINDOW_SECS: f64 = 0.5;
const BINS: usize = 40;

/// `samples`: (seconds since the start of the load, latency in milliseconds).
pub fn ack_latency(title: &str, samples: &[(f64, f64)]) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        svg,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    if samples.is_empty() {
        svg.push_str(r#"<text x="40" y="80">no samples</text></svg>"#);
        return svg;
    }
    let mut latencies: Vec<f64> = samples.iter().map(|(_, ms)| ms.max(0.001)).collect();
    latencies.sort_by(f64::total_cmp);
    let (low, high) = (
        latencies[0],
        latencies[latencies.len() - 1].max(latencies[0] * 1.01),
    );
    let duration = samples
        .iter()
        .map(|(t, _)| *t)
        .fold(0.0, f64::max)
        .max(WINDOW_SECS);
    over_time(&mut svg, samples, duration, low, high);
    histogram(&mut svg, &latencies, low, high);
    svg.push_str("</svg>");
    svg
}

/// Latency axis: log scale from `low` to `high` onto the plot's height.
fn y_of(ms: f64, low: f64, high: f64) -> f64 {
    let span = (high.log10() - low.log10()).max(1e-9);
    TOP + PLOT_HEIGHT - (ms.max(low).log10() - low.log10()) / span * PLOT_HEIGHT
}

fn over_time(svg: &mut String, samples: &[(f64, f64)], duration: f64, low: f64, high: f64) {
    let left = 70.0;
    axes(svg, left, "seconds into the load", "ack latency (ms, log)");
    for ms in decades(low, high) {
        let y = y_of(ms, low, high);
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + PANEL,
            left - 6.0,
            y + 4.0,
            label(ms)
        );
    }
    let windows = (duration / WINDOW_SECS).ceil() as usize;
    let mut by_window: Vec<Vec<f64>> = vec![Vec::new(); windows.max(1)];
    for (t, ms) in samples {
        let w = ((t / WINDOW_SECS) as usize).min(by_window.len() - 1);
        by_window[w].push(*ms);
    }
    for (quantile, color, name) in [
        (0.5, "#1f77b4", "p50"),
        (0.99, "#d62728", "p99"),
        (1.0, "#999", "max"),
    ] {
        let mut points = String::new();
        for (w, values) in by_window.iter_mut().enumerate() {
            if values.is_empty() {
                continue;
            }
            values.sort_by(f64::total_cmp);
            let i = ((values.len() - 1) as f64 * quantile).round() as usize;
            let x = left + (w as f64 + 0.5) * WINDOW_SECS / duration * PANEL;
            let _ = write!(points, "{x:.1},{:.1} ", y_of(values[i], low, high));
        }
        let _ = write!(
            svg,
            r#"<polyline class="{name}" fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            points.trim_end()
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" fill="#1f77b4">p50</text><text x="{}" y="{}" fill="#d62728">p99</text><text x="{}" y="{}" fill="#999">max</text>"##,
        left + 8.0,
        TOP + 14.0,
        left + 40.0,
        TOP + 14.0,
        left + 72.0,
        TOP + 14.0
    );
    let _ = write!(
        svg,
        r#"<text x="{left}" y="{}">0</text><text x="{}" y="{}" text-anchor="end">{duration:.0}</text>"#,
        TOP + PLOT_HEIGHT + 16.0,
        left + PANEL,
        TOP + PLOT_HEIGHT + 16.0
    );
}

fn histogram(svg: &mut String, latencies: &[f64], low: f64, high: f64) {
    let left = 70.0 + PANEL + 50.0;
    axes(svg, left, "ack latency (ms, log bins)", "requests");
    let span = (high.log10() - low.log10()).max(1e-9);
    let mut counts = [0usize; BINS];
    for ms in latencies {
        let bin = ((ms.log10() - low.log10()) / span * BINS as f64) as usize;
        counts[bin.min(BINS - 1)] += 1;
    }
    let most = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let width = PANEL / BINS as f64;
    for (i, n) in counts.iter().enumerate() {
        let h = *n as f64 / most * PLOT_HEIGHT;
        let _ = write!(
            svg,
            r##"<rect class="bar" data-count="{n}" x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#1f77b4"/>"##,
            left + i as f64 * width,
            TOP + PLOT_HEIGHT - h,
            (width - 1.0).max(0.5)
        );
    }
    for ms in decades(low, high) {
        let x = left + (ms.log10() - low.log10()) / span * PANEL;
        let _ = write!(
            svg,
            r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
            TOP + PLOT_HEIGHT + 16.0,
            label(ms)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{} requests; most in one bin: {}</text>"#,
        left + PANEL,
        TOP + 14.0,
        latencies.len(),
        most as usize
    );
}

fn axes(svg: &mut String, left: f64, x_label: &str, y_label: &str) {
    let bottom = TOP + PLOT_HEIGHT;
    let _ = write!(
        svg,
        r#"<line x1="{left}" y1="{TOP}" x2="{left}" y2="{bottom}" stroke="black"/><line x1="{left}" y1="{bottom}" x2="{}" y2="{bottom}" stroke="black"/><text x="{}" y="{}" text-anchor="middle">{x_label}</text><text transform="translate({},{}) rotate(-90)" text-anchor="middle">{y_label}</text>"#,
        left + PANEL,
        left + PANEL / 2.0,
        bottom + 36.0,
        left - 48.0,
        TOP + PLOT_HEIGHT / 2.0
    );
}

/// Axis ticks between `low` and `high`: 1, 2 and 5 times the powers of ten.
fn decades(low: f64, high: f64) -> Vec<f64> {
    let (from, to) = (low.log10().floor() as i32, high.log10().ceil() as i32);
    (from..=to)
        .flat_map(|e| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(e)))
        .filter(|t| (low..=high).contains(t))
        .collect()
}

fn label(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{}s", ms / 1000.0)
    } else {
        format!("{ms}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_picture_has_both_panels_and_counts_every_sample_once() {
        let samples: Vec<(f64, f64)> = (0..1000)
            .map(|i| (f64::from(i) / 100.0, 1.0 + f64::from(i % 97)))
            .collect();
        let svg = ack_latency("ack <latency>", &samples);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("ack &lt;latency&gt;"));
        for line in ["class=\"p50\"", "class=\"p99\"", "class=\"max\""] {
            assert!(svg.contains(line), "{line}");
        }
        let counted: usize = svg
            .split("data-count=\"")
            .skip(1)
            .map(|rest| {
                rest.split('"')
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or(0)
            })
            .sum();
        assert_eq!(counted, samples.len());
        assert_eq!(svg.matches("class=\"bar\"").count(), BINS);
    }

    #[test]
    fn no_samples_is_said_not_drawn() {
        assert!(ack_latency("x", &[]).contains("no samples"));
    }
}
