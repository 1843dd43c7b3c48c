//! Ordering at scale: the concurrency scenario of `schema/tests/ordering.rs` at a million
//! events. Writers commit after random delays and sometimes roll back; a subscriber reads
//! throughout. Measured twice: with the gap-free guard (the real subscription), and without
//! it (the xid-first trigger dropped and a naive `position > checkpoint` reader), which is
//! what a bigserial-ordered log does. Reported: end-to-end events/s (until the reader has
//! every committed event), events the reader skipped, and the ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::PgPool;
use warren_schema::event_log::{SubscriptionOptions, append_in_tx};
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventLog};

use super::{Args, bench_event, per_second};
use crate::report;

pub(super) async fn run(args: &Args) -> anyhow::Result<TestDatabase> {
    report::line(&format!(
        "events: {}, writers: {}, delayed: {:.0}% (up to {} ms), rolled back: {:.0}%",
        args.events,
        args.ordering_writers,
        args.delay_share * 100.0,
        args.max_delay_ms,
        args.rollback_share * 100.0
    ));
    let unguarded_db = TestDatabase::with_pool_size(args.ordering_writers as u32 + 4).await;
    sqlx::query("DROP TRIGGER events_xact_id_first ON events")
        .execute(&unguarded_db.pool)
        .await?;
    let unguarded = scenario(&unguarded_db, args, false).await?;
    drop(unguarded_db);

    let guarded_db = TestDatabase::with_pool_size(args.ordering_writers as u32 + 4).await;
    let guarded = scenario(&guarded_db, args, true).await?;

    report::figure("unguarded: events/s", unguarded.rate, "events/s");
    report::figure("unguarded: skipped", unguarded.skipped as f64, "events");
    report::figure("gap-free: events/s", guarded.rate, "events/s");
    report::figure(
        "gap-free: skipped (must be 0)",
        guarded.skipped as f64,
        "events",
    );
    report::figure(
        "gap-free: reader lag behind writers at the end",
        guarded.drain.as_secs_f64() * 1000.0,
        "ms",
    );
    report::ratio(
        "ordering ratio gap-free / unguarded",
        guarded.rate / unguarded.rate,
        &[0.9],
    );
    if guarded.skipped != 0 {
        anyhow::bail!("the gap-free subscriber skipped {} events", guarded.skipped);
    }
    Ok(guarded_db)
}

struct Outcome {
    rate: f64,
    skipped: usize,
    /// Time from the last commit to the reader having everything.
    drain: Duration,
}

async fn scenario(db: &TestDatabase, args: &Args, guarded: bool) -> anyhow::Result<Outcome> {
    let committed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..args.ordering_writers)
        .map(|w| tokio::spawn(writer(db.pool.clone(), w, args.clone(), committed.clone())))
        .collect();
    let reader = tokio::spawn(read_all(db.log(), guarded, committed.clone(), args.events));
    for w in writers {
        w.await??;
    }
    let writers_done = Instant::now();
    let total = committed.load(Ordering::SeqCst);
    let (positions, caught_up) = reader.await??;
    // Until the reader had the last event (not until it noticed the writers were done).
    let elapsed = caught_up.max(writers_done) - started;

    // Compare what the reader saw with the table.
    let table: Vec<i64> = sqlx::query_scalar("SELECT position FROM events ORDER BY position")
        .fetch_all(&db.pool)
        .await?;
    anyhow::ensure!(
        table.len() == total,
        "table holds {} of {total} committed events",
        table.len()
    );
    let seen: std::collections::HashSet<i64> = positions.iter().copied().collect();
    let skipped = table.iter().filter(|p| !seen.contains(p)).count();
    if guarded {
        anyhow::ensure!(
            positions == table,
            "gap-free reader's sequence differs from the table"
        );
    }
    Ok(Outcome {
        rate: per_second(total, elapsed),
        skipped,
        drain: elapsed.saturating_sub(writers_done - started),
    })
}

async fn writer(
    pool: PgPool,
    w: usize,
    args: Args,
    committed: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let mut t = 0usize;
    while committed.load(Ordering::Relaxed) < args.events {
        t += 1;
        let (n, delay, roll_back, shared) = {
            let mut rng = rand::rng();
            (
                rng.random_range(1..=4usize),
                rng.random_bool(args.delay_share)
                    .then(|| rng.random_range(1..=args.max_delay_ms.max(1))),
                rng.random_bool(args.rollback_share),
                rng.random_bool(0.2),
            )
        };
        let stream = if shared {
            format!("shared-{}", t % 8)
        } else {
            format!("w{w}-{}", t % 16)
        };
        let req = AppendRequest::new(stream, (0..n).map(|_| bench_event()).collect());
        let mut tx = pool.begin().await?;
        append_in_tx(&mut tx, &[&req]).await?.remove(0)?;
        if let Some(ms) = delay {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if roll_back {
            tx.rollback().await?;
        } else {
            tx.commit().await?;
            committed.fetch_add(n, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// Reads until it has seen `committed` events once the writers are done (they stop at
/// `target`); returns the positions in the order read and when it read the last one.
async fn read_all(
    log: EventLog,
    guarded: bool,
    committed: Arc<AtomicUsize>,
    target: usize,
) -> anyhow::Result<(Vec<i64>, Instant)> {
    let options = SubscriptionOptions {
        name: "bench-ordering".into(),
        batch_size: 2000,
        idle_poll: Duration::from_millis(20),
        settle_poll: Duration::from_millis(2),
    };
    let mut sub = log.subscribe(0, options).await?;
    let mut positions = Vec::with_capacity(target + target / 10);
    let mut cursor = 0;
    let mut idle_since: Option<Instant> = None;
    let mut last_read = Instant::now();
    loop {
        let batch = if guarded {
            sub.poll().await?
        } else {
            let b = log.read_positions(cursor, i64::MAX, 2000).await?;
            cursor = b.last().map_or(cursor, |e| e.position);
            b
        };
        if batch.is_empty() {
            let done = committed.load(Ordering::SeqCst);
            if done >= target {
                // Writers are done once the target is reached; whatever they commit after
                // that is their last transaction. Read until caught up with the table.
                let max: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
                    .fetch_one(log.pool())
                    .await?;
                let reached = if guarded { sub.position() } else { cursor };
                if reached >= max.unwrap_or(0) {
                    let quiet = idle_since.get_or_insert_with(Instant::now);
                    // The last in-flight transactions may still commit: wait until the
                    // table's end stops moving.
                    if quiet.elapsed() > Duration::from_millis(200) {
                        return Ok((positions, last_read));
                    }
                } else {
                    idle_since = None;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        } else {
            idle_since = None;
            last_read = Instant::now();
            positions.extend(batch.iter().map(|e| e.position));
        }
    }
}
