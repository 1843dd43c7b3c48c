//! Appending: idempotency, optimistic concurrency, immutability, group commit, crashes.
//! Every test runs against a real PostgreSQL, in a database of its own.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use warren_schema::event_log::{Appender, AppenderConfig};
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, Error, EventId, ExpectedVersion, Metadata, NewEvent};

fn event(id: EventId, event_type: &str) -> NewEvent {
    NewEvent {
        id,
        event_type: event_type.into(),
        event_version: 1,
        payload: json!({ "n": id.to_string() }),
        metadata: Metadata::new("test"),
    }
}

fn one(stream: &str, id: EventId) -> AppendRequest {
    AppendRequest::new(stream, vec![event(id, "test.happened")])
}

async fn count(db: &TestDatabase, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&db.pool)
        .await
        .expect("count query")
}

#[tokio::test]
async fn append_returns_positions_and_stream_versions() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let (a, b) = (EventId::random(), EventId::random());
    let req = AppendRequest::new(
        "conv-1",
        vec![event(a, "test.happened"), event(b, "test.happened")],
    );
    let out = log.append(&req).await.expect("append");
    assert_eq!(out.len(), 2);
    assert!(out[0].position < out[1].position);
    assert_eq!((out[0].stream_version, out[1].stream_version), (1, 2));
    assert!(out.iter().all(|e| !e.duplicate));

    let stored = log.read_stream("conv-1", 1, 10).await.expect("read");
    assert_eq!(
        stored.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![a, b],
        "stream holds the events in order"
    );
    assert_eq!(stored[0].payload, json!({ "n": a.to_string() }));
    assert_eq!(stored[0].metadata.source, "test");
}

#[tokio::test]
async fn appending_an_existing_id_changes_nothing_and_reports_the_stored_position() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let id = EventId::derive(&["slack", "T1", "Ev1"]);
    let first = log.append(&one("c", id)).await.expect("first")[0];

    // A redelivery with a different payload is still the same fact.
    let mut retry = one("c", id);
    retry.events[0].payload = json!({ "different": true });
    let again = log.append(&retry).await.expect("retry")[0];

    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!(again.position, first.position);
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 1);
    let stored = log.get(id).await.expect("get").expect("stored");
    assert_eq!(
        stored.payload,
        json!({ "n": id.to_string() }),
        "first write wins"
    );
}

#[tokio::test]
async fn concurrent_duplicate_appends_store_one_row() {
    let db = TestDatabase::with_pool_size(30).await;
    let log = db.log();
    let (appender, tasks) = Appender::start(db.pool.clone(), AppenderConfig::default());

    // Same id, same stream (a Slack retry racing the original), through both paths; and
    // the same id under different streams, which takes the rollback-and-retry path.
    let same_stream = EventId::random();
    let cross_stream = EventId::random();
    let mut handles = Vec::new();
    for i in 0..24 {
        let (log, appender) = (log.clone(), appender.clone());
        handles.push(tokio::spawn(async move {
            let (id, stream) = if i % 2 == 0 {
                (same_stream, "s".to_owned())
            } else {
                (cross_stream, format!("stream-{i}"))
            };
            let req = one(&stream, id);
            let out = if i % 4 < 2 {
                log.append(&req).await
            } else {
                appender.append(req).await
            };
            (id, out.expect("duplicate appends succeed")[0])
        }));
    }
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.expect("task"));
    }
    drop(appender);
    tasks.join().await;

    for id in [same_stream, cross_stream] {
        let mine: Vec<_> = results.iter().filter(|(i, _)| *i == id).collect();
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = $1")
            .bind(id.0)
            .fetch_one(&db.pool)
            .await
            .expect("count");
        assert_eq!(stored, 1, "one row for {id}");
        assert_eq!(
            mine.iter().filter(|(_, a)| !a.duplicate).count(),
            1,
            "exactly one caller stored {id}"
        );
        let positions: HashSet<i64> = mine.iter().map(|(_, a)| a.position).collect();
        assert_eq!(positions.len(), 1, "every caller is told the same position");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 2);
}

