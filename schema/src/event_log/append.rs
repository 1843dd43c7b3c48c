//! Appending to the log inside one transaction: the rules every writer goes through.
//!
//! Order of work inside the transaction, and why:
//! 1. Lock every stream of the batch (transaction-scoped advisory locks, sorted so two
//!    batches never deadlock). Two writers of the same stream are serialised from here to
//!    commit, so stream versions have no holes, an "any version" append never fails on a
//!    concurrent one, and a later version always gets a later position.
//! 2. Look up ids that already exist (idempotency) and each stream's current version, in one
//!    statement after the locks, so it sees everything a previous writer of the stream
//!    committed.
//! 3. Decide per request, in memory: duplicates, expected-version conflicts, new versions.
//! 4. Insert the new rows and queue a NOTIFY (delivered on commit), in one statement.
//!
//! With the caller's BEGIN and COMMIT that is four round trips per batch, whatever its size.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{AppendRequest, Appended, ExpectedVersion};
use crate::{Error, EventId, NewEvent, Result};

/// The LISTEN/NOTIFY channel that announces committed appends (empty payload; the INSERT in
/// [`append_in_tx`] spells the name out so the statement stays a literal).
pub const NOTIFY_CHANNEL: &str = "warren_events";

/// Longest stream name the log accepts (matches the table's check constraint).
pub const MAX_STREAM_LEN: usize = 512;

/// Appends `requests` inside the caller's transaction. The outer `Result` fails the whole
/// transaction (roll back; on [`Error::DuplicateRace`] retry); the inner ones are per-request
/// outcomes: a request that conflicts is refused without touching the others.
///
/// Nothing is durable until the caller commits.
pub async fn append_in_tx(
    conn: &mut PgConnection,
    requests: &[&AppendRequest],
) -> Result<Vec<Result<Vec<Appended>>>> {
    let streams: BTreeSet<&str> = requests.iter().map(|r| r.stream.as_str()).collect();
    let streams: Vec<&str> = streams.into_iter().collect();

    // 1. Stream locks, in sorted order (the array is sorted; unnest keeps array order).
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('warren.stream:' || s, 0)) \
         FROM unnest($1::text[]) AS s",
    )
    .bind(&streams)
    .execute(&mut *conn)
    .await
    .map_err(Error::db("locking streams"))?;

    // 2. Existing ids and current versions, in one statement. Both halves are written as one
    //    index probe per key (max() is a backward probe; LATERAL ... LIMIT 1 is never
    //    flattened into a join). That keeps the plan right whatever the statistics say: a
    //    prepared statement's generic plan is made while the table may still be empty, and
    //    `event_id = ANY($2)` then became a sequential scan that stayed cached until
    //    autoanalyze, making appends to a young log 5x slower.
    let ids: Vec<Uuid> = requests
        .iter()
        .flat_map(|r| r.events.iter().map(|e| e.id.0))
        .collect();
    let rows: Vec<(Option<String>, Option<Uuid>, i64, i64)> = sqlx::query_as(
        "SELECT s, NULL::uuid, \
                coalesce((SELECT max(stream_version) FROM events e WHERE e.stream = s), 0), 0::int8 \
           FROM unnest($1::text[]) AS s \
         UNION ALL \
         SELECT NULL, q.id, e.position, e.stream_version FROM unnest($2::uuid[]) AS q(id) \
           CROSS JOIN LATERAL ( \
             SELECT position, stream_version FROM events WHERE event_id = q.id LIMIT 1) e",
    )
    .bind(&streams)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await
    .map_err(Error::db("reading stream versions and existing ids"))?;
    let mut versions: HashMap<String, i64> = HashMap::new();
    let mut existing: HashMap<Uuid, (i64, i64)> = HashMap::new();
    for (stream, id, a, b) in rows {
        match (stream, id) {
            (Some(stream), _) => {
                versions.insert(stream, a);
            }
            (None, Some(id)) => {
                existing.insert(id, (a, b));
            }
            (None, None) => {}
        }
    }

    // 3. Decide per request.
    let plan = plan_batch(requests, &existing, &mut versions);
    if plan.rows.is_empty() {
        return Ok(plan.resolve(&HashMap::new()));
    }

    // 4. Insert, and queue the NOTIFY in the same statement (delivered on commit;
    //    subscribers read the log, not the payload). unnest produces rows in array order,
    //    so positions follow it.
    let rows = &plan.rows;
    let inserted: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
        "WITH inserted AS ( \
           INSERT INTO events (event_id, stream, stream_version, event_type, event_version, \
               payload, traceparent, correlation_id, causation_id, source, actor, received_at) \
           SELECT * FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::text[], $5::int2[], \
               $6::jsonb[], $7::text[], $8::uuid[], $9::uuid[], $10::text[], $11::text[], \
               $12::timestamptz[]) \
           ON CONFLICT (event_id) DO NOTHING \
           RETURNING event_id, position) \
         SELECT i.event_id, i.position FROM inserted i, (SELECT pg_notify('warren_events', '')) n",
    )
    .bind(rows.iter().map(|r| r.event.id.0).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.stream).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.event.event_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.event.event_version)
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| &r.event.payload).collect::<Vec<_>>())
    .bind(column(rows, |e| e.metadata.traceparent.as_deref()))
    .bind(column(rows, |e| e.metadata.correlation_id.map(|i| i.0)))
    .bind(column(rows, |e| e.metadata.causation_id.map(|i| i.0)))
    .bind(column(rows, |e| e.metadata.source.as_str()))
    .bind(column(rows, |e| e.metadata.actor.as_deref()))
    .bind(column(rows, |e| e.metadata.received_at))
    .fetch_all(&mut *conn)
    .await
    .map_err(Error::db("inserting events"))?
    .into_iter()
    .collect();

    if inserted.len() != rows.len() {
        // Another transaction committed one of these ids under a different stream (ids are
        // normally tied to one stream, whose lock we hold). Its stream versions are now
        // wrong: the caller rolls back and retries, and the retry sees the duplicate.
        return Err(Error::DuplicateRace);
    }

    Ok(plan.resolve(&inserted))
}

