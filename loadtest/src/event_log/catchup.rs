//! Catch-up: how fast a subscriber with nothing to do reads the log from position 0. The
//! baseline is the same rows read by plain keyset pages (`position > last ORDER BY position`)
//! with the same batch size and decoding, without the subscription's horizon bookkeeping.

use std::time::{Duration, Instant};

use warren_schema::event_log::{Appender, AppenderConfig, SubscriptionOptions};
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventLog};

use super::{Args, bench_event, per_second};
use crate::report;

const BATCH: i64 = 5000;

pub(super) async fn run(args: &Args, db: Option<TestDatabase>) -> anyhow::Result<()> {
    let db = match db {
        Some(db) => db,
        None => fill(args.events).await?,
    };
    let log = db.log();
    let (total,): (i64,) = sqlx::query_as("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await?;
    report::line(&format!("events in the log: {total}, batch size {BATCH}"));
    // Warm the cache the same way for both readers.
    keyset(&log).await?;

    let (n, elapsed) = keyset(&log).await?;
    let baseline = per_second(n, elapsed);
    report::figure("baseline: keyset pages", baseline, "events/s");

    let (m, elapsed) = subscription(&log, n).await?;
    anyhow::ensure!(
        m == n,
        "the subscriber read {m} events, the keyset reader {n}"
    );
    let rate = per_second(m, elapsed);
    report::figure("no-op subscriber catch-up", rate, "events/s");
    report::ratio(
        "catch-up ratio subscriber / keyset",
        rate / baseline,
        &[0.9],
    );
    report::ratio(
        "catch-up vs goal of 150k events/s",
        rate / 150_000.0,
        &[1.0],
    );
    Ok(())
}

async fn keyset(log: &EventLog) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    let (mut cursor, mut n) = (0, 0);
    loop {
        let batch = log.read_positions(cursor, i64::MAX, BATCH).await?;
        let Some(last) = batch.last() else {
            return Ok((n, started.elapsed()));
        };
        cursor = last.position;
        n += batch.len();
    }
}

/// Reads `expected` events. An empty poll is not the end: a transaction in flight anywhere
/// in the cluster holds the horizon back for a moment.
async fn subscription(log: &EventLog, expected: usize) -> anyhow::Result<(usize, Duration)> {
    let options = SubscriptionOptions {
        name: "bench-catchup".into(),
        batch_size: BATCH,
        ..SubscriptionOptions::default()
    };
    let started = Instant::now();
    let mut sub = log.subscribe(0, options).await?;
    let mut n = 0;
    while n < expected {
        n += sub.next_batch().await?.len();
    }
    Ok((n, started.elapsed()))
}

/// Fills a fresh log with `events` events (when the ordering benchmark did not run first).
async fn fill(events: usize) -> anyhow::Result<TestDatabase> {
    let db = TestDatabase::with_pool_size(6).await;
    let (appender, tasks) = Appender::start(db.pool.clone(), AppenderConfig::default());
    let mut handles = Vec::new();
    for caller in 0..16 {
        let appender = appender.clone();
        handles.push(tokio::spawn(async move {
            for _ in 0..events / 16 / 100 {
                let req = AppendRequest::new(
                    format!("fill-{caller}"),
                    (0..100).map(|_| bench_event()).collect(),
                );
                appender.append(req).await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    drop(appender);
    tasks.join().await;
    Ok(db)
}
