//! The control plane's error type.

use crate::controller::lease::LeaseLost;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Log(#[from] warren_schema::Error),
    /// Another replica took the lease: stop deciding, go back to standby.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
    /// The decision checkpoint is not where this replica left it: another leader advanced
    /// it. Reload before deciding again.
    #[error("the decision checkpoint moved from {expected} to {found} under this replica")]
    CheckpointMoved { expected: i64, found: i64 },
    /// NATS refused or is unreachable (retried where it matters).
    #[error("NATS: {0}")]
    Nats(String),
    /// The agents/routes file is unreadable or invalid; nothing was recorded from it.
    #[error("configuration file {path}: {message}")]
    Config { path: String, message: String },
}

impl Error {
    /// Whether this replica was deposed (it should go back to standby, not exit).
    pub fn is_deposed(&self) -> bool {
        matches!(
            self,
            Self::LeaseLost(_)
                | Self::CheckpointMoved { .. }
                | Self::Log(warren_schema::Error::WrongExpectedVersion { .. })
        )
    }

    /// Whether the database is unreachable (retry later).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Log(e) if e.is_unavailable())
    }
}
