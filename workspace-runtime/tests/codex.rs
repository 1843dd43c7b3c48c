//! The real Codex CLI (`@openai/codex` from the npm registry, pinned in
//! `scripts/lib/clis.sh`) as a `command` agent: `codex exec` in the workspace directory, its
//! model provider a local server that speaks the Responses API (streamed), its key the
//! agent's allowed `OPENAI_API_KEY`, Warren's tools through its MCP server configuration
//! (`warren-workspace-runtime --mcp`). The model asks for the `mention` and `memory_put`
//! tools; Codex calls them over MCP; the runtime publishes the mention and writes the
//! memory as the turn; Codex's final message is the reply.

mod support;

use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use serde_json::{Value, json};
use warren_schema::nats::{Namespace, OutboxMessage};

/// The Codex binary: `WARREN_CODEX_BIN` (set by `./scripts/test`), else the pinned install.
fn codex() -> String {
    if let Ok(bin) = std::env::var("WARREN_CODEX_BIN") {
        return bin;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../.warren/clis");
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("node_modules/.bin/codex"))
        .find(|p| p.exists())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| {
            panic!(
                "the Codex CLI is not installed: run ./scripts/test, or \
                 `source scripts/lib/services.sh scripts/lib/clis.sh; ensure_codex`"
            )
        })
}

type Requests = Arc<Mutex<Vec<(axum::http::HeaderMap, Value)>>>;

/// A model behind the Responses API: asked first, it calls the tools whose names end in
/// `mention` and `memory_put` (whatever prefix the client gives MCP tools); given their
/// outputs, it answers. Streams every answer.
async fn model() -> (String, Requests) {
    let requests: Requests = Requests::default();
    let seen = requests.clone();
    let app = axum::Router::new().route(
        "/v1/responses",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                let seen = seen.clone();
                async move {
                    seen.lock().expect("lock").push((headers, body.clone()));
                    let input = body["input"].as_array().cloned().unwrap_or_default();
                    let answered: Vec<&Value> = input
                        .iter()
                        .filter(|i| i["type"] == "function_call_output")
                        .collect();
                    // A tool by the end of its name: a plain function, or one in a
                    // `namespace` tool (how Codex offers an MCP server's tools): (namespace,
                    // name).
                    let tool = |suffix: &str| {
                        body["tools"].as_array().and_then(|tools| {
                            tools.iter().find_map(|t| match t["type"].as_str() {
                                Some("namespace") => t["tools"].as_array().and_then(|inner| {
                                    inner.iter().find_map(|f| {
                                        f["name"].as_str().filter(|n| n.ends_with(suffix)).map(
                                            |n| (t["name"].as_str().map(str::to_owned), n.to_owned()),
                                        )
                                    })
                                }),
                                _ => t["name"]
                                    .as_str()
                                    .filter(|n| n.ends_with(suffix))
                                    .map(|n| (None, n.to_owned())),
                            })
                        })
                    };
                    let call = |n: u32, (namespace, name): (Option<String>, String), arguments: Value| {
                        let mut call = json!({"type": "function_call", "id": format!("fc_{n}"),
                            "call_id": format!("call_{n}"), "name": name, "status": "completed",
                            "arguments": arguments.to_string()});
                        if let Some(namespace) = namespace {
                            call["namespace"] = namespace.into();
                        }
                        call
                    };
                    let output = match (answered.is_empty(), tool("mention"), tool("memory_put"))
                    {
                        (true, Some(mention), Some(put)) => json!([
                            call(1, mention, json!({"agent": "bob", "text": "bob, please review the plan"})),
                            call(2, put, json!({"key": "review", "value": "asked bob"}))
                        ]),
                        (true, _, _) => json!([{"type": "message", "id": "msg_0",
                            "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "annotations": [],
                                         "text": "no Warren tools were offered"}]}]),
                        (false, _, _) => json!([{"type": "message", "id": "msg_1",
                            "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "annotations": [],
                                         "text": "Asked bob to review the plan."}]}]),
                    };
                    support::responses_stream(&json!({
                        "id": "resp_1", "object": "response", "status": "completed",
                        "model": body["model"], "output": output,
                        "usage": {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0},
                                  "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 0},
                                  "total_tokens": 1020}}))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), requests)
}

