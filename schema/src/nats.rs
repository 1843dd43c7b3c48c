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
//!
//! Isolation: a workspace connects with credentials whose permissions
//! ([`Namespace::workspace_permissions`]) allow its own inboxes, outbox, dead letters and
//! memory bucket, the shared bucket, and replies under its own inbox prefix
//! ([`Namespace::workspace_inbox_prefix`]); nothing of another workspace.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::stream;
use serde::{Deserialize, Serialize};

use crate::EventId;
use crate::events::Origin;

/// `traceparent` header name on NATS messages.
pub const TRACEPARENT: &str = "traceparent";

/// How often the server tells a waiting pull that it is alive; every Warren pull asks for
/// it. Two missed in a row and the client takes the pull as lost: a consumer deleted as a
/// pull reaches it drops the pull without an answer (about one in forty in that race,
/// against nats-server 2.15), and only the missing heartbeats tell. async-nats' own default,
/// 15 s, took 30 s to tell. Each waiting pull costs the server one small message per
/// heartbeat while idle.
pub const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

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

    /// The limits of `bucket`: the shared bucket's, or a workspace's.
    pub fn bucket_limits(&self, bucket: &str) -> BucketLimits {
        if bucket == self.shared_bucket() {
            BucketLimits::SHARED
        } else {
            BucketLimits::WORKSPACE
        }
    }

    /// Where a workspace asks the control plane to write the shared bucket
    /// (`{prefix}.memory.{workspace}`, request and reply): only that workspace's credentials
    /// may publish there, so the subject is the writer's proof of who it is.
    pub fn shared_write_subject(&self, workspace: &str) -> String {
        format!("{}.memory.{workspace}", self.prefix)
    }

    /// Every workspace's shared-write subject (what the control plane serves).
    pub fn shared_write_subjects(&self) -> String {
        format!("{}.memory.*", self.prefix)
    }

    /// The workspace a shared write came from, read from its subject.
    pub fn shared_write_workspace<'s>(&self, subject: &'s str) -> Option<&'s str> {
        self.workspace_of(subject, ".memory.")
    }

    /// Where a workspace asks the control plane for the agent directory
    /// (`{prefix}.directory.{workspace}`, request and reply with a [`DirectoryQuery`] and a
    /// [`DirectoryAnswer`]). The directory is served, not handed out at launch: a launch
    /// contract carrying every agent grows with the installation (10,000 agents made each
    /// pod's Secret 400 KB), and a copy taken at launch misses agents configured later.
    pub fn directory_subject(&self, workspace: &str) -> String {
        format!("{}.directory.{workspace}", self.prefix)
    }

    /// Every workspace's directory subject (what the control plane serves).
    pub fn directory_subjects(&self) -> String {
        format!("{}.directory.*", self.prefix)
    }

    /// The workspace a directory query came from, read from its subject.
    pub fn directory_workspace<'s>(&self, subject: &'s str) -> Option<&'s str> {
        self.workspace_of(subject, ".directory.")
    }

    /// Where a workspace asks the control plane for a file attached to a message routed to
    /// it (`{prefix}.files.{workspace}`, a [`FileQuery`] answered with a [`FileAnswer`]).
    pub fn files_subject(&self, workspace: &str) -> String {
        format!("{}.files.{workspace}", self.prefix)
    }

    /// Every workspace's files subject (what the control plane serves).
    pub fn files_subjects(&self) -> String {
        format!("{}.files.*", self.prefix)
    }

    /// The workspace a file query came from, read from its subject.
    pub fn files_workspace<'s>(&self, subject: &'s str) -> Option<&'s str> {
        self.workspace_of(subject, ".files.")
    }

    fn workspace_of<'s>(&self, subject: &'s str, infix: &str) -> Option<&'s str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(infix)
            .filter(|w| !w.is_empty() && !w.contains('.'))
    }

    /// A memory bucket as a stream, the way NATS's key-value layer lays it out (`KV_{bucket}`,
    /// subjects `$KV.{bucket}.>`, a short history per key, direct gets), with Warren's
    /// limits: at most `limits.max_bytes` in all and `limits.max_value_bytes` per value
    /// (writes past them are refused, nothing old is dropped), and no `Nats-Rollup` header
    /// (one rollup would wipe every key).
    pub fn bucket_stream_config(bucket: &str, limits: &BucketLimits) -> stream::Config {
        stream::Config {
            name: format!("KV_{bucket}"),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 5,
            max_bytes: limits.max_bytes,
            max_message_size: limits.max_value_bytes,
            storage: stream::StorageType::File,
            discard: stream::DiscardPolicy::New,
            allow_rollup: false,
            deny_delete: true,
            deny_purge: false,
            allow_direct: true,
            num_replicas: 1,
            ..Default::default()
        }
    }

    /// The durable pull consumer of one agent's inbox: its subject only, explicit acks, at
    /// most `tuning.max_deliver` deliveries, redelivered after `tuning.ack_wait_secs`.
    pub fn inbox_consumer_config(
        &self,
        workspace: &str,
        agent: &str,
        tuning: &crate::launch::Tuning,
    ) -> async_nats::jetstream::consumer::pull::Config {
        use async_nats::jetstream::consumer;
        consumer::pull::Config {
            durable_name: Some(Self::inbox_consumer(workspace, agent)),
            filter_subject: self.inbox_subject(workspace, agent),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(tuning.ack_wait_secs.max(1)),
            max_deliver: tuning.max_deliver,
            ..Default::default()
        }
    }

    /// Where a workspace's requests get their answers (`_INBOX.{prefix}.{workspace}`): its
    /// credentials subscribe there and nowhere else, so it cannot read another's replies.
    pub fn workspace_inbox_prefix(&self, workspace: &str) -> String {
        format!("_INBOX.{}.{workspace}", self.prefix)
    }

    /// The durable consumer of one agent's inbox: `{workspace}_{agent}`. Names are
    /// lowercase letters, digits and `-`, so `_` cannot occur in either and the name is
    /// unambiguous (with `-`, `a-b`/`c` and `a`/`b-c` shared one consumer).
    pub fn inbox_consumer(workspace: &str, agent: &str) -> String {
        format!("{workspace}_{agent}")
    }

    /// Workspace names that would collide with Warren's own: `shared` is the shared
    /// memory bucket's suffix.
    pub const RESERVED_WORKSPACES: &'static [&'static str] = &["shared"];

    /// What a workspace hosting `agents` may publish and subscribe to. It may read its
    /// agents' inbox consumers (fetch, acknowledge, info), publish to its outbox and dead
    /// letters, read and write its own memory bucket, read the shared one, ask the control
    /// plane to write the shared one ([`Self::shared_write_subject`]) and for the agent
    /// directory ([`Self::directory_subject`]), and receive replies
    /// under its own inbox prefix. Everything else is refused by the server.
    ///
    /// It may create nothing: no stream, no consumer. The control plane creates its bucket
    /// and its agents' consumers before it starts. A consumer a workspace could create
    /// would be a push consumer whose deliver subject the server does not check against the
    /// creator's permissions (a value in its own bucket delivered into another workspace's
    /// inbox), and a stream it could create could source another's messages.
    pub fn workspace_permissions(&self, workspace: &str, agents: &[String]) -> Permissions {
        let inbox = self.inbox_stream();
        let mut publish = vec![
            self.outbox_subject(workspace),
            format!("{}.dead.{workspace}.*", self.prefix),
            self.shared_write_subject(workspace),
            self.directory_subject(workspace),
            self.files_subject(workspace),
            format!("$JS.API.STREAM.INFO.{inbox}"),
            format!("$JS.API.STREAM.INFO.{}", self.outbox_stream()),
        ];
        for agent in agents {
            let consumer = Self::inbox_consumer(workspace, agent);
            publish.extend([
                format!("$JS.API.CONSUMER.INFO.{inbox}.{consumer}"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{inbox}.{consumer}"),
                format!("$JS.ACK.{inbox}.{consumer}.>"),
            ]);
        }
        let own = self.workspace_bucket(workspace);
        // Writes: its own bucket only (the stream refuses rollups and values past its limits).
        publish.push(format!("$KV.{own}.>"));
        for bucket in [own, self.shared_bucket()] {
            // Reads: stream info (with a subjects filter: how keys are listed) and gets.
            let stream = format!("KV_{bucket}");
            publish.extend([
                format!("$JS.API.STREAM.INFO.{stream}"),
                format!("$JS.API.STREAM.MSG.GET.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}.>"),
            ]);
        }
        Permissions {
            publish,
            subscribe: vec![format!("{}.>", self.workspace_inbox_prefix(workspace))],
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

    /// Where the server's `MAX_DELIVERIES` advisories for the inbox stream are kept: a
    /// message that ran out of deliveries without a dead letter (its runtime stopped during
    /// the last one) is found there by the control plane, even one that was not running
    /// when the advisory came.
    pub fn undelivered_stream(&self) -> String {
        format!("{}_UNDELIVERED", self.prefix.to_uppercase())
    }

    /// The stream of [`Self::undelivered_stream`]: the advisories of the inbox's consumers.
    pub fn undelivered_stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.undelivered_stream(),
            subjects: vec![format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
                self.inbox_stream()
            )],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(7 * 24 * 3600),
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

/// Headers of every JetStream message Warren publishes: its id as `Nats-Msg-Id` (the server
/// drops a republish within the duplicate window; the reader derives its event id from it)
/// and the conversation's `traceparent`.
pub fn message_headers(id: &str, traceparent: Option<&str>) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    if let Some(tp) = traceparent {
        headers.insert(TRACEPARENT, tp);
    }
    headers
}

/// How big a memory bucket may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketLimits {
    /// All values and their history, in bytes.
    pub max_bytes: i64,
    /// One stored value (with its provenance), in bytes.
    pub max_value_bytes: i32,
}

