//! NATS crashes and comes back: the runtime reconnects and its agents go on answering,
//! without a restart of the runtime. A private `nats-server` (killed, then started again
//! on the same port and store), the runtime in this process.

mod support;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use warren_schema::nats::{Namespace, OutboxMessage};

async fn answer(
    outputs: &mut (impl futures_util::Stream<Item = OutboxMessage> + Unpin),
    routing: warren_schema::EventId,
) -> String {
    loop {
        if let OutboxMessage::Reply {
            in_reply_to, text, ..
        } = support::next_output(outputs).await
            && in_reply_to == routing
        {
            return text;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_go_on_answering_after_nats_crashes_and_comes_back() {
    let dir = std::env::temp_dir().join(format!("warren-nats-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut server = warren_test_nats::NatsServer::start(&dir, "")
        .await
        .expect("a private nats-server");
    let ns = Namespace::default();
    let url = server.url.clone();
    let connect = || async {
        jetstream::new(
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(url.as_str())
                .await
                .expect("nats"),
        )
    };
    let js = connect().await;
    let (_, outbox) = support::streams(&js, &ns).await;

    let shutdown = CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(
        support::launch(
            &url,
            "warren",
            "w",
            "alice",
            serde_json::json!({"driver": "echo"}),
            &dir,
        ),
        shutdown.clone(),
    ));
    let before = support::message("w", "alice", "before the crash");
    support::send(&js, &ns, &before).await;
    let mut outputs = Box::pin(support::follow_outbox(&outbox, &ns, "w").await);
    assert!(
        answer(&mut outputs, before.routing_id)
            .await
            .contains("before the crash")
    );
    drop(outputs);

    server
        .crash_and_restart()
        .await
        .expect("nats-server restarted");

    // A new client (the old one reconnects on its own, too); the streams are on disk.
    let js = connect().await;
    let outbox = js
        .get_stream(ns.outbox_stream())
        .await
        .expect("outbox survived");
    let after = support::message("w", "alice", "after the crash");
    support::send(&js, &ns, &after).await;
    let mut outputs = Box::pin(support::follow_outbox(&outbox, &ns, "w").await);
    assert!(
        answer(&mut outputs, after.routing_id)
            .await
            .contains("after the crash"),
        "alice answers after the restart"
    );
    assert!(
        !runtime.is_finished(),
        "the runtime is still the same process: {runtime:?}"
    );

    shutdown.cancel();
    runtime
        .await
        .expect("join")
        .expect("the runtime stops cleanly");
    server.stop().await.expect("stop nats-server");
    let _ = std::fs::remove_dir_all(&dir);
}
