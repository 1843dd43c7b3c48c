//! Control-plane benchmarks, each beside a baseline measured in the same run.
//!
//! - `rebuild`: the read models rebuilt from position 0 over a log of N events (a realistic
//!   mix: messages, routing decisions, replies), beside the live projector catching up over
//!   the same log. Baseline: reading the same log with plain keyset pages (what any replay
//!   must at least do).
//! - `history`: the admin API's replays over the same log: as-of (the fold of every event)
//!   and what-if (every event through the decisions under a changed cap). Baseline: the
//!   keyset read again.
//! - `decisions`: open loop at a constant rate of `message.received` appends; for each, the
//!   time from its *scheduled* send until the routing decision is visible to a subscriber.
//!   Baseline: the time until the message itself is visible to the same subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;
use warren_control_plane::controller::{self, ControllerConfig};
use warren_control_plane::decide::Policy;
use warren_schema::event_log::{Appender, AppenderConfig, SubscriptionOptions};
use warren_schema::events::*;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, Metadata, NewEvent};

use crate::report;

#[derive(Debug, Clone, clap::Parser)]
pub struct Args {
    /// `rebuild`, `history`, `decisions` or `all`.
    #[arg(default_value = "all")]
    pub which: String,
    /// Rebuild: events in the log.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: i64,
    /// Decisions: messages per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Decisions: seconds of load.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if matches!(args.which.as_str(), "rebuild" | "all") {
        rebuild(&args).await?;
    }
    if matches!(args.which.as_str(), "history" | "all") {
        history(&args).await?;
    }
    if matches!(args.which.as_str(), "decisions" | "all") {
        decisions(&args).await?;
    }
    Ok(())
}

/// Fills the log in SQL: 40% `message.received`, 40% `message.routed` (each naming the
/// message before it), 20% `agent.replied`, over 50 channels; two agents configured first.
async fn fill(db: &TestDatabase, events: i64) -> anyhow::Result<()> {
    let log = db.log();
    for (name, workspace) in [("alice", "research"), ("bob", "ops")] {
        let e = NewEvent::from_domain(
            EventId::random(),
            &AgentConfigured {
                name: name.into(),
                workspace: workspace.into(),
                driver: "echo".into(),
                settings: serde_json::json!({}),
                idle_timeout_secs: 900,
            },
            Metadata::new("bench"),
        )?;
        log.append(&AppendRequest::new("control-plane:config", vec![e]))
            .await?;
    }
    sqlx::query(
        "INSERT INTO events (event_id, stream, stream_version, event_type, event_version, \
             payload, correlation_id, source, received_at) \
         SELECT md5('e' || i)::uuid, 'bench:' || (i % 5), i / 5 + 1, \
             CASE WHEN i % 5 IN (0, 1) THEN 'message.received' \
                  WHEN i % 5 IN (2, 3) THEN 'message.routed' ELSE 'agent.replied' END, 1, \
             CASE WHEN i % 5 IN (0, 1) THEN jsonb_build_object( \
                    'origin', jsonb_build_object('kind', 'slack', 'team_id', 'T1', \
                        'channel', 'C' || (i % 50), 'thread_ts', '1.0', 'ts', i || '.0', \
                        'user', 'U1'), \
                    'text', '@alice how are the numbers today? ' || i, \
                    'addressed_agents', jsonb_build_array('alice'), 'files', '[]'::jsonb) \
                  WHEN i % 5 IN (2, 3) THEN jsonb_build_object( \
                    'message_id', md5('e' || (i - 2))::uuid, 'agent', 'alice', \
                    'workspace', 'research', 'reason', 'mention') \
                  ELSE jsonb_build_object('workspace', 'research', 'agent', 'alice', \
                    'reply_to', jsonb_build_object('kind', 'slack', 'team_id', 'T1', \
                        'channel', 'C' || (i % 50), 'thread_ts', '1.0', 'ts', i || '.0', \
                        'user', 'U1'), \
                    'text', 'Here are the numbers: ' || i) END, \
             md5('e' || i)::uuid, 'bench', now() \
         FROM generate_series(0, $1 - 1) AS i",
    )
    .bind(events)
    .execute(&db.pool)
    .await?;
    sqlx::query("ANALYZE events").execute(&db.pool).await?;
    Ok(())
}

