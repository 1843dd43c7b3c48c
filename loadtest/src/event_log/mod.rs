//! Event log benchmarks: append throughput, ordering under late commits, catch-up reads.

mod append;
mod catchup;
mod ordering;

use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;
use warren_schema::{EventId, Metadata, NewEvent};

use crate::report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Bench {
    Append,
    Ordering,
    Catchup,
    All,
}

#[derive(Debug, Clone, Parser)]
pub struct Args {
    /// Which benchmark.
    #[arg(value_enum, default_value = "all")]
    pub bench: Bench,

    /// Append: concurrent callers (and pgbench clients).
    #[arg(long, default_value_t = 64)]
    pub callers: usize,
    /// Append: seconds per measurement.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Append: alternating baseline / Warren rounds (their mean is reported).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Append: concurrent group-commit transactions.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,
    /// Append: longest a writer lingers for more requests, microseconds.
    #[arg(long, default_value_t = 0)]
    pub linger_us: u64,

    /// Ordering and catch-up: events to write.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Ordering: concurrent writer transactions.
    #[arg(long, default_value_t = 64)]
    pub ordering_writers: usize,
    /// Ordering: share of transactions delayed between insert and commit.
    #[arg(long, default_value_t = 0.3)]
    pub delay_share: f64,
    /// Ordering: longest delay, milliseconds.
    #[arg(long, default_value_t = 25)]
    pub max_delay_ms: u64,
    /// Ordering: share of transactions rolled back.
    #[arg(long, default_value_t = 0.1)]
    pub rollback_share: f64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    report::line(&format!(
        "warren-loadtest event-log (server: DATABASE_URL; cores: {})",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));
    if matches!(args.bench, Bench::Append | Bench::All) {
        report::heading("append: group commit vs pgbench single-row INSERT");
        append::run(&args).await?;
    }
    let mut ordering_db = None;
    if matches!(args.bench, Bench::Ordering | Bench::All) {
        report::heading("ordering: late commits and rollbacks, gap-free vs unguarded");
        ordering_db = Some(ordering::run(&args).await?);
    }
    if matches!(args.bench, Bench::Catchup | Bench::All) {
        report::heading("catch-up: a no-op subscriber from position 0");
        catchup::run(&args, ordering_db).await?;
    }
    Ok(())
}

/// The event every benchmark writes: same type and payload as the pgbench baseline row.
pub(crate) fn bench_event() -> NewEvent {
    NewEvent {
        id: EventId::random(),
        event_type: "bench.appended".into(),
        event_version: 1,
        payload: json!({ "text": "the quick brown fox jumps over the lazy dog" }),
        metadata: Metadata::new("loadtest"),
    }
}

pub(crate) fn per_second(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}
