//! The controller against a real PostgreSQL: decisions recorded once with their cause, a
//! restart that decides nothing twice, the configuration file turned into events, and a
//! deposed leader fenced out.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use warren_control_plane::controller::{self, ControllerConfig, Decider, Lease};
use warren_control_plane::decide::Policy;
use warren_control_plane::error::Error;
use warren_schema::events::*;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent, RecordedEvent};

fn config_file(test: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-cp-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("agents.json");
    std::fs::write(&path, body).expect("write config");
    path
}

const AGENTS: &str = r#"{
  "agents": [
    {"name": "alice", "workspace": "research", "driver": "echo", "idle_timeout_secs": 600},
    {"name": "bob", "workspace": "ops", "driver": "echo", "idle_timeout_secs": 600}
  ],
  "routes": [{"route": "slack_channel:CGEN", "agent": "bob"}]
}"#;

fn config(holder: &str, file: Option<PathBuf>) -> ControllerConfig {
    ControllerConfig {
        holder: holder.into(),
        lease_ttl: Duration::from_secs(2),
        tick: Duration::from_millis(50),
        policy: Policy::default(),
        config_file: file,
        backend: None,
        nats: None,
    }
}

fn start(
    log: &EventLog,
    config: ControllerConfig,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (log, shutdown) = (log.clone(), shutdown.clone());
        async move {
            controller::run(log, config, shutdown)
                .await
                .expect("controller runs");
        }
    });
    (shutdown, task)
}

async fn message(log: &EventLog, text: &str, addressed: &[&str]) -> EventId {
    let event = MessageReceived {
        origin: Origin::Slack {
            team_id: "T1".into(),
            channel: "CGEN".into(),
            thread_ts: "1.0".into(),
            ts: "1.0".into(),
            user: "U1".into(),
        },
        text: text.into(),
        addressed_agents: addressed.iter().map(|s| (*s).to_owned()).collect(),
        files: vec![],
    };
    let id = EventId::random();
    let mut meta = Metadata::new("test");
    meta.traceparent = Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
    log.append(&AppendRequest::new(
        "slack:T1:CGEN",
        vec![NewEvent::from_domain(id, &event, meta).expect("encode")],
    ))
    .await
    .expect("append");
    id
}

async fn of_type(log: &EventLog, event_type: &str) -> Vec<RecordedEvent> {
    log.read_type(event_type, 0, 1000).await.expect("read")
}

/// Waits until `check` holds, failing after 15 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_message_is_routed_and_its_workspace_started_once_with_the_cause_recorded() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let file = config_file("routed", AGENTS);
    let (shutdown, task) = start(&log, config("replica-a", Some(file.clone())));

    eventually("the configuration events", || async {
        of_type(&log, "agent.configured").await.len() == 2
    })
    .await;
    assert_eq!(of_type(&log, "route.configured").await.len(), 1);

    let m = message(&log, "@alice summarise", &["alice"]).await;
    eventually("the start decision", || async {
        of_type(&log, "workspace.start_requested").await.len() == 1
    })
    .await;
    let routed = of_type(&log, "message.routed").await;
    assert_eq!(routed.len(), 1);
    let r: MessageRouted = routed[0].decode().expect("decode");
    assert_eq!(
        (r.agent.as_str(), r.workspace.as_str(), r.message_id),
        ("alice", "research", m)
    );
    for decision in routed
        .iter()
        .chain(&of_type(&log, "workspace.start_requested").await)
    {
        assert_eq!(
            decision.metadata.causation_id,
            Some(m),
            "caused by the message"
        );
        assert_eq!(
            decision.metadata.correlation_id,
            Some(m),
            "in its conversation"
        );
        assert!(decision.metadata.traceparent.is_some(), "in its trace");
        assert_eq!(decision.stream, controller::decider::DECISIONS_STREAM);
    }
    // explain: the start's causation chain leads back to the message.
    let started = &of_type(&log, "workspace.start_requested").await[0];
    let chain = log.causation_chain(started.id).await.expect("chain");
    assert_eq!(chain.first().map(|e| e.id), Some(m));
    // "Why is research running?"
    let why = warren_control_plane::explain::workspace(&log, "research")
        .await
        .expect("explain");
    assert_eq!(
        why.iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["message.received", "workspace.start_requested"]
    );
    assert_eq!(why[0].id, m);
    assert!(why[0].recorded_at <= why[1].recorded_at, "with times");
    assert!(
        warren_control_plane::explain::workspace(&log, "ops")
            .await
            .expect("explain")
            .is_empty(),
        "never started"
    );

    // Stop, and run again (another replica name): nothing is decided or configured twice,
    // and a second message to the starting workspace only routes.
    shutdown.cancel();
    task.await.expect("stopped");
    let (shutdown, task) = start(&log, config("replica-b", Some(file)));
    message(&log, "@alice and another thing", &["alice"]).await;
    eventually("the second routing", || async {
        of_type(&log, "message.routed").await.len() == 2
    })
    .await;
    // Let a few ticks pass over the same state: still one start.
    let checkpoint = log
        .stream_version(controller::decider::DECISIONS_STREAM)
        .await
        .expect("v");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(of_type(&log, "workspace.start_requested").await.len(), 1);
    assert_eq!(
        of_type(&log, "agent.configured").await.len(),
        2,
        "unchanged file: nothing new"
    );
    assert_eq!(
        log.stream_version(controller::decider::DECISIONS_STREAM)
            .await
            .expect("v"),
        checkpoint
    );
    shutdown.cancel();
    task.await.expect("stopped");
}