fn column<'a, T>(rows: &'a [Row<'a>], f: impl Fn(&'a NewEvent) -> T) -> Vec<T> {
    rows.iter().map(|r| f(r.event)).collect()
}

/// Refuses what the database would refuse, before any I/O, so that one bad request never
/// fails a group-commit batch it shares with others.
pub fn validate(request: &AppendRequest) -> Result<()> {
    let invalid = |m: String| Err(Error::InvalidEvent(m));
    if request.stream.is_empty() || request.stream.len() > MAX_STREAM_LEN {
        return invalid(format!(
            "stream name must be 1 to {MAX_STREAM_LEN} bytes, got {}",
            request.stream.len()
        ));
    }
    if request.events.is_empty() {
        return invalid("an append needs at least one event".into());
    }
    if let ExpectedVersion::Exact(v) = request.expected
        && v < 1
    {
        return invalid(format!(
            "expected version {v}: use NoStream for an empty stream"
        ));
    }
    for e in &request.events {
        if !is_valid_type_name(&e.event_type) {
            return invalid(format!(
                "event type {:?} is not of the form noun.verb (lowercase, dot-separated)",
                e.event_type
            ));
        }
        if e.event_version < 1 {
            return invalid(format!(
                "event version must be >= 1, got {}",
                e.event_version
            ));
        }
        if e.metadata.source.is_empty() || e.metadata.source.len() > 128 {
            return invalid("metadata.source must be 1 to 128 bytes".into());
        }
        if contains_nul(&e.payload) {
            return invalid(
                "payload contains a NUL character, which PostgreSQL jsonb cannot store".into(),
            );
        }
    }
    Ok(())
}

fn is_valid_type_name(name: &str) -> bool {
    let mut parts = 0;
    for part in name.split('.') {
        parts += 1;
        let mut chars = part.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
        if !first_ok || !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return false;
        }
    }
    parts >= 2 && name.len() <= 128
}

