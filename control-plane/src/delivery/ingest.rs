//! Agents' output (the outbox stream) into the log.

use async_nats::jetstream::{self, AckKind, consumer};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};
use warren_schema::events::{
    AgentBusy, AgentMentioned, AgentReplied, MemoryWritten, MessageDeadLettered,
};
use warren_schema::nats::{Namespace, OutboxMessage, TRACEPARENT};
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

use super::nats;
use super::senders::SenderCheck;
use crate::error::{Error, Result};

/// Durable consumer name of the control plane on the outbox stream.
pub const CONSUMER: &str = "control-plane";

/// The event an outbox message becomes, and the stream it is appended to. Pure.
pub fn to_event(
    message: &OutboxMessage,
    traceparent: Option<String>,
) -> Result<(String, NewEvent)> {
    let meta = |id: &EventId, correlation: &Option<EventId>, actor: &str| Metadata {
        traceparent: traceparent.clone(),
        correlation_id: correlation.or(Some(*id)),
        causation_id: Some(*id),
        source: "control-plane.ingest".into(),
        actor: Some(actor.to_owned()),
        received_at: chrono::Utc::now(),
    };
    let encode = |e: serde_json::Error| Error::Nats(format!("encoding an agent event: {e}"));
    match message {
        OutboxMessage::Reply {
            id,
            in_reply_to,
            workspace,
            agent,
            reply_to,
            text,
            correlation_id,
        } => Ok((
            format!("agent:{workspace}:{agent}"),
            NewEvent::from_domain(
                EventId::derive(&["outbox", workspace, id]),
                &AgentReplied {
                    workspace: workspace.clone(),
                    agent: agent.clone(),
                    reply_to: reply_to.clone(),
                    text: text.clone(),
                },
                meta(in_reply_to, correlation_id, agent),
            )
            .map_err(encode)?,
        )),
        OutboxMessage::DeadLettered {
            id,
            in_reply_to,
            workspace,
            agent,
            deliveries,
            error,
            reply_to,
            correlation_id,
        } => Ok((
            format!("agent:{workspace}:{agent}"),
            NewEvent::from_domain(
                EventId::derive(&["outbox", workspace, id]),
                &MessageDeadLettered {
                    routing_id: *in_reply_to,
                    workspace: workspace.clone(),
                    agent: agent.clone(),
                    deliveries: *deliveries,
                    error: error.clone(),
                    reply_to: reply_to.clone(),
                },
                meta(in_reply_to, correlation_id, agent),
            )
            .map_err(encode)?,
        )),
        OutboxMessage::MemoryWritten {
            id,
            bucket,
            key,
            value,
            revision,
            workspace,
            agent,
            correlation_id,
        } => {
            let id = EventId::derive(&["outbox", workspace, id]);
            let mut metadata = Metadata::new("control-plane.ingest");
            metadata.traceparent = traceparent.clone();
            metadata.correlation_id = *correlation_id;
            metadata.actor = Some(agent.clone());
            Ok((
                format!("memory:{bucket}"),
                NewEvent::from_domain(
                    id,
                    &MemoryWritten {
                        bucket: bucket.clone(),
                        key: key.clone(),
                        value: value.clone(),
                        revision: *revision,
                        workspace: workspace.clone(),
                        agent: agent.clone(),
                    },
                    metadata,
                )
                .map_err(encode)?,
            ))
        }
        OutboxMessage::Heartbeat {
            id,
            in_reply_to,
            workspace,
            agent,
            busy_for_secs,
            correlation_id,
        } => Ok((
            format!("agent:{workspace}:{agent}"),
            NewEvent::from_domain(
                EventId::derive(&["outbox", workspace, id]),
                &AgentBusy {
                    workspace: workspace.clone(),
                    agent: agent.clone(),
                    routing_id: *in_reply_to,
                    busy_for_secs: *busy_for_secs,
                },
                meta(in_reply_to, correlation_id, agent),
            )
            .map_err(encode)?,
        )),
        OutboxMessage::Mention {
            id,
            in_reply_to,
            workspace,
            from_agent,
            to_agent,
            text,
            chain,
            reply_to,
            correlation_id,
        } => Ok((
            format!("agent:{workspace}:{from_agent}"),
            NewEvent::from_domain(
                EventId::derive(&["outbox", workspace, id]),
                &AgentMentioned {
                    from_workspace: workspace.clone(),
                    from_agent: from_agent.clone(),
                    to_agent: to_agent.clone(),
                    text: text.clone(),
                    chain: chain.clone(),
                    reply_to: reply_to.clone(),
                },
                meta(in_reply_to, correlation_id, from_agent),
            )
            .map_err(encode)?,
        )),
    }
}

/// Records outbox messages until `shutdown`. Each is acknowledged after its append
/// committed; an unreadable one, one that claims another workspace than the subject it
/// came on ([`Namespace::check_outbox`]), or one that names an agent its workspace does not
/// host ([`SenderCheck`]), is logged, counted and terminated.
pub async fn run(
    js: jetstream::Context,
    ns: Namespace,
    log: EventLog,
    shutdown: CancellationToken,
) -> Result<()> {
    let stream = js
        .get_or_create_stream(ns.outbox_stream_config())
        .await
        .map_err(|e| nats("creating the outbox stream")(&e))?;
    let consumer = stream
        .get_or_create_consumer(
            CONSUMER,
            consumer::pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats("creating the outbox consumer")(&e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| nats("reading the outbox")(&e))?;
    let mut senders = SenderCheck::default();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            next = messages.next() => next,
        };
        let Some(message) = next else { return Ok(()) };
        let message = message.map_err(|e| nats("receiving from the outbox")(&e))?;
        let traceparent = message
            .headers
            .as_ref()
            .and_then(|h| h.get(TRACEPARENT))
            .map(|v| v.to_string());
        let span = info_span!("ingest", subject = %message.subject);
        async {
            let mut parsed = serde_json::from_slice::<OutboxMessage>(&message.payload)
                .map_err(|e| format!("unreadable: {e}"))
                .and_then(|out| ns.check_outbox(&message.subject, &out).map(|()| out));
            if let Ok(out) = &parsed
                && let Err(e) = senders.check(&log, out).await?
            {
                parsed = Err(e);
            }
            match parsed {
                Ok(out) => {
                    let (stream, event) = to_event(&out, traceparent)?;
                    log.append(&AppendRequest::new(stream, vec![event])).await?;
                    message
                        .ack()
                        .await
                        .map_err(|e| nats("acknowledging an outbox message")(&e))?;
                }
                Err(e) => {
                    // Unreadable, or a workspace speaking in another's name or as an
                    // agent it does not host: never recorded.
                    warn!(error = %e, "outbox message refused; dropped");
                    metrics::counter!("warren_control_plane_outbox_refused_total").increment(1);
                    message
                        .ack_with(AckKind::Term)
                        .await
                        .map_err(|e| nats("terminating an outbox message")(&e))?;
                }
            }
            Ok::<(), Error>(())
        }
        .instrument(span)
        .await?;
    }
}
