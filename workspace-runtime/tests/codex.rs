//! The real Codex CLI (`@openai/codex` from the npm registry, pinned in
//! `scripts/lib/clis.sh`) as a `command` agent: `codex exec --json` in the workspace
//! directory, its model provider a local server that speaks the Responses API (streamed),
//! its key the agent's allowed `OPENAI_API_KEY`, Warren's tools through its MCP server
//! configuration (`warren-workspace-runtime --mcp`). The model asks for the `mention` and
//! `memory_put` tools; Codex calls them over MCP; the runtime publishes the mention and
//! writes the memory as the turn; Codex's final message is the reply. The second test
//! runs the same agent behind the gateway and the control plane.

mod support;

use serde_json::{Value, json};

/// A tool by the end of its name: a plain function, or one in a `namespace` tool (how Codex
/// offers an MCP server's tools): (namespace, name).
fn tool(body: &Value, suffix: &str) -> Option<(Option<String>, String)> {
    body["tools"].as_array()?.iter().find_map(|t| {
        let named = |f: &Value| {
            f["name"]
                .as_str()
                .filter(|n| n.ends_with(suffix))
                .map(str::to_owned)
        };
        match t["type"].as_str() {
            Some("namespace") => t["tools"]
                .as_array()?
                .iter()
                .find_map(named)
                .map(|n| (t["name"].as_str().map(str::to_owned), n)),
            _ => named(t).map(|n| (None, n)),
        }
    })
}

fn call(n: u32, (namespace, name): (Option<String>, String), arguments: Value) -> Value {
    let mut call = json!({"type": "function_call", "id": format!("fc_{n}"),
        "call_id": format!("call_{n}"), "name": name, "status": "completed",
        "arguments": arguments.to_string()});
    if let Some(namespace) = namespace {
        call["namespace"] = namespace.into();
    }
    call
}

fn text(id: &str, text: &str) -> Value {
    json!({"type": "message", "id": id, "role": "assistant", "status": "completed",
           "content": [{"type": "output_text", "annotations": [], "text": text}]})
}

