//! A message an agent keeps failing on is dead-lettered after `max_deliver` attempts, and
//! the conversation is told: runtime (in this process) → outbox → control plane →
//! `message.dead_lettered` → a notice from `warren` for the channel. Real NATS and
//! PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warren_control_plane::controller::{self, ControllerConfig, NatsConfig};
use warren_control_plane::decide::Policy;
use warren_schema::events::*;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, Metadata, NewEvent};

/// The control plane's leader without a backend (the test runs the runtime), on NATS `url`
/// with the namespace `ns` and the agents file `agents`.
fn start_controller(
    log: &warren_schema::EventLog,
    holder: &str,
    agents: std::path::PathBuf,
    url: &str,
    ns: &Namespace,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<warren_control_plane::error::Result<()>> {
    tokio::spawn(controller::run(
        log.clone(),
        ControllerConfig {
            holder: holder.into(),
            lease_ttl: Duration::from_secs(5),
            tick: Duration::from_millis(200),
            policy: Policy::default(),
            config_file: Some(agents),
            backend: None,
            nats: Some(NatsConfig {
                url: url.to_owned(),
                namespace: ns.clone(),
                credentials: None,
            }),
        },
        shutdown.clone(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_keeps_failing_is_dead_lettered_and_the_channel_told() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("dl{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let dir = std::env::temp_dir().join(format!("warren-dl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let agents = dir.join("agents.json");
    let settings = r#"{"command": ["/bin/sh", "-c", "echo failing >&2; exit 1"]}"#;
    std::fs::write(
        &agents,
        format!(r#"{{"agents": [{{"name": "carl", "workspace": "w", "driver": "command", "settings": {settings}}}]}}"#),
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let controller = start_controller(&log, "dl", agents, &url, &ns, &shutdown);
    let deadline = Instant::now() + Duration::from_secs(15);
    while log
        .read_type("agent.configured", 0, 1)
        .await
        .expect("r")
        .is_empty()
    {
        if controller.is_finished() {
            panic!("the controller stopped: {:?}", controller.await);
        }
        assert!(Instant::now() < deadline, "not configured");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runtime = tokio::spawn(warren_workspace_runtime::run(
        {
            let mut c = support::launch(
                &url,
                &prefix,
                "w",
                "carl",
                serde_json::json!({"driver": "command", "settings": serde_json::from_str::<serde_json::Value>(settings).expect("settings")}),
                &dir,
            );
            c.tuning.max_deliver = 2;
            c
        },
        shutdown.clone(),
    ));

    let origin = Origin::Slack {
        team_id: "T1".into(),
        channel: "C1".into(),
        thread_ts: "1.0".into(),
        ts: "1.0".into(),
        user: "U1".into(),
    };
    let message = MessageReceived {
        origin: origin.clone(),
        text: "@carl do the thing".into(),
        addressed_agents: vec!["carl".into()],
        files: vec![],
    };
    log.append(&AppendRequest::new(
        "slack:T1:C1",
        vec![NewEvent::from_domain(EventId::random(), &message, Metadata::new("test")).expect("e")],
    ))
    .await
    .expect("append");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let notices: Vec<AgentReplied> = log
            .read_type("agent.replied", 0, 10)
            .await
            .expect("r")
            .iter()
            .filter_map(|e| e.decode::<AgentReplied>().ok())
            .collect();
        if let Some(notice) = notices.iter().find(|n| n.agent == "warren") {
            assert_eq!(notice.reply_to, origin, "told in the conversation");
            assert!(
                notice.text.contains("@carl") && notice.text.contains("2 attempts"),
                "{}",
                notice.text
            );
            break;
        }
        assert!(Instant::now() < deadline, "no dead-letter notice");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = log
        .read_type("message.dead_lettered", 0, 10)
        .await
        .expect("r");
    assert_eq!(dead.len(), 1, "recorded once");
    let d: MessageDeadLettered = dead[0].decode().expect("d");
    assert_eq!((d.agent.as_str(), d.deliveries), ("carl", 2));
    assert!(d.error.contains("exit status: 1"), "{}", d.error);
    let routed = log.read_type("message.routed", 0, 10).await.expect("r");
    assert_eq!(d.routing_id, routed[0].id);

    shutdown.cancel();
    controller.await.expect("join").expect("controller");
    runtime.await.expect("join").expect("runtime");
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    support::remove(&js, &ns, &["w"]).await;
}

/// A runtime that stops during a message's last delivery reports nothing, and the server
/// will not deliver the message again. The control plane learns of it from the server's
/// `MAX_DELIVERIES` advisory (kept in a stream of its own), records the dead letter as the
/// runtime would have, and the channel is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_runtime_dies_on_its_last_delivery_is_still_dead_lettered() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("dlx{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let dir = std::env::temp_dir().join(format!("warren-dlx-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    // The first attempt fails; the second hangs, and the runtime is stopped during it.
    let settings = r#"{"command": ["/bin/sh", "-c",
        "if [ -f attempted ]; then sleep 60; fi; touch attempted; exit 1"]}"#;
    let agents = dir.join("agents.json");
    std::fs::write(
        &agents,
        format!(r#"{{"agents": [{{"name": "dora", "workspace": "w", "driver": "command", "settings": {settings}}}]}}"#),
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let controller = start_controller(&log, "dlx", agents, &url, &ns, &shutdown);
    support::eventually("the agent configured", async || {
        !log.read_type("agent.configured", 0, 1)
            .await
            .expect("r")
            .is_empty()
    })
    .await;
    let stop_runtime = CancellationToken::new();
    let mut contract = support::launch(
        &url,
        &prefix,
        "w",
        "dora",
        serde_json::json!({"driver": "command",
            "settings": serde_json::from_str::<serde_json::Value>(settings).expect("settings")}),
        &dir,
    );
    contract.tuning.max_deliver = 2;
    contract.tuning.ack_wait_secs = 2;
    contract.tuning.heartbeat_secs = 600;
    let runtime = tokio::spawn(warren_workspace_runtime::run(
        contract,
        stop_runtime.clone(),
    ));

    let origin = Origin::Slack {
        team_id: "T1".into(),
        channel: "C1".into(),
        thread_ts: "1.0".into(),
        ts: "1.0".into(),
        user: "U1".into(),
    };
    let message = MessageReceived {
        origin: origin.clone(),
        text: "@dora do the thing".into(),
        addressed_agents: vec!["dora".into()],
        files: vec![],
    };
    log.append(&AppendRequest::new(
        "slack:T1:C1",
        vec![NewEvent::from_domain(EventId::random(), &message, Metadata::new("test")).expect("e")],
    ))
    .await
    .expect("append");

    // The last delivery is under way: the runtime dies.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    support::eventually("the second delivery", async || {
        let Ok(mut inbox) = js.get_stream(ns.inbox_stream()).await else {
            return false;
        };
        let Ok(consumer) = inbox
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
                &Namespace::inbox_consumer("w", "dora"),
            )
            .await
        else {
            return false;
        };
        let _ = inbox.info().await;
        consumer
            .get_info()
            .await
            .is_ok_and(|i| i.delivered.consumer_sequence >= 2)
    })
    .await;
    runtime.abort();
    let _ = runtime.await;

    support::eventually("the dead letter and the notice", async || {
        log.read_type("agent.replied", 0, 10)
            .await
            .expect("r")
            .iter()
            .filter_map(|e| e.decode::<AgentReplied>().ok())
            .any(|n| n.agent == "warren" && n.reply_to == origin)
    })
    .await;
    let dead = log
        .read_type("message.dead_lettered", 0, 10)
        .await
        .expect("r");
    assert_eq!(dead.len(), 1, "recorded once");
    let d: MessageDeadLettered = dead[0].decode().expect("d");
    assert_eq!((d.agent.as_str(), d.deliveries), ("dora", 2));
    assert!(d.error.contains("did not report"), "{}", d.error);
    let routed = log.read_type("message.routed", 0, 10).await.expect("r");
    assert_eq!(d.routing_id, routed[0].id);

    stop_runtime.cancel();
    shutdown.cancel();
    controller.await.expect("join").expect("controller");
    support::remove(&js, &ns, &["w"]).await;
}
