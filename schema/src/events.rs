//! The versioned event types every Warren service shares.
//!
//! Names are past tense (a fact that happened). Each type has a stable wire name and a
//! version; its JSON form is pinned by a snapshot file in `schema/tests/snapshots/`, so a
//! change to a stored format shows up in review. A change that old readers cannot read gets
//! a new version (a new struct), never an edit of the old one: the log keeps old events
//! forever.

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// A typed event payload with a stable wire name and version.
pub trait DomainEvent: Serialize + DeserializeOwned {
    /// Wire name, `noun.past_tense_verb`.
    const TYPE: &'static str;
    /// Payload schema version, starting at 1.
    const VERSION: i16;
}

macro_rules! domain_events {
    ($($ty:ident => $name:literal v $version:literal),+ $(,)?) => {
        $(impl DomainEvent for $ty {
            const TYPE: &'static str = $name;
            const VERSION: i16 = $version;
        })+

        /// The `(type, version)` of every event type this build knows.
        pub const KNOWN_EVENT_TYPES: &[(&str, i16)] = &[$(($name, $version)),+];
    };
}

domain_events! {
    SlackEventReceived => "slack.event_received" v 1,
    WebhookReceived => "webhook.received" v 1,
    MessageReceived => "message.received" v 1,
    MessageFileStored => "message.file_stored" v 1,
    MessageFileRefused => "message.file_refused" v 1,
    MessageRouted => "message.routed" v 1,
    WorkspaceStartRequested => "workspace.start_requested" v 1,
    WorkspaceStopRequested => "workspace.stop_requested" v 1,
    WorkspaceObserved => "workspace.observed" v 1,
    AgentReplied => "agent.replied" v 1,
    AgentMentioned => "agent.mentioned" v 1,
    ReplyPostStarted => "reply.post_started" v 1,
    ReplyDelivered => "reply.delivered" v 1,
    AgentConfigured => "agent.configured" v 1,
    AgentRemoved => "agent.removed" v 1,
    RouteConfigured => "route.configured" v 1,
    RouteRemoved => "route.removed" v 1,
    WorkspaceStartQueued => "workspace.start_queued" v 1,
    WorkspaceFailed => "workspace.failed" v 1,
    MentionRefused => "mention.refused" v 1,
    MemoryWritten => "memory.written" v 1,
    MessageDeadLettered => "message.dead_lettered" v 1,
    AgentTurnCompleted => "agent.turn_completed" v 1,
    AgentBusy => "agent.busy" v 1,
    OutputRefused => "output.refused" v 1,
    MessageRefused => "message.refused" v 1,
    TokenIssued => "token.issued" v 1,
    TokenRevoked => "token.revoked" v 1,
    WorkspaceActionRequested => "workspace.action_requested" v 1,
    WebhookEndpointConfigured => "webhook_endpoint.configured" v 1,
    WebhookEndpointRemoved => "webhook_endpoint.removed" v 1,
    MemoryRestored => "memory.restored" v 1,
    NatsRecovered => "nats.recovered" v 1,
    QuotaSet => "quota.set" v 1,
    QuotaRemoved => "quota.removed" v 1,
}

/// A Slack Events API `event_callback`, stored as received (after signature verification).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlackEventReceived {
    pub team_id: String,
    /// Slack's `event_id`: with `team_id`, the idempotency key of the delivery.
    pub event_id: String,
    pub event_time: i64,
    /// The whole JSON body Slack sent.
    pub body: Value,
}

/// A webhook delivery, stored as received (after signature verification).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookReceived {
    /// The configured endpoint name (`/webhooks/{endpoint}`).
    pub endpoint: String,
    /// Signature scheme that verified it: `github`, `standard_webhooks` or `hmac_sha256`.
    pub scheme: String,
    /// The sender's delivery id, or a body hash where the scheme has none.
    pub delivery_id: String,
    /// The sender's event kind where it names one (`X-GitHub-Event`).
    pub event: Option<String>,
    pub content_type: Option<String>,
    /// The body: parsed JSON where it was JSON, else the text as a JSON string.
    pub body: Value,
}

/// Where a message came from, normalised across channels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    Slack {
        team_id: String,
        channel: String,
        /// The thread a reply belongs in: the parent's `ts`, or the message's own `ts`.
        thread_ts: String,
        ts: String,
        user: String,
    },
    Webhook {
        endpoint: String,
        delivery_id: String,
    },
    /// A `/warren` slash command: replies go to the channel.
    SlackCommand {
        team_id: String,
        channel: String,
        user: String,
    },
    Agent {
        workspace: String,
        agent: String,
    },
}

