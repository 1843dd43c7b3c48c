//! Printing results: one line per figure, machine-greppable.

use std::io::Write;

/// Prints `name: value unit` and flushes, so partial results survive an interrupted run.
pub(crate) fn figure(name: &str, value: f64, unit: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{name:<48} {value:>14.1} {unit}");
    let _ = out.flush();
}

/// Prints a ratio with its goal and whether it is met.
pub(crate) fn ratio(name: &str, value: f64, goals: &[f64]) {
    let verdict = goals
        .iter()
        .map(|g| format!("{} goal {g}", if value >= *g { "meets" } else { "BELOW" }))
        .collect::<Vec<_>>()
        .join(", ");
    let verdict = if verdict.is_empty() {
        String::new()
    } else {
        format!(" ({verdict})")
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{name:<48} {value:>14.3}{verdict}");
    let _ = out.flush();
}

/// Prints a line of context (parameters, percentiles).
pub(crate) fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

pub(crate) fn heading(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n## {text}");
    let _ = out.flush();
}
