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

/// Which events a filtered read returns; every field narrows it (unset: no condition).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Only positions above this.
    pub after: Option<i64>,
    /// Only positions at or below this.
    pub up_to: Option<i64>,
    pub stream: Option<String>,
    /// Any of these types.
    pub types: Vec<String>,
    /// Recorded at or after this instant.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Recorded before this instant.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// The conversation (its first event and every event that carries it).
    pub correlation: Option<EventId>,
    /// The W3C trace id (32 lower-case hex digits) of the event's `traceparent`.
    pub trace_id: Option<String>,
    /// Only changes made by people: the admin API's and the declarative file's events (the
    /// audit trail; see [`AUDIT_SOURCES`]).
    pub audit: bool,
}

/// The `source` of every event an operator caused: the admin API's mutations and the agents
/// file's changes. Migration 0004 indexes exactly these (a partial index: the query must
/// repeat the literal list for the planner to use it).
pub const AUDIT_SOURCES: [&str; 2] = ["admin-api", "control-plane.config"];
const AUDIT_PREDICATE: &str = " AND source IN ('admin-api', 'control-plane.config')";

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

    /// Events matching `filter`, in position order, at most `limit`: keyset pagination by
    /// position (pass the last position returned as `filter.after` for the next page).
    pub async fn query(&self, filter: &EventFilter, limit: i64) -> Result<Vec<RecordedEvent>> {
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(concat!(
            "SELECT ",
            event_columns!(),
            " FROM events WHERE true"
        ));
        if let Some(after) = filter.after {
            q.push(" AND position > ").push_bind(after);
        }
        if let Some(up_to) = filter.up_to {
            q.push(" AND position <= ").push_bind(up_to);
        }
        if let Some(stream) = &filter.stream {
            q.push(" AND stream = ").push_bind(stream.clone());
        }
        if !filter.types.is_empty() {
            q.push(" AND event_type = ANY(")
                .push_bind(filter.types.clone())
                .push(")");
        }
        if let Some(since) = filter.since {
            q.push(" AND recorded_at >= ").push_bind(since);
        }
        if let Some(until) = filter.until {
            q.push(" AND recorded_at < ").push_bind(until);
        }
        if let Some(c) = filter.correlation {
            q.push(" AND (correlation_id = ")
                .push_bind(c.0)
                .push(" OR event_id = ")
                .push_bind(c.0)
                .push(")");
        }
        if let Some(trace) = &filter.trace_id {
            // `00-{trace id}-{span id}-{flags}`: the trace id is the second field.
            q.push(" AND split_part(traceparent, '-', 2) = ")
                .push_bind(trace.clone());
        }
        if filter.audit {
            q.push(AUDIT_PREDICATE);
        }
        q.push(" ORDER BY position LIMIT ").push_bind(limit);
        q.build()
            .fetch_all(self.pool())
            .await
            .map_err(Error::db("reading filtered events"))?
            .iter()
            .map(decode_row)
            .collect()
    }

    /// The last position recorded at or before `at` (0 when none was).
    pub async fn position_at(&self, at: chrono::DateTime<chrono::Utc>) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT coalesce(max(position), 0)::bigint FROM events WHERE recorded_at <= $1",
        )
        .bind(at)
        .fetch_one(self.pool())
        .await
        .map_err(Error::db("finding the position at an instant"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_audit_predicate_names_exactly_the_audit_sources() {
        let listed: Vec<String> = AUDIT_SOURCES.iter().map(|s| format!("'{s}'")).collect();
        assert_eq!(
            AUDIT_PREDICATE,
            format!(" AND source IN ({})", listed.join(", "))
        );
    }
}