/// The model: asked first, it calls `mention` and `memory_put`; given their outputs, it
/// answers. Every answer streamed, 1,000 input and 20 output tokens each.
fn answer(body: &Value) -> axum::response::Response {
    let input = body["input"].as_array().cloned().unwrap_or_default();
    let answered = input.iter().any(|i| i["type"] == "function_call_output");
    let output = match (answered, tool(body, "mention"), tool(body, "memory_put")) {
        (false, Some(mention), Some(put)) => json!([
            call(
                1,
                mention,
                json!({"agent": "bob", "text": "bob, please review the plan"})
            ),
            call(2, put, json!({"key": "review", "value": "asked bob"}))
        ]),
        (false, _, _) => json!([text("msg_0", "no Warren tools were offered")]),
        (true, _, _) => json!([text("msg_1", "Asked bob to review the plan.")]),
    };
    support::responses_stream(&json!({
        "id": "resp_1", "object": "response", "status": "completed", "model": body["model"],
        "output": output,
        "usage": {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": 1020}}))
}

/// The documented Codex recipe (docs/coding-agents.md), with this test's model URL.
fn recipe(base_url: &str) -> Value {
    let cli = support::cli("WARREN_CODEX_BIN", "codex-", "codex");
    let runtime = env!("CARGO_BIN_EXE_warren-workspace-runtime");
    warren_test_models::command_agent(
        warren_test_models::codex_command(&cli, base_url, Some(runtime)),
        "codex-json",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_answers_a_message_and_uses_warrens_tools_over_mcp() {
    let (base_url, requests) = support::dynamic_model("/v1/responses", answer).await;
    let turn = support::cli_turn(
        "codex",
        recipe(&base_url),
        ("OPENAI_API_KEY", "sk-codex-agent-key"),
        "get the plan reviewed",
    )
    .await;
    turn.assert_asked_bob("codex");
    // Codex's own account of the turn (`--json`): two calls of 1,000 + 20 tokens.
    assert_eq!(
        (turn.usage.input_tokens, turn.usage.output_tokens),
        (2000, 40)
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
    assert!(
        first["input"].to_string().contains("get the plan reviewed"),
        "{}",
        first["input"]
    );
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
}

/// The whole path with real processes: a Slack message at the gateway, routed by the control
/// plane to a Codex agent whose runtime the local backend started (with its allowed key from
/// the operator's key directory); Codex mentions an echo agent of another workspace and
/// writes memory over MCP; both replies are posted in the Slack thread; the log records the
/// chain and the turn's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_message_reaches_codex_which_asks_another_agent_and_both_replies_come_back() {
    use std::os::unix::fs::PermissionsExt;
    use support::eventually;
    use warren_schema::events::{AgentReplied, AgentTurnCompleted};

    let db = warren_schema::testing::TestDatabase::new().await;
    let log = db.log();
    let nats_url = support::nats_url();
    let prefix = format!(
        "cdx{}x{}",
        std::process::id(),
        chrono::Utc::now().timestamp_subsec_nanos()
    );
    let root = std::env::temp_dir().join(format!("warren-codex-e2e-{prefix}"));
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys).expect("keys");
    std::fs::write(keys.join("OPENAI_API_KEY"), "sk-operator-openai-key\n").expect("key");
    std::fs::set_permissions(
        keys.join("OPENAI_API_KEY"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("mode");
    let (base_url, requests) = support::dynamic_model("/v1/responses", answer).await;
    let mut coder = recipe(&base_url);
    coder["settings"]["allowed_keys"] = json!(["OPENAI_API_KEY"]);
    let agents = root.join("agents.json");
    std::fs::write(
        &agents,
        json!({"agents": [
            {"name": "coder", "workspace": "research", "driver": "command",
             "settings": coder["settings"]},
            {"name": "bob", "workspace": "ops"}]})
        .to_string(),
    )
    .expect("agents");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let gateway = support::slack::Gateway::start(&db, &shutdown).await;
    let controller = support::local_leader(
        &log,
        "codex-e2e",
        &prefix,
        &root,
        Some(agents),
        Some(keys),
        &shutdown,
    );
    eventually("the agents configured", async || {
        log.read_type("agent.configured", 0, 10)
            .await
            .expect("r")
            .len()
            == 2
    })
    .await;

    let body = json!({
        "type": "event_callback", "team_id": "T1", "event_id": "EvCodex1", "event_time": 1,
        "authorizations": [{"user_id": "UAPP"}],
        "event": {"type": "app_mention", "user": "U1", "channel": "C1",
                  "text": "<@UAPP> @coder get the plan reviewed", "ts": "1700000000.000100"},
    });
    assert_eq!(gateway.slack_event(&body).await, 200);
    eventually("both replies posted in the thread", async || {
        gateway.posted().len() >= 2
    })
    .await;
    let posted = gateway.posted();
    let texts: Vec<&str> = posted.iter().filter_map(|p| p["text"].as_str()).collect();
    assert!(
        texts.contains(&"Asked bob to review the plan."),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("bob got: bob, please review the plan")),
        "{texts:?}"
    );
    for p in &posted {
        assert_eq!(p["thread_ts"], "1700000000.000100", "in the user's thread");
    }

    // The log: bob's answer leads back to the Slack event through Codex's mention.
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
        ]
    );
    let written = log.read_type("memory.written", 0, 10).await.expect("r");
    assert!(
        written
            .iter()
            .any(|e| e.payload["key"] == "review" && e.payload["agent"] == "coder"),
        "the memory write, as coder"
    );
    eventually("coder's turn completed with its tokens", async || {
        log.read_type("agent.turn_completed", 0, 10)
            .await
            .expect("r")
            .iter()
            .filter_map(|e| e.decode::<AgentTurnCompleted>().ok())
            .any(|t| t.agent == "coder" && t.usage.input_tokens == 2000)
    })
    .await;
    // The model saw the operator's key, given to coder because it is allowed it.
    for (headers, _) in requests.lock().expect("lock").iter() {
        assert_eq!(
            headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer sk-operator-openai-key")
        );
    }

    shutdown.cancel();
    controller.await.expect("join").expect("controller");
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await.expect("nats"));
    support::remove(
        &js,
        &warren_schema::nats::Namespace::new(&prefix),
        &["research", "ops"],
    )
    .await;
    let _ = std::fs::remove_dir_all(&root);
}

/// A model that answers every request with the same text.
fn plain(body: &Value) -> axum::response::Response {
    support::responses_stream(&json!({
        "id": "resp_p", "object": "response", "status": "completed", "model": body["model"],
        "output": [text("msg_p", "Noted.")],
        "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": 12}}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_s_next_message_resumes_its_codex_session() {
    let (base_url, requests) = support::dynamic_model("/v1/responses", plain).await;
    let mut driver = recipe(&base_url);
    driver["settings"]["resume"] = json!(["resume", "{session}"]);
    let turns = support::cli_turns(
        "cdxresume",
        driver,
        ("OPENAI_API_KEY", "sk-codex-agent-key"),
        &["my name is Ada", "what is my name?"],
    )
    .await;
    assert_eq!(turns.len(), 2);
    for turn in &turns {
        assert_eq!(turn.reply.as_ref().map(|r| r.0.as_str()), Some("Noted."));
    }
    let requests = requests.lock().expect("lock").clone();
    assert_eq!(requests.len(), 2, "one call per turn");
    let second = requests[1].1["input"].to_string();
    assert!(
        second.contains("my name is Ada") && second.contains("what is my name?"),
        "the second turn carries the first (the session was resumed): {second}"
    );
    assert!(
        !requests[0].1["input"]
            .to_string()
            .contains("what is my name?"),
        "and the first did not see the second"
    );
}
