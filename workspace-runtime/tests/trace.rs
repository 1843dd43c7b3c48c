//! One trace, end to end, with Warren's real processes: the gateway, the control plane (local
//! backend) and the workspace runtimes it starts, each exporting spans over OTLP/HTTP to a
//! receiver in this test. A Slack message's trace holds every step of its way, with the
//! right parents, also when the control plane is killed between two messages and a new one
//! takes over. The idle stop that follows is the clock's decision: a trace of its own,
//! linked to the trace of the work it ends.
//!
//! The gateway and control-plane binaries are the workspace's own (`target/{profile}/`, next
//! to the runtime's): `cargo test --workspace` builds them.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::ExportedSpan;
use support::slack::{BOT_TOKEN, SIGNING_SECRET};
use warren_schema::events::MessageReceived;
use warren_schema::nats::Namespace;
use warren_schema::testing::TestDatabase;

/// A binary of this workspace, built next to the runtime.
fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_warren-workspace-runtime")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo build -p warren-gateway -p warren-control-plane` (cargo test \
         --workspace builds it)",
        path.display()
    );
    path
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("addr").to_string()
}

/// A process of Warren's, its log in a file (printed when the test fails to find a span).
struct Process {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Process {
    fn start(bin: &str, args: &[&str], env: &[(&str, String)], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(binary(bin))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            // Spans leave within 100 ms: a process killed later has exported them.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("WARREN_LOG_FORMAT", "text")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        Self { child, log }
    }

    fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
    }

