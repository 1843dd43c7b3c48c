//! The event log: append (direct or group-committed), read, subscribe, project.
//!
//! It lives in `warren-schema` beside the migrations it depends on, so the table, its
//! triggers and the only code that writes to it change together in one crate that every
//! service already depends on. See `docs/event-log.md`.

mod append;
mod group_commit;
pub mod horizon;
pub mod projection;
mod read;

pub use read::{AUDIT_SOURCES, EventFilter};
mod subscribe;

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tracing::instrument;

pub use append::{MAX_STREAM_LEN, NOTIFY_CHANNEL, append_in_tx, validate};
pub use group_commit::{Appender, AppenderConfig, AppenderTasks};
pub use subscribe::{
    Subscription, SubscriptionOptions, SubscriptionStats, settled_head, watermark,
};

use crate::{Error, EventId, NewEvent, Result};

/// The migrations that create and evolve the log, embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The version a writer expects a stream to be at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must have no events yet.
    NoStream,
    /// The stream's last event must have this version (>= 1).
    Exact(i64),
}

impl ExpectedVersion {
    pub fn matches(self, current: i64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => current == 0,
            Self::Exact(v) => current == v,
        }
    }
}

impl std::fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("any version"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// Events for one stream, appended together or not at all.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendRequest {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

impl AppendRequest {
    pub fn new(stream: impl Into<String>, events: Vec<NewEvent>) -> Self {
        Self {
            stream: stream.into(),
            expected: ExpectedVersion::Any,
            events,
        }
    }

    pub fn expecting(mut self, expected: ExpectedVersion) -> Self {
        self.expected = expected;
        self
    }
}

/// Where an event of an append ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    pub id: EventId,
    pub position: i64,
    pub stream_version: i64,
    /// The id was already stored; nothing was written for it.
    pub duplicate: bool,
}

/// Access to the log over a connection pool.
#[derive(Debug, Clone)]
pub struct EventLog {
    pool: PgPool,
}

impl EventLog {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The same database over a pool of its own of at most `max_connections`, opened on
    /// first use. For a long-lived reader: a subscription (or any `LISTEN`) keeps one
    /// connection of its pool for as long as it runs, so it must never take it from a pool
    /// that others size their work by.
    pub fn with_own_pool(&self, max_connections: u32) -> Self {
        Self::new(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(std::time::Duration::from_secs(10))
                .connect_lazy_with((*self.pool.connect_options()).clone()),
        )
    }

    /// Applies pending migrations (idempotent; safe to run from several replicas at once,
    /// sqlx serialises them with an advisory lock).
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| Error::Migrate(std::sync::Arc::new(e)))
    }

    /// Appends one request in a transaction of its own. For many concurrent callers use an
    /// [`Appender`], which shares transactions between them.
    #[instrument(skip_all, fields(stream = %request.stream, events = request.events.len()), err)]
    pub async fn append(&self, request: &AppendRequest) -> Result<Vec<Appended>> {
        self.append_all(&[request]).await?.remove(0)
    }

    /// Appends several requests in one transaction (each request's outcome on its own: a
    /// version conflict fails that request only). For a writer with many small appends at
    /// once: one commit instead of one each, and one writer in flight for subscribers to
    /// wait on instead of many.
    #[instrument(skip_all, fields(requests = requests.len()), err)]
    pub async fn append_all(
        &self,
        requests: &[&AppendRequest],
    ) -> Result<Vec<Result<Vec<Appended>>>> {
        for request in requests {
            validate(request)?;
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(Error::db("acquiring a connection to append"))?;
        commit_requests(&mut conn, requests).await
    }

    /// Starts a gap-free subscription after `position`.
    pub async fn subscribe(
        &self,
        position: i64,
        options: SubscriptionOptions,
    ) -> Result<Subscription> {
        Subscription::start(self.pool.clone(), position, options).await
    }
}

/// Commits `requests` in one transaction on `conn`, retrying the rare duplicate race.
pub(crate) async fn commit_requests(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
) -> Result<Vec<Result<Vec<Appended>>>> {
    const ATTEMPTS: usize = 3;
    let mut attempt = 1;
    loop {
        let mut tx = sqlx::Connection::begin(&mut *conn)
            .await
            .map_err(Error::db("beginning an append transaction"))?;
        match append_in_tx(&mut tx, requests).await {
            Ok(outcomes) => {
                tx.commit()
                    .await
                    .map_err(Error::db("committing appended events"))?;
                return Ok(outcomes);
            }
            // Dropping `tx` rolls it back.
            Err(Error::DuplicateRace) if attempt < ATTEMPTS => attempt += 1,
            Err(e) => return Err(e),
        }
    }
}
