//! The runtime's errors at its boundary: what stops a workspace from starting or running.
//!
//! A turn's own failures (a driver error, an output not stored) are not here: they are
//! [`crate::inbox::TurnError`], handled per message (redelivered, then dead-lettered), and
//! never stop the workspace.

use crate::agent::DriverError;
use crate::memory::MemoryError;
use crate::outbox::OutboxError;

/// Why the runtime (or its MCP server) could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting the backend passed is not usable; the message names it.
    #[error("configuration: {0}")]
    Config(String),
    /// An agent's driver settings are not usable.
    #[error("agent {agent}: {source}")]
    Agent {
        agent: String,
        #[source]
        source: DriverError,
    },
    /// The credentials file could not be read.
    #[error(transparent)]
    Credentials(#[from] warren_schema::nats::ConnectError),
    #[error("connecting to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// A JetStream call failed; `what` names it (the stream, the consumer).
    #[error("JetStream, {what}: {source}")]
    JetStream {
        what: String,
        #[source]
        source: async_nats::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("an agent's task panicked: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// An agent stopped taking messages while the runtime was not shutting down: the
    /// runtime ends, so that its backend restarts it, rather than run on without it.
    #[error("agent {agent} stopped taking messages: {reason}")]
    AgentStopped { agent: String, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A JetStream failure, named.
    pub fn jetstream(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Self::JetStream {
            what: what.into(),
            source: source.into(),
        }
    }
}