fn contains_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(contains_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

/// One row to insert.
struct Row<'a> {
    event: &'a NewEvent,
    stream: &'a str,
    version: i64,
}

/// How one event of a request resolves.
enum Slot {
    /// Already in the log before this batch.
    Existing { position: i64, version: i64 },
    /// New: `rows[index]`. `duplicate` when an earlier request of this batch holds the id.
    New { index: usize, duplicate: bool },
}

struct Plan<'a> {
    rows: Vec<Row<'a>>,
    outcomes: Vec<Result<Vec<(EventId, Slot)>>>,
}

impl Plan<'_> {
    fn resolve(self, inserted: &HashMap<Uuid, i64>) -> Vec<Result<Vec<Appended>>> {
        let rows = self.rows;
        self.outcomes
            .into_iter()
            .map(|outcome| {
                Ok(outcome?
                    .into_iter()
                    .map(|(id, slot)| match slot {
                        Slot::Existing { position, version } => Appended {
                            id,
                            position,
                            stream_version: version,
                            duplicate: true,
                        },
                        Slot::New { index, duplicate } => Appended {
                            id,
                            position: inserted.get(&rows[index].event.id.0).copied().unwrap_or(0),
                            stream_version: rows[index].version,
                            duplicate,
                        },
                    })
                    .collect())
            })
            .collect()
    }
}

