//! Messages that ran out of deliveries without a dead letter.
//!
//! On a message's last allowed delivery the runtime stores it as a dead letter and reports
//! `dead_lettered`, then terminates it. A runtime that stops during that last delivery (a
//! crash, a deleted pod), or that cannot store the dead letter, reports nothing, and the
//! server will not deliver the message again: it was neither answered nor reported. The
//! server says so in a `MAX_DELIVERIES` advisory, which a stream of the control plane's
//! keeps ([`Namespace::undelivered_stream_config`]), so none is missed while no control
//! plane runs. For each, the control plane reads the message from the inbox stream, checks
//! it against its record of the routing (the advisory's consumer must be that agent's),
//! and records `message.dead_lettered` as the runtime would have (the same id: a report
//! that arrives after all is recorded once). The conversation is told as for any dead
//! letter.

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use warren_schema::nats::{InboxMessage, Namespace, OutboxMessage, turn_output_id};
use warren_schema::{AppendRequest, EventLog};

use super::{ingest, nats, routed};
use crate::error::{Error, Result};

/// The control plane's durable consumer of the advisories.
const CONSUMER: &str = "control-plane-undelivered";

/// What the control plane reads of a `io.nats.jetstream.advisory.v1.max_deliver` advisory.
#[derive(Debug, Deserialize)]
pub struct MaxDeliveries {
    pub stream: String,
    pub consumer: String,
    pub stream_seq: u64,
    pub deliveries: i64,
}

/// The `dead_lettered` output the runtime would have sent for `message`, given what the
/// control plane recorded of its routing (`routed`) and the advisory. `Err`: the advisory
/// does not fit the record (another consumer than that agent's). Pure.
pub fn dead_letter(
    advisory: &MaxDeliveries,
    message: &InboxMessage,
    routed: &routed::Routed,
) -> std::result::Result<OutboxMessage, String> {
    let expected = Namespace::inbox_consumer(&routed.workspace, &routed.agent);
    if advisory.consumer != expected {
        return Err(format!(
            "the advisory names consumer {}, but the message was routed to {}/{} ({expected})",
            advisory.consumer, routed.workspace, routed.agent
        ));
    }
    Ok(OutboxMessage::DeadLettered {
        id: turn_output_id(message.routing_id, "dead-letter"),
        in_reply_to: routed.routing_id,
        workspace: routed.workspace.clone(),
        agent: routed.agent.clone(),
        deliveries: advisory.deliveries,
        error: format!(
            "no answer after {} deliveries, and the runtime did not report a failure (it \
             may have stopped during the last one)",
            advisory.deliveries
        ),
        reply_to: None,
        correlation_id: None,
    })
}

/// Records the messages the advisories name until `shutdown`. NATS failures are returned
/// (the caller retries); an advisory is acknowledged after its record committed.
pub async fn run(
    js: jetstream::Context,
    ns: Namespace,
    log: EventLog,
    shutdown: CancellationToken,
) -> Result<()> {
    let advisories = js
        .get_or_create_stream(ns.undelivered_stream_config())
        .await
        .map_err(|e| nats("creating the undelivered stream")(&e))?;
    let consumer = advisories
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats("creating the undelivered consumer")(&e))?;
    let inbox = js
        .get_or_create_stream(ns.inbox_stream_config())
        .await
        .map_err(|e| nats("reading the inbox stream")(&e))?;
    let mut messages = consumer
        .stream()
        .heartbeat(warren_schema::nats::PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| nats("reading the undelivered advisories")(&e))?;
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        let Some(advisory) = next else { return Ok(()) };
        let advisory = advisory.map_err(|e| nats("receiving an advisory")(&e))?;
        let span = info_span!("undelivered", subject = %advisory.subject);
        async {
            match serde_json::from_slice::<MaxDeliveries>(&advisory.payload) {
                Ok(max) => record(&inbox, &log, &max).await?,
                Err(e) => warn!(error = %e, "unreadable advisory; dropped"),
            }
            advisory
                .ack()
                .await
                .map_err(|e| nats("acknowledging an advisory")(&e))
        }
        .instrument(span)
        .await?;
    }
}

/// Records the dead letter for one advisory (nothing when the message or its routing is
/// gone, or the advisory does not fit: each is logged).
async fn record(
    inbox: &jetstream::stream::Stream,
    log: &EventLog,
    max: &MaxDeliveries,
) -> Result<()> {
    let raw = match inbox.get_raw_message(max.stream_seq).await {
        Ok(raw) => raw,
        Err(e) => {
            warn!(seq = max.stream_seq, error = %e, "a message past its deliveries is gone from the inbox");
            return Ok(());
        }
    };
    let message: InboxMessage = match serde_json::from_slice(&raw.payload) {
        Ok(m) => m,
        Err(e) => {
            warn!(seq = max.stream_seq, error = %e, "a message past its deliveries is unreadable");
            return Ok(());
        }
    };
    let Some(routed) = routed::load(log, message.routing_id).await? else {
        warn!(routing = %message.routing_id, "a message past its deliveries was not routed by Warren");
        return Ok(());
    };
    let out = match dead_letter(max, &message, &routed) {
        Ok(out) => out,
        Err(reason) => {
            warn!(%reason, "an advisory that does not fit the record; ignored");
            return Ok(());
        }
    };
    let trusted = routed::authorize(&out, Some(&routed)).map_err(Error::Nats)?;
    let (stream, event) = ingest::to_event(&out, &trusted, None, chrono::Utc::now())?;
    let appended = log.append(&AppendRequest::new(stream, vec![event])).await?;
    if appended.iter().any(|a| !a.duplicate) {
        info!(routing = %routed.routing_id, agent = %routed.agent, deliveries = max.deliveries,
              "dead-lettered a message its runtime did not report");
        metrics::counter!("warren_control_plane_undelivered_total").increment(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_schema::EventId;
    use warren_schema::events::Origin;

    fn routed() -> routed::Routed {
        InboxMessage {
            routing_id: EventId::derive(&["routing"]),
            message_id: EventId::derive(&["message"]),
            workspace: "research".into(),
            agent: "alice".into(),
            text: "hi".into(),
            reply_to: Origin::Webhook {
                endpoint: "ci".into(),
                delivery_id: "1".into(),
            },
            chain: vec![],
            correlation_id: None,
            files: vec![],
        }
    }

    #[test]
    fn the_dead_letter_is_the_one_the_runtime_would_have_sent() {
        let routed = routed();
        let advisory = MaxDeliveries {
            stream: "WARREN_INBOX".into(),
            consumer: Namespace::inbox_consumer("research", "alice"),
            stream_seq: 7,
            deliveries: 5,
        };
        let out = dead_letter(&advisory, &routed, &routed).expect("fits");
        let OutboxMessage::DeadLettered {
            id,
            in_reply_to,
            agent,
            deliveries,
            ..
        } = &out
        else {
            panic!("{out:?}")
        };
        assert_eq!(id, &format!("{}:dead-letter", routed.routing_id));
        assert_eq!(
            (*in_reply_to, agent.as_str(), *deliveries),
            (routed.routing_id, "alice", 5)
        );

        let other = MaxDeliveries {
            consumer: Namespace::inbox_consumer("research", "bob"),
            ..advisory
        };
        assert!(
            dead_letter(&other, &routed, &routed)
                .expect_err("another agent's consumer")
                .contains("research/alice")
        );
    }
}