#[tokio::test]
async fn a_changed_configuration_is_recorded_as_updates_and_removals() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let file = config_file("changed", AGENTS);
    let (shutdown, task) = start(&log, config("a", Some(file.clone())));
    eventually("configured", || async {
        of_type(&log, "agent.configured").await.len() == 2
    })
    .await;
    shutdown.cancel();
    task.await.expect("stopped");

    std::fs::write(
        &file,
        r#"{"agents": [{"name": "alice", "workspace": "research", "driver": "echo",
                        "idle_timeout_secs": 60}]}"#,
    )
    .expect("rewrite");
    let (shutdown, task) = start(&log, config("a", Some(file)));
    eventually("the changes", || async {
        of_type(&log, "agent.removed").await.len() == 1
            && of_type(&log, "route.removed").await.len() == 1
            && of_type(&log, "agent.configured").await.len() == 3
    })
    .await;
    let latest: AgentConfigured = of_type(&log, "agent.configured").await[2]
        .decode()
        .expect("d");
    assert_eq!(
        (latest.name.as_str(), latest.idle_timeout_secs),
        ("alice", 60)
    );
    shutdown.cancel();
    task.await.expect("stopped");
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_with_its_reason_and_records_nothing() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let file = config_file(
        "invalid",
        r#"{"agents": [{"name": "alice", "workspace": "research"}],
            "routes": [{"route": "slack_channel:C1", "agent": "carol"}]}"#,
    );
    let err = controller::run(
        log.clone(),
        config("a", Some(file)),
        CancellationToken::new(),
    )
    .await
    .expect_err("refused");
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("unknown agent \"carol\""), "{err}");
    assert!(
        log.read_positions(0, i64::MAX, 10)
            .await
            .expect("read")
            .is_empty()
    );
}

