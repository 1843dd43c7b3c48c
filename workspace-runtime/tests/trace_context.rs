//! The conversation's trace goes through a turn: what the turn publishes carries a
//! `traceparent` of the inbox message's trace. Real NATS, the runtime in this process.

mod support;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use warren_schema::nats::{Namespace, OutboxMessage, TRACEPARENT};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turns_outputs_carry_the_conversations_trace() {
    let url = support::nats_url();
    let prefix = format!("tc{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (_, outbox) = support::streams(&js, &ns).await;
    let shutdown = CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(
        support::launch(
            &url,
            &prefix,
            "w",
            "alice",
            serde_json::json!({"driver": "echo", "settings": {"cc": ["bob"]}}),
            &std::env::temp_dir(),
        ),
        shutdown.clone(),
    ));

    let message = support::message("w", "alice", "trace me");
    let mut headers = HeaderMap::new();
    headers.insert(
        TRACEPARENT,
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01").as_str(),
    );
    js.publish_with_headers(
        ns.inbox_subject("w", "alice"),
        headers,
        serde_json::to_vec(&message).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");

    let mut outputs = outbox
        .create_consumer(consumer::pull::Config {
            filter_subject: ns.outbox_subject("w"),
            ..Default::default()
        })
        .await
        .expect("consumer")
        .messages()
        .await
        .expect("messages");
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(20), outputs.next())
            .await
            .expect("an output in time")
            .expect("open")
            .expect("ok");
        let output: OutboxMessage = serde_json::from_slice(&m.payload).expect("output");
        let traceparent = m
            .headers
            .as_ref()
            .and_then(|h| h.get(TRACEPARENT))
            .map(|v| v.to_string())
            .unwrap_or_else(|| panic!("no traceparent on {output:?}"));
        let parts: Vec<&str> = traceparent.split('-').collect();
        assert_eq!(parts.len(), 4, "{traceparent}");
        assert_eq!(
            parts[1], TRACE_ID,
            "the conversation's trace: {traceparent}"
        );
        kinds.push(match output {
            OutboxMessage::Mention { .. } => "mention",
            OutboxMessage::Reply { .. } => "reply",
            _ => "other",
        });
    }
    assert_eq!(kinds, ["mention", "reply"], "mentions go first");

    shutdown.cancel();
    runtime.await.expect("join").expect("runtime");
    support::remove(&js, &ns, &["w"]).await;
}