/// The pure part of an append: given what the log holds, decide each request's outcome and
/// the rows to insert. `versions` is advanced as requests are accepted.
fn plan_batch<'a>(
    requests: &[&'a AppendRequest],
    existing: &HashMap<Uuid, (i64, i64)>,
    versions: &mut HashMap<String, i64>,
) -> Plan<'a> {
    let mut rows: Vec<Row<'a>> = Vec::new();
    // Ids accepted earlier in this batch -> their row index.
    let mut in_batch: HashMap<Uuid, usize> = HashMap::new();
    let mut outcomes = Vec::with_capacity(requests.len());

    for request in requests {
        let mut slots = Vec::with_capacity(request.events.len());
        let mut fresh: Vec<&'a NewEvent> = Vec::new();
        let mut fresh_ids: HashMap<Uuid, usize> = HashMap::new();
        for event in &request.events {
            let slot = if let Some(&(position, version)) = existing.get(&event.id.0) {
                Slot::Existing { position, version }
            } else if let Some(&index) = in_batch.get(&event.id.0) {
                Slot::New {
                    index,
                    duplicate: true,
                }
            } else if let Some(&k) = fresh_ids.get(&event.id.0) {
                // The same id twice in one request: the second is a duplicate of the first.
                Slot::New {
                    index: rows.len() + k,
                    duplicate: true,
                }
            } else {
                fresh_ids.insert(event.id.0, fresh.len());
                fresh.push(event);
                Slot::New {
                    index: rows.len() + fresh.len() - 1,
                    duplicate: false,
                }
            };
            slots.push((event.id, slot));
        }

        let current = versions.get(&request.stream).copied().unwrap_or(0);
        // A request that is entirely a redelivery is answered with what is stored, whatever
        // it expected: the retry of a successful append must not turn into a conflict.
        if !fresh.is_empty() && !request.expected.matches(current) {
            outcomes.push(Err(Error::WrongExpectedVersion {
                stream: request.stream.clone(),
                expected: request.expected,
                actual: current,
            }));
            continue;
        }
        for (k, event) in fresh.iter().enumerate() {
            in_batch.insert(event.id.0, rows.len());
            rows.push(Row {
                event,
                stream: &request.stream,
                version: current + 1 + k as i64,
            });
        }
        versions.insert(request.stream.clone(), current + fresh.len() as i64);
        outcomes.push(Ok(slots));
    }
    Plan { rows, outcomes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metadata;

    fn event(id: EventId) -> NewEvent {
        NewEvent {
            id,
            event_type: "test.happened".into(),
            event_version: 1,
            payload: serde_json::json!({}),
            metadata: Metadata::new("test"),
        }
    }

    fn request(stream: &str, expected: ExpectedVersion, ids: &[EventId]) -> AppendRequest {
        AppendRequest {
            stream: stream.into(),
            expected,
            events: ids.iter().copied().map(event).collect(),
        }
    }

    #[test]
    fn versions_continue_across_requests_of_one_batch() {
        let (a, b, c) = (EventId::random(), EventId::random(), EventId::random());
        let r1 = request("s", ExpectedVersion::Exact(2), &[a, b]);
        let r2 = request("s", ExpectedVersion::Exact(4), &[c]);
        let mut versions = HashMap::from([("s".to_owned(), 2)]);
        let plan = plan_batch(&[&r1, &r2], &HashMap::new(), &mut versions);
        let got: Vec<i64> = plan.rows.iter().map(|r| r.version).collect();
        assert_eq!(got, vec![3, 4, 5]);
        assert_eq!(versions["s"], 5);
        assert!(plan.outcomes.iter().all(Result::is_ok));
    }

    #[test]
    fn a_conflicting_request_is_refused_alone() {
        let (a, b) = (EventId::random(), EventId::random());
        let r1 = request("s", ExpectedVersion::NoStream, &[a]);
        let r2 = request("t", ExpectedVersion::Any, &[b]);
        let mut versions = HashMap::from([("s".to_owned(), 7)]);
        let plan = plan_batch(&[&r1, &r2], &HashMap::new(), &mut versions);
        assert!(matches!(
            plan.outcomes[0],
            Err(Error::WrongExpectedVersion { actual: 7, .. })
        ));
        assert!(plan.outcomes[1].is_ok());
        assert_eq!(plan.rows.len(), 1);
        assert_eq!(plan.rows[0].stream, "t");
        assert_eq!(
            versions["s"], 7,
            "a refused request must not advance the stream"
        );
    }

    #[test]
    fn a_redelivered_request_is_a_duplicate_not_a_conflict() {
        let a = EventId::random();
        let r = request("s", ExpectedVersion::NoStream, &[a]);
        let existing = HashMap::from([(a.0, (42, 1))]);
        let mut versions = HashMap::from([("s".to_owned(), 1)]);
        let plan = plan_batch(&[&r], &existing, &mut versions);
        assert!(plan.rows.is_empty());
        let out = plan
            .resolve(&HashMap::new())
            .remove(0)
            .expect("duplicate is ok");
        assert_eq!(out[0].position, 42);
        assert!(out[0].duplicate);
    }

    #[test]
    fn the_same_id_twice_in_a_batch_is_stored_once() {
        let a = EventId::random();
        let r1 = request("s", ExpectedVersion::Any, &[a]);
        let r2 = request("s", ExpectedVersion::Any, &[a, a]);
        let mut versions = HashMap::new();
        let plan = plan_batch(&[&r1, &r2], &HashMap::new(), &mut versions);
        assert_eq!(plan.rows.len(), 1);
        let out = plan.resolve(&HashMap::from([(a.0, 9)]));
        let first = out[0].as_ref().expect("first");
        let second = out[1].as_ref().expect("second");
        assert_eq!((first[0].position, first[0].duplicate), (9, false));
        assert!(second.iter().all(|e| e.position == 9 && e.duplicate));
        assert_eq!(versions["s"], 1);
    }

    #[test]
    fn validation_refuses_what_the_database_would() {
        let ok = request("s", ExpectedVersion::Any, &[EventId::random()]);
        assert!(validate(&ok).is_ok());

        let mut bad = ok.clone();
        bad.stream.clear();
        assert!(validate(&bad).is_err());

        let mut bad = ok.clone();
        bad.events[0].event_type = "NoDot".into();
        assert!(validate(&bad).is_err());

        let mut bad = ok.clone();
        bad.events[0].payload = serde_json::json!({"text": "a\u{0}b"});
        assert!(validate(&bad).is_err());

        let mut bad = ok.clone();
        bad.events.clear();
        assert!(validate(&bad).is_err());

        let mut bad = ok;
        bad.expected = ExpectedVersion::Exact(0);
        assert!(validate(&bad).is_err());
    }
}
