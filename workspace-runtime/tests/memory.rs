//! Shared memory on a real NATS server, recorded in a real PostgreSQL log by the control
//! plane: revision-checked updates refuse a blind overwrite, every value names who wrote
//! it, and a wiped bucket is restored from the log with the same contents.

use std::collections::BTreeMap;
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_control_plane::controller::{self, ControllerConfig, NatsConfig};
use warren_control_plane::decide::Policy;
use warren_control_plane::delivery::memory::restore;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;
use warren_workspace_runtime::memory::{Memory, MemoryError, Stored};

async fn contents(memory: &Memory) -> BTreeMap<String, Stored> {
    let mut out = BTreeMap::new();
    for key in memory.list().await.expect("list") {
        let entry = memory
            .get(&key)
            .await
            .expect("get")
            .expect("listed key has a value");
        out.insert(key, entry.stored);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_revision_checked_attributed_and_restorable_from_the_log() {
    let db = TestDatabase::new().await;
    let log = db.log();
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("mem{}x{}", std::process::id(), chrono_free_nanos());
    let ns = Namespace::new(&prefix);
    // The control plane records the writes (its outbox consumer) of the agents it knows.
    let dir = std::env::temp_dir().join(format!("warren-memory-{prefix}"));
    std::fs::create_dir_all(&dir).expect("dir");
    let agents = dir.join("agents.json");
    std::fs::write(
        &agents,
        r#"{"agents": [{"name": "alice", "workspace": "research"},
                       {"name": "bob", "workspace": "ops"}]}"#,
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let controller = tokio::spawn(controller::run(
        log.clone(),
        ControllerConfig {
            holder: "mem".into(),
            lease_ttl: Duration::from_secs(5),
            tick: Duration::from_millis(200),
            policy: Policy::default(),
            config_file: Some(agents),
            backend: None,
            nats: Some(NatsConfig {
                url: url.clone(),
                namespace: ns.clone(),
                credentials: None,
            }),
        },
        shutdown.clone(),
    ));
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("nats"));
    // The streams are the control plane's; here they may not exist yet when we write.
    support::streams(&js, &ns).await;
    let bucket = ns.shared_bucket();
    let alice = Memory::open(js.clone(), ns.clone(), &bucket, "research", "alice")
        .await
        .expect("open");
    let bob = Memory::open(js.clone(), ns.clone(), &bucket, "ops", "bob")
        .await
        .expect("open");

    let r1 = alice.put("plan", json!({"step": 1})).await.expect("put");
    alice.put("draft", json!("v1")).await.expect("put");
    // bob read revision r1 and updates: fine. alice, still holding r1, is refused.
    let r2 = bob
        .update("plan", json!({"step": 2}), r1)
        .await
        .expect("update");
    assert!(r2 > r1);
    let err = alice
        .update("plan", json!({"step": "alice's"}), r1)
        .await
        .expect_err("stale revision");
    assert!(matches!(err, MemoryError::Conflict { .. }), "{err}");
    let err = alice.update("plan", json!(0), 0).await.expect_err("exists");
    assert!(matches!(err, MemoryError::Conflict { .. }), "{err}");
    // Shared writes are made by the control plane, with the provenance it knows: research
    // cannot write in the name of bob, who lives in ops.
    let impostor = Memory::open(js.clone(), ns.clone(), &bucket, "research", "bob")
        .await
        .expect("open");
    let err = impostor
        .put("plan", json!("research's bob"))
        .await
        .expect_err("bob does not live in research");
    assert!(matches!(err, MemoryError::Refused(_)), "{err}");
    bob.delete("draft").await.expect("delete");
    bob.update("notes", json!(["a", "b"]), 0)
        .await
        .expect("create");

    let plan = alice.get("plan").await.expect("get").expect("plan");
    assert_eq!(plan.stored.value, json!({"step": 2}));
    assert_eq!(
        (plan.stored.agent.as_str(), plan.stored.workspace.as_str()),
        ("bob", "ops")
    );
    assert!(alice.get("draft").await.expect("get").is_none(), "deleted");
    let before = contents(&alice).await;
    assert_eq!(before.keys().collect::<Vec<_>>(), ["notes", "plan"]);

    // Five successful writes, each recorded once in the log.
    let deadline = Instant::now() + Duration::from_secs(15);
    while log
        .read_type("memory.written", 0, 100)
        .await
        .expect("r")
        .len()
        < 5
    {
        assert!(Instant::now() < deadline, "the writes were not recorded");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        log.read_type("memory.written", 0, 100)
            .await
            .expect("r")
            .len(),
        5
    );

    // The NATS store loses the bucket; it is re-seeded from the log.
    js.delete_key_value(&bucket).await.expect("wipe");
    let restored = restore(&js, &ns, &log, &bucket).await.expect("restore");
    assert_eq!(restored, 2);
    let fresh = Memory::open(js.clone(), ns.clone(), &bucket, "research", "alice")
        .await
        .expect("reopen");
    assert_eq!(
        contents(&fresh).await,
        before,
        "same keys, values and writers"
    );

    shutdown.cancel();
    controller.await.expect("join").expect("controller");
    let _ = js.delete_key_value(&bucket).await;
    let _ = js.delete_stream(ns.inbox_stream()).await;
    let _ = js.delete_stream(ns.outbox_stream()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn chrono_free_nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