impl BucketLimits {
    /// A workspace's own bucket: 64 MiB, 128 KiB per value.
    pub const WORKSPACE: Self = Self {
        max_bytes: 64 << 20,
        max_value_bytes: 128 << 10,
    };
    /// The shared bucket: 256 MiB, 128 KiB per value.
    pub const SHARED: Self = Self {
        max_bytes: 256 << 20,
        max_value_bytes: 128 << 10,
    };
}

/// Why a bucket could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("memory bucket {bucket}: {message}")]
    Nats { bucket: String, message: String },
}

/// Makes memory bucket `bucket` exist with [`Namespace::bucket_stream_config`], and brings
/// an existing one to it (buckets made before the limits had none, and allowed rollups).
/// The control plane's call: workspaces may not create or change streams.
pub async fn ensure_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    limits: &BucketLimits,
) -> Result<async_nats::jetstream::kv::Store, BucketError> {
    let error = |e: &dyn std::fmt::Display| BucketError::Nats {
        bucket: bucket.to_owned(),
        message: e.to_string(),
    };
    let wanted = Namespace::bucket_stream_config(bucket, limits);
    match js.get_stream(&wanted.name).await {
        Ok(existing) => {
            let have = &existing.cached_info().config;
            if have.allow_rollup
                || have.max_bytes != wanted.max_bytes
                || have.max_message_size != wanted.max_message_size
            {
                let mut config = have.clone();
                config.allow_rollup = false;
                config.max_bytes = wanted.max_bytes;
                config.max_message_size = wanted.max_message_size;
                js.update_stream(config).await.map_err(|e| error(&e))?;
            }
        }
        // Missing (or unreadable: then creating it says why).
        Err(_) => {
            js.get_or_create_stream(wanted)
                .await
                .map_err(|e| error(&e))?;
        }
    }
    js.get_key_value(bucket).await.map_err(|e| error(&e))
}

