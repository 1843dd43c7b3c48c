//! Exactly-once projection: batch and checkpoint commit together or not at all.

use std::time::Duration;

use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use warren_schema::event_log::projection::{self, Projection};
use warren_schema::event_log::{Subscription, SubscriptionOptions};
use warren_schema::testing::{TestDatabase, test_event};
use warren_schema::{AppendRequest, Error, RecordedEvent, Result};

/// Records every event it applies in a table whose primary key refuses a second apply.
struct Recorder {
    /// Fail when reaching this position: `Some((position, how))`.
    fail_at: Option<(i64, Failure)>,
}

#[derive(Clone, Copy)]
enum Failure {
    /// The projection returns an error.
    Error,
    /// The connection dies mid-batch, as in a crash.
    KillConnection,
}

impl Projection for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    async fn apply(&mut self, tx: &mut PgConnection, event: &RecordedEvent) -> Result<()> {
        sqlx::query("INSERT INTO recorded (position, event_id) VALUES ($1, $2)")
            .bind(event.position)
            .bind(event.id.0)
            .execute(&mut *tx)
            .await
            .map_err(|e| Error::Projection {
                projection: "recorder".into(),
                position: event.position,
                message: e.to_string(),
            })?;
        match self.fail_at {
            Some((p, Failure::Error)) if p == event.position => Err(Error::Projection {
                projection: "recorder".into(),
                position: p,
                message: "injected failure".into(),
            }),
            Some((p, Failure::KillConnection)) if p == event.position => {
                let _ = sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
                    .execute(&mut *tx)
                    .await;
                Err(Error::Projection {
                    projection: "recorder".into(),
                    position: p,
                    message: "connection killed".into(),
                })
            }
            _ => Ok(()),
        }
    }
}

async fn setup(events: usize) -> TestDatabase {
    let db = TestDatabase::new().await;
    sqlx::query("CREATE TABLE recorded (position bigint PRIMARY KEY, event_id uuid NOT NULL)")
        .execute(&db.pool)
        .await
        .expect("table");
    let log = db.log();
    for chunk in 0..events / 50 {
        let req = AppendRequest::new(format!("s{chunk}"), (0..50).map(|_| test_event()).collect());
        log.append(&req).await.expect("append");
    }
    db
}

async fn recorded(db: &TestDatabase) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT position) FROM recorded")
        .fetch_one(&db.pool)
        .await
        .expect("count")
}

/// Reads the first `n` events through a subscription. An empty poll does not mean "caught
/// up": a transaction in flight anywhere in the cluster (another test's database included)
/// holds the horizon back for a moment, so wait for the count, with a deadline.
async fn all_events(db: &TestDatabase, n: usize) -> Vec<RecordedEvent> {
    let mut sub = Subscription::start(db.pool.clone(), 0, SubscriptionOptions::default())
        .await
        .expect("subscribe");
    let mut all = Vec::new();
    while all.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(20), sub.next_batch())
            .await
            .expect("events arrive within 20 s")
            .expect("read");
        all.extend(batch);
    }
    all
}

#[tokio::test]
async fn a_failed_batch_leaves_neither_rows_nor_checkpoint() {
    for failure in [Failure::Error, Failure::KillConnection] {
        let db = setup(300).await;
        let events = all_events(&db, 300).await;
        assert_eq!(events.len(), 300);
        let (first, second) = events.split_at(100);

        let mut p = Recorder { fail_at: None };
        let cp = projection::apply_batch(&db.pool, &mut p, first)
            .await
            .expect("first batch");
        assert_eq!(cp, first[99].position);

        // Fail in the middle of the second batch.
        p.fail_at = Some((second[50].position, failure));
        projection::apply_batch(&db.pool, &mut p, second)
            .await
            .expect_err("injected failure");
        assert_eq!(
            recorded(&db).await,
            (100, 100),
            "no part of the failed batch"
        );
        assert_eq!(
            projection::load_checkpoint(&db.pool, "recorder")
                .await
                .expect("checkpoint"),
            cp
        );

        // Recovery re-applies the whole batch, and replaying the first batch is a no-op.
        p.fail_at = None;
        projection::apply_batch(&db.pool, &mut p, first)
            .await
            .expect("replay");
        let cp = projection::apply_batch(&db.pool, &mut p, second)
            .await
            .expect("retry");
        assert_eq!(cp, events[299].position);
        assert_eq!(recorded(&db).await, (300, 300), "each event exactly once");
    }
}

#[tokio::test]
async fn concurrent_runners_of_one_projection_apply_each_event_once() {
    let db = setup(500).await;
    let events = all_events(&db, 500).await;
    let mut handles = Vec::new();
    for runner in 0..4 {
        let (pool, events) = (db.pool.clone(), events.clone());
        handles.push(tokio::spawn(async move {
            let mut p = Recorder { fail_at: None };
            // Overlapping, differently sized batches.
            for chunk in events.chunks(37 + runner * 11) {
                projection::apply_batch(&pool, &mut p, chunk)
                    .await
                    .expect("apply");
            }
        }));
    }
    for h in handles {
        h.await.expect("runner");
    }
    assert_eq!(recorded(&db).await, (500, 500));
}

#[tokio::test]
async fn run_follows_the_log_from_its_checkpoint() {
    let db = setup(100).await;
    let log = db.log();
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn({
        let (log, shutdown) = (log.clone(), shutdown.clone());
        async move {
            let mut p = Recorder { fail_at: None };
            projection::run(&log, &mut p, SubscriptionOptions::default(), shutdown).await
        }
    });
    // Appends while running are picked up (LISTEN wakes the runner).
    for _ in 0..3 {
        let req = AppendRequest::new("late", vec![test_event()]);
        log.append(&req).await.expect("append");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while recorded(&db).await.0 < 103 {
        assert!(
            std::time::Instant::now() < deadline,
            "projection did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    runner.await.expect("task").expect("run ends cleanly");
    assert_eq!(recorded(&db).await, (103, 103));
}