    /// SIGTERM, and the exit waited for.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// At the end, pass or fail: the runtimes a killed control plane left behind are stopped
/// (their pid files, `{dir}/local/runtimes/*/runtime.pid`) and the directory removed.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let runtimes = std::fs::read_dir(self.0.join("local/runtimes"))
            .into_iter()
            .flatten();
        for entry in runtimes.flatten() {
            if let Ok(pid) = std::fs::read_to_string(entry.path().join("runtime.pid")) {
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mention(event_id: &str, ts: &str, text: &str) -> Value {
    json!({
        "type": "event_callback", "team_id": "T1", "event_id": event_id, "event_time": 1,
        "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "app_mention", "user": "U1", "channel": "C1",
                  "text": format!("<@UAPP> {text}"), "ts": ts},
    })
}

async fn send_slack(gateway: &str, body: &Value) {
    let status = support::slack::post_slack_event(&format!("http://{gateway}"), body).await;
    assert_eq!(status, 200);
}

/// The model: every turn is answered "noted", streamed as the Responses API streams.
fn answer(_: &Value) -> axum::response::Response {
    support::responses_stream(&json!({
        "id": "resp_1", "object": "response", "created_at": 1_764_000_000,
        "status": "completed", "model": "gpt-test",
        "output": [{"type": "message", "id": "msg_1", "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "noted", "annotations": []}]}],
        "usage": {"input_tokens": 10, "output_tokens": 1, "total_tokens": 11}}))
}

/// The trace id of the message whose text contains `text`, from its event's `traceparent`.
async fn trace_of(log: &warren_schema::EventLog, text: &str) -> String {
    let messages = log
        .read_type("message.received", 0, 100)
        .await
        .expect("read");
    let message = messages
        .iter()
        .find(|e| {
            e.decode::<MessageReceived>()
                .is_ok_and(|m| m.text.contains(text))
        })
        .unwrap_or_else(|| panic!("no message {text:?} in the log"));
    message
        .metadata
        .traceparent
        .as_deref()
        .and_then(|t| t.split('-').nth(1))
        .expect("the message's traceparent")
        .to_owned()
}

/// The spans of one trace, looked up by name and checked parent by parent.
struct Trace {
    spans: Vec<ExportedSpan>,
}

impl Trace {
    fn of(all: &[ExportedSpan], trace_id: &str) -> Self {
        Self {
            spans: all
                .iter()
                .filter(|s| s.trace_id == trace_id)
                .cloned()
                .collect(),
        }
    }

    fn named(&self, name: &str) -> Vec<&ExportedSpan> {
        self.spans.iter().filter(|s| s.name == name).collect()
    }

    /// Every step of a message's way, or the first that is missing.
    fn missing(&self, started_workspace: bool) -> Option<&'static str> {
        let mut steps = vec![
            "http_request",
            "event_log_append",
            "decide",
            "nats_publish",
            "turn",
            "model_call",
            "ingest",
            "reply",
            "slack_api",
        ];
        if started_workspace {
            steps.push("reconcile.start");
        }
        steps.into_iter().find(|name| self.named(name).is_empty())
    }

    /// Checks that every `child` span is made by `service` and has one of the `parent`
    /// spans as its parent. A name may be `name[event_type]`: the spans of deciding on that
    /// kind of event (the decider makes a `decide` span for every event in a trace).
    fn assert_child(&self, child: &str, service: &str, parent: &str) {
        let parents: Vec<&str> = self
            .select(parent)
            .iter()
            .map(|s| s.span_id.as_str())
            .collect();
        let children = self.select(child);
        assert!(!children.is_empty(), "no {child} span: {:#?}", self.spans);
        for span in children {
            assert_eq!(
                span.service, service,
                "{child} exported by {}",
                span.service
            );
            assert!(
                parents.contains(&span.parent.as_str()),
                "{child}'s parent is not a {parent} span: {span:?}\n{:#?}",
                self.spans
            );
        }
    }

    fn select(&self, selector: &str) -> Vec<&ExportedSpan> {
        match selector.split_once('[') {
            Some((name, kind)) => {
                let kind = kind.trim_end_matches(']');
                self.named(name)
                    .into_iter()
                    .filter(|s| s.attribute("event_type") == Some(kind))
                    .collect()
            }
            None => self.named(selector),
        }
    }

    /// The whole way of a message, parent by parent.
    fn assert_message_path(&self, started_workspace: bool) {
        const GATEWAY: &str = "warren-gateway";
        const CONTROL_PLANE: &str = "warren-control-plane";
        const RUNTIME: &str = "warren-workspace-runtime";
        let request = self.named("http_request");
        assert_eq!(request.len(), 1, "one Slack request: {request:?}");
        assert_eq!(request[0].service, GATEWAY);
        assert_eq!(
            request[0].parent, "",
            "Slack sends no trace: the request is the root"
        );
        assert_eq!(request[0].attribute("route"), Some("/slack/events"));
        self.assert_child("event_log_append", GATEWAY, "http_request");
        const DECIDE: &str = "decide[message.received]";
        self.assert_child(DECIDE, CONTROL_PLANE, "http_request");
        self.assert_child("nats_publish", CONTROL_PLANE, DECIDE);
        if started_workspace {
            self.assert_child("reconcile.start", CONTROL_PLANE, DECIDE);
        }
        self.assert_child("turn", RUNTIME, "nats_publish");
        self.assert_child("model_call", RUNTIME, "turn");
        self.assert_child("ingest", CONTROL_PLANE, "turn");
        self.assert_child("reply", GATEWAY, "ingest");
        self.assert_child("slack_api", GATEWAY, "reply");
        assert!(
            self.named("slack_api")
                .iter()
                .any(|s| s.attribute("method") == Some("chat.postMessage")),
            "the post is a chat.postMessage call"
        );
    }
}

/// Waits until `check` holds for the spans received so far (at most 60 s).
async fn spans_until(
    spans: &support::Spans,
    what: &str,
    logs: &[&Process],
    check: impl Fn(&[ExportedSpan]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if check(&spans.lock().expect("lock")) {
            return;
        }
        if Instant::now() > deadline {
            let names: Vec<String> = spans
                .lock()
                .expect("lock")
                .iter()
                .map(|s| {
                    format!(
                        "{}/{} {} {} <- {} links {:?}",
                        s.service, s.name, s.trace_id, s.span_id, s.parent, s.links
                    )
                })
                .collect();
            let logs: Vec<String> = logs.iter().map(|p| p.log()).collect();
            panic!(
                "timed out waiting for {what}; spans: {names:#?}\nlogs:\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long the agent's workspace runs without work before the clock stops it.
const IDLE_SECS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_joins_every_step_of_a_message_across_a_control_plane_restart() {
    let (otlp, spans) = support::otlp_receiver().await;
    let db = TestDatabase::new().await;
    let log = db.log();
    let prefix = format!("trace{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("warren-trace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let _cleanup = Cleanup(dir.clone());
    let (slack_url, posts) = support::slack::slack_server().await;
    let (model, _) = support::dynamic_model("/v1/responses", answer).await;
    let agents = dir.join("agents.json");
    std::fs::write(
        &agents,
        json!({"agents": [{"name": "alice", "workspace": "research", "driver": "openai",
                           "settings": {"base_url": format!("{model}/v1"), "model": "gpt-test",
                                        "wire_api": "responses", "stream": true},
                           "idle_timeout_secs": IDLE_SECS}]})
        .to_string(),
    )
    .expect("agents file");

    let gateway_address = free_address();
    let gateway = Process::start(
        "warren-gateway",
        &[],
        &[
            ("DATABASE_URL", db.url()),
            ("SLACK_SIGNING_SECRET", SIGNING_SECRET.into()),
            ("SLACK_BOT_TOKEN", BOT_TOKEN.into()),
            ("SLACK_API_URL", slack_url),
            ("WARREN_GATEWAY_LISTEN", gateway_address.clone()),
            ("WARREN_GATEWAY_METRICS_LISTEN", free_address()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
        ],
        dir.join("gateway.log"),
    );
    let control_plane_env = [
        ("DATABASE_URL", db.url()),
        ("NATS_URL", support::nats_url()),
        ("WARREN_NATS_PREFIX", prefix.clone()),
        ("WARREN_CONFIG", agents.display().to_string()),
        ("WARREN_BACKEND", "local".into()),
        ("WARREN_LOCAL_ROOT", dir.join("local").display().to_string()),
        (
            "WARREN_RUNTIME_COMMAND",
            env!("CARGO_BIN_EXE_warren-workspace-runtime").into(),
        ),
        ("WARREN_LOCAL_SAME_USER", "true".into()),
        ("WARREN_REPLICA", "cp".into()),
        ("WARREN_LEASE_TTL_SECS", "2".into()),
        ("WARREN_TICK_MS", "100".into()),
        ("WARREN_CONTROL_PLANE_METRICS_LISTEN", free_address()),
        ("WARREN_ADMIN_LISTEN", free_address()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
    ];
    let mut first = Process::start(
        "warren-control-plane",
        &["run"],
        &control_plane_env,
        dir.join("control-plane-1.log"),
    );

    // The first message starts the workspace.
    support::eventually("the agents configured", async || {
        !log.read_type("agent.configured", 0, 1)
            .await
            .expect("read")
            .is_empty()
    })
    .await;
    send_slack(
        &gateway_address,
        &mention("EvT1", "1700000000.000100", "@alice one"),
    )
    .await;
    support::eventually("the first reply in Slack", async || {
        posts.lock().expect("lock").len() == 1
    })
    .await;
    let one = trace_of(&log, "one").await;
    spans_until(
        &spans,
        "the first message's whole trace",
        &[&gateway, &first],
        |all| Trace::of(all, &one).missing(true).is_none(),
    )
    .await;

    // The control plane is killed; the second message arrives while none runs, and a new
    // one decides on it.
    first.kill();
    first.child.wait().await.expect("killed");
    send_slack(
        &gateway_address,
        &mention("EvT2", "1700000000.000200", "@alice two"),
    )
    .await;
    let second = Process::start(
        "warren-control-plane",
        &["run"],
        &control_plane_env,
        dir.join("control-plane-2.log"),
    );
    support::eventually("the second reply in Slack", async || {
        posts.lock().expect("lock").len() == 2
    })
    .await;
    let two = trace_of(&log, "two").await;
    assert_ne!(one, two, "each message is a trace of its own");
    spans_until(
        &spans,
        "the second message's whole trace",
        &[&gateway, &second],
        |all| Trace::of(all, &two).missing(false).is_none(),
    )
    .await;
    // Idle, the workspace is stopped: the clock's decision, a trace of its own with the
    // stop in it, linked to the trace of the message whose start it ends.
    let stops_idle = |all: &[ExportedSpan], tick: &ExportedSpan| {
        tick.name == "decide_tick"
            && all
                .iter()
                .any(|s| s.name == "reconcile.stop" && s.parent == tick.span_id)
    };
    spans_until(&spans, "the idle stop's trace", &[&second], |all| {
        all.iter().any(|tick| stops_idle(all, tick))
    })
    .await;

    let all = spans.lock().expect("lock").clone();
    Trace::of(&all, &one).assert_message_path(true);
    Trace::of(&all, &two).assert_message_path(false);
    let idle_stop = all
        .iter()
        .find(|tick| stops_idle(&all, tick))
        .expect("the idle stop's decision");
    assert_eq!(idle_stop.service, "warren-control-plane");
    assert_eq!(
        idle_stop.attribute("event_type"),
        Some("workspace.stop_requested")
    );
    assert_eq!(
        idle_stop.parent, "",
        "a time-based decision starts its own trace"
    );
    assert!(
        idle_stop.trace_id != one && idle_stop.trace_id != two,
        "the idle stop is not in a message's trace"
    );
    assert!(
        idle_stop
            .links
            .iter()
            .any(|(trace, _)| *trace == one || *trace == two),
        "the idle stop links to the trace of the work it ends: {idle_stop:?}"
    );
    // Every span of the two messages' traces came from a process of this test.
    let services: HashMap<&str, usize> = all
        .iter()
        .filter(|s| s.trace_id == one || s.trace_id == two)
        .fold(HashMap::new(), |mut m, s| {
            *m.entry(s.service.as_str()).or_default() += 1;
            m
        });
    assert_eq!(
        services.len(),
        3,
        "gateway, control plane and runtime: {services:?}"
    );

    second.stop().await;
    gateway.stop().await;
    let js = async_nats::jetstream::new(
        async_nats::connect(support::nats_url())
            .await
            .expect("nats"),
    );
    support::remove(&js, &Namespace::new(&prefix), &["research"]).await;
}