/// A file attached to a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    pub id: String,
    pub name: Option<String>,
    pub mimetype: Option<String>,
    pub url: Option<String>,
    /// Its size in bytes, as Slack announced it (`None` in events recorded before it was
    /// kept; the download counts the bytes whatever this says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// A message addressed to Warren, normalised from whichever channel carried it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageReceived {
    pub origin: Origin,
    pub text: String,
    /// Agents addressed by `@name` or by the app's user id, in order of first mention.
    pub addressed_agents: Vec<String>,
    pub files: Vec<FileRef>,
}

/// Decision: deliver a message to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRouted {
    /// The `message.received` or `agent.mentioned` event being routed.
    pub message_id: crate::EventId,
    pub agent: String,
    pub workspace: String,
    /// Why this agent: `mention`, `channel_route`, `webhook_route`, `agent_mention`.
    pub reason: String,
}

/// Decision: a workspace should be running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceStartRequested {
    pub workspace: String,
    /// Why: `message_waiting`, `restart_after_failure`, ...
    pub reason: String,
    /// Restart attempt number (0 for a first start).
    pub attempt: u32,
}

/// Decision: a workspace should stop; its files remain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceStopRequested {
    pub workspace: String,
    /// Why: `idle`, `operator`, `failed`, ...
    pub reason: String,
}

/// What a runtime backend observed about a workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkspacePhase {
    Starting,
    Ready,
    Exited,
    Failed,
    Gone,
}

/// Observation: a workspace's runtime changed phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceObserved {
    pub workspace: String,
    pub phase: WorkspacePhase,
    /// `kubernetes` or `local`.
    pub backend: String,
    /// Pod name or process id.
    pub instance: Option<String>,
    pub detail: Option<String>,
    /// The instance was stopped by a control plane taking over from one that died (which
    /// cannot be asked about its processes), to be started again at once under the start
    /// decision in force: a replacement, not a failure to back off from.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replaced: bool,
}

impl WorkspaceObserved {
    /// The instance ended (exited, failed or vanished) other than by a replacement at a
    /// takeover. Unasked, it is a failure to back off from, then to restart or give up on.
    pub fn ended(&self) -> bool {
        matches!(
            self.phase,
            WorkspacePhase::Exited | WorkspacePhase::Failed | WorkspacePhase::Gone
        ) && !self.replaced
    }
}

/// An agent's reply to a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReplied {
    pub workspace: String,
    pub agent: String,
    /// Where the reply goes: the origin of the message being answered.
    pub reply_to: Origin,
    pub text: String,
}

/// An agent addressed another agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMentioned {
    pub from_workspace: String,
    pub from_agent: String,
    pub to_agent: String,
    pub text: String,
    /// Who asked whom, oldest first: bounds mention depth.
    pub chain: Vec<String>,
    /// Where the conversation's replies go.
    pub reply_to: Origin,
}

/// The stream of `reply.post_started` and `reply.delivered`: the gateway's own. It never
/// appends to the stream of the reply it follows: the control plane's notices are in its
/// decisions stream, whose version is the leader's fence, and a record there deposed the
/// leader at its next decision.
pub const REPLIES_STREAM: &str = "gateway:replies";

/// The gateway is about to post a reply to Slack (recorded before the call). A reply with
/// this record and no `reply.delivered` may have reached Slack before a crash: the gateway
/// looks for it in its conversation (by the reply's id in the message's metadata) before
/// posting it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyPostStarted {
    /// The `agent.replied` event being posted.
    pub reply_id: crate::EventId,
    pub channel: String,
    /// The thread it goes in (`None`: the channel itself).
    pub thread_ts: Option<String>,
}

impl ReplyPostStarted {
    /// One record per reply, however often a restart tries it.
    pub fn event_id(reply_id: crate::EventId) -> crate::EventId {
        crate::EventId::derive(&["reply-post-started", &reply_id.to_string()])
    }
}

/// A reply was posted to Slack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyDelivered {
    /// The `agent.replied` event delivered.
    pub reply_id: crate::EventId,
    pub channel: String,
    /// Slack's `ts` of the posted message.
    pub ts: String,
}

/// An agent's settings, from the declarative configuration (or, later, the admin API).
/// Recorded again whenever a setting changes; the latest one is in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentConfigured {
    pub name: String,
    /// The workspace it lives in (agents of one workspace share a process and files).
    pub workspace: String,
    /// Driver: `echo`, `command`, `anthropic`, `openai`.
    pub driver: String,
    /// Driver settings (model, max tokens, command line, ...), as configured.
    pub settings: Value,
    /// Seconds without activity after which its workspace may be stopped.
    pub idle_timeout_secs: u64,
}

