//! High availability: two replicas; the leader is killed (its task aborted mid-work, lease
//! not released) again and again during a burst of messages. The standby takes over within
//! the lease TTL; every message is routed exactly once; the workspace is started once, by
//! the kubernetes backend against the real API server `scripts/test` starts (a simulating
//! test kubelet makes its pods Ready): one pod, never a twin, adopted by each new leader.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warren_control_plane::backend::BackendConfig;
use warren_control_plane::backend::kubernetes::KubernetesConfig;
use warren_control_plane::controller::{self, ControllerConfig, LEASE};
use warren_control_plane::decide::Policy;
use warren_schema::events::*;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};
use warren_test_kubelet::testenv;
use warren_test_kubelet::{Kubelet, KubeletConfig, Mode};

const MESSAGES: usize = 300;
const KILLS: usize = 4;

fn replica(
    log: &EventLog,
    name: &str,
    file: &std::path::Path,
    instance: &str,
) -> tokio::task::JoinHandle<()> {
    let mut kubernetes = KubernetesConfig::new(testenv::NAMESPACE, "nats://127.0.0.1:1");
    kubernetes.kubeconfig = Some(testenv::control_plane_kubeconfig());
    kubernetes.template.instance = instance.to_owned();
    let config = ControllerConfig {
        holder: name.into(),
        lease_ttl: Duration::from_secs(2),
        tick: Duration::from_millis(50),
        policy: Policy::default(),
        config_file: Some(file.to_owned()),
        backend: Some(BackendConfig::from(kubernetes)),
        nats: None,
    };
    let log = log.clone();
    let name = name.to_owned();
    tokio::spawn(async move {
        // Killed by abort, never by cancellation: no lease release, no clean shutdown. A
        // replica that stops by itself is a failure of its own: say why.
        if let Err(e) = controller::run(log, config, CancellationToken::new()).await {
            eprintln!("replica {name} stopped: {e}");
        }
    })
}

async fn holder(log: &EventLog) -> Option<(String, i64)> {
    sqlx::query_as("SELECT holder, fence FROM leases WHERE name = $1 AND expires_at > now()")
        .bind(LEASE)
        .fetch_optional(log.pool())
        .await
        .expect("lease")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_repeatedly_loses_and_doubles_nothing() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let dir = std::env::temp_dir().join(format!("warren-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "alice", "workspace": "research"}]}"#,
    )
    .expect("config");
    let instance = testenv::instance("failover");
    let mut kubelet_config = KubeletConfig::new(testenv::NAMESPACE, &dir, Mode::Simulate);
    kubelet_config.selector = Some(testenv::selector(&instance));
    let kubelet = Kubelet::start(testenv::admin().await, kubelet_config);

    let mut replicas = vec![
        ("r0".to_owned(), replica(&log, "r0", &file, &instance)),
        ("r1".to_owned(), replica(&log, "r1", &file, &instance)),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    while log
        .read_type("agent.configured", 0, 1)
        .await
        .expect("r")
        .is_empty()
    {
        assert!(Instant::now() < deadline, "no leader configured the agents");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The burst, in the background, while leaders are killed.
    let burst = tokio::spawn({
        let log = log.clone();
        async move {
            let mut ids = Vec::new();
            for n in 0..MESSAGES {
                let id = EventId::random();
                let message = MessageReceived {
                    origin: Origin::Slack {
                        team_id: "T1".into(),
                        channel: "C1".into(),
                        thread_ts: "1.0".into(),
                        ts: format!("{n}.0"),
                        user: "U1".into(),
                    },
                    text: format!("@alice {n}"),
                    addressed_agents: vec!["alice".into()],
                    files: vec![],
                };
                let e = NewEvent::from_domain(id, &message, Metadata::new("test")).expect("e");
                log.append(&AppendRequest::new("slack:T1:C1", vec![e]))
                    .await
                    .expect("append");
                ids.push(id);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ids
        }
    });

    let mut takeovers = Vec::new();
    for kill in 0..KILLS {
        let (leader, fence) = loop {
            if let Some(h) = holder(&log).await {
                break h;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        // Let the leader work a little, then kill it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let i = replicas
            .iter()
            .position(|(n, _)| *n == leader)
            .expect("leader is ours");
        let (_, task) = replicas.remove(i);
        task.abort();
        let killed = Instant::now();
        let name = format!("r{}", kill + 2);
        replicas.push((name.clone(), replica(&log, &name, &file, &instance)));
        // The standby takes over: a new fence holds the lease.
        loop {
            if let Some((_, f)) = holder(&log).await
                && f > fence
            {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(15),
                "no takeover within 15 s of killing {leader}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        takeovers.push(killed.elapsed());
    }

    let ids = burst.await.expect("burst");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let routed = log.read_type("message.routed", 0, 10_000).await.expect("r");
        if routed.len() >= MESSAGES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {MESSAGES} messages routed",
            routed.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let routed = log.read_type("message.routed", 0, 10_000).await.expect("r");
    let mut routed_ids: Vec<EventId> = routed
        .iter()
        .map(|e| e.decode::<MessageRouted>().expect("d").message_id)
        .collect();
    routed_ids.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(routed_ids, expected, "every message routed exactly once");
    let starts = log
        .read_type("workspace.start_requested", 0, 100)
        .await
        .expect("r");
    assert_eq!(starts.len(), 1, "the workspace was started once");
    // Its pod: made once and Ready, whichever leader made it; each later leader adopted it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = log
            .read_type("workspace.observed", 0, 1000)
            .await
            .expect("r")
            .iter()
            .filter_map(|e| e.decode::<WorkspaceObserved>().ok())
            .any(|o| o.phase == WorkspacePhase::Ready);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workspace's pod never became Ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pods = testenv::pods(&instance).await;
    assert_eq!(pods.len(), 1, "one pod: {pods:?}");
    assert_eq!(kubelet.pods_taken_on(), 1, "no pod was ever made twice");
    for (_, task) in replicas {
        task.abort();
    }
    drop(kubelet);
    testenv::clean_up(&instance).await;
    eprintln!("takeovers after a kill: {takeovers:?}");
}
