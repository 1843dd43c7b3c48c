//! Reads for operators and tools: by position, stream, type, correlation, causation.
//!
//! These read what is committed now. A consumer that must see every event exactly once in
//! order uses a [`Subscription`](super::Subscription) instead, which never reads past the
//! safe horizon.

use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::EventLog;
use crate::{Error, EventId, Metadata, RecordedEvent, Result};

/// Select list matching [`decode_row`], as a literal so queries stay `&'static str`.
macro_rules! event_columns {
    () => {
        "position, event_id, stream, stream_version, event_type, event_version, payload, \
         traceparent, correlation_id, causation_id, source, actor, received_at, recorded_at"
    };
}
pub(crate) use event_columns;

/// Longest causation chain `causation_chain` follows: a guard against a cycle written by a
/// buggy producer, far beyond any real chain.
const MAX_CHAIN: i32 = 10_000;

pub(crate) fn decode_row(row: &PgRow) -> Result<RecordedEvent> {
    let get = |e: sqlx::Error| Error::db("decoding an event row")(e);
    Ok(RecordedEvent {
        position: row.try_get("position").map_err(get)?,
        id: EventId(row.try_get("event_id").map_err(get)?),
        stream: row.try_get("stream").map_err(get)?,
        stream_version: row.try_get("stream_version").map_err(get)?,
        event_type: row.try_get("event_type").map_err(get)?,
        event_version: row.try_get("event_version").map_err(get)?,
        payload: row.try_get("payload").map_err(get)?,
        metadata: Metadata {
            traceparent: row.try_get("traceparent").map_err(get)?,
            correlation_id: row
                .try_get::<Option<Uuid>, _>("correlation_id")
                .map_err(get)?
                .map(EventId),
            causation_id: row
                .try_get::<Option<Uuid>, _>("causation_id")
                .map_err(get)?
                .map(EventId),
            source: row.try_get("source").map_err(get)?,
            actor: row.try_get("actor").map_err(get)?,
            received_at: row.try_get("received_at").map_err(get)?,
        },
        recorded_at: row.try_get("recorded_at").map_err(get)?,
    })
}

impl EventLog {
    async fn fetch(
        &self,
        context: &'static str,
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<RecordedEvent>> {
        query
            .fetch_all(self.pool())
            .await
            .map_err(Error::db(context))?
            .iter()
            .map(decode_row)
            .collect()
    }

    /// The highest committed position now (0 for an empty log). A subscriber that has
    /// reached it has seen everything committed before this call.
    pub async fn head(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT coalesce(max(position), 0)::bigint FROM events")
            .fetch_one(self.pool())
            .await
            .map_err(Error::db("reading the log's head"))
    }

    /// Events with `after < position <= up_to`, in position order, at most `limit`.
    pub async fn read_positions(
        &self,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        let sql = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events \
             WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
        );
        self.fetch(
            "reading events by position",
            sqlx::query(sql).bind(after).bind(up_to).bind(limit),
        )
        .await
    }

    /// The latest event of `event_type` whose payload names `workspace` (for "why is this
    /// workspace running?").
    pub async fn latest_for_workspace(
        &self,
        event_type: &str,
        workspace: &str,
    ) -> Result<Option<RecordedEvent>> {
        let sql = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE event_type = $1 AND payload->>'workspace' = $2 \
             ORDER BY position DESC LIMIT 1"
        );
        Ok(self
            .fetch(
                "reading a workspace's latest event",
                sqlx::query(sql).bind(event_type).bind(workspace),
            )
            .await?
            .pop())
    }

    /// A stream's events from `from_version` on, in version order, at most `limit`.
    pub async fn read_stream(
        &self,
        stream: &str,
        from_version: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        let sql = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events \
             WHERE stream = $1 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
        );
        self.fetch(
            "reading a stream",
            sqlx::query(sql).bind(stream).bind(from_version).bind(limit),
        )
        .await
    }

    /// Current version of a stream (0 when it has no events).
    pub async fn stream_version(&self, stream: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT coalesce(max(stream_version), 0) FROM events WHERE stream = $1")
            .bind(stream)
            .fetch_one(self.pool())
            .await
            .map_err(Error::db("reading a stream version"))
    }

    /// Events of one type after `after`, in position order, at most `limit`.
    pub async fn read_type(
        &self,
        event_type: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        let sql = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events \
             WHERE event_type = $1 AND position > $2 ORDER BY position LIMIT $3"
        );
        self.fetch(
            "reading events by type",
            sqlx::query(sql).bind(event_type).bind(after).bind(limit),
        )
        .await
    }

    /// A conversation: the events that carry `correlation_id`, plus the event whose id it
    /// is (the conversation's first event), in position order, at most `limit`.
    pub async fn read_correlation(
        &self,
        correlation_id: EventId,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>> {
        let sql = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE correlation_id = $1 \
             UNION SELECT ",
            event_columns!(),
            " FROM events WHERE event_id = $1 \
             ORDER BY position LIMIT $2"
        );
        self.fetch(
            "reading a conversation",
            sqlx::query(sql).bind(correlation_id.0).bind(limit),
        )
        .await
    }

    /// One event by id.
    pub async fn get(&self, id: EventId) -> Result<Option<RecordedEvent>> {
        let sql = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE event_id = $1"
        );
        Ok(self
            .fetch("reading an event", sqlx::query(sql).bind(id.0))
            .await?
            .pop())
    }

    /// The causation chain of an event: the root cause first, the event itself last. This is
    /// the answer to "why did this happen?". A cause that is missing from the log ends the
    /// chain; a cycle (which only a buggy writer could create) is cut.
    pub async fn causation_chain(&self, id: EventId) -> Result<Vec<RecordedEvent>> {
        let sql = concat!(
            "WITH RECURSIVE chain AS ( \
                SELECT e.*, 0 AS depth, ARRAY[e.event_id] AS seen FROM events e \
                WHERE e.event_id = $1 \
              UNION ALL \
                SELECT e.*, c.depth + 1, c.seen || e.event_id FROM events e \
                JOIN chain c ON e.event_id = c.causation_id \
                WHERE NOT e.event_id = ANY(c.seen) AND c.depth < $2 \
             ) SELECT ",
            event_columns!(),
            " FROM chain ORDER BY depth DESC"
        );
        self.fetch(
            "reading a causation chain",
            sqlx::query(sql).bind(id.0).bind(MAX_CHAIN),
        )
        .await
    }

    /// The events directly caused by `id`, in position order.
    pub async fn consequences(&self, id: EventId) -> Result<Vec<RecordedEvent>> {
        let sql = concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE causation_id = $1 ORDER BY position"
        );
        self.fetch("reading consequences", sqlx::query(sql).bind(id.0))
            .await
    }
}