/// Several requests in one transaction: each gets its own outcome; one that conflicts
/// fails alone and the others are committed; a repeat is absorbed.
#[tokio::test]
async fn append_all_commits_several_streams_at_once_each_with_its_own_outcome() {
    let db = TestDatabase::new().await;
    let log = db.log();
    log.append(&one("taken", EventId::random()))
        .await
        .expect("existing stream");
    let repeat = EventId::random();
    log.append(&one("again", repeat))
        .await
        .expect("first write");
    let (a, b) = (EventId::random(), EventId::random());
    let requests = [
        AppendRequest::new(
            "w-1",
            vec![event(a, "test.happened"), event(b, "test.happened")],
        ),
        one("taken", EventId::random()).expecting(ExpectedVersion::NoStream),
        one("again", repeat),
        one("w-2", EventId::random()),
    ];
    let refs: Vec<&AppendRequest> = requests.iter().collect();
    let outcomes = log.append_all(&refs).await.expect("one transaction");
    assert_eq!(outcomes.len(), 4);
    let first = outcomes[0].as_ref().expect("w-1 appended");
    assert_eq!(
        first.iter().map(|x| x.stream_version).collect::<Vec<_>>(),
        [1, 2],
        "in order"
    );
    assert!(
        matches!(
            outcomes[1],
            Err(Error::WrongExpectedVersion { actual: 1, .. })
        ),
        "{:?}",
        outcomes[1]
    );
    assert!(outcomes[2].as_ref().expect("absorbed")[0].duplicate);
    assert!(outcomes[3].is_ok());
    assert_eq!(
        count(&db, "SELECT count(*) FROM events").await,
        2 + 2 + 1,
        "the conflicting request added nothing, the repeat nothing"
    );
    let positions: HashSet<i64> =
        sqlx::query_scalar("SELECT position FROM events WHERE stream IN ('w-1', 'w-2')")
            .fetch_all(&db.pool)
            .await
            .expect("positions")
            .into_iter()
            .collect();
    assert_eq!(positions.len(), 3);
}

#[tokio::test]
async fn wrong_expected_version_is_a_typed_conflict() {
    let db = TestDatabase::new().await;
    let log = db.log();
    log.append(&one("w", EventId::random()).expecting(ExpectedVersion::NoStream))
        .await
        .expect("create stream");
    let err = log
        .append(&one("w", EventId::random()).expecting(ExpectedVersion::NoStream))
        .await
        .expect_err("stream exists");
    assert!(
        matches!(err, Error::WrongExpectedVersion { actual: 1, .. }),
        "{err:?}"
    );
    log.append(&one("w", EventId::random()).expecting(ExpectedVersion::Exact(1)))
        .await
        .expect("expected version matches");
    let err = log
        .append(&one("w", EventId::random()).expecting(ExpectedVersion::Exact(1)))
        .await
        .expect_err("stale expectation");
    assert!(matches!(err, Error::WrongExpectedVersion { actual: 2, .. }));
    assert_eq!(log.stream_version("w").await.expect("version"), 2);
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 2);
}

#[tokio::test]
async fn only_one_of_many_writers_expecting_the_same_version_wins() {
    // This is how a deposed leader is fenced: it appends expecting the version it last saw.
    let db = TestDatabase::with_pool_size(20).await;
    let log = db.log();
    log.append(&one("leader", EventId::random()))
        .await
        .expect("v1");
    let mut handles = Vec::new();
    for _ in 0..16 {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            log.append(&one("leader", EventId::random()).expecting(ExpectedVersion::Exact(1)))
                .await
        }));
    }
    let mut won = 0;
    for h in handles {
        match h.await.expect("task") {
            Ok(_) => won += 1,
            Err(Error::WrongExpectedVersion { actual: 2, .. }) => {}
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(log.stream_version("leader").await.expect("version"), 2);
}

#[tokio::test]
async fn the_database_refuses_update_delete_and_truncate() {
    let db = TestDatabase::new().await;
    db.log()
        .append(&one("i", EventId::random()))
        .await
        .expect("append");
    for sql in [
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let err = sqlx::query(sql)
            .execute(&db.pool)
            .await
            .expect_err("must be refused");
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("42501"), "{sql}: {err}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 1);
}

#[tokio::test]
async fn invalid_events_are_refused_before_the_database() {
    let db = TestDatabase::new().await;
    let (appender, _tasks) = Appender::start(db.pool.clone(), AppenderConfig::default());
    let mut bad = one("s", EventId::random());
    bad.events[0].payload = json!({ "text": "nul \u{0} inside" });
    let err = appender.append(bad).await.expect_err("NUL refused");
    assert!(matches!(err, Error::InvalidEvent(_)), "{err:?}");
    let err = db
        .log()
        .append(&AppendRequest::new(
            "",
            vec![event(EventId::random(), "test.x")],
        ))
        .await
        .expect_err("empty stream refused");
    assert!(matches!(err, Error::InvalidEvent(_)));
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 0);
}

#[tokio::test]
async fn group_commit_shares_transactions_between_concurrent_callers() {
    let db = TestDatabase::with_pool_size(8).await;
    let (appender, tasks) = Appender::start(db.pool.clone(), AppenderConfig::default());
    let mut handles = Vec::new();
    for caller in 0..64 {
        let appender = appender.clone();
        handles.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for _ in 0..20 {
                let out = appender
                    .append(one(&format!("caller-{caller}"), EventId::random()))
                    .await
                    .expect("append");
                positions.push(out[0].position);
            }
            positions
        }));
    }
    let mut all = HashSet::new();
    for h in handles {
        for p in h.await.expect("task") {
            assert!(all.insert(p), "position {p} reported twice");
        }
    }
    drop(appender);
    tasks.join().await;

    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 64 * 20);
    // xmin is the id of the inserting transaction: fewer transactions than events means
    // callers shared commits.
    let transactions = count(&db, "SELECT count(DISTINCT xmin::text) FROM events").await;
    assert!(
        transactions < 64 * 20,
        "{transactions} transactions for {} events: no batching happened",
        64 * 20
    );
    // Per-stream versions have no holes.
    let bad_streams = count(
        &db,
        "SELECT count(*) FROM (SELECT stream FROM events GROUP BY stream \
         HAVING max(stream_version) <> count(*)) s",
    )
    .await;
    assert_eq!(bad_streams, 0);
}

