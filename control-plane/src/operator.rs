//! What the operator commands print. Pure formatting over data read by the caller, so the
//! output is unit-tested without a database.

use std::io::Write;

use warren_schema::RecordedEvent;
use warren_schema::event_log::{horizon::Watermark, watermark};
use warren_schema::{EventLog, Result};

pub(crate) async fn status(log: &EventLog, out: &mut impl Write) -> anyhow::Result<()> {
    let w = watermark(log.pool()).await?;
    let (events, last): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), max(position) FROM events")
            .fetch_one(log.pool())
            .await?;
    let checkpoints: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, position FROM subscription_checkpoints ORDER BY name")
            .fetch_all(log.pool())
            .await?;
    write_status(out, &w, events, last.unwrap_or(0), &checkpoints)?;
    Ok(())
}

fn write_status(
    out: &mut impl Write,
    w: &Watermark,
    events: i64,
    last: i64,
    checkpoints: &[(String, i64)],
) -> std::io::Result<()> {
    writeln!(
        out,
        "event log: {events} events, last committed position {last}"
    )?;
    writeln!(
        out,
        "positions allocated: {} (transactions in flight: {})",
        w.allocated,
        if w.oldest_running < w.next_xid {
            "yes"
        } else {
            "none"
        }
    )?;
    if checkpoints.is_empty() {
        writeln!(out, "checkpoints: none yet")?;
    }
    for (name, position) in checkpoints {
        writeln!(
            out,
            "checkpoint {name}: position {position}, behind by {}",
            (last - position).max(0)
        )?;
    }
    Ok(())
}

pub(crate) fn print_events(
    events: &[RecordedEvent],
    out: &mut impl Write,
) -> Result<(), std::io::Error> {
    for e in events {
        serde_json::to_writer(&mut *out, e)?;
        writeln!(out)?;
    }
    Ok(())
}

pub(crate) fn print_chain(chain: &[RecordedEvent], out: &mut impl Write) -> std::io::Result<()> {
    for (depth, e) in chain.iter().enumerate() {
        writeln!(
            out,
            "{:indent$}{} {} #{} {} (stream {} v{}, by {})",
            "",
            e.recorded_at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            if depth == 0 { "cause" } else { "  -> " },
            e.position,
            e.event_type,
            e.stream,
            e.stream_version,
            e.metadata.source,
            indent = depth * 2
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_lagging_checkpoints() {
        let w = Watermark {
            allocated: 12,
            next_xid: 100,
            oldest_running: 98,
        };
        let mut out = Vec::new();
        write_status(&mut out, &w, 10, 12, &[("router".into(), 7)]).expect("write");
        let text = String::from_utf8(out).expect("utf8");
        assert!(
            text.contains("10 events, last committed position 12"),
            "{text}"
        );
        assert!(text.contains("in flight: yes"), "{text}");
        assert!(
            text.contains("checkpoint router: position 7, behind by 5"),
            "{text}"
        );
    }
}