/// An agent was removed from the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRemoved {
    pub name: String,
}

/// Messages arriving on `route` reach `agent` when they address no agent by name. Route
/// keys: `slack_channel:{channel}`, `webhook:{endpoint}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteConfigured {
    pub route: String,
    pub agent: String,
}

/// A route was removed from the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRemoved {
    pub route: String,
}

/// Decision: a workspace has work waiting but starting it would exceed an admission cap. It
/// starts, in fair order, when capacity frees; nothing is dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceStartQueued {
    pub workspace: String,
    /// The cap that held it back: `total`, `team:{id}` or `channel:{id}`.
    pub cap: String,
    /// The team and channel the waiting work came from (the cap scopes).
    pub team: Option<String>,
    pub channel: Option<String>,
}

/// Decision: a workspace kept failing and will not be restarted until new work arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceFailed {
    pub workspace: String,
    /// Starts attempted, the first included.
    pub attempts: u32,
    /// The last failure the backend reported.
    pub detail: Option<String>,
}

/// Decision: an agent-to-agent mention was not delivered, to stop a loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MentionRefused {
    /// The `agent.mentioned` event refused.
    pub mention_id: crate::EventId,
    /// `depth` (the chain is too long), `rate` (too many mentions in the conversation) or
    /// `unknown_agent`.
    pub reason: String,
    pub chain: Vec<String>,
}

/// Decision: a message was not routed to an agent, because the agent's allow-lists
/// (`settings.access`) do not let its sender or channel address it. Nothing is said in the
/// conversation; `explain` shows why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRefused {
    /// The `message.received` event refused.
    pub message_id: crate::EventId,
    pub agent: String,
    /// Which list refused it, for the operator.
    pub reason: String,
}

/// Something a workspace sent was not recorded, because what it says about itself does not
/// match the control plane's own record: an answer to a message that was not routed to that
/// agent, an agent its workspace does not host, a bucket that is not its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRefused {
    /// The workspace that sent it (proved by the outbox subject its credentials allow).
    pub workspace: String,
    /// The agent it claimed to be.
    pub agent: String,
    /// `reply`, `mention`, `memory_written`, `dead_lettered`, `heartbeat`.
    pub kind: String,
    /// The routed message it claimed to answer, if any.
    pub in_reply_to: Option<crate::EventId>,
    /// Why, for the operator.
    pub reason: String,
}

/// An agent wrote to (or deleted from) a shared-memory bucket. The log keeps every write, so
/// a bucket lost with a NATS store can be re-seeded from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryWritten {
    pub bucket: String,
    pub key: String,
    /// The new value; `None` for a delete.
    pub value: Option<Value>,
    /// The bucket's revision of this write.
    pub revision: u64,
    pub workspace: String,
    pub agent: String,
}

/// A message an agent could not handle after its deliveries ran out; it was moved to the
/// dead-letter subject. The decisions tell the conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDeadLettered {
    /// The routing decision whose delivery failed.
    pub routing_id: crate::EventId,
    pub workspace: String,
    pub agent: String,
    pub deliveries: i64,
    /// The last error (never a secret: drivers keep keys out of their errors).
    pub error: String,
    /// Where the conversation's replies go, when the message could be read.
    pub reply_to: Option<Origin>,
}

/// An agent is still in a turn (the runtime's heartbeat while a turn runs longer than its
/// heartbeat interval): its workspace is busy, not idle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentBusy {
    pub workspace: String,
    pub agent: String,
    /// The routing decision whose turn is running.
    pub routing_id: crate::EventId,
    /// Seconds since the turn started.
    pub busy_for_secs: u64,
}

/// What one turn cost, as the model provider reported it (summed over the turn's model
/// calls). Zero for drivers that call no model (`echo`) or whose program does not say.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnUsage {
    /// Model calls made (tool steps included).
    pub model_calls: u32,
    /// Input tokens, cached ones included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input tokens served from the provider's prompt cache.
    pub cache_read_tokens: u64,
    /// Input tokens written to the provider's prompt cache (Anthropic reports these).
    pub cache_write_tokens: u64,
}

impl TurnUsage {
    /// Adds another call's usage.
    pub fn add(&mut self, other: &Self) {
        self.model_calls += other.model_calls;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
    }
}

