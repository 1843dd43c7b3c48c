//! Recovery from a lost NATS store.
//!
//! JetStream keeps what Warren gave it on the server's disk. When that store is lost (a
//! wiped volume, a server replaced without its data), the inbox stream comes back empty:
//! routed messages it had acknowledged but no agent had taken yet would be lost, and the
//! memory buckets are empty. The log knows better, and the publisher puts it back before it
//! publishes anything new:
//!
//! - It records, with its checkpoint, the highest inbox sequence the server acknowledged
//!   ([`INBOX_SEQUENCE`]). A stream whose last sequence is below that was reset
//!   ([`was_reset`]).
//! - Every routed message it had published that the log has not seen finished (no
//!   `agent.turn_completed` or `message.dead_lettered` answering it), within the inbox's
//!   retention, is published again, with its routing id as `Nats-Msg-Id` as the first
//!   time ([`open_routings`]). A turn that was running when the store went runs again;
//!   its outputs carry the same ids and are recorded once.
//! - Every memory bucket is put back from its `memory.written` history
//!   ([`super::memory::restore_all`]).
//! - `nats.recovered` records what was found and done.
//!
//! The agents' consumers went with the store: a runtime whose consumer is gone stops, and
//! the control plane starts it again, making them anew (as for any failed workspace).

use std::collections::HashSet;

use tracing::{info, warn};
use warren_schema::event_log::projection::load_checkpoint;
use warren_schema::events::{
    AgentTurnCompleted, DomainEvent, MessageDeadLettered, MessageRouted, NatsRecovered,
};
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

use crate::error::Result;

/// Where the publisher keeps the highest inbox sequence the server acknowledged (a row of
/// the checkpoints table, written with the delivery checkpoint).
pub const INBOX_SEQUENCE: &str = "control-plane.delivery.inbox-sequence";

/// Whether the inbox stream lost messages it had acknowledged: its last sequence is below
/// the highest one it acknowledged (a stream's sequence only grows, unless it is made
/// anew). Pure.
pub fn was_reset(acknowledged: u64, last_sequence: u64) -> bool {
    last_sequence < acknowledged
}

/// Whether a new message's acknowledgement shows the inbox stream made anew: the server
/// gives a new message (not a repeat it dropped) a sequence above every one before, so one
/// at or below the highest acknowledged comes from a stream that lost its messages, made
/// again by another part before this publish could fail. Pure.
pub fn fresh_ack_shows_reset(acknowledged: u64, sequence: u64, duplicate: bool) -> bool {
    !duplicate && sequence <= acknowledged
}

/// The routing decisions (in log order) that were published (`position <= published`) and
/// not answered by a turn's end or a dead letter. Pure.
pub fn open_routings(
    routed: &[(i64, EventId)],
    finished: &HashSet<EventId>,
    published: i64,
) -> Vec<EventId> {
    routed
        .iter()
        .filter(|(position, id)| *position <= published && !finished.contains(id))
        .map(|(_, id)| *id)
        .collect()
}

/// The routed messages to publish again: published up to `published`, recorded after
/// `horizon` (the inbox's retention: older ones the server would have dropped anyway),
/// not finished.
pub async fn unfinished(log: &EventLog, horizon: i64, published: i64) -> Result<Vec<EventId>> {
    let mut routed = Vec::new();
    let mut after = horizon;
    loop {
        let page = log.read_type(MessageRouted::TYPE, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.position;
        routed.extend(
            page.iter()
                .filter(|e| e.position <= published)
                .map(|e| (e.position, e.id)),
        );
        if after >= published {
            break;
        }
    }
    let mut finished = HashSet::new();
    for event_type in [AgentTurnCompleted::TYPE, MessageDeadLettered::TYPE] {
        let mut after = horizon;
        loop {
            let page = log.read_type(event_type, after, 10_000).await?;
            let Some(last) = page.last() else { break };
            after = last.position;
            for event in &page {
                let routing = match event_type {
                    AgentTurnCompleted::TYPE => event.decode::<AgentTurnCompleted>()?.routing_id,
                    _ => event.decode::<MessageDeadLettered>()?.routing_id,
                };
                finished.insert(routing);
            }
        }
    }
    Ok(open_routings(&routed, &finished, published))
}

/// Records what a recovery did.
pub async fn record(log: &EventLog, recovered: NatsRecovered) -> Result<()> {
    if recovered.republished > 0 || !recovered.buckets.is_empty() {
        info!(
            republished = recovered.republished,
            buckets = recovered.buckets.len(),
            "recovered from a lost NATS store"
        );
    } else {
        warn!("the NATS store was lost; nothing was waiting in it");
    }
    let event = NewEvent::from_domain(
        EventId::random(),
        &recovered,
        Metadata::new("control-plane/delivery"),
    )
    .map_err(|e| warren_schema::Error::InvalidEvent(e.to_string()))?;
    log.append(&AppendRequest::new("nats-recoveries", vec![event]))
        .await?;
    Ok(())
}

/// The highest inbox sequence recorded as acknowledged.
pub async fn acknowledged(log: &EventLog) -> Result<u64> {
    Ok(u64::try_from(load_checkpoint(log.pool(), INBOX_SEQUENCE).await?).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_behind_what_it_acknowledged_was_reset() {
        assert!(was_reset(120, 0), "made anew, empty");
        assert!(was_reset(120, 7), "made anew, some published since");
        assert!(!was_reset(120, 120));
        assert!(!was_reset(120, 130), "published after the record");
        assert!(!was_reset(0, 0), "a new installation");
    }

    #[test]
    fn a_new_message_numbered_below_what_was_acknowledged_shows_a_reset() {
        assert!(
            fresh_ack_shows_reset(120, 1, false),
            "the first into a stream made anew"
        );
        assert!(fresh_ack_shows_reset(120, 120, false));
        assert!(!fresh_ack_shows_reset(120, 121, false), "the next one");
        // A repeat the server dropped keeps the sequence it had the first time.
        assert!(!fresh_ack_shows_reset(120, 7, true));
        assert!(!fresh_ack_shows_reset(0, 1, false), "a new installation");
    }

    #[test]
    fn open_routings_are_the_published_unfinished_ones_in_log_order() {
        let id = |n: &str| EventId::derive(&[n]);
        let routed = [(10, id("a")), (11, id("b")), (12, id("c")), (20, id("d"))];
        let finished: HashSet<EventId> = [id("b")].into();
        assert_eq!(
            open_routings(&routed, &finished, 12),
            [id("a"), id("c")],
            "b finished; d not published yet (the publisher's own follow does it)"
        );
        assert!(open_routings(&routed, &finished, 0).is_empty());
    }
}
