//! The real Claude Code CLI (`@anthropic-ai/claude-code` from the npm registry, pinned in
//! `scripts/lib/clis.sh`) as a `command` agent: `claude -p --output-format json` in the
//! workspace directory, `ANTHROPIC_BASE_URL` a local server that speaks the Messages API
//! (streamed), its key the agent's allowed `ANTHROPIC_API_KEY`, Warren's tools through
//! `--mcp-config` (`warren-workspace-runtime --mcp`), allowed without a prompt. The model
//! asks for `mention` and `memory_put`; Claude Code calls them over MCP; the result's text is
//! the reply and its usage the turn's.

mod support;

use axum::response::IntoResponse;
use serde_json::{Value, json};

/// The name of the offered tool that ends in `suffix` (Claude Code names an MCP server's
/// tools `mcp__{server}__{tool}`).
fn tool(body: &Value, suffix: &str) -> Option<String> {
    body["tools"].as_array()?.iter().find_map(|t| {
        t["name"]
            .as_str()
            .filter(|n| n.ends_with(suffix))
            .map(str::to_owned)
    })
}

/// The model: asked with Warren's tools, it calls `mention` and `memory_put`; given their
/// results, it answers; anything else Claude Code asks (it may ask for a title or a
/// summary) gets a short text. Streamed when asked to be.
fn answer(body: &Value) -> axum::response::Response {
    let last = body["messages"].as_array().and_then(|m| m.last()).cloned();
    let answered = last.is_some_and(|m| m["content"].to_string().contains("tool_result"));
    let (content, stop) = match (answered, tool(body, "mention"), tool(body, "memory_put")) {
        (false, Some(mention), Some(put)) => (
            json!([
                {"type": "text", "text": "I'll ask bob and note it."},
                {"type": "tool_use", "id": "toolu_1", "name": mention,
                 "input": {"agent": "bob", "text": "bob, please review the plan"}},
                {"type": "tool_use", "id": "toolu_2", "name": put,
                 "input": {"key": "review", "value": "asked bob"}}
            ]),
            "tool_use",
        ),
        (true, _, _) => (
            json!([{"type": "text", "text": "Asked bob to review the plan."}]),
            "end_turn",
        ),
        (false, _, _) => (json!([{"type": "text", "text": "ok"}]), "end_turn"),
    };
    let message = json!({"id": "msg_1", "type": "message", "role": "assistant",
        "model": body["model"], "content": content, "stop_reason": stop,
        "stop_sequence": null,
        "usage": {"input_tokens": 500, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 30}});
    if body["stream"] == true {
        support::messages_stream(&message)
    } else {
        axum::Json(message).into_response()
    }
}

/// The documented Claude Code recipe (docs/coding-agents.md), with this test's model URL.
fn recipe(base_url: &str) -> Value {
    let cli = support::cli("WARREN_CLAUDE_BIN", "claude-code-", "claude");
    let runtime = env!("CARGO_BIN_EXE_warren-workspace-runtime");
    warren_test_models::command_agent(
        warren_test_models::claude_command(&cli, base_url, Some(runtime)),
        "claude-json",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_answers_a_message_and_uses_warrens_tools_over_mcp() {
    let (base_url, requests) = support::dynamic_model("/v1/messages", answer).await;
    let turn = support::cli_turn(
        "claude",
        recipe(&base_url),
        ("ANTHROPIC_API_KEY", "sk-ant-claude-agent-key"),
        "get the plan reviewed",
    )
    .await;
    let requests = requests.lock().expect("lock").clone();
    let asked: Vec<String> = requests
        .iter()
        .map(|(_, b)| {
            format!(
                "{} tools={:?}",
                b["model"],
                b["tools"]
                    .as_array()
                    .map(|t| t.iter().map(|t| t["name"].to_string()).collect::<Vec<_>>())
            )
        })
        .collect();
    turn.assert_asked_bob(&format!("requests: {asked:?}"));
    assert!(turn.usage.output_tokens >= 60, "{:?}", turn.usage);

    for (headers, body) in &requests {
        assert_eq!(
            headers.get("x-api-key").and_then(|v| v.to_str().ok()),
            Some("sk-ant-claude-agent-key"),
            "the agent's allowed key"
        );
        assert!(headers.get("anthropic-version").is_some());
        assert!(body["model"].is_string());
    }
    let asked_with_tools = requests
        .iter()
        .find(|(_, b)| tool(b, "mention").is_some())
        .expect("a request offering Warren's tools");
    let body = &asked_with_tools.1;
    for name in [
        "mention",
        "reply",
        "list_agents",
        "memory_get",
        "memory_put",
    ] {
        let full = format!("mcp__warren__{name}");
        assert!(
            tool(body, &full).is_some(),
            "{full} offered: {:?}",
            body["tools"]
                .as_array()
                .map(|t| t.iter().map(|t| t["name"].clone()).collect::<Vec<_>>())
        );
    }
    assert!(
        body["messages"]
            .to_string()
            .contains("get the plan reviewed"),
        "the message reached the model"
    );
    assert!(
        body["system"].to_string().len() > 100,
        "Claude Code's system prompt"
    );
}

/// A model that answers every request with the same text.
fn plain(body: &Value) -> axum::response::Response {
    let message = json!({"id": "msg_p", "type": "message", "role": "assistant",
        "model": body["model"], "content": [{"type": "text", "text": "Noted."}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 2}});
    if body["stream"] == true {
        support::messages_stream(&message)
    } else {
        axum::Json(message).into_response()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_s_next_message_resumes_its_claude_code_session() {
    let (base_url, requests) = support::dynamic_model("/v1/messages", plain).await;
    let mut driver = recipe(&base_url);
    driver["settings"]["resume"] = json!(["--resume", "{session}"]);
    let turns = support::cli_turns(
        "ccresume",
        driver,
        ("ANTHROPIC_API_KEY", "sk-ant-claude-agent-key"),
        &["my name is Ada", "what is my name?"],
    )
    .await;
    for turn in &turns {
        assert_eq!(turn.reply.as_ref().map(|r| r.0.as_str()), Some("Noted."));
    }
    let requests = requests.lock().expect("lock").clone();
    let last = requests
        .iter()
        .rev()
        .find(|(_, b)| b["messages"].to_string().contains("what is my name?"))
        .expect("the second message reached the model");
    assert!(
        last.1["messages"].to_string().contains("my name is Ada"),
        "the second turn carries the first (the session was resumed): {}",
        last.1["messages"]
    );
}
