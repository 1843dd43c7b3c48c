//! Printing results: one line per figure, machine-greppable.
//!
//! With `WARREN_BENCH_SUMMARY` set to a file, every figure and ratio is also appended to it
//! as a JSON line (`{"section", "name", "value", "unit"|"goals"}`): `scripts/bench` runs
//! every benchmark and turns those lines into one table.

use std::io::Write;
use std::sync::Mutex;

/// The heading figures are printed under (their section in the summary).
static SECTION: Mutex<String> = Mutex::new(String::new());

/// Appends one record to the summary file, when there is one. A summary that cannot be
/// written is said once on stderr; the printed figures stand.
fn summarize(record: serde_json::Value) {
    let Some(path) = std::env::var_os("WARREN_BENCH_SUMMARY") else {
        return;
    };
    let section = SECTION.lock().map(|s| s.clone()).unwrap_or_default();
    let mut record = record;
    record["section"] = serde_json::Value::String(section);
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{record}"));
    if let Err(e) = written {
        eprintln!(
            "cannot append to the summary {}: {e}",
            path.to_string_lossy()
        );
    }
}

/// Prints `name: value unit` and flushes, so partial results survive an interrupted run.
pub(crate) fn figure(name: &str, value: f64, unit: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{name:<48} {value:>14.1} {unit}");
    let _ = out.flush();
    summarize(serde_json::json!({"name": name, "value": value, "unit": unit}));
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
    summarize(serde_json::json!({"name": name, "value": value, "goals": goals}));
}

/// Prints a line of context (parameters, percentiles).
pub(crate) fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

pub(crate) fn heading(text: &str) {
    if let Ok(mut section) = SECTION.lock() {
        text.clone_into(&mut section);
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\n## {text}");
    let _ = out.flush();
}
