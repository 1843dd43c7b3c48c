//! A turn longer than the inbox's `ack_wait` runs once: the runtime's heartbeats report it
//! in progress to the server (no redelivery to the busy agent) and busy to the control
//! plane (`Heartbeat` on the outbox, recorded as `agent.busy`). Real NATS, the runtime
//! in this process, a `command` agent that takes four seconds.

mod support;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use warren_schema::nats::{Namespace, OutboxMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_longer_than_ack_wait_runs_once_and_reports_busy() {
    let url = support::nats_url();
    let prefix = format!("hb{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let dir = std::env::temp_dir().join(format!("warren-hb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let runs = dir.join("runs");
    let _ = std::fs::remove_file(&runs);
    let settings = format!(
        r#"{{"command": ["/bin/sh", "-c", "echo run >> {}; sleep 4; echo finished"]}}"#,
        runs.display()
    );
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (inbox, outbox) = support::streams(&js, &ns).await;

    let shutdown = CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(
        {
            let mut c = support::launch(
                &url,
                &prefix,
                "w",
                "slow",
                serde_json::json!({"driver": "command", "settings": serde_json::from_str::<serde_json::Value>(&settings).expect("settings")}),
                &dir,
            );
            c.tuning.ack_wait_secs = 2;
            c.tuning.heartbeat_secs = 1;
            c
        },
        shutdown.clone(),
    ));

    let message = support::message("w", "slow", "take your time");
    support::send(&js, &ns, &message).await;
    let mut outputs = Box::pin(support::follow_outbox(&outbox, &ns, "w").await);
    let mut heartbeats = Vec::new();
    let reply = loop {
        match support::next_output(&mut outputs).await {
            OutboxMessage::Heartbeat {
                in_reply_to,
                agent,
                busy_for_secs,
                ..
            } => {
                assert_eq!((in_reply_to, agent.as_str()), (message.routing_id, "slow"));
                heartbeats.push(busy_for_secs);
            }
            OutboxMessage::Reply { text, .. } => break text,
            other => panic!("unexpected output {other:?}"),
        }
    };
    assert_eq!(reply, "finished");
    // Four seconds at one beat a second: at least two beats, counting up.
    assert!(heartbeats.len() >= 2, "heartbeats: {heartbeats:?}");
    assert!(
        heartbeats.windows(2).all(|w| w[0] <= w[1]),
        "{heartbeats:?}"
    );

    // Acknowledged once and never redelivered, though the turn took twice ack_wait
    // (num_redelivered only counts pending messages: the delivery count says it).
    let info = support::acknowledged(&inbox, "w", "slow").await;
    assert_eq!(
        (
            info.delivered.consumer_sequence,
            info.delivered.stream_sequence
        ),
        (1, 1),
        "one message, delivered once: {info:?}"
    );
    let runs = std::fs::read_to_string(&runs).expect("runs");
    assert_eq!(runs.lines().count(), 1, "the command ran {runs:?}");

    shutdown.cancel();
    runtime.await.expect("join").expect("runtime");
    support::remove(&js, &ns, &["w"]).await;
    let _ = std::fs::remove_dir_all(&dir);
}