/// An agent finished a turn: how long it took and what the provider reported it used. The
/// runtime reports it; the control plane checks that the turn was routed to that agent in
/// that workspace (as for every output), and records the figures as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTurnCompleted {
    pub workspace: String,
    pub agent: String,
    /// The routing decision the turn answered.
    pub routing_id: crate::EventId,
    /// From the driver's start to its answer (outputs not yet published).
    pub duration_ms: u64,
    pub usage: TurnUsage,
}

/// An admin API token was issued. The log keeps the SHA-256 of its secret, never the secret:
/// the secret is shown once, to whoever asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIssued {
    /// The token's public id (the part of the token before its secret).
    pub token_id: String,
    /// What it is for, for the operator (`ci`, `alice's laptop`).
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// Lower-case hex SHA-256 of the secret part.
    pub secret_sha256: String,
    /// After this instant the token is refused.
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// An admin API token was revoked: it is refused from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRevoked {
    pub token_id: String,
}

/// An operator asked for a workspace to start or stop (admin API). The decisions act on it
/// like on any other cause: a start passes the admission caps, and the start or stop
/// decision names this event as its cause, so `explain` leads to the operator's token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceActionRequested {
    pub workspace: String,
    /// `start`, `stop` or `restart`.
    pub action: String,
    /// The operator's note, if any.
    pub reason: Option<String>,
}

/// A webhook endpoint was created, changed or given a new secret (admin API). The secret
/// itself is never in the log (see migration 0005): only a fingerprint that tells secrets
/// apart in the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpointConfigured {
    /// `/webhooks/{endpoint}`.
    pub endpoint: String,
    /// `github`, `standard_webhooks` or `hmac_sha256`.
    pub scheme: String,
    /// The agent its deliveries are addressed to.
    pub agent: String,
    pub signature_header: Option<String>,
    pub delivery_header: Option<String>,
    /// The first 12 hex digits of the secret's SHA-256.
    pub secret_fingerprint: String,
    /// A rotation: until then the previous secret is still accepted.
    pub previous_valid_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// A webhook endpoint was deleted; its secret is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEndpointRemoved {
    pub endpoint: String,
}

/// A memory bucket was re-seeded from the log's `memory.written` events (an operator's
/// request, or the control plane after a NATS store loss).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRestored {
    pub bucket: String,
    /// Keys put back.
    pub keys: u64,
}

/// The NATS store was lost (the inbox stream's last sequence was below the highest one it
/// had acknowledged), and the control plane put back what the log knows: the routed
/// messages not yet finished, published again, and the memory buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatsRecovered {
    /// The inbox stream.
    pub stream: String,
    /// The highest sequence the server had acknowledged before.
    pub acknowledged: u64,
    /// The stream's last sequence when the loss was found.
    pub found: u64,
    /// Routed messages published again.
    pub republished: u64,
    /// Memory buckets put back, with their keys.
    pub buckets: Vec<BucketRestored>,
}

/// One memory bucket put back from the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRestored {
    pub bucket: String,
    pub keys: u64,
}

/// An admission quota (admin API): at most `max_running` workspaces hold a runtime slot in
/// `scope` at once; `None` is no cap. Scopes: `total`, `team` and `channel` (the default for
/// every team or channel), `team:{id}`, `channel:{id}` (one team or channel). A quota
/// overrides the control plane's `--max-running*` flags, which stay the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaSet {
    pub scope: String,
    pub max_running: Option<u64>,
}

/// A quota was removed: its scope falls back to the default (a broader quota, or the flag).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaRemoved {
    pub scope: String,
}

/// A file attached to a message was downloaded (by the gateway, with the bot token) and
/// stored beside the log (table `message_files`, key `message_id` and `file_id`): the
/// workspaces its message is routed to fetch it from the control plane. The bytes are not
/// in the log; `sha256` names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageFileStored {
    /// The `message.received` the file is attached to.
    pub message_id: crate::EventId,
    pub file_id: String,
    /// The name it is saved under in a workspace: Slack's name made safe for a file name.
    pub name: String,
    pub mimetype: Option<String>,
    pub size: u64,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
}

/// The id of the event that records what became of file `file_id` of message
/// `message_id` ([`MessageFileStored`] or [`MessageFileRefused`]): one per file, however
/// often the gateway tries.
pub fn message_file_event_id(message_id: crate::EventId, file_id: &str) -> crate::EventId {
    crate::EventId::derive(&["message-file", &message_id.to_string(), file_id])
}

/// A file attached to a message was not stored, and will not be: too large, refused by
/// Slack, or not at a Slack address. The agent is told so in its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageFileRefused {
    pub message_id: crate::EventId,
    pub file_id: String,
    pub name: Option<String>,
    pub reason: String,
}