#[tokio::test]
async fn a_request_that_fails_in_the_database_does_not_fail_its_batch() {
    let db = TestDatabase::new().await;
    // Stands in for any statement error tied to one request's data.
    sqlx::raw_sql(
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.event_type = 'test.poison' THEN RAISE EXCEPTION 'poisoned'; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION poison();",
    )
    .execute(&db.pool)
    .await
    .expect("trigger");
    let config = AppenderConfig {
        writers: 1,
        max_wait: Duration::from_millis(200),
        ..AppenderConfig::default()
    };
    let (appender, tasks) = Appender::start(db.pool.clone(), config);
    let mut handles = Vec::new();
    for i in 0..6 {
        let appender = appender.clone();
        handles.push(tokio::spawn(async move {
            let kind = if i == 3 { "test.poison" } else { "test.good" };
            appender
                .append(AppendRequest::new(
                    format!("s{i}"),
                    vec![event(EventId::random(), kind)],
                ))
                .await
        }));
    }
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await.expect("task"));
    }
    drop(appender);
    tasks.join().await;
    for (i, outcome) in outcomes.iter().enumerate() {
        assert_eq!(outcome.is_err(), i == 3, "request {i}: {outcome:?}");
    }
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 5);
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once() {
    let db = TestDatabase::new().await;
    // Hold the lock of stream "busy" so the only writer blocks inside its transaction.
    let mut holder = sqlx::PgConnection::connect_with(&db.connect_options())
        .await
        .expect("connect");
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('warren.stream:busy', 0))")
        .execute(&mut holder)
        .await
        .expect("lock");

    let config = AppenderConfig {
        writers: 1,
        queue_capacity: 1,
        ..AppenderConfig::default()
    };
    let (appender, tasks) = Appender::start(db.pool.clone(), config);
    let in_flight = tokio::spawn({
        let appender = appender.clone();
        async move { appender.append(one("busy", EventId::random())).await }
    });
    wait_for(&db, "the writer to block on the stream lock", || async {
        count(
            &db,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database() AND query LIKE '%pg_advisory_xact_lock%'",
        )
        .await
            == 1
    })
    .await;
    let queued = tokio::spawn({
        let appender = appender.clone();
        async move { appender.append(one("other", EventId::random())).await }
    });
    wait_for(&db, "the second request to be queued", || async {
        appender.queued() == 1
    })
    .await;

    let started = std::time::Instant::now();
    let err = appender
        .append(one("third", EventId::random()))
        .await
        .expect_err("queue is full");
    assert!(matches!(err, Error::Overloaded), "{err:?}");
    assert!(err.is_unavailable());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refusal must not wait"
    );

    holder.close().await.expect("release");
    in_flight.await.expect("task").expect("first append");
    queued.await.expect("task").expect("queued append");
    drop(appender);
    tasks.join().await;
    assert_eq!(count(&db, "SELECT count(*) FROM events").await, 2);
}

/// Backends waiting for advisory lock 4242 (single-key advisory locks keep the key's low
/// half in objid).
const WAITING_ON_4242: &str = "SELECT count(*) FROM pg_locks \
     WHERE locktype = 'advisory' AND NOT granted AND objid = 4242 \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