/// Subjects a NATS user may publish and subscribe to (allow lists; the rest is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// Why a NATS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("reading NATS credentials {path}: {source}")]
    Credentials {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Connection options for a Warren process: its credentials file (a NATS `.creds` file: a
/// user JWT and its seed) when the server requires one, and the inbox prefix its
/// permissions allow.
///
/// The credentials file is read at every connect and reconnect, not once: workspace
/// credentials expire, the control plane writes new ones before they do, and the server
/// closes a connection whose JWT has expired, so the reconnect must present the new file.
/// It is also read here, so a missing or malformed file is an error at start.
pub async fn connect_options(
    credentials: Option<&Path>,
    inbox_prefix: Option<&str>,
) -> Result<async_nats::ConnectOptions, ConnectError> {
    let options = match credentials {
        Some(path) => {
            read_credentials(path)?;
            let path = path.to_owned();
            async_nats::ConnectOptions::with_auth_callback(move |nonce| {
                let read = read_credentials(&path);
                async move {
                    let (jwt, key) = read.map_err(|e| async_nats::AuthError::new(e.to_string()))?;
                    let mut auth = async_nats::Auth::new();
                    auth.jwt = Some(jwt);
                    auth.signature = Some(
                        key.sign(&nonce)
                            .map_err(|e| async_nats::AuthError::new(e.to_string()))?,
                    );
                    Ok(auth)
                }
            })
        }
        None => async_nats::ConnectOptions::new(),
    };
    Ok(match inbox_prefix {
        Some(prefix) => options.custom_inbox_prefix(prefix),
        None => options,
    })
}

/// The user JWT and key pair of a `.creds` file. Errors name the file, never its contents.
fn read_credentials(path: &Path) -> Result<(String, nkeys::KeyPair), ConnectError> {
    let error = |source| ConnectError::Credentials {
        path: path.to_owned(),
        source,
    };
    let invalid = |what: &str| error(std::io::Error::new(std::io::ErrorKind::InvalidData, what));
    let contents = std::fs::read_to_string(path).map_err(error)?;
    let (jwt, seed) = parse_credentials(&contents)
        .ok_or_else(|| invalid("not a credentials file (no user JWT and seed blocks)"))?;
    let key = nkeys::KeyPair::from_seed(seed).map_err(|_| invalid("its seed is not valid"))?;
    Ok((jwt.to_owned(), key))
}

/// The JWT and the seed of a `.creds` file: each is the first line after its BEGIN marker.
fn parse_credentials(contents: &str) -> Option<(&str, &str)> {
    let block = |begin: &str| {
        contents
            .lines()
            .skip_while(|l| !l.contains(begin))
            .nth(1)
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("---"))
    };
    Some((
        block("BEGIN NATS USER JWT")?,
        block("BEGIN USER NKEY SEED")?,
    ))
}

/// One agent of the installation, as the `list_agents` tool shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    pub workspace: String,
}

