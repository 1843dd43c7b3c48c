//! The NATS store lost during traffic: a private `nats-server` is killed, its JetStream
//! store deleted, and started again empty, while routed messages wait in an agent's inbox
//! and the shared memory holds a value. The control plane finds the loss (the inbox stream
//! is behind what it acknowledged), publishes again from the log what was not finished,
//! puts the memory back, and records `nats.recovered`; the runtime, whose consumer is gone,
//! stops and is started again. Every message is answered once, in Slack.
//!
//! The gateway and the control plane run in this test's process; the runtime is the real
//! binary, started by the local backend.

mod support;

use serde_json::json;
use support::eventually;
use support::slack::Gateway;
use tokio_util::sync::CancellationToken;
use warren_schema::events::*;
use warren_schema::nats::{Namespace, SharedWrite, SharedWriteResult};
use warren_schema::testing::TestDatabase;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_messages_and_memory_survive_a_lost_nats_store() {
    let dir = std::env::temp_dir().join(format!("warren-nats-loss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut server = warren_test_nats::NatsServer::start(&dir, "")
        .await
        .expect("a private nats-server");
    let db = TestDatabase::new().await;
    let log = db.log();
    let prefix = format!("loss{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let root = dir.join("root");
    std::fs::create_dir_all(&root).expect("root");
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(&db, &shutdown).await;
    // A slow agent: while it answers one message, the next ones wait in its inbox.
    let agents = root.join("agents.json");
    std::fs::write(
        &agents,
        json!({"agents": [{"name": "slow", "workspace": "research", "driver": "command",
            "settings": {"input": "argument",
                         "command": ["/bin/sh", "-c", "sleep 1; echo \"done: $1\""]}}]})
        .to_string(),
    )
    .expect("config");
    let controller = support::local_leader_on(
        &server.url,
        &log,
        "loss",
        &prefix,
        &root,
        Some(agents),
        None,
        &shutdown,
    );
    let ask = async |n: u32| {
        let body = json!({
            "type": "event_callback", "team_id": "T1", "event_id": format!("EvLoss{n}"),
            "event_time": 1, "authorizations": [{"user_id": "UAPP"}],
            "event": {"type": "app_mention", "user": "U1", "channel": "C1",
                      "text": format!("<@UAPP> @slow question {n}"),
                      "ts": format!("1700000000.{n:06}")}});
        assert_eq!(gateway.slack_event(&body).await, 200);
    };

    // One answered message before the loss, and a value in the shared memory.
    eventually("the agent configured", async || {
        !log.read_type("agent.configured", 0, 10)
            .await
            .expect("r")
            .is_empty()
    })
    .await;
    ask(1).await;
    eventually("the first answer", async || gateway.posted().len() == 1).await;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server.url.as_str())
        .await
        .expect("nats");
    let write = SharedWrite {
        agent: "slow".into(),
        key: "plan".into(),
        value: Some(json!("ship on friday")),
        expected_revision: None,
        conversation: None,
    };
    let answer = client
        .request(
            ns.shared_write_subject("research"),
            serde_json::to_vec(&write).expect("json").into(),
        )
        .await
        .expect("the control plane answers");
    assert!(matches!(
        serde_json::from_slice(&answer.payload).expect("an answer"),
        SharedWriteResult::Written { .. }
    ));

    // Three more, acknowledged into the inbox; the agent takes one at a time.
    for n in 2..=4 {
        ask(n).await;
    }
    eventually("the three published to the inbox", async || {
        let sequence = warren_schema::event_log::projection::load_checkpoint(
            &db.pool,
            warren_control_plane::delivery::recovery::INBOX_SEQUENCE,
        )
        .await
        .expect("read");
        sequence >= 4
    })
    .await;
    assert!(gateway.posted().len() < 4, "some still wait in the inbox");

    // The store goes.
    server
        .crash_wipe_and_restart()
        .await
        .expect("nats-server wiped and restarted");

    eventually("all four answered", async || gateway.posted().len() >= 4).await;
    let recovered = log.read_type("nats.recovered", 0, 10).await.expect("r");
    assert_eq!(recovered.len(), 1, "one loss, one recovery");
    let recovered: NatsRecovered = recovered[0].decode().expect("decode");
    assert_eq!(recovered.stream, ns.inbox_stream());
    assert!(recovered.acknowledged >= 4 && recovered.found < recovered.acknowledged);
    assert!(
        (1..=3).contains(&recovered.republished),
        "what was not finished, not the answered first: {recovered:?}"
    );
    assert_eq!(
        recovered.buckets,
        [BucketRestored {
            bucket: ns.shared_bucket(),
            keys: 1
        }]
    );
    let js = async_nats::jetstream::new(client);
    let shared = js
        .get_key_value(ns.shared_bucket())
        .await
        .expect("the shared bucket is back");
    let value: serde_json::Value =
        serde_json::from_slice(&shared.get("plan").await.expect("get").expect("the key"))
            .expect("json");
    assert_eq!(value["value"], "ship on friday");

    // Each message answered exactly once: every turn finished, one reply recorded and one
    // post in Slack for each.
    eventually(
        "every turn finished and every reply delivered",
        async || {
            let finished: std::collections::HashSet<_> = log
                .read_type("agent.turn_completed", 0, 100)
                .await
                .expect("r")
                .iter()
                .map(|e| e.decode::<AgentTurnCompleted>().expect("decode").routing_id)
                .collect();
            let delivered = log.read_type("reply.delivered", 0, 100).await.expect("r");
            finished.len() == 4 && delivered.len() == 4
        },
    )
    .await;
    assert_eq!(
        log.read_type("agent.replied", 0, 100)
            .await
            .expect("r")
            .len(),
        4
    );
    let texts: Vec<String> = gateway
        .posted()
        .iter()
        .filter_map(|p| p["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(texts.len(), 4, "four posts: {texts:?}");
    for n in 1..=4 {
        let answers = texts
            .iter()
            .filter(|t| t.starts_with("done: ") && t.ends_with(&format!("question {n}")))
            .count();
        assert_eq!(answers, 1, "message {n} answered once: {texts:?}");
    }

    shutdown.cancel();
    controller.await.expect("join").expect("controller");
    server.stop().await.expect("stop nats-server");
    let _ = std::fs::remove_dir_all(&dir);
}
