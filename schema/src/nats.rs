//! NATS: every subject, stream and wire message in one place.
//!
//! - Inboxes: `{prefix}.inbox.{workspace}.{agent}` in the stream `{PREFIX}_INBOX`. The control
//!   plane publishes each routed message there with the routing decision's event id as the
//!   JetStream message id (`Nats-Msg-Id`), so a republish after a crash is dropped by the
//!   server's duplicate window. Workspaces consume their agents' subjects.
//! - Outbox: `{prefix}.outbox.{workspace}` in `{PREFIX}_OUTBOX`: agents' replies and mentions,
//!   recorded in the log by the control plane (one durable consumer).
//! - Dead letters: `{prefix}.dead.{workspace}.{agent}`: messages that kept failing.
//!
//! Every message carries the W3C `traceparent` header of the conversation. NATS is a
//! transport: what must not be lost is in the event log, and the inbox can be re-filled from
//! it (the control plane's delivery checkpoint).

use std::time::Duration;

use async_nats::jetstream::stream;
use serde::{Deserialize, Serialize};

use crate::EventId;
use crate::events::Origin;

/// `traceparent` header name on NATS messages.
pub const TRACEPARENT: &str = "traceparent";

/// The subject and stream names of one installation (`warren` unless several share a NATS
/// account; tests use a prefix of their own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    prefix: String,
}

impl Default for Namespace {
    fn default() -> Self {
        Self::new("warren")
    }
}

impl Namespace {
    /// `prefix` must be a single subject token (letters, digits, `-`, `_`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn inbox_subject(&self, workspace: &str, agent: &str) -> String {
        format!("{}.inbox.{workspace}.{agent}", self.prefix)
    }

    /// Every inbox of one workspace (what its runtime consumes).
    pub fn workspace_inboxes(&self, workspace: &str) -> String {
        format!("{}.inbox.{workspace}.*", self.prefix)
    }

    pub fn outbox_subject(&self, workspace: &str) -> String {
        format!("{}.outbox.{workspace}", self.prefix)
    }

    pub fn dead_letter_subject(&self, workspace: &str, agent: &str) -> String {
        format!("{}.dead.{workspace}.{agent}", self.prefix)
    }

    /// A workspace's own memory bucket.
    pub fn workspace_bucket(&self, workspace: &str) -> String {
        format!("{}-mem-{workspace}", self.prefix)
    }

    /// The bucket every workspace shares.
    pub fn shared_bucket(&self) -> String {
        format!("{}-mem-shared", self.prefix)
    }

    /// A memory bucket: file-backed, a short history per key.
    pub fn bucket_config(bucket: &str) -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: bucket.to_owned(),
            history: 5,
            storage: stream::StorageType::File,
            ..Default::default()
        }
    }

    pub fn inbox_stream(&self) -> String {
        format!("{}_INBOX", self.prefix.to_uppercase())
    }

    pub fn outbox_stream(&self) -> String {
        format!("{}_OUTBOX", self.prefix.to_uppercase())
    }

    /// Inboxes: kept until consumed, file-backed, with a duplicate window long enough to
    /// absorb a republish after a control-plane restart.
    pub fn inbox_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.inbox_stream(),
            subjects: vec![
                format!("{}.inbox.>", self.prefix),
                format!("{}.dead.>", self.prefix),
            ],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(30 * 60),
            ..Default::default()
        }
    }

    /// Agents' output: kept until the control plane has recorded it.
    pub fn outbox_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.outbox_stream(),
            subjects: vec![format!("{}.outbox.>", self.prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(30 * 60),
            ..Default::default()
        }
    }
}

/// A message for an agent (its inbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    /// The routing decision (`message.routed`): the cause of whatever the agent does.
    pub routing_id: EventId,
    /// The message or mention routed.
    pub message_id: EventId,
    pub workspace: String,
    pub agent: String,
    pub text: String,
    /// Where the conversation's replies go.
    pub reply_to: Origin,
    /// Who asked whom before this (agent mentions), oldest first.
    pub chain: Vec<String>,
    pub correlation_id: Option<EventId>,
}

/// What an agent sends back (the outbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OutboxMessage {
    Reply {
        /// Unique per output (the runtime derives it from the inbox message and the turn),
        /// so a redelivery is recorded once.
        id: String,
        /// The inbox message's `routing_id`.
        in_reply_to: EventId,
        workspace: String,
        agent: String,
        reply_to: Origin,
        text: String,
        correlation_id: Option<EventId>,
    },
    /// A memory write, recorded in the log so the bucket can be restored from it.
    MemoryWritten {
        id: String,
        bucket: String,
        key: String,
        value: Option<serde_json::Value>,
        revision: u64,
        workspace: String,
        agent: String,
        correlation_id: Option<EventId>,
    },
    /// The runtime gave up on an inbox message (see `MessageDeadLettered`).
    DeadLettered {
        id: String,
        in_reply_to: EventId,
        workspace: String,
        agent: String,
        deliveries: i64,
        error: String,
        reply_to: Option<Origin>,
        correlation_id: Option<EventId>,
    },
    Mention {
        id: String,
        in_reply_to: EventId,
        workspace: String,
        from_agent: String,
        to_agent: String,
        text: String,
        chain: Vec<String>,
        reply_to: Origin,
        correlation_id: Option<EventId>,
    },
}

impl OutboxMessage {
    /// The runtime's id of this output (its `Nats-Msg-Id`, and the seed of its event id).
    pub fn id(&self) -> &str {
        match self {
            Self::Reply { id, .. }
            | Self::Mention { id, .. }
            | Self::MemoryWritten { id, .. }
            | Self::DeadLettered { id, .. } => id,
        }
    }
}
