//! The admin API changes a running Warren, with real PostgreSQL and NATS, the real gateway
//! and the real runtime binary: an agent and a webhook endpoint created through the API
//! answer a signed delivery, with no restart of anything; a rotated secret takes over.

mod support;

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use support::eventually;
use support::slack::Gateway;
use tokio_util::sync::CancellationToken;
use warren_control_plane::admin_api::{self, Role};
use warren_control_plane::controller::NatsConfig;
use warren_control_plane::decide::Policy;
use warren_schema::events::*;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;

fn signature(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(body.as_bytes());
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver(gateway: &str, secret: &str, body: &str) -> reqwest::StatusCode {
    reqwest::Client::new()
        .post(format!("{gateway}/webhooks/ci"))
        .header("content-type", "application/json")
        .header("x-signature-256", signature(secret, body))
        .header("x-delivery", hex::encode(Sha256::digest(body.as_bytes())))
        .body(body.to_owned())
        .send()
        .await
        .expect("the gateway answers")
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_and_endpoint_created_through_the_api_answer_a_webhook_without_a_restart() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let nats_url = support::nats_url();
    let prefix = format!(
        "api{}x{}",
        std::process::id(),
        chrono::Utc::now().timestamp_subsec_nanos()
    );
    let root = std::env::temp_dir().join(format!("warren-api-{prefix}"));
    std::fs::create_dir_all(&root).expect("root");
    let shutdown = CancellationToken::new();
    let gateway = Gateway::start(&db, &shutdown).await;

    // The control plane: the leader with no agents at all, and the admin API.
    let controller = support::local_leader(&log, "api-e2e", &prefix, &root, None, None, &shutdown);
    let api_url = admin_api::serve_on_loopback(
        log.clone(),
        admin_api::Settings {
            policy: Policy::default(),
            nats: Some(NatsConfig {
                url: nats_url.clone(),
                namespace: Namespace::new(&prefix),
                credentials: None,
            }),
        },
        shutdown.clone(),
    )
    .await
    .expect("served");
    let (_, token) = admin_api::tokens::issue_direct(&log, "ops", Role::Admin, None, "test")
        .await
        .expect("a token");
    let http = reqwest::Client::new();
    let api = |method: reqwest::Method, path: &str| {
        http.request(method, format!("{api_url}{path}"))
            .bearer_auth(token.expose())
    };
    eventually("the API accepts the token", async || {
        api(reqwest::Method::GET, "/v1/agents")
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;

    // An agent and its endpoint, through the API.
    let created = api(reqwest::Method::POST, "/v1/agents")
        .json(&json!({"name": "alice", "workspace": "research"}))
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let endpoint: Value = api(reqwest::Method::POST, "/v1/endpoints")
        .json(
            &json!({"name": "ci", "scheme": "hmac_sha256", "agent": "alice",
                      "delivery_header": "x-delivery"}),
        )
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("endpoint");
    let secret = endpoint["secret"]
        .as_str()
        .expect("the secret, once")
        .to_owned();
    let listed: Value = api(reqwest::Method::GET, "/v1/endpoints")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert!(
        !listed.to_string().contains(&secret),
        "never listed: {listed}"
    );
    let stored: Vec<warren_schema::RecordedEvent> =
        log.read_positions(0, i64::MAX, 1000).await.expect("log");
    assert!(
        stored
            .iter()
            .all(|e| !e.payload.to_string().contains(&secret)),
        "the secret is not in the log"
    );

    // The gateway picks the endpoint up without a restart; the agent answers.
    let body = r#"{"build": 1, "status": "failed"}"#;
    eventually("the gateway accepting the new endpoint", async || {
        deliver(&gateway.url, &secret, body).await == 200
    })
    .await;
    eventually("alice's answer recorded", async || {
        log.read_type(AgentReplied::TYPE, 0, 10)
            .await
            .expect("r")
            .iter()
            .any(|e| {
                e.decode::<AgentReplied>()
                    .is_ok_and(|r| r.agent == "alice" && r.text.contains("failed"))
            })
    })
    .await;

    // Restarted through the API: a new process, the old one gone.
    let ready_instances = async || -> Vec<String> {
        log.read_type(WorkspaceObserved::TYPE, 0, 100)
            .await
            .expect("r")
            .iter()
            .filter_map(|e| e.decode::<WorkspaceObserved>().ok())
            .filter(|o| o.phase == WorkspacePhase::Ready)
            .filter_map(|o| o.instance)
            .collect()
    };
    eventually("research ready", async || {
        !ready_instances().await.is_empty()
    })
    .await;
    let first = ready_instances().await[0].clone();
    let restart = api(reqwest::Method::POST, "/v1/workspaces/research/restart")
        .send()
        .await
        .expect("restart");
    assert_eq!(restart.status(), 202);
    eventually("a new process, ready", async || {
        ready_instances().await.iter().any(|i| *i != first)
    })
    .await;
    let starts: Vec<String> = log
        .read_type(WorkspaceStartRequested::TYPE, 0, 10)
        .await
        .expect("r")
        .iter()
        .filter_map(|e| e.decode::<WorkspaceStartRequested>().ok())
        .map(|s| s.reason)
        .collect();
    assert_eq!(starts, ["message_waiting", "restart"]);

    // Rotated with no grace: the old secret is refused, the new one accepted.
    let rotated: Value = api(reqwest::Method::POST, "/v1/endpoints/ci/rotate")
        .json(&json!({"grace_secs": 0}))
        .send()
        .await
        .expect("rotate")
        .json()
        .await
        .expect("json");
    let new_secret = rotated["secret"].as_str().expect("a new secret").to_owned();
    assert_ne!(new_secret, secret);
    assert_ne!(
        rotated["secret_fingerprint"],
        endpoint["secret_fingerprint"]
    );
    let body = r#"{"build": 2, "status": "failed"}"#;
    eventually("the old secret refused", async || {
        deliver(&gateway.url, &secret, body).await == 401
    })
    .await;
    assert_eq!(deliver(&gateway.url, &new_secret, body).await, 200);

    // Deleted: deliveries are for no endpoint.
    let deleted = api(reqwest::Method::DELETE, "/v1/endpoints/ci")
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    eventually("deliveries refused after the delete", async || {
        deliver(&gateway.url, &new_secret, r#"{"build": 3, "x": 0}"#).await == 404
    })
    .await;

    // Memory lost in NATS comes back from the log, through the API.
    let write = warren_schema::NewEvent::from_domain(
        warren_schema::EventId::random(),
        &MemoryWritten {
            bucket: Namespace::new(&prefix).workspace_bucket("research"),
            key: "last-build".into(),
            value: Some(json!({"status": "failed"})),
            revision: 1,
            workspace: "research".into(),
            agent: "alice".into(),
        },
        warren_schema::Metadata::new("test"),
    )
    .expect("event");
    log.append(&warren_schema::AppendRequest::new(
        "memory:research",
        vec![write],
    ))
    .await
    .expect("append");
    let restored = api(reqwest::Method::POST, "/v1/memory/restore")
        .json(&json!({"workspace": "research"}))
        .send()
        .await
        .expect("restore");
    assert_eq!(restored.status(), 200);
    let restored: Value = restored.json().await.expect("json");
    assert_eq!(restored["keys"], 1, "{restored}");
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await.expect("nats"));
    let kv = js
        .get_key_value(Namespace::new(&prefix).workspace_bucket("research"))
        .await
        .expect("the bucket");
    let value = kv.get("last-build").await.expect("get").expect("restored");
    let stored: Value = serde_json::from_slice(&value).expect("json");
    assert_eq!(stored["value"], json!({"status": "failed"}), "{stored}");
    assert_eq!(
        stored["agent"], "alice",
        "the writer, as the log recorded it"
    );
    assert_eq!(
        log.read_type(MemoryRestored::TYPE, 0, 10)
            .await
            .expect("r")
            .len(),
        1,
        "the restore is recorded"
    );

    shutdown.cancel();
    controller.await.expect("join").expect("controller");
    let ns = Namespace::new(&prefix);
    let _ = js.delete_stream(ns.inbox_stream()).await;
    let _ = js.delete_stream(ns.outbox_stream()).await;
    for bucket in [ns.workspace_bucket("research"), ns.shared_bucket()] {
        let _ = js.delete_key_value(bucket).await;
    }
}
