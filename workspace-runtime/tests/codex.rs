//! The real Codex CLI (`@openai/codex` from the npm registry, pinned in
//! `scripts/lib/clis.sh`) as a `command` agent: `codex exec --json` in the workspace
//! directory, its model provider a local server that speaks the Responses API (streamed),
//! its key the agent's allowed `OPENAI_API_KEY`, Warren's tools through its MCP server
//! configuration (`warren-workspace-runtime --mcp`). The model asks for the `mention` and
//! `memory_put` tools; Codex calls them over MCP; the runtime publishes the mention and
//! writes the memory as the turn; Codex's final message is the reply.

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
    let runtime = env!("CARGO_BIN_EXE_warren-workspace-runtime");
    json!({"driver": "command", "settings": {
        "input": "argument",
        "output": "codex-json",
        "timeout_secs": 120,
        "command": [
            support::cli("WARREN_CODEX_BIN", "codex-", "codex"), "exec",
            "--json",
            "--skip-git-repo-check",
            "--sandbox", "danger-full-access",
            "-c", "approval_policy=\"never\"",
            "-c", "model_provider=\"warren\"",
            "-c", format!("model_providers.warren={{name=\"warren\",base_url=\"{base_url}/v1\",env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}"),
            "-c", format!("mcp_servers.warren={{command=\"{runtime}\",args=[\"--mcp\"],env_vars=[\"WARREN_MCP_SOCKET\"]}}"),
            "-m", "gpt-test"
        ]
    }})
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
    assert_eq!(
        turn.mention,
        Some((
            "bob".to_owned(),
            "bob, please review the plan".to_owned(),
            turn.routing_id
        )),
        "the mention made through MCP, as the turn"
    );
    assert_eq!(
        turn.memory,
        Some(("review".to_owned(), Some(json!("asked bob"))))
    );
    assert_eq!(
        turn.reply,
        Some(("Asked bob to review the plan.".to_owned(), turn.routing_id)),
        "Codex's final message is the reply"
    );
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
