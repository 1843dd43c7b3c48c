//! The controller with the `local` backend, against a real PostgreSQL and real child
//! processes (a shell script stands in for the workspace runtime): a message starts a
//! process in its own directory, an idle one is stopped, a crashing one is restarted and
//! then given up on, and processes left by a previous control plane are cleaned up.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use warren_control_plane::backend::Backend;
use warren_control_plane::backend::BackendConfig;
use warren_control_plane::backend::local::{LocalBackend, LocalConfig};
use warren_control_plane::controller::{self, ControllerConfig};
use warren_control_plane::decide::Policy;
use warren_schema::events::*;
use warren_schema::testing::TestDatabase;
use warren_schema::{AppendRequest, EventId, EventLog, Metadata, NewEvent};

fn temp_root(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-local-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

async fn message(log: &EventLog, agent: &str) {
    let event = MessageReceived {
        origin: Origin::Slack {
            team_id: "T1".into(),
            channel: "C1".into(),
            thread_ts: "1.0".into(),
            ts: "1.0".into(),
            user: "U1".into(),
        },
        text: format!("@{agent} hello"),
        addressed_agents: vec![agent.into()],
        files: vec![],
    };
    let e = NewEvent::from_domain(EventId::random(), &event, Metadata::new("test")).expect("e");
    log.append(&AppendRequest::new("slack:T1:C1", vec![e]))
        .await
        .expect("append");
}

async fn observed(log: &EventLog, workspace: &str) -> Vec<WorkspaceObserved> {
    log.read_type("workspace.observed", 0, 1000)
        .await
        .expect("read")
        .iter()
        .filter_map(|e| e.decode::<WorkspaceObserved>().ok())
        .filter(|o| o.workspace == workspace)
        .collect()
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the controller has recorded at least `agents` agents of its configuration.
async fn configured(log: &EventLog, agents: usize) {
    wait_for("configuration", async || {
        log.read_type("agent.configured", 0, 100)
            .await
            .expect("r")
            .len()
            >= agents
    })
    .await;
}

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

#[tokio::test]
async fn a_message_starts_a_process_in_its_directory_and_idleness_stops_it() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let root = temp_root("idle");
    let file = root.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "alice", "workspace": "research", "idle_timeout_secs": 1}]}"#,
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let config = ControllerConfig {
        holder: "local".into(),
        lease_ttl: Duration::from_secs(5),
        tick: Duration::from_millis(50),
        policy: Policy::default(),
        config_file: Some(file),
        backend: Some(BackendConfig::Local(LocalConfig {
            stop_grace: Duration::from_secs(5),
            ..LocalConfig::new(root.clone(), sh("echo ready; exec sleep 600"))
        })),
        nats: None,
    };
    let task = tokio::spawn(controller::run(log.clone(), config, shutdown.clone()));
    configured(&log, 1).await;

    message(&log, "alice").await;
    wait_for("ready", async || {
        observed(&log, "research")
            .await
            .iter()
            .any(|o| o.phase == WorkspacePhase::Ready)
    })
    .await;
    let ready = observed(&log, "research").await;
    let pid: u32 = ready[0]
        .instance
        .as_deref()
        .expect("pid")
        .parse()
        .expect("pid");
    assert!(alive(pid), "the runtime process runs");
    // Its whole environment is its launch contract (and PATH, HOME): nothing of ours.
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let env: Vec<String> = env
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| String::from_utf8_lossy(kv).into_owned())
        .collect();
    // (`PWD` is set by the shell that stands in for the runtime.)
    let mut names: Vec<&str> = env
        .iter()
        .filter_map(|kv| kv.split('=').next())
        .filter(|k| *k != "PWD")
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["HOME", "PATH", "WARREN_LAUNCH"], "{env:?}");
    let contract = warren_schema::launch::LaunchContract::from_json(
        env.iter()
            .find_map(|kv| kv.strip_prefix("WARREN_LAUNCH="))
            .expect("the contract"),
    )
    .expect("a launch contract");
    assert_eq!(contract.workspace, "research");
    assert_eq!(contract.agents[0].name, "alice");
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
    assert_eq!(cwd, root.join("workspaces/research"));
    assert!(root.join("shared").is_dir());

    // Idle for its 1 s timeout: stopped with SIGTERM, reported as exited.
    wait_for("the idle stop", async || {
        observed(&log, "research")
            .await
            .iter()
            .any(|o| o.phase == WorkspacePhase::Exited)
    })
    .await;
    assert!(!alive(pid), "the process is gone");
    let stop = log
        .read_type("workspace.stop_requested", 0, 10)
        .await
        .expect("r");
    assert_eq!(stop.len(), 1);
    assert_eq!(
        stop[0]
            .decode::<WorkspaceStopRequested>()
            .expect("d")
            .reason,
        "idle"
    );
    assert_eq!(
        log.read_type("workspace.start_requested", 0, 10)
            .await
            .expect("r")
            .len(),
        1,
        "started once"
    );
    shutdown.cancel();
    task.await.expect("join").expect("controller");
}