/// A workspace's request for a page of the agent directory, on its
/// [`Namespace::directory_subject`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectoryQuery {
    /// Start after this agent name (the previous page's `next`); `None`: from the first.
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many agents; the control plane caps it at [`DirectoryQuery::MAX_PAGE`].
    #[serde(default)]
    pub limit: Option<usize>,
}

impl DirectoryQuery {
    /// The largest page the control plane answers (about 40 KB of JSON, well under a NATS
    /// message's 1 MB, and as much as a model's context should take in one tool result).
    pub const MAX_PAGE: usize = 500;
}

/// The control plane's answer to a [`DirectoryQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum DirectoryAnswer {
    /// Agents in name order; `next` is set when more follow (pass it as `after`).
    Page {
        agents: Vec<AgentInfo>,
        next: Option<String>,
    },
    /// Not a valid query; nothing to retry.
    Refused { reason: String },
    /// The configuration could not be read; try again.
    Failed { reason: String },
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
    /// Files attached to the message (no URLs: the workspace asks the control plane for
    /// their bytes with a [`FileQuery`]).
    #[serde(default)]
    pub files: Vec<crate::events::FileRef>,
}

/// A workspace's request for a slice of a file attached to a message routed to it, on its
/// [`Namespace::files_subject`]. The control plane answers only for a routing decision to
/// an agent of that workspace whose message has that file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    /// The `message.routed` decision the workspace is working on.
    pub routing_id: EventId,
    pub file_id: String,
    /// The first byte wanted.
    #[serde(default)]
    pub offset: u64,
}

impl FileQuery {
    /// The largest slice answered: 256 KiB, which base64 makes 342 KiB of JSON, well under
    /// a NATS message's 1 MiB.
    pub const SLICE: u64 = 256 * 1024;
}

/// The control plane's answer to a [`FileQuery`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum FileAnswer {
    /// Bytes `offset..offset + len(data)` of the file (`data` in standard base64). The file
    /// is whole when `offset + len(data) == size`.
    Slice {
        name: String,
        mimetype: Option<String>,
        size: u64,
        sha256: String,
        offset: u64,
        data: String,
    },
    /// The gateway has not downloaded it yet: ask again.
    Pending,
    /// It will never be there (too large, refused by Slack), or the query is not allowed;
    /// `reason` says which.
    Refused { reason: String },
    /// The control plane could not read it now; try again.
    Failed { reason: String },
}

/// A workspace's request to write the shared bucket, on its
/// [`Namespace::shared_write_subject`]. The control plane writes it with the provenance it
/// knows (the workspace the subject proves, an agent that workspace hosts), records it as
/// `memory.written`, and answers with a [`SharedWriteResult`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedWrite {
    /// The agent writing (checked: it must live in the workspace).
    pub agent: String,
    pub key: String,
    /// `None` deletes the key.
    pub value: Option<serde_json::Value>,
    /// Write only if the key is at this revision (0: only if absent); `None`: whatever it is.
    pub expected_revision: Option<u64>,
    /// The conversation the write belongs to, as the agent says (recorded as the event's
    /// correlation; nothing is routed or posted on it).
    pub conversation: Option<EventId>,
}

