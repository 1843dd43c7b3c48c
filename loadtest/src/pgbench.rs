//! The baseline: PostgreSQL's own pgbench, single-row INSERTs into the same table.

use std::time::Duration;

use anyhow::{Context, bail};

/// One row per transaction into `events`, with the same columns and payload size as the
/// Warren benchmark. Every row gets a stream of its own, so no client waits on another.
const INSERT_SCRIPT: &str = "INSERT INTO events (event_id, stream, stream_version, event_type, \
event_version, payload, source, received_at) VALUES (gen_random_uuid(), \
'pgbench-' || gen_random_uuid()::text, 1, 'bench.appended', 1, \
'{\"text\": \"the quick brown fox jumps over the lazy dog\"}', 'loadtest', now());\n";

/// Runs pgbench against `url` and returns transactions (= rows) per second.
pub(crate) async fn insert_tps(
    url: &str,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(format!("warren-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("insert.sql");
    std::fs::write(&script, INSERT_SCRIPT)?;
    let output = tokio::process::Command::new("pgbench")
        .arg("--no-vacuum")
        .arg("--client")
        .arg(clients.to_string())
        .arg("--jobs")
        .arg("2")
        .arg("--time")
        .arg(duration.as_secs().max(1).to_string())
        .arg("--file")
        .arg(&script)
        .arg(url)
        .output()
        .await
        .context("running pgbench (install postgresql-client / postgresql)")?;
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_tps(&stdout).with_context(|| format!("no tps line in pgbench output:\n{stdout}"))
}

fn parse_tps(out: &str) -> Option<f64> {
    out.lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.trim_start_matches("tps = ").split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_tps_line() {
        let out = "latency average = 6.1 ms\ntps = 10421.332 (without initial connection time)\n";
        assert_eq!(super::parse_tps(out), Some(10421.332));
        assert_eq!(super::parse_tps("no figures"), None);
    }
}