#[tokio::test]
async fn a_crashing_runtime_is_restarted_then_given_up_on() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let root = temp_root("crash");
    let file = root.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "bob", "workspace": "ops"}]}"#,
    )
    .expect("config");
    let shutdown = CancellationToken::new();
    let config = ControllerConfig {
        holder: "local".into(),
        lease_ttl: Duration::from_secs(5),
        tick: Duration::from_millis(50),
        policy: Policy {
            max_restarts: 2,
            restart_backoff: chrono::TimeDelta::milliseconds(100),
            ..Policy::default()
        },
        config_file: Some(file),
        backend: Some(BackendConfig::Local(LocalConfig {
            stop_grace: Duration::from_secs(5),
            ..LocalConfig::new(root.clone(), sh("echo boom >&2; exit 3"))
        })),
        nats: None,
    };
    let task = tokio::spawn(controller::run(log.clone(), config, shutdown.clone()));
    configured(&log, 1).await;
    message(&log, "bob").await;
    wait_for("giving up", async || {
        !log.read_type("workspace.failed", 0, 1)
            .await
            .expect("r")
            .is_empty()
    })
    .await;
    let starts = log
        .read_type("workspace.start_requested", 0, 10)
        .await
        .expect("r");
    assert_eq!(starts.len(), 3, "the first start and two restarts");
    let failures: Vec<_> = observed(&log, "ops")
        .await
        .into_iter()
        .filter(|o| o.phase == WorkspacePhase::Failed)
        .collect();
    assert_eq!(failures.len(), 3);
    assert!(
        failures[0].detail.as_deref().unwrap_or("").contains("3"),
        "{failures:?}"
    );
    let notice = log.read_type("agent.replied", 0, 10).await.expect("r");
    assert_eq!(notice.len(), 1, "the channel is told once");
    let log_file = std::fs::read_to_string(root.join("runtimes/ops/runtime.log")).expect("log");
    assert!(
        log_file.contains("boom"),
        "stderr goes to the workspace's runtime.log"
    );
    shutdown.cancel();
    task.await.expect("join").expect("controller");
}

