//! End to end, with real PostgreSQL and NATS: a signed Slack request at the gateway, routed
//! by the control plane, answered by agents running in a real `warren-workspace-runtime`
//! process started by the local backend, one agent @-mentioning another, and both replies
//! posted in the Slack thread through a local server that speaks Slack's Web API.
//!
//! The gateway and the control plane run in this test's process (their library entry
//! points, on real sockets); the runtime is the real binary.

mod support;

use serde_json::json;
use support::eventually;
use support::slack::Gateway;
use tokio_util::sync::CancellationToken;
use warren_schema::events::*;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_message_is_answered_by_two_agents_in_its_thread() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!(
        "e2e{}x{}",
        std::process::id(),
        chrono::Utc::now().timestamp_subsec_nanos()
    );
    let root = std::env::temp_dir().join(format!("warren-e2e-{prefix}"));
    std::fs::create_dir_all(&root).expect("root");
    let shutdown = CancellationToken::new();

    // Slack's side, and the gateway (ingress + replies out).
    let gateway = Gateway::start(&db, &shutdown).await;

    // The control plane, with the local backend running the real runtime binary.
    let agents = root.join("agents.json");
    std::fs::write(
        &agents,
        r#"{"agents": [
              {"name": "alice", "workspace": "research", "settings": {"cc": ["bob"]}},
              {"name": "bob", "workspace": "ops"}]}"#,
    )
    .expect("config");
    let controller =
        support::local_leader(&log, "e2e", &prefix, &root, Some(agents), None, &shutdown);
    eventually("the agents configured", async || {
        log.read_type("agent.configured", 0, 10)
            .await
            .expect("r")
            .len()
            == 2
    })
    .await;

    // A user writes in Slack.
    let body = json!({
        "type": "event_callback", "team_id": "T1", "event_id": "EvE2E1", "event_time": 1,
        "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "app_mention", "user": "U1", "channel": "C1",
                  "text": "<@UAPP> @alice what's the status?", "ts": "1700000000.000100"},
    });
    assert_eq!(gateway.slack_event(&body).await, 200);

    // alice answers and cc's bob; bob answers; both posted in the thread.
    eventually("two replies posted to Slack", async || {
        gateway.posted().len() >= 2
    })
    .await;
    let posted = gateway.posted();
    let texts: Vec<&str> = posted.iter().filter_map(|p| p["text"].as_str()).collect();
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("alice got: ") && t.contains("(cc @bob)")),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t.starts_with("bob got: alice got:")),
        "{texts:?}"
    );
    for p in &posted {
        assert_eq!(p["channel"], "C1");
        assert_eq!(p["thread_ts"], "1700000000.000100", "in the user's thread");
    }
    eventually("both deliveries recorded", async || {
        log.read_type("reply.delivered", 0, 10)
            .await
            .expect("r")
            .len()
            == 2
    })
    .await;

    // explain: bob's reply leads back to the Slack event through alice's mention.
    let replies = log.read_type("agent.replied", 0, 10).await.expect("r");
    let bob = replies
        .iter()
        .find(|e| e.decode::<AgentReplied>().is_ok_and(|r| r.agent == "bob"))
        .expect("bob replied");
    let chain: Vec<String> = log
        .causation_chain(bob.id)
        .await
        .expect("chain")
        .iter()
        .map(|e| e.event_type.clone())
        .collect();
    assert_eq!(
        chain,
        [
            "slack.event_received",
            "message.received",
            "message.routed",
            "agent.mentioned",
            "message.routed",
            "agent.replied"
        ],
        "why did bob say that?"
    );
    // Every turn reported its end, answering its own routing (echo calls no model: 0
    // tokens).
    eventually("every routed turn completed", async || {
        let routed = log.read_type("message.routed", 0, 100).await.expect("r");
        let completed = log
            .read_type("agent.turn_completed", 0, 100)
            .await
            .expect("r");
        completed.len() == routed.len()
    })
    .await;
    let routings = log.read_type("message.routed", 0, 100).await.expect("r");
    for completed in log
        .read_type("agent.turn_completed", 0, 100)
        .await
        .expect("r")
    {
        let c = completed.decode::<AgentTurnCompleted>().expect("decode");
        let routing = routings
            .iter()
            .find(|r| r.id == c.routing_id)
            .expect("it answers a routing");
        assert_eq!(routing.payload["agent"], c.agent.as_str());
        assert_eq!(c.usage.model_calls, 0);
    }
    let started = log
        .read_type("workspace.start_requested", 0, 10)
        .await
        .expect("r");
    assert_eq!(started.len(), 2, "each workspace started once");

    shutdown.cancel();
    controller.await.expect("join").expect("controller");
    gateway.delivery.await.expect("join").expect("replies");
    // The runtimes were stopped with the control plane.
    eventually("the runtimes stopped", async || {
        !std::fs::read_dir(root.join("workspaces"))
            .expect("dir")
            .flatten()
            .any(|d| d.path().join("runtime.pid").exists())
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("nats"));
    let ns = Namespace::new(&prefix);
    support::remove(&js, &ns, &["research", "ops"]).await;
}

