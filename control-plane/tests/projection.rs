//! The read models, built incrementally by a running controller, equal the ones a rebuild
//! from position 0 produces; and they show what happened.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warren_control_plane::controller::{self, ControllerConfig};
use warren_control_plane::decide::Policy;
use warren_control_plane::projection::{self, CHECKPOINT};
use warren_schema::events::*;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

const TABLES: &[(&str, &str)] = &[
    (
        "agents",
        "SELECT coalesce(json_agg(t ORDER BY name), '[]')::text FROM agents t",
    ),
    (
        "routes",
        "SELECT coalesce(json_agg(t ORDER BY route), '[]')::text FROM routes t",
    ),
    (
        "workspaces",
        "SELECT coalesce(json_agg(t ORDER BY name), '[]')::text FROM workspaces t",
    ),
    (
        "messages",
        "SELECT coalesce(json_agg(t ORDER BY position), '[]')::text FROM messages t",
    ),
    (
        "message_routes",
        "SELECT coalesce(json_agg(t ORDER BY position, decision_id), '[]')::text FROM message_routes t",
    ),
    (
        "replies",
        "SELECT coalesce(json_agg(t ORDER BY position), '[]')::text FROM replies t",
    ),
];

async fn dump(log: &EventLog) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for (name, sql) in TABLES {
        let text: String = sqlx::query_scalar(*sql)
            .fetch_one(log.pool())
            .await
            .expect("dump");
        out.push((
            (*name).to_owned(),
            serde_json::from_str(&text).expect("json"),
        ));
    }
    out
}

async fn append<E: DomainEvent>(log: &EventLog, stream: &str, event: &E) -> EventId {
    let id = EventId::random();
    log.append(&AppendRequest::new(
        stream,
        vec![NewEvent::from_domain(id, event, Metadata::new("test")).expect("encode")],
    ))
    .await
    .expect("append");
    id
}

fn origin(channel: &str) -> Origin {
    Origin::Slack {
        team_id: "T1".into(),
        channel: channel.into(),
        thread_ts: "1.0".into(),
        ts: "1.0".into(),
        user: "U1".into(),
    }
}

fn observed(workspace: &str, phase: WorkspacePhase) -> WorkspaceObserved {
    WorkspaceObserved {
        workspace: workspace.into(),
        phase,
        backend: "local".into(),
        instance: Some(format!("pid-{workspace}")),
        detail: None,
        replaced: false,
    }
}