#[tokio::test]
async fn processes_left_by_a_previous_control_plane_are_stopped_and_reported_gone() {
    let root = temp_root("leftover");
    let dir = root.join("runtimes/research");
    std::fs::create_dir_all(&dir).expect("dir");
    // A runtime as the backend starts one: its launch contract names its workspace.
    let contract = warren_schema::launch::LaunchContract::new(
        "research",
        root.join("workspaces/research"),
        warren_schema::launch::NatsLaunch::new("nats://127.0.0.1:4222", "warren"),
    );
    let marker = format!("{}={}", warren_schema::launch::ENV, contract.to_json());
    let mut leftover = std::process::Command::new("/bin/sh")
        .args(["-c", "exec sleep 600"])
        .env_clear()
        .envs(contract.environment("/usr/bin:/bin"))
        .spawn()
        .expect("spawn");
    std::fs::write(dir.join("runtime.pid"), leftover.id().to_string()).expect("pidfile");
    // Until it has exec'd, a fresh child still shows this test's environment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read(format!("/proc/{}/environ", leftover.id()))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()))
    {
        assert!(Instant::now() < deadline, "the leftover never started");
        std::thread::sleep(Duration::from_millis(5));
    }

    let backend = LocalBackend::new(LocalConfig {
        stop_grace: Duration::from_secs(5),
        ..LocalConfig::new(root.clone(), sh("exit 0"))
    })
    .expect("backend");
    let deadline = Instant::now() + Duration::from_secs(10);
    while leftover.try_wait().expect("wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "the leftover process still runs; backend saw {:?}; /proc status: {:?}",
            backend.drain_observations(),
            std::fs::read_to_string(format!("/proc/{}/status", leftover.id())).map(|s| s
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | "))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let seen = backend.drain_observations();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].phase, WorkspacePhase::Gone);
    assert_eq!(
        seen[0].detail.as_deref(),
        Some("left by a previous control plane; stopped")
    );
    assert!(
        seen[0].replaced,
        "a replacement, not a failure to back off from"
    );
    assert_eq!(seen[0].instance, Some(leftover.id().to_string()));
    assert!(!dir.join("runtime.pid").exists());
    assert!(backend.running().await.is_empty());
}

/// A workspace whose agent is allowed a key the operator does not have does not start, says
/// which key, and leaves nothing behind: no credentials directory, no process.
#[tokio::test]
async fn a_start_refused_for_a_missing_key_names_it_and_leaves_nothing() {
    use warren_schema::launch::AgentLaunch;
    let root = temp_root("missing-key");
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let backend = LocalBackend::new(LocalConfig {
        model_keys: Some(keys),
        ..LocalConfig::new(root.join("local"), sh("echo ready; exec sleep 600"))
    })
    .expect("backend");
    let spec = warren_control_plane::backend::WorkspaceSpec {
        name: "research".into(),
        agents: vec![AgentLaunch::new(
            "alice",
            "openai",
            serde_json::json!({"model": "m", "allowed_keys": ["OPENAI_API_KEY"]}),
        )],
        tuning: Default::default(),
        decision: None,
        traceparent: None,
    };
    let e = backend.start(&spec).await.expect_err("no such key");
    assert!(e.to_string().contains("OPENAI_API_KEY"), "{e}");
    assert!(!root.join("local/credentials/research").exists());
    assert!(backend.running().await.is_empty());
}

#[tokio::test]
async fn an_agents_processes_do_not_outlive_its_sigkilled_runtime_even_after_setsid() {
    let root_user = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
    };
    if !root_user {
        eprintln!("skipped: needs root (a Unix user per workspace tells its processes apart)");
        return;
    }
    let root = temp_root("orphans");
    // The "runtime" starts a program that leaves its session (as an agent's program could),
    // says ready and waits.
    let backend = LocalBackend::new(LocalConfig::new(
        root.join("local"),
        sh("setsid sleep 1000 & echo $! > escaped.pid; echo ready; exec sleep 600"),
    ))
    .expect("backend");
    let spec = warren_control_plane::backend::WorkspaceSpec {
        name: "research".into(),
        agents: vec![warren_schema::launch::AgentLaunch::new(
            "alice",
            "echo",
            serde_json::json!({}),
        )],
        tuning: Default::default(),
        decision: None,
        traceparent: None,
    };
    backend.start(&spec).await.expect("start");
    let escaped_file = root.join("local/workspaces/research/escaped.pid");
    let mut escaped = None;
    wait_for("the escaped program", async || {
        escaped = std::fs::read_to_string(&escaped_file)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        escaped.is_some_and(alive)
    })
    .await;
    let escaped = escaped.expect("its pid");
    let runtime: u32 = std::fs::read_to_string(root.join("local/runtimes/research/runtime.pid"))
        .expect("runtime pid")
        .trim()
        .parse()
        .expect("a pid");

    // The runtime is SIGKILLed: it cannot clean up after its agents.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runtime as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_for("the runtime's exit", async || {
        backend.running().await.is_empty()
    })
    .await;
    wait_for("the escaped program to be killed too", async || {
        !alive(escaped)
    })
    .await;
    let _ = std::fs::remove_dir_all(&root);
}