async fn rebuild(args: &Args) -> anyhow::Result<()> {
    report::heading(&format!(
        "control plane: read-model rebuild over {} events",
        args.events
    ));
    let db = TestDatabase::with_pool_size(4).await;
    fill(&db, args.events).await?;
    let log = db.log();
    let rows = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM message_routes) \
                  + (SELECT count(*) FROM replies)",
        )
        .fetch_one(&db.pool)
        .await
    };

    let baseline = keyset_baseline(&log).await?;

    // Side by side: the live projector catching up from position 0 (batched upserts, a
    // transaction and a checkpoint per batch, keys maintained row by row).
    let started = Instant::now();
    let mut projections = warren_control_plane::projection::Projections::default();
    let mut caught_up = 0usize;
    loop {
        let page = log
            .read_positions(projections.position(), i64::MAX, 20_000)
            .await?;
        if page.is_empty() {
            break;
        }
        caught_up += page.len();
        projections.apply(&db.pool, &page).await?;
    }
    let catch_up = caught_up as f64 / started.elapsed().as_secs_f64();
    let catch_up_rows = rows().await?;

    let started = Instant::now();
    let replayed = warren_control_plane::projection::rebuild(&log).await?;
    let rate = replayed as f64 / started.elapsed().as_secs_f64();
    let rebuilt_rows = rows().await?;
    anyhow::ensure!(
        rebuilt_rows == catch_up_rows,
        "the rebuild wrote {rebuilt_rows} rows, the catch-up {catch_up_rows}"
    );
    report::figure("live projector catch-up", catch_up, "events/s");
    report::figure("rebuild (COPY, keys built after)", rate, "events/s");
    report::figure("rows written", rebuilt_rows as f64, "rows");
    report::ratio("rebuild / keyset read", rate / baseline, &[]);
    report::ratio("rebuild / live catch-up", rate / catch_up, &[]);
    report::ratio("rebuild vs goal of 150k events/s", rate / 150_000.0, &[1.0]);
    Ok(())
}

/// Baseline: keyset pages over the whole log (twice; the first warms the cache). Events/s.
async fn keyset_baseline(log: &warren_schema::EventLog) -> anyhow::Result<f64> {
    let mut baseline = 0.0;
    for _ in 0..2 {
        let started = Instant::now();
        let (mut cursor, mut n) = (0, 0usize);
        loop {
            let page = log.read_positions(cursor, i64::MAX, 20_000).await?;
            let Some(last) = page.last() else { break };
            cursor = last.position;
            n += page.len();
        }
        baseline = n as f64 / started.elapsed().as_secs_f64();
    }
    report::figure("baseline: keyset read of the log", baseline, "events/s");
    Ok(baseline)
}

async fn history(args: &Args) -> anyhow::Result<()> {
    use warren_control_plane::admin_api::view::View;
    use warren_control_plane::what_if::{Replay, replay_range};
    report::heading(&format!(
        "admin API: as-of and what-if over {} events",
        args.events
    ));
    let db = TestDatabase::with_pool_size(4).await;
    fill(&db, args.events).await?;
    let log = db.log();
    let baseline = keyset_baseline(&log).await?;
    let total = log.head().await? as f64;

    let started = Instant::now();
    let view = View::replay(&log, i64::MAX).await?;
    let as_of = total / started.elapsed().as_secs_f64();
    anyhow::ensure!(
        view.state.position as f64 == total,
        "the fold stopped at {} of {total}",
        view.state.position
    );
    report::figure("as-of: the fold of the whole log", as_of, "events/s");
    report::ratio("as-of / keyset read", as_of / baseline, &[]);

    let started = Instant::now();
    let policy = Policy {
        max_running: Some(1),
        ..Policy::default()
    };
    // The ids of the recorded decisions are read inside the timed part, as the API does.
    let recorded = warren_control_plane::what_if::recorded_ids(&log, 0, i64::MAX).await?;
    let replay = Replay::new(
        Default::default(),
        policy,
        None,
        vec![("total".into(), Some(1))],
        recorded,
    );
    let replay = replay_range(&log, replay, 0, i64::MAX).await?;
    let what_if = total / started.elapsed().as_secs_f64();
    let replayed = replay.replayed;
    let differences = replay.finish();
    report::figure(
        "what-if: every event through the decisions",
        what_if,
        "events/s",
    );
    report::figure(
        "decisions the what-if made",
        (differences.only_new.len() + differences.same) as f64,
        "decisions",
    );
    report::figure("outside facts replayed", replayed as f64, "events");
    report::ratio("what-if / keyset read", what_if / baseline, &[]);
    Ok(())
}

/// Each message's scheduled send time, on the monotonic and on the wall clock.
type Pending = Arc<Mutex<HashMap<EventId, (Instant, chrono::DateTime<chrono::Utc>)>>>;