#[tokio::test]
async fn a_connection_killed_mid_batch_leaves_no_half_batch_and_no_false_ack() {
    let db = TestDatabase::with_pool_size(4).await;
    // Rows of type test.block wait on advisory lock 4242 after being inserted, so the batch
    // holding one is caught between insert and commit.
    sqlx::raw_sql(
        "CREATE FUNCTION block() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.event_type = 'test.block' THEN PERFORM pg_advisory_xact_lock(4242); END IF; \
           RETURN NULL; END $$; \
         CREATE TRIGGER block AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION block();",
    )
    .execute(&db.pool)
    .await
    .expect("trigger");
    let mut holder = sqlx::PgConnection::connect_with(&db.connect_options())
        .await
        .expect("connect");
    sqlx::query("SELECT pg_advisory_lock(4242)")
        .execute(&mut holder)
        .await
        .expect("lock");

    let config = AppenderConfig {
        writers: 1,
        max_wait: Duration::from_millis(300),
        ..AppenderConfig::default()
    };
    let (appender, tasks) = Appender::start(db.pool.clone(), config);
    let mut handles = Vec::new();
    for i in 0..8 {
        let appender = appender.clone();
        handles.push(tokio::spawn(async move {
            let id = EventId::random();
            let kind = if i == 0 {
                "test.block"
            } else {
                "test.happened"
            };
            let out = appender
                .append(AppendRequest::new(format!("s{i}"), vec![event(id, kind)]))
                .await;
            (id, out)
        }));
    }
    wait_for(
        &db,
        "the batch to block between insert and commit",
        || async { count(&db, WAITING_ON_4242).await == 1 },
    )
    .await;
    let killed: bool = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND NOT granted AND objid = 4242 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&mut holder)
    .await
    .expect("terminate");
    assert!(killed);
    holder.close().await.expect("release");

    let mut failed = 0;
    for h in handles {
        let (id, out) = h.await.expect("task");
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = $1")
            .bind(id.0)
            .fetch_one(&db.pool)
            .await
            .expect("count");
        match out {
            Ok(_) => assert_eq!(stored, 1, "acked event {id} must be stored"),
            Err(e) => {
                assert!(
                    e.is_unavailable(),
                    "a killed connection is unavailability: {e}"
                );
                assert_eq!(stored, 0, "failed event {id} must not be stored");
                failed += 1;
            }
        }
    }
    assert!(
        failed >= 2,
        "the killed batch held several requests, all of which must fail"
    );

    // The appender recovers: the pool replaces the dead connection.
    appender
        .append(one("after", EventId::random()))
        .await
        .expect("append after the crash");
    drop(appender);
    tasks.join().await;
}

#[tokio::test]
async fn operators_can_read_by_type_correlation_and_causation() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let root = EventId::derive(&["slack", "T1", "Ev9"]);
    log.append(&AppendRequest::new(
        "conv",
        vec![event(root, "message.received")],
    ))
    .await
    .expect("root");
    let root_event = log.get(root).await.expect("get").expect("root stored");

    let routed = EventId::derive(&["route", &root.to_string(), "alice"]);
    let mut e = event(routed, "message.routed");
    e.metadata = Metadata::caused_by(&root_event, "control-plane/decide");
    log.append(&AppendRequest::new("conv", vec![e]))
        .await
        .expect("routed");
    let routed_event = log.get(routed).await.expect("get").expect("stored");

    let start = EventId::derive(&["start", &routed.to_string()]);
    let mut e = event(start, "workspace.start_requested");
    e.metadata = Metadata::caused_by(&routed_event, "control-plane/decide");
    log.append(&AppendRequest::new("workspace-w1", vec![e]))
        .await
        .expect("start");
    log.append(&one("unrelated", EventId::random()))
        .await
        .expect("noise");

    let chain: Vec<EventId> = log
        .causation_chain(start)
        .await
        .expect("chain")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(chain, vec![root, routed, start], "root cause first");

    let conversation: Vec<EventId> = log
        .read_correlation(root, 100)
        .await
        .expect("conversation")
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(conversation, vec![root, routed, start]);

    let routed_only = log.read_type("message.routed", 0, 10).await.expect("type");
    assert_eq!(
        routed_only.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![routed]
    );
    assert_eq!(
        log.consequences(routed)
            .await
            .expect("consequences")
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>(),
        vec![start]
    );
    let all = log.read_positions(0, i64::MAX, 100).await.expect("range");
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].position < w[1].position));
}

/// Waits for a condition with a deadline (no fixed sleeps).
async fn wait_for<F, Fut>(_db: &TestDatabase, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