/// The documented Codex recipe (docs/coding-agents.md), with this test's model URL.
fn recipe(base_url: &str) -> Value {
    let runtime = env!("CARGO_BIN_EXE_warren-workspace-runtime");
    json!({"driver": "command", "settings": {
        "input": "argument",
        "output": "codex-json",
        "timeout_secs": 120,
        "command": [
            codex(), "exec",
            "--json",
            "--skip-git-repo-check",
            "--sandbox", "danger-full-access",
            "-c", "approval_policy=\"never\"",
            "-c", "model_provider=\"warren\"",
            "-c", format!("model_providers.warren={{name=\"warren\",base_url=\"{base_url}\",env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}"),
            "-c", format!("mcp_servers.warren={{command=\"{runtime}\",args=[\"--mcp\"],env_vars=[\"WARREN_MCP_SOCKET\"]}}"),
            "-m", "gpt-test"
        ]
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_answers_a_message_and_uses_warrens_tools_over_mcp() {
    let url = support::nats_url();
    let prefix = format!("codex{}", std::process::id());
    let ns = Namespace::new(&prefix);
    let js = jetstream::new(async_nats::connect(&url).await.expect("nats"));
    let (_, outbox) = support::streams(&js, &ns).await;
    let (base_url, requests) = model().await;
    let dir = std::env::temp_dir().join(format!("warren-codex-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("openai.key");
    std::fs::write(&key, "sk-codex-agent-key\n").expect("key");
    let mut config = support::launch(&url, &prefix, "research", "alice", recipe(&base_url), &dir);
    config.agents[0].keys.insert("OPENAI_API_KEY".into(), key);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let runtime = tokio::spawn(warren_workspace_runtime::run(config, shutdown.clone()));
    let mut outputs = Box::pin(support::follow_outbox(&outbox, &ns, "research").await);
    let message = support::message("research", "alice", "get the plan reviewed");
    support::send(&js, &ns, &message).await;

    let (mut mention, mut memory, mut reply) = (None, None, None);
    loop {
        match support::next_output(&mut outputs).await {
            OutboxMessage::Mention {
                to_agent,
                text,
                in_reply_to,
                ..
            } => mention = Some((to_agent, text, in_reply_to)),
            OutboxMessage::MemoryWritten { key, value, .. } => memory = Some((key, value)),
            OutboxMessage::Reply {
                text, in_reply_to, ..
            } => reply = Some((text, in_reply_to)),
            OutboxMessage::TurnCompleted {
                in_reply_to, usage, ..
            } => {
                assert_eq!(in_reply_to, message.routing_id);
                // Codex's own account of the turn (`--json`): two model calls of 1,000
                // input and 20 output tokens each, as the model server reported them.
                assert_eq!((usage.input_tokens, usage.output_tokens), (2000, 40));
                break;
            }
            OutboxMessage::Heartbeat { .. } => {}
            other => panic!("unexpected output {other:?}"),
        }
    }
    assert_eq!(
        mention,
        Some((
            "bob".to_owned(),
            "bob, please review the plan".to_owned(),
            message.routing_id
        )),
        "the mention made through MCP, as the turn"
    );
    assert_eq!(
        memory,
        Some(("review".to_owned(), Some(json!("asked bob"))))
    );
    assert_eq!(
        reply,
        Some((
            "Asked bob to review the plan.".to_owned(),
            message.routing_id
        )),
        "Codex's final message is the reply"
    );

    let requests = requests.lock().expect("lock").clone();
    assert!(requests.len() >= 2, "a tool step and an answer");
    for (headers, body) in &requests {
        assert_eq!(
            headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer sk-codex-agent-key"),
            "the agent's allowed key"
        );
        assert_eq!(body["model"], "gpt-test");
        assert_eq!(body["stream"], true);
    }
    let first = &requests[0].1;
    let user_text = first["input"].to_string();
    assert!(user_text.contains("get the plan reviewed"), "{user_text}");
    // Codex offers an MCP server's tools as one `namespace` tool named after the server.
    let warren: Vec<&str> = first["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter(|t| t["type"] == "namespace" && t["name"] == "mcp__warren")
        .flat_map(|t| t["tools"].as_array().into_iter().flatten())
        .filter_map(|t| t["name"].as_str())
        .collect();
    for tool in [
        "mention",
        "reply",
        "list_agents",
        "memory_get",
        "memory_put",
    ] {
        assert!(
            warren.contains(&tool),
            "{tool} offered over MCP: {warren:?}"
        );
    }
    // The tool results went back to the model.
    let outputs: Vec<String> = requests[1].1["input"]
        .as_array()
        .expect("input")
        .iter()
        .filter(|i| i["type"] == "function_call_output")
        .map(|i| i["output"].to_string())
        .collect();
    assert_eq!(outputs.len(), 2, "{outputs:?}");
    assert!(outputs[0].contains("ok"), "{outputs:?}");
    assert!(outputs[1].contains("revision"), "{outputs:?}");
    shutdown.cancel();
    runtime.await.expect("join").expect("runtime");
    support::remove(&js, &ns, &["research"]).await;
    let _ = std::fs::remove_dir_all(&dir);
}