async fn decisions(args: &Args) -> anyhow::Result<()> {
    report::heading(&format!(
        "control plane: append -> decision recorded, open loop at {} msg/s for {} s",
        args.rate, args.seconds
    ));
    let db = TestDatabase::with_pool_size(12).await;
    let log = db.log();
    let dir = std::env::temp_dir().join(format!("warren-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "alice", "workspace": "research"}]}"#,
    )?;
    let shutdown = CancellationToken::new();
    let controller = tokio::spawn(controller::run(
        log.clone(),
        ControllerConfig {
            holder: "bench".into(),
            lease_ttl: Duration::from_secs(10),
            tick: Duration::from_millis(500),
            policy: Policy::default(),
            config_file: Some(file),
            backend: None,
            nats: None,
        },
        shutdown.clone(),
    ));
    while log.read_type("agent.configured", 0, 1).await?.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The watcher: when a message, or the decision routing it, becomes visible.
    let scheduled: Pending = Arc::default();
    let seen_message: Arc<Mutex<Histogram<u64>>> =
        Arc::new(Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?));
    let seen_decision = Arc::new(Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?));
    // When the decision was made: its `received_at` (the controller's clock as it decided,
    // just before its transaction commits).
    let made_decision = Arc::new(Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?));
    let total = args.rate * args.seconds;
    let watcher = tokio::spawn({
        let (log, scheduled) = (log.clone(), scheduled.clone());
        let (seen_message, seen_decision) = (seen_message.clone(), seen_decision.clone());
        let made_decision = made_decision.clone();
        async move {
            let options = SubscriptionOptions {
                name: "bench-watch".into(),
                settle_poll: Duration::from_millis(1),
                ..SubscriptionOptions::default()
            };
            let mut sub = log.subscribe(0, options).await?;
            let mut decided = 0;
            while decided < total {
                for e in sub.next_batch().await? {
                    let now = Instant::now();
                    let key = match e.event_type.as_str() {
                        "message.received" => Some((e.id, &seen_message)),
                        "message.routed" => e
                            .payload
                            .get("message_id")
                            .and_then(|v| serde_json::from_value(v.clone()).ok())
                            .map(|id| (id, &seen_decision)),
                        _ => None,
                    };
                    let Some((id, hist)) = key else { continue };
                    let Some((at, wall)) = scheduled
                        .lock()
                        .map_err(|_| anyhow::anyhow!("lock"))?
                        .get(&id)
                        .copied()
                    else {
                        continue;
                    };
                    let micros = now.duration_since(at).as_micros().max(1) as u64;
                    hist.lock()
                        .map_err(|_| anyhow::anyhow!("lock"))?
                        .record(micros)?;
                    if e.event_type == "message.routed" {
                        decided += 1;
                        let made = (e.metadata.received_at - wall)
                            .num_microseconds()
                            .unwrap_or(1)
                            .max(1) as u64;
                        made_decision
                            .lock()
                            .map_err(|_| anyhow::anyhow!("lock"))?
                            .record(made)?;
                    }
                }
            }
            anyhow::Ok(())
        }
    });

    let (appender, writers) = Appender::start(db.pool.clone(), AppenderConfig::default());
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now();
    let mut sends = Vec::with_capacity(total as usize);
    for n in 0..total {
        let at = start + interval * n as u32;
        tokio::time::sleep_until(at.into()).await;
        let id = EventId::random();
        scheduled
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .insert(id, (at, chrono::Utc::now()));
        let message = MessageReceived {
            origin: Origin::Slack {
                team_id: "T1".into(),
                channel: format!("C{}", n % 50),
                thread_ts: "1.0".into(),
                ts: format!("{n}.0"),
                user: "U1".into(),
            },
            text: format!("@alice question {n}"),
            addressed_agents: vec!["alice".into()],
            files: vec![],
        };
        let event = NewEvent::from_domain(id, &message, Metadata::new("bench"))?;
        let appender = appender.clone();
        sends.push(tokio::spawn(async move {
            appender
                .append(AppendRequest::new(
                    format!("slack:T1:C{}", n % 50),
                    vec![event],
                ))
                .await
        }));
    }
    for s in sends {
        s.await??;
    }
    tokio::time::timeout(Duration::from_secs(60), watcher).await???;
    shutdown.cancel();
    controller.await??;
    drop(appender);
    writers.join().await;

    let print = |name: &str, h: &Histogram<u64>| {
        for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
            report::figure(
                &format!("{name} {label}"),
                h.value_at_quantile(q) as f64 / 1000.0,
                "ms",
            );
        }
    };
    let message = seen_message.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let decision = seen_decision.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    let made = made_decision.lock().map_err(|_| anyhow::anyhow!("lock"))?;
    report::figure("messages", decision.len() as f64, "decided");
    print("baseline: send -> message visible", &message);
    print("send -> decision made (before its commit)", &made);
    print("send -> decision visible to another reader", &decision);
    report::ratio(
        "decision p99 / message-visible p99",
        decision.value_at_quantile(0.99) as f64 / message.value_at_quantile(0.99).max(1) as f64,
        &[],
    );
    // The decision is recorded between "made" and "visible": judge the goal on "visible",
    // the conservative end.
    report::ratio(
        "p99 goal 20 ms: goal / visible p99",
        20_000.0 / decision.value_at_quantile(0.99).max(1) as f64,
        &[1.0],
    );
    Ok(())
}
