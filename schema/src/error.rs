//! The error type at the `warren-schema` boundary.

use std::sync::Arc;

use crate::event_log::ExpectedVersion;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors are `Clone` (sources behind `Arc`) because one failed group-commit batch reports
/// the same failure to every caller in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A database call failed; `context` names the operation.
    #[error("{context}: {source}")]
    Database {
        context: &'static str,
        #[source]
        source: Arc<sqlx::Error>,
    },

    #[error("applying migrations: {0}")]
    Migrate(#[source] Arc<sqlx::migrate::MigrateError>),

    /// A concurrent append stored one of the batch's event ids first. The transaction must be
    /// rolled back and the append retried; the retry reports the id as a duplicate.
    #[error("a concurrent append stored one of these event ids first; retry the append")]
    DuplicateRace,

    /// Optimistic concurrency: the stream is not at the version the writer expected.
    #[error("stream {stream:?} is at version {actual}, the append expected {expected}")]
    WrongExpectedVersion {
        stream: String,
        expected: ExpectedVersion,
        actual: i64,
    },

    /// The event was refused before reaching the database.
    #[error("invalid event: {0}")]
    InvalidEvent(String),

    /// The group-commit queue is full: the caller should shed load (HTTP 503 + Retry-After).
    #[error("the event log appender is overloaded; retry later")]
    Overloaded,

    /// The group-commit appender has shut down.
    #[error("the event log appender has stopped")]
    AppenderStopped,

    #[error("event at position {position} is {found}, expected {expected}")]
    UnexpectedEventType {
        position: i64,
        found: String,
        expected: String,
    },

    #[error("decoding {event_type} at position {position}: {source}")]
    Decode {
        position: i64,
        event_type: String,
        #[source]
        source: Arc<serde_json::Error>,
    },

    /// A projection's own apply step failed; nothing of its batch was kept.
    #[error("projection {projection:?} failed at position {position}: {message}")]
    Projection {
        projection: String,
        position: i64,
        message: String,
    },
}

impl Error {
    /// Wraps a database error with the operation it interrupted.
    pub fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Self::Database {
            context,
            source: Arc::new(source),
        }
    }

    /// A short, stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Database { .. } => "database",
            Self::Migrate(_) => "migrate",
            Self::DuplicateRace => "duplicate_race",
            Self::WrongExpectedVersion { .. } => "wrong_expected_version",
            Self::InvalidEvent(_) => "invalid_event",
            Self::Overloaded => "overloaded",
            Self::AppenderStopped => "appender_stopped",
            Self::UnexpectedEventType { .. } => "unexpected_event_type",
            Self::Decode { .. } => "decode",
            Self::Projection { .. } => "projection",
        }
    }

    /// True when the failure is about reaching the database (or shedding load), not about
    /// the request: the caller should answer "try again later" rather than "bad request".
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Overloaded | Self::AppenderStopped => true,
            Self::Database { source, .. } => is_connection_error(source),
            _ => false,
        }
    }
}

/// Whether a sqlx error means the database could not be reached or the connection broke, as
/// opposed to the database refusing a statement.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        // Class 08 (connection exception), 57P01..57P03 (admin shutdown, crash shutdown,
        // cannot connect now) and 53300 (too many connections).
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}
