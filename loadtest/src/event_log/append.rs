//! Append throughput: the group-commit appender with N concurrent callers against pgbench
//! single-row INSERTs with N clients, into the same table, same `synchronous_commit`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use warren_schema::event_log::{Appender, AppenderConfig};
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, ExpectedVersion};

use super::{Args, bench_event, per_second};
use crate::{pgbench, report};

pub(super) async fn run(args: &Args) -> anyhow::Result<()> {
    let duration = Duration::from_secs(args.seconds);
    let db = TestDatabase::with_pool_size(4).await;
    let sync: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&db.pool)
        .await?;
    drop(db);
    report::line(&format!(
        "callers: {}, writers: {}, linger: {} us, {}s per measurement, {} rounds, \
         synchronous_commit={sync}",
        args.callers, args.writers, args.linger_us, args.seconds, args.rounds
    ));

    let (mut baseline, mut warren) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let db = TestDatabase::with_pool_size(2).await;
        let tps = pgbench::insert_tps(&db.url(), args.callers, duration).await?;
        report::figure(&format!("round {round}: pgbench INSERT"), tps, "events/s");
        baseline.push(tps);
        drop(db);

        let db = TestDatabase::with_pool_size(args.writers as u32 + 2).await;
        let (rate, hist) = group_commit(&db, args, duration).await?;
        report::figure(
            &format!("round {round}: warren group commit"),
            rate,
            "events/s",
        );
        report::line(&format!(
            "{:<48} p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            format!("round {round}: warren append latency"),
            hist.value_at_quantile(0.5) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0,
            hist.max() as f64 / 1000.0
        ));
        warren.push(rate);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (b, w) = (mean(&baseline), mean(&warren));
    report::figure("baseline (pgbench, mean)", b, "events/s");
    report::figure("warren group commit (mean)", w, "events/s");
    report::ratio("append ratio warren / pgbench", w / b, &[1.0, 1.5]);
    Ok(())
}

/// Runs `callers` tasks appending one event at a time for `duration`; returns events/s and
/// the latency histogram (microseconds).
async fn group_commit(
    db: &TestDatabase,
    args: &Args,
    duration: Duration,
) -> anyhow::Result<(f64, Histogram<u64>)> {
    let config = AppenderConfig {
        writers: args.writers,
        max_wait: Duration::from_micros(args.linger_us),
        ..AppenderConfig::default()
    };
    let (appender, tasks) = Appender::start(db.pool.clone(), config);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut handles = Vec::new();
    for caller in 0..args.callers {
        let (appender, stop) = (appender.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram bounds are valid");
            let mut n = 0usize;
            let stream = format!("bench-{caller}");
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let req = AppendRequest::new(stream.clone(), vec![bench_event()])
                    .expecting(ExpectedVersion::Any);
                appender.append(req).await?;
                hist.record(t.elapsed().as_micros() as u64)?;
                n += 1;
            }
            anyhow::Ok((n, hist))
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut hist = Histogram::<u64>::new(3)?;
    for h in handles {
        let (n, caller_hist) = h.await??;
        total += n;
        hist.add(caller_hist)?;
    }
    let elapsed = started.elapsed();
    drop(appender);
    tasks.join().await;
    Ok((per_second(total, elapsed), hist))
}
