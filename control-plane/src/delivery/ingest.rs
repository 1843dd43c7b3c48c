//! Agents' output (the outbox stream) into the log.

use async_nats::jetstream::{self, AckKind, consumer};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};
use warren_schema::events::{
    AgentBusy, AgentMentioned, AgentReplied, AgentTurnCompleted, MemoryWritten,
    MessageDeadLettered, OutputRefused,
};
use warren_schema::nats::{Namespace, OutboxMessage, TRACEPARENT};
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

use super::nats;
use super::routed::{self, Routed, Trusted};
use super::senders::SenderCheck;
use crate::error::{Error, Result};

/// Durable consumer name of the control plane on the outbox stream.
pub const CONSUMER: &str = "control-plane";

/// Heartbeats of one turn recorded at most once per this many seconds, whatever ids the
/// workspace gives them: a workspace cannot fill the log with them.
pub const HEARTBEAT_RECORD_SECS: i64 = 30;

/// Refusals recorded per workspace per minute; past that they are only counted, so a
/// workspace cannot fill the log with refused output either.
pub const REFUSALS_PER_MINUTE: u32 = 10;

/// Outputs (replies, mentions, dead letters) recorded in answer to one routed message; past
/// it they are refused. A turn says a few things along the way and answers once: a workspace
/// flooding a conversation (every reply is posted to Slack) is not a turn.
pub const MAX_OUTPUTS_PER_MESSAGE: u32 = 50;

/// Outputs recorded per routed message, for the most recent messages (the oldest counts
/// are forgotten past `MAX_TRACKED`: a message that old has long been answered).
#[derive(Debug, Default)]
struct AnswerCounts {
    counts: std::collections::HashMap<EventId, u32>,
    order: std::collections::VecDeque<EventId>,
}

impl AnswerCounts {
    const MAX_TRACKED: usize = 100_000;

    fn spent(&self, routing: EventId) -> bool {
        self.counts
            .get(&routing)
            .is_some_and(|n| *n >= MAX_OUTPUTS_PER_MESSAGE)
    }

    fn add(&mut self, routing: EventId) {
        let count = self.counts.entry(routing).or_insert_with(|| {
            self.order.push_back(routing);
            0
        });
        *count += 1;
        while self.order.len() > Self::MAX_TRACKED {
            if let Some(oldest) = self.order.pop_front() {
                self.counts.remove(&oldest);
            }
        }
    }
}

/// Whether `out` counts toward its message's [`MAX_OUTPUTS_PER_MESSAGE`] (heartbeats are
/// bounded otherwise, memory writes answer no message).
fn counts_as_output(out: &OutboxMessage) -> bool {
    matches!(
        out,
        OutboxMessage::Reply { .. }
            | OutboxMessage::Mention { .. }
            | OutboxMessage::DeadLettered { .. }
            | OutboxMessage::TurnCompleted { .. }
    )
}

