//! An agent's inbox: a durable JetStream consumer, one turn at a time.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};
use warren_schema::nats::{InboxMessage, Namespace, OutboxMessage, TRACEPARENT};

use crate::agent;

/// Why a turn failed.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("the inbox message is not readable: {0}")]
    Unreadable(#[from] serde_json::Error),
    #[error("publishing the agent's output: {0}")]
    Publish(String),
    #[error(transparent)]
    Driver(#[from] agent::DriverError),
}

/// The agent's durable consumer (created if missing): its inbox subject only, explicit acks,
/// at most `max_deliver` deliveries.
pub async fn consumer(
    js: &jetstream::Context,
    ns: &Namespace,
    workspace: &str,
    agent: &str,
    max_deliver: i64,
) -> anyhow::Result<consumer::PullConsumer> {
    let stream = js.get_or_create_stream(ns.inbox_stream_config()).await?;
    let name = format!("{workspace}-{agent}");
    Ok(stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: ns.inbox_subject(workspace, agent),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(120),
                max_deliver,
                ..Default::default()
            },
        )
        .await?)
}

/// Runs one agent's turns.
#[derive(Debug, Clone)]
pub struct Worker {
    pub js: jetstream::Context,
    pub ns: Namespace,
    pub workspace: String,
    pub agent: String,
    pub driver: agent::Driver,
    pub workspace_dir: std::path::PathBuf,
    /// This agent's view of the workspace bucket and the shared one.
    pub memory: Option<(crate::memory::Memory, crate::memory::Memory)>,
    pub max_deliver: i64,
}

