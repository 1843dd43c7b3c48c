//! The kubernetes backend end to end, against the real API server `scripts/test` starts
//! (RBAC: the control plane runs as its own identity under the Role deploy/ ships; Pod
//! Security `restricted` enforced), the test kubelet running each pod's container with
//! this build's runtime, and real PostgreSQL and NATS.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::eventually;
use support::kube as k;
use support::slack::Gateway;
use tokio_util::sync::CancellationToken;
use warren_control_plane::backend::BackendConfig;
use warren_control_plane::controller::{self, ControllerConfig, NatsConfig};
use warren_control_plane::decide::Policy;
use warren_schema::EventLog;
use warren_schema::events::*;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;
use warren_test_kubelet::testenv;

/// Waits until `n` agents are configured (a message to an agent not yet configured is
/// recorded and routed nowhere).
async fn configured(log: &EventLog, n: usize) {
    eventually("the agents configured", async || {
        log.read_type("agent.configured", 0, 1000)
            .await
            .expect("read")
            .len()
            >= n
    })
    .await;
}

fn mention(event_id: &str, ts: &str, text: &str) -> serde_json::Value {
    json!({
        "type": "event_callback", "team_id": "T1", "event_id": event_id, "event_time": 1,
        "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "app_mention", "user": "U1", "channel": "C1",
                  "text": format!("<@UAPP> {text}"), "ts": ts},
    })
}

/// One test's installation: its database, its own instance name and NATS prefix, the
/// gateway with its Slack server, and a test kubelet for its pods.
struct Setup {
    /// Held for the test's life (dropping it drops the database).
    _db: TestDatabase,
    log: EventLog,
    instance: String,
    prefix: String,
    root: std::path::PathBuf,
    gateway: Gateway,
    kubelet: warren_test_kubelet::Kubelet,
    /// Stops the gateway (and the controllers started with it).
    shutdown: CancellationToken,
}

impl Setup {
    async fn start(test: &str) -> Self {
        let instance = testenv::instance(test);
        let prefix = instance.replace('-', "x");
        let root = std::env::temp_dir().join(format!("warren-{instance}"));
        std::fs::create_dir_all(&root).expect("root");
        let db = TestDatabase::new().await;
        let shutdown = CancellationToken::new();
        let gateway = Gateway::start(&db, &shutdown).await;
        let kubelet = k::kubelet(&instance, &root).await;
        Self {
            log: db.log(),
            _db: db,
            instance,
            prefix,
            root,
            gateway,
            kubelet,
            shutdown,
        }
    }

    fn agents(&self, json: &str) -> std::path::PathBuf {
        let path = self.root.join("agents.json");
        std::fs::write(&path, json).expect("agents");
        path
    }