/// The event an outbox message becomes, and the stream it is appended to. What it says of
/// its origin, conversation and chain is ignored: `trusted` holds the control plane's own
/// record ([`routed::authorize`]). `now` buckets heartbeats. Pure.
pub fn to_event(
    message: &OutboxMessage,
    trusted: &Trusted,
    traceparent: Option<String>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(String, NewEvent)> {
    let meta = |id: &EventId, actor: &str| Metadata {
        traceparent: traceparent.clone(),
        correlation_id: trusted.correlation_id.or(Some(*id)),
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
            reply_to: _,
            text,
            correlation_id: _,
        } => Ok((
            format!("agent:{workspace}:{agent}"),
            NewEvent::from_domain(
                EventId::derive(&["outbox", workspace, id]),
                &AgentReplied {
                    workspace: workspace.clone(),
                    agent: agent.clone(),
                    reply_to: trusted_origin(trusted)?,
                    text: text.clone(),
                },
                meta(in_reply_to, agent),
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
            reply_to: _,
            correlation_id: _,
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
                    reply_to: trusted.reply_to.clone(),
                },
                meta(in_reply_to, agent),
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
        OutboxMessage::TurnCompleted {
            id,
            in_reply_to,
            workspace,
            agent,
            duration_ms,
            usage,
            correlation_id: _,
        } => Ok((
            format!("agent:{workspace}:{agent}"),
            NewEvent::from_domain(
                EventId::derive(&["outbox", workspace, id]),
                &AgentTurnCompleted {
                    workspace: workspace.clone(),
                    agent: agent.clone(),
                    routing_id: *in_reply_to,
                    duration_ms: *duration_ms,
                    usage: usage.clone(),
                },
                meta(in_reply_to, agent),
            )
            .map_err(encode)?,
        )),
        OutboxMessage::Heartbeat {
            id: _,
            in_reply_to,
            workspace,
            agent,
            busy_for_secs,
            correlation_id: _,
        } => Ok((
            format!("agent:{workspace}:{agent}"),
            NewEvent::from_domain(
                // One per turn and period, not one per id the workspace makes up.
                EventId::derive(&[
                    "heartbeat",
                    &in_reply_to.to_string(),
                    &(now.timestamp() / HEARTBEAT_RECORD_SECS).to_string(),
                ]),
                &AgentBusy {
                    workspace: workspace.clone(),
                    agent: agent.clone(),
                    routing_id: *in_reply_to,
                    busy_for_secs: *busy_for_secs,
                },
                meta(in_reply_to, agent),
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
            chain: _,
            reply_to: _,
            correlation_id: _,
        } => Ok((
            format!("agent:{workspace}:{from_agent}"),
            NewEvent::from_domain(
                EventId::derive(&["outbox", workspace, id]),
                &AgentMentioned {
                    from_workspace: workspace.clone(),
                    from_agent: from_agent.clone(),
                    to_agent: to_agent.clone(),
                    text: text.clone(),
                    chain: trusted.chain.clone(),
                    reply_to: trusted_origin(trusted)?,
                },
                meta(in_reply_to, from_agent),
            )
            .map_err(encode)?,
        )),
    }
}

/// The origin of an authorized answer (always there: [`routed::authorize`] sets it).
fn trusted_origin(trusted: &Trusted) -> Result<warren_schema::events::Origin> {
    trusted
        .reply_to
        .clone()
        .ok_or_else(|| Error::Nats("an answer without its routed message's origin".into()))
}

/// The `output.refused` event for `out`, and its stream. Its id is derived from the output,
/// so a redelivered refusal is recorded once; its cause is the routed message it claimed to
/// answer, when that exists, so `explain` shows it beside that message.
pub fn refusal(
    out: &OutboxMessage,
    routed: Option<&Routed>,
    reason: &str,
) -> Result<(String, NewEvent)> {
    let workspace = out.workspace();
    let mut metadata = Metadata::new("control-plane.ingest");
    metadata.actor = Some(out.agent().to_owned());
    metadata.causation_id = routed.map(|r| r.routing_id);
    metadata.correlation_id = routed.and_then(|r| r.correlation_id);
    let event = NewEvent::from_domain(
        EventId::derive(&["outbox-refused", workspace, out.id()]),
        &OutputRefused {
            workspace: workspace.to_owned(),
            agent: out.agent().to_owned(),
            kind: routed::kind(out).to_owned(),
            in_reply_to: routed::answers(out),
            reason: reason.to_owned(),
        },
        metadata,
    )
    .map_err(|e| Error::Nats(format!("encoding a refusal: {e}")))?;
    Ok((format!("refused:{workspace}"), event))
}

/// At most [`REFUSALS_PER_MINUTE`] recorded refusals per workspace per minute.
#[derive(Debug, Default)]
struct RefusalBudget {
    minute: i64,
    used: std::collections::HashMap<String, u32>,
}

impl RefusalBudget {
    fn take(&mut self, workspace: &str, now: chrono::DateTime<chrono::Utc>) -> bool {
        let minute = now.timestamp() / 60;
        if minute != self.minute {
            self.minute = minute;
            self.used.clear();
        }
        let used = self.used.entry(workspace.to_owned()).or_default();
        *used += 1;
        *used <= REFUSALS_PER_MINUTE
    }
}

/// Records outbox messages until `shutdown`. Each is acknowledged after its append
/// committed; an unreadable one, or one that claims another workspace than the subject it
/// came on ([`Namespace::check_outbox`]), is logged, counted and terminated. One that names
/// an agent its workspace does not host ([`SenderCheck`]) or answers a message not routed to
/// that agent ([`routed::authorize`]) is recorded as `output.refused` instead.
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
        .stream()
        .heartbeat(warren_schema::nats::PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| nats("reading the outbox")(&e))?;
    let mut senders = SenderCheck::default();
    let mut budget = RefusalBudget::default();
    let mut answers = AnswerCounts::default();
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
        // The turn that published the output is the parent; the events recorded from it
        // carry the ingest's own context, so the reply's post joins the same trace.
        let span = info_span!("ingest", subject = %message.subject);
        let traceparent = warren_telemetry::join_trace(&span, traceparent.as_deref());
        async {
            let parsed = serde_json::from_slice::<OutboxMessage>(&message.payload)
                .map_err(|e| format!("unreadable: {e}"))
                .and_then(|out| ns.check_outbox(&message.subject, &out).map(|()| out));
            let out = match parsed {
                Ok(out) => out,
                Err(e) => {
                    // Unreadable, or on another workspace's subject: there is no workspace
                    // to hold to account, only the metric and the log line.
                    warn!(error = %e, "outbox message refused; dropped");
                    metrics::counter!("warren_control_plane_outbox_refused_total").increment(1);
                    message
                        .ack_with(AckKind::Term)
                        .await
                        .map_err(|e| nats("terminating an outbox message")(&e))?;
                    return Ok(());
                }
            };
            let routed = match routed::answers(&out) {
                Some(id) => routed::load(&log, id).await?,
                None => None,
            };
            let now = chrono::Utc::now();
            let verdict = match senders.check(&log, &out).await? {
                Ok(()) => routed::authorize(&out, routed.as_ref()),
                Err(e) => Err(e),
            };
            let counted = routed
                .as_ref()
                .map(|r| r.routing_id)
                .filter(|_| counts_as_output(&out));
            let verdict = match (verdict, counted) {
                (Ok(trusted), Some(routing)) if answers.spent(routing) => {
                    // Over the budget, unless it is a redelivery of one already recorded.
                    let (_, event) = to_event(&out, &trusted, traceparent.clone(), now)?;
                    match log.get(event.id).await? {
                        Some(_) => Ok(trusted),
                        None => Err(format!(
                            "more than {MAX_OUTPUTS_PER_MESSAGE} outputs answer this message"
                        )),
                    }
                }
                (verdict, _) => verdict,
            };
            match verdict {
                Ok(trusted) => {
                    let (stream, event) = to_event(&out, &trusted, traceparent, now)?;
                    let kind = event.event_type.clone();
                    let appended = log.append(&AppendRequest::new(stream, vec![event])).await?;
                    if appended.iter().any(|a| !a.duplicate) {
                        metrics::counter!("warren_control_plane_agent_outputs_total", "kind" => kind)
                            .increment(1);
                    }
                    if let Some(routing) = counted
                        && appended.iter().any(|a| !a.duplicate)
                    {
                        answers.add(routing);
                    }
                }
                Err(reason) => {
                    warn!(workspace = out.workspace(), agent = out.agent(), %reason, "output refused");
                    metrics::counter!("warren_control_plane_outbox_refused_total").increment(1);
                    if budget.take(out.workspace(), now) {
                        let (stream, event) = refusal(&out, routed.as_ref(), &reason)?;
                        log.append(&AppendRequest::new(stream, vec![event])).await?;
                    }
                }
            }
            message
                .ack()
                .await
                .map_err(|e| nats("acknowledging an outbox message")(&e))?;
            Ok::<(), Error>(())
        }
        .instrument(span)
        .await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_has_a_budget_of_outputs_and_old_counts_are_forgotten() {
        let mut answers = AnswerCounts::default();
        let routing = EventId::random();
        for _ in 0..MAX_OUTPUTS_PER_MESSAGE {
            assert!(!answers.spent(routing));
            answers.add(routing);
        }
        assert!(answers.spent(routing));
        assert!(
            !answers.spent(EventId::random()),
            "another message has its own"
        );
        for _ in 0..AnswerCounts::MAX_TRACKED {
            answers.add(EventId::random());
        }
        assert!(
            !answers.spent(routing),
            "forgotten after enough newer messages"
        );
        assert_eq!(answers.counts.len(), AnswerCounts::MAX_TRACKED);
    }
}
