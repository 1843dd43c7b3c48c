//! The one way the runtime speaks: messages to its workspace's outbox, where the control
//! plane records them. Each carries its id as `Nats-Msg-Id` (a repeat after a redelivery is
//! dropped by the server and recorded once) and the turn's `traceparent`.

use async_nats::jetstream::{self, context::PublishAckFuture};
use warren_schema::EventId;
use warren_schema::events::{Origin, TurnUsage};
use warren_schema::nats::{InboxMessage, Namespace, OutboxMessage, message_headers};

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("encoding an output: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("publishing to the outbox: {0}")]
    Publish(String),
}

/// A workspace's outbox.
#[derive(Debug, Clone)]
pub struct Outbox {
    js: jetstream::Context,
    subject: String,
}

impl Outbox {
    pub fn new(js: jetstream::Context, ns: &Namespace, workspace: &str) -> Self {
        Self {
            js,
            subject: ns.outbox_subject(workspace),
        }
    }

    /// Publishes `message`; the returned acknowledgement is the server's word that it is
    /// stored (await several together to pay one round trip).
    pub async fn send(
        &self,
        message: &OutboxMessage,
        traceparent: Option<&str>,
    ) -> Result<PublishAckFuture, OutboxError> {
        let payload = serde_json::to_vec(message)?;
        self.js
            .publish_with_headers(
                self.subject.clone(),
                message_headers(message.id(), traceparent),
                payload.into(),
            )
            .await
            .map_err(|e| OutboxError::Publish(e.to_string()))
    }

    /// Publishes `message` and waits until the server has stored it.
    pub async fn send_stored(
        &self,
        message: &OutboxMessage,
        traceparent: Option<&str>,
    ) -> Result<(), OutboxError> {
        self.send(message, traceparent)
            .await?
            .await
            .map(|_| ())
            .map_err(|e| OutboxError::Publish(e.to_string()))
    }
}

/// The turn an output belongs to: what every reply and mention of it repeats.
#[derive(Debug, Clone)]
pub struct TurnRef {
    pub routing_id: EventId,
    pub workspace: String,
    pub agent: String,
    /// Who asked whom before this turn.
    pub chain: Vec<String>,
    pub reply_to: Origin,
    pub correlation_id: Option<EventId>,
}

impl TurnRef {
    /// The turn of `agent` (in `workspace`) on `inbox`.
    pub fn of(inbox: &InboxMessage, workspace: &str, agent: &str) -> Self {
        Self {
            routing_id: inbox.routing_id,
            workspace: workspace.to_owned(),
            agent: agent.to_owned(),
            chain: inbox.chain.clone(),
            reply_to: inbox.reply_to.clone(),
            correlation_id: inbox.correlation_id,
        }
    }

    /// Output ids are `{routing id}:{what}`: unique per output of the turn, the same when
    /// the turn is repeated after a redelivery.
    fn id(&self, what: &str) -> String {
        warren_schema::nats::turn_output_id(self.routing_id, what)
    }

    pub fn reply(&self, what: &str, text: &str) -> OutboxMessage {
        OutboxMessage::Reply {
            id: self.id(what),
            in_reply_to: self.routing_id,
            workspace: self.workspace.clone(),
            agent: self.agent.clone(),
            reply_to: self.reply_to.clone(),
            text: text.to_owned(),
            correlation_id: self.correlation_id,
        }
    }

    /// A mention of `to`, carrying the chain with this agent appended.
    pub fn mention(&self, what: &str, to: &str, text: &str) -> OutboxMessage {
        let mut chain = self.chain.clone();
        chain.push(self.agent.clone());
        OutboxMessage::Mention {
            id: self.id(what),
            in_reply_to: self.routing_id,
            workspace: self.workspace.clone(),
            from_agent: self.agent.clone(),
            to_agent: to.to_owned(),
            text: text.to_owned(),
            chain,
            reply_to: self.reply_to.clone(),
            correlation_id: self.correlation_id,
        }
    }

    pub fn heartbeat(&self, n: u64, busy_for_secs: u64) -> OutboxMessage {
        OutboxMessage::Heartbeat {
            id: self.id(&format!("heartbeat:{n}")),
            in_reply_to: self.routing_id,
            workspace: self.workspace.clone(),
            agent: self.agent.clone(),
            busy_for_secs,
            correlation_id: self.correlation_id,
        }
    }

    /// The end of the turn: its duration and model usage.
    pub fn completed(&self, duration_ms: u64, usage: TurnUsage) -> OutboxMessage {
        OutboxMessage::TurnCompleted {
            id: self.id("completed"),
            in_reply_to: self.routing_id,
            workspace: self.workspace.clone(),
            agent: self.agent.clone(),
            duration_ms,
            usage,
            correlation_id: self.correlation_id,
        }
    }

    pub fn dead_lettered(&self, deliveries: i64, error: String) -> OutboxMessage {
        OutboxMessage::DeadLettered {
            id: self.id("dead-letter"),
            in_reply_to: self.routing_id,
            workspace: self.workspace.clone(),
            agent: self.agent.clone(),
            deliveries,
            error,
            reply_to: Some(self.reply_to.clone()),
            correlation_id: self.correlation_id,
        }
    }
}