impl Worker {
    /// Takes messages until `shutdown`; the turn in progress finishes first.
    pub async fn run(
        self,
        consumer: consumer::PullConsumer,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut messages = consumer.messages().await?;
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let Some(message) = next else { return Ok(()) };
            let message = message?;
            let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
            // Each turn is a span, a child of the conversation's trace (the inbox message's
            // `traceparent`); what the turn publishes carries the turn's own context.
            let span = tracing::info_span!(
                "turn",
                agent = %self.agent,
                subject = %message.subject,
                delivered
            );
            if let Some(tp) = message.headers.as_ref().and_then(|h| h.get(TRACEPARENT)) {
                warren_telemetry::set_parent_from_traceparent(&span, tp.as_str());
            }
            match self.turn(&message).instrument(span).await {
                Ok(()) => message.ack().await.map_err(anyhow::Error::msg)?,
                Err(e)
                    if delivered >= self.max_deliver || matches!(e, TurnError::Unreadable(_)) =>
                {
                    warn!(error = %e, delivered, "giving up on a message: dead-lettered");
                    let mut headers = HeaderMap::new();
                    headers.insert("Warren-Error", e.to_string().as_str());
                    self.js
                        .publish_with_headers(
                            self.ns.dead_letter_subject(&self.workspace, &self.agent),
                            headers,
                            message.payload.clone(),
                        )
                        .await?
                        .await?;
                    self.report_dead_letter(&message, delivered, &e).await?;
                    message
                        .ack_with(AckKind::Term)
                        .await
                        .map_err(anyhow::Error::msg)?;
                }
                Err(e) => {
                    warn!(error = %e, delivered, "turn failed; redelivery later");
                    message
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(
                            1 << delivered.min(5),
                        ))))
                        .await
                        .map_err(anyhow::Error::msg)?;
                }
            }
        }
    }

    /// Tells the control plane (outbox → `message.dead_lettered`), which tells the
    /// conversation.
    async fn report_dead_letter(
        &self,
        message: &jetstream::Message,
        delivered: i64,
        error: &TurnError,
    ) -> anyhow::Result<()> {
        let inbox = serde_json::from_slice::<InboxMessage>(&message.payload).ok();
        let Some(routing) = inbox.as_ref().map(|i| i.routing_id) else {
            // Unreadable: nothing identifies the conversation; the dead-letter subject
            // keeps it for an operator.
            return Ok(());
        };
        let report = OutboxMessage::DeadLettered {
            id: format!("{routing}:dead-letter"),
            in_reply_to: routing,
            workspace: self.workspace.clone(),
            agent: self.agent.clone(),
            deliveries: delivered,
            error: error.to_string(),
            reply_to: inbox.as_ref().map(|i| i.reply_to.clone()),
            correlation_id: inbox.and_then(|i| i.correlation_id),
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", report.id());
        self.js
            .publish_with_headers(
                self.ns.outbox_subject(&self.workspace),
                headers,
                serde_json::to_vec(&report)?.into(),
            )
            .await?
            .await?;
        Ok(())
    }

    /// One turn: run the driver, publish the reply and the mentions, each acknowledged by
    /// the server, before the inbox message is acknowledged.
    async fn turn(&self, message: &jetstream::Message) -> Result<(), TurnError> {
        let inbox: InboxMessage = serde_json::from_slice(&message.payload)?;
        let traceparent = warren_telemetry::current_traceparent().or_else(|| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(TRACEPARENT))
                .map(|v| v.to_string())
        });
        let turn = self
            .driver
            .turn(&agent::TurnContext {
                workspace: self.workspace.clone(),
                agent: self.agent.clone(),
                text: inbox.text.clone(),
                message_id: inbox.message_id.to_string(),
                routing_id: inbox.routing_id.to_string(),
                conversation: inbox.correlation_id.map(|c| c.to_string()),
                chain: inbox.chain.clone(),
                traceparent: traceparent.clone(),
                workspace_dir: self.workspace_dir.clone(),
                reply_to: serde_json::to_string(&inbox.reply_to).ok(),
                memory: self.memory.as_ref().map(|(m, _)| {
                    let mut m = m.clone();
                    m.conversation = inbox.correlation_id;
                    m
                }),
                shared_memory: self.memory.as_ref().map(|(_, s)| {
                    let mut s = s.clone();
                    s.conversation = inbox.correlation_id;
                    s
                }),
            })
            .await?;
        info!(routing = %inbox.routing_id, mentions = ?turn.mentions, "turn");
        let mut chain = inbox.chain.clone();
        chain.push(self.agent.clone());
        let routing = inbox.routing_id.to_string();
        let mut outputs = vec![OutboxMessage::Reply {
            id: format!("{routing}:reply"),
            in_reply_to: inbox.routing_id,
            workspace: self.workspace.clone(),
            agent: self.agent.clone(),
            reply_to: inbox.reply_to.clone(),
            text: turn.reply.clone(),
            correlation_id: inbox.correlation_id,
        }];
        for (n, (to, text)) in turn.directed.iter().enumerate() {
            outputs.push(OutboxMessage::Mention {
                id: format!("{routing}:tool-mention:{n}:{to}"),
                in_reply_to: inbox.routing_id,
                workspace: self.workspace.clone(),
                from_agent: self.agent.clone(),
                to_agent: to.clone(),
                text: text.clone(),
                chain: chain.clone(),
                reply_to: inbox.reply_to.clone(),
                correlation_id: inbox.correlation_id,
            });
        }
        for to in &turn.mentions {
            outputs.push(OutboxMessage::Mention {
                id: format!("{routing}:mention:{to}"),
                in_reply_to: inbox.routing_id,
                workspace: self.workspace.clone(),
                from_agent: self.agent.clone(),
                to_agent: to.clone(),
                text: turn.reply.clone(),
                chain: chain.clone(),
                reply_to: inbox.reply_to.clone(),
                correlation_id: inbox.correlation_id,
            });
        }
        // Publish every output, then wait for all their acknowledgements: one round trip
        // for the turn's outputs, not one each. They stay in order on the connection.
        let mut acks = Vec::with_capacity(outputs.len());
        for output in outputs {
            let id = output.id().to_owned();
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            if let Some(tp) = &traceparent {
                headers.insert(TRACEPARENT, tp.as_str());
            }
            let payload = serde_json::to_vec(&output)?;
            acks.push(
                self.js
                    .publish_with_headers(
                        self.ns.outbox_subject(&self.workspace),
                        headers,
                        payload.into(),
                    )
                    .await
                    .map_err(|e| TurnError::Publish(e.to_string()))?,
            );
        }
        for ack in acks {
            ack.await.map_err(|e| TurnError::Publish(e.to_string()))?;
        }
        Ok(())
    }
}