/// The control plane's answer to a [`SharedWrite`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum SharedWriteResult {
    /// Written (or deleted) at `revision`, and recorded.
    Written { revision: u64 },
    /// The key is not at `expected` any more.
    Conflict { expected: u64 },
    /// Not allowed or not valid; nothing was written.
    Refused { reason: String },
    /// NATS or the log failed; try again.
    Failed { reason: String },
}

/// The id of a turn's output `what` (`reply`, `dead-letter`, `mention:bob`, ...): unique per
/// routed message and output, so a redelivered turn's outputs are recorded once. The
/// control plane makes the same id when it reports a dead letter the runtime could not.
pub fn turn_output_id(routing_id: EventId, what: &str) -> String {
    format!("{routing_id}:{what}")
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
    /// A turn is still running (sent every heartbeat interval while it does).
    Heartbeat {
        id: String,
        in_reply_to: EventId,
        workspace: String,
        agent: String,
        busy_for_secs: u64,
        correlation_id: Option<EventId>,
    },
    /// A turn ended with an answer: its duration and the model usage it reported. Sent
    /// with the turn's outputs, before the inbox message is acknowledged.
    TurnCompleted {
        id: String,
        in_reply_to: EventId,
        workspace: String,
        agent: String,
        duration_ms: u64,
        usage: crate::events::TurnUsage,
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
            | Self::DeadLettered { id, .. }
            | Self::TurnCompleted { id, .. }
            | Self::Heartbeat { id, .. } => id,
        }
    }

    /// The agent that says it sent this.
    pub fn agent(&self) -> &str {
        match self {
            Self::Reply { agent, .. }
            | Self::MemoryWritten { agent, .. }
            | Self::DeadLettered { agent, .. }
            | Self::TurnCompleted { agent, .. }
            | Self::Heartbeat { agent, .. } => agent,
            Self::Mention { from_agent, .. } => from_agent,
        }
    }

    /// The workspace that says it sent this.
    pub fn workspace(&self) -> &str {
        match self {
            Self::Reply { workspace, .. }
            | Self::Mention { workspace, .. }
            | Self::MemoryWritten { workspace, .. }
            | Self::DeadLettered { workspace, .. }
            | Self::TurnCompleted { workspace, .. }
            | Self::Heartbeat { workspace, .. } => workspace,
        }
    }
}

