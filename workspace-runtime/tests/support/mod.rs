//! What the runtime's NATS tests share: a message into an agent's inbox, what the outbox
//! got, waiting for the inbox to be acknowledged, and cleaning up. Each test file uses part.
#![allow(dead_code)]

pub mod kube;
pub mod slack;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use warren_schema::EventId;
use warren_schema::events::Origin;
use warren_schema::nats::{InboxMessage, Namespace, OutboxMessage};

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The inbox and outbox streams (created if missing).
pub async fn streams(js: &jetstream::Context, ns: &Namespace) -> (stream::Stream, stream::Stream) {
    let inbox = js
        .get_or_create_stream(ns.inbox_stream_config())
        .await
        .expect("inbox stream");
    let outbox = js
        .get_or_create_stream(ns.outbox_stream_config())
        .await
        .expect("outbox stream");
    (inbox, outbox)
}

/// A routed message for `agent` of `workspace`, answering a webhook delivery.
pub fn message(workspace: &str, agent: &str, text: &str) -> InboxMessage {
    InboxMessage {
        routing_id: EventId::random(),
        message_id: EventId::random(),
        workspace: workspace.into(),
        agent: agent.into(),
        text: text.into(),
        reply_to: Origin::Webhook {
            endpoint: "ci".into(),
            delivery_id: "1".into(),
        },
        chain: vec![],
        correlation_id: None,
        files: vec![],
    }
}

