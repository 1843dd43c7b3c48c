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

    /// What a workspace hosting `agents` may publish and subscribe to: its agents' inbox
    /// consumers (created with a filter on their own subject only), its outbox and dead
    /// letters, its memory bucket and the shared one, and its own reply inboxes. The shared
    /// bucket and the streams are created by the control plane; a workspace may only create
    /// its own bucket. Everything else is refused by the server.
    pub fn workspace_permissions(&self, workspace: &str, agents: &[String]) -> Permissions {
        let inbox = self.inbox_stream();
        let mut publish = vec![
            self.outbox_subject(workspace),
            format!("{}.dead.{workspace}.*", self.prefix),
            format!("$JS.API.STREAM.INFO.{inbox}"),
            format!("$JS.API.STREAM.INFO.{}", self.outbox_stream()),
        ];
        for agent in agents {
            let consumer = Self::inbox_consumer(workspace, agent);
            publish.extend([
                format!(
                    "$JS.API.CONSUMER.CREATE.{inbox}.{consumer}.{}",
                    self.inbox_subject(workspace, agent)
                ),
                format!("$JS.API.CONSUMER.INFO.{inbox}.{consumer}"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{inbox}.{consumer}"),
                format!("$JS.ACK.{inbox}.{consumer}.>"),
            ]);
        }
        let own = self.workspace_bucket(workspace);
        // Creating its bucket reads the account's limits first (`$JS.API.INFO`: totals and
        // limits of the account, no names or contents).
        publish.push(format!("$JS.API.STREAM.CREATE.KV_{own}"));
        publish.push("$JS.API.INFO".to_owned());
        for bucket in [own, self.shared_bucket()] {
            let stream = format!("KV_{bucket}");
            publish.extend([
                format!("$KV.{bucket}.>"),
                format!("$JS.API.STREAM.INFO.{stream}"),
                format!("$JS.API.STREAM.MSG.GET.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}"),
                format!("$JS.API.DIRECT.GET.{stream}.>"),
                // Listing keys: an ordered consumer on the bucket, with flow control.
                format!("$JS.API.CONSUMER.CREATE.{stream}"),
                format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
                format!("$JS.API.CONSUMER.INFO.{stream}.>"),
                format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
                format!("$JS.FC.{stream}.>"),
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

/// Opens memory bucket `bucket`, creating it (with [`Namespace::bucket_config`]) if missing.
pub async fn open_bucket(
    js: &async_nats::jetstream::Context,
    bucket: &str,
) -> Result<async_nats::jetstream::kv::Store, async_nats::jetstream::context::CreateKeyValueError> {
    match js.get_key_value(bucket).await {
        Ok(store) => Ok(store),
        Err(_) => js.create_key_value(Namespace::bucket_config(bucket)).await,
    }
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

/// One agent of the installation, as the `list_agents` tool shows it (the control plane
/// passes the directory to each workspace it starts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub name: String,
    pub workspace: String,
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
    /// A turn is still running (sent every heartbeat interval while it does).
    Heartbeat {
        id: String,
        in_reply_to: EventId,
        workspace: String,
        agent: String,
        busy_for_secs: u64,
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
            | Self::Heartbeat { id, .. } => id,
        }
    }

    /// The agent that says it sent this.
    pub fn agent(&self) -> &str {
        match self {
            Self::Reply { agent, .. }
            | Self::MemoryWritten { agent, .. }
            | Self::DeadLettered { agent, .. }
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
            | Self::Heartbeat { workspace, .. } => workspace,
        }
    }
}

impl Namespace {
    /// Whether `message`, read from `subject` of the outbox, may be recorded: it must be
    /// on its own workspace's outbox subject (the only one that workspace's credentials
    /// may publish to), and a memory write must be to that workspace's bucket or the shared
    /// one. Otherwise a workspace could speak, or write memory, in another's name.
    pub fn check_outbox(&self, subject: &str, message: &OutboxMessage) -> Result<(), String> {
        let workspace = message.workspace();
        if subject != self.outbox_subject(workspace) {
            return Err(format!(
                "a message for workspace {workspace:?} arrived on {subject}"
            ));
        }
        if let OutboxMessage::MemoryWritten { bucket, .. } = message
            && *bucket != self.workspace_bucket(workspace)
            && *bucket != self.shared_bucket()
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
            format!(
                "$JS.API.CONSUMER.CREATE.{inbox}.{consumer}.{}",
                ns.inbox_subject(ws, agent)
            ),
            format!("$JS.API.CONSUMER.MSG.NEXT.{inbox}.{consumer}"),
            format!("$JS.ACK.{inbox}.{consumer}.1.7.7.1700000000.0"),
            format!("$KV.{bucket}.notes"),
            format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.notes"),
            format!("$JS.API.STREAM.CREATE.KV_{bucket}"),
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
        let shared = ns.shared_bucket();
        assert!(allowed(&p, &format!("$KV.{shared}.plan")));
        assert!(allowed(&p, &format!("$JS.API.STREAM.INFO.KV_{shared}")));
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
        // nor creating the shared bucket or deleting any stream.
        for subject in [
            ns.inbox_subject("ops", "bob"),
            ns.inbox_subject("research", "alice"),
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
        assert_eq!(
            ns.check_outbox("warren.outbox.a", &write("warren-mem-shared")),
            Ok(())
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