impl Namespace {
    /// Whether `message`, read from `subject` of the outbox, may be recorded: it must be
    /// on its own workspace's outbox subject (the only one that workspace's credentials
    /// may publish to), and a memory write must be to that workspace's own bucket (the
    /// control plane itself records writes to the shared one). Otherwise a workspace could speak, or write memory, in another's name.
    pub fn check_outbox(&self, subject: &str, message: &OutboxMessage) -> Result<(), String> {
        let workspace = message.workspace();
        if subject != self.outbox_subject(workspace) {
            return Err(format!(
                "a message for workspace {workspace:?} arrived on {subject}"
            ));
        }
        if let OutboxMessage::MemoryWritten { bucket, .. } = message
            && *bucket != self.workspace_bucket(workspace)
        {
            return Err(format!(
                "workspace {workspace:?} reported a write to bucket {bucket:?}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_file_gives_its_jwt_and_seed() {
        let creds = "-----BEGIN NATS USER JWT-----\neyJ0.eyJ1.c2ln\n------END NATS USER JWT------\n\n\
                     ***** IMPORTANT *****\n\n\
                     -----BEGIN USER NKEY SEED-----\nSUAEXAMPLE\n------END USER NKEY SEED------\n";
        assert_eq!(
            parse_credentials(creds),
            Some(("eyJ0.eyJ1.c2ln", "SUAEXAMPLE"))
        );
        assert_eq!(parse_credentials("user: x\npassword: y\n"), None);
        let no_seed =
            "-----BEGIN NATS USER JWT-----\neyJ0.eyJ1.c2ln\n------END NATS USER JWT------\n";
        assert_eq!(parse_credentials(no_seed), None);
        let empty_block = "-----BEGIN NATS USER JWT-----\n------END NATS USER JWT------\n-----BEGIN USER NKEY SEED-----\nSU\n";
        assert_eq!(parse_credentials(empty_block), None);
    }

    /// NATS subject matching: `*` is one token, `>` the rest (at least one token).
    fn matches(pattern: &str, subject: &str) -> bool {
        let mut p = pattern.split('.');
        let mut s = subject.split('.');
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn a_shared_write_names_its_workspace_by_its_subject_only() {
        let ns = Namespace::default();
        assert_eq!(
            ns.shared_write_workspace(&ns.shared_write_subject("research")),
            Some("research")
        );
        for subject in [
            "warren.memory.",
            "warren.memory.a.b",
            "other.memory.a",
            "warren.outbox.a",
        ] {
            assert_eq!(ns.shared_write_workspace(subject), None, "{subject}");
        }
    }

    #[test]
    fn a_directory_query_names_its_workspace_by_its_subject_only() {
        let ns = Namespace::default();
        assert_eq!(
            ns.directory_workspace(&ns.directory_subject("research")),
            Some("research")
        );
        for subject in [
            "warren.directory.",
            "warren.directory.a.b",
            "other.directory.a",
            "warren.memory.a",
        ] {
            assert_eq!(ns.directory_workspace(subject), None, "{subject}");
        }
        let p = ns.workspace_permissions("research", &["alice".into()]);
        assert!(p.publish.contains(&ns.directory_subject("research")));
        assert!(p.publish.contains(&ns.files_subject("research")));
        assert!(!p.publish.contains(&ns.files_subject("ops")));
        assert!(!p.publish.iter().any(|s| s == "warren.directory.*"));
    }

    #[test]
    fn buckets_refuse_rollups_and_have_limits() {
        let c = Namespace::bucket_stream_config("warren-mem-a", &BucketLimits::WORKSPACE);
        assert_eq!(c.name, "KV_warren-mem-a");
        assert_eq!(c.subjects, vec!["$KV.warren-mem-a.>".to_owned()]);
        assert!(!c.allow_rollup);
        assert!(c.allow_direct);
        assert_eq!(c.discard, stream::DiscardPolicy::New);
        assert_eq!(c.max_bytes, BucketLimits::WORKSPACE.max_bytes);
        assert_eq!(c.max_message_size, BucketLimits::WORKSPACE.max_value_bytes);
    }

    #[test]
    fn consumer_names_do_not_collide_across_the_dash() {
        assert_ne!(
            Namespace::inbox_consumer("a-b", "c"),
            Namespace::inbox_consumer("a", "b-c")
        );
    }

    /// What a runtime of `ws` hosting `agent` has to reach.
    fn subjects_of(ns: &Namespace, ws: &str, agent: &str) -> Vec<String> {
        let inbox = ns.inbox_stream();
        let consumer = Namespace::inbox_consumer(ws, agent);
        let bucket = ns.workspace_bucket(ws);
        vec![
            ns.outbox_subject(ws),
            ns.dead_letter_subject(ws, agent),
            ns.shared_write_subject(ws),
            format!("$JS.API.CONSUMER.INFO.{inbox}.{consumer}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{inbox}.{consumer}"),
            format!("$JS.ACK.{inbox}.{consumer}.1.7.7.1700000000.0"),
            format!("$KV.{bucket}.notes"),
            format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.notes"),
            format!("$JS.API.STREAM.INFO.KV_{bucket}"),
        ]
    }

    fn allowed(p: &Permissions, subject: &str) -> bool {
        p.publish.iter().any(|pattern| matches(pattern, subject))
    }

    #[test]
    fn a_workspace_reaches_its_own_subjects_and_the_shared_bucket() {
        let ns = Namespace::default();
        let p = ns.workspace_permissions("research", &["alice".into(), "carol".into()]);
        for agent in ["alice", "carol"] {
            for subject in subjects_of(&ns, "research", agent) {
                assert!(allowed(&p, &subject), "research should reach {subject}");
            }
        }
        // The shared bucket is read directly and written through the control plane.
        let shared = ns.shared_bucket();
        assert!(allowed(&p, &format!("$JS.API.STREAM.INFO.KV_{shared}")));
        assert!(allowed(
            &p,
            &format!("$JS.API.DIRECT.GET.KV_{shared}.$KV.{shared}.plan")
        ));
        assert!(!allowed(&p, &format!("$KV.{shared}.plan")));
        assert_eq!(p.subscribe, vec!["_INBOX.warren.research.>".to_owned()]);
        assert!(matches(&p.subscribe[0], "_INBOX.warren.research.abc123"));
    }

    #[test]
    fn a_workspace_reaches_nothing_of_another() {
        let ns = Namespace::default();
        let p = ns.workspace_permissions("research", &["alice".into()]);
        for subject in subjects_of(&ns, "ops", "bob") {
            assert!(!allowed(&p, &subject), "research must not reach {subject}");
        }
        // Nor another agent's inbox in its own workspace's name, nor the inboxes directly,
        // nor creating any stream or consumer (its own included: a push consumer's deliver
        // subject is not checked against its creator's permissions), nor deleting any.
        let own = ns.workspace_bucket("research");
        for subject in [
            ns.inbox_subject("ops", "bob"),
            ns.inbox_subject("research", "alice"),
            ns.shared_write_subject("ops"),
            format!("$JS.API.STREAM.CREATE.KV_{own}"),
            format!("$JS.API.STREAM.UPDATE.KV_{own}"),
            format!("$JS.API.CONSUMER.CREATE.KV_{own}"),
            format!("$JS.API.CONSUMER.CREATE.KV_{own}.x.$KV.{own}.>"),
            format!(
                "$JS.API.CONSUMER.CREATE.{}.research_alice.warren.inbox.research.alice",
                ns.inbox_stream()
            ),
            format!(
                "$JS.API.CONSUMER.CREATE.{}.ops-bob.warren.inbox.research.alice",
                ns.inbox_stream()
            ),
            format!("$JS.API.STREAM.MSG.GET.{}", ns.inbox_stream()),
            format!("$JS.API.STREAM.CREATE.KV_{}", ns.shared_bucket()),
            format!("$JS.API.STREAM.DELETE.KV_{}", ns.shared_bucket()),
            format!("$JS.API.STREAM.DELETE.{}", ns.inbox_stream()),
            "$JS.API.STREAM.NAMES".to_owned(),
            format!("$JS.API.CONSUMER.LIST.{}", ns.inbox_stream()),
        ] {
            assert!(!allowed(&p, &subject), "research must not reach {subject}");
        }
        assert!(!matches(&p.subscribe[0], "_INBOX.warren.ops.abc123"));
        assert!(!matches(&p.subscribe[0], "_INBOX.abc123"));
    }

    #[test]
    fn an_outbox_message_is_recorded_only_from_its_own_workspace() {
        let ns = Namespace::default();
        let heartbeat = |workspace: &str| OutboxMessage::Heartbeat {
            id: "r:heartbeat:1".into(),
            in_reply_to: EventId::derive(&["r"]),
            workspace: workspace.into(),
            agent: "alice".into(),
            busy_for_secs: 30,
            correlation_id: None,
        };
        assert_eq!(ns.check_outbox("warren.outbox.a", &heartbeat("a")), Ok(()));
        let err = ns
            .check_outbox("warren.outbox.a", &heartbeat("b"))
            .expect_err("a speaking as b");
        assert!(
            err.contains("\"b\"") && err.contains("warren.outbox.a"),
            "{err}"
        );

        let write = |bucket: &str| OutboxMessage::MemoryWritten {
            id: "w".into(),
            bucket: bucket.into(),
            key: "k".into(),
            value: None,
            revision: 1,
            workspace: "a".into(),
            agent: "alice".into(),
            correlation_id: None,
        };
        assert_eq!(
            ns.check_outbox("warren.outbox.a", &write("warren-mem-a")),
            Ok(())
        );
        // The control plane records shared writes itself; a workspace reporting one is
        // not believed.
        assert!(
            ns.check_outbox("warren.outbox.a", &write("warren-mem-shared"))
                .is_err()
        );
        assert!(
            ns.check_outbox("warren.outbox.a", &write("warren-mem-b"))
                .is_err()
        );
    }

    #[test]
    fn permissions_are_valid_subjects() {
        let ns = Namespace::new("t-1");
        let p = ns.workspace_permissions("w", &["a".into()]);
        for s in p.publish.iter().chain(&p.subscribe) {
            let tokens: Vec<&str> = s.split('.').collect();
            assert!(
                tokens.iter().all(|t| !t.is_empty() && !t.contains(' ')),
                "{s}"
            );
            assert!(tokens[..tokens.len() - 1].iter().all(|t| *t != ">"), "{s}");
        }
    }
}