/// Publishes `message` to its agent's inbox (what the control plane does), stored.
pub async fn send(js: &jetstream::Context, ns: &Namespace, message: &InboxMessage) {
    js.publish(
        ns.inbox_subject(&message.workspace, &message.agent),
        serde_json::to_vec(message).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

/// What `workspace` publishes to the outbox from now on (and what is there already).
pub async fn follow_outbox(
    outbox: &stream::Stream,
    ns: &Namespace,
    workspace: &str,
) -> impl futures_util::Stream<Item = OutboxMessage> {
    outbox
        .create_consumer(consumer::pull::Config {
            filter_subject: ns.outbox_subject(workspace),
            ..Default::default()
        })
        .await
        .expect("outbox consumer")
        .messages()
        .await
        .expect("messages")
        .map(|m| serde_json::from_slice(&m.expect("ok").payload).expect("an outbox message"))
}

/// The next output within 20 s.
pub async fn next_output(
    outputs: &mut (impl futures_util::Stream<Item = OutboxMessage> + Unpin),
) -> OutboxMessage {
    tokio::time::timeout(Duration::from_secs(20), outputs.next())
        .await
        .expect("an output in time")
        .expect("the outbox stays open")
}

/// Everything `workspace` has published to the outbox so far.
pub async fn outbox_contents(
    outbox: &stream::Stream,
    ns: &Namespace,
    workspace: &str,
) -> Vec<OutboxMessage> {
    let mut batch = outbox
        .create_consumer(consumer::pull::Config {
            filter_subject: ns.outbox_subject(workspace),
            ..Default::default()
        })
        .await
        .expect("outbox consumer")
        .fetch()
        .max_messages(100)
        .messages()
        .await
        .expect("fetch");
    let mut out = Vec::new();
    while let Some(Ok(m)) = batch.next().await {
        out.push(serde_json::from_slice(&m.payload).expect("an outbox message"));
    }
    out
}

/// The agent's inbox consumer once nothing is waiting for an acknowledgement.
pub async fn acknowledged(inbox: &stream::Stream, workspace: &str, agent: &str) -> consumer::Info {
    let mut consumer = inbox
        .get_consumer::<consumer::pull::Config>(&Namespace::inbox_consumer(workspace, agent))
        .await
        .expect("the agent's consumer");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = consumer.info().await.expect("info").clone();
        if info.num_ack_pending == 0 && info.ack_floor.stream_sequence > 0 {
            return info;
        }
        assert!(Instant::now() < deadline, "never acknowledged: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes the streams (the control plane's too) and the buckets of `workspaces` and the
/// shared one.
pub async fn remove(js: &jetstream::Context, ns: &Namespace, workspaces: &[&str]) {
    let _ = js.delete_stream(ns.inbox_stream()).await;
    let _ = js.delete_stream(ns.outbox_stream()).await;
    let _ = js.delete_stream(ns.undelivered_stream()).await;
    for bucket in workspaces
        .iter()
        .map(|w| ns.workspace_bucket(w))
        .chain([ns.shared_bucket()])
    {
        let _ = js.delete_key_value(bucket).await;
    }
}

/// What a local model API server received: each request's headers and JSON body.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, serde_json::Value)>>>;

/// A local model API (OpenAI Chat Completions or Responses, Anthropic Messages: real HTTP,
/// real JSON) answering POSTs to `path` from `script` in turn, a status and a body per call
/// (500 once the script has ended). A 429 carries `Retry-After: 0`. A request with
/// `"stream": true` gets its 200 answer as a Responses API event stream
/// ([`responses_stream`]). Returns `http://{addr}`.
pub async fn model_server(path: &str, script: Vec<(u16, serde_json::Value)>) -> (String, Seen) {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::{Json, Router, routing::post};
    let seen: Seen = Seen::default();
    let log = seen.clone();
    let script = std::sync::Arc::new(std::sync::Mutex::new(script.into_iter()));
    let app = Router::new().route(
        path,
        post(
            move |headers: HeaderMap, Json(body): Json<serde_json::Value>| {
                let (log, script) = (log.clone(), script.clone());
                async move {
                    let stream = body["stream"] == true;
                    log.lock().expect("lock").push((headers, body));
                    let (status, answer) = script
                        .lock()
                        .expect("lock")
                        .next()
                        .unwrap_or((500, serde_json::json!({"error": "script ended"})));
                    if stream && status == 200 {
                        return responses_stream(&answer);
                    }
                    let mut response: Response =
                        (StatusCode::from_u16(status).expect("status"), Json(answer))
                            .into_response();
                    if status == 429 {
                        response
                            .headers_mut()
                            .insert("retry-after", "0".parse().expect("header"));
                    }
                    response
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use warren_test_models::{dynamic_model, messages_stream, responses_stream};

/// Text logs for runtimes a test starts through a backend (their log is read on failure).
pub fn text_logs() -> warren_schema::launch::TelemetryLaunch {
    warren_schema::launch::TelemetryLaunch {
        log_format: Some("text".into()),
        ..Default::default()
    }
}

/// A launch contract for `workspace` hosting one agent (`{"driver": ..., "settings": ...}`).
pub fn launch(
    url: &str,
    prefix: &str,
    workspace: &str,
    agent: &str,
    driver: serde_json::Value,
    dir: &std::path::Path,
) -> warren_workspace_runtime::Config {
    let mut contract = warren_schema::launch::LaunchContract::new(
        workspace,
        dir.to_owned(),
        warren_schema::launch::NatsLaunch::new(url, prefix),
    );
    contract
        .agents
        .push(warren_schema::launch::AgentLaunch::new(
            agent,
            driver["driver"].as_str().unwrap_or("echo"),
            driver["settings"].clone(),
        ));
    contract
}

/// The control plane's agent directory service (the real one, over a database of its own)
/// answering the workspaces of `ns` with `agents` (name, workspace) configured, until
/// dropped.
pub struct ServedDirectory {
    _db: warren_schema::testing::TestDatabase,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for ServedDirectory {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn serve_directory(
    js: &jetstream::Context,
    ns: &Namespace,
    agents: &[(&str, &str)],
) -> ServedDirectory {
    use warren_control_plane::config_file::{ConfigFile, sync};
    let db = warren_schema::testing::TestDatabase::new().await;
    let file: ConfigFile = serde_json::from_value(serde_json::json!({
        "agents": agents
            .iter()
            .map(|(name, workspace)| serde_json::json!({"name": name, "workspace": workspace}))
            .collect::<Vec<_>>(),
    }))
    .expect("a configuration");
    sync(&db.log(), &Default::default(), &file)
        .await
        .expect("the agents configured");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(warren_control_plane::delivery::directory::run(
        js.client(),
        ns.clone(),
        db.log(),
        stop.clone(),
    ));
    ServedDirectory { _db: db, stop }
}

/// A turn of alice (workspace research, answering `routing`) as the runtime holds it, with
/// its MCP socket open: what a `command` agent's program finds in `WARREN_MCP_SOCKET`.
/// The directory (served while the socket is: [`ServedDirectory`]) lists alice and bob
/// (ops).
pub async fn mcp_turn(
    js: &jetstream::Context,
    ns: &Namespace,
    routing: EventId,
    reply_to: &Origin,
) -> (warren_workspace_runtime::mcp::TurnSocket, ServedDirectory) {
    use warren_workspace_runtime::agent::TurnContext;
    use warren_workspace_runtime::mcp::{McpTurn, TurnSocket};
    let buckets = warren_workspace_runtime::memory::Buckets::open(js, ns, "research", true)
        .await
        .expect("buckets");
    let (own, shared) = buckets.for_agent("alice");
    let ctx = TurnContext {
        workspace: "research".into(),
        agent: "alice".into(),
        routing_id: routing.to_string(),
        reply_to: Some(serde_json::to_string(reply_to).expect("json")),
        memory: Some(own),
        shared_memory: Some(shared),
        directory: Some(warren_workspace_runtime::control_plane::Directory::new(
            js.client(),
            ns,
            "research",
        )),
        ..TurnContext::default()
    };
    let served = serve_directory(js, ns, &[("alice", "research"), ("bob", "ops")]).await;
    let dir = std::env::temp_dir().join(format!(
        "warren-mcp-{}-{}",
        std::process::id(),
        ns.outbox_stream()
    ));
    let socket = TurnSocket::open(
        &dir,
        McpTurn::of(&ctx),
        warren_workspace_runtime::outbox::Outbox::new(js.clone(), ns, "research"),
    )
    .expect("the turn's MCP socket");
    (socket, served)
}

/// Waits until `check` holds, at most 30 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A webhook message for `agent` recorded in the log, as the gateway records it.
pub async fn ask_webhook(
    log: &warren_schema::EventLog,
    agent: &str,
    delivery_id: &str,
    text: &str,
) {
    use warren_schema::events::MessageReceived;
    use warren_schema::{AppendRequest, Metadata, NewEvent};
    let message = MessageReceived {
        origin: Origin::Webhook {
            endpoint: "ci".into(),
            delivery_id: delivery_id.into(),
        },
        text: text.into(),
        addressed_agents: vec![agent.into()],
        files: vec![],
    };
    log.append(&AppendRequest::new(
        "webhook:ci",
        vec![NewEvent::from_domain(EventId::random(), &message, Metadata::new("test")).expect("e")],
    ))
    .await
    .expect("append");
}

/// What a `command` agent running a coding-agent CLI did in one turn, as its runtime
/// published it.
#[derive(Debug)]
pub struct CliTurn {
    pub routing_id: EventId,
    /// (to, text, in reply to)
    pub mention: Option<(String, String, EventId)>,
    /// (key, value)
    pub memory: Option<(String, Option<serde_json::Value>)>,
    /// (text, in reply to)
    pub reply: Option<(String, EventId)>,
    pub usage: warren_schema::events::TurnUsage,
}

/// Runs one turn of agent `alice` (workspace `research`) configured with `driver`, through
/// a real runtime on real NATS, with the model key `key` (variable, value) allowed, and
/// collects its outputs until the turn's end.
pub async fn cli_turn(
    tag: &str,
    driver: serde_json::Value,
    key: (&str, &str),
    text: &str,
) -> CliTurn {
    cli_turns(tag, driver, key, &[text])
        .await
        .pop()
        .expect("one turn")
}

impl CliTurn {
    /// The turn the scripted models of the CLI tests lead to: `mention` of bob and a
    /// `memory_put` made over MCP as this turn, and the final answer as the reply.
    pub fn assert_asked_bob(&self, context: &str) {
        assert_eq!(
            self.mention,
            Some((
                "bob".to_owned(),
                "bob, please review the plan".to_owned(),
                self.routing_id
            )),
            "the mention made through MCP, as the turn ({context})"
        );
        assert_eq!(
            self.memory,
            Some(("review".to_owned(), Some(serde_json::json!("asked bob")))),
            "the memory write made through MCP ({context})"
        );
        assert_eq!(
            self.reply,
            Some(("Asked bob to review the plan.".to_owned(), self.routing_id)),
            "the CLI's final answer is the reply ({context})"
        );
    }
}

/// [`cli_turn`] for several messages of one conversation, one after the other.
pub async fn cli_turns(
    tag: &str,
    driver: serde_json::Value,
    key: (&str, &str),
    texts: &[&str],
) -> Vec<CliTurn> {
    let url = nats_url();
    let prefix = format!("{tag}{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (_, outbox) = streams(&js, &ns).await;
    let dir = std::env::temp_dir().join(format!("warren-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key_file = dir.join("model.key");
    std::fs::write(&key_file, format!("{}\n", key.1)).expect("key");
    let mut config = launch(&url, &prefix, "research", "alice", driver, &dir);
    config.agents[0].keys.insert(key.0.into(), key_file);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(config, shutdown.clone()));
    let mut outputs = Box::pin(follow_outbox(&outbox, &ns, "research").await);
    let conversation = EventId::random();
    let mut turns = Vec::new();
    for text in texts {
        let mut message = message("research", "alice", text);
        message.correlation_id = Some(conversation);
        send(&js, &ns, &message).await;
        let mut turn = CliTurn {
            routing_id: message.routing_id,
            mention: None,
            memory: None,
            reply: None,
            usage: Default::default(),
        };
        loop {
            match next_output(&mut outputs).await {
                OutboxMessage::Mention {
                    to_agent,
                    text,
                    in_reply_to,
                    ..
                } => turn.mention = Some((to_agent, text, in_reply_to)),
                OutboxMessage::MemoryWritten { key, value, .. } => {
                    turn.memory = Some((key, value));
                }
                OutboxMessage::Reply {
                    text, in_reply_to, ..
                } => turn.reply = Some((text, in_reply_to)),
                OutboxMessage::TurnCompleted {
                    in_reply_to, usage, ..
                } => {
                    assert_eq!(in_reply_to, message.routing_id, "the end of this turn");
                    turn.usage = usage;
                    break;
                }
                OutboxMessage::Heartbeat { .. } => {}
                other => panic!("unexpected output {other:?}"),
            }
        }
        turns.push(turn);
    }
    shutdown.cancel();
    runtime.await.expect("join").expect("runtime");
    remove(&js, &ns, &["research"]).await;
    let _ = std::fs::remove_dir_all(&dir);
    turns
}

/// A CLI installed by `scripts/lib/clis.sh` ([`warren_test_models::cli`]); panics with
/// how to install it when it is not.
pub fn cli(env_var: &str, dir_prefix: &str, bin: &str) -> String {
    warren_test_models::cli(env_var, dir_prefix, bin).unwrap_or_else(|e| panic!("{e}"))
}

/// The control plane's leader as the end-to-end tests run it: the local backend starting
/// the real runtime binary under `root`, on NATS `prefix`, with the agents file
/// `config_file` and the operator's model keys in `model_keys`.
pub fn local_leader(
    log: &warren_schema::EventLog,
    holder: &str,
    prefix: &str,
    root: &std::path::Path,
    config_file: Option<std::path::PathBuf>,
    model_keys: Option<std::path::PathBuf>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<warren_control_plane::error::Result<()>> {
    local_leader_on(
        &nats_url(),
        log,
        holder,
        prefix,
        root,
        config_file,
        model_keys,
        shutdown,
    )
}

/// [`local_leader`] on the NATS server at `nats_url`.
#[allow(clippy::too_many_arguments)]
pub fn local_leader_on(
    nats_url: &str,
    log: &warren_schema::EventLog,
    holder: &str,
    prefix: &str,
    root: &std::path::Path,
    config_file: Option<std::path::PathBuf>,
    model_keys: Option<std::path::PathBuf>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<warren_control_plane::error::Result<()>> {
    use warren_control_plane::backend::BackendConfig;
    use warren_control_plane::backend::local::LocalConfig;
    use warren_control_plane::controller::{self, ControllerConfig, NatsConfig};
    let nats_url = nats_url.to_owned();
    tokio::spawn(controller::run(
        log.clone(),
        ControllerConfig {
            holder: holder.into(),
            lease_ttl: Duration::from_secs(5),
            tick: Duration::from_millis(100),
            policy: Default::default(),
            config_file,
            backend: Some(BackendConfig::Local(LocalConfig {
                nats_url: Some(nats_url.clone()),
                nats_prefix: prefix.to_owned(),
                model_keys,
                telemetry: text_logs(),
                stop_grace: Duration::from_secs(5),
                ..LocalConfig::new(
                    root.to_owned(),
                    vec![env!("CARGO_BIN_EXE_warren-workspace-runtime").into()],
                )
            })),
            nats: Some(NatsConfig {
                url: nats_url,
                namespace: Namespace::new(prefix),
                credentials: None,
            }),
        },
        shutdown.clone(),
    ))
}

/// One span as an OTLP/HTTP receiver got it (ids in hex; `parent` empty for a root).
#[derive(Debug, Clone)]
pub struct ExportedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent: String,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    /// String and integer attributes, as text.
    pub attributes: Vec<(String, String)>,
}

impl ExportedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What a local OTLP receiver collected so far.
pub type Spans = std::sync::Arc<std::sync::Mutex<Vec<ExportedSpan>>>;

/// A local OTLP/HTTP receiver (`POST /v1/traces`, protobuf, as the exporters send it):
/// every span of every export request. Returns the endpoint to give as
/// `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[allow(dead_code)]
pub async fn otlp_receiver() -> (String, Spans) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    use prost::Message;
    fn text(kv: &KeyValue) -> Option<(String, String)> {
        let value = match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::BoolValue(b) => b.to_string(),
            _ => return None,
        };
        Some((kv.key.clone(), value))
    }
    let spans = Spans::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP body");
                let mut sink = sink.lock().expect("lock");
                for resource in &request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .filter_map(text)
                        .find(|(k, _)| k == "service.name")
                        .map(|(_, v)| v)
                        .unwrap_or_default();
                    for span in resource.scope_spans.iter().flat_map(|s| &s.spans) {
                        sink.push(ExportedSpan {
                            service: service.clone(),
                            name: span.name.clone(),
                            trace_id: hex::encode(&span.trace_id),
                            span_id: hex::encode(&span.span_id),
                            parent: hex::encode(&span.parent_span_id),
                            links: span
                                .links
                                .iter()
                                .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                                .collect(),
                            attributes: span.attributes.iter().filter_map(text).collect(),
                        });
                    }
                }
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}
