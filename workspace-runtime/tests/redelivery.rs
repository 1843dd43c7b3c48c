//! A runtime killed in the middle of a turn loses nothing: the message was not
//! acknowledged, so once its in-progress reports stop the server redelivers it to the next
//! runtime of the workspace, which answers once. Real NATS, the real runtime binary
//! (SIGKILL), a `command` agent whose first turn hangs.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::io::{AsyncBufReadExt, BufReader};
use warren_schema::nats::{Namespace, OutboxMessage};

fn runtime(url: &str, prefix: &str, dir: &Path, settings: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-workspace-runtime"))
        .env(warren_schema::launch::ENV, {
            let mut contract = support::launch(
                url,
                prefix,
                "w",
                "worker",
                serde_json::json!({"driver": "command",
                    "settings": serde_json::from_str::<serde_json::Value>(settings).expect("settings")}),
                dir,
            );
            contract.tuning.ack_wait_secs = 2;
            contract.tuning.heartbeat_secs = 1;
            contract.to_json()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the runtime")
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_lost_with_a_killed_runtime_is_redelivered_and_answered_once() {
    let url = support::nats_url();
    let prefix = format!("rd{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let dir = std::env::temp_dir().join(format!("warren-rd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    // Every turn notes that it started; the first one then hangs (until it is killed).
    let settings = r#"{"command": ["/bin/sh", "-c",
        "echo started >> runs; if [ ! -f hung ]; then touch hung; sleep 15; fi; echo answered"]}"#;
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (inbox, outbox) = support::streams(&js, &ns).await;

    let mut first = runtime(&url, &prefix, &dir, settings);
    let message = support::message("w", "worker", "do the job");
    support::send(&js, &ns, &message).await;
    let runs = dir.join("runs");
    let started = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_until("the first turn to start", || started() == 1).await;
    first.start_kill().expect("SIGKILL");
    first.wait().await.expect("reaped");

    let mut second = runtime(&url, &prefix, &dir, settings);
    let stdout = second.stdout.take().expect("stdout");
    let ready = BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .expect("read");
    assert_eq!(ready.as_deref(), Some("ready"));

    let mut outputs = Box::pin(support::follow_outbox(&outbox, &ns, "w").await);
    let reply = loop {
        if let OutboxMessage::Reply {
            in_reply_to, text, ..
        } = support::next_output(&mut outputs).await
        {
            break (in_reply_to, text);
        }
    };
    assert_eq!(reply, (message.routing_id, "answered".to_owned()));
    assert_eq!(started(), 2, "the killed turn, then the redelivered one");

    // Acknowledged after the second delivery; the outbox holds one reply.
    let info = support::acknowledged(&inbox, "w", "worker").await;
    assert_eq!(
        (
            info.delivered.consumer_sequence,
            info.delivered.stream_sequence
        ),
        (2, 1),
        "one message, delivered twice: {info:?}"
    );
    let replies = support::outbox_contents(&outbox, &ns, "w")
        .await
        .into_iter()
        .filter(|m| matches!(m, OutboxMessage::Reply { .. }))
        .count();
    assert_eq!(replies, 1);

    second.start_kill().expect("stop");
    let _ = second.wait().await;
    support::remove(&js, &ns, &["w"]).await;
    let _ = std::fs::remove_dir_all(&dir);
}