#[tokio::test]
async fn a_deposed_leader_cannot_record_a_decision() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let ttl = Duration::from_millis(500);
    let a = Lease::try_acquire(&db.pool, "test.leader", "a", ttl)
        .await
        .expect("db")
        .expect("free lease");
    assert!(
        Lease::try_acquire(&db.pool, "test.leader", "b", ttl)
            .await
            .expect("db")
            .is_none(),
        "held by a"
    );
    let mut decider = Decider::load(&log, Policy::default(), a.clone())
        .await
        .expect("load");

    // a stops renewing (a long pause); b takes over once the TTL has passed.
    let deadline = Instant::now() + Duration::from_secs(15);
    let b = loop {
        if let Some(b) = Lease::try_acquire(&db.pool, "test.leader", "b", ttl)
            .await
            .expect("db")
        {
            break b;
        }
        assert!(Instant::now() < deadline, "b never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(b.fence, a.fence + 1);

    // a wakes up and tries to record decisions for a configuration event: refused.
    let configured = NewEvent::from_domain(
        EventId::random(),
        &AgentConfigured {
            name: "alice".into(),
            workspace: "research".into(),
            driver: "echo".into(),
            settings: serde_json::json!({}),
            idle_timeout_secs: 60,
        },
        Metadata::new("test"),
    )
    .expect("encode");
    log.append(&AppendRequest::new(
        "control-plane:config",
        vec![configured],
    ))
    .await
    .expect("append");
    let m = message(&log, "@alice", &["alice"]).await;
    let events = log.read_positions(0, i64::MAX, 10).await.expect("read");
    let err = decider
        .handle(&db.pool, &events, Utc::now())
        .await
        .expect_err("fenced");
    assert!(err.is_deposed(), "{err}");
    assert!(
        a.renew(&db.pool).await.expect("db").is_err(),
        "a cannot renew either"
    );
    assert!(
        of_type(&log, "message.routed").await.is_empty(),
        "nothing recorded for {m}"
    );
}

/// Under a backlog, deciding can hold every pooled connection for longer than the TTL.
/// Renewals have a connection of their own, so the lease is kept (before, the renewal
/// waited for the pool, and the leader was deposed mid-backlog).
#[tokio::test]
async fn the_lease_is_kept_while_the_work_holds_every_pooled_connection() {
    let db = TestDatabase::with_pool_size(2).await;
    let ttl = Duration::from_millis(600);
    let a = Lease::try_acquire(&db.pool, "test.leader", "a", ttl)
        .await
        .expect("db")
        .expect("free lease");
    let work = async {
        let held = (db.pool.acquire().await, db.pool.acquire().await);
        tokio::time::sleep(ttl * 4).await;
        drop(held);
    };
    tokio::time::timeout(Duration::from_secs(20), a.hold_while(&db.pool, work))
        .await
        .expect("the work ends")
        .expect("db")
        .expect("the lease was kept for the whole work");
    assert!(
        Lease::try_acquire(&db.pool, "test.leader", "b", ttl)
            .await
            .expect("db")
            .is_none(),
        "still a's: renewed during the work"
    );
}

/// Deciding a large batch keeps its task computing for a while. The renewals run in a task
/// of their own, so the lease outlives a work that blocks its thread for three TTLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_kept_while_the_work_keeps_its_thread_busy() {
    let db = TestDatabase::new().await;
    let ttl = Duration::from_millis(600);
    let a = Lease::try_acquire(&db.pool, "test.leader", "a", ttl)
        .await
        .expect("db")
        .expect("free lease");
    // A stand-in for CPU-bound deciding: the thread is held, nothing in this task runs.
    let work = async { std::thread::sleep(ttl * 3) };
    a.hold_while(&db.pool, work)
        .await
        .expect("db")
        .expect("the lease was kept for the whole work");
    assert!(
        Lease::try_acquire(&db.pool, "test.leader", "b", ttl)
            .await
            .expect("db")
            .is_none(),
        "still a's: renewed while the work held its thread"
    );
}

/// A new leader's start-up (replaying a large log) can take longer than the lease's TTL.
/// The lease is renewed while it runs, so no rival takes over mid-way; and work under a
/// lease that is lost anyway (a long pause) stops at the next renewal.
#[tokio::test]
async fn long_work_under_the_lease_keeps_it_and_lost_lease_stops_it() {
    let db = TestDatabase::new().await;
    let ttl = Duration::from_millis(600);
    let a = Lease::try_acquire(&db.pool, "test.leader", "a", ttl)
        .await
        .expect("db")
        .expect("free lease");
    // Work five TTLs long, while b tries to take the lease every 50 ms.
    let rival = async {
        let mut tries = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tries += 1;
            if let Some(b) = Lease::try_acquire(&db.pool, "test.leader", "b", ttl)
                .await
                .expect("db")
            {
                return (tries, b);
            }
        }
    };
    let work = tokio::time::sleep(ttl * 5);
    tokio::select! {
        held = a.hold_while(&db.pool, work) => {
            held.expect("db").expect("the lease was kept for the whole work");
        }
        (tries, _) = rival => panic!("b took the lease after {tries} tries, during a's work"),
    }

    // Without renewal the lease expires and b takes it; a's next work stops at its first
    // renewal, long before the work would end.
    let deadline = Instant::now() + Duration::from_secs(10);
    let b = loop {
        if let Some(b) = Lease::try_acquire(&db.pool, "test.leader", "b", ttl)
            .await
            .expect("db")
        {
            break b;
        }
        assert!(Instant::now() < deadline, "b never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(b.fence, a.fence + 1);
    let started = Instant::now();
    let lost = a
        .hold_while(&db.pool, tokio::time::sleep(Duration::from_secs(30)))
        .await
        .expect("db");
    assert!(lost.is_err(), "a's work ran on under b's lease");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped at the first renewal, after {:?}",
        started.elapsed()
    );
}