/// The reconciler runs beside the decisions, not in their loop: while it waits on a slow
/// call (here: making a workspace's NATS resources on a server that never answers, which
/// takes the client's whole request timeout), the decisions go on. A second message is
/// routed before the first workspace's start is even given up on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_call_does_not_hold_up_the_decisions() {
    let db = TestDatabase::new().await;
    let log = EventLog::new(db.pool.clone());
    let root = temp_root("slow");
    let file = root.join("agents.json");
    std::fs::write(
        &file,
        r#"{"agents": [{"name": "bob", "workspace": "ops"}, {"name": "carl", "workspace": "sales"}]}"#,
    )
    .expect("config");
    // A port where nothing listens: the client keeps trying to connect, and every request
    // waits for its timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let silent_url = format!("nats://{}", silent.local_addr().expect("addr"));
    drop(silent);
    let shutdown = CancellationToken::new();
    let config = ControllerConfig {
        holder: "slow".into(),
        lease_ttl: Duration::from_secs(5),
        tick: Duration::from_millis(50),
        policy: Policy::default(),
        config_file: Some(file),
        backend: Some(BackendConfig::Local(LocalConfig::new(
            root.clone(),
            sh("echo ready; exec sleep 600"),
        ))),
        nats: Some(controller::NatsConfig {
            url: silent_url,
            namespace: warren_schema::nats::Namespace::new("slow"),
            credentials: None,
        }),
    };
    let task = tokio::spawn(controller::run(log.clone(), config, shutdown.clone()));
    configured(&log, 2).await;
    message(&log, "bob").await;
    wait_for("bob's start decision", async || {
        !log.read_type("workspace.start_requested", 0, 10)
            .await
            .expect("r")
            .is_empty()
    })
    .await;
    // The reconciler is now waiting on NATS for ops. carl's message is decided meanwhile.
    message(&log, "carl").await;
    wait_for("carl's routing", async || {
        log.read_type("message.routed", 0, 10)
            .await
            .expect("r")
            .len()
            == 2
    })
    .await;
    assert!(
        observed(&log, "ops")
            .await
            .iter()
            .all(|o| o.phase != WorkspacePhase::Failed),
        "carl's message waited for ops's start to fail"
    );
    shutdown.cancel();
    task.await.expect("join").expect("controller");
    let _ = std::fs::remove_dir_all(&root);
}

/// What the backend reported and a recording could not write (the database went away, or
/// the leadership ended mid-way) goes back to the backend, and the next recording (the
/// next leader's) writes it. The backend reports each change once: dropped, a pod's failure
/// was never recorded, and the decisions waited on that workspace for ever.
#[tokio::test]
async fn observations_a_failed_recording_could_not_write_are_written_by_the_next() {
    use warren_control_plane::reconcile::Reconciler;
    let db = TestDatabase::new().await;
    let log = db.log();
    let root = temp_root("unrecorded");
    let backend = LocalBackend::new(LocalConfig {
        stop_grace: Duration::from_secs(5),
        ..LocalConfig::new(root.clone(), sh("echo ready; exec sleep 600"))
    })
    .expect("backend");
    let spec = warren_control_plane::backend::WorkspaceSpec {
        name: "research".into(),
        agents: vec![],
        tuning: Default::default(),
        decision: None,
        traceparent: None,
    };
    // The start reports `starting` before it returns; `ready` follows.
    backend.start(&spec).await.expect("start");

    // A database nobody listens on: every append fails.
    let unreachable = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy("postgres://warren@127.0.0.1:1/none")
        .expect("lazy pool");
    let failing = Reconciler::new(backend.clone(), EventLog::new(unreachable));
    failing
        .record_observations()
        .await
        .expect_err("nothing can be written");

    let next = Reconciler::new(backend.clone(), log.clone());
    wait_for("the start and the runtime's ready recorded", async || {
        next.record_observations().await.expect("record");
        let phases: Vec<WorkspacePhase> = observed(&log, "research")
            .await
            .iter()
            .map(|o| o.phase)
            .collect();
        phases.contains(&WorkspacePhase::Starting) && phases.contains(&WorkspacePhase::Ready)
    })
    .await;
    backend.stop("research").await.expect("stop");
    let _ = std::fs::remove_dir_all(&root);
}