/// Waits until the read models and the decisions have caught up with a log that has
/// stopped growing.
async fn settled(log: &EventLog) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
            .fetch_one(log.pool())
            .await
            .expect("head");
        let checkpoints: Vec<i64> = sqlx::query_scalar(
            "SELECT position FROM subscription_checkpoints WHERE name = ANY($1) ORDER BY name",
        )
        .bind(vec![CHECKPOINT, controller::decider::CHECKPOINT])
        .fetch_all(log.pool())
        .await
        .expect("checkpoints");
        if checkpoints.len() == 2 && checkpoints.iter().all(|c| *c == head) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "read models did not catch up: {checkpoints:?} vs {head}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_rebuild_from_position_zero_gives_the_rows_built_incrementally() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let dir = std::env::temp_dir().join(format!("warren-proj-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "alice", "workspace": "research", "idle_timeout_secs": 600},
                       {"name": "bob", "workspace": "ops", "idle_timeout_secs": 600}],
            "routes": [{"route": "slack_channel:CGEN", "agent": "bob"}]}"#,
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let config = ControllerConfig {
        holder: "p".into(),
        lease_ttl: Duration::from_secs(2),
        tick: Duration::from_millis(50),
        policy: Policy {
            restart_backoff: chrono::TimeDelta::milliseconds(100),
            ..Policy::default()
        },
        config_file: Some(file),
        backend: None,
        nats: None,
    };
    let task = tokio::spawn(controller::run(log.clone(), config, shutdown.clone()));

    let deadline = Instant::now() + Duration::from_secs(15);
    while log
        .read_type("agent.configured", 0, 10)
        .await
        .expect("read")
        .len()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the configuration was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A conversation in waves, so the running controller sees many small batches.
    for n in 0..5 {
        let text = format!("@alice question {n}");
        let m = append(
            &log,
            "slack:T1:CGEN",
            &MessageReceived {
                origin: origin("CGEN"),
                text,
                addressed_agents: vec!["alice".into()],
                files: vec![],
            },
        )
        .await;
        append(
            &log,
            "slack:T1:CGEN",
            &MessageReceived {
                origin: origin("CGEN"),
                // Tabs, newlines and backslashes survive the rebuild's COPY text format.
                text: format!("anyone?\t{n}\nC:\\path \\N \r"),
                addressed_agents: vec![],
                files: vec![],
            },
        )
        .await;
        if n == 0 {
            settled(&log).await;
            append(
                &log,
                "workspace:research",
                &observed("research", WorkspacePhase::Ready),
            )
            .await;
        }
        let reply = append(
            &log,
            "agent:alice",
            &AgentReplied {
                workspace: "research".into(),
                agent: "alice".into(),
                reply_to: origin("CGEN"),
                text: format!("answer {n} to {m}:\n\t\"quoted\\\""),
            },
        )
        .await;
        if n % 2 == 0 {
            append(
                &log,
                "slack:T1:CGEN",
                &ReplyDelivered {
                    reply_id: reply,
                    channel: "CGEN".into(),
                    ts: format!("2.{n}"),
                },
            )
            .await;
        }
        settled(&log).await;
    }
    append(
        &log,
        "workspace:ops",
        &observed("ops", WorkspacePhase::Failed),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while log
        .read_type("workspace.start_requested", 0, 100)
        .await
        .expect("read")
        .len()
        < 3
    {
        assert!(Instant::now() < deadline, "ops was not restarted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    settled(&log).await;
    shutdown.cancel();
    task.await.expect("joined").expect("controller");

    let incremental = dump(&log).await;
    let count = |name: &str| {
        incremental
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_array().map(Vec::len))
            .unwrap_or(0)
    };
    assert_eq!(count("agents"), 2);
    assert_eq!(count("routes"), 1);
    assert_eq!(count("messages"), 10);
    assert_eq!(
        count("message_routes"),
        10,
        "five to alice by name, five to bob by route"
    );
    assert_eq!(count("replies"), 5);
    let workspaces = &incremental
        .iter()
        .find(|(n, _)| n == "workspaces")
        .expect("ws")
        .1;
    let research = workspaces
        .as_array()
        .and_then(|a| a.iter().find(|w| w["name"] == "research"))
        .expect("research row");
    assert_eq!(research["phase"], "ready");
    assert_eq!(research["desired"], "running");
    assert_eq!(research["observed_instance"], "pid-research");
    let ops = workspaces
        .as_array()
        .and_then(|a| a.iter().find(|w| w["name"] == "ops"))
        .expect("ops row");
    assert_eq!(ops["observed_phase"], "failed");
    assert_eq!(ops["phase"], "starting", "restarted after the backoff");

    let replayed = projection::rebuild(&log).await.expect("rebuild");
    assert!(replayed > 20, "replayed {replayed}");
    let rebuilt = dump(&log).await;
    for ((name, a), (_, b)) in incremental.iter().zip(&rebuilt) {
        assert_eq!(a, b, "table {name} differs after rebuild");
    }
}

#[tokio::test]
async fn a_long_replay_folds_every_event_once_in_log_order() {
    let db = TestDatabase::new().await;
    let log = db.log();
    // 25,000 events: three stretches for the two readers, the last one partial.
    sqlx::query(
        "INSERT INTO events (event_id, stream, stream_version, event_type, event_version, \
             payload, correlation_id, source, received_at) \
         SELECT md5('t' || i)::uuid, 'test:ticks', i, 'test.tick', 1, '{}'::jsonb, \
             md5('t' || i)::uuid, 'test', now() \
         FROM generate_series(1, 25000) AS i",
    )
    .execute(&db.pool)
    .await
    .expect("filling the log");
    fn step(seen: &mut Vec<i64>, e: &warren_schema::RecordedEvent) {
        seen.push(e.position);
    }
    let head = log.head().await.expect("head");
    // An end past the head (what an API caller may send) ends at the head.
    let seen = warren_control_plane::replay::fold_range(&log, Vec::new(), 0, i64::MAX, step)
        .await
        .expect("fold");
    assert_eq!(seen.len(), 25_000);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "out of log order");
    assert_eq!(seen.last(), Some(&head));
    // A stretch in the middle.
    let seen = warren_control_plane::replay::fold_range(&log, Vec::new(), 9_999, 20_001, step)
        .await
        .expect("fold");
    assert_eq!(seen.first(), Some(&10_000));
    assert_eq!(seen.last(), Some(&20_001));
    assert_eq!(seen.len(), 10_002);
}
