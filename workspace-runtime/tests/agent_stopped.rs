//! A runtime whose agent stops taking messages (here: its inbox consumer deleted under it)
//! ends, with an error naming the agent, instead of running on without it: its backend
//! then restarts it whole. Real NATS (NATS_URL).
//!
//! The deletion races the runtime's first pull, as a control plane's cleanup would. NATS
//! answers a pull that finds its consumer being deleted with nothing at all (about one in
//! forty, measured against nats-server 2.15), so some rounds end only on missed heartbeats:
//! each round must end within two of them and a margin.

mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use warren_schema::nats::Namespace;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_ends_when_one_of_its_agents_stops() {
    for round in 0..10 {
        runtime_ends_when_bob_stops(round).await;
    }
}

async fn runtime_ends_when_bob_stops(round: u32) {
    let url = support::nats_url();
    let prefix = format!("stop{}r{round}", std::process::id());
    let ns = Namespace::new(&prefix);
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (inbox, _) = support::streams(&js, &ns).await;
    let mut launch = support::launch(
        &url,
        &prefix,
        "w",
        "alice",
        serde_json::json!({"driver": "echo"}),
        &std::env::temp_dir(),
    );
    launch.agents.push(warren_schema::launch::AgentLaunch::new(
        "bob",
        "echo",
        serde_json::json!({}),
    ));
    let shutdown = CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(launch, shutdown.clone()));

    // Both agents are reading their inboxes...
    let bob = Namespace::inbox_consumer("w", "bob");
    let deadline = Instant::now() + Duration::from_secs(20);
    while inbox
        .get_consumer::<jetstream::consumer::pull::Config>(&bob)
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "bob's consumer never appeared");
        assert!(
            !runtime.is_finished(),
            "the runtime stopped: {:?}",
            runtime.await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...when bob's is deleted under him: the runtime ends, naming him.
    inbox
        .delete_consumer(&bob)
        .await
        .expect("delete bob's consumer");
    let within = 2 * warren_schema::nats::PULL_HEARTBEAT + Duration::from_secs(5);
    let ended = tokio::time::timeout(within, runtime)
        .await
        .unwrap_or_else(|_| panic!("round {round}: the runtime ran on without bob"))
        .expect("join");
    let error = ended.expect_err("an agent stopping is an error");
    assert!(
        matches!(&error, warren_workspace_runtime::Error::AgentStopped { agent, .. } if agent == "bob"),
        "{error}"
    );
    support::remove(&js, &ns, &["w"]).await;
}
