//! The runtime's metrics, as an operator scrapes them: the real runtime binary with
//! `WARREN_RUNTIME_METRICS_LISTEN`, a turn on real NATS, then `GET /metrics`.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::io::{AsyncBufReadExt, BufReader};
use warren_schema::nats::{Namespace, OutboxMessage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_shows_in_the_runtime_metrics() {
    let url = support::nats_url();
    let prefix = format!("met{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let dir = std::env::temp_dir().join(format!("warren-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (_, outbox) = support::streams(&js, &ns).await;
    // A free port for the admin listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();

    let mut runtime = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-workspace-runtime"))
        .env(warren_schema::launch::ENV, {
            let mut contract = support::launch(
                &url,
                &prefix,
                "w",
                "alice",
                serde_json::json!({"driver": "echo"}),
                &dir,
            );
            contract.telemetry.metrics_listen =
                Some(format!("127.0.0.1:{port}").parse().expect("addr"));
            contract.to_json()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the runtime");
    let stdout = runtime.stdout.take().expect("stdout");
    let ready = tokio::time::timeout(
        Duration::from_secs(20),
        BufReader::new(stdout).lines().next_line(),
    )
    .await
    .expect("ready in time")
    .expect("read");
    assert_eq!(ready.as_deref(), Some("ready"));

    let message = support::message("w", "alice", "count me");
    support::send(&js, &ns, &message).await;
    let mut outputs = Box::pin(support::follow_outbox(&outbox, &ns, "w").await);
    match support::next_output(&mut outputs).await {
        OutboxMessage::Reply { in_reply_to, .. } => assert_eq!(in_reply_to, message.routing_id),
        other => panic!("expected alice's reply, got {other:?}"),
    }

    // The turn is counted once it is acknowledged, right after the reply.
    let scrape = format!("http://127.0.0.1:{port}/metrics");
    let answered = r#"warren_runtime_turns_total{agent="alice",outcome="answered"} 1"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = reqwest::get(&scrape)
            .await
            .expect("the metrics listener answers")
            .text()
            .await
            .expect("body");
        if body.lines().any(|l| l == answered) {
            break body;
        }
        assert!(Instant::now() < deadline, "no {answered} in:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        body.lines()
            .any(|l| l.starts_with("warren_runtime_turn_seconds") && l.contains("alice")),
        "the turn's duration is recorded:\n{body}"
    );
    assert!(
        !body.contains("outcome=\"failed\""),
        "nothing failed:\n{body}"
    );

    runtime.start_kill().expect("kill");
    let _ = runtime.wait().await;
    support::remove(&js, &ns, &["w"]).await;
    let _ = std::fs::remove_dir_all(&dir);
}