/// A file attached to a Slack message: the gateway downloads it with the bot token, the
/// control plane serves it to the workspace the message was routed to (and to no other),
/// the runtime saves it in that workspace's directory and names it in the agent's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_attached_in_slack_is_saved_in_the_agents_workspace_and_named_in_its_message() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!(
        "e2f{}x{}",
        std::process::id(),
        chrono::Utc::now().timestamp_subsec_nanos()
    );
    let root = std::env::temp_dir().join(format!("warren-e2e-{prefix}"));
    std::fs::create_dir_all(&root).expect("root");
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(&db, &shutdown).await;
    let agents = root.join("agents.json");
    std::fs::write(
        &agents,
        r#"{"agents": [{"name": "alice", "workspace": "research"},
                       {"name": "bob", "workspace": "ops"}]}"#,
    )
    .expect("config");
    let controller =
        support::local_leader(&log, "e2f", &prefix, &root, Some(agents), None, &shutdown);
    eventually("the agents configured", async || {
        log.read_type("agent.configured", 0, 10)
            .await
            .expect("r")
            .len()
            == 2
    })
    .await;

    // A user shares a CSV and a file whose name tries to leave the directory.
    let path = "T1-F0CSV/download/q3.csv";
    let body = json!({
        "type": "event_callback", "team_id": "T1", "event_id": "EvFiles1", "event_time": 1,
        "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "message", "subtype": "file_share", "user": "U1", "channel": "C1",
                  "text": "@alice please check the numbers", "ts": "1700000000.000300",
                  "files": [
                    {"id": "F0CSV", "name": "q3.csv", "mimetype": "text/csv", "size": 40,
                     "url_private": format!("{}T1-F0CSV/q3.csv", gateway.files_url),
                     "url_private_download": format!("{}{path}", gateway.files_url)},
                    {"id": "F0ESC", "name": "../../../etc/cron.d/x", "mimetype": "text/plain",
                     "url_private_download": format!("{}T1-F0ESC/download/x", gateway.files_url)},
                    {"id": "F0LARGE", "name": "large.log", "mimetype": "text/plain",
                     "url_private_download": format!("{}T1-F0LARGE/large.log", gateway.files_url)}
                  ]},
    });
    assert_eq!(gateway.slack_event(&body).await, 200);

    eventually("alice's reply posted", async || {
        !gateway.posted().is_empty()
    })
    .await;
    let reply = gateway.posted()[0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let message = log.read_type("message.received", 0, 10).await.expect("r")[0].id;
    let saved = format!(".warren-files/{message}/q3.csv");
    assert!(
        reply.contains(&format!("- {saved} (text/csv, ")),
        "the agent's message names the file: {reply}"
    );
    let workspace = root.join("workspaces/research");
    assert_eq!(
        std::fs::read_to_string(workspace.join(&saved)).expect("saved in the workspace"),
        support::slack::file_content(path)
    );
    // The escaping name was saved as `x`, inside the message's directory.
    assert_eq!(
        std::fs::read_to_string(workspace.join(format!(".warren-files/{message}/x")))
            .expect("saved inside"),
        support::slack::file_content("T1-F0ESC/download/x")
    );
    assert!(!root.join("etc").exists() && !workspace.join("etc").exists());
    // A file of several slices arrives whole.
    let large = support::slack::file_content("T1-F0LARGE/large.log");
    assert!(large.len() as u64 > 2 * warren_schema::nats::FileQuery::SLICE);
    assert_eq!(
        std::fs::read_to_string(workspace.join(format!(".warren-files/{message}/large.log")))
            .expect("saved"),
        large
    );
    // The log says what became of each file, caused by the message.
    let stored = log
        .read_type("message.file_stored", 0, 10)
        .await
        .expect("r");
    assert_eq!(stored.len(), 3);
    assert!(
        stored
            .iter()
            .all(|e| e.metadata.causation_id == Some(message))
    );

    // Another workspace asking for that file, for the routing it saw, is refused.
    let routing = log.read_type("message.routed", 0, 10).await.expect("r")[0].id;
    let client = async_nats::connect(nats_url.clone()).await.expect("nats");
    let ns = Namespace::new(&prefix);
    let query = serde_json::to_vec(&warren_schema::nats::FileQuery {
        routing_id: routing,
        file_id: "F0CSV".into(),
        offset: 0,
    })
    .expect("json");
    let answer = client
        .request(ns.files_subject("ops"), query.into())
        .await
        .expect("answered");
    let answer: warren_schema::nats::FileAnswer =
        serde_json::from_slice(&answer.payload).expect("an answer");
    assert_eq!(
        answer,
        warren_schema::nats::FileAnswer::Refused {
            reason: "the message was routed to workspace research, not ops".into()
        }
    );
    assert!(!root.join("workspaces/ops/.warren-files").exists());

    shutdown.cancel();
    controller.await.expect("join").expect("controller");
    let js = async_nats::jetstream::new(client);
    support::remove(&js, &ns, &["research", "ops"]).await;
}