    /// A controller running the kubernetes backend for this installation, until `stop`.
    fn controller(
        &self,
        holder: &str,
        agents: &Path,
        policy: Policy,
        stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<warren_control_plane::error::Result<()>> {
        let nats_url = support::nats_url();
        tokio::spawn(controller::run(
            self.log.clone(),
            ControllerConfig {
                holder: holder.into(),
                lease_ttl: Duration::from_secs(5),
                tick: Duration::from_millis(100),
                policy,
                config_file: Some(agents.to_owned()),
                backend: Some(BackendConfig::from(k::backend_config(
                    &self.instance,
                    &nats_url,
                    &self.prefix,
                ))),
                nats: Some(NatsConfig {
                    url: nats_url,
                    namespace: Namespace::new(&self.prefix),
                    credentials: None,
                }),
            },
            stop.clone(),
        ))
    }

    /// Stops the controller `leader` and the gateway, and removes what the test left.
    async fn finish(
        self,
        leader: tokio::task::JoinHandle<warren_control_plane::error::Result<()>>,
        workspaces: &[&str],
    ) {
        self.shutdown.cancel();
        leader.await.expect("join").expect("controller");
        drop(self.kubelet);
        testenv::clean_up(&self.instance).await;
        let js = async_nats::jetstream::new(
            async_nats::connect(support::nats_url())
                .await
                .expect("nats"),
        );
        support::remove(&js, &Namespace::new(&self.prefix), workspaces).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_message_is_answered_by_an_agent_in_a_pod() {
    // Spans go to a local OTLP receiver (the only test here that installs telemetry). The
    // filter is the exporter's too: the gateway's and the control plane's info spans.
    let (otlp, spans) = support::otlp_receiver().await;
    let telemetry = warren_telemetry::Telemetry::init(
        "warren-kubernetes-test",
        &warren_telemetry::TelemetryOptions {
            log_format: warren_telemetry::LogFormat::Text,
            log_filter: Some("warn,warren_gateway=info,warren_control_plane=info".into()),
            otlp_endpoint: Some(otlp),
        },
    )
    .expect("telemetry");
    let s = Setup::start("e2e").await;
    let log = s.log.clone();
    let gateway = &s.gateway;
    let agents = s.agents(r#"{"agents": [{"name": "alice", "workspace": "research"}]}"#);
    let control_plane = s.controller("cp-a", &agents, Policy::default(), &s.shutdown);
    configured(&log, 1).await;

    assert_eq!(
        gateway
            .slack_event(&mention("EvK1", "1700000000.000100", "@alice status?"))
            .await,
        200
    );
    eventually("alice's reply in the thread", async || {
        gateway.posted().iter().any(|p| {
            p["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("alice got: "))
        })
    })
    .await;
    let posted = gateway.posted();
    assert_eq!(posted[0]["channel"], "C1");
    assert_eq!(posted[0]["thread_ts"], "1700000000.000100");

    // The pod carries the decision that made it, as kubectl shows it.
    let decision = log
        .read_type("workspace.start_requested", 0, 10)
        .await
        .expect("read")
        .first()
        .expect("a start decision")
        .id;
    let pod_name = format!("{}-research", s.instance);
    let yaml = tokio::process::Command::new("kubectl")
        .args([
            "get",
            "pod",
            &pod_name,
            "-n",
            testenv::NAMESPACE,
            "-o",
            "yaml",
        ])
        .output()
        .await
        .expect("kubectl");
    let yaml = String::from_utf8_lossy(&yaml.stdout);
    assert!(
        yaml.contains(&format!("warren.dev/decision: {decision}")),
        "{yaml}"
    );
    // explain leads from the decision to the pod.
    let why = warren_control_plane::explain::workspace(&log, "research")
        .await
        .expect("explain");
    let types: Vec<&str> = why.iter().map(|e| e.event_type.as_str()).collect();
    let at = |t: &str| types.iter().position(|x| *x == t);
    assert!(
        at("message.received").is_some()
            && at("message.received") < at("workspace.start_requested"),
        "the message, then the decision: {types:?}"
    );
    let ready = why
        .iter()
        .filter_map(|e| e.decode::<WorkspaceObserved>().ok())
        .find(|o| o.phase == WorkspacePhase::Ready)
        .expect("the pod's readiness in explain");
    assert!(
        ready
            .instance
            .as_deref()
            .is_some_and(|i| i.starts_with(&format!("{pod_name}/"))),
        "{ready:?}"
    );
    assert_eq!(ready.backend, "kubernetes");

    // One trace from the Slack request to the pod: the message carries the gateway
    // request's trace, and deciding on it, starting the workspace and each API call of
    // that start are spans in it.
    let message = log
        .read_type("message.received", 0, 1)
        .await
        .expect("read")
        .pop()
        .expect("the message");
    let trace = message
        .metadata
        .traceparent
        .as_deref()
        .and_then(|t| t.split('-').nth(1))
        .expect("the message's trace")
        .to_owned();
    s.finish(control_plane, &["research"]).await;

    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .expect("flush");
    let in_trace: Vec<String> = spans
        .lock()
        .expect("lock")
        .iter()
        .filter(|span| span.trace_id == trace)
        .map(|span| span.name.clone())
        .collect();
    for name in ["decide", "reconcile.start", "kubernetes.api"] {
        assert!(
            in_trace.iter().any(|n| n == name),
            "no {name} span in the message's trace: {in_trace:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_adopts_its_pods_and_deletes_orphans() {
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
    use kube::api::{Api, Patch, PatchParams};
    use warren_control_plane::backend::kubernetes::objects::{self, PodTemplate};
    use warren_schema::launch::{LaunchContract, NatsLaunch};
    let s = Setup::start("adopt").await;
    let log = s.log.clone();
    let (gateway, kubelet) = (&s.gateway, &s.kubelet);
    let agents = s.agents(r#"{"agents": [{"name": "alice", "workspace": "research"}]}"#);
    let first = CancellationToken::new();
    let leader = s.controller("cp-a", &agents, Policy::default(), &first);
    configured(&log, 1).await;
    gateway
        .slack_event(&mention("EvA1", "1700000000.000100", "@alice one"))
        .await;
    eventually("the first reply", async || gateway.posted().len() == 1).await;
    let pod = testenv::pods(&s.instance).await.pop().expect("alice's pod");
    let uid = pod.metadata.uid.clone().expect("uid");
    let pid = kubelet.pid(&uid).expect("the kubelet runs it");

    // The leader goes away: its pods stay.
    first.cancel();
    leader.await.expect("join").expect("controller");
    assert_eq!(
        testenv::pods(&s.instance).await.len(),
        1,
        "the pod outlives the leader"
    );

    // Meanwhile someone leaves pods no decision explains (workspaces of their own, with
    // their Secrets, as a crashed control plane of another log might have): one that runs,
    // and one that has ended already (its launch contract is garbage), which stays in the
    // API until someone deletes it.
    let admin = testenv::admin().await;
    let anchor = Api::<ConfigMap>::namespaced(admin.clone(), testenv::NAMESPACE)
        .get(&format!("{}-workspaces", s.instance))
        .await
        .expect("the installation's anchor");
    let owner = objects::owner_reference(&anchor);
    let template = k::backend_config(&s.instance, "nats://unused", &s.prefix).template;
    let strays = ["stray", "ended"];
    for workspace in strays {
        let launch = match workspace {
            "stray" => LaunchContract::new(
                workspace,
                PodTemplate::workspace_dir(),
                NatsLaunch::new(support::nats_url(), &s.prefix),
            )
            .to_json(),
            _ => "not a launch contract".to_owned(),
        };
        let secret = template.secret(
            workspace,
            [(objects::LAUNCH_KEY.to_owned(), launch)].into(),
            &owner,
        );
        let name = format!("{}-{workspace}", s.instance);
        let apply = PatchParams::apply("someone");
        Api::<Secret>::namespaced(admin.clone(), testenv::NAMESPACE)
            .patch(&name, &apply, &Patch::Apply(&secret))
            .await
            .expect("a stray pod's Secret");
        let pod = template.pod(workspace, None, &[], &Default::default(), &owner);
        Api::<Pod>::namespaced(admin.clone(), testenv::NAMESPACE)
            .patch(&name, &apply, &Patch::Apply(&pod))
            .await
            .expect("a stray pod");
    }
    let ended = format!("{}-ended", s.instance);
    eventually("the second stray pod ended", async || {
        testenv::pods(&s.instance).await.iter().any(|p| {
            p.metadata.name.as_deref() == Some(ended.as_str())
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
        })
    })
    .await;

    // A new leader adopts the pod (same instance, same process) and deletes the strays,
    // running or ended.
    let leader = s.controller("cp-b", &agents, Policy::default(), &s.shutdown);
    eventually("the stray pods deleted, and recorded", async || {
        let recorded: Vec<String> = log
            .read_type("workspace.observed", 0, 100)
            .await
            .expect("read")
            .iter()
            .filter_map(|e| e.decode::<WorkspaceObserved>().ok())
            .filter(|o| o.detail.as_deref().is_some_and(|d| d.contains("orphan")))
            .map(|o| o.workspace)
            .collect();
        strays.iter().all(|w| recorded.iter().any(|r| r == w))
            && testenv::pods(&s.instance).await.len() == 1
    })
    .await;
    gateway
        .slack_event(&mention("EvA2", "1700000000.000200", "@alice two"))
        .await;
    eventually("the second reply", async || gateway.posted().len() == 2).await;
    let pods = testenv::pods(&s.instance).await;
    assert_eq!(pods.len(), 1);
    assert_eq!(
        pods[0].metadata.uid.as_deref(),
        Some(uid.as_str()),
        "adopted, not replaced"
    );
    assert_eq!(
        kubelet.pid(&uid),
        Some(pid),
        "the same runtime process answered"
    );
    assert_eq!(
        log.read_type("workspace.start_requested", 0, 10)
            .await
            .expect("read")
            .len(),
        1,
        "started once"
    );

    s.finish(leader, &["research"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pod_is_deleted_and_the_next_message_finds_its_files() {
    let s = Setup::start("idle").await;
    let log = s.log.clone();
    let gateway = &s.gateway;
    // The agent reads what the previous turn left in its working directory (the
    // workspace's subPath of the claim), then adds to it.
    let agents = s.agents(
        r#"{"agents": [{"name": "alice", "workspace": "research", "driver": "command",
            "idle_timeout_secs": 2,
            "settings": {"command": ["/bin/sh", "-c",
                "cat notes.txt 2>/dev/null || echo no notes; echo seen by $(id -u) >> notes.txt"]}}]}"#,
    );
    let leader = s.controller("cp-a", &agents, Policy::default(), &s.shutdown);
    configured(&log, 1).await;
    gateway
        .slack_event(&mention("EvI1", "1700000000.000100", "@alice first"))
        .await;
    eventually("the first reply", async || gateway.posted().len() == 1).await;
    assert_eq!(
        gateway.posted()[0]["text"].as_str().map(str::trim),
        Some("no notes")
    );
    let first_uid = testenv::pods(&s.instance).await[0].metadata.uid.clone();

    eventually("the idle pod deleted", async || {
        testenv::pods(&s.instance).await.is_empty()
    })
    .await;
    let notes = s
        .root
        .join("claims/warren-files/workspaces/research/notes.txt");
    assert!(notes.exists(), "the files stay on the claim");

    gateway
        .slack_event(&mention("EvI2", "1700000000.000200", "@alice again"))
        .await;
    eventually("the second reply", async || gateway.posted().len() == 2).await;
    assert_eq!(
        gateway.posted()[1]["text"].as_str().map(str::trim),
        Some("seen by 10001"),
        "the new pod found the first one's file (written as the pod's non-root user)"
    );
    let pods = testenv::pods(&s.instance).await;
    assert_ne!(pods[0].metadata.uid, first_uid, "a new pod");

    s.finish(leader, &["research"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_failure_is_recorded_with_its_reason_and_given_up_on() {
    use warren_test_kubelet::Failure;
    let s = Setup::start("fail").await;
    let log = s.log.clone();
    let (gateway, kubelet) = (&s.gateway, &s.kubelet);
    let cases = [
        ("pull", Failure::ImagePullBackOff, "ImagePullBackOff"),
        ("oom", Failure::OomKilled, "OOMKilled"),
        ("nofit", Failure::Unschedulable, "Unschedulable"),
        ("crash", Failure::CrashLoop, "CrashLoopBackOff"),
    ];
    for (workspace, failure, _) in &cases {
        kubelet.fail(&format!("{}-{workspace}", s.instance), *failure);
    }
    let agents = s.agents(
        &json!({"agents": cases.iter().map(|(w, _, _)| json!({"name": format!("a-{w}"), "workspace": w}))
            .collect::<Vec<_>>()})
        .to_string(),
    );
    let policy = Policy {
        max_restarts: 1,
        restart_backoff: chrono::TimeDelta::milliseconds(200),
        ..Policy::default()
    };
    let leader = s.controller("cp", &agents, policy, &s.shutdown);
    configured(&log, cases.len()).await;
    for (i, (workspace, _, _)) in cases.iter().enumerate() {
        gateway
            .slack_event(&mention(
                &format!("EvF{i}"),
                &format!("1700000000.00010{i}"),
                &format!("@a-{workspace} hello"),
            ))
            .await;
    }
    let given_up = tokio::time::timeout(Duration::from_secs(30), async {
        while log
            .read_type("workspace.failed", 0, 100)
            .await
            .expect("read")
            .len()
            < cases.len()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if given_up.is_err() {
        let head = log.head().await.expect("head");
        let history: Vec<String> = log
            .read_positions(0, head, 10_000)
            .await
            .expect("read")
            .iter()
            .map(|e| {
                format!(
                    "{} {}@{} {} {} {:.300}",
                    e.position,
                    e.stream,
                    e.stream_version,
                    e.event_type,
                    e.metadata.source,
                    e.payload.to_string()
                )
            })
            .collect();
        panic!(
            "not every workspace was given up on within 30 s; the log:\n{}",
            history.join("\n")
        );
    }
    let observed: Vec<WorkspaceObserved> = log
        .read_type("workspace.observed", 0, 1000)
        .await
        .expect("read")
        .iter()
        .filter_map(|e| e.decode().ok())
        .collect();
    for (workspace, _, reason) in &cases {
        let failures = observed
            .iter()
            .filter(|o| {
                o.workspace == *workspace
                    && o.phase == WorkspacePhase::Failed
                    && o.detail.as_deref().is_some_and(|d| d.starts_with(reason))
            })
            .count();
        assert_eq!(
            failures, 2,
            "{workspace}: the first run and one restart, each with its reason: {observed:#?}"
        );
        assert!(
            observed
                .iter()
                .filter_map(|o| o.detail.as_deref())
                .all(|d| !d.contains('\u{1b}')),
            "reasons are plain text, without a terminal's escape codes: {observed:#?}"
        );
    }

    s.finish(leader, &["pull", "oom", "nofit", "crash"]).await;
}

/// Waits until `backend` has observed something that `matches` of each of `workspaces`
/// (at most 30 s).
async fn observe_each(
    backend: &warren_control_plane::backend::kubernetes::KubernetesBackend,
    workspaces: &[String],
    matches: impl Fn(&warren_control_plane::backend::Observation) -> bool,
) {
    use warren_control_plane::backend::Backend;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !workspaces.iter().all(|w| seen.contains(w)) {
        let notified = backend.observed().notified();
        seen.extend(
            backend
                .drain_observations()
                .into_iter()
                .filter(|o| matches(o))
                .map(|o| o.workspace),
        );
        if !workspaces.iter().all(|w| seen.contains(w)) {
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "not observed within 30 s: {:?}",
                workspaces
                    .iter()
                    .filter(|w| !seen.contains(*w))
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// What the control plane does with its Role: connect (anchor, NetworkPolicy), follow pods,
/// start a workspace (Secret, pod), see it, stop it (pod, Secret), see it go. `Err` says
/// which step failed.
async fn start_and_stop(kubeconfig: &Path, instance: &str) -> Result<(), String> {
    use warren_control_plane::backend::kubernetes::KubernetesBackend;
    use warren_control_plane::backend::{Backend, WorkspaceSpec};
    let mut config = k::backend_config(instance, "nats://127.0.0.1:1", "rbac");
    config.kubeconfig = Some(kubeconfig.to_owned());
    let steps = async {
        let backend = KubernetesBackend::new(config)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let spec = WorkspaceSpec {
            name: "w".into(),
            agents: vec![warren_schema::launch::AgentLaunch::new(
                "a",
                "echo",
                json!({}),
            )],
            ..WorkspaceSpec::default()
        };
        backend
            .start(&spec)
            .await
            .map_err(|e| format!("starting: {e}"))?;
        observe_each(&backend, &["w".to_owned()], |o| {
            o.phase == WorkspacePhase::Starting
        })
        .await;
        backend
            .stop("w")
            .await
            .map_err(|e| format!("stopping: {e}"))?;
        observe_each(&backend, &["w".to_owned()], |o| {
            o.phase == WorkspacePhase::Exited
        })
        .await;
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(20), steps)
        .await
        .map_err(|_| "timed out (the watch never synced, or a step hung)".to_owned())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_role_is_exactly_what_it_needs() {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    use kube::api::{Api, Patch, PatchParams, PostParams};

    let base = testenv::instance("rbac");
    let root = std::env::temp_dir().join(format!("warren-{base}"));
    std::fs::create_dir_all(&root).expect("root");
    // As the control plane's own identity, bound to the Role deploy/ ships: it works.
    let own = testenv::control_plane_kubeconfig();
    start_and_stop(&own, &format!("{base}-full"))
        .await
        .expect("the Role is enough");

    // That Role with any one verb removed is not.
    let role: Role = serde_yaml_role();
    let admin = testenv::admin().await;
    let admin_file =
        std::fs::read_to_string(testenv::admin_kubeconfig()).expect("admin kubeconfig");
    let admin_token = admin_file
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .expect("the admin's token")
        .to_owned();
    let mut cases = Vec::new();
    for (r, rule) in role.rules.iter().flatten().enumerate() {
        for verb in &rule.verbs {
            let mut reduced = role.clone();
            let rules = reduced.rules.as_mut().expect("rules");
            rules[r].verbs.retain(|v| v != verb);
            let what = format!(
                "{} {verb}",
                rule.resources.clone().unwrap_or_default().join(",")
            );
            cases.push((what, reduced));
        }
    }
    let apply = PatchParams::apply("warren-test");
    let mut runs = Vec::new();
    for (i, (what, mut reduced)) in cases.into_iter().enumerate() {
        let name = format!("{base}-{i}");
        reduced.metadata.name = Some(name.clone());
        reduced.metadata.namespace = Some(testenv::NAMESPACE.into());
        Api::<Role>::namespaced(admin.clone(), testenv::NAMESPACE)
            .patch(&name, &apply, &Patch::Apply(&reduced))
            .await
            .expect("role");
        let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), testenv::NAMESPACE);
        accounts
            .patch(
                &name,
                &apply,
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                                     "metadata": {"name": name}})),
            )
            .await
            .expect("service account");
        Api::<RoleBinding>::namespaced(admin.clone(), testenv::NAMESPACE)
            .patch(
                &name,
                &apply,
                &Patch::Apply(json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                    "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": testenv::NAMESPACE}],
                })),
            )
            .await
            .expect("binding");
        let token = accounts
            .create_token_request(
                &name,
                &PostParams::default(),
                &TokenRequest {
                    spec: serde_json::from_value(
                        json!({"audiences": [], "expirationSeconds": 3600}),
                    )
                    .expect("spec"),
                    ..TokenRequest::default()
                },
            )
            .await
            .expect("a token")
            .status
            .expect("status")
            .token;
        let kubeconfig = root.join(format!("{name}.kubeconfig"));
        std::fs::write(&kubeconfig, admin_file.replace(&admin_token, &token)).expect("write");
        runs.push(async move { (what, start_and_stop(&kubeconfig, &name).await) });
    }
    let results = futures_util::future::join_all(runs).await;
    let enough: Vec<&String> = results
        .iter()
        .filter(|(_, result)| result.is_ok())
        .map(|(what, _)| what)
        .collect();
    for (i, _) in results.iter().enumerate() {
        testenv::clean_up(&format!("{base}-{i}")).await;
    }
    testenv::clean_up(&format!("{base}-full")).await;
    assert!(
        enough.is_empty(),
        "the backend worked without these verbs, so the Role grants more than it needs: {enough:?}"
    );
    for (what, result) in &results {
        eprintln!(
            "without {what}: {}",
            result.as_ref().err().map_or("?", String::as_str)
        );
    }
}

/// The Role deploy/ ships.
fn serde_yaml_role() -> k8s_openapi::api::rbac::v1::Role {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/warren/files/control-plane-role.yaml"
    );
    let out = std::process::Command::new("kubectl")
        .args(["create", "--dry-run=client", "-o", "json", "-f", path])
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a Role")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_errors_and_cut_watches_lose_nothing_and_keep_to_the_budget() {
    use warren_control_plane::backend::kubernetes::KubernetesBackend;
    use warren_control_plane::backend::{Backend, WorkspaceSpec};
    use warren_test_kubelet::fault_proxy::WriteFault;

    let instance = testenv::instance("faults");
    let root = std::env::temp_dir().join(format!("warren-{instance}"));
    std::fs::create_dir_all(&root).expect("root");
    // The control plane's identity, through the proxy.
    let through_proxy = root.join("proxied.kubeconfig");
    let proxy = testenv::through_proxy(&testenv::control_plane_kubeconfig(), &through_proxy)
        .await
        .expect("proxy");
    let mut config = k::backend_config(&instance, "nats://127.0.0.1:1", "faults");
    config.kubeconfig = Some(through_proxy);
    let rate = 5.0;
    config.writes_per_second = rate;
    let backend = KubernetesBackend::new(config).await.expect("backend");

    // 12 workspaces start while writes are throttled and 500s are thrown, and every watch
    // is cut or expired now and then.
    let names: Vec<String> = (0..12).map(|i| format!("w{i}")).collect();
    proxy.fail_writes(
        4,
        WriteFault::TooManyRequests {
            retry_after_secs: 1,
        },
    );
    let chaos = {
        let proxy = &proxy;
        async move {
            for round in 0..6 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                if round % 2 == 0 {
                    proxy.cut_watches();
                } else {
                    proxy.expire_watches(1);
                    proxy.cut_watches();
                }
                if round == 2 {
                    proxy.fail_writes(3, WriteFault::ServerError);
                }
            }
        }
    };
    let starts = futures_util::future::join_all(names.iter().map(|name| {
        let backend = backend.clone();
        async move {
            let spec = WorkspaceSpec {
                name: name.clone(),
                agents: vec![warren_schema::launch::AgentLaunch::new(
                    "a",
                    "echo",
                    json!({}),
                )],
                ..WorkspaceSpec::default()
            };
            backend.start(&spec).await
        }
    }));
    let (started, ()) = tokio::join!(starts, chaos);
    for result in started {
        result.expect("every start gets through, retried");
    }
    assert!(proxy.faults_sent() >= 7, "the faults were injected");
    assert!(proxy.watches_cut() >= 1, "watches were cut");

    // Every pod was seen, and every deletion is seen too, though watches keep being cut.
    observe_each(&backend, &names, |_| true).await;
    let mut running = backend.running().await;
    running.sort();
    let mut expected = names.clone();
    expected.sort();
    assert_eq!(running, expected);
    for name in &names {
        backend.stop(name).await.expect("stop");
    }
    proxy.cut_watches();
    observe_each(&backend, &names, |o| o.phase == WorkspacePhase::Exited).await;

    // The budget held: after a burst of one second's worth, at most `rate` writes in any
    // second.
    let writes = proxy.writes();
    let most_in_a_second = writes
        .iter()
        .map(|t| {
            writes
                .iter()
                .filter(|u| **u >= *t && **u < *t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or_default();
    assert!(
        most_in_a_second as f64 <= 2.0 * rate,
        "{most_in_a_second} writes within one second at {rate}/s"
    );
    testenv::clean_up(&instance).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applying_twice_changes_nothing_and_an_ended_pod_waits_for_a_new_decision() {
    use k8s_openapi::api::core::v1::{Pod, Secret};
    use kube::api::Api;
    use warren_control_plane::backend::kubernetes::KubernetesBackend;
    use warren_control_plane::backend::{Backend, WorkspaceSpec};

    let instance = testenv::instance("ssa");
    let backend = KubernetesBackend::new(k::backend_config(&instance, "nats://127.0.0.1:1", "ssa"))
        .await
        .expect("backend");
    let spec = WorkspaceSpec {
        name: "w".into(),
        agents: vec![warren_schema::launch::AgentLaunch::new(
            "a",
            "echo",
            json!({}),
        )],
        decision: Some(warren_schema::EventId::random()),
        ..WorkspaceSpec::default()
    };
    let secrets = Api::<Secret>::namespaced(testenv::admin().await, testenv::NAMESPACE);
    let pods = Api::<Pod>::namespaced(testenv::admin().await, testenv::NAMESPACE);
    let name = format!("{instance}-w");
    backend.start(&spec).await.expect("start");
    let created = pods.get(&name).await.expect("the pod");
    let secret = secrets.get(&name).await.expect("the Secret");

    // The same pod applied again, twice: the server finds nothing to change.
    let first = backend.apply_pod(&spec).await.expect("first apply");
    let second = backend.apply_pod(&spec).await.expect("second apply");
    for applied in [&first, &second] {
        assert_eq!(
            applied.metadata.uid, created.metadata.uid,
            "the same pod, not a twin"
        );
        assert_eq!(
            applied.metadata.resource_version, created.metadata.resource_version,
            "applying it again changed nothing"
        );
    }

    // A start of a workspace whose pod is live (a retry, or a second leader) keeps the pod
    // and its Secret as they are. (What the watch has seen is what start() looks at.)
    eventually("the pod seen by the backend", async || {
        backend.running().await == ["w".to_owned()]
    })
    .await;
    backend.start(&spec).await.expect("start again");
    let after = secrets.get(&name).await.expect("the Secret");
    assert_eq!(
        secret.metadata.resource_version,
        after.metadata.resource_version
    );
    let all = testenv::pods(&instance).await;
    assert_eq!(all.len(), 1);
    assert_eq!(
        all[0].metadata.resource_version,
        created.metadata.resource_version
    );

    // The pod fails. A start of the same decision (a new leader, which does not know that
    // its predecessor acted on it) leaves it: its failure is for the decisions to act on.
    pods.patch_status(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"status": {"phase": "Failed", "reason": "Evicted"}})),
    )
    .await
    .expect("fail the pod");
    eventually("the failure seen by the backend", async || {
        backend.running().await.is_empty()
    })
    .await;
    backend
        .start(&spec)
        .await
        .expect("start of the same decision");
    assert_eq!(
        testenv::pods(&instance).await[0].metadata.uid,
        created.metadata.uid
    );
    // A new decision (a restart) replaces it.
    let restart = WorkspaceSpec {
        decision: Some(warren_schema::EventId::random()),
        ..spec.clone()
    };
    // (Never bound to a node, it is deleted at once: no kubelet needs to confirm.)
    let started = backend.start(&restart).await;
    started.expect("start of a new decision");
    let replaced = testenv::pods(&instance).await;
    assert_eq!(replaced.len(), 1);
    assert_ne!(replaced[0].metadata.uid, created.metadata.uid, "a new pod");
    testenv::clean_up(&instance).await;
}
